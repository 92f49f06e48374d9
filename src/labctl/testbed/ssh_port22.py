"""SSH on port 22 of the emulated floating IPs, as on the real cloud (python-chi's `check_connectivity()` and
`execute()`, a plain `ssh cc@<floating ip>`), when this process may bind it: as root, or where
`net.ipv4.ip_unprivileged_port_start` is 22 or less.

Floating IPs are loopback addresses that every world numbers alike (127.10.<site>.<n>; 127.14-18.<site>.<n> where
a world's public network has more subnets), so two worlds on one host would answer on the same address and port.
One world at a time has port 22: the one whose serving process holds an exclusive flock on a host-wide lock file
(`claim`); the others, and a host that may not bind port 22, keep the per-world port (printed by `labctl testbed
serve`), as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("labctl.testbed.sshd")

PORT = 22
UNPRIVILEGED_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


def may_bind() -> bool:
    """Whether this process may bind port 22 (a low port)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return True
    try:
        return int(UNPRIVILEGED_START.read_text().strip()) <= PORT
    except (OSError, ValueError):
        return False


def lock_path() -> Path:
    """The host-wide lock (per user: another user's worlds cannot bind the same addresses anyway)."""
    base = Path("/run/lock") if os.access("/run/lock", os.W_OK) else Path("/tmp")
    return base / f"labctl-testbed-ssh22-{os.getuid()}.lock"


class Claim:
    """Port 22 for one world's floating IPs, held until `release()` (or the process ends). The world's other
    clouds in the same process (Compute Engine and EC2 worlds live under the Chameleon world's directory, on
    address ranges of their own) `join` it."""

    def __init__(self, fd: int, owner: str) -> None:
        self.fd, self.owner, self.users = fd, owner, 1

    def release(self) -> None:
        with _lock:
            self.users -= 1
            if self.users > 0 or self.fd < 0:
                return
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1
            if _held and _held[0] is self:
                _held.clear()


_lock = threading.Lock()
_held: list[Claim] = []  # the claim this process holds, if any


def join(world_dir: os.PathLike | str | None) -> Claim | None:
    """This process's claim, if it is for the world `world_dir` belongs to (it lies under the owner's directory)."""
    if world_dir is None:
        return None
    with _lock:
        held = _held[0] if _held else None
        if held is None or held.fd < 0:
            return None
        owner, mine = Path(held.owner), Path(world_dir)
        if mine != owner and owner not in mine.parents:
            return None
        held.users += 1
        return held


def claim(owner: str) -> Claim | None:
    """Port 22 for the world at `owner` (its directory), or None (with the reason logged) when this process may
    not bind it or another world has it."""
    if not may_bind():
        log.info("SSH stays on the per-world port: this process may not bind port 22 "
                 "(not root, and net.ipv4.ip_unprivileged_port_start > 22)")
        return None
    path = lock_path()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        log.warning("SSH stays on the per-world port: another emulated world (%s) answers on port 22",
                    holder() or "unknown")
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode(), 0)
    held = Claim(fd, owner)
    with _lock:
        _held[:] = [held]
    return held


def holder() -> str | None:
    """The directory of the world whose floating IPs answer on port 22 right now, if any."""
    path = lock_path()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # no one holds it
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode(errors="replace") or None
    finally:
        os.close(fd)


def held_by(state_dir: os.PathLike | str) -> bool:
    """Whether the world at `state_dir` has port 22."""
    owner = holder()
    return owner is not None and Path(owner).resolve() == Path(state_dir).resolve()
