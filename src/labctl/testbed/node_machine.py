"""Emulated nodes as machines, where the OS allows (root on Linux, with `unshare`, `nsenter`, overlayfs, `sudo`
and OpenSSH's `sftp-server`).

Each node's SSH sessions (exec, shell, SFTP, scp) run in Linux namespaces of the node's own: mount, UTS (its
hostname is the server's name) and PID. Its root is a fresh tree under `<node_dir>/machine/rootfs`: the host's
/etc, /usr, /var, /opt and /srv under an overlay whose upper layer is `<node_dir>/machine/upper/<dir>` (so a step
that writes system files or installs packages changes only that node, and the change stays across sessions),
/home/<user> = `<node_dir>/home` (what labctl's uploads and authorized_keys use), a private /root, /tmp, /run and
/dev, and /proc of its own PID namespace. Sessions run as the node's user (`cc` on Chameleon; a uid free on the
host) with passwordless `sudo`. Each attached volume is a sparse file (`<world>/volumes/<id>.img`) on a loop
device, shown in the node as the device Nova reports (/dev/vdb) and /dev/disk/by-id/virtio-<id>, so `mkfs` and
`mount` run.

One holder per node, shared by every process that serves the world: a supervisor process (`hold`, in its own
session; `labctl.testbed.node_pid1`, a stdlib-only file run by a bare interpreter) that starts the namespaces (its
child is PID 1 there: it builds the node's root with system calls, pivots into it, then reaps orphans) and records
PID 1's host pid in `machine/holder.json`; sessions enter with `nsenter`. Every process using a node holds a
shared flock on `machine/users.lock`; the supervisor ends the namespaces (every process in them dies with PID 1,
their mounts with the mount namespace) and detaches the node's loop devices as soon as no process holds it, i.e.
when the server is deleted, the world stops, or the last labctl process using it exits or is killed. Between labctl
commands without `labctl testbed start`, a node is therefore like a machine rebooted: files (home, system
layer, volumes) stay; processes and /tmp do not.

Where the machine cannot, nodes stay what they were (commands on this host as this user, in `<node_dir>/home`);
`machines_unavailable()` says why, once, in the log. `LABCTL_TESTBED_NODES=plain` asks for that explicitly.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labctl.testbed import node_pid1
from labctl.testbed.node_pid1 import PATH, START_TIMEOUT, read_json, start_time, write_json

log = logging.getLogger("labctl.testbed.sshd")

ENV_SWITCH = "LABCTL_TESTBED_NODES"
MACHINE_DIR = "machine"
SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/lib/sftp-server")
TOOLS = ("unshare", "nsenter", "setpriv", "pivot_root", "mount", "losetup", "mknod", "sudo")
# Out of reach for a node's sessions, sudo included (see Machine.wrap); mount stays (volumes, as on a real node).
DROPPED_CAPS = ",".join(f"-{c}" for c in ("net_admin", "sys_module", "sys_time", "sys_boot", "sys_rawio", "mknod",
                                          "mac_admin", "mac_override", "audit_control", "sys_pacct", "wake_alarm",
                                          "block_suspend", "syslog"))
# The supervisor: a bare interpreter (no site, no environment, nothing of labctl) importing the stdlib-only
# node_pid1 as a module of its own, so its cached bytecode is used (a script would be compiled at every start: ~4 ms).
# Its directory goes last on sys.path: the testbed's other files must not shadow the standard library.
_LAUNCH = "import sys; sys.path.append(sys.argv.pop(1)); import node_pid1; sys.exit(node_pid1.main(sys.argv[1:]))"


class MachineError(Exception):
    """A node's namespaces could not be started."""


# -- can this host do it? ---------------------------------------------------------------------------------
_probe_lock = threading.Lock()
_probe: list[str | None] = []


def machines_unavailable() -> str | None:
    """None when emulated nodes can be machines here; else why not (logged once per process)."""
    with _probe_lock:
        if not _probe:
            _probe.append(host_check())
            if _probe[0]:
                log.warning("emulated nodes are not machines here (%s): their commands run on this host as this "
                            "user, and steps that would change the host are skipped on sim", _probe[0])
        return _probe[0]


def nodes_are_machines() -> bool:
    return machines_unavailable() is None


