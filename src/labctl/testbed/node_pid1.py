"""The supervisor of an emulated node machine and the node's PID 1 (see `labctl.testbed.node_machine`).

Standard library only, and imports nothing of labctl: the supervisor runs in a bare interpreter (`python -I -S`),
so a node's start costs little more than that. The supervisor opens a PID namespace for its next child and forks:
that child is the node's PID 1. PID 1 takes a mount and a UTS namespace of its own, builds the node's root with
system calls (mkdir, chmod, chown, symlink, mknod, mount(2) through ctypes), pivots into it and then reaps orphans
for the node's lifetime; it dies with the supervisor. The supervisor records PID 1 in holder.json, says `ready`,
and sleeps (no timer, no polling) until no process holds users.lock, or SIGTERM, or PID 1 ends; then it kills
PID 1 (every process of the node dies with it, and the node's mounts with its mount namespace) and detaches the
node's loop devices.
"""

from __future__ import annotations

import _thread
import fcntl
import os
import select
import stat
import sys
import time

try:  # signal's C core: the `signal` module adds enums, and importing enum costs ~4 ms per node
    import _signal as signal
except ImportError:  # pragma: no cover - not CPython
    import signal  # type: ignore[no-redef]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OVERLAID = ("etc", "usr", "var", "opt", "srv")  # the host's trees a node sees through an overlay of its own
ROOT_LINKS = ("bin", "lib", "lib32", "lib64", "libx32", "sbin")  # merged-/usr links, copied when the host has them
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"))
START_TIMEOUT = 30.0

# <linux/mount.h>, <sched.h>, <linux/loop.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME = 1024, 2048
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWPID = 0x00020000, 0x04000000, 0x20000000
LOOP_CLR_FD = 0x4C01
# pivot_root(2) has no libc wrapper; its number per architecture (others run the pivot_root command).
PIVOT_ROOT_NR = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41, "ppc64le": 203, "ppc64": 203,
                 "s390x": 217, "i686": 217, "i386": 217, "armv7l": 218}


# -- small helpers (also used by node_machine in labctl's own process) ------------------------------------
def start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a recycled pid apart), None if it has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # a zombie (our own child, not reaped yet) is gone too
        return None
    return fields[19]


def read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return {}
    import json  # here, not at the top: json pulls in re and enum (~10 ms of every node's start)

    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Replace `path` with `data` as JSON, atomically, 0600."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_dumps(data))
    os.replace(tmp, path)


def _dumps(data: dict) -> str:
    """JSON of `data`; holder.json (numbers, and start times made of digits) without importing json."""
    if all(isinstance(k, str) and k.isidentifier() and (type(v) is int or (isinstance(v, str) and v.isdigit()))
           for k, v in data.items()):
        return "{" + ", ".join(f'"{k}": ' + (str(v) if type(v) is int else f'"{v}"') for k, v in data.items()) + "}"
    import json

    return json.dumps(data)


# -- system calls without a Python wrapper ------------------------------------------------------------------
_libc: Any = None


def _c() -> Any:
    """libc through ctypes, loaded on first use (labctl's process imports this module for the helpers above)."""
    global _libc
    if _libc is None:
        import ctypes

        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.unshare.argtypes = [ctypes.c_int]
        lib.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _libc = lib
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    _check(_c().mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def remount_read_only(target: str) -> None:
    """`mount -o remount,bind,ro`: the bind mount at `target` becomes read-only, keeping its other flags."""
    kept = os.statvfs(target).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)


def unshare(flags: int) -> None:
    _check(_c().unshare(flags), "unshare")


def die_with_parent() -> None:
    """This process gets SIGKILL when its parent ends, even by SIGKILL (prctl PR_SET_PDEATHSIG)."""
    _check(_c().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")


def setns(fd: int, nstype: int) -> None:
    _check(_c().setns(fd, nstype), "setns")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_c().sethostname(raw, len(raw)), "sethostname")


def pivot_root(new_root: str, put_old: str) -> None:
    number = PIVOT_ROOT_NR.get(os.uname().machine)
    if number is not None:
        import ctypes

        _check(_c().syscall(ctypes.c_long(number), _b(new_root), _b(put_old)), "pivot_root")
        return
    tool = next((f"{d}/pivot_root" for d in PATH.split(":") if os.access(f"{d}/pivot_root", os.X_OK)), None)
    if tool is None:
        raise OSError(f"pivot_root: no system call number for {os.uname().machine} and no pivot_root command")
    pid = os.posix_spawn(tool, [tool, new_root, put_old], {"PATH": PATH})
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        raise OSError("pivot_root failed")


