"""Nodes without a floating IP, reached through one that has one (a jump host), as on a real cloud."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from tests.runner.conftest import FakeWorld, MemStore, free_port

from labctl.errors import SetupFailed
from labctl.keys import ensure_keypair
from labctl.runner import HostKeyChanged, NodeTarget, SetupStep, known_hosts_file, run_setup, ssh_argv, wait_for_ssh
from labctl.testbed.sshd import SSHNodes


@pytest.fixture
def cluster(tmp_path: Path):
    """n1 has a public address; n2 only a fixed IP on n1's network; n3 only one on a network n1 is not on."""
    key = ensure_keypair(tmp_path / "keys")
    port = free_port("127.10.9.31")
    world = FakeWorld()
    nodes = {
        "n1": ("127.10.9.31", {"net-a": "192.168.1.11", "shared": "10.20.0.11"}),
        "n2": (None, {"net-a": "192.168.1.12", "shared": "10.20.0.12"}),
        "n3": (None, {"net-b": "192.168.1.13"}),
    }
    for i, (name, (address, fixed)) in enumerate(nodes.items(), 31):
        world.targets.append({
            "server_id": f"srv-{name}", "site": "kvm@tacc", "name": name, "address": address, "port": port,
            "internal_address": f"127.11.9.{i}", "fixed_ips": fixed,
            "authorized_keys": [key.public_key], "node_dir": tmp_path / "world" / name,
        })
    sshd = SSHNodes(world, poll_interval=0.02, machines=False).start()
    for i in (31, 32, 33):
        sshd.wait_listening(f"127.11.9.{i}", port, 5)
    sshd.wait_listening("127.10.9.31", port, 5)
    jump = NodeTarget("n1", "127.10.9.31", port, "cc")
    targets = {
        "n1": jump,
        "n2": NodeTarget("n2", "192.168.1.12", 22, "cc", via=jump),
        "n3": NodeTarget("n3", "192.168.1.13", 22, "cc", via=jump),
    }
    try:
        yield tmp_path, key, sshd, targets
    finally:
        sshd.stop()


def test_no_public_listener_without_floating_ip(cluster):
    _, _, sshd, targets = cluster
    assert {a for a, _ in sshd.listening()} == {"127.10.9.31", "127.11.9.31", "127.11.9.32", "127.11.9.33"}


