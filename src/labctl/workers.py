"""An executor whose threads end when no task waits: class mode's pool of environment threads.

A `ThreadPoolExecutor`'s workers live until it shuts down. In a class each runs one student's environment, and an
idle one keeps the stack its deepest call touched (and its Python frame chunk): at 500 students, hundreds of
finished environments' threads held memory through the SSH phase, where the peak is.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class ShortLivedWorkers(Executor):
    """At most `max_workers` threads run the submitted calls in order; a thread ends as soon as none waits (its
    stack goes back to the system), and the next submit starts one again."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "worker") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers, self.prefix = max_workers, thread_name_prefix
        self._lock = threading.Lock()
        self._tasks: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = deque()
        self._threads: set[threading.Thread] = set()
        self._numbers = itertools.count()
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._tasks.append((future, fn, args, kwargs))
            if len(self._threads) < self.max_workers:
                thread = threading.Thread(target=self._work, name=f"{self.prefix}_{next(self._numbers)}")
                self._threads.add(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._tasks:
                    self._threads.discard(threading.current_thread())
                    return
                future, fn, args, kwargs = self._tasks.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - the caller sees it through the future, as with any executor
                future.set_exception(exc)
            else:
                future.set_result(result)

    def running_threads(self) -> int:
        with self._lock:
            return len(self._threads)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                while self._tasks:
                    self._tasks.popleft()[0].cancel()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()
