"""The provider kit: what every cloud adapter needs and implements the same way.

- `call`: one cloud call -- rate-limited, errors translated by the adapter's table (`translate`), throttling and
  transient faults retried with exponential backoff and jitter, "missing" turned into None on request, every
  labctl error scrubbed (`base.scrub`) before it leaves.
- `poll_until`: wait for one resource (terraform's StateChangeConf: pending / target / refresh / timeout /
  not-found checks). The one rule for "missing from a listing" lives here.
- `wait_each`: the `Provider.wait` every adapter shares, built on `poll_until` and the handlers' `status`.
- `first_with_capacity`: type and zone fallback. `retry_in_use`: a delete the cloud refuses while a dependency
  lets go. `Memo`: per-key memo (look-ups that do not change during a run). `Snapshot`: one list call per poll
  round shared by threads. `RateLimiter`: a client-side token bucket.
- `HandlerTable`: an adapter's per-kind handlers (find, create, delete, optional status and owned) in one
  table; the adapter's `find` / `create` / `delete` / `wait` / `list_owned` dispatch through it.

Nothing here imports a cloud SDK; tenacity is imported when a call is made.
"""

from __future__ import annotations

import contextlib
import contextvars
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from labctl.errors import CloudError, LabctlError, NoCapacity, RateLimited, Transient
from labctl.providers.base import Found, ProgressFn, scrub

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource

T = TypeVar("T")
C = TypeVar("C")

_UNSET: Any = object()


class NotFound(CloudError):
    """The thing asked for is not there (a 404 or a *.NotFound code). A translator may return it; `call` with
    `missing_ok=True` turns it into None."""


class Disappeared(CloudError):
    """A resource being waited for went missing from its listings (`poll_until`'s not-found rule)."""


class WaitTimedOut(Transient):
    """`poll_until` ran out of time; the resource was still pending (waiting longer or rerunning may succeed)."""


# -- rate limit and shared lists ---------------------------------------------------------------------------------
_RANK: contextvars.ContextVar[float] = contextvars.ContextVar("labctl_rank", default=0.0)
SHARED_RANK = -1e12  # a call many threads wait on (a poll round's list): served before anyone's own calls
AHEAD = 1e9  # what `ahead` takes off a rank: more than any class's roster position


@contextlib.contextmanager
def rank(position: float) -> Iterator[None]:
    """Calls made inside wait for the rate limit before those made under a higher `position` (a class: the
    environments started first are served first, so they finish first and their SSH and setup overlap the
    others' API calls). A context variable, not a thread-local: the engine carries its caller's context into
    the threads that make a level's resources."""
    token = _RANK.set(float(position))
    try:
        yield
    finally:
        _RANK.reset(token)


def current_rank() -> float:
    """The rank calls made here wait for the rate limit with (`rank`, `ahead`)."""
    return _RANK.get()


@contextlib.contextmanager
def ahead() -> Iterator[None]:
    """Calls made inside wait for the rate limit before every call made outside `ahead` except shared ones, in
    the order of their ranks: a class's creates that start a long wait at the cloud (a lease's start, a boot) go
    before the other students' key pairs and security groups, which nothing waits for that long."""
    with rank(current_rank() - AHEAD):
        yield


_QUEUED = threading.local()  # .seconds: how long this thread has waited for rate limits, in total


def _queued_seconds() -> float:
    return getattr(_QUEUED, "seconds", 0.0)


class CloudClock:
    """How long the calls made since it started took at the cloud: the wall time less what this thread waited
    for a rate limit (in a class that queue is seconds long, and a settling time of 3x that was 5 s)."""

    def __init__(self) -> None:
        self.started, self.queued = time.monotonic(), _queued_seconds()

    def elapsed(self) -> float:
        return max(0.0, time.monotonic() - self.started - (_queued_seconds() - self.queued))


BURST = 5  # calls a rate limiter lets through at once before its rate applies


