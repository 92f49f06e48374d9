"""Helpers for the two-process tests: start `lock_worker.py` and talk to it line by line."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path

HERE = Path(__file__).parent
WORKER = HERE / "lock_worker.py"
GUARD_DIR = HERE.parent / "loopback_guard"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- two real processes ------------------------------------------------------------------------------
def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(GUARD_DIR), env.get("PYTHONPATH", "")] if p)
    return env


def start_worker(url: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), url, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env())


@contextlib.contextmanager
def worker(url: str, *args: str) -> Iterator[subprocess.Popen]:
    """A running lock_worker.py; killed if still alive at the end, its pipes closed."""
    proc = start_worker(url, *args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(Exception):
                stream.close()


def read_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The worker's next line of output; kills it and fails if none comes within `timeout` seconds."""
    assert proc.stdout is not None
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(proc.stdout.readline)
        try:
            return future.result(timeout=timeout).strip()
        except FuturesTimeout:
            with contextlib.suppress(Exception):
                proc.kill()
            raise AssertionError(f"worker {proc.args} said nothing for {timeout} s") from None


def expect_line(proc: subprocess.Popen, expected: str, timeout: float = 60) -> None:
    """Wait for the worker to print `expected` (its handshake)."""
    line = read_line(proc, timeout)
    if line != expected:
        with contextlib.suppress(Exception):
            proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"worker said {line!r}, expected {expected!r}; stderr: {err}")
