"""One lock per SQLite database file per process, held around each write transaction.

SQLite lets one writer in at a time; a thread that finds the database locked sleeps in SQLite's busy handler,
in steps of up to 100 ms, and is not woken when the writer finishes. With dozens of threads writing (a class
of deployments, the emulator's request handlers) those sleeps became most of the wall time. Threads of one
process now queue on this lock instead (woken as soon as it is free); the busy handler only arbitrates
between processes.
"""

from __future__ import annotations

import os
import threading

_locks: dict[str, threading.RLock] = {}  # by the file's real path
_by_spelling: dict[str, threading.RLock] = {}  # by the path as callers give it (realpath costs a syscall per part)
_guard = threading.Lock()


def writer_lock(db_path: str | os.PathLike[str]) -> threading.RLock:
    """The lock for writes to the database at `db_path` (the same object for every caller in this process)."""
    spelled = os.fspath(db_path)
    lock = _by_spelling.get(spelled)
    if lock is None:
        key = os.path.realpath(spelled)
        with _guard:
            lock = _by_spelling[spelled] = _locks.setdefault(key, threading.RLock())
    return lock
