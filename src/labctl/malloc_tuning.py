"""glibc malloc settings for a process that runs hundreds of threads at once (class mode).

glibc gives each new thread an arena of its own, up to 8 per core, and after the first large free it raises the
size from which allocations are mmapped, so the large, short-lived bodies of list polls land in arena heaps it
seldom hands back. With hundreds of threads, that fragmentation, not live data, set labctl's peak memory: for 500
students, two arenas and a fixed 128 KiB mmap threshold measured 169 MiB of peak RSS against 188-192 MiB
(benchmarks/README.md). These are `MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=131072`, set from inside; a
user's own MALLOC_* settings are left alone.
"""

from __future__ import annotations

import functools
import os
import sys

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # <malloc.h>
ARENAS = 2
MMAP_THRESHOLD = 128 * 1024


@functools.cache
def tune_for_threads() -> bool:
    """Apply the settings once, before the threads start. False where the C library is not glibc, or where the
    user set malloc's environment variables (theirs win)."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, ARENAS)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
