"""Issue 13 end to end on the emulated clouds: the real `labctl` in a subprocess, its output read as a user reads
it (piped, or on a pseudo-terminal), and every command it prints run as printed."""

from __future__ import annotations

import json
import os
import pty
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from tests.cli.helpers import write_roster
from tests.e2e.helpers import LABCTL, REPO, run

pytestmark = pytest.mark.slow

IP = r"127\.1[0-3]\.\d+\.\d+"
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"


def printed_command(line: str) -> list[str]:
    """`labctl ssh h2   (node-1 is at ...)` -> the argv of the command part, with this interpreter's labctl."""
    words = shlex.split(re.split(r"\s{2,}", line.strip())[0])
    assert words[0] == "labctl", line
    return [*LABCTL, *words[1:]]


def test_up_piped_prints_whole_values_one_working_ssh_hint_and_down_missing_ok(labctl_env):
    env = {**labctl_env, "COLUMNS": "80"}  # off a terminal labctl must not cut to it
    up = run(env, "up", "hello", "--site", "sim", "--name", "h2")
    assert re.search(rf"│ h2 +│ sim:kvm@tacc +│ up +│ node-1 +│ m1\.small +│ {IP} +│ .+ │ {ISO} +│", up.stdout)
    assert "connection refused" not in up.stderr and "ssh: ready (1/1 node(s))" in up.stderr
    # Printed once, with the deployment's name; it works as printed (`labctl ssh` serves the emulated sshd).
    assert_printed_ssh_works(env, up.stdout, "h2")
    status = run(env, "status")
    assert re.search(rf"│ h2 .*│ {IP} .*│ {ISO} +│", status.stdout)
    run(env, "down", "h2")
    gone = run(env, "down", "h2", check=False)
    assert gone.returncode == 2 and gone.stderr.startswith("error: ") and len(gone.stderr.splitlines()) == 1
    again = run(env, "down", "h2", "--missing-ok")
    assert again.stdout.strip() == "nothing named 'h2' to delete"


def assert_printed_ssh_works(env: dict[str, str], stdout: str, name: str) -> None:
    """The one SSH hint `up` printed, run as printed (a shell fed from stdin), reaches the node."""
    (hint,) = [line for line in stdout.splitlines() if "labctl ssh" in line]
    assert hint.startswith(f"ssh: labctl ssh {name}")
    shell = subprocess.run(printed_command(hint.removeprefix("ssh: ")), env=env, cwd=REPO, text=True,
                           input="cat hello.txt; exit\n", capture_output=True, timeout=120)
    assert shell.returncode == 0 and "hello from" in shell.stdout, shell.stderr


def test_the_printed_ssh_command_works_on_sim_gcp(labctl_env):
    up = run(labctl_env, "up", "hello", "--site", "sim-gcp")
    assert_printed_ssh_works(labctl_env, up.stdout, "hello")
    run(labctl_env, "down", "hello")


def _read_all(fd: int, proc: subprocess.Popen) -> str:
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the other side closed
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(120)
    return b"".join(chunks).decode(errors="replace")


def test_up_on_a_terminal_ends_on_a_final_frame(labctl_env):
    """The live table on a pseudo-terminal: its last frame has nothing "creating" or "waiting"."""
    env = {**labctl_env, "COLUMNS": "160", "LINES": "60", "TERM": "xterm"}
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([*LABCTL, "up", "hello", "--site", "sim"], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=secondary)
    os.close(secondary)
    screen = _read_all(primary, proc)
    os.close(primary)
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert proc.returncode == 0, screen
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    frame = text[text.rindex("labctl ("):]
    for stage in ("creating", "waiting", "checking", "ssh-wait"):
        assert not re.search(rf"│ [^│]+│ {stage}", frame), frame
    assert re.search(r"│ ssh +│ ready +│ 1/1 node\(s\)", frame), frame
    assert re.search(r"│ keypair +│ created", frame) and re.search(r"│ node-1 +│ setup", frame), frame
    assert out.count("labctl ssh hello") == 1
    run(labctl_env, "down", "hello")


