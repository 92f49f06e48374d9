"""The SSH runner against emulated nodes on loopback: system ssh, pinning, setup steps, waiting."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labctl.errors import SetupFailed
from labctl.keys import ensure_keypair
from labctl.runner import (
    HostKeyChanged,
    NodeTarget,
    SetupStep,
    SSHBlocked,
    Upload,
    known_hosts_file,
    run_setup,
    ssh_argv,
    wait_for_ssh,
)


def _ssh(lab, target: NodeTarget, command: str, key_path: Path | None = None) -> subprocess.CompletedProcess:
    kh = known_hosts_file(lab.targets, lab.store, lab.tmp / "known_hosts")
    argv = ssh_argv(target, key_path or lab.key.private_path, kh, command=[command])
    argv[1:1] = ["-F", "/dev/null", "-o", "BatchMode=yes"]  # ignore the machine's ~/.ssh/config
    return subprocess.run(argv, capture_output=True, text=True, timeout=20)


def _wait(lab, **kw) -> list[tuple[str, str, str]]:
    stages: list[tuple[str, str, str]] = []
    wait_for_ssh(lab.targets, lab.key.private_path, lab.store, timeout=kw.pop("timeout", 10),
                 on_stage=lambda *a: stages.append(a), **kw)
    return stages


def test_import_does_not_load_asyncssh():
    code = "import sys, labctl.runner, labctl.keys; assert 'asyncssh' not in sys.modules, 'asyncssh imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ssh_argv_and_known_hosts_format(tmp_path, mem_store):
    store = mem_store()
    store.keys = {"a": "ssh-ed25519 AAAAkeyA", "b": "ssh-ed25519 AAAAkeyB"}
    targets = [NodeTarget("a", "10.0.0.1", 22, "cc"), NodeTarget("b", "127.10.1.11", 2222, "cc")]
    path = known_hosts_file(targets, store, tmp_path / "kh")
    assert path.read_text() == "10.0.0.1 ssh-ed25519 AAAAkeyA\n[127.10.1.11]:2222 ssh-ed25519 AAAAkeyB\n"
    assert path.stat().st_mode & 0o777 == 0o600
    argv = ssh_argv(targets[1], Path("/k"), path, forwards=[(8888, 8888), (18888, 8000)])
    assert argv[0] == "ssh" and argv[-1] == "cc@127.10.1.11"
    for opt in ("StrictHostKeyChecking=yes", "IdentitiesOnly=yes", f"UserKnownHostsFile={path}"):
        assert opt in argv
    assert argv[1:3] == ["-i", "/k"] and argv[3:5] == ["-p", "2222"]
    assert "127.0.0.1:8888:localhost:8888" in argv and "127.0.0.1:18888:localhost:8000" in argv
    with pytest.raises(SetupFailed, match="no pinned SSH host key for c"):
        known_hosts_file([NodeTarget("c", "h", 22, "cc")], store, tmp_path / "kh2")


def test_system_ssh_runs_command_with_pinned_key(lab):
    stages = _wait(lab)
    assert {(n, s) for n, s, _ in stages} >= {("n1", "ssh-ready"), ("n2", "ssh-ready"),
                                              ("n1", "host-key-pinned"), ("n2", "host-key-pinned")}
    pinned = lab.store.keys["n1"]
    host_pub = (lab.node_dir("n1") / "ssh_host_ed25519_key").stat()
    assert pinned.startswith("ssh-ed25519 ") and host_pub.st_mode & 0o777 == 0o600
    r = _ssh(lab, lab.targets[0], 'echo "hi from $LABCTL_NODE as $USER in $PWD"; echo oops >&2; exit 3')
    assert r.returncode == 3, r.stderr
    assert r.stdout == f"hi from n1 as cc in {lab.node_dir('n1') / 'home'}\n"
    assert "oops" in r.stderr


def test_unauthorised_key_refused_until_added_to_authorized_keys(lab):
    _wait(lab)
    other = ensure_keypair(lab.tmp / "other-keys")
    r = _ssh(lab, lab.targets[0], "echo in", key_path=other.private_path)
    assert r.returncode == 255 and "Permission denied" in r.stderr
    add = f"mkdir -p ~/.ssh && echo '{other.public_key}' >> ~/.ssh/authorized_keys"
    assert _ssh(lab, lab.targets[0], add).returncode == 0
    r = _ssh(lab, lab.targets[0], "echo in", key_path=other.private_path)
    assert (r.returncode, r.stdout) == (0, "in\n"), r.stderr
    # the other node did not get the key
    assert _ssh(lab, lab.targets[1], "echo in", key_path=other.private_path).returncode == 255


def test_changed_host_key_is_refused(lab):
    _wait(lab)
    lab.stop()
    lab.start()  # same host key file: still trusted
    _wait(lab)
    lab.stop()
    (lab.node_dir("n1") / "ssh_host_ed25519_key").unlink()
    lab.start()
    with pytest.raises(HostKeyChanged, match="has changed.*man-in-the-middle.*rebuilt") as info:
        _wait(lab)
    assert info.value.node == "n1"
    r = _ssh(lab, lab.targets[0], "echo should-not-run")
    assert r.returncode == 255 and "should-not-run" not in r.stdout
    assert "IDENTIFICATION HAS CHANGED" in r.stderr or "verification failed" in r.stderr
    # run_setup refuses too, after recording the failure
    step = SetupStep(0, "s", ["n1"], "echo hi", [], 10)
    with pytest.raises(HostKeyChanged):
        run_setup(lab.targets, [step], lab.key.private_path, lab.store, lab.store, lab.tmp / "logs")
    assert lab.store.status[("n1", 0)][0] == "failed"


def test_sftp_upload_lands_in_home(lab, tmp_path):
    # A lab's shared scripts are symlinks into labs/_common/: the node must get the file, not the link.
    (tmp_path / "_common").mkdir()
    real = tmp_path / "_common" / "app.sh"
    real.write_text("#!/bin/sh\necho app-ran\n")
    real.chmod(0o755)
    src = tmp_path / "app.sh"
    src.symlink_to("_common/app.sh")
    steps = [SetupStep(0, "upload", ["n1"], "./sub/dir/app.sh && cat /tmp/labctl-nothing 2>/dev/null; true",
                       [Upload(src, "sub/dir/app.sh")], 20)]
    results = run_setup(lab.targets, steps, lab.key.private_path, lab.store, lab.store, tmp_path / "logs")
    assert results["n1"].ok, results["n1"].log_tail
    landed = lab.node_dir("n1") / "home" / "sub" / "dir" / "app.sh"
    assert not landed.is_symlink() and landed.read_text() == real.read_text()
    assert "app-ran" in results["n1"].log_path.read_text()
    assert results["n2"].ok and results["n2"].failed_step is None


def test_a_slow_state_store_for_one_node_does_not_hold_up_another(lab, tmp_path):
    """Every node's SSH shares one event loop: the state store's calls (a database, maybe across the network) run
    off it, so while one node's write waits the other nodes' steps go on."""
    _wait(lab)

    class SlowForN1(type(lab.store)):
        def mark_step(self, node: str, index: int, name: str, status: str, detail: str = "") -> None:
            if node == "n1" and status == "running":
                time.sleep(1.0)
            super().mark_step(node, index, name, status, detail)

    store = SlowForN1()
    store.keys = dict(lab.store.keys)
    seen: list[tuple[float, str, str]] = []
    steps = [SetupStep(0, "s", ["n1", "n2"], "true", [], 20)]
    results = run_setup(lab.targets, steps, lab.key.private_path, store, store, tmp_path / "logs",
                        on_event=lambda node, step, status: seen.append((time.monotonic(), node, status)))
    assert results["n1"].ok and results["n2"].ok
    n1_running = next(t for t, node, status in seen if (node, status) == ("n1", "running"))
    n2_done = next(t for t, node, status in seen if (node, status) == ("n2", "done"))
    assert n2_done < n1_running


def test_run_setup_order_logs_failure_and_resume(lab, tmp_path):
    both = ["n1", "n2"]
    fail_once = (
        'if [ "$LABCTL_NODE" = n2 ] && [ ! -e ~/failed-once ]; then\n'
        "  touch ~/failed-once\n  echo boom >&2\n  exit 7\n"
        "fi\n"
        "date +%s.%N > step2.start\n"
        "echo two >> order.txt\n"
    )
    steps = [
        SetupStep(0, "one", both, '[ "$LABCTL_NODE" = n1 ] && sleep 0.4\necho one >> order.txt\n'
                                  "date +%s.%N > step1.end", [], 20),
        SetupStep(1, "two", both, fail_once, [], 20),
        SetupStep(2, "three", both, "for w in th ree; do printf %s $w; done >> order.txt\necho >> order.txt",
                  [], 20),
    ]
    events: list[tuple[str, str, str]] = []
    logs = tmp_path / "logs"
    res = run_setup(lab.targets, steps, lab.key.private_path, lab.store, lab.store, logs,
                    on_event=lambda *e: events.append(e))
    home = {n: lab.node_dir(n) / "home" for n in both}
    assert res["n1"].ok and not res["n2"].ok
    assert res["n2"].failed_step == "two"
    assert "boom" in res["n2"].log_tail and "exit status 7" in res["n2"].log_tail
    assert (home["n1"] / "order.txt").read_text() == "one\ntwo\nthree\n"
    assert (home["n2"] / "order.txt").read_text() == "one\n"
    # step two started on n2 only after step one finished on the slower n1
    n1_end = float((home["n1"] / "step1.end").read_text())
    assert float((home["n1"] / "step2.start").read_text()) >= n1_end
    assert ("n2", "three", "running") not in events
    assert events.index(("n1", "one", "done")) < events.index(("n2", "two", "running"))
    log1 = res["n1"].log_path.read_text()
    assert res["n1"].log_path == logs / "n1.log"
    assert log1.index("'one'") < log1.index("'two'") < log1.index("'three'")
    assert lab.store.status[("n2", 1)] == ("failed", "exit status 7")

    events.clear()
    reads: list[str] = []
    read_done = lab.store.steps_done
    lab.store.steps_done = lambda node: reads.append(node) or read_done(node)  # type: ignore[method-assign]
    res = run_setup(lab.targets, steps, lab.key.private_path, lab.store, lab.store, logs,
                    on_event=lambda *e: events.append(e))
    assert res["n1"].ok and res["n2"].ok
    assert sorted(reads) == ["n1", "n2"]  # what an earlier run finished: read once per node, not before each step
    assert (home["n2"] / "order.txt").read_text() == "one\ntwo\nthree\n"
    assert (home["n1"] / "order.txt").read_text() == "one\ntwo\nthree\n"  # not rerun on n1
    assert {e for e in events if e[0] == "n1"} == {("n1", s, "already-done") for s in ("one", "two", "three")}
    assert [e for e in events if e[0] == "n2"] == [
        ("n2", "one", "already-done"), ("n2", "two", "running"), ("n2", "two", "done"),
        ("n2", "three", "running"), ("n2", "three", "done"),
    ]


def test_step_timeout_and_skip_reason(lab, tmp_path):
    steps = [
        SetupStep(0, "apt", ["n1", "n2"], "touch should-not-exist", [], 10, skip_reason="changes the host"),
        SetupStep(1, "slow", ["n1"], "echo started; sleep 30; echo never", [], 1.0),
        SetupStep(2, "after", ["n1", "n2"], "echo after > after.txt", [], 10),
    ]
    events = []
    t0 = time.monotonic()
    res = run_setup(lab.targets, steps, lab.key.private_path, lab.store, lab.store, tmp_path / "logs",
                    on_event=lambda *e: events.append(e))
    assert time.monotonic() - t0 < 6
    assert not res["n1"].ok and res["n1"].failed_step == "slow"
    assert "timed out after 1s" in res["n1"].log_tail and "started" in res["n1"].log_tail
    assert "never" not in res["n1"].log_path.read_text()
    assert res["n2"].ok and (lab.node_dir("n2") / "home" / "after.txt").exists()
    assert not (lab.node_dir("n1") / "home" / "after.txt").exists()
    assert ("n1", "apt", "skipped") in events and ("n2", "apt", "skipped") in events
    assert lab.store.status[("n1", 0)] == ("skipped", "changes the host")
    assert "skipped: changes the host" in res["n2"].log_path.read_text()
    assert not (lab.node_dir("n1") / "home" / "should-not-exist").exists()


def test_secrets_are_redacted_from_logs(lab, tmp_path):
    steps = [SetupStep(0, "token", ["n1"], "echo token=s3cr3t-value; printf 'no newline s3cr3t-value'",
                       [], 10)]
    res = run_setup(lab.targets, steps, lab.key.private_path, lab.store, lab.store, tmp_path / "logs",
                    redact=["s3cr3t-value"])
    text = res["n1"].log_path.read_text()
    assert res["n1"].ok and "s3cr3t" not in text and "token=********" in text


def test_wait_for_ssh_reports_blocked_port_quickly(tmp_path, mem_store, port_for):
    """A listener that accepts TCP but never speaks SSH looks like a middlebox dropping SSH."""
    key = ensure_keypair(tmp_path / "keys")
    address = "127.10.9.31"
    port = port_for(address)
    black_hole = socket.socket()
    black_hole.bind((address, port))
    black_hole.listen(64)  # never accepts: the kernel completes handshakes, nobody answers
    refused = NodeTarget("booting", "127.10.9.32", port_for("127.10.9.32"), "cc")  # nothing listens
    store = mem_store()
    store.keys["n1"] = key.public_key  # pinned earlier (a rerun): no key exchange happens now either
    try:
        t0 = time.monotonic()
        with pytest.raises(SSHBlocked, match=f"port {port} on {address} .*seems blocked.*VPN"):
            wait_for_ssh([NodeTarget("n1", address, port, "cc"), refused], key.private_path, store,
                         timeout=60, connect_timeout=0.3)
        assert time.monotonic() - t0 < 5
    finally:
        black_hole.close()


def test_wait_for_ssh_refused_until_timeout(tmp_path, mem_store, port_for):
    key = ensure_keypair(tmp_path / "keys")
    target = NodeTarget("n1", "127.10.9.33", port_for("127.10.9.33"), "cc")
    stages = []
    t0 = time.monotonic()
    with pytest.raises(SetupFailed, match="did not come up within 1s.*n1.*connection refused") as info:
        wait_for_ssh([target], key.private_path, mem_store(), timeout=1, connect_timeout=0.3,
                     on_stage=lambda *a: stages.append(a))
    assert not isinstance(info.value, SSHBlocked)
    assert time.monotonic() - t0 < 3
    assert ("n1", "ssh-wait", "connection refused (the node is probably still booting)") in stages


def test_wait_for_ssh_waits_for_a_node_that_comes_up_late(lab):
    lab.stop()
    # nothing listens: refused; then the nodes come up while we wait
    import threading

    threading.Timer(0.5, lab.start).start()
    stages = _wait(lab, connect_timeout=0.5)
    assert ("n1", "ssh-ready") in {(n, s) for n, s, _ in stages}
    assert any(s == "ssh-wait" and "refused" in d for _, s, d in stages)


def test_first_contact_pins_the_key_the_node_shows_in_the_same_handshake(lab):
    """Trust on first use: the host key of the handshake that authenticates is pinned (one key exchange, not a
    separate look first); a node that refuses labctl's key still gets its key pinned and says so."""
    from labctl.testbed.sshd import load_host_key

    # n2 does not know labctl's key yet: SSH answers, authentication fails, its key is pinned all the same
    lab.world.targets[1]["authorized_keys"] = []
    stages: list[tuple[str, str, str]] = []
    with pytest.raises(SetupFailed, match="refuses labctl's key"):
        wait_for_ssh(lab.targets, lab.key.private_path, lab.store, timeout=3, on_stage=lambda *a: stages.append(a))
    for name in ("n1", "n2"):
        shown = " ".join(load_host_key(lab.node_dir(name)).export_public_key().decode().split()[:2])
        assert lab.store.get_host_key(name) == shown
    assert [s for s in stages if s[1] == "host-key-pinned"] and {s[0] for s in stages if s[1] == "host-key-pinned"} \
        == {"n1", "n2"}
    assert ("n1", "ssh-ready", f"cc@{lab.targets[0].where()}") in stages