def umount_lazy(target: str) -> None:
    _check(_c().umount2(_b(target), MNT_DETACH), f"umount {target}")


# -- PID 1: the node's root --------------------------------------------------------------------------------
class Node:
    """What the supervisor is asked to start: machine dir, hostname, user (uid, gid) and the home it binds."""

    def __init__(self, mdir: str, name: str, user: str, home: str, uid: int, gid: int) -> None:
        self.mdir, self.name, self.user, self.home, self.uid, self.gid = mdir, name, user, home, uid, gid
        self.rootfs = f"{mdir}/rootfs"


def build_root(node: Node) -> None:
    """The node's tree under machine/rootfs, mounted in this process's (new, private) mount namespace."""
    r = node.rootfs
    os.makedirs(r, exist_ok=True)
    os.chmod(r, 0o755)
    mount(r, r, None, MS_BIND)  # pivot_root needs a mount point
    for d in OVERLAID:
        if not os.path.isdir(f"/{d}"):
            continue
        upper, work = f"{node.mdir}/upper/{d}", f"{node.mdir}/work/{d}"
        for path in (upper, work):
            os.makedirs(path, exist_ok=True)
        real_dir(f"{r}/{d}")
        lower = os.stat(f"/{d}")
        os.chmod(upper, stat.S_IMODE(lower.st_mode))  # the top of an overlay has its upper dir's mode and owner
        os.chown(upper, lower.st_uid, lower.st_gid)
        mount("overlay", f"{r}/{d}", "overlay", 0, f"lowerdir=/{d},upperdir={upper},workdir={work}")
    for link in ROOT_LINKS:
        if os.path.islink(f"/{link}") and not os.path.lexists(f"{r}/{link}"):
            os.symlink(os.readlink(f"/{link}"), f"{r}/{link}")
    for d in ("home", f"home/{node.user}", "root", "tmp", "run", "dev", "proc", "sys", "mnt", "media"):
        real_dir(f"{r}/{d}")
    for d in ("home", "mnt", "media"):
        os.chmod(f"{r}/{d}", 0o755)
    os.chmod(f"{r}/root", 0o700)
    mount(node.home, f"{r}/home/{node.user}", None, MS_BIND)
    os.chmod(f"{r}/tmp", 0o1777)
    empty_dir(f"{r}/tmp")  # /tmp does not outlive the machine
    mount("tmpfs", f"{r}/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    _build_dev(f"{r}/dev")
    mount("proc", f"{r}/proc", "proc")
    # The kernel's settings are the host's: read-only in the node, as in a container.
    mount(f"{r}/proc/sys", f"{r}/proc/sys", None, MS_BIND)
    remount_read_only(f"{r}/proc/sys")
    trigger = f"{r}/proc/sysrq-trigger"
    try:
        mount(trigger, trigger, None, MS_BIND)
        remount_read_only(trigger)
    except OSError:
        pass  # not every kernel has it
    mount("/sys", f"{r}/sys", None, MS_BIND | MS_REC)
    remount_read_only(f"{r}/sys")


def real_dir(path: str) -> None:
    """`path` (in the node's rootfs) as a directory of its own. The node's root may have left a symlink (or a
    file) there: it is removed, so that nothing done to `path` before pivot_root (chmod, emptying /tmp) follows
    it into the host's tree. No process of the node runs while its root is built: nothing can swap it back."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path)
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        os.mkdir(path)


def _build_dev(dev: str) -> None:
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755")
    for name, major, minor in DEVICES:
        os.mknod(f"{dev}/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(f"{dev}/{name}", 0o666)  # past the umask
    for d in ("pts", "shm", "disk/by-id"):
        os.makedirs(f"{dev}/{d}", exist_ok=True)
    mount("/dev/pts", f"{dev}/pts", None, MS_BIND)
    mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for name, target in DEV_LINKS:
        os.symlink(target, f"{dev}/{name}")


def enter_root(rootfs: str) -> None:
    """pivot_root into `rootfs`; the host's tree is unmounted (lazily) from the node."""
    os.chdir(rootfs)
    real_dir(".oldroot")
    pivot_root(".", ".oldroot")
    os.chdir("/")
    umount_lazy("/.oldroot")
    os.rmdir("/.oldroot")


def configure_system(node: Node) -> None:
    """In the node's root: hostname file, hosts line, the user's passwd/group/shadow lines, sudo, and its home."""
    with open("/etc/hostname", "w") as f:
        f.write(f"{node.name}\n")
    if not _names_host(_read_text("/etc/hosts"), node.name):
        _append("/etc/hosts", f"127.0.1.1 {node.name}\n")
    if not any(line.startswith(f"{node.user}:") for line in _read_text("/etc/passwd").splitlines()):
        _append("/etc/passwd", f"{node.user}:x:{node.uid}:{node.gid}::/home/{node.user}:/bin/bash\n")
        _append("/etc/group", f"{node.user}:x:{node.gid}:\n")
        if os.path.isfile("/etc/shadow"):
            _append("/etc/shadow", f"{node.user}:*:20000:0:99999:7:::\n")
    os.makedirs("/etc/sudoers.d", exist_ok=True)
    sudoers = f"/etc/sudoers.d/90-labctl-{node.user}"
    with open(sudoers, "w") as f:
        f.write(f"{node.user} ALL=(ALL) NOPASSWD:ALL\n")
    os.chmod(sudoers, 0o440)
    chown_tree(f"/home/{node.user}", node.uid, node.gid)
    os.chmod(f"/home/{node.user}", 0o755)


def _names_host(hosts: str, name: str) -> bool:
    """A line of /etc/hosts ends with `name` after a blank (`grep "[[:space:]]NAME$"`)."""
    return any(line.endswith(name) and len(line) > len(name) and line[-len(name) - 1].isspace()
               for line in hosts.splitlines())


def _read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _append(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line)


def _walk(top: str) -> list[tuple[str, bool]]:
    """(path, is a real directory) of `top` and everything under it, parents first; symlinks are not followed.
    Iterative: a tree deeper than Python's recursion limit is walked too."""
    found, todo = [], [top]
    while todo:
        path = todo.pop()
        found.append((path, True))
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
                else:
                    found.append((entry.path, False))
    return found


def empty_dir(top: str) -> None:
    """Delete everything under `top` (`find top -mindepth 1 -delete`)."""
    for path, is_dir in reversed(_walk(top)[1:]):
        if is_dir:
            os.rmdir(path)
        else:
            os.unlink(path)


def chown_tree(top: str, uid: int, gid: int) -> None:
    """`chown -R uid:gid top`: symlinks themselves, never what they point to."""
    for path, _ in _walk(top):
        os.chown(path, uid, gid, follow_symlinks=False)


def reap_forever() -> None:
    """PID 1's work once the node runs: reap orphans (a node's background jobs outlive their parents, as on a
    real machine)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        signal.sigtimedwait({signal.SIGCHLD}, 60)


def run_pid1(node: Node, ready_fd: int) -> None:
    """The node's PID 1 (a child of the supervisor in a new PID namespace): its namespaces, root, `ready`, reaper."""
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # A killed supervisor takes its node along (its lock and loop devices are then left for the next start). If it
    # died before this line, writing `ready` to its closed pipe fails and PID 1 ends all the same.
    die_with_parent()
    unshare(CLONE_NEWNS | CLONE_NEWUTS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing the node mounts reaches the host, and back
    os.umask(0o022)
    sethostname(node.name)
    build_root(node)
    enter_root(node.rootfs)
    configure_system(node)
    os.write(ready_fd, b"ready\n")
    for fd, how in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
        os.dup2(os.open("/dev/null", how), fd)
    os.closerange(3, 1 << 20)  # close_range(2): the supervisor's pipes and lock are not the node's
    reap_forever()


# -- the supervisor ---------------------------------------------------------------------------------------
class Supervisor:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.mdir = node.mdir
        self.pid1 = 0
        self.stopping = False

    def run(self) -> int:
        """Start the node, say `ready`, and end it when no process uses the node (or on SIGTERM)."""
        users = os.open(f"{self.mdir}/users.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if not self._start(users):
            print("namespaces did not start", file=sys.stderr, flush=True)
            return 1
        write_json(f"{self.mdir}/holder.json", {
            "pid": self.pid1, "start": start_time(self.pid1), "uid": self.node.uid, "gid": self.node.gid,
            "supervisor": os.getpid(), "supervisor_start": start_time(os.getpid())})
        print("ready", flush=True)
        os.close(1)
        try:
            self._wait_unused(users)
        finally:
            self._end()
        return 0

    def _start(self, users: int) -> bool:
        """Fork PID 1 into a new PID namespace; True once it says `ready`. This process stays in the host's
        namespaces."""
        read_end, write_end = os.pipe()
        own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        unshare(CLONE_NEWPID)  # for the next child only
        pid = os.fork()
        if pid == 0:
            try:
                for fd in (read_end, users, own_pid_ns):
                    os.close(fd)
                run_pid1(self.node, write_end)  # returns only by an exception
            except BaseException as exc:  # PID 1 says why in holder.log and ends: none of the parent's code runs here
                print(f"node {self.node.name}: {exc}", file=sys.stderr, flush=True)
            os._exit(1)
        setns(own_pid_ns, CLONE_NEWPID)  # back: this process makes a thread (not allowed across), not nodes
        os.close(own_pid_ns)
        self.pid1 = pid
        os.close(write_end)
        line = _read_line(read_end, START_TIMEOUT)
        os.close(read_end)
        if line != "ready":
            self._kill_pid1()
            return False
        return True

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.stopping = True  # SIGTERM while the node starts: it ends as soon as it has started

    def _pid1_ended(self) -> bool:
        try:
            return os.waitid(os.P_PID, self.pid1, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def _wait_unused(self, users: int) -> None:
        """Sleep until no other process holds users.lock (shared), SIGTERM comes, or PID 1 ends: no polling, no
        timer. A thread waits for the lock (flock cannot be polled) and signals this one, which waits for the
        three signals blocked, so none can slip in between a check and the wait. New users still get their shared
        lock while the thread waits: Linux does not queue flock() requests behind a waiting exclusive one."""
        # Blocked from here, they queue for sigwaitinfo (a SIGTERM caught before has run its handler by now).
        signal.pthread_sigmask(signal.SIG_BLOCK, WAIT_SIGNALS)
        if self.stopping or self._pid1_ended():
            return
        _thread.start_new_thread(_signal_when_locked, (users,))  # inherits the blocked signals
        while True:
            info = signal.sigwaitinfo(WAIT_SIGNALS)
            if info.si_signo == signal.SIGTERM:
                return
            if info.si_signo == signal.SIGCHLD and self._pid1_ended():
                return
            if info.si_signo == signal.SIGUSR1 and info.si_pid == os.getpid():
                return  # the lock is ours: no process uses the node any more

    def _kill_pid1(self, timeout: float = 10.0) -> None:
        """SIGKILL PID 1: the kernel ends every process of its PID namespace, then PID 1's mount namespace with
        its mounts."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # queued from here: no wake-up is lost
        try:
            os.kill(self.pid1, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                if os.waitpid(self.pid1, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            signal.sigtimedwait({signal.SIGCHLD}, left)

    def _end(self) -> None:
        """End the node, detach its loop devices (`losetup -d`), forget it."""
        self._kill_pid1()
        for loop in read_json(f"{self.mdir}/loops.json").values():
            try:
                fd = os.open(str(loop), os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.ioctl(fd, LOOP_CLR_FD, 0)
            except OSError:
                pass
            finally:
                os.close(fd)
        for name in ("loops.json", "holder.json"):
            try:
                os.unlink(f"{self.mdir}/{name}")
            except FileNotFoundError:
                continue


WAIT_SIGNALS = {signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1}


def _signal_when_locked(users: int) -> None:
    """The waiting thread: take users.lock exclusively (when no one else holds it), then wake the supervisor.
    If the lock cannot be waited for, the node ends rather than outliving its users unwatched."""
    try:
        fcntl.flock(users, fcntl.LOCK_EX)
    finally:
        os.kill(os.getpid(), signal.SIGUSR1)


def _read_line(fd: int, timeout: float) -> str:
    """The first line on `fd` within `timeout` seconds ("" if none, or at end of file)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            break
        chunk = os.read(fd, 256)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace").strip()


USAGE = "usage: python -I -S node_pid1.py hold MACHINE_DIR NAME USER HOME UID GID"


def main(argv: list[str]) -> int:
    if len(argv) == 7 and argv[0] == "hold":
        _, mdir, name, user, home, uid, gid = argv
        return Supervisor(Node(mdir, name, user, home, int(uid), int(gid))).run()
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
