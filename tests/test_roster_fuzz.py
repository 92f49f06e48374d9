"""Property tests: any roster file -- random bytes, random CSV rows and columns, any encoding -- gives a parsed
`Roster` or one `UserError`, never another exception; what it gives back is clean (ids safe, names without
control characters). Key parsing never raises. Counts follow the Hypothesis profile (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import csv
import io
import re
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from labctl.errors import UserError  # noqa: E402
from labctl.keys import ensure_keypair  # noqa: E402
from labctl.roster import ALIASES, Roster, load_roster, parse_public_key  # noqa: E402

_N = settings.default.max_examples
FUZZ = settings(max_examples=3 * _N, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f]")

_KEYS_DIR = Path(tempfile.mkdtemp(prefix="labctl-roster-fuzz-keys-"))
GOOD_KEYS = [ensure_keypair(_KEYS_DIR / str(i)).public_key for i in range(3)]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="labctl-roster-fuzz-") as tmp:
        yield Path(tmp)


def _check(path: Path, keys_dir: Path | None = None) -> None:
    try:
        roster = load_roster(path, keys_dir)
    except UserError as exc:
        event("file error")
        message = str(exc)
        assert message.strip() and "\n" not in message, repr(message)
        assert not _UNSAFE.search(message), repr(message)
        return
    assert isinstance(roster, Roster)
    event(f"{len(roster.students) > 0} students, {len(roster.errors) > 0} errors")
    for student in roster.students:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", student.student_id)
        assert re.fullmatch(r"[a-z0-9-]+", student.slug) and len(student.slug) <= 24
        assert not any(unicodedata.category(c) in ("Cc", "Cf") for c in student.name), repr(student.name)
        assert parse_public_key(student.ssh_public_key)[2] is None
    for err in roster.errors:
        assert str(err).startswith(f"{path}:{err.line}: ")
    with contextlib.suppress(UserError):  # bad rows: one UserError listing them
        roster.require_valid()


@FUZZ
@given(data=st.binary(max_size=2000))
def test_random_bytes(workdir: Path, data: bytes) -> None:
    path = workdir / "roster.csv"
    path.write_bytes(data)
    _check(path)


HEADERS = sorted({a for aliases in ALIASES.values() for a in aliases} | {"Student ID", "E-Mail", "SSH Key", "x", ""})
cells = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["alice", "bob", "a@b.edu", "=cmd|' /C calc'!A0", "@SUM(1)", "+1", "-1", "", " ", '"', "'",
                     "a,b", "a\nb", "\x1b[31mred", "\u202eevil", "ssh-ed25519", "ssh-rsa AAAA", "#comment",
                     "-----BEGIN OPENSSH PRIVATE KEY-----", "AAAAC3NzaC1lZDI1NTE5AAAAI" + "A" * 43]),
    st.sampled_from(GOOD_KEYS),
    st.sampled_from(GOOD_KEYS).map(lambda k: k + " comment\x07\x1b"),
)


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    header = draw(st.lists(st.sampled_from(HEADERS) | st.text(max_size=15), min_size=1, max_size=6))
    if draw(st.booleans()):
        header = ["student_id", "name", "email", "ssh_public_key"] + header[: draw(st.integers(0, 2))]
    good_row = st.builds(lambda sid, name, key: [sid, name, f"{sid}@x.edu", key],
                         st.from_regex(r"[a-z][a-z0-9._-]{0,10}", fullmatch=True), st.text(max_size=20),
                         st.sampled_from(GOOD_KEYS))
    rows = draw(st.lists(good_row | st.lists(cells, min_size=0, max_size=len(header) + 2), max_size=12))
    delimiter = draw(st.sampled_from([",", ",", ",", ";", "\t", "|"]))
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator=draw(st.sampled_from(["\n", "\r\n", "\r"])))
    for row in [header, *rows]:
        writer.writerow(row)
    text = out.getvalue()
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]))
    data = text.encode(encoding, errors="replace")
    if draw(st.integers(0, 3)) == 0:  # a little damage: cut or insert a byte
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=3)) + data[at + draw(st.integers(0, 3)):]
    return data


@FUZZ
@given(data=csv_files())
def test_random_csv_rows_columns_and_encodings(workdir: Path, data: bytes) -> None:
    path = workdir / "roster.csv"
    path.write_bytes(data)
    _check(path)


@settings(FUZZ, max_examples=max(10, _N))
@given(data=csv_files(), files=st.dictionaries(st.sampled_from(["alice", "bob", "x", "a@b.edu"]),
                                               st.binary(max_size=200) | st.sampled_from(GOOD_KEYS).map(str.encode),
                                               max_size=3))
def test_keys_from_a_directory(workdir: Path, data: bytes, files: dict[str, bytes]) -> None:
    keys = workdir / "keys"
    keys.mkdir(exist_ok=True)
    for old in keys.iterdir():
        old.unlink()
    for name, content in files.items():
        (keys / f"{name}.pub").write_bytes(content)
    path = workdir / "roster.csv"
    path.write_bytes(data)
    _check(path, keys)


@FUZZ
@given(text=st.one_of(
    st.text(max_size=300),
    st.builds(lambda kind, b64, rest: f"{kind} {b64}{rest}",
              st.sampled_from(["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "sk-ssh-ed25519@openssh.com",
                               "sk-ecdsa-sha2-nistp256@openssh.com", "ecdsa-sha2-nistp521"]),
              st.binary(max_size=600).map(lambda b: __import__("base64").b64encode(b).decode()),
              st.text(max_size=20)),
))
def test_parse_public_key_never_raises(text: str) -> None:
    line, blob, problem = parse_public_key(text)
    assert (problem is None) == bool(line)
    if problem is None:
        assert "\n" not in line and not _UNSAFE.search(line) and blob
