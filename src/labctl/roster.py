"""Class rosters: the CSV an instructor gives `labctl up --roster` to provision one environment per student.

`load_roster(path, keys_dir)` reads and checks the whole file before anything is created:

* a bad *file* (missing, empty, not UTF-8 CSV, no usable header, missing columns, too many rows) raises a
  one-line `UserError` naming the file;
* a bad *row* never raises: it becomes a `RowError` (file, line, field, message) in `Roster.errors`, and every
  row is checked, so the instructor sees all problems at once. `Roster.require_valid(skip_bad_rows)` then
  either raises one `UserError` listing them all or returns the good students (`--skip-bad-rows`).

Columns are matched by alias (case-insensitive; spaces, hyphens and underscores are equivalent), so a
GitHub Classroom export (`identifier,github_username,github_id,name`) loads; it has no key column, so keys
come from `keys_dir/<student_id>.pub` (or `<github_username>.pub`). Student ids end up in cloud resource
names and on remote command lines, so they are held to `[A-Za-z0-9._-]`; names are only displayed and may
be any printable Unicode. Keys must be OpenSSH public keys of an accepted type, one per student: a key
shared by two students would give each access to the other's nodes, so both rows are rejected.
"""

from __future__ import annotations

import base64
import binascii
import csv
import difflib
import io
import re
import struct
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from labctl import inputs
from labctl.errors import UserError
from labctl.naming import CLASS_SHARED_OWNER, sanitise
from labctl.redact import strip_control

MAX_ROWS = 20_000
MAX_BYTES = inputs.MAX_ROSTER_BYTES  # 10 MiB
MAX_COLUMNS = 200
MAX_HEADER_CHARS = 100
MAX_ID_LEN = 32
MAX_NAME_LEN = 200
MAX_KEY_FILE_BYTES = 64 * 1024
SLUG_LEN = 24

# Canonical field -> accepted column names, in order of preference (already normalised, see _norm).
ALIASES: dict[str, tuple[str, ...]] = {
    "student_id": ("student_id", "id", "identifier", "netid", "username", "github_username"),
    "name": ("name", "full_name", "student_name"),
    "email": ("email", "e_mail", "email_address"),
    "ssh_public_key": ("ssh_public_key", "public_key", "ssh_key", "key"),
    "github_username": ("github_username",),
}

ACCEPTED_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
MIN_RSA_BITS = 2048
EXPECTED_KEY = "expected 'ssh-ed25519 AAAA...' or 'ssh-rsa ...'"
PRIVATE_KEY_MESSAGE = (
    "this is a PRIVATE key: ask the student for the .pub file (and for a new key pair: this one is no longer private)"
)

_ID_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_EMAIL_OK = re.compile(r"[^@\s]+@[^@\s.]+(\.[^@\s.]+)+\Z")
_GITHUB_OK = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}\Z")
_KEY_FRAGMENT = re.compile(r"-----(BEGIN|END) [A-Z0-9 ]+-----|[A-Za-z0-9+/]{40,}={0,2}\Z")
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9 ._@+=:,/-]+")
_SHELL_META = set(";|&$`'\"<>(){}[]*?!~#\\%^,=+:@/")
# Invisible characters that reorder or hide text ("Trojan Source"): never allowed, even in names.
_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@dataclass(frozen=True)
class Student:
    student_id: str  # as given, stripped
    slug: str  # safe form for resource names: [a-z0-9-], at most 24 chars, unique in the roster
    name: str  # display name (the id when the roster has none)
    email: str  # "" when not given
    ssh_public_key: str  # one normalised OpenSSH line: "type base64 [comment]"
    github_username: str | None
    line: int  # 1-based line number in the file


@dataclass
class RowError:
    line: int
    student_id: str | None
    field: str  # canonical field name (student_id, name, email, ssh_public_key, github_username) or "row"
    message: str
    file: str = "roster.csv"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


