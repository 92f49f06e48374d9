"""Class rosters: good files load, bad files fail with one line, bad rows are all reported with line numbers."""

from __future__ import annotations

import base64
import os
import struct
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from labctl import roster as roster_mod
from labctl.errors import UserError
from labctl.roster import PRIVATE_KEY_MESSAGE, RowError, Student, load_roster, parse_public_key, roster_summary

HEADER = "student_id,name,email,ssh_public_key\n"


# ------------------------------------------------------------------------------------------- helpers


def _s(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _line(kind: str, blob: bytes, comment: str = "") -> str:
    return f"{kind} {base64.b64encode(blob).decode()}" + (f" {comment}" if comment else "")


def ed_key(comment: str = "student@laptop") -> str:
    """A distinct ed25519 public key, built from random bytes in the OpenSSH wire format (fast)."""
    return _line("ssh-ed25519", _s(b"ssh-ed25519") + _s(os.urandom(32)), comment)


def _openssh(public_key: object, comment: str = "") -> str:
    text = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{text} {comment}".strip()


@pytest.fixture(scope="module")
def rsa_keys() -> dict[int, str]:
    return {bits: _openssh(rsa.generate_private_key(65537, bits).public_key(), f"rsa{bits}") for bits in (1024, 2048)}


def sk_ed25519_key() -> str:
    kind = b"sk-ssh-ed25519@openssh.com"
    return _line(kind.decode(), _s(kind) + _s(os.urandom(32)) + _s(b"ssh:"), "yubikey")


def sk_ecdsa_key() -> str:
    kind = b"sk-ecdsa-sha2-nistp256@openssh.com"
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return _line(kind.decode(), _s(kind) + _s(b"nistp256") + _s(point) + _s(b"ssh:"))


def write(tmp_path: Path, text: str, name: str = "roster.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def row(sid: str, name: str | None = None, email: str | None = None, key: str | None = None) -> str:
    name = sid.title() if name is None else name
    email = f"{sid}@uni.edu" if email is None else email
    key = ed_key() if key is None else key
    return ",".join(_q(v) for v in (sid, name, email, key)) + "\n"


def _q(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n\r') else value


def errors_by_line(r: roster_mod.Roster) -> dict[int, list[RowError]]:
    out: dict[int, list[RowError]] = {}
    for e in r.errors:
        out.setdefault(e.line, []).append(e)
    return out


def file_error(path: Path, **kwargs: object) -> str:
    with pytest.raises(UserError) as info:
        load_roster(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message
    assert info.value.exit_code == 2
    return message


# ------------------------------------------------------------------------------------------- good rosters


def test_good_roster_loads_every_accepted_key_type(tmp_path: Path, rsa_keys: dict[int, str]) -> None:
    ecdsa = _openssh(ec.generate_private_key(ec.SECP384R1()).public_key(), "ec")
    ed_real = _openssh(ed25519.Ed25519PrivateKey.generate().public_key(), "real")
    keys = [ed_key("alice@laptop"), rsa_keys[2048], ecdsa, sk_ed25519_key(), sk_ecdsa_key(), ed_real]
    ids = ["alice", "Bob.Smith", "c_3", "dave-4", "EVE", "0042"]
    text = HEADER + "".join(row(sid, key=k) for sid, k in zip(ids, keys, strict=True))
    r = load_roster(write(tmp_path, text))

    assert r.errors == []
    assert [s.student_id for s in r.students] == ids
    assert [s.slug for s in r.students] == ["alice", "bob-smith", "c-3", "dave-4", "eve", "0042"]
    assert [s.line for s in r.students] == [2, 3, 4, 5, 6, 7]
    assert r.columns == {"student_id": "student_id", "name": "name", "email": "email",
                         "ssh_public_key": "ssh_public_key"}
    alice = r.students[0]
    assert isinstance(alice, Student)
    assert alice.name == "Alice" and alice.email == "alice@uni.edu" and alice.github_username is None
    assert alice.ssh_public_key == keys[0]
    assert r.students[1].ssh_public_key == rsa_keys[2048]
    assert all(s.ssh_public_key.split()[0] == k.split()[0] for s, k in zip(r.students, keys, strict=True))
    assert r.require_valid(skip_bad_rows=False) == r.students
    assert roster_summary(r) == f"{tmp_path / 'roster.csv'}: 6 students"


def test_key_is_normalised_to_one_line(tmp_path: Path) -> None:
    key = ed_key("")
    kind, data = key.split()
    text = HEADER + f'alice,Alice,,"  {kind}   {data}   Alice\'s $(laptop) ; x\t"\n'
    r = load_roster(write(tmp_path, text))
    assert r.errors == []
    assert r.students[0].ssh_public_key == f"{kind} {data} Alices laptop x"
    assert r.students[0].email == ""


def test_column_aliases_and_optional_columns(tmp_path: Path) -> None:
    text = "Student ID , E-Mail,Full Name,Public-Key,Section\n" + f"a1,a1@x.org,Zoë Ñúñez,{ed_key()},B\n"
    r = load_roster(write(tmp_path, text))
    assert r.errors == []
    assert r.columns == {"student_id": "Student ID", "name": "Full Name", "email": "E-Mail",
                         "ssh_public_key": "Public-Key"}
    assert r.students[0].name == "Zoë Ñúñez"

    # Only an id and a key: the name defaults to the id, the email is empty.
    r = load_roster(write(tmp_path, f"netid,ssh_key\njd42,{ed_key()}\n", "min.csv"))
    assert (r.students[0].student_id, r.students[0].name, r.students[0].email) == ("jd42", "jd42", "")


def test_github_classroom_export_with_keys_dir(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    alice_key, bob_key = ed_key("alice"), ed_key("bob")
    (keys / "alice01.pub").write_text(alice_key + "\n")
    (keys / "bob-gh.pub").write_text(bob_key + "\n")  # found by github_username
    (keys / "carol.pub").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
                                    "-----END OPENSSH PRIVATE KEY-----\n")
    text = (
        "identifier,github_username,github_id,name\n"
        "alice01,alice-gh,1001,Alice A\n"
        "bob,bob-gh,1002,Bob B\n"
        "carol,,1003,Carol C\n"
        "dan,dan-gh,1004,Dan D\n"
    )
    path = write(tmp_path, text, "classroom_roster.csv")
    r = load_roster(path, keys_dir=keys)
    assert r.columns["student_id"] == "identifier" and r.columns["github_username"] == "github_username"
    assert "ssh_public_key" not in r.columns
    assert [(s.student_id, s.github_username, s.ssh_public_key) for s in r.students] == [
        ("alice01", "alice-gh", alice_key),
        ("bob", "bob-gh", bob_key),
    ]
    by_line = errors_by_line(r)
    assert sorted(by_line) == [4, 5]
    assert PRIVATE_KEY_MESSAGE in by_line[4][0].message and "carol.pub" in by_line[4][0].message
    assert "dan.pub or" in by_line[5][0].message and "dan-gh.pub not found" in by_line[5][0].message

    # Without --keys the export has no key at all: one clear file-level error, not 4 identical row errors.
    message = file_error(path)
    assert "no ssh_public_key column" in message and "--keys DIR" in message
    assert "identifier, github_username, github_id, name" in message

    with pytest.raises(UserError, match="keys directory"):
        load_roster(path, keys_dir=tmp_path / "nope")


def test_key_column_with_keys_dir_fallback(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    fallback = ed_key("from-file")
    (keys / "bob.pub").write_text(fallback)
    path = write(tmp_path, HEADER + row("alice") + "bob,Bob,,\ncarol,Carol,,\n")
    r = load_roster(path, keys_dir=keys)
    assert [s.ssh_public_key for s in r.students][1] == fallback
    [err] = r.errors
    assert err.line == 4 and err.message.startswith("empty, and no key file")

    r = load_roster(path)
    assert [e.message for e in r.errors] == ["no SSH public key (add a ssh_public_key column or pass --keys DIR)"] * 2


def test_crlf_bom_comments_and_blank_lines_keep_true_line_numbers(tmp_path: Path) -> None:
    text = (
        "# CS 101, spring term\r\n"
        "\r\n"
        + HEADER.replace("\n", "\r\n")
        + row("alice").replace("\n", "\r\n")
        + "\r\n# bob dropped the course\r\n"
        + row("carol", key="not a key").replace("\n", "\r\n")
        + ",,,\r\n"
        + row("dave").replace("\n", "\r\n")
    )
    path = tmp_path / "roster.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    r = load_roster(path)
    assert r.columns["student_id"] == "student_id"  # the BOM is not part of the first column name
    assert [(s.student_id, s.line) for s in r.students] == [("alice", 4), ("dave", 9)]
    assert not any("\r" in s.ssh_public_key or "\r" in s.email for s in r.students)
    [err] = r.errors
    assert str(err) == (f"{path}:7: ssh_public_key: not an SSH public key "
                        "(expected 'ssh-ed25519 AAAA...' or 'ssh-rsa ...')")
    assert r.rows == 3


def test_semicolon_separated_export(tmp_path: Path) -> None:
    text = "student_id;name;email;ssh_public_key\n" + f"alice;Doe, Alice;alice@x.org;{ed_key()}\n"
    r = load_roster(write(tmp_path, text))
    assert r.errors == [] and r.students[0].name == "Doe, Alice"


# ------------------------------------------------------------------------------------------- bad files


def test_missing_empty_and_unreadable_files(tmp_path: Path) -> None:
    assert "not found" in file_error(tmp_path / "nope.csv")
    assert "is a directory" in file_error(tmp_path)
    assert "empty" in file_error(write(tmp_path, ""))
    assert "empty" in file_error(write(tmp_path, "\n  \n\t\n"))
    assert "no header" in file_error(write(tmp_path, "# just a comment\n\n"))
    assert "no students" in file_error(write(tmp_path, HEADER))
    assert "no students" in file_error(write(tmp_path, HEADER + "\n# nobody yet\n"))
    assert "spreadsheet" in file_error(write(tmp_path, "PK\x03\x04rest of a zip"))
    assert "UTF-16" in file_error(write(tmp_path, HEADER, encoding="utf-16"))
    assert "NUL" in file_error(write(tmp_path, HEADER + "a\x00b\n"))


def test_not_utf8_reports_byte_offset(tmp_path: Path) -> None:
    text = HEADER + row("alice") + row("elodie", name="Élodie")
    path = write(tmp_path, text, encoding="latin-1")
    offset = text.encode("latin-1").index("É".encode("latin-1"))
    message = file_error(path)
    assert f"byte 0xc9 at offset {offset}, line 3" in message and "CSV UTF-8" in message


def test_missing_columns_say_which_and_suggest(tmp_path: Path) -> None:
    message = file_error(write(tmp_path, "studnet_id,name,email,pubkey\nalice,Alice,a@x.org,k\n"))
    assert "no student_id column (did you mean to call column 'studnet_id' 'student_id'?)" in message
    assert "no ssh_public_key column (did you mean to call column 'pubkey' 'ssh_public_key'?)" in message
    assert "found columns: studnet_id, name, email, pubkey" in message

    message = file_error(write(tmp_path, "name,email,ssh_public_key\nAlice,a@x.org,k\n"))
    assert "no student_id column" in message and "did you mean" not in message
    assert "student_id, id, identifier, netid, username, github_username" in message


def test_first_line_must_be_a_header(tmp_path: Path) -> None:
    message = file_error(write(tmp_path, row("alice") + row("bob")))
    assert "looks like a student, not a header" in message


def test_duplicate_column_is_a_file_error(tmp_path: Path) -> None:
    message = file_error(write(tmp_path, "id,email,Email,ssh_key\na,a@x.org,b@x.org,k\n"))
    assert "appears twice (columns 2 and 3)" in message


def test_unclosed_quote_is_a_file_error(tmp_path: Path) -> None:
    text = HEADER + row("alice") + f'bob,"Bob,bob@x.org,{ed_key()}\n' + row("carol") + row("dave")
    message = file_error(write(tmp_path, text))
    assert ":3:" in message and "never closed" in message


def test_too_many_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(roster_mod, "MAX_ROWS", 3)
    message = file_error(write(tmp_path, HEADER + "".join(row(f"s{i}") for i in range(5))))
    assert "more than 3 students (line 5)" in message and "split" in message


# ------------------------------------------------------------------------------------------- bad rows


def test_an_id_that_would_name_what_a_class_shares_is_refused(tmp_path: Path) -> None:
    """What a class shares at a site is deployment `labctl-COURSE-class-SITE-LAB` (`plan.class_shared_plan`): a
    student `class-sim-kvm-tacc` would have had that id, and failed at the cloud (or stopped the class's shared
    group being made). Refused in the roster, before anything is created; `class`, `classic` and `xclass-1` are
    fine."""
    from labctl import naming

    text = HEADER + row("Class_Sim-kvm-tacc") + row("class") + row("classic") + row("xclass-1") + row("class-a")
    r = load_roster(write(tmp_path, text))
    assert [s.student_id for s in r.students] == ["class", "classic", "xclass-1"]
    by_line = errors_by_line(r)
    assert sorted(by_line) == [2, 6]
    assert by_line[2][0].field == "student_id" and by_line[2][0].message == (
        "'Class_Sim-kvm-tacc' becomes resource name 'class-sim-kvm-tacc', and names starting with 'class-' are what "
        "labctl calls what a class shares at a site; give this student another id")
    assert naming.class_shared_owner("sim:kvm@tacc") == "class-sim-kvm-tacc"


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    text = HEADER + row("alice") + row("bob") + row("alice") + row("Bob") + row("a.b") + row("a_b")
    r = load_roster(write(tmp_path, text))
    assert [s.student_id for s in r.students] == ["alice", "bob", "a.b"]
    by_line = errors_by_line(r)
    assert sorted(by_line) == [4, 5, 7]
    assert by_line[4][0].field == "student_id" and "duplicate id 'alice' (first on line 2)" in by_line[4][0].message
    assert "'Bob' and 'bob' (line 3) both become resource name 'bob'" in by_line[5][0].message
    assert "'a_b' and 'a.b' (line 6) both become resource name 'a-b'" in by_line[7][0].message


@pytest.mark.parametrize(
    ("sid", "expected"),
    [
        ("ali;rm -rf", "contains a space, shell metacharacter ;"),
        ("bob$(x)", "shell metacharacters $ ( )"),
        ("élodie", "non-ASCII 'é'"),
        ("a b", "contains a space"),
        ("x`id`", "shell metacharacter `"),
        ("jane@uni.edu", "looks like an email address"),
        ("-rf", "must start with a letter or digit"),
        (".hidden", "must start with a letter or digit"),
        ("a" * 33, "33 characters long; at most 32"),
        ("a\u202eb", "non-ASCII"),
    ],
)
def test_unsafe_ids_are_rejected(tmp_path: Path, sid: str, expected: str) -> None:
    r = load_roster(write(tmp_path, HEADER + row("alice") + row(sid, name="Someone", email="")))
    assert [s.student_id for s in r.students] == ["alice"]
    [err] = r.errors
    assert (err.line, err.field, err.student_id) == (3, "student_id", None)
    assert expected in err.message
    assert "not safe in resource names" in err.message or "must start" in err.message or "long" in err.message


def test_empty_id(tmp_path: Path) -> None:
    r = load_roster(write(tmp_path, HEADER + row("alice") + f"  ,Nobody,,{ed_key()}\n"))
    [err] = r.errors
    assert (err.line, err.field, err.message) == (3, "student_id", "empty student id")


def test_unicode_names_are_fine_but_control_characters_are_not(tmp_path: Path) -> None:
    text = (
        HEADER
        + row("elodie", name="  Élodie   Dupré ")
        + row("wei", name="王伟")
        + row("omar", name="عمر")
        + row("zw", name="Zoë\u200b")
        + row("nl", name="Line\nBreak")
        + row("bell", name="Ring\x07")
        + row("rtl", name="evil\u202egnp.exe")
        + row("anon", name="")
    )
    r = load_roster(write(tmp_path, text))
    assert [(s.student_id, s.name) for s in r.students] == [
        ("elodie", "Élodie Dupré"), ("wei", "王伟"), ("omar", "عمر"), ("zw", "Zoë"), ("anon", "anon"),
    ]
    by_line = errors_by_line(r)
    assert [(ln, errs[0].field) for ln, errs in sorted(by_line.items())] == [(6, "name"), (8, "name"), (9, "name")]
    assert "line break" in by_line[6][0].message
    assert "control characters" in by_line[8][0].message
    assert "text-direction" in by_line[9][0].message
    assert by_line[6][0].student_id == "nl"


def test_bad_emails(tmp_path: Path) -> None:
    text = HEADER + row("a", email="not-an-email") + row("b", email="b@localhost") + row("c", email="c@x.org")
    r = load_roster(write(tmp_path, text))
    assert [s.student_id for s in r.students] == ["c"]
    assert [(e.line, e.field) for e in r.errors] == [(2, "email"), (3, "email")]
    assert "'not-an-email' is not an email address" in r.errors[0].message


def test_bad_keys(tmp_path: Path, rsa_keys: dict[int, str]) -> None:
    good = ed_key()
    kind, data = good.split()[:2]
    rsa_kind, rsa_data = rsa_keys[2048].split()[:2]
    private = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    cases = {
        "truncated": f"{kind} {data[:30]}",
        "badpadding": f"{kind} {data[:-1]}",
        "wrongtype": f"ssh-rsa {data}",
        "ecmismatch": f"ecdsa-sha2-nistp256 {rsa_data}",
        "private": private,
        "rsa1024": rsa_keys[1024],
        "dsa": "ssh-dss AAAAB3NzaC1kc3MAAACBAP== x",
        "notype": data,
        "garbage": "hello world",
        "twokeys": f"{good}\n{ed_key()}",
        "options": f'from="10.0.0.1" {good}',
        "nodata": "ssh-ed25519",
        "cert": f"ssh-ed25519-cert-v01@openssh.com {data}",
        "ssh2": "---- BEGIN SSH2 PUBLIC KEY ----\nAAAAC3Nza\n---- END SSH2 PUBLIC KEY ----",
        "trailing": _line(kind, base64.b64decode(data) + b"junk"),
        "rsaok": f"{rsa_kind} {rsa_data}",
    }
    text = HEADER + "".join(row(sid, key=key) for sid, key in cases.items())
    r = load_roster(write(tmp_path, text))
    assert [s.student_id for s in r.students] == ["rsaok"]
    lines = {s: n for n, s in enumerate(cases, start=2)}
    # The private key is quoted over several lines; later rows keep their own (true) line numbers.
    extra = private.count("\n")
    lines = {s: n + (extra if n > lines["private"] else 0) for s, n in lines.items()}
    lines = {s: n + (1 if n > lines["twokeys"] else 0) for s, n in lines.items()}
    lines = {s: n + (2 if n > lines["ssh2"] else 0) for s, n in lines.items()}
    msgs = {e.student_id: e.message for e in r.errors}
    assert {e.student_id: e.line for e in r.errors} == {s: n for s, n in lines.items() if s != "rsaok"}
    assert all(e.field == "ssh_public_key" for e in r.errors)
    assert "not valid base64" in msgs["truncated"] or "invalid" in msgs["truncated"]
    assert "not valid base64" in msgs["badpadding"]
    assert msgs["wrongtype"] == ("the line says 'ssh-rsa' but the key data is 'ssh-ed25519' "
                                 "(changed when copied?)")
    assert "the key data is 'ssh-rsa'" in msgs["ecmismatch"]
    assert msgs["private"] == PRIVATE_KEY_MESSAGE
    assert "RSA key of 1024 bits is too weak; at least 2048 bits" in msgs["rsa1024"]
    assert "DSA (ssh-dss) keys are not accepted" in msgs["dsa"]
    assert "key type is missing" in msgs["notype"]
    assert msgs["garbage"] == "not an SSH public key (expected 'ssh-ed25519 AAAA...' or 'ssh-rsa ...')"
    assert "2 keys; give exactly one" in msgs["twokeys"]
    assert "text before the key type" in msgs["options"]
    assert "no key data" in msgs["nodata"]
    assert "certificate" in msgs["cert"]
    assert "RFC 4716" in msgs["ssh2"] and "ssh-keygen -i" in msgs["ssh2"]
    assert "invalid" in msgs["trailing"]
    assert not any(private.splitlines()[1] in str(e) for e in r.errors)  # never echo key material


def test_private_key_pasted_unquoted(tmp_path: Path) -> None:
    private = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    first, *rest = private.splitlines()
    text = HEADER + row("alice") + f"bob,Bob,bob@x.org,{first}\n" + "\n".join(rest) + "\n" + row("carol")
    r = load_roster(write(tmp_path, text))
    assert [s.student_id for s in r.students] == ["alice", "carol"]
    by_line = errors_by_line(r)
    assert by_line[3][0].message == PRIVATE_KEY_MESSAGE
    assert all(n in by_line for n in range(4, 4 + len(rest)))
    assert by_line[4 + len(rest) - 1][0].message == PRIVATE_KEY_MESSAGE  # the END line
    assert "pasted over several lines" in by_line[4][0].message


def test_shared_key_rejects_both_students(tmp_path: Path) -> None:
    shared = ed_key("shared")
    other_comment = shared.rsplit(" ", 1)[0] + " other-laptop"  # same key, different comment
    text = HEADER + row("alice", key=shared) + row("bob") + row("carol", key=other_comment) + row("dan")
    r = load_roster(write(tmp_path, text))
    assert [s.student_id for s in r.students] == ["bob", "dan"]
    by_line = errors_by_line(r)
    assert sorted(by_line) == [2, 4]
    assert by_line[2][0].message == "same key as line 4 (carol): each student needs their own key"
    assert by_line[4][0].message == "same key as line 2 (alice): each student needs their own key"


def test_shared_key_with_a_row_bad_for_another_reason(tmp_path: Path) -> None:
    shared = ed_key()
    r = load_roster(write(tmp_path, HEADER + row("alice", key=shared) + row("b b", email="", key=shared)))
    assert r.students == []
    assert [(e.line, e.field) for e in r.errors] == [(2, "ssh_public_key"), (3, "student_id"), (3, "ssh_public_key")]
    assert "line 3 ('b b')" in r.errors[0].message


def test_wrong_number_of_fields(tmp_path: Path) -> None:
    text = HEADER + row("alice") + f"bob,Doe, Bob,bob@x.org,{ed_key()}\n" + f"carol,Carol,c@x.org,{ed_key()},,\n"
    r = load_roster(write(tmp_path, text))
    assert [s.student_id for s in r.students] == ["alice", "carol"]  # trailing empty fields are fine
    err = errors_by_line(r)[3][0]
    assert err.field == "row" and "5 fields but the header has 4" in err.message and "double quotes" in err.message


def test_every_bad_row_is_reported(tmp_path: Path) -> None:
    text = HEADER + row("ok1") + row("bad;1") + row("ok2", key="nope") + row("ok3", email="x") + row("ok4")
    r = load_roster(write(tmp_path, text))
    assert [e.line for e in r.errors] == [3, 4, 5]
    assert roster_summary(r).endswith(": 2 students, 3 bad rows (lines 3, 4, 5)")


# ------------------------------------------------------------------------------------------- require_valid


def test_require_valid_message_and_skip_bad_rows(tmp_path: Path) -> None:
    text = HEADER + row("alice") + row("bob$(x)") + row("carol", key="ssh-rsa AAAA") + row("dave") + row("alice")
    path = write(tmp_path, text)
    r = load_roster(path)
    with pytest.raises(UserError) as info:
        r.require_valid(skip_bad_rows=False)
    first, *rest = str(info.value).split("\n")
    assert first == f"{path}: 3 bad rows (fix them or pass --skip-bad-rows); nothing was created"
    assert rest == [str(e) for e in r.errors]
    assert [line.split(":")[1] for line in rest] == ["3", "4", "6"]
    assert rest[0].startswith(f"{path}:3: student_id: 'bob$(x)' is not safe in resource names")
    assert rest[2] == f"{path}:6: student_id: duplicate id 'alice' (first on line 2)"
    assert info.value.exit_code == 2

    good = r.require_valid(skip_bad_rows=True)
    assert [s.student_id for s in good] == ["alice", "dave"]


def test_require_valid_counts_rows_not_errors(tmp_path: Path) -> None:
    r = load_roster(write(tmp_path, HEADER + row("a b", email="nope", key="nope") + row("ok")))
    assert len(r.errors) == 3
    with pytest.raises(UserError, match=r"^\S+: 1 bad row \(fix them"):
        r.require_valid(skip_bad_rows=False)


def test_skip_bad_rows_with_nothing_left(tmp_path: Path) -> None:
    r = load_roster(write(tmp_path, HEADER + row("a b") + row("c;d")))
    with pytest.raises(UserError, match="no valid students"):
        r.require_valid(skip_bad_rows=True)


# ------------------------------------------------------------------------------------------- scale


def test_ten_thousand_rows_load_quickly(tmp_path: Path) -> None:
    lines = [HEADER]
    lines += [f"s{i:05d},Student {i},s{i}@uni.edu,{ed_key(f's{i}')}\n" for i in range(10_000)]
    lines.insert(5000, "s00042,Dup,dup@uni.edu," + ed_key() + "\n")  # one duplicate in the middle
    path = write(tmp_path, "".join(lines))
    start = time.perf_counter()
    r = load_roster(path)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"10,000 rows took {elapsed:.2f} s"
    assert len(r.students) == 10_000
    [err] = r.errors
    assert err.line == 5001 and "first on line 44" in err.message


def test_parse_public_key_directly() -> None:
    key = ed_key("me")
    line, blob, problem = parse_public_key(key)
    assert (line, problem) == (key, None) and blob == base64.b64decode(key.split()[1])
    assert parse_public_key("ssh-ed25519 !!!")[2] is not None
