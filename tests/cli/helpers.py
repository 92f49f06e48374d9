"""Running the real CLI entry point (`labctl.cli.main`) in this process, as a user would see it off a terminal."""

from __future__ import annotations

import io
import os
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

from labctl.state import DeploymentRecord, StateStore


def cli(*args: str) -> tuple[int, str, str]:
    """`labctl ARGS` with stdout/stderr captured (not terminals, as when piped): (exit code, stdout, stderr)."""
    from labctl.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = os.environ.get("LABCTL_STATE_URL")
    code = 0
    try:
        with mock.patch.object(sys, "argv", ["labctl", *args]), redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        if saved is None:
            os.environ.pop("LABCTL_STATE_URL", None)
        else:
            os.environ["LABCTL_STATE_URL"] = saved
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, err: str) -> str:
    """Exit 2, exactly one `error: ...` line, no traceback: returns the line."""
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def words(help_text: str) -> str:
    """Help text as one line of words: Rich's panel borders and line wrapping removed."""
    return " ".join(re.sub(r"[│╭╮╰╯─┃━]", " ", help_text).split())


def seed(store: StateStore, dep_id: str, name: str, lab: str, *, owner: str = "student1", course: str | None = None,
         site: str = "sim:kvm@tacc", status: str = "up", lease_end: str | None = None,
         floating_ip: str | None = None, student: str | None = None) -> DeploymentRecord:
    """A deployment in the state (nothing at any cloud), with one node and optionally its floating IP."""
    data: dict = {"nodes": [["node-1", "node"]]}
    if lease_end:
        data["lease_end"] = lease_end
    if student:
        data["student"] = {"id": student, "name": student.title(), "email": f"{student}@example.edu"}
    dep = DeploymentRecord(dep_id, name, lab, owner, course, site, status, None, data)
    store.save_deployment(dep)
    if floating_ip:
        store.record_resource(dep_id, "floating_ip:node-1", "created", "fip-1", {"floating_ip": floating_ip},
                              kind="floating_ip", name=f"{dep_id}-node-1-fip")
    return dep


def write_roster(tmp_path: Path, students: tuple[str, ...]) -> tuple[Path, dict[str, Path]]:
    """roster.csv in `tmp_path` with a fresh ed25519 key per student: (its path, {student: private key path})."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    keys, lines = {}, ["student_id,name,email,ssh_public_key"]
    for sid in students:
        key = ed25519.Ed25519PrivateKey.generate()
        path = tmp_path / f"{sid}.key"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        keys[sid] = path
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        lines.append(f"{sid},{sid.title()} Doe,{sid}@example.edu,{public.decode()}")
    roster = tmp_path / "roster.csv"
    roster.write_text("\n".join(lines) + "\n")
    return roster, keys