@dataclass
class Roster:
    path: Path
    students: list[Student]
    errors: list[RowError]
    columns: dict[str, str] = field(default_factory=dict)  # canonical field -> column header in the file
    rows: int = 0  # data rows read (good + bad, blank and comment lines excluded)

    @property
    def bad_lines(self) -> list[int]:
        return sorted({e.line for e in self.errors})

    def require_valid(self, skip_bad_rows: bool = False) -> list[Student]:
        """The students to provision; raise one UserError listing every bad row unless skip_bad_rows."""
        if self.errors and not skip_bad_rows:
            n = len(self.bad_lines)
            head = (
                f"{self.path}: {n} bad row{'s' if n != 1 else ''} (fix them or pass --skip-bad-rows); "
                "nothing was created"
            )
            raise UserError("\n".join([head, *(str(e) for e in self.errors)]))
        if not self.students:
            raise UserError(f"{self.path}: no valid students to provision; nothing was created")
        return list(self.students)


def roster_summary(roster: Roster) -> str:
    """One line, e.g. 'roster.csv: 48 students, 2 bad rows (lines 7, 12)'."""
    good = len(roster.students)
    text = f"{roster.path}: {good} student{'s' if good != 1 else ''}"
    bad = roster.bad_lines
    if bad:
        shown = ", ".join(str(n) for n in bad[:10]) + (", ..." if len(bad) > 10 else "")
        text += f", {len(bad)} bad row{'s' if len(bad) != 1 else ''} (line{'s' if len(bad) != 1 else ''} {shown})"
    return text


# ------------------------------------------------------------------------------------------- loading


def load_roster(path: Path | str, keys_dir: Path | str | None = None) -> Roster:
    """Read and check a roster CSV. Bad rows go to `Roster.errors`; a bad file raises UserError."""
    path = Path(path)
    where = strip_control(str(path), one_line=True)
    keys_dir = Path(keys_dir) if keys_dir is not None else None
    text = _read_text(path, where)
    if keys_dir is not None and not keys_dir.is_dir():
        raise UserError(f"{where}: keys directory {keys_dir} does not exist or is not a directory")

    lines = list(io.StringIO(text, newline=""))  # split like the csv module: \n, \r\n or \r
    reader = csv.reader(lines, delimiter=_guess_delimiter(lines))
    rows = _numbered_rows(reader, lines, where)

    header_line, header = next(rows, (0, []))
    if not header:
        raise UserError(f"{where}: no header line (only blank or '#' comment lines)")
    columns, index = _map_columns(header, header_line, where, keys_dir)

    errors: list[RowError] = []
    checked: list[tuple[int, str, Student | None, bytes, bool]] = []  # line, id, student, key blob, row ok
    seen_ids: dict[str, int] = {}
    seen_slugs: dict[str, tuple[int, str]] = {}
    count = 0
    for line, row in rows:
        count += 1
        if count > MAX_ROWS:
            raise UserError(
                f"{where}: more than {MAX_ROWS:,} students (line {line}); split the roster into several files"
            )
        row_errors, student, blob = _check_row(row, line, header, index, keys_dir, where)
        if student is not None:
            sid = student.student_id
            first = seen_ids.get(sid)
            other = seen_slugs.get(student.slug)
            if first is not None:
                row_errors.append(_err(where, line, sid, "student_id", f"duplicate id '{sid}' (first on line {first})"))
            elif student.slug.startswith(CLASS_SHARED_OWNER):
                row_errors.append(_err(
                    where, line, sid, "student_id",
                    f"'{sid}' becomes resource name '{student.slug}', and names starting with '{CLASS_SHARED_OWNER}' "
                    "are what labctl calls what a class shares at a site; give this student another id",
                ))
            elif other is not None:
                row_errors.append(_err(
                    where, line, sid, "student_id",
                    f"'{sid}' and '{other[1]}' (line {other[0]}) both become resource name '{student.slug}'; "
                    "ids must differ by more than case or punctuation",
                ))
            else:
                seen_ids[sid] = line
                seen_slugs[student.slug] = (line, sid)
        errors += row_errors
        shown_id = student.student_id if student else _show(_cell(row, index["student_id"]).strip(), 20)
        checked.append((line, shown_id, student, blob, not row_errors))

    if count == 0:
        raise UserError(f"{where}: no students (the file has a header line but no data rows)")

    # A key shared between students would let each one into the other's nodes: reject every row holding it,
    # including rows that are bad for another reason (so the good row of a pair is not let through alone).
    holders: dict[bytes, list[tuple[int, str]]] = {}
    for line, shown_id, _student, blob, _ok in checked:
        if blob:
            holders.setdefault(blob, []).append((line, shown_id))
    students: list[Student] = []
    for line, _shown_id, student, blob, ok in checked:
        group = holders.get(blob, []) if blob else []
        if len(group) > 1:
            others = ", ".join(f"line {ln} ({sid})" for ln, sid in group if ln != line)
            errors.append(_err(where, line, student.student_id if student else None, "ssh_public_key",
                               f"same key as {others}: each student needs their own key"))
        elif ok and student is not None:
            students.append(student)
    errors.sort(key=lambda e: (e.line, _FIELD_ORDER.get(e.field, 9)))
    return Roster(path=path, students=students, errors=errors, columns=columns, rows=count)


