"""`ShortLivedWorkers`: class mode's executor runs every call, at most `max_workers` at once, and its threads end
when nothing waits (a ThreadPoolExecutor's idle workers keep their stacks until shutdown)."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labctl.workers import ShortLivedWorkers


def wait_until(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@settings(max_examples=25, deadline=None)
@given(workers=st.integers(1, 6), tasks=st.integers(0, 30))
def test_every_call_runs_at_most_max_workers_at_once_and_the_threads_end(workers, tasks):
    lock, running, peak = threading.Lock(), [0], [0]

    def task(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.001)
        with lock:
            running[0] -= 1
        return i * i

    pool = ShortLivedWorkers(workers, thread_name_prefix="t")
    futures = [pool.submit(task, i) for i in range(tasks)]
    assert [f.result(timeout=5) for f in futures] == [i * i for i in range(tasks)]
    assert peak[0] <= workers
    wait_until(lambda: pool.running_threads() == 0)  # no shutdown needed for the threads to go
    assert not [t for t in threading.enumerate() if t.name.startswith("t_") and t.is_alive()]
    pool.shutdown()


def test_a_new_submit_after_the_threads_ended_starts_one_again():
    pool = ShortLivedWorkers(2)
    assert pool.submit(lambda: 1).result(timeout=5) == 1
    wait_until(lambda: pool.running_threads() == 0)
    assert pool.submit(lambda: 2).result(timeout=5) == 2
    pool.shutdown()


def test_shutdown_cancels_what_waits_and_refuses_new_calls():
    pool = ShortLivedWorkers(1)
    started, gate = threading.Event(), threading.Event()

    def first_task() -> bool:
        started.set()
        return gate.wait(5)

    first = pool.submit(first_task)
    assert started.wait(5)  # running: shutdown cancels only what waits
    queued = [pool.submit(lambda: "never") for _ in range(3)]
    pool.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    gate.set()
    assert first.result(timeout=5) is True
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(lambda: None)


def test_a_raised_error_is_the_futures_exception():
    with ShortLivedWorkers(3) as pool:
        future = pool.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            future.result(timeout=5)
        assert list(pool.map(str, range(5))) == ["0", "1", "2", "3", "4"]


def test_max_workers_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        ShortLivedWorkers(0)
