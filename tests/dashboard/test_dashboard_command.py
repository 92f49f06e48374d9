"""`labctl class dashboard` as a user runs it: a real process that prints its URL, serves the class from the state
until Ctrl-C, and refuses bad input with one line and exit 2."""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.dashboard.conftest import COURSE, LAB, add_student

LABCTL = [sys.executable, "-m", "labctl"]


def _line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The next line the process prints, waiting at most `timeout` seconds for it."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), "the dashboard printed nothing"
    return proc.stdout.readline()


def test_serves_the_class_until_ctrl_c(labctl_env: dict[str, str]) -> None:
    from labctl.state import StateStore

    with StateStore(Path(labctl_env["LABCTL_STATE_DIR"]) / "state.db") as store:
        add_student(store, "alice", "sim", "up")
        add_student(store, "bob", "sim", "failed", error="NoCapacity: no free host")
    env = {**labctl_env, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*LABCTL, "class", "dashboard", LAB], env=env, text=True,  # the only course: found
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = _line(proc)
        assert first.startswith(f"Dashboard of {COURSE}/{LAB}: http://127.0.0.1:"), first
        url = first.split(": ", 1)[1].strip()
        with urllib.request.urlopen(url + "api/status", timeout=30) as response:
            data = json.load(response)
        assert [(s["id"], s["state"]) for s in data["students"]] == [("alice", "up"), ("bob", "failed")]
        base = url.rsplit("/", 2)[0] + "/"
        try:
            urllib.request.urlopen(base + "api/status", timeout=30)
            raise AssertionError("served without the token")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Dashboard stopped." in out and "Traceback" not in err


def test_bad_port_and_unknown_class_are_one_line_errors(labctl_env: dict[str, str]) -> None:
    bad = subprocess.run([*LABCTL, "class", "dashboard", LAB, "--course", COURSE, "--port", "70000"],
                         env=labctl_env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["error: --port must be 0 (any free port) or 1..65535, not 70000"]
    none = subprocess.run([*LABCTL, "class", "dashboard", LAB], env=labctl_env, capture_output=True, text=True,
                          timeout=120)
    assert none.returncode == 2 and "Traceback" not in none.stderr
    assert len(none.stderr.strip().splitlines()) == 1 and "no class has environments of lab 'hello'" in none.stderr