class CountingRelay:
    """A TCP relay in front of one node that counts the connections it accepts (an observer outside SSH)."""

    def __init__(self, address: str, upstream: tuple[str, int], port_for) -> None:
        import threading

        self.upstream, self.accepted = upstream, 0
        self.listener = socket.create_server((address, port_for(address)))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            server = socket.create_connection(self.upstream)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


def test_setup_after_waiting_reuses_the_connection_the_wait_opened(lab, tmp_path, port_for):
    """`wait_first`: the wait's authenticated connection carries the steps too, one handshake per node; without
    it, the wait and the steps connect once each."""
    from labctl.runner import WaitFirst

    steps = [SetupStep(0, "one", ["n1", "n2"], "echo one", [], 20), SetupStep(1, "two", ["n1", "n2"], "echo two",
                                                                           [], 20)]
    relays = [CountingRelay(t.host, (t.host, t.port), port_for) for t in lab.targets]
    targets = [NodeTarget(t.name, t.host, r.port, t.user) for t, r in zip(lab.targets, relays, strict=True)]
    try:
        stages: list[tuple[str, str, str]] = []
        results = run_setup(targets, steps, lab.key.private_path, lab.store, lab.store, tmp_path / "logs",
                            wait_first=WaitFirst(10, lambda *a: stages.append(a)))
        assert all(r.ok for r in results.values()), [r.log_tail for r in results.values()]
        assert [r.accepted for r in relays] == [1, 1]
        assert {n for n, s, _ in stages if s == "ssh-ready"} == {"n1", "n2"}
        assert "two" in results["n2"].log_path.read_text()

        wait_for_ssh(targets, lab.key.private_path, lab.store, timeout=10)
        steps = [SetupStep(2, "three", ["n1", "n2"], "echo three", [], 20)]
        results = run_setup(targets, steps, lab.key.private_path, lab.store, lab.store, tmp_path / "logs")
        assert all(r.ok for r in results.values())
        assert [r.accepted for r in relays] == [3, 3]
    finally:
        for relay in relays:
            relay.close()


def test_setup_after_waiting_raises_what_the_wait_raises_and_runs_no_step(lab, tmp_path):
    from labctl.runner import WaitFirst

    lab.world.targets[1]["authorized_keys"] = []
    steps = [SetupStep(0, "one", ["n1", "n2"], "echo one", [], 20)]
    with pytest.raises(SetupFailed, match="refuses labctl's key"):
        run_setup(lab.targets, steps, lab.key.private_path, lab.store, lab.store, tmp_path / "logs",
                  wait_first=WaitFirst(2))
    assert lab.store.marks == []