def test_wait_setup_and_system_ssh_through_the_jump_host(cluster):
    tmp, key, sshd, targets = cluster
    store = MemStore()
    pinned: list[tuple[str, str, int]] = []
    store.pin_host_key = lambda node, host, port, k: (pinned.append((node, host, port)), store.keys.update({node: k}))
    stages: list[tuple[str, str, str]] = []
    two = [targets["n1"], targets["n2"]]
    wait_for_ssh(two, key.private_path, store, timeout=15, on_stage=lambda *a: stages.append(a))
    # The inner node's key is pinned for its private address and port 22, fetched over the tunnel.
    assert ("n2", "192.168.1.12", 22) in pinned and ("n1", "127.10.9.31", targets["n1"].port) in pinned
    host_n2 = (tmp / "world" / "n2" / "ssh_host_ed25519_key")
    assert host_n2.exists() and store.keys["n2"] != store.keys["n1"]
    ready = {n: d for n, s, d in stages if s == "ssh-ready"}
    assert ready["n2"].startswith("cc@192.168.1.12:22 via cc@127.10.9.31:") and "via" not in ready["n1"]

    steps = [SetupStep(0, "who", ["n1", "n2"], 'echo "$LABCTL_NODE" > who.txt; hostname >/dev/null')]
    results = run_setup(two, steps, key.private_path, store, store, tmp / "logs")
    assert all(r.ok for r in results.values()), {n: r.log_tail for n, r in results.items()}
    assert (tmp / "world" / "n2" / "home" / "who.txt").read_text() == "n2\n"
    assert (tmp / "world" / "n1" / "home" / "who.txt").read_text() == "n1\n"

    # The system ssh: ProxyCommand through n1, both hops checked against labctl's known_hosts only.
    kh = known_hosts_file([targets["n2"]], store, tmp / "known_hosts")
    lines = kh.read_text().splitlines()
    assert lines == [f"[127.10.9.31]:{targets['n1'].port} {store.keys['n1']}", f"192.168.1.12 {store.keys['n2']}"]
    argv = ssh_argv(targets["n2"], key.private_path, kh, command=["cat who.txt; echo $LABCTL_NODE"])
    argv[1:1] = ["-F", "/dev/null", "-o", "BatchMode=yes"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "n2\nn2\n"

    # A wrong pinned key for the inner node is refused, through the tunnel as directly.
    store.keys["n2"] = store.keys["n1"]
    with pytest.raises(HostKeyChanged, match="n2"):
        wait_for_ssh(two, key.private_path, store, timeout=10)
    kh = known_hosts_file([targets["n2"]], store, tmp / "known_hosts")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 255 and "REMOTE HOST IDENTIFICATION HAS CHANGED" in r.stderr


def test_the_hop_closes_when_the_inner_node_hangs_up_before_the_client_does(cluster):
    """`ssh -W` (ProxyCommand/ProxyJump) exits only when the jump host closes the channel. A real sshd closes it
    once both directions have ended, whichever ended first; here the inner node ends first (it drops a client
    that sends no SSH version), then the client's EOF follows. The hop must close rather than stay half-open."""
    tmp, key, _, targets = cluster
    store = MemStore()
    wait_for_ssh([targets["n1"]], key.private_path, store, timeout=15)
    kh = known_hosts_file([targets["n1"]], store, tmp / "known_hosts")
    jump = targets["n1"]
    argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-i", str(key.private_path), "-p", str(jump.port),
            "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
            "-W", "192.168.1.12:22", f"cc@{jump.host}"]
    # SIGHUP ignored, as under nohup or a CI runner: ssh then cannot be ended by its parent's SIGHUP either.
    proc = subprocess.Popen(argv, bufsize=0, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        assert proc.stdout.readline().startswith(b"SSH-2.0-")  # the inner node's banner, through the hop
        proc.stdin.write(b"not an SSH client\r\n")
        proc.stdin.flush()
        _read_to_eof(proc.stdout, timeout=10)  # the inner node hung up
        proc.stdin.close()  # now the client's EOF: both directions have ended
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _read_to_eof(f, timeout: float) -> bytes:
    import os
    import select
    import time

    data, deadline = b"", time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([f], [], [], left)[0]:
            chunk = os.read(f.fileno(), 65536)
            if not chunk:
                return data
            data += chunk
    raise AssertionError(f"no EOF within {timeout}s (read {data!r})")


def test_node_on_a_network_the_jump_host_is_not_on_is_unreachable(cluster):
    _, key, _, targets = cluster
    store = MemStore()
    with pytest.raises(SetupFailed, match=r"n3 \(192.168.1.13:22 via .*could not connect"):
        wait_for_ssh([targets["n3"]], key.private_path, store, timeout=2, connect_timeout=1)
    assert "n3" not in store.keys and "n1" in store.keys


def test_ssh_argv_proxy_command(tmp_path):
    jump = NodeTarget("node-1", "127.10.1.11", 2222, "cc")
    inner = NodeTarget("node-2", "192.168.1.12", 22, "cc", via=jump)
    argv = ssh_argv(inner, Path("/keys/id 100%"), Path("/kh"))
    assert argv[-1] == "cc@192.168.1.12" and argv[3:5] == ["-p", "22"]
    (proxy,) = [a for a in argv if a.startswith("ProxyCommand=")]
    assert proxy == (
        "ProxyCommand=ssh -i '/keys/id 100%%' -p 2222 -o UserKnownHostsFile=/kh -o GlobalKnownHostsFile=/dev/null "
        "-o StrictHostKeyChecking=yes -o UpdateHostKeys=no -o IdentitiesOnly=yes "
        "-o PreferredAuthentications=publickey -W %h:%p cc@127.10.1.11"
    )
    store = MemStore()
    store.keys = {"node-1": "ssh-ed25519 AAAAkey1"}
    with pytest.raises(SetupFailed, match="no pinned SSH host key for node-2"):
        known_hosts_file([inner], store, tmp_path / "kh")