class RateLimiter:
    """A client-side token bucket shared by the threads of one adapter: at most `rate` calls per second.

    Waiting callers queue by `rank` (then by arrival); only the first one sleeps until a token is due, and it
    wakes the next when it leaves: one wake-up per call, however many threads wait (polling sleepers woke every
    few milliseconds each, which cost more CPU the bigger the class)."""

    def __init__(self, rate: float | None, burst: int = BURST) -> None:
        self.rate = rate
        self.capacity = float(max(1, burst))
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self.lock = threading.Lock()
        self._queue: list[tuple[float, int, threading.Event]] = []
        self._arrivals = itertools.count()

    def acquire(self) -> None:
        if not self.rate:
            return
        arrived = time.monotonic()
        me = (current_rank(), next(self._arrivals), threading.Event())
        with self.lock:
            # Ahead of a head that sleeps for its token, we wait for it ourselves; it wakes when its timer runs out,
            # sees it is no longer first, and waits untimed for its turn.
            heapq.heappush(self._queue, me)
        while True:
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                head = self._queue[0] is me
                if head and self.tokens >= 1:
                    self.tokens -= 1
                    heapq.heappop(self._queue)
                    if self._queue:
                        self._queue[0][2].set()  # the next one's turn to wait for a token
                    _QUEUED.seconds = _queued_seconds() + now - arrived
                    return
                me[2].clear()
                delay = (1 - self.tokens) / self.rate if head else None
            me[2].wait(delay)


class Snapshot:
    """One list call per poll round, shared by every thread that polls (a whole class on one site).

    Concurrent callers within `ttl` seconds get the same result; the lock makes the others wait for the
    one call in flight instead of sending their own. A caller that must see its own changes passes
    `newer_than` (a `time.monotonic()` value): a result whose call started before then is fetched again, but
    not sooner than `min_gap` seconds after the last call started, so that the callers who come meanwhile share
    it (a class's twin checks after creating its security groups listed them every 60 ms, back to back).
    """

    def __init__(self, ttl: float, min_gap: float = 0.0) -> None:
        self.ttl = ttl
        self.min_gap = min_gap
        self.lock = threading.Lock()
        self.at = -1e18
        self.started = -1e18
        self.value: Any = None

    def get(self, fetch: Callable[[], Any], newer_than: float = -1e18) -> Any:
        while True:
            with self.lock:
                now = time.monotonic()
                if self.value is not None and now - self.at < self.ttl and self.started >= newer_than:
                    return self.value
                wait = self.started + self.min_gap - now if self.value is not None else 0.0
                if wait <= 0:
                    with rank(SHARED_RANK):  # every thread waits on this call: ahead of anyone's own calls
                        self.value = fetch()
                    self.at, self.started = time.monotonic(), now
                    return self.value
            time.sleep(wait)  # not holding the lock: callers the last result still serves get it meanwhile


class Memo:
    """A small thread-safe memo: `get(key, compute)` computes once per key (None included) and, with `ttl`,
    again after `ttl` seconds. Concurrent callers of one key wait for the one computation; other keys do not
    wait. A computation that raises stores nothing. Its calls go ahead of anyone's own (`SHARED_RANK`): they are
    made for every caller, whoever came first (a class's flavor look-up, made by the 62nd student, waited 2 s
    behind the first 61 students' calls while every student's lease create waited for it)."""

    def __init__(self, ttl: float | None = None) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._key_locks: dict[Any, threading.Lock] = {}
        self._values: dict[Any, tuple[float, Any]] = {}

    def _fresh(self, key: Any) -> tuple[bool, Any]:
        item = self._values.get(key)
        if item is None or (self.ttl is not None and time.monotonic() - item[0] >= self.ttl):
            return False, None
        return True, item[1]

    def get(self, key: Any, compute: Callable[[], T]) -> T:
        with self._lock:
            ok, value = self._fresh(key)
            if ok:
                return value
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                ok, value = self._fresh(key)
            if ok:
                return value
            with rank(SHARED_RANK):
                value = compute()
            self.put(key, value)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._values[key] = (time.monotonic(), value)

    def peek(self, key: Any, default: Any = None) -> Any:
        """The stored value (if fresh), else `default`; computes nothing."""
        with self._lock:
            ok, value = self._fresh(key)
        return value if ok else default

    def pop(self, key: Any, default: Any = _UNSET) -> Any:
        """Take the stored value out (fresh or not); `default` if none (KeyError without a default)."""
        with self._lock:
            if key in self._values:
                return self._values.pop(key)[1]
        if default is _UNSET:
            raise KeyError(key)
        return default

    def __contains__(self, key: Any) -> bool:
        with self._lock:
            return self._fresh(key)[0]

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


