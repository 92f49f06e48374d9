"""Reading the files a user hands labctl (profiles, rosters, price tables), safely.

`read_regular_file(path, max_bytes, what)` is the one place that opens such a file: only a regular file is read
(not a directory, FIFO, socket or device such as /dev/zero), never more than `max_bytes`, and the check is made
on the opened descriptor (`O_NONBLOCK` + `fstat`), so a FIFO never blocks and a file swapped between a check
and the read is still caught. Every problem is one line naming the file: a `UserError` (or the `error` class
given, e.g. `ProfileError`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from labctl.errors import UserError

__all__ = [
    "MAX_PRICES_BYTES",
    "MAX_PROFILE_BYTES",
    "MAX_ROSTER_BYTES",
    "open_confined",
    "read_regular_file",
    "under",
    "walk_confined",
]

MIB = 1024 * 1024
#: Documented size limits of user input files.
MAX_PROFILE_BYTES = 1 * MIB
MAX_ROSTER_BYTES = 10 * MIB
MAX_PRICES_BYTES = 10 * MIB

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n:,} bytes"


def read_regular_file(
    path: Path | str,
    max_bytes: int,
    what: str,
    *,
    shown: str | None = None,
    error: type[UserError] = UserError,
) -> bytes:
    """The bytes of the regular file `path`, at most `max_bytes` of them, or `error` (one line naming the file).

    `what` names the file in messages: "YAML file", "roster file", "price file".
    """
    shown = shown if shown is not None else str(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(os.fspath(path), flags)
    except FileNotFoundError:
        raise error(f"{shown}: no such file ({what} not found)") from None
    except NotADirectoryError:
        raise error(f"{shown}: no such file ({what} not found: a part of the path is not a directory)") from None
    except PermissionError:
        raise error(f"{shown}: permission denied reading the {what}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise error(f"{shown}: cannot open the {what} ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        info = os.fstat(fd)
        for test, kind in _KINDS:
            if test(info.st_mode):
                raise error(f"{shown}: is {kind}, not a {what}")
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{shown}: not a regular file (a {what} must be one)")
        if info.st_size > max_bytes:
            raise error(f"{shown}: {info.st_size:,} bytes is too large for a {what} (limit {_size(max_bytes)})")
        chunks: list[bytes] = []
        total = 0
        while total <= max_bytes:  # the file may grow after fstat: read at most max_bytes + 1
            chunk = os.read(fd, min(1 * MIB, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise error(f"{shown}: more than {_size(max_bytes)} is too large for a {what}")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{shown}: cannot read the {what} ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ files confined to directories


def under(path: Path, roots: Iterable[Path]) -> bool:
    """Whether the (resolved) `path` is one of the (resolved) `roots` or inside one."""
    return any(path == r or path.is_relative_to(r) for r in roots)


def walk_confined(directory: Path, roots: Iterable[Path], limit: int = 10_000) -> Iterator[tuple[str, Path]]:
    """(relative path, resolved file) for every regular file under `directory`, following symbolic links only
    when they stay under `roots`; raises `ValueError` for a link that leads elsewhere, a file that is not a
    regular file (FIFO, device, socket), a directory cycle or more than `limit` entries."""
    roots = tuple(roots)
    count = 0
    stack: list[tuple[str, Path, frozenset[Path]]] = [("", directory, frozenset())]
    while stack:
        prefix, here, above = stack.pop()
        if here in above:
            raise ValueError(f"{prefix.rstrip('/')} in {directory}: a directory that contains itself through a "
                             "symbolic link")
        above = above | {here}
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError as exc:
            raise ValueError(f"{here}: cannot list it ({exc.strerror or exc})") from None
        for entry in entries:
            count += 1
            if count > limit:
                raise ValueError(f"{directory}: more than {limit:,} files to upload")
            rel = f"{prefix}{entry.name}"
            try:
                target = Path(entry.path).resolve(strict=True)
            except (OSError, RuntimeError) as exc:
                raise ValueError(f"{rel} in {directory}: cannot resolve it "
                                 f"({getattr(exc, 'strerror', None) or exc})") from None
            if not under(target, roots):
                raise ValueError(f"{rel} in {directory} leads outside the lab directory (to {target}) through a "
                                 "symbolic link")
            if target.is_dir():
                stack.append((rel + "/", target, above))
            elif target.is_file():
                yield rel, target
            else:
                raise ValueError(f"{rel} in {directory} is not a regular file")


def open_confined(path: Path | str, roots: Iterable[Path]) -> int:
    """A read-only descriptor of the regular file `path`, whose real location (every symbolic link resolved,
    checked again on the opened descriptor where /proc tells it) lies under `roots`. Raises `FileNotFoundError`,
    or `ValueError` saying why the file is refused."""
    roots = tuple(roots)
    target = Path(os.path.abspath(path)).resolve(strict=True)
    if not under(target, roots):
        raise ValueError(f"{path} leads outside the lab directory (to {target}) through a symbolic link")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(target, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        proc = f"/proc/self/fd/{fd}"
        if os.path.exists(proc):  # the file actually opened, whatever was swapped since resolve()
            real = Path(os.readlink(proc))
            if not under(real, roots):
                raise ValueError(f"{path} leads outside the lab directory (to {real})")
    except BaseException:
        os.close(fd)
        raise
    return fd
