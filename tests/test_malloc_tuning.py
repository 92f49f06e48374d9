"""Class mode's glibc malloc settings, observed through glibc itself in a fresh interpreter."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
    reason="glibc only")

# 12 threads alive at once, each mallocs (a 4 KiB bytearray: above pymalloc's 512 bytes, so glibc's malloc);
# malloc_stats() then prints one "Arena N:" block per arena. Then: free 1 MiB (glibc's dynamic threshold rises
# to it) and allocate 256 KiB; mallinfo2().hblks counts mmapped chunks.
PROBE = r"""
import ctypes, threading
from labctl.malloc_tuning import tune_for_threads
print("tuned" if tune_for_threads() else "untuned", flush=True)
libc = ctypes.CDLL(None)
barrier, keep = threading.Barrier(12), []
def work():
    barrier.wait()
    keep.append(bytearray(4096))
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(12)]
for t in threads: t.start()
for t in threads: t.join()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
big = bytearray(1 << 20); del big
before = libc.mallinfo2().hblks
mid = bytearray(256 << 10)
print("mmapped", libc.mallinfo2().hblks - before, flush=True)
libc.malloc_stats()
"""


def probe(env_extra: dict[str, str]) -> tuple[list[str], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env_extra
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60,
                          check=True)
    arenas = sum(line.startswith("Arena ") for line in done.stderr.splitlines())
    return done.stdout.split(), arenas


def test_tuning_caps_arenas_and_mmaps_large_blocks():
    out, arenas = probe({})
    assert out == ["tuned", "mmapped", "1"]
    assert arenas == 2


def test_without_tuning_glibc_spreads_threads_over_arenas():
    """The control: the probe tells the settings apart (glibc's defaults give threads arenas of their own)."""
    out, arenas = probe({"MALLOC_PERTURB_": "0"})  # a no-op MALLOC_* variable: the user's settings win
    assert out == ["untuned", "mmapped", "0"]
    assert arenas > 2