# -- one call ----------------------------------------------------------------------------------------------------
def call(what: str, fn: Callable[[], T], *, translate: Callable[[str, Exception], Exception],
         missing_ok: bool = False, is_missing: Callable[[Exception], bool] | None = None, resend: bool = True,
         limiter: RateLimiter | None = None, attempts: int = 6, backoff: float = 1.0) -> T | None:
    """`fn()`, one cloud call, with the adapter's error table.

    Each attempt waits for `limiter` first. An exception is passed to `translate(what, exc)` (which returns a
    labctl error kind; a labctl error given to it should come back as is), then `scrub`bed. `RateLimited` and
    `Transient` are retried up to `attempts` sends in all, waiting a random exponential backoff (`backoff`
    seconds times 1, 2, 4... at most 30 s). "Missing" is `is_missing(raw_exception)` or a translation to
    `NotFound`: with `missing_ok` the call returns None, else the NotFound (or the translation) is raised.

    `resend=False` is for a create that is not idempotent: after a `Transient` (a timeout, a lost answer, a 5xx
    that may have done it) nothing is sent again -- the caller looks the thing up instead. A `RateLimited`
    answer (the cloud refused the request, nothing was done) is still retried.
    """
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

    def retryable(exc: BaseException) -> bool:
        return isinstance(exc, RateLimited) or (resend and isinstance(exc, Transient))

    def attempt() -> T | None:
        if limiter is not None:
            limiter.acquire()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - translated below, never leaks SDK types
            if missing_ok and is_missing is not None and is_missing(exc):
                return None
            err = translate(what, exc)
            if missing_ok and isinstance(err, NotFound):
                return None
            if isinstance(err, LabctlError):
                scrub(err)
            if err is exc:
                raise
            raise err from exc

    retrying = Retrying(retry=retry_if_exception(retryable),
                        wait=wait_random_exponential(multiplier=max(backoff, 0.01), max=30),
                        stop=stop_after_attempt(max(1, attempts)), reraise=True)
    return retrying(attempt)


# -- waiting -----------------------------------------------------------------------------------------------------
def poll_until(refresh: Callable[[], T | None], *, status: Callable[[T], str], pending: Collection[str],
               target: Collection[str], timeout: float, interval: float, not_found_checks: int = 3, what: str,
               on_poll: Callable[[T | None], None] | None = None) -> T | None:
    """Refresh until `status(item)` is in `target`; returns that item.

    - a status in neither `pending` nor `target` raises `CloudError` naming it;
    - `refresh()` returning None means missing from the listing. After `not_found_checks` consecutive misses
      (a shared or eventually consistent list may predate a create: allow a few), the wait returns None when
      "gone" is in `target` (a delete waiter; pass `not_found_checks=1` to return at the first miss) and raises
      `Disappeared` (a CloudError: "<what> disappeared") otherwise. A found item resets the count;
    - past `timeout` seconds (time.monotonic) it raises `WaitTimedOut` (a `Transient`, so a CloudError).
    `on_poll(item)` sees every refresh (None for a miss). Refreshes are `interval` seconds apart; the first is
    immediate.
    """
    deadline = time.monotonic() + timeout
    misses = 0
    last = "missing"
    while True:
        item = refresh()
        if on_poll is not None:
            on_poll(item)
        if item is None:
            misses += 1
            if misses >= max(1, not_found_checks):
                if "gone" in target:
                    return None
                raise Disappeared(f"{what} disappeared")
        else:
            misses = 0
            last = status(item)
            if last in target:
                return item
            if last not in pending:
                raise CloudError(f"{what}: unexpected status {last!r}")
        if time.monotonic() >= deadline:
            raise WaitTimedOut(f"{what}: still {last} after {timeout:.0f}s")
        time.sleep(interval)