_FIELD_ORDER = {"row": 0, "student_id": 1, "name": 2, "email": 3, "github_username": 4, "ssh_public_key": 5}


def _read_text(path: Path, where: str) -> str:
    # Only a regular file, at most MAX_BYTES (a FIFO or /dev/zero is refused at once, without blocking).
    data = inputs.read_regular_file(path, MAX_BYTES, "roster file", shown=where)
    if data.startswith(b"PK\x03\x04"):
        raise UserError(f"{where}: this is a spreadsheet (.xlsx/.ods), not CSV; export it as 'CSV UTF-8'")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{where}: the file is UTF-16; save it as 'CSV UTF-8'")
    if b"\x00" in data:
        offset = data.index(b"\x00")
        line = data.count(b"\n", 0, offset) + 1
        raise UserError(f"{where}: binary data (NUL byte at offset {offset}, line {line}); "
                        "a roster must be a CSV text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{where}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line}); "
            "save the file as 'CSV UTF-8'"
        ) from None
    if not text.strip():
        raise UserError(f"{where}: the roster is empty (expected a header line such as "
                        "'student_id,name,email,ssh_public_key' and one row per student)")
    return text


def _guess_delimiter(lines: list[str]) -> str:
    """',' unless the header line clearly uses ';' or a tab (spreadsheet exports in some locales)."""
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        counts = {d: line.count(d) for d in (",", ";", "\t")}
        best = max(counts, key=lambda d: counts[d])
        return best if counts[best] > counts[","] else ","
    return ","


