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
session) that starts the namespaces (`unshare`, PID 1 there reaps orphans) and records PID 1's host pid in
`machine/holder.json`; sessions enter with `nsenter`. Every process using a node holds a shared flock on
`machine/users.lock`; the supervisor ends the namespaces (every process in them dies with PID 1, their mounts
with the mount namespace) and detaches the node's loop devices as soon as no process holds it, i.e. when the
server is deleted, the world stops, or the last labctl process using it exits or is killed. Between labctl
commands without `labctl testbed start`, a node is therefore like a machine rebooted: files (home, system
layer, volumes) stay; processes and /tmp do not.

Where the machine cannot, nodes stay what they were (commands on this host as this user, in `<node_dir>/home`);
`machines_unavailable()` says why, once, in the log. `LABCTL_TESTBED_NODES=plain` asks for that explicitly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
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

log = logging.getLogger("labctl.testbed.sshd")

ENV_SWITCH = "LABCTL_TESTBED_NODES"
MACHINE_DIR = "machine"
OVERLAID = ("etc", "usr", "var", "opt", "srv")
SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server", "/usr/lib/sftp-server")
TOOLS = ("unshare", "nsenter", "setpriv", "pivot_root", "mount", "losetup", "mknod", "sudo")
START_TIMEOUT = 30.0
# Out of reach for a node's sessions, sudo included (see Machine.wrap); mount stays (volumes, as on a real node).
DROPPED_CAPS = ",".join(f"-{c}" for c in ("net_admin", "sys_module", "sys_time", "sys_boot", "sys_rawio", "mknod",
                                          "mac_admin", "mac_override", "audit_control", "sys_pacct", "wake_alarm",
                                          "block_suspend", "syslog"))
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Runs as PID 1 of the node's namespaces (as root), before anything else: build the node's root, pivot into it.
_SETUP = r"""
set -eu
umask 022
hostname "$NODE_NAME"
R="$M/rootfs"
mkdir -p "$R"
chmod 755 "$R"
mount --bind "$R" "$R"
for d in $OVERLAID; do
  [ -d "/$d" ] || continue
  mkdir -p "$M/upper/$d" "$M/work/$d" "$R/$d"
  chmod --reference="/$d" "$M/upper/$d"; chown --reference="/$d" "$M/upper/$d"  # the top's mode is the upper's
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$M/upper/$d,workdir=$M/work/$d" "$R/$d"
done
for l in bin lib lib32 lib64 libx32 sbin; do
  if [ -L "/$l" ] && [ ! -e "$R/$l" ]; then ln -s "$(readlink "/$l")" "$R/$l"; fi
done
mkdir -p "$R/home/$NODE_USER" "$R/root" "$R/tmp" "$R/run" "$R/dev" "$R/proc" "$R/sys" "$R/mnt" "$R/media"
chmod 755 "$R/home" "$R/mnt" "$R/media"
chmod 700 "$R/root"
mount --bind "$NODE_HOME" "$R/home/$NODE_USER"
chmod 1777 "$R/tmp"
find "$R/tmp" -mindepth 1 -delete
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=755,nosuid tmpfs "$R/dev"
for n in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9" "tty 5 0"; do
  set -- $n; mknod -m 666 "$R/dev/$1" c "$2" "$3"
done
mkdir -p "$R/dev/pts" "$R/dev/shm" "$R/dev/disk/by-id"
mount --bind /dev/pts "$R/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"; ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"; ln -s /proc/self/fd/2 "$R/dev/stderr"; ln -s pts/ptmx "$R/dev/ptmx"
mount -t proc proc "$R/proc"
# The kernel's settings are the host's: read-only in the node, as in a container.
mount --bind "$R/proc/sys" "$R/proc/sys"; mount -o remount,bind,ro "$R/proc/sys"
T="$R/proc/sysrq-trigger"
{ mount --bind "$T" "$T" && mount -o remount,bind,ro "$T"; } || true
mount --rbind /sys "$R/sys"; mount -o remount,bind,ro "$R/sys"
cd "$R"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
echo "$NODE_NAME" > /etc/hostname
grep -q "[[:space:]]$NODE_NAME\$" /etc/hosts 2>/dev/null || echo "127.0.1.1 $NODE_NAME" >> /etc/hosts
if ! grep -q "^$NODE_USER:" /etc/passwd; then
  echo "$NODE_USER:x:$NODE_UID:$NODE_GID::/home/$NODE_USER:/bin/bash" >> /etc/passwd
  echo "$NODE_USER:x:$NODE_GID:" >> /etc/group
  if [ -f /etc/shadow ]; then echo "$NODE_USER:*:20000:0:99999:7:::" >> /etc/shadow; fi
fi
mkdir -p /etc/sudoers.d
echo "$NODE_USER ALL=(ALL) NOPASSWD:ALL" > "/etc/sudoers.d/90-labctl-$NODE_USER"
chmod 440 "/etc/sudoers.d/90-labctl-$NODE_USER"
chown -R "$NODE_UID:$NODE_GID" "/home/$NODE_USER"
chmod 755 "/home/$NODE_USER"
echo ready
exec /usr/bin/python3 -I -c "$REAPER" </dev/null >/dev/null 2>&1
"""