def first_with_capacity(candidates: Sequence[C], attempt: Callable[[C], T], *,
                        on_skip: Callable[[C, NoCapacity], None] | None = None) -> T:
    """`attempt(c)` for each candidate (type, zone, (type, zone)...) in order until one does not raise
    `NoCapacity`. `on_skip(c, exc)` hears each skip. When every one had no capacity, raises a NoCapacity naming
    each candidate tried (chained to the last one's)."""
    if not candidates:
        raise ValueError("first_with_capacity: no candidates")
    last: NoCapacity | None = None
    tried: list[str] = []
    for candidate in candidates:
        try:
            return attempt(candidate)
        except NoCapacity as exc:
            tried.append(str(candidate))
            last = exc
            if on_skip is not None:
                on_skip(candidate, exc)
    raise scrub(NoCapacity(f"{last} (tried {', '.join(tried)})")) from last


def retry_in_use(fn: Callable[[], T], *, is_in_use: Callable[[Exception], bool], timeout: float, interval: float,
                 what: str) -> T:
    """`fn()` (a delete), again every `interval` seconds while it fails with an error `is_in_use` says is "a
    dependency still holds it" (a port, an attachment, an instance going away). Past `timeout` the last such
    error is raised (as it came: the adapter's translation). Any other error is raised at once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_in_use(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(interval)


# -- per-kind handlers -------------------------------------------------------------------------------------------
class Handler:
    """One resource kind of one adapter, bound to the adapter's shared context (`self.ctx`: clients, `call`,
    memos). Subclasses implement `find`, `create`, `delete` and, for kinds the engine waits on, `status`."""

    kind: ClassVar[str] = ""
    noun: ClassVar[str] = ""  # in "<noun> disappeared"; the kind by default

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def find(self, res: Resource, plan: Plan) -> Found | None:
        raise NotImplementedError

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        raise CloudError(f"labctl does not create {self.kind} resources here")

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        raise NotImplementedError

    def status(self, res: Resource, found: Found, plan: Plan) -> Found | None:
        """What the cloud says now about a pending resource; None when it is missing from the listing."""
        raise NotImplementedError

    def owned(self, plan: Plan) -> list[Found]:
        """Everything of this kind on the site tagged with the deployment (for `list_owned`); none by default."""
        return []

    def progress(self, res: Resource, found: Found) -> tuple[str, str, str] | None:
        """(subject, stage, detail) to report after a poll, or None."""
        return None

    @property
    def waits(self) -> bool:
        return type(self).status is not Handler.status


class Handlers(Mapping[str, Handler]):
    """An adapter's handlers, bound: `handlers[kind]` (CloudError for a kind the adapter does not know)."""

    def __init__(self, name: str, bound: dict[str, Handler]) -> None:
        self.name = name
        self._bound = bound

    def __getitem__(self, kind: str) -> Handler:
        try:
            return self._bound[kind]
        except KeyError:
            raise CloudError(f"{self.name}: no handler for '{kind}' resources") from None

    def __contains__(self, kind: object) -> bool:  # Mapping's default goes through __getitem__'s CloudError
        return kind in self._bound

    def __iter__(self) -> Iterator[str]:
        return iter(self._bound)

    def __len__(self) -> int:
        return len(self._bound)