def _numbered_rows(reader: Iterator[list[str]], lines: list[str], where: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (first line number, cells) for every row that is not blank or a '#' comment."""
    while True:
        start = reader.line_num + 1  # type: ignore[attr-defined]
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise UserError(f"{where}:{start}: not valid CSV ({exc})") from None
        end = reader.line_num  # type: ignore[attr-defined]
        if end > start and sum(ln.count('"') for ln in lines[start - 1 : end]) % 2:
            # The csv module reads an unclosed quote to the end of the file: every later row would vanish
            # into one value, so this is a file error rather than a bad row.
            raise UserError(f"{where}:{start}: a '\"' opened on this line is never closed "
                            f"(lines {start}-{end} would be read as one value)")
        if not row or all(not c.strip() for c in row):
            continue
        if row[0].lstrip().startswith("#"):
            continue
        yield start, row


def _norm(header: str) -> str:
    return re.sub(r"[\s_-]+", "_", header.strip().lower()).strip("_")


def _plain(text: str, limit: int = 40) -> str:
    """A header cell as shown in a message: control characters removed, cut to `limit`."""
    text = strip_control(text, one_line=True).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _map_columns(
    header: list[str], line: int, where: str, keys_dir: Path | None
) -> tuple[dict[str, str], dict[str, int]]:
    if len(header) > MAX_COLUMNS:
        raise UserError(f"{where}:{line}: {len(header):,} columns; a roster has at most {MAX_COLUMNS}")
    header = [_plain(h, MAX_HEADER_CHARS) for h in header]
    normalised = [_norm(h) for h in header]
    if any(cell.strip().startswith(ACCEPTED_KEY_TYPES) or "@" in cell for cell in header):
        raise UserError(
            f"{where}:{line}: the first line looks like a student, not a header; add a header line such as "
            "'student_id,name,email,ssh_public_key'"
        )
    columns: dict[str, str] = {}
    index: dict[str, int] = {}
    for canonical, aliases in ALIASES.items():
        for alias in aliases:
            positions = [i for i, n in enumerate(normalised) if n == alias]
            if len(positions) > 1:
                cols = " and ".join(str(p + 1) for p in positions)
                raise UserError(f"{where}:{line}: column '{header[positions[0]].strip()}' appears twice "
                                f"(columns {cols}); keep one")
            if positions:
                columns[canonical] = header[positions[0]].strip()
                index[canonical] = positions[0]
                break

    missing = [c for c in ("student_id", "ssh_public_key") if c not in index]
    if "ssh_public_key" in missing and keys_dir is not None:
        missing.remove("ssh_public_key")
    if missing:
        found = ", ".join(h.strip() or "(blank)" for h in header)
        unused = [h.strip() for h, n in zip(header, normalised, strict=True) if n and n not in _ALL_ALIASES]
        parts = []
        for canonical in missing:
            hint = ""
            for h in unused:
                if difflib.get_close_matches(_norm(h), ALIASES[canonical], n=1, cutoff=0.6):
                    hint = f" (did you mean to call column '{h}' '{canonical}'?)"
                    break
            accepted = ", ".join(ALIASES[canonical])
            parts.append(f"no {canonical} column{hint}; accepted names: {accepted}")
        extra = ""
        if "ssh_public_key" in missing:
            extra = "; or pass --keys DIR with one <student_id>.pub file per student"
        raise UserError(f"{where}:{line}: {'; '.join(parts)}{extra} (found columns: {found})")
    return columns, index


_ALL_ALIASES = {a for aliases in ALIASES.values() for a in aliases}


def _cell(row: list[str], i: int | None) -> str:
    if i is None or i >= len(row):
        return ""
    return row[i]


def _err(where: str, line: int, sid: str | None, fld: str, message: str) -> RowError:
    return RowError(line=line, student_id=sid, field=fld, message=message, file=where)


def _show(value: str, limit: int = 40) -> str:
    """A value quoted for an error message: escapes control characters, cut to `limit`."""
    shown = value if len(value) <= limit else value[: limit - 3] + "..."
    return repr(shown)


def _check_row(
    row: list[str], line: int, header: list[str], index: dict[str, int], keys_dir: Path | None, where: str
) -> tuple[list[RowError], Student | None, bytes]:
    errors: list[RowError] = []
    raw_id = _cell(row, index.get("student_id")).strip()
    sid_ok = _check_id(raw_id)
    sid_for_errors = raw_id if sid_ok is None else None

    def err(fld: str, message: str) -> None:
        errors.append(_err(where, line, sid_for_errors, fld, message))

    filled = [c.strip() for c in row if c.strip()]
    if len(filled) == 1 and _KEY_FRAGMENT.match(filled[0]):
        if "PRIVATE" in filled[0]:
            return [_err(where, line, None, "ssh_public_key", PRIVATE_KEY_MESSAGE)], None, b""
        return [_err(where, line, None, "row", "a piece of a key pasted over several lines: a key must be one "
                                               "line, in the ssh_public_key column")], None, b""

    if len(row) != len(header) and not (len(row) > len(header) and all(not c.strip() for c in row[len(header):])):
        hint = ""
        if len(row) > len(header):
            hint = " (a value containing a comma must be in double quotes)"
        elif any("\n" in c or "\r" in c for c in row):
            hint = " (an unclosed '\"' on this line?)"
        err("row", f"{len(row)} fields but the header has {len(header)}{hint}")

    if sid_ok is not None:
        err("student_id", sid_ok)

    name = _clean_display(_cell(row, index.get("name")))
    name_problem = _check_name(_cell(row, index.get("name")))
    if name_problem:
        err("name", name_problem)
        name = ""

    email = _cell(row, index.get("email")).strip()
    if email and (len(email) > 254 or not email.isprintable() or not _EMAIL_OK.match(email)):
        err("email", f"{_show(email)} is not an email address")

    github = _cell(row, index.get("github_username")).strip() or None
    if github is not None and not _GITHUB_OK.match(github):
        err("github_username", f"{_show(github)} is not a GitHub username")
        github = None

    key_text, key_source, key_problem = _key_text(row, index, keys_dir, raw_id if sid_ok is None else None, github)
    key_line, blob = "", b""
    if key_problem:
        err("ssh_public_key", key_problem)
    else:
        key_line, blob, problem = parse_public_key(key_text)
        if problem:
            err("ssh_public_key", f"{key_source}{problem}" if key_source else problem)

    if sid_ok is not None:
        return errors, None, blob
    student = Student(
        student_id=raw_id,
        slug=sanitise(raw_id, SLUG_LEN),
        name=name or raw_id,
        email=email,
        ssh_public_key=key_line,
        github_username=github,
        line=line,
    )
    return errors, student, blob


def _check_id(sid: str) -> str | None:
    """None if `sid` is a usable student id, else why not."""
    if not sid:
        return "empty student id"
    allowed = "allowed: letters, digits, '.', '_' and '-', starting with a letter or digit"
    problems = []
    non_ascii = sorted({c for c in sid if not c.isascii()}, key=sid.index)
    if non_ascii:
        problems.append("non-ASCII " + ", ".join(repr(c) for c in non_ascii[:5]))
    if any(c.isspace() for c in sid):
        problems.append("a space" if " " in sid else "whitespace")
    controls = [c for c in sid if c.isascii() and not c.isprintable()]
    if controls:
        problems.append("control characters")
    meta = sorted({c for c in sid if c in _SHELL_META}, key=sid.index)
    if meta:
        problems.append("shell metacharacter" + ("s " if len(meta) > 1 else " ") + " ".join(meta))
    if problems:
        hint = ""
        if "@" in sid:
            hint = "; it looks like an email address: use a short id such as the part before '@'"
        return f"{_show(sid)} is not safe in resource names: contains {', '.join(problems)} ({allowed}){hint}"
    if not _ID_OK.match(sid):
        return f"{_show(sid)} must start with a letter or digit ({allowed})"
    if len(sid) > MAX_ID_LEN:
        return f"{_show(sid)} is {len(sid)} characters long; at most {MAX_ID_LEN}"
    return None


def _check_name(raw: str) -> str | None:
    text = raw.strip()
    if any(unicodedata.category(c) == "Cc" for c in text):
        kind = "a line break" if ("\n" in text or "\r" in text) else "control characters"
        return f"{_show(text)} contains {kind}"
    if any(c in _BIDI for c in raw):
        return f"{_show(raw.strip())} contains invisible text-direction characters"
    if len(raw.strip()) > MAX_NAME_LEN:
        return f"name is {len(raw.strip())} characters long; at most {MAX_NAME_LEN}"
    return None


def _clean_display(raw: str) -> str:
    """NFC-normalised, whitespace collapsed, format characters (zero-width etc.) removed."""
    text = unicodedata.normalize("NFC", raw)
    text = "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn") or c == " ")
    return " ".join(text.split())


def _key_text(
    row: list[str], index: dict[str, int], keys_dir: Path | None, sid: str | None, github: str | None
) -> tuple[str, str, str | None]:
    """(key text, where it came from for messages, problem) from the key column or keys_dir."""
    text = _cell(row, index.get("ssh_public_key")).strip()
    if text:
        return text, "", None
    if keys_dir is None:
        return "", "", "no SSH public key (add a ssh_public_key column or pass --keys DIR)"
    names = [n for n in dict.fromkeys([sid, github]) if n]
    if not names:
        return "", "", f"empty, and no valid id to look up {keys_dir}/<id>.pub"
    for n in names:
        candidate = keys_dir / f"{n}.pub"
        if candidate.is_file():
            try:
                with candidate.open("rb") as f:
                    data = f.read(MAX_KEY_FILE_BYTES + 1)
            except OSError as exc:
                return "", "", f"cannot read {candidate} ({exc.strerror or exc})"
            if len(data) > MAX_KEY_FILE_BYTES:
                return "", "", f"{candidate} is too large to be a public key"
            try:
                content = data.decode("utf-8-sig")
            except UnicodeDecodeError:
                return "", "", f"{candidate}: not a text file"
            if not content.strip():
                return "", "", f"{candidate} is empty"
            return content.strip(), f"{candidate}: ", None
    looked = " or ".join(str(keys_dir / f"{n}.pub") for n in names)
    empty = "empty, and " if "ssh_public_key" in index else ""
    return "", "", f"{empty}no key file ({looked} not found)"


# ------------------------------------------------------------------------------------------- keys


def parse_public_key(text: str) -> tuple[str, bytes, str | None]:
    """Check one OpenSSH public key. Returns (normalised line, key blob, None) or ("", b"", problem)."""
    text = text.strip()
    fail = ("", b"")
    upper = text.upper()
    if "PRIVATE KEY" in upper or text.startswith("PuTTY-User-Key-File"):
        return (*fail, PRIVATE_KEY_MESSAGE)
    if "BEGIN SSH2 PUBLIC KEY" in upper:
        return (*fail, "an RFC 4716 (PuTTY/SSH2) public key; convert it with 'ssh-keygen -i -f KEY.pub' "
                       f"to the one-line OpenSSH form ({EXPECTED_KEY})")
    if "BEGIN PUBLIC KEY" in upper or "BEGIN RSA PUBLIC KEY" in upper:
        return (*fail, "a PEM public key; convert it with 'ssh-keygen -i -m PKCS8 -f KEY.pem' "
                       f"to the one-line OpenSSH form ({EXPECTED_KEY})")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(lines) > 1:
        if sum(1 for ln in lines if ln.split()[0] in ACCEPTED_KEY_TYPES) > 1:
            return (*fail, f"{len(lines)} keys; give exactly one key per student")
        return (*fail, "the key is split over several lines; it must be one line")
    if not lines:
        return (*fail, f"not an SSH public key ({EXPECTED_KEY})")
    tokens = lines[0].split()
    kind = tokens[0]
    if kind not in ACCEPTED_KEY_TYPES:
        if kind == "ssh-dss":
            return (*fail, "DSA (ssh-dss) keys are not accepted; ask for an ed25519 key (ssh-keygen -t ed25519)")
        if kind.endswith("-cert-v01@openssh.com"):
            return (*fail, "an SSH certificate; give the plain public key (the .pub file, not -cert.pub)")
        if any(t in ACCEPTED_KEY_TYPES for t in tokens[1:]):
            return (*fail, "text before the key type (authorized_keys options are not accepted); "
                           f"{EXPECTED_KEY}")
        if kind.startswith("AAAA"):
            return (*fail, f"the key type is missing before the key data ({EXPECTED_KEY})")
        return (*fail, f"not an SSH public key ({EXPECTED_KEY})")
    if len(tokens) < 2:
        return (*fail, f"'{kind}' but no key data after it (truncated?)")
    try:
        blob = base64.b64decode(tokens[1], validate=True)
    except (binascii.Error, ValueError):
        return (*fail, "the key data is not valid base64 (truncated or changed when copied?)")
    inner = _wire_string(blob, 0)
    if inner is None:
        return (*fail, "the key data is truncated")
    inner_type = inner[0].decode("ascii", "replace")
    if inner_type != kind:
        return (*fail, f"the line says '{kind}' but the key data is {_show(inner_type, 40)} "
                       "(changed when copied?)")
    problem = _check_blob(kind, blob, tokens[1])
    if problem:
        return (*fail, problem)
    comment = " ".join(_COMMENT_UNSAFE.sub("", " ".join(tokens[2:])).split())[:100]
    normal = f"{kind} {base64.b64encode(blob).decode()}" + (f" {comment}" if comment else "")
    return normal, blob, None


def _wire_string(blob: bytes, offset: int) -> tuple[bytes, int] | None:
    """One SSH wire-format string at `offset`: (value, next offset), or None if truncated."""
    if offset + 4 > len(blob):
        return None
    (length,) = struct.unpack_from(">I", blob, offset)
    end = offset + 4 + length
    if end > len(blob):
        return None
    return blob[offset + 4 : end], end


def _check_blob(kind: str, blob: bytes, b64: str) -> str | None:
    bad = "the key data is invalid (truncated or changed when copied?)"
    if kind.startswith("sk-"):
        return _check_sk_blob(kind, blob, bad)
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    try:
        key = load_ssh_public_key(f"{kind} {b64}".encode())
    except (ValueError, UnsupportedAlgorithm):
        return bad
    if kind == "ssh-ed25519":
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return _degenerate_ed25519(key.public_bytes(Encoding.Raw, PublicFormat.Raw))
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return (f"RSA key of {key.key_size} bits is too weak; at least {MIN_RSA_BITS} bits "
                "(better: an ed25519 key, 'ssh-keygen -t ed25519')")
    return None


# Encodings of the ed25519 points of small order (libsodium's list, sign bit cleared): a "public key" that is one
# of them is satisfied by signatures anyone can make, so it is no key at all.
_ED25519_SMALL_ORDER = {bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",  # y = 0 (order 4)
    "0100000000000000000000000000000000000000000000000000000000000000",  # the identity (order 1)
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p - 1 (order 2)
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p, i.e. 0 (order 4)
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p + 1, i.e. 1 (order 1)
)}
# Fewer distinct byte values than this in 32 random bytes has a probability below 1e-30: a made-up key.
_MIN_DISTINCT_BYTES = 8
DEGENERATE_KEY_MESSAGE = ("not a real key ({why}): ask the student for the .pub file of a key made with "
                          "'ssh-keygen -t ed25519'")


def _degenerate_ed25519(raw: bytes) -> str | None:
    """Why the 32-byte ed25519 public key `raw` is degenerate (all zero, one repeated byte, a small-order
    point), or None."""
    if len(raw) != 32:
        return "the key data is invalid (truncated or changed when copied?)"
    point = raw[:31] + bytes([raw[31] & 0x7F])  # the sign bit of x does not change the point's order
    if point in _ED25519_SMALL_ORDER:
        why = "all zero bytes" if not any(point) else "a point of small order, which any signature matches"
        return DEGENERATE_KEY_MESSAGE.format(why=why)
    if len(set(raw)) < _MIN_DISTINCT_BYTES:
        why = "one byte repeated" if len(set(raw)) == 1 else "almost no variety in its bytes"
        return DEGENERATE_KEY_MESSAGE.format(why=why)
    return None


def _check_sk_blob(kind: str, blob: bytes, bad: str) -> str | None:
    """Security-key (FIDO) public keys, checked by hand so any cryptography version works."""
    parts: list[bytes] = []
    offset = 0
    while offset < len(blob):
        got = _wire_string(blob, offset)
        if got is None:
            return bad
        parts.append(got[0])
        offset = got[1]
    if kind == "sk-ssh-ed25519@openssh.com":
        if len(parts) != 3 or len(parts[1]) != 32 or not parts[2]:
            return bad
        return _degenerate_ed25519(parts[1])
    if len(parts) != 4 or parts[1] != b"nistp256" or not parts[3]:
        return bad
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), parts[2])
    except ValueError:
        return bad
    return None


__all__ = [
    "ACCEPTED_KEY_TYPES",
    "ALIASES",
    "MAX_ROWS",
    "PRIVATE_KEY_MESSAGE",
    "Roster",
    "RowError",
    "Student",
    "load_roster",
    "parse_public_key",
    "roster_summary",
]