# PID 1 of the node: reap orphans (a node's background jobs outlive their parents, as on a real machine).
_REAPER = r"""
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
    signal.sigtimedwait({signal.SIGCHLD}, 60)
"""


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
    if not os.access("/usr/bin/python3", os.X_OK):
        return "no /usr/bin/python3"
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
    info = _read_json(Path(node_dir) / MACHINE_DIR / "holder.json")
    return int(info["pid"]) if info and _alive(int(info.get("pid", 0)), info.get("start")) else None


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a recycled pid apart), None if it has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # a zombie (our own child, not reaped yet) is gone too
        return None
    return fields[19]


def _alive(pid: int, start: str | None) -> bool:
    return pid > 0 and start is not None and _start_time(pid) == start


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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


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
            info = _read_json(mdir / "holder.json")
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
        info = _read_json(mdir / "holder.json")
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
            deadline = time.monotonic() + 15
            while _alive(supervisor, info.get("supervisor_start")) and time.monotonic() < deadline:
                time.sleep(0.02)
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
        old = _read_json(mdir / "holder.json")
        uid = int(old.get("uid") or free_id("/etc/passwd"))
        gid = int(old.get("gid") or free_id("/etc/group"))
        args = [sys.executable, "-m", "labctl.testbed.node_machine", "hold", str(mdir), name, user,
                str(home), str(uid), str(gid)]
        errlog = os.open(mdir / "holder.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errlog,
                                     start_new_session=True, env={"PATH": PATH, "PYTHONPATH": _import_root()})
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
        info = _read_json(mdir / "holder.json")
        if not info:
            raise MachineError(f"node {name}: the holder gave no pid")
        return info

    @staticmethod
    def _attach_volumes(mdir: Path, machine: Machine, volumes: list[dict]) -> None:
        """Each attached volume: its file on a loop device, shown in the node as its device (once per holder)."""
        loops_path = mdir / "loops.json"
        loops = _read_json(loops_path)
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
            _write_json(loops_path, loops)  # recorded first: the supervisor detaches what is listed
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


def _first_line(stream: Any, timeout: float) -> str:
    """The first line `stream` gives within `timeout` seconds ("" if none). A poll, not select(): an emulator
    serving hundreds of nodes holds descriptors above select's limit (FD_SETSIZE, 1024)."""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return stream.readline().decode(errors="replace").strip()


def _import_root() -> str:
    """The directory labctl is imported from (the supervisor gets no other environment from its caller)."""
    return str(Path(__file__).resolve().parents[2])


# -- the supervisor ---------------------------------------------------------------------------------------
def hold(mdir: Path, name: str, user: str, home: str, uid: int, gid: int) -> int:
    """Start the node's namespaces, say `ready`, and end them when no process uses the node (or on SIGTERM)."""
    users = os.open(mdir / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    env = {"PATH": PATH, "M": str(mdir), "NODE_NAME": name, "NODE_USER": user, "NODE_HOME": home,
           "NODE_UID": str(uid), "NODE_GID": str(gid), "OVERLAID": " ".join(OVERLAID), "REAPER": _REAPER}
    ns = subprocess.Popen(["unshare", "-m", "-u", "-p", "-f", "--propagation", "private", "--", "/bin/sh", "-c",
                           _SETUP], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert ns.stdout is not None
    if _first_line(ns.stdout, START_TIMEOUT) != "ready":
        ns.kill()
        ns.wait()
        print("namespaces did not start", file=sys.stderr, flush=True)
        return 1
    pid1 = _first_child(ns.pid)
    _write_json(mdir / "holder.json", {"pid": pid1, "start": _start_time(pid1), "uid": uid, "gid": gid,
                                       "supervisor": os.getpid(), "supervisor_start": _start_time(os.getpid())})
    print("ready", flush=True)
    os.close(1)
    try:
        while ns.poll() is None and not stopping.wait(0.1):
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break  # no process uses the node any more
            except BlockingIOError:
                pass
    finally:
        _end(mdir, ns, pid1)
    return 0


def _first_child(pid: int) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if children:
                return int(children[0])
        time.sleep(0.01)
    raise MachineError("unshare started no child")


def _end(mdir: Path, ns: subprocess.Popen, pid1: int) -> None:
    """SIGKILL PID 1 of the node (the kernel ends every process of its PID namespace, and the mount namespace
    with its mounts), then detach its loop devices."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid1, signal.SIGKILL)
    with contextlib.suppress(Exception):
        ns.wait(10)
    with contextlib.suppress(ProcessLookupError):
        ns.kill()
    loops = _read_json(mdir / "loops.json")
    for loop in loops.values():
        subprocess.run(["losetup", "-d", str(loop)], capture_output=True, env={"PATH": PATH})
    for name in ("loops.json", "holder.json"):
        with contextlib.suppress(FileNotFoundError):
            (mdir / name).unlink()


def main(argv: list[str]) -> int:
    if len(argv) == 7 and argv[0] == "hold":
        _, mdir, name, user, home, uid, gid = argv
        return hold(Path(mdir), name, user, home, int(uid), int(gid))
    print("usage: python -m labctl.testbed.node_machine hold MACHINE_DIR NAME USER HOME UID GID", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
