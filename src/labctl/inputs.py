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
from pathlib import Path

from labctl.errors import UserError

__all__ = ["MAX_PRICES_BYTES", "MAX_PROFILE_BYTES", "MAX_ROSTER_BYTES", "read_regular_file"]

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
