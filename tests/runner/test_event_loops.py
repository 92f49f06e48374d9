"""`run_sync` runs every caller's coroutine on the process's one SSH loop, whose blocking work goes to one small
pool (asyncssh builds each connection's options in the loop's default executor; the state store's calls go there
too): many setups at once do not start a thread or a loop each."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from labctl.runner.reach import BLOCKING_WORKERS, run_sync


def test_many_callers_share_one_loop_and_a_bounded_pool():
    workers: set[int] = set()
    loops: set[int] = set()
    lock = threading.Lock()

    def blocking() -> int:
        time.sleep(0.02)
        with lock:
            workers.add(threading.get_ident())
        return 1

    async def setup() -> int:
        loop = asyncio.get_running_loop()
        loops.add(id(loop))
        return sum(await asyncio.gather(*(loop.run_in_executor(None, blocking) for _ in range(3))))

    with ThreadPoolExecutor(24) as callers:  # 24 environments' threads
        results = list(callers.map(lambda _: run_sync(setup), range(24)))
    assert results == [3] * 24
    assert len(loops) == 1  # one loop for all of them, not a loop (and a thread) each
    assert 1 <= len(workers) <= BLOCKING_WORKERS  # a pool per loop would have used one thread or more per loop
    assert run_sync(setup) == 3


def test_run_sync_from_inside_a_running_loop_uses_the_same_pool():
    async def outer() -> str:
        async def inner() -> str:
            return await asyncio.get_running_loop().run_in_executor(None, lambda: threading.current_thread().name)

        return run_sync(inner)

    assert asyncio.run(outer()).startswith("labctl-ssh-io")


def test_a_call_starts_no_thread(monkeypatch):
    """Neither a loop's thread nor, at its end, the thread asyncio's own shutdown starts to shut a loop's default
    executor down (a thread or two per node's setup in a class)."""
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


def test_an_interrupted_caller_waits_for_its_coroutine_to_clean_up():
    """Ctrl-C while a setup runs on the SSH loop: the coroutine is cancelled and its own clean-up (closing
    connections, marking the step it was in) is done before the interrupt reaches the caller, as with asyncio.run."""
    cleaned: list[str] = []

    async def setup() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0.2)  # on the loop, after the cancel
            cleaned.append("closed")

    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sync(setup)
    finally:
        timer.cancel()
    assert cleaned == ["closed"]
