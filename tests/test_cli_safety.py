"""Careless and hostile use of the CLI (issue 9): empty and ambiguous selectors, bounded numbers, names that
would collide, report files, output hygiene, the state URL, forgetting a host key, quoted mount paths.

Each case runs the real CLI entry point (`labctl.cli.main`) in this process: argv patched, stdout/stderr
captured, exit code from SystemExit. None of them reaches a cloud: every refusal happens before.
"""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from labctl.state import DeploymentRecord, StateStore


# -- helpers -------------------------------------------------------------------------------------------
def cli(*args: str) -> tuple[int, str, str]:
    """Run `labctl ARGS` in this process: (exit code, stdout, stderr)."""
    from labctl.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = os.environ.get("LABCTL_STATE_URL")
    code: int = 0
    try:
        with mock.patch.object(sys, "argv", ["labctl", *args]), redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:  # --state sets it for the store the command opens; it must not leak into the next call
        if saved is None:
            os.environ.pop("LABCTL_STATE_URL", None)
        else:
            os.environ["LABCTL_STATE_URL"] = saved
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, *, expect: str | None = None) -> str:
    """Exit 2, exactly one line on stderr, `error: ...`, no traceback; returns that line."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if expect is not None:
        assert expect in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def home(labctl_env, monkeypatch, tmp_path):
    monkeypatch.delenv("LABCTL_STATE_URL", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path


def seed(store: StateStore, dep_id: str, name: str, lab: str, owner: str = "student1", course: str | None = None,
         student: dict | None = None, site: str = "sim", nodes: list | None = None) -> DeploymentRecord:
    data = {"nodes": nodes or [["node-1", "node"]]}
    if student:
        data["student"] = student
    dep = DeploymentRecord(dep_id, name, lab, owner, course, site, "up", None, data)
    store.save_deployment(dep)
    return dep


def ids(store: StateStore) -> list[str]:
    return sorted(d.id for d in store.deployments())


@pytest.fixture
def store(home):
    with StateStore() as s:
        yield s


@pytest.fixture
def klass(store):
    """Two students' environments of course c, lab hello (nothing at any cloud: refusals never get there)."""
    for sid in ("alice", "bob"):
        seed(store, f"labctl-c-{sid}-hello", "hello", "hello", owner=sid, course="c",
             student={"id": sid, "name": sid.title(), "email": f"{sid}@example.edu"})
    return store


# -- 1. empty and ambiguous selectors ------------------------------------------------------------------
@pytest.mark.parametrize("student", ["", " ", "\t"])
def test_class_down_refuses_an_empty_student(klass, student):
    code, _, err = cli("class", "down", "hello", "--course", "c", "--student", student, "--yes")
    assert_one_line_error(code, err, expect="--student is empty")
    assert ids(klass) == ["labctl-c-alice-hello", "labctl-c-bob-hello"]


@pytest.mark.parametrize("args", [("", "--course", "c"), ("hello", "--course", " ")])
def test_class_down_refuses_an_empty_lab_or_course(klass, args):
    code, _, err = cli("class", "down", *args, "--yes")
    assert_one_line_error(code, err, expect="is empty")
    assert len(ids(klass)) == 2


def test_class_commands_without_course_take_the_only_course(klass):
    """No silent default course: without --course, the only course that has the lab is meant (and said)."""
    code, _, err = cli("class", "down", "hello")
    assert_one_line_error(code, err, expect="would delete 2 environment(s) of c/hello")
    assert len(ids(klass)) == 2


@pytest.mark.parametrize("command", [("down", "--yes"), ("extend", "--hours", "1"),
                                     ("retry", "--roster", "r.csv", "--site", "sim")])
def test_class_commands_without_course_refuse_when_several_courses_have_the_lab(klass, command):
    seed(klass, "labctl-d-carol-hello", "hello", "hello", owner="carol", course="d",
         student={"id": "carol", "name": "Carol", "email": "carol@example.edu"})
    code, _, err = cli("class", command[0], "hello", *command[1:])
    line = assert_one_line_error(code, err, expect="lab 'hello' is in 2 courses: c (2 environments), d (1 environment)")
    assert "--course" in line
    assert len(ids(klass)) == 3


@pytest.mark.parametrize("command", ["down", "extend"])
def test_class_commands_without_course_refuse_a_lab_no_class_has(klass, command):
    code, _, err = cli("class", command, "mltrain", *(["--yes"] if command == "down" else []))
    assert_one_line_error(code, err, expect="no class has environments of lab 'mltrain'")
    assert len(ids(klass)) == 2


