"""The event loops `run_sync` makes share one small pool for blocking work (asyncssh builds each connection's
options in the loop's default executor): many setups at once do not start a thread each."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from labctl.runner.reach import BLOCKING_WORKERS, run_sync


def test_many_loops_share_a_bounded_pool_that_outlives_each_loop():
    workers: set[int] = set()
    lock = threading.Lock()

    def blocking() -> int:
        time.sleep(0.02)
        with lock:
            workers.add(threading.get_ident())
        return 1

    async def setup() -> int:
        loop = asyncio.get_running_loop()
        return sum(await asyncio.gather(*(loop.run_in_executor(None, blocking) for _ in range(3))))

    with ThreadPoolExecutor(24) as callers:  # 24 environments' threads, each with a loop of its own
        results = list(callers.map(lambda _: run_sync(setup), range(24)))
    assert results == [3] * 24
    assert 1 <= len(workers) <= BLOCKING_WORKERS  # a pool per loop would have used one thread or more per loop
    assert run_sync(setup) == 3  # the loops' shutdowns left the pool working


def test_run_sync_from_inside_a_running_loop_uses_the_same_pool():
    async def outer() -> str:
        async def inner() -> str:
            return await asyncio.get_running_loop().run_in_executor(None, lambda: threading.current_thread().name)

        return run_sync(inner)

    assert asyncio.run(outer()).startswith("labctl-ssh-io")


def test_closing_a_loop_starts_no_thread(monkeypatch):
    """asyncio's own shutdown starts a thread per loop to shut its default executor down; the shared pool outlives
    every loop, so closing one must not (a thread per node's setup in a class)."""
    async def setup() -> int:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: 1)

    assert run_sync(setup) == 1  # the pool's threads exist now
    started: list[str] = []
    start = threading.Thread.start

    def counted(self: threading.Thread) -> None:
        started.append(self.name)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", counted)
    assert [run_sync(setup) for _ in range(5)] == [1] * 5
    assert started == []