def sftp_server() -> str | None:
    return next((p for p in SFTP_SERVERS if os.access(p, os.X_OK)), None)


def host_check() -> str | None:
    """Why this host cannot make nodes machines (None: it can); `machines_unavailable` caches it."""
    if os.environ.get(ENV_SWITCH, "").strip().lower() == "plain":
        return f"{ENV_SWITCH}=plain"
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root"
    missing = [t for t in TOOLS if shutil.which(t, path=PATH) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    if sftp_server() is None:
        return "no OpenSSH sftp-server (Debian: openssh-sftp-server)"
    with contextlib.suppress(OSError):
        if "overlay" not in Path("/proc/filesystems").read_text():
            return "no overlayfs"
    try:
        probe = subprocess.run(["unshare", "-m", "-u", "-p", "-f", "--mount-proc", "true"],
                               capture_output=True, timeout=10, env={"PATH": PATH})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if probe.returncode:
        return f"unshare failed: {probe.stderr.decode(errors='replace').strip()[:200]}"
    return None


# -- which host-changing steps run on sim -----------------------------------------------------------------
INTERNET_SWITCH = "LABCTL_TESTBED_NODE_INTERNET"
HOST_SKIP = "would change the host on sim (pass --allow-host-changes to run it)"
# What an emulated node cannot offer even as a machine, found in a step's command, script or uploaded files.
_CANNOT = (
    (re.compile(r"nvidia|\bcuda\b|rocm|amdgpu|\bnvtop\b"), "a GPU"),
    (re.compile(r"\bdocker\b|containerd|\bpodman\b"), "a container runtime (Docker, containerd)"),
    (re.compile(r"\bkube(adm|ctl|let)\b|\bk3s\b|\bhelm\b"), "Kubernetes"),
)
_DOWNLOADS = re.compile(r"\b(apt-get|apt|pip3?|snap|add-apt-repository)\s+(update|install|upgrade)\b"
                        r"|\bgit\s+clone\b|\bcurl\b|\bwget\b")
# Volumes are loop devices only on the emulated Chameleon (virtio by-id links); EC2's and GCE's names are not made.
_OTHER_CLOUDS_DISKS = re.compile(r"/dev/disk/by-id/(nvme-Amazon|google-)")
_SCAN_LIMIT = 1 << 20


def sim_skip_reason(command: str, uploads: tuple[Path, ...] = ()) -> str | None:
    """Why a step that would change the host does not run on sim, or None when it runs: on a node that is a
    machine it changes only that node, unless it needs what no emulated node has (a GPU, a Docker daemon,
    Kubernetes) or downloads from the internet (emulated nodes stay off it, as the tests stay on loopback,
    unless LABCTL_TESTBED_NODE_INTERNET=1)."""
    if not nodes_are_machines():
        return HOST_SKIP
    texts = [command]
    for path in uploads:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            texts.append(f.read(_SCAN_LIMIT).decode(errors="replace"))
    text = "\n".join(texts)
    for pattern, what in _CANNOT:
        if pattern.search(text):
            return f"needs {what}, which emulated nodes do not have"
    if _OTHER_CLOUDS_DISKS.search(text):
        return "needs the cloud's block device, which this emulated cloud does not attach (only sim Chameleon does)"
    if _DOWNLOADS.search(text) and os.environ.get(INTERNET_SWITCH) != "1":
        return f"downloads from the internet, which emulated nodes do not reach (set {INTERNET_SWITCH}=1 to allow it)"
    return None


# -- a node's holder --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """A running node: `pid` is PID 1 of its namespaces (a host pid), sessions run as `user` (`uid`, `gid`)."""

    pid: int
    user: str
    uid: int
    gid: int
    home: str

    def wrap(self, argv: list[str]) -> list[str]:
        """argv that runs `argv` inside the node, as its user, in its home. Root inside the node (sudo) is this
        host's root in the node's namespaces, so the capabilities that reach past them (the host's network
        and firewall, kernel modules, the clock, raw devices, new device nodes) leave the bounding set."""
        return ["nsenter", "-t", str(self.pid), "-m", "-u", "-p", "-r", "-W", self.home, "--",
                "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                f"--bounding-set={DROPPED_CAPS}", "--", *argv]

    def wrap_root(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", "-u", "-p", "-r", "-W", "/", "--", *argv]


def holder_pid(node_dir: Path) -> int | None:
    """PID 1 of the node's namespaces (a host pid), if its machine runs."""
    info = read_json(Path(node_dir) / MACHINE_DIR / "holder.json")
    return int(info["pid"]) if info and _alive(int(info.get("pid", 0)), info.get("start")) else None


def _alive(pid: int, start: str | None) -> bool:
    return pid > 0 and start is not None and start_time(pid) == start


def free_id(path: str, first: int = 1000) -> int:
    """The lowest id from `first` not used in /etc/passwd or /etc/group (third field)."""
    used: set[int] = set()
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            parts = line.split(":")
            if len(parts) > 2 and parts[2].isdigit():
                used.add(int(parts[2]))
    n = first
    while n in used:
        n += 1
    return n


@contextlib.contextmanager
def _flock(path: Path, how: int):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, how)
        yield fd
    finally:
        os.close(fd)


class NodeMachines:
    """The node machines one process uses (one per node directory), started on first use, shared with every
    other process serving the same world. Methods block: call them off the event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[Path, int] = {}  # machine dir -> fd holding the shared flock on users.lock
        self._children: list[subprocess.Popen] = []

    def enter(self, target: dict[str, Any]) -> Machine:
        """The running machine of `target` (started if need be), its volumes attached."""
        node_dir = Path(target["node_dir"])
        mdir = self.use(node_dir)
        user = str(target.get("user") or "cc")
        with _flock(mdir / "create.lock", fcntl.LOCK_EX):
            info = read_json(mdir / "holder.json")
            if not (info and _alive(int(info.get("pid", 0)), info.get("start"))
                    and _alive(int(info.get("supervisor", 0)), info.get("supervisor_start"))):
                info = self._spawn(mdir, str(target["name"]), user, node_dir / "home")
            machine = Machine(int(info["pid"]), user, int(info["uid"]), int(info["gid"]), f"/home/{user}")
            self._attach_volumes(mdir, machine, list(target.get("volumes") or []))
        return machine

    def release(self, node_dir: Path) -> None:
        """This process no longer uses the node: when no other does, its namespaces end (waited for)."""
        mdir = Path(node_dir) / MACHINE_DIR
        with self._lock:
            fd = self._users.pop(mdir, None)
        if fd is None:
            return
        os.close(fd)
        info = read_json(mdir / "holder.json")
        supervisor = int(info.get("supervisor", 0))
        if not _alive(supervisor, info.get("supervisor_start")):
            return
        probe = os.open(mdir / "users.lock", os.O_RDWR)
        try:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no one else uses it: end it now
                with contextlib.suppress(ProcessLookupError):
                    os.kill(supervisor, signal.SIGTERM)
            except BlockingIOError:
                try:
                    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    return  # other processes use the node
                except BlockingIOError:
                    pass  # the supervisor holds it: it is ending the node
            _wait_ended(supervisor, info.get("supervisor_start"), 15.0)
        finally:
            os.close(probe)
            self._reap()

    def release_all(self) -> None:
        with self._lock:
            dirs = [m.parent for m in self._users]
        for node_dir in dirs:
            self.release(node_dir)
        self._reap()

    def use(self, node_dir: Path) -> Path:
        """Mark the node as used by this process (its machine then lives at least as long as this use)."""
        mdir = Path(node_dir) / MACHINE_DIR
        mdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock:
            if mdir in self._users:
                return mdir
            fd = os.open(mdir / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a supervisor is ending the node
            self._users[mdir] = fd
        return mdir

    def _reap(self) -> None:
        self._children = [c for c in self._children if c.poll() is None]

    def _spawn(self, mdir: Path, name: str, user: str, home: Path) -> dict:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        old = read_json(mdir / "holder.json")
        uid = int(old.get("uid") or free_id("/etc/passwd"))
        gid = int(old.get("gid") or free_id("/etc/group"))
        args = [sys.executable, "-I", "-S", "-c", _LAUNCH, os.path.dirname(node_pid1.__file__), "hold", str(mdir),
                name, user, str(home), str(uid), str(gid)]
        errlog = os.open(mdir / "holder.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errlog,
                                     start_new_session=True, env={"PATH": PATH})
        finally:
            os.close(errlog)
        self._children.append(child)
        assert child.stdout is not None
        line = _first_line(child.stdout, START_TIMEOUT)
        child.stdout.close()
        if not line.startswith("ready"):
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            detail = (mdir / "holder.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise MachineError(f"node {name}: its namespaces did not start: {' | '.join(detail) or 'no output'}")
        info = read_json(mdir / "holder.json")
        if not info:
            raise MachineError(f"node {name}: the holder gave no pid")
        return info

    @staticmethod
    def _attach_volumes(mdir: Path, machine: Machine, volumes: list[dict]) -> None:
        """Each attached volume: its file on a loop device, shown in the node as its device (once per holder)."""
        loops_path = mdir / "loops.json"
        loops = read_json(loops_path)
        for vol in volumes:
            vid = str(vol["id"])
            if vid in loops:
                continue
            image = Path(vol["file"])
            image.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not image.exists():
                with open(image, "wb") as f:
                    f.truncate(int(vol.get("size_gb") or 1) * 1024**3)  # sparse: costs nothing until written
            _wait_detached(image)
            loop = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                                  check=True, env={"PATH": PATH}).stdout.strip()
            loops[vid] = loop
            write_json(loops_path, loops)  # recorded first: the supervisor detaches what is listed
            rdev = os.stat(loop).st_rdev
            device = shlex.quote(str(vol.get("device") or "/dev/vdb"))
            link = shlex.quote(f"/dev/disk/by-id/virtio-{vid[:20]}")
            # As at boot, a volume listed in the node's /etc/fstab (labctl's mount step adds it) is mounted again.
            script = (f"mknod -m 660 {device} b {os.major(rdev)} {os.minor(rdev)} && "
                      f"ln -sfn ../../{shlex.quote(os.path.basename(str(vol.get('device') or 'vdb')))} {link} && "
                      f"{{ u=$(blkid -s UUID -o value {device}) && [ -n \"$u\" ] && "
                      f"mp=$(awk -v u=\"UUID=$u\" '$1 == u {{ print $2; exit }}' /etc/fstab) && [ -n \"$mp\" ] && "
                      f"mkdir -p \"$mp\" && mount {device} \"$mp\" || true; }}")
            subprocess.run(machine.wrap_root(["/bin/sh", "-c", script]), check=True, capture_output=True,
                           env={"PATH": PATH})


def _wait_ended(pid: int, start: str | None, timeout: float) -> None:
    """Wait until process `pid` (started at `start`) has ended, at most `timeout` seconds: woken by its exit
    through a pidfd (a world's stop releases its nodes one after another: a 20 ms poll made each cost 20 ms)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # gone already, or no pidfd here (Linux < 5.3): poll
        deadline = time.monotonic() + timeout
        while _alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.02)
        return
    try:
        if _alive(pid, start):  # checked after opening: the pidfd is then this very process's
            _readable(pidfd, timeout)
    finally:
        os.close(pidfd)


def _wait_detached(image: Path, timeout: float = 15.0) -> None:
    """A volume moved to this node from a deleted one: wait until the old node's machine has ended and let go of
    its loop device (mounting one file system through two devices would corrupt it)."""
    deadline = time.monotonic() + timeout
    while True:
        users = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True,
                               env={"PATH": PATH}).stdout.strip()
        if not users:
            return
        if time.monotonic() > deadline:
            raise MachineError(f"volume file {image.name} is still attached elsewhere: {users.splitlines()[0]}")
        time.sleep(0.05)


def _readable(fileobj: Any, timeout: float) -> bool:
    """Whether `fileobj` (a file or a descriptor) becomes readable within `timeout` seconds. A selector (epoll), not
    select(): an emulator serving hundreds of nodes holds descriptors above select's limit (FD_SETSIZE, 1024)."""
    with selectors.DefaultSelector() as sel:
        sel.register(fileobj, selectors.EVENT_READ)
        return bool(sel.select(timeout))


def _first_line(stream: Any, timeout: float) -> str:
    """The first line `stream` gives within `timeout` seconds ("" if none)."""
    return stream.readline().decode(errors="replace").strip() if _readable(stream, timeout) else ""