def test_class_down_of_a_whole_class_off_a_terminal_needs_yes(klass):
    code, _, err = cli("class", "down", "hello", "--course", "c")
    line = assert_one_line_error(code, err, expect="would delete 2 environment(s) of c/hello")
    assert "--yes" in line
    assert len(ids(klass)) == 2


def test_class_down_prompt_on_a_terminal(klass, monkeypatch):
    """The confirmation itself: terminal on stdin and stderr, the answer 'no' deletes nothing."""
    import typer

    from labctl import cli as cli_mod

    asked = []

    class TTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(typer, "confirm", lambda text, **kw: asked.append(text) or False)
    err = TTY()
    monkeypatch.setattr(sys, "stdin", TTY())
    with mock.patch.object(sys, "argv", ["labctl", "class", "down", "hello", "--course", "c"]), \
            redirect_stderr(err), pytest.raises(SystemExit) as exc:
        cli_mod.main()
    assert exc.value.code == 2
    assert asked == ["Delete 2 environment(s) of c/hello?"]
    assert err.getvalue().strip() == "error: nothing deleted"
    assert len(ids(klass)) == 2


@pytest.mark.parametrize("name", ["", "  "])
def test_down_refuses_an_empty_name(store, name):
    seed(store, "labctl-student1-hello", "hello", "hello")
    code, _, err = cli("down", name)
    assert_one_line_error(code, err, expect="empty deployment name selects nothing")
    code, _, err = cli("down", name, "--delete-volumes")
    assert_one_line_error(code, err, expect="empty deployment name selects nothing")
    assert ids(store) == ["labctl-student1-hello"]


def test_a_lab_name_matching_two_deployments_is_ambiguous(store):
    seed(store, "labctl-student1-a", "a", "hello")
    seed(store, "labctl-student1-b", "b", "hello")
    for args in (("down", "hello"), ("down", "hello", "--delete-volumes"), ("extend", "hello"),
                 ("status", "hello")):
        code, _, err = cli(*args)
        line = assert_one_line_error(code, err, expect="'hello' matches 2 deployments")
        assert "a (id labctl-student1-a" in line and "b (id labctl-student1-b" in line
    assert ids(store) == ["labctl-student1-a", "labctl-student1-b"]


def test_an_exact_name_or_id_wins_over_a_lab_match(store, monkeypatch):
    from labctl import service

    seed(store, "labctl-student1-hello", "hello", "hello")
    seed(store, "labctl-student1-h2", "h2", "hello")
    ctx = service.Context(store, "student1")
    assert service.resolve_deployment(ctx, "hello").id == "labctl-student1-hello"
    assert service.resolve_deployment(ctx, "labctl-student1-h2").name == "h2"
    assert service.resolve_deployment(ctx, "h2").name == "h2"


# -- 2. the per-deployment lock (in-process; the two-process case is in tests/e2e/test_cli_safety_sim.py) --
def test_down_and_extend_of_a_busy_deployment_refuse_naming_the_holder(store, monkeypatch):
    from labctl import service

    monkeypatch.setattr(service, "LOCK_WAIT", 0.3)
    seed(store, "labctl-student1-hello", "hello", "hello")
    with StateStore() as other, other.lock("env:labctl-student1-hello") as held:
        assert held
        for args in (("down", "hello"), ("extend", "hello", "--hours", "1")):
            code, _, err = cli(*args)
            line = assert_one_line_error(code, err, expect="hello is busy: labctl ")
            assert f"pid {os.getpid()}" in line
    assert ids(store) == ["labctl-student1-hello"]
    assert store.get_deployment("labctl-student1-hello").status == "up"


def test_up_of_a_busy_deployment_creates_nothing(home, store, monkeypatch):
    from labctl import service

    monkeypatch.setattr(service, "LOCK_WAIT", 0.3)
    with StateStore() as other, other.lock("env:labctl-student1-hello") as held:
        assert held
        code, _, err = cli("up", "hello", "--site", "sim")
    assert_one_line_error(code, err, expect="hello is busy")
    assert ids(store) == []
    assert not (home / "testbed").exists()  # the emulated cloud was never even started


# -- 3. numbers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hours", ["-5", "0", "nan", "inf", "-inf", "1e6", "1e308", "1e400", "168.001", "abc"])
def test_extend_hours_out_of_bounds(store, hours):
    seed(store, "labctl-student1-hello", "hello", "hello")
    for cmd in (("extend", "hello"), ("class", "extend", "hello", "--course", "c")):
        code, _, err = cli(*cmd, f"--hours={hours}")
        assert_one_line_error(code, err, expect="--hours")
    assert store.events("labctl-student1-hello") == []


