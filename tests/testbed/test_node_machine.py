"""Emulated nodes as machines (labctl.testbed.node_machine), driven with the system OpenSSH client: hostname, user
cc at /home/cc, passwordless sudo, a private system layer per node (a package installed with dpkg changes only
that node), one namespace per node across sessions, a volume's loop device that mkfs/mount use, scp and sftp
exiting 0, and nothing left (processes, mounts, loop devices) once the node is deleted or the world stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labctl.keys import ensure_keypair
from labctl.testbed import node_machine, node_pid1
from labctl.testbed.sshd import SSHNodes, load_host_key

WHY_NOT = node_machine.machines_unavailable()
machines_only = pytest.mark.skipif(WHY_NOT is not None, reason=f"nodes cannot be machines here: {WHY_NOT}")


class StandInWorld:
    def __init__(self) -> None:
        self.targets: list[dict] = []

    def ssh_targets(self) -> list[dict]:
        return list(self.targets)


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class Nodes:
    """Two nodes of a stand-in world (n1 with a 1 GB volume), served by SSHNodes, reached with `ssh`/`scp`."""

    def __init__(self, tmp: Path, machines: bool | None) -> None:
        self.tmp = tmp
        self.key = ensure_keypair(tmp / "keys")
        self.world = StandInWorld()
        self.port = _free_port("127.10.9.41")
        self.address = {"n1": "127.10.9.41", "n2": "127.10.9.42"}
        for i, name in enumerate(self.address, 1):
            self.world.targets.append({
                "server_id": f"srv-{name}", "site": "chi@uc", "name": f"lab-{name}", "address": self.address[name],
                "port": self.port, "authorized_keys": [self.key.public_key], "node_dir": tmp / "world" / name,
                "volumes": [{"id": "vol-0123456789abcdefghij-x", "device": "/dev/vdb", "size_gb": 1,
                             "file": tmp / "world" / "volumes" / "vol-1.img"}] if i == 1 else [],
            })
        self.sshd = SSHNodes(self.world, poll_interval=0.02, machines=machines).start()
        lines = []
        for name, address in self.address.items():
            self.sshd.wait_listening(address, self.port, 5)
            kind, blob = load_host_key(self.node_dir(name)).export_public_key().decode().split()[:2]
            lines.append(f"[{address}]:{self.port} {kind} {blob}\n")
        self.known_hosts = tmp / "known_hosts"
        self.known_hosts.write_text("".join(lines))

    def node_dir(self, name: str) -> Path:
        return self.tmp / "world" / name

    def options(self) -> list[str]:
        return ["-i", str(self.key.private_path), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"]

    def ssh(self, name: str, command: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["ssh", "-p", str(self.port), *self.options(), f"cc@{self.address[name]}", command],
                              capture_output=True, text=True, timeout=120)
        if check:
            assert proc.returncode == 0, (command, proc.returncode, proc.stdout, proc.stderr)
        return proc


@pytest.fixture
def nodes(tmp_path):
    n = Nodes(tmp_path, None)
    try:
        yield n
    finally:
        n.sshd.stop()


def _world_leftovers(world_dir: Path) -> list[str]:
    """Processes, mounts and loop devices that still refer to `world_dir`."""
    marker = str(world_dir)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            mounts = Path(f"/proc/{pid}/mountinfo").read_text()
        except OSError:
            continue
        if marker in cmdline:
            left.append(f"process {pid}: {cmdline[:120]}")
        elif marker in mounts:
            left.append(f"mounts of process {pid}")
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().startswith(marker):
                left.append(f"{backing.parent.parent.name} on {backing.read_text().strip()}")
        except OSError:
            continue
    return left


@machines_only
def test_a_node_is_a_machine_named_as_its_server_with_cc_and_sudo(nodes):
    out = nodes.ssh("n1", "hostname; id -un; echo $HOME; pwd; sudo -n id -u; cat /etc/hostname").stdout.split()
    assert out == ["lab-n1", "cc", "/home/cc", "/home/cc", "0", "lab-n1"]
    assert socket.gethostname() != "lab-n1"
    # the home is the node directory's (labctl's uploads and authorized_keys), owned by cc inside
    nodes.ssh("n1", "echo hi > made-by-cc.txt && stat -c %U made-by-cc.txt | grep -x cc")
    assert (nodes.node_dir("n1") / "home" / "made-by-cc.txt").read_text() == "hi\n"


@machines_only
def test_system_changes_stay_in_the_node_and_last_across_sessions(nodes, tmp_path):
    probe = "/etc/labctl-node-probe"
    nodes.ssh("n1", f"echo n1 | sudo tee {probe} >/dev/null")
    assert nodes.ssh("n1", f"cat {probe}").stdout == "n1\n"  # another session, same node
    assert nodes.ssh("n2", f"cat {probe}", check=False).returncode != 0
    assert not Path(probe).exists()
    # A real package, installed with dpkg as a lab step would (apt needs the internet; dpkg does not).
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr" / "bin").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text("Package: labctl-probe\nVersion: 1.0\nArchitecture: all\n"
                                            "Maintainer: labctl <labctl@example.org>\nDescription: probe\n")
    tool = pkg / "usr" / "bin" / "labctl-probe"
    tool.write_text("#!/bin/sh\necho probe on $(hostname)\n")
    tool.chmod(0o755)
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(nodes.node_dir("n1") / "home" /
                                                                               "probe.deb")],
                   check=True, capture_output=True)
    nodes.ssh("n1", "sudo dpkg -i probe.deb >/dev/null")
    assert nodes.ssh("n1", "labctl-probe; dpkg -s labctl-probe | grep Status").stdout == (
        "probe on lab-n1\nStatus: install ok installed\n")
    assert nodes.ssh("n2", "command -v labctl-probe", check=False).returncode != 0
    assert not Path("/usr/bin/labctl-probe").exists()
    assert subprocess.run(["dpkg", "-s", "labctl-probe"], capture_output=True).returncode != 0


@machines_only
def test_root_in_a_node_cannot_reach_the_hosts_network_or_devices(nodes):
    """sudo works (mount, files), but the capabilities past the node's namespaces are gone: the host's network
    (shared with the node) and firewall, new device nodes, the clock, the kernel's settings (/proc/sys, /sys)."""
    probe = "127.99.0.1"
    try:
        for command in (f"sudo ip addr add {probe}/32 dev lo", "sudo mknod /root/disk b 8 0",
                        'sudo date -s "$(date)"',  # harmless if it ran: the clock set to the time it is
                        "echo 1 | sudo tee /proc/sys/vm/drop_caches", "echo 1 | sudo tee /sys/kernel/mm/ksm/run"):
            assert nodes.ssh("n1", command, check=False).returncode != 0, command
        assert probe not in subprocess.run(["ip", "addr", "show", "lo"], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["ip", "addr", "del", f"{probe}/32", "dev", "lo"], capture_output=True)
    nodes.ssh("n1", "sudo mkdir -p /mnt/t && sudo mount -t tmpfs tmpfs /mnt/t && sudo touch /mnt/t/ok")