class HandlerTable:
    """The one table of an adapter's per-kind handlers: `@TABLE.handler("keypair")` on a `Handler` subclass,
    or `TABLE.register(kind, find=..., create=..., delete=..., status=...)` with functions taking the context
    first. `bind(ctx)` makes the handlers an adapter instance dispatches through."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._classes: dict[str, type[Handler]] = {}

    def handler(self, kind: str) -> Callable[[type[Handler]], type[Handler]]:
        def register(cls: type[Handler]) -> type[Handler]:
            if kind in self._classes:
                raise ValueError(f"{self.name}: two handlers for '{kind}'")
            cls.kind = kind
            cls.noun = cls.noun or kind
            self._classes[kind] = cls
            return cls

        return register

    def register(self, kind: str, *, find: Callable[..., Found | None], delete: Callable[..., None],
                 create: Callable[..., Found] | None = None, status: Callable[..., Found | None] | None = None,
                 noun: str = "") -> None:
        """Register plain functions `find(ctx, res, plan)`, `create(ctx, res, plan, deps, candidate)`,
        `delete(ctx, found, plan)`, `status(ctx, res, found, plan)`."""
        ns: dict[str, Any] = {
            "noun": noun,
            "find": lambda self, res, plan: find(self.ctx, res, plan),
            "delete": lambda self, found, plan: delete(self.ctx, found, plan),
        }
        if create is not None:
            ns["create"] = lambda self, res, plan, deps, candidate: create(self.ctx, res, plan, deps, candidate)
        if status is not None:
            ns["status"] = lambda self, res, found, plan: status(self.ctx, res, found, plan)
        self.handler(kind)(type(f"{kind}_handler", (Handler,), ns))

    def kinds(self) -> list[str]:
        return list(self._classes)

    def bind(self, ctx: Any) -> Handlers:
        return Handlers(self.name, {kind: cls(ctx) for kind, cls in self._classes.items()})


def wait_each(handlers: Handlers, items: Sequence[tuple[Resource, Found]], plan: Plan, *, timeout: float,
              interval: float, on_progress: ProgressFn, not_found_checks: int = 3) -> list[Found]:
    """`Provider.wait` for any adapter: each pending resource polled with `poll_until` through its handler's
    `status` until ready or error, within one deadline for all. Missing `not_found_checks` times in a row: an
    error "<noun> disappeared"; out of time: an error "still not ready after <timeout>s". (The handlers'
    listings are `Snapshot`s: resources polled one after another share one list call per round.)"""
    deadline = time.monotonic() + timeout
    results: dict[str, Found] = {}
    for res, found in items:
        if found.status != "pending":
            results[res.key] = found
            continue
        h = handlers[res.kind]
        current = [found]

        def refresh(h: Handler = h, res: Resource = res, current: list[Found] = current) -> Found | None:
            now = h.status(res, current[0], plan)
            if now is not None:
                current[0] = now
            return now

        def report(_item: Found | None, h: Handler = h, res: Resource = res, current: list[Found] = current) -> None:
            event = h.progress(res, current[0])
            if event is not None:
                on_progress(*event)

        try:
            poll_until(refresh, status=lambda f: f.status, pending=("pending",), target=("ready", "error"),
                       timeout=max(0.0, deadline - time.monotonic()), interval=interval,
                       not_found_checks=not_found_checks, what=h.noun, on_poll=report)
        except Disappeared as exc:
            current[0] = Found(res.kind, current[0].cloud_id, res.name, status="error", error=str(exc),
                               attrs=dict(current[0].attrs))
        except WaitTimedOut:
            current[0].status, current[0].error = "error", f"still not ready after {timeout:.0f}s"
        results[res.key] = current[0]
    return [results[res.key] for res, _ in items]