def test_class_up_piped_says_what_next_and_every_printed_command_works(labctl_env, tmp_path):
    roster, keys = write_roster(tmp_path, ("alice", "bob"))
    up = run(labctl_env, "class", "up", "hello", "--roster", str(roster), "--site", "sim", "--course", "ml-sys")
    lines = up.stdout.splitlines()
    assert lines[0] == "ml-sys/hello: 2 up at sim:kvm@tacc"
    assert lines[1] == "next:"
    steps = [line for line in lines[2:] if line.startswith("  labctl ")]
    assert [shlex.split(s)[:3] for s in steps] == [["labctl", "class", "status"], ["labctl", "class", "report"]]
    for step in steps:  # each runs as printed
        proc = subprocess.run(printed_command(step), env=labctl_env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert "alice" in (tmp_path / "hello.csv").read_text()
    # The overview: the class by course and lab.
    overview = json.loads(run(labctl_env, "status", "--json").stdout)
    assert overview["classes"][0] | {"first_lease_end": None} == {
        "course": "ml-sys", "lab": "hello", "environments": 2, "by_state": {"up": 2},
        "by_site": {"sim:kvm@tacc": 2}, "first_lease_end": None,
        "shared": ["labctl-ml-sys-class-sim-kvm-tacc-hello"]}  # the class's security group, not an environment
    shown = run(labctl_env, "status").stdout
    assert "shared by ml-sys/hello: labctl-ml-sys-class-sim-kvm-tacc-hello" in shown
    assert "(2 students)" in run(labctl_env, "class", "status", "hello").stdout  # the only course

    # The report's ssh commands: on sim, the report says what to run first; after it, they work as printed.
    report = run(labctl_env, "class", "report", "hello", "--json")
    assert "run 'labctl testbed start' before the report's ssh commands" in report.stderr
    rows = {r["student_id"]: r for r in json.loads(report.stdout)}
    run(labctl_env, "testbed", "start")
    try:
        assert "testbed start" not in run(labctl_env, "class", "report", "hello").stderr
        argv = shlex.split(rows["alice"]["ssh"])
        assert argv[0] == "ssh"
        # The student's own environment: their key, their known_hosts (ssh reads ~ from the password database,
        # not $HOME, so these are given as options); the printed command is otherwise run as printed.
        mine = ["-i", str(keys["alice"]), "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=accept-new", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"]
        proc = subprocess.run([argv[0], *mine, *argv[1:], "cat", "hello.txt"], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and "hello from" in proc.stdout, proc.stderr
    finally:
        run(labctl_env, "testbed", "stop")
    run(labctl_env, "class", "down", "hello", "--yes")


def test_the_moto_daemon_stays_while_a_sim_aws_lab_is_up_and_goes_after_down(labctl_env):
    from labctl.testbed.aws import pid_alive

    env = {**labctl_env, "LABCTL_MOTO_IDLE_SECONDS": "2"}
    moto_dir = Path(labctl_env["LABCTL_TESTBED_DIR"]) / "aws"
    up = run(env, "up", "hello", "--site", "sim-aws")
    assert_printed_ssh_works(env, up.stdout, "hello")
    pid = json.loads((moto_dir / "moto.json").read_text())["pid"]
    log = moto_dir / "moto.log"
    deadline = time.monotonic() + 60
    while "staying: it holds" not in log.read_text():  # idle, but the lab's instance is there
        assert time.monotonic() < deadline and pid_alive(pid), log.read_text()
        time.sleep(0.1)
    run(env, "down", "hello")
    deadline = time.monotonic() + 60
    while pid_alive(pid):
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    assert "nothing held: exiting" in log.read_text()


def test_the_forget_host_key_advice_names_the_deployment_and_runs_as_printed(labctl_env):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from labctl.state import StateStore

    run(labctl_env, "up", "hello", "--site", "sim", "--name", "h3")
    other = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    with StateStore(Path(labctl_env["LABCTL_STATE_DIR"]) / "state.db") as store:
        host, port, _ = store.host_key_record("labctl-student1-h3", "node-1")
        store.pin_host_key("labctl-student1-h3", "node-1", host, port, other)  # as if the node had been rebuilt
    refused = run(labctl_env, "up", "hello", "--site", "sim", "--name", "h3", check=False)
    assert refused.returncode == 1 and "has changed since labctl first connected" in refused.stderr
    advice = re.search(r"run '(labctl ssh [^']+)'", refused.stderr)
    assert advice and advice.group(1) == "labctl ssh h3 node-1 --forget-host-key"
    forget = subprocess.run(printed_command(advice.group(1)), env=labctl_env, cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert forget.returncode == 0 and forget.stdout.startswith("h3/node-1: forgot the pinned host key")
    run(labctl_env, "up", "hello", "--site", "sim", "--name", "h3")  # pins the key the node presents
    run(labctl_env, "down", "h3")