def test_extend_hours_help_names_the_maximum():
    code, out, _ = cli("extend", "--help")
    assert code == 0 and "168" in out and "7-day" in out


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "86401", "x"])
def test_up_ssh_timeout_out_of_bounds_creates_nothing(home, store, value):
    code, _, err = cli("up", "hello", "--site", "sim", f"--ssh-timeout={value}")
    assert_one_line_error(code, err, expect="--ssh-timeout")
    assert ids(store) == [] and not (home / "testbed").exists()


@pytest.mark.parametrize("args,option", [
    (("--rate=-1",), "--rate"), (("--rate=0",), "--rate"), (("--rate=nan",), "--rate"),
    (("--rate=1001",), "--rate"), (("--concurrency=0",), "--concurrency"),
    (("--concurrency=257",), "--concurrency"), (("--concurrency=-3",), "--concurrency"),
])
def test_class_up_rate_and_concurrency_bounds(home, store, args, option, tmp_path):
    roster = tmp_path / "roster.csv"
    roster.write_text("student_id,name,email,ssh_public_key\n")
    code, _, err = cli("class", "up", "hello", "--roster", str(roster), "--site", "sim", *args)
    assert_one_line_error(code, err, expect=option)
    assert ids(store) == [] and not (home / "testbed").exists()


@pytest.mark.parametrize("args", [("class", "down", "hello", "--concurrency=0", "--yes"),
                                  ("class", "retry", "hello", "--roster", "r.csv", "--site", "sim",
                                   "--concurrency=1000")])
def test_concurrency_bounds_elsewhere(klass, args):
    code, _, err = cli(*args)
    assert_one_line_error(code, err, expect="--concurrency")
    assert len(ids(klass)) == 2


# -- 4. names that would collide -------------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [
    ("--name", "a/b"), ("--name", "a.b"), ("--name", "A"), ("--name", "-a"), ("--name", "a" * 25),
    ("--name", ""), ("--owner", "Bob"), ("--owner", "bob smith"), ("--owner", ""),
])
def test_up_refuses_non_canonical_names(home, store, option, value):
    code, _, err = cli("up", "hello", "--site", "sim", f"{option}={value}")
    line = assert_one_line_error(code, err, expect=option)
    assert "lowercase" in line
    assert ids(store) == [] and not (home / "testbed").exists()


def test_plan_refuses_a_non_canonical_name(home):
    code, _, err = cli("plan", "hello", "--site", "kvm@tacc", "--name=a.b")
    assert_one_line_error(code, err, expect="--name 'a.b' is not allowed")


@pytest.mark.parametrize("course", ["ML.Sys", "a/b", "x" * 17, ""])
def test_class_up_refuses_a_non_canonical_course(home, store, course, tmp_path):
    roster = tmp_path / "roster.csv"
    roster.write_text("student_id,name,email,ssh_public_key\n")
    code, _, err = cli("class", "up", "hello", "--roster", str(roster), "--site", "sim", f"--course={course}")
    assert_one_line_error(code, err, expect="--course")
    assert ids(store) == []


def test_require_canonical_is_injective():
    from labctl.errors import UserError
    from labctl.naming import require_canonical, sanitise

    assert require_canonical("a-b", "--name") == "a-b"
    for bad in ("a/b", "a.b", "a_b", "A-B", "a-", "a\nb"):
        with pytest.raises(UserError, match=r"--name '.*' is not allowed"):
            require_canonical(bad, "--name")
        assert sanitise(bad) == "a-b" or sanitise(bad) == "a"


def test_an_id_already_used_by_another_owner_is_not_adopted(home, store):
    """Owner 'a-b' with name 'c' and owner 'a' with name 'b-c' meet in labctl-a-b-c: refused, not adopted."""
    seed(store, "labctl-a-b-c", "b-c", "hello", owner="a")
    code, _, err = cli("up", "hello", "--site", "sim", "--owner", "a-b", "--name", "c")
    line = assert_one_line_error(code, err, expect="already belongs to 'b-c' of a")
    assert "--name" in line
    assert ids(store) == ["labctl-a-b-c"]


# -- 5. the class report file ----------------------------------------------------------------------------
def test_report_to_a_missing_directory_is_one_line(klass):
    code, _, err = cli("class", "report", "hello", "--course", "c", "-o", "/nonexistent/x.csv")
    assert_one_line_error(code, err, expect="cannot write the report to /nonexistent/x.csv")