@machines_only
def test_an_interactive_shell_on_a_pty_is_the_nodes(nodes):
    proc = subprocess.run(["ssh", "-tt", "-p", str(nodes.port), *nodes.options(), f"cc@{nodes.address['n1']}"],
                          input="hostname; tty; exit 3\n", capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TERM": "xterm"})
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.replace("\r", "").splitlines()
    assert any(line.endswith("cc@lab-n1:~$ hostname; tty; exit 3") for line in lines), lines  # the node's prompt
    assert lines[lines.index("lab-n1") + 1].startswith("/dev/pts/"), lines


@machines_only
def test_one_pid_namespace_per_node_kept_across_sessions(nodes):
    nodes.ssh("n1", "nohup sleep 300 >/dev/null 2>&1 & echo started")
    assert "sleep 300" in nodes.ssh("n1", "ps -eo args").stdout  # a later session sees the background job
    assert "sleep 300" not in nodes.ssh("n2", "ps -eo args").stdout
    assert nodes.ssh("n1", "cat /proc/1/comm").stdout.strip() != "systemd"  # its own PID 1, not the host's


@machines_only
def test_a_volume_is_a_block_device_that_mkfs_and_mount_use(nodes):
    script = ("set -e; DEV=/dev/disk/by-id/virtio-vol-0123456789abcdef; [ -b /dev/vdb ]; "
              "sudo blkid /dev/vdb || sudo mkfs.ext4 -q $DEV; sudo mkdir -p /mnt/block; "
              "mountpoint -q /mnt/block || sudo mount $DEV /mnt/block; sudo chown cc /mnt/block; "
              "echo kept > /mnt/block/data.txt; findmnt -n -o FSTYPE /mnt/block")
    assert nodes.ssh("n1", script).stdout.strip().splitlines()[-1] == "ext4"
    assert nodes.ssh("n1", "cat /mnt/block/data.txt").stdout == "kept\n"
    assert nodes.ssh("n2", "ls /dev/vdb", check=False).returncode != 0  # attached to n1 only
    assert " /mnt/block " not in Path("/proc/self/mountinfo").read_text()  # mounted in the node only


@machines_only
def test_a_volume_in_fstab_is_mounted_again_when_the_machine_restarts(tmp_path):
    n = Nodes(tmp_path, None)
    try:
        n.ssh("n1", "sudo mkfs.ext4 -q /dev/vdb && sudo mkdir -p /mnt/block && sudo mount /dev/vdb /mnt/block && "
                    "sudo chown cc /mnt/block && echo kept > /mnt/block/data.txt && "
                    "echo \"UUID=$(sudo blkid -s UUID -o value /dev/vdb) /mnt/block ext4 defaults,nofail 0 2\" "
                    "| sudo tee -a /etc/fstab >/dev/null")
    finally:
        n.sshd.stop()  # every process gone: the machine ends (as a reboot)
    assert _world_leftovers(tmp_path / "world") == []
    n = Nodes(tmp_path, None)
    try:
        assert n.ssh("n1", "findmnt -n -o FSTYPE /mnt/block; cat /mnt/block/data.txt").stdout == "ext4\nkept\n"
    finally:
        n.sshd.stop()


@pytest.mark.parametrize("machines", [pytest.param(True, marks=machines_only), False], ids=["machine", "plain"])
def test_scp_and_sftp_exit_zero(tmp_path, machines):
    """OpenSSH's scp (SFTP mode, the default) exited 1 after copying: the SFTP session ended without an exit
    status. Both node kinds now end it with 0; legacy scp (-O) and sftp too."""
    n = Nodes(tmp_path, machines)
    try:
        src = tmp_path / "upload.txt"
        src.write_text("payload\n")
        remote = f"cc@{n.address['n1']}"
        for mode, name in (([], "a.txt"), (["-O"], "b.txt")):
            proc = subprocess.run(["scp", *mode, "-P", str(n.port), *n.options(), str(src), f"{remote}:{name}"],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, (mode, proc.stderr)
            assert (n.node_dir("n1") / "home" / name).read_text() == "payload\n"
        back = tmp_path / "back.txt"
        proc = subprocess.run(["scp", "-P", str(n.port), *n.options(), f"{remote}:a.txt", str(back)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and back.read_text() == "payload\n", proc.stderr
        proc = subprocess.run(["sftp", "-P", str(n.port), *n.options(), "-b", "-", remote],
                              input=f"put {src} c.txt\nls\n", capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "c.txt" in proc.stdout, proc.stderr
        assert (n.node_dir("n1") / "home" / "c.txt").read_text() == "payload\n"
    finally:
        n.sshd.stop()


@machines_only
def test_nothing_left_when_a_node_is_deleted_or_the_world_stops(tmp_path):
    n = Nodes(tmp_path, None)
    try:
        n.ssh("n1", "nohup sleep 300 >/dev/null 2>&1 & sudo mkfs.ext4 -q /dev/vdb && sudo mkdir -p /mnt/v && "
                    "sudo mount /dev/vdb /mnt/v")
        n.ssh("n2", "nohup sleep 300 >/dev/null 2>&1 &")
        assert _world_leftovers(tmp_path / "world")  # the machines run
        holder = node_machine.holder_pid(n.node_dir("n2"))
        assert holder is not None
        # n2's server is deleted: its machine ends, n1's runs on
        n.world.targets = [t for t in n.world.targets if t["name"] != "lab-n2"]
        n.sshd.wait_stopped_listening(n.address["n2"], n.port, 5)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{holder}") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not os.path.exists(f"/proc/{holder}")
        assert "sleep 300" in n.ssh("n1", "ps -eo args").stdout
    finally:
        n.sshd.stop()
    assert _world_leftovers(tmp_path / "world") == []


@machines_only
def test_a_machine_starts_while_the_emulator_holds_descriptors_above_1024(tmp_path):
    """An emulator serving a class holds a lock and connections per node: past FD_SETSIZE, select() raised
    'filedescriptor out of range' and the node's session failed (3 to 20 of 200 students in the benchmark)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"cannot open 1200 descriptors here (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if soft != resource.RLIM_INFINITY else soft, hard))
    held = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        n = Nodes(tmp_path, None)
        try:
            assert n.ssh("n2", "hostname").stdout.strip() == "lab-n2"
        finally:
            n.sshd.stop()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert _world_leftovers(tmp_path / "world") == []


@machines_only
def test_two_processes_share_a_node_until_the_last_one_stops(tmp_path):
    n = Nodes(tmp_path, None)
    second = SSHNodes(n.world, poll_interval=0.02, port=_free_port("127.10.9.41")).start()
    try:
        second.wait_listening(n.address["n1"], second.port, 5)
        n.ssh("n1", "nohup sleep 301 >/dev/null 2>&1 &")
        holder = node_machine.holder_pid(n.node_dir("n1"))
        n.sshd.stop()  # the first process goes: the node lives on for the second
        proc = subprocess.run(["ssh", "-p", str(second.port), "-o", f"UserKnownHostsFile={n.known_hosts}",
                               "-o", "StrictHostKeyChecking=no", "-i", str(n.key.private_path), "-o",
                               "IdentitiesOnly=yes", f"cc@{n.address['n1']}", "ps -eo args"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "sleep 301" in proc.stdout, proc.stderr
        assert node_machine.holder_pid(n.node_dir("n1")) == holder
    finally:
        second.stop()
        n.sshd.stop()
    assert _world_leftovers(tmp_path / "world") == []


def test_plain_nodes_when_asked_and_why_is_said(monkeypatch, tmp_path):
    monkeypatch.setenv(node_machine.ENV_SWITCH, "plain")
    assert node_machine.host_check() == f"{node_machine.ENV_SWITCH}=plain"
    n = Nodes(tmp_path, False)
    try:
        assert n.sshd.machines is None
        assert n.ssh("n1", "echo $HOME").stdout.strip() == str(n.node_dir("n1") / "home")
    finally:
        n.sshd.stop()


def test_which_host_changing_steps_run_on_machine_nodes(monkeypatch):
    monkeypatch.delenv(node_machine.INTERNET_SWITCH, raising=False)
    if WHY_NOT is not None:
        assert node_machine.sim_skip_reason("sudo mkfs.ext4 /dev/vdb") == node_machine.HOST_SKIP
        return
    assert node_machine.sim_skip_reason("sudo mkfs.ext4 -q /dev/vdb && sudo mount /dev/vdb /mnt") is None
    assert "a GPU" in node_machine.sim_skip_reason("nvidia-smi")
    assert "container runtime" in node_machine.sim_skip_reason("curl -fsSL https://get.docker.com/ | sudo sh")
    assert "Kubernetes" in node_machine.sim_skip_reason("sudo kubeadm init")
    assert "internet" in node_machine.sim_skip_reason("sudo apt-get update -q")
    assert "internet" in node_machine.sim_skip_reason("git clone https://github.com/x/y")
    assert "block device" in node_machine.sim_skip_reason("[ -e /dev/disk/by-id/google-data ]")
    monkeypatch.setenv(node_machine.INTERNET_SWITCH, "1")
    assert node_machine.sim_skip_reason("sudo apt-get update -q") is None


@machines_only
def test_a_nodes_tree_devices_and_mounts(nodes):
    """What PID 1 builds (with system calls): device nodes, /dev links, modes and owners, the mounts' flags, the
    node's name in /etc/hosts, the user's lines, the sudoers file."""
    script = ("cd /; stat -c '%n|%F %a %U:%G %t:%T' / /root /tmp /home /home/cc /mnt /media /run /dev /dev/shm "
              "/dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty /etc /usr /etc/sudoers.d/90-labctl-cc;"
              " echo --; readlink /dev/fd /dev/stdin /dev/stdout /dev/stderr /dev/ptmx; echo --;"
              " for m in / /etc /run /dev /dev/pts /dev/shm /proc /proc/sys /sys; do"
              "   echo \"$m|$(findmnt -n -o FSTYPE,OPTIONS --mountpoint $m | head -n1)\"; done; echo --;"
              " grep -c ' lab-n1$' /etc/hosts; grep -c '^cc:' /etc/passwd /etc/group; sudo cat /etc/sudoers.d/*cc;"
              " head -c 4 /dev/zero | od -An -tx1; echo gone > /dev/null")
    stat_lines, links, mount_lines, rest = nodes.ssh("n1", script).stdout.split("--\n")
    stats = dict(line.split("|", 1) for line in stat_lines.splitlines())
    assert stats["/"].startswith("directory 755 root:root")
    assert stats["/root"].startswith("directory 700 root:root")
    assert stats["/tmp"].startswith("directory 1777 root:root")
    assert stats["/home/cc"].startswith("directory 755 cc:cc")
    for d in ("/home", "/mnt", "/media", "/run", "/dev"):
        assert stats[d].startswith("directory 755 root:root"), d
    assert stats["/dev/shm"].startswith("directory 1777 root:root")
    for d in ("/etc", "/usr"):  # an overlay's top has its upper dir's mode and owner: made the host's
        host = os.stat(d)
        assert stats[d].startswith(f"directory {host.st_mode & 0o7777:o} {'root:root' if host.st_uid == 0 else ''}")
    devices = {"/dev/null": "1:3", "/dev/zero": "1:5", "/dev/full": "1:7", "/dev/random": "1:8",
               "/dev/urandom": "1:9", "/dev/tty": "5:0"}
    for dev, numbers in devices.items():
        assert stats[dev] == f"character special file 666 root:root {numbers}", dev
    assert stats["/etc/sudoers.d/90-labctl-cc"].startswith("regular file 440 root:root")
    assert links.split() == ["/proc/self/fd", "/proc/self/fd/0", "/proc/self/fd/1", "/proc/self/fd/2", "pts/ptmx"]
    mounts = {m: opts.split() for m, opts in (line.split("|", 1) for line in mount_lines.splitlines())}
    host_fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(nodes.node_dir("n1"))],
                             capture_output=True, text=True).stdout.strip()
    assert mounts["/"][0] == host_fs  # the node's rootfs directory, bound on itself
    assert [mounts[m][0] for m in ("/etc", "/run", "/dev", "/dev/pts", "/dev/shm", "/proc", "/proc/sys", "/sys")] \
        == ["overlay", "tmpfs", "tmpfs", "devpts", "tmpfs", "proc", "proc", "sysfs"]
    flags = {m: set(opts[1].split(",")) for m, opts in mounts.items()}
    assert {"nosuid", "nodev"} <= flags["/run"] and {"nosuid", "nodev"} <= flags["/dev/shm"]
    assert "nosuid" in flags["/dev"] and "nodev" not in flags["/dev"]  # its device nodes work
    assert "ro" in flags["/proc/sys"] and "ro" in flags["/sys"] and "rw" in flags["/proc"]
    assert rest.splitlines() == ["1", "/etc/passwd:1", "/etc/group:1", "cc ALL=(ALL) NOPASSWD:ALL", " 00 00 00 00"]


@machines_only
def test_a_restarted_node_has_an_empty_tmp_and_its_home_is_its_users(tmp_path):
    """A restart is a reboot: /tmp is emptied without following its symlinks out, files put in the home from
    outside become the user's, and the system files are not appended to twice."""
    n = Nodes(tmp_path, None)
    try:
        n.ssh("n1", "mkdir -p /tmp/a/b && echo x > /tmp/a/b/f && echo y > /tmp/.hidden && mkdir keep && "
                    "echo k > keep/file && ln -s /home/cc/keep /tmp/out && ln -s /etc /tmp/etc && "
                    "mkfifo /tmp/pipe && [ -n \"$(ls -A /tmp)\" ]")
    finally:
        n.sshd.stop()
    dropped = n.node_dir("n1") / "home" / "dropped" / "in"
    dropped.mkdir(parents=True)
    (dropped / "file").write_text("root's\n")  # owned by this host's root
    (dropped / "link").symlink_to("/etc/hostname")
    n = Nodes(tmp_path, None)
    try:
        out = n.ssh("n1", "ls -A /tmp | wc -l; stat -c %a /tmp; cat keep/file; "
                          "stat -c %U dropped dropped/in dropped/in/file; stat -c %U%G -L dropped/in/link; "
                          "find . -not -user cc | wc -l; grep -c ' lab-n1$' /etc/hosts; grep -c '^cc:' /etc/passwd"
                    ).stdout.split()
        assert out == ["0", "1777", "k", "cc", "cc", "cc", "rootroot", "0", "1", "1"]
    finally:
        n.sshd.stop()
    assert _world_leftovers(tmp_path / "world") == []


@machines_only
def test_links_left_in_a_nodes_root_do_not_reach_the_host(tmp_path):
    """Root in a node may replace its /tmp, /root or /mnt with a symlink (here: made from outside, as it would be
    left at the next start): the next start replaces them, and neither empties nor chmods what they point to."""
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o750)
    (victim / "precious").write_text("p")
    rootfs = tmp_path / "world" / "n1" / node_machine.MACHINE_DIR / "rootfs"
    rootfs.mkdir(parents=True)
    for name in ("tmp", "root", "mnt", "home", "etc"):
        (rootfs / name).symlink_to(victim)
    n = Nodes(tmp_path, None)
    try:
        out = n.ssh("n1", "stat -c '%n %F %a' /tmp /root /mnt /home /etc; ls -A /tmp | wc -l; hostname").stdout
    finally:
        n.sshd.stop()
    assert out.splitlines()[:5] == ["/tmp directory 1777", "/root directory 700", "/mnt directory 755",
                                    "/home directory 755", f"/etc directory {os.stat('/etc').st_mode & 0o7777:o}"]
    assert out.splitlines()[5:] == ["0", "lab-n1"]
    assert (victim / "precious").read_text() == "p"
    assert victim.stat().st_mode & 0o7777 == 0o750
    assert _world_leftovers(tmp_path / "world") == []


@machines_only
def test_the_supervisor_is_a_bare_interpreter_and_pid1_its_fork(nodes):
    """Each node's start costs a bare interpreter: `python -I -S` on node_pid1 (nothing of labctl, no
    environment but PATH), and the node's PID 1 is that process's fork, not another program."""
    nodes.ssh("n1", "true")
    info = node_pid1.read_json(nodes.node_dir("n1") / "machine" / "holder.json")
    supervisor, pid1 = int(info["supervisor"]), int(info["pid"])
    cmdline = Path(f"/proc/{supervisor}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:3] == [b"-I", b"-S"]
    assert [v.split(b"=")[0] for v in Path(f"/proc/{supervisor}/environ").read_bytes().split(b"\0") if v] == [b"PATH"]
    assert Path(f"/proc/{pid1}/cmdline").read_bytes() == Path(f"/proc/{supervisor}/cmdline").read_bytes()
    assert int(Path(f"/proc/{pid1}/stat").read_text().rsplit(")", 1)[1].split()[1]) == supervisor  # its parent


def test_the_supervisor_imports_no_labctl_and_no_slow_modules():
    """node_pid1 runs in a bare interpreter: importing it adds only small C modules to what the interpreter
    loads anyway (json, re, enum, pathlib, typing, signal would cost milliseconds per node)."""
    code = ("import sys; before = set(sys.modules); sys.path.append(sys.argv[1]); import node_pid1; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, os.path.dirname(node_pid1.__file__)],
                          capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "")}, check=True)
    added = set(proc.stdout.split())
    assert "node_pid1" in added
    cheap = {"os", "os.path", "posixpath", "genericpath", "_collections_abc", "stat", "_stat",  # frozen in 3.11
             "__future__", "_thread", "_signal", "fcntl", "select", "time"}
    assert added - {"node_pid1"} <= cheap, added - cheap


@machines_only
def test_a_node_whose_pid1_is_killed_ends_and_starts_again(nodes):
    nodes.ssh("n2", "true")
    mdir = nodes.node_dir("n2") / "machine"
    info = node_pid1.read_json(mdir / "holder.json")
    os.kill(int(info["pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while node_machine.start_time(int(info["supervisor"])) == info["supervisor_start"] and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    assert node_machine.start_time(int(info["supervisor"])) != info["supervisor_start"]  # it noticed, and ended
    assert not (mdir / "holder.json").exists()
    assert nodes.ssh("n2", "hostname").stdout == "lab-n2\n"  # the next session starts it again
    assert node_machine.holder_pid(nodes.node_dir("n2")) not in (None, int(info["pid"]))


@machines_only
def test_a_node_ends_with_its_supervisor_even_when_that_is_killed(nodes):
    nodes.ssh("n2", "nohup sleep 302 >/dev/null 2>&1 &")
    info = node_pid1.read_json(nodes.node_dir("n2") / "machine" / "holder.json")
    os.kill(int(info["supervisor"]), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while node_machine.start_time(int(info["pid"])) == info["start"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert node_machine.start_time(int(info["pid"])) != info["start"]  # PID 1 went, and the node's processes
    assert "sleep 302" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert nodes.ssh("n2", "hostname").stdout == "lab-n2\n"  # the next session starts it again


_names = st.text("abcxyz.-_", min_size=1, max_size=6).filter(lambda n: n not in (".", ".."))
_trees = st.recursive(st.sampled_from(["file", "link-out", "link-in", "fifo"]),
                      lambda kids: st.dictionaries(_names, kids, max_size=4), max_leaves=20)


def _make(path: Path, spec, outside: Path) -> None:
    if isinstance(spec, dict):
        path.mkdir()
        for name, kid in spec.items():
            _make(path / name, kid, outside)
    elif spec == "file":
        path.write_text("x")
    elif spec == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(outside if spec == "link-out" else path.parent)


@settings(max_examples=60, deadline=None)
@given(tree=st.dictionaries(_names, _trees, max_size=5))
def test_emptying_tmp_deletes_everything_in_it_and_nothing_outside(tmp_path_factory, tree):
    """/tmp's contents are the node user's: a link out of it is deleted, never followed."""
    base = tmp_path_factory.mktemp("tmp")
    outside = base / "outside"
    outside.mkdir()
    (outside / "kept").write_text("k")
    top = base / "tmp"
    _make(top, tree, outside)
    node_pid1.empty_dir(str(top))
    assert list(top.iterdir()) == []
    assert (outside / "kept").read_text() == "k"


def test_emptying_and_chowning_a_tree_deeper_than_the_recursion_limit(tmp_path):
    deep = tmp_path / "top"
    path = str(deep)
    os.mkdir(path)
    for _ in range(sys.getrecursionlimit() + 100):
        path += "/d"
        os.mkdir(path)
    with open(f"{path}/f", "w") as f:
        f.write("x")
    node_pid1.chown_tree(str(deep), os.getuid(), os.getgid())
    node_pid1.empty_dir(str(deep))
    assert list(deep.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_chown_tree_changes_links_not_their_targets(tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("o")
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    (home / "sub" / "f").write_text("f")
    (home / "link").symlink_to(outside)
    (home / "dirlink").symlink_to(tmp_path)
    node_pid1.chown_tree(str(home), 4321, 4322)
    for path in (home, home / "sub", home / "sub" / "f", home / "link", home / "dirlink"):
        st_ = os.lstat(path)
        assert (st_.st_uid, st_.st_gid) == (4321, 4322), path
    assert os.stat(outside).st_uid == os.geteuid() and os.stat(tmp_path).st_uid == os.geteuid()
