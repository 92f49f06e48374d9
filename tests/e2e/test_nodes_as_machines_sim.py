"""End to end on the emulated Chameleon with nodes as machines (labctl.testbed.node_machine) and SSH on port 22 of
the floating IPs (labctl.testbed.ssh_port22): the real CLI, the system OpenSSH client, the world's key.

- `labctl testbed start` claims port 22: `ssh -p 22 cc@<floating ip>` reaches the node and `hostname` prints the
  server's name; a second world meanwhile keeps its own port (no collision); `stop` gives port 22 back.
- data-persist: the built-in volume step (mkfs.ext4, mount, fstab), skipped on sim before, runs on the node's
  loop device; data written on /mnt/block survives `down` (volume kept) and `up` on a new server; nothing of the
  machines (processes, mounts, loop devices) is left once the world's processes have exited.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from tests.e2e.helpers import run

from labctl.testbed import node_machine, ssh_port22

pytestmark = pytest.mark.slow
WHY_NOT = node_machine.machines_unavailable()


def _world(env: dict[str, str]):
    from labctl.testbed.world import World

    return World(Path(env["LABCTL_TESTBED_DIR"]))


def _labctl_key(env: dict[str, str]) -> Path:
    (key,) = Path(env["LABCTL_STATE_DIR"]).rglob("id_ed25519")
    return key


def _known_hosts(target: dict, port: int, path: Path) -> Path:
    from labctl.testbed.sshd import load_host_key

    kind, blob = load_host_key(target["node_dir"]).export_public_key().decode().split()[:2]
    pattern = target["address"] if port == 22 else f"[{target['address']}]:{port}"
    path.write_text(f"{pattern} {kind} {blob}\n")
    return path


def _system_ssh(key: Path, known_hosts: Path, address: str, port: int, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-p", str(port), "-i", str(key), "-o", f"UserKnownHostsFile={known_hosts}",
         "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
         "-o", "BatchMode=yes", f"cc@{address}", command],
        capture_output=True, text=True, timeout=60)


def _leftovers(world_dir: Path) -> list[str]:
    marker = str(world_dir)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            mounts = Path(f"/proc/{pid}/mountinfo").read_text()
        except OSError:
            continue
        if marker in cmdline or marker in mounts:
            left.append(f"process {pid}: {cmdline[:100]}")
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().startswith(marker):
                left.append(f"{backing.parent.parent.name}: {backing.read_text().strip()}")
        except OSError:
            continue
    return left


@pytest.mark.skipif(not ssh_port22.may_bind(), reason="this process may not bind port 22 (not root, and "
                    "net.ipv4.ip_unprivileged_port_start > 22): nodes answer on the per-world port")
def test_port_22_of_a_floating_ip_reaches_the_node(labctl_env, tmp_path):
    if ssh_port22.holder() is not None:
        pytest.skip(f"another emulated world ({ssh_port22.holder()}) has port 22 on this host")
    world_dir = Path(labctl_env["LABCTL_TESTBED_DIR"])
    run(labctl_env, "testbed", "start", timeout=120)
    try:
        ports = json.loads((world_dir / "serve.json").read_text())["ports"]
        assert ports["ssh"] == 22 and ssh_port22.held_by(world_dir)
        run(labctl_env, "up", "hello", "--site", "sim", timeout=300)
        (target,) = [t for t in _world(labctl_env).ssh_targets() if t["name"].startswith("labctl-")]
        out = _system_ssh(_labctl_key(labctl_env), _known_hosts(target, 22, tmp_path / "kh"), target["address"],
                          22, "hostname; id -un")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [target["name"], "cc"]
        # A second world at the same time keeps its own port: the floating IPs (numbered alike) do not collide.
        from labctl.testbed.server import Testbed

        other = Testbed.start(tmp_path / "other-world", ssh=True, shared_ssh_port=True)
        try:
            assert not ssh_port22.held_by(tmp_path / "other-world") and ssh_port22.held_by(world_dir)
            assert other.ssh_port != 22
        finally:
            other.stop()
        run(labctl_env, "down", "hello", timeout=300)
    finally:
        run(labctl_env, "testbed", "stop", timeout=120)
    assert ssh_port22.holder() is None


@pytest.mark.skipif(WHY_NOT is not None, reason=f"nodes cannot be machines here: {WHY_NOT}")
def test_data_persist_volume_step_runs_on_a_machine_node_and_the_data_is_kept(labctl_env, tmp_path):
    world_dir = Path(labctl_env["LABCTL_TESTBED_DIR"])
    run(labctl_env, "up", "data-persist", "--site", "sim", timeout=300)
    (log,) = Path(labctl_env["LABCTL_STATE_DIR"]).rglob("node-1.log")
    text = log.read_text()
    assert "'mount volume block at /mnt/block' on node-1: done" in text, text
    assert "'docker' on node-1: skipped: needs a container runtime" in text, text
    w = _world(labctl_env)
    (target,) = [t for t in w.ssh_targets() if t["name"].startswith("labctl-")]
    assert (target["node_dir"] / "home" / "data-persist-ready.txt").read_text() == (
        f"data-persist ready on {target['name']}\n")
    out = run(labctl_env, "ssh", "data-persist", "--",
              "findmnt -n -o FSTYPE /mnt/block && echo kept-across-servers > /mnt/block/data.txt && hostname")
    assert out.stdout.split() == ["ext4", target["name"]]
    assert not Path("/mnt/block/data.txt").exists()  # the node's mount, not this host's

    run(labctl_env, "down", "data-persist", timeout=300)
    run(labctl_env, "up", "data-persist", "--site", "sim", timeout=300)
    (target2,) = [t for t in w.ssh_targets() if t["name"].startswith("labctl-")]
    assert target2["server_id"] != target["server_id"]
    out = run(labctl_env, "ssh", "data-persist", "--", "cat /mnt/block/data.txt")
    assert out.stdout == "kept-across-servers\n"
    run(labctl_env, "down", "data-persist", "--delete-volumes", timeout=300)
    assert _leftovers(world_dir) == []