def test_report_file_is_private_and_formula_free(klass, tmp_path):
    seed(klass, "labctl-c-mallory-hello", "hello", "hello", owner="mallory", course="c",
         student={"id": "mallory", "name": '=HYPERLINK("http://evil.example","x")', "email": "+1@x\x1b[2J"})
    from labctl.cli.render import REPORT_FIELDS

    out = tmp_path / "report.csv"
    out.write_text(",".join(REPORT_FIELDS) + "\n")  # an earlier report, made readable by all since
    out.chmod(0o644)
    code, _, err = cli("class", "report", "hello", "--course", "c", "-o", str(out))
    assert code == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    text = out.read_text()
    assert "'=HYPERLINK" in text and "'+1@x" in text and "\x1b" not in text
    assert not any(line.startswith(("=", "+", "@")) or ",=" in line or ",+" in line for line in text.splitlines())
    code, stdout, _ = cli("class", "report", "hello", "--course", "c")
    assert code == 0 and "'=HYPERLINK" in stdout and "\x1b" not in stdout


# -- 6. output hygiene -----------------------------------------------------------------------------------
HOSTILE = "\x1b]8;;http://evil.example\x07click\x1b]8;;\x07 \x1b[2J\rover [bold red]markup[/] \x9b31m"


def test_status_output_has_no_control_characters_or_markup(store):
    seed(store, "labctl-student1-hello", "hello", "hello")
    store.set_deployment_status("labctl-student1-hello", "up", outputs={"jupyter": HOSTILE},
                                lease_end=HOSTILE)
    store.mark_step("labctl-student1-hello", "node-1", 0, HOSTILE, "failed")
    code, out, err = cli("status", "hello")
    assert code == 0, err
    assert not any(c in out for c in "\x1b\x07\r\x9b")
    assert "[bold red]markup[/]" in out  # shown as typed, not interpreted by Rich


def test_fail_masks_secrets_and_strips_control_characters(capsys):
    from labctl import redact
    from labctl.cli import _fail

    redact.register_secret("hunter2-very-secret")
    try:
        with pytest.raises(SystemExit) as exc:
            _fail("cloud said: hunter2-very-secret \x1b[31mred\x07\r\nlog tail \x1b]0;title\x07 hunter2-very-secret", 1)
    finally:
        redact._reset_for_tests()
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "hunter2" not in err and "\x1b" not in err and "\x07" not in err and "\r" not in err
    assert err.splitlines()[0] == "error: cloud said: *** [31mred"


def test_json_output_masks_secrets(capsys):
    from labctl import redact
    from labctl.cli import _print_json

    redact.register_secret("tok-0123456789")
    try:
        _print_json({"outputs": {"url": "http://x/?token=tok-0123456789", "esc": "\x1b[2J"}})
    finally:
        redact._reset_for_tests()
    out = capsys.readouterr().out
    assert "tok-0123456789" not in out and "***" in out and "\x1b" not in out


def test_live_progress_lines_are_clean(capsys):
    from labctl.cli.render import LiveProgress

    live = LiveProgress(quiet=False)
    try:
        live("node-1\x1b[2J", "setup failed", HOSTILE)
    finally:
        live.stop()
    err = capsys.readouterr().err
    assert "node-1" in err and not any(c in err for c in "\x1b\x07\r\x9b")


# -- 7. the state database URL ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["host=db.example password=Hunter2xyz dbname=labs",
                                   "dbname = labs password = Hunter2xyz", "alice:Hunter2xyz@db.example/labs",
                                   "state password=Hunter2xyz.db"])
def test_state_that_is_neither_a_path_nor_a_url_is_refused(home, value, monkeypatch):
    monkeypatch.chdir(home)
    before = set(os.listdir(home))
    for args in (("--state", value, "status"), ("status",)):
        if args == ("status",):
            monkeypatch.setenv("LABCTL_STATE_URL", value)
        code, _, err = cli(*args)
        line = assert_one_line_error(code, err, expect="state database")
        assert "Hunter2xyz" not in line
    assert set(os.listdir(home)) == before


@pytest.mark.parametrize("value,expect", [("/nonexistent-dir/state.db", "does not exist"),
                                          ("/", "is a directory"), ("bad\x01name.db", "control characters")])
def test_state_path_problems(home, value, expect):
    code, _, err = cli("--state", value, "status")
    assert_one_line_error(code, err, expect=expect)


def test_state_that_is_not_a_database_is_refused_untouched(home):
    other = home / "notes.txt"
    other.write_text("my notes\n")
    other.chmod(0o644)
    code, _, err = cli("--state", str(other), "status")
    assert_one_line_error(code, err, expect="is not a labctl state database")
    assert other.read_text() == "my notes\n" and stat.S_IMODE(other.stat().st_mode) == 0o644


def _sqlite_of(path: Path, ddl: list[str]) -> tuple[bytes, int]:
    import sqlite3

    conn = sqlite3.connect(path)
    for statement in ddl:
        conn.execute(statement)
    conn.commit()
    conn.close()
    path.chmod(0o644)
    return path.read_bytes(), 0o644


@pytest.mark.parametrize("ddl,named", [
    (["CREATE TABLE experiments (id INTEGER)", "CREATE TABLE runs (id INTEGER)"], "experiments, runs"),
    (["CREATE TABLE events (at REAL, what TEXT)", "CREATE TABLE notes (x)"], "events, notes"),  # labctl's name too
    (["CREATE TABLE meta (a, b)"], "meta"),  # labctl's table name, another application's columns
])
def test_another_applications_sqlite_database_is_refused_byte_for_byte_untouched(home, ddl, named):
    """`--state mlflow.db` (MLflow's SQLite backend, in a course on ML operations): labctl added its tables to it,
    switched it to WAL and made it 0600. Now: one line, and not a byte or mode bit changed."""
    other = home / "mlflow.db"
    before = _sqlite_of(other, ddl)
    code, _, err = cli("--state", str(other), "status")
    line = assert_one_line_error(code, err, expect="is not a labctl state database")
    assert f"another application's tables ({named})" in line
    assert (other.read_bytes(), stat.S_IMODE(other.stat().st_mode)) == before
    assert sorted(p.name for p in home.iterdir() if p.name.startswith("mlflow.db")) == ["mlflow.db"]  # no -wal


def test_labctls_own_state_with_a_table_someone_added_still_opens(home):
    import sqlite3

    mine = home / "mine.db"
    StateStore(mine).close()
    conn = sqlite3.connect(mine)
    conn.execute("CREATE TABLE my_notes (x)")
    conn.commit()
    conn.close()
    code, _, err = cli("--state", str(mine), "status")
    assert code == 0, err


def test_a_state_path_in_an_existing_directory_works(home, monkeypatch):
    monkeypatch.chdir(home)
    code, out, err = cli("--state", "mine.db", "status")
    assert code == 0, err
    assert (home / "mine.db").is_file() and stat.S_IMODE((home / "mine.db").stat().st_mode) == 0o600


def test_postgres_password_is_never_printed(home):
    from labctl import redact

    url = "postgresql://alice:Pg-Secret-987@127.0.0.1:9/labs"  # port 9: nothing listens, refused at once
    try:
        code, out, err = cli("--state", url, "status")
        assert_one_line_error(code, err, expect="postgresql://alice@127.0.0.1:9/labs")
        assert "Pg-Secret-987" not in out + err
        assert redact.mask("x Pg-Secret-987 y") == "x *** y"
    finally:
        redact._reset_for_tests()


# -- 8. forgetting a pinned host key -----------------------------------------------------------------------
def test_ssh_forget_host_key(store):
    from labctl.keys import fingerprint

    seed(store, "labctl-student1-hello", "hello", "hello", nodes=[["node-1", "node"], ["node-2", "node"]])
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGvbp8jzBd3FpgLK7mY1m6bXq2dVuE3fGv9v1bq1rj5S"
    store.pin_host_key("labctl-student1-hello", "node-1", "127.0.0.5", 22, key)
    store.pin_host_key("labctl-student1-hello", "node-2", "127.0.0.6", 22, key)
    code, out, err = cli("ssh", "hello", "node-1", "--forget-host-key")
    assert code == 0, err
    assert out.splitlines() == [f"hello/node-1: forgot the pinned host key {fingerprint(key)} of 127.0.0.5:22",
                                "'labctl up hello --site sim' pins the key the node presents now"]
    assert store.get_host_key("labctl-student1-hello", "node-1") is None
    assert store.get_host_key("labctl-student1-hello", "node-2") == key
    code, out, _ = cli("ssh", "hello", "node-1", "--forget-host-key")
    assert code == 0 and "nothing to forget" in out
    code, out, _ = cli("ssh", "hello", "--forget-host-key")  # every node
    assert code == 0 and "hello/node-2: forgot" in out
    assert store.get_host_key("labctl-student1-hello", "node-2") is None
    code, _, err = cli("ssh", "hello", "node-9", "--forget-host-key")
    assert_one_line_error(code, err, expect="hello has no node 'node-9'")


def test_host_key_changed_message_names_the_real_command():
    from labctl.runner.ssh import HostKeyChanged

    assert "'labctl ssh LAB node-1 --forget-host-key'" in str(HostKeyChanged("node-1", "127.0.0.5", 22))


# -- 9. mount paths in the generated volume script -----------------------------------------------------------
def volume_script(mount: str, device: Path) -> str:
    from labctl.node_setup import volume_steps

    res = SimpleNamespace(key="volume_attachment:block", spec={"mount": mount, "filesystem": "ext4",
                                                               "node": "node-1", "volume": "volume:block"})
    the_plan = SimpleNamespace(by_kind=lambda kind: [res] if kind == "volume_attachment" else [])
    found = {res.key: SimpleNamespace(attrs={"volume_id": "vol-1;touch x", "device_paths": [str(device)]})}
    (step,) = volume_steps(the_plan, found)
    return step.command


STUBS = r"""
sudo() {
  printf '%s\0' "$@" >> "$LOG"; printf '\001' >> "$LOG"
  case "$1" in
    tee) cat >> "$FSTAB" ;;
    blkid) if [ "${2:-}" = -s ]; then echo 1234-abcd; fi ;;
  esac
  return 0
}
mountpoint() { return 1; }
id() { echo 1000; }
"""


def run_volume_script(mount: str, tmp: Path) -> tuple[list[list[str]], str]:
    """Run the generated script with sudo, mountpoint and id stubbed: what sudo was asked to run, fstab text."""
    device = tmp / "dev-vdb"
    device.write_text("")
    log, fstab = tmp / "sudo.log", tmp / "fstab"
    for p in (log, fstab):
        p.write_bytes(b"")
    script = STUBS + volume_script(mount, device)
    proc = subprocess.run(["bash", "-c", script], env={"PATH": os.environ["PATH"], "LOG": str(log),
                                                       "FSTAB": str(fstab)},
                          cwd=tmp, capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    calls = [c.split(b"\0")[:-1] for c in log.read_bytes().split(b"\x01")[:-1]]
    return [[a.decode() for a in c] for c in calls], fstab.read_bytes().decode()


def check_volume_script(mount: str, tmp: Path) -> None:
    from labctl.node_setup import fstab_escape

    marker = tmp / "pwned"
    calls, fstab = run_volume_script(mount, tmp)
    dev = str(tmp / "dev-vdb")
    assert calls == [
        ["blkid", dev], ["mkdir", "-p", "--", mount], ["mount", "--", dev, mount],
        ["blkid", "-s", "UUID", "-o", "value", dev], ["tee", "-a", "/etc/fstab"],
        ["chown", "1000:1000", "--", mount],
    ]
    assert fstab == f"UUID=1234-abcd {fstab_escape(mount)} ext4 defaults,nofail 0 2\n"
    assert len(re.split(r"[ \t]+", fstab.rstrip("\n"))) == 6  # getmntent(3) splits on blanks and tabs only
    assert not marker.exists()


@pytest.mark.parametrize("mount", [
    "/mnt/block", "/mnt/a;touch${IFS}pwned", "/mnt/$(touch pwned)", "/mnt/`touch pwned`",
    "/mnt/with space", "/mnt/tab\there", "/mnt/new\nline", "/mnt/'quote\"", "/mnt/back\\slash", "-rf",
])
def test_volume_script_quotes_the_mount_path(mount, tmp_path):
    check_volume_script(mount, tmp_path)


def test_volume_script_parses_with_bash_n(tmp_path):
    script = volume_script("/mnt/a;touch${IFS}/tmp/x", tmp_path / "dev")
    assert subprocess.run(["bash", "-n", "-c", script], capture_output=True).returncode == 0
    # Every line that names the path holds it inside one single-quoted word (shlex: a single token).
    import shlex

    for line in script.splitlines():
        if "touch" in line and "volume vol-1" not in line:
            words = shlex.split(line)
            assert any(w in ("/mnt/a;touch${IFS}/tmp/x", " /mnt/a;touch${IFS}/tmp/x ext4 defaults,nofail 0 2")
                       or w.endswith(" /mnt/a;touch${IFS}/tmp/x ext4 defaults,nofail 0 2") for w in words), line
