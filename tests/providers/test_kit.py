"""The provider kit: one call, one waiter, fallbacks, in-use retries, the memo and the handler table."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from labctl import redact
from labctl.errors import CloudError, Conflict, NoCapacity, QuotaExceeded, RateLimited, Transient
from labctl.plan import Resource
from labctl.providers import kit
from labctl.providers.base import Found
from labctl.providers.kit import (
    Disappeared,
    Handler,
    HandlerTable,
    Memo,
    NotFound,
    RateLimiter,
    Snapshot,
    WaitTimedOut,
    call,
    first_with_capacity,
    poll_until,
    retry_in_use,
    wait_each,
)


class SdkError(Exception):
    def __init__(self, status: int, text: str = "") -> None:
        super().__init__(text or f"HTTP {status}")
        self.status = status


def translate(what: str, exc: Exception) -> Exception:
    status = getattr(exc, "status", None)
    table = {404: NotFound, 409: Conflict, 413: QuotaExceeded, 429: RateLimited, 503: Transient}
    return table.get(status, CloudError)(f"site: {what}: {exc}")


def failing(*errors: Exception, result: str = "ok") -> tuple[list[int], Callable[[], str]]:
    sent = [0]

    def fn() -> str:
        sent[0] += 1
        if sent[0] <= len(errors):
            raise errors[sent[0] - 1]
        return result

    return sent, fn


# -- call ---------------------------------------------------------------------------------------------------------
def test_call_retries_rate_limits_and_transient_faults_then_succeeds():
    sent, fn = failing(SdkError(429), SdkError(503))
    assert call("list servers", fn, translate=translate, backoff=0.001) == "ok"
    assert sent[0] == 3


def test_call_gives_up_after_its_attempts_with_the_translated_error():
    sent, fn = failing(*[SdkError(503)] * 10)
    with pytest.raises(Transient, match="site: get volume: HTTP 503") as info:
        call("get volume", fn, translate=translate, attempts=3, backoff=0.001)
    assert sent[0] == 3 and isinstance(info.value.__cause__, SdkError)


def test_call_does_not_retry_what_retrying_will_not_fix():
    sent, fn = failing(SdkError(413))
    with pytest.raises(QuotaExceeded):
        call("create volume", fn, translate=translate, backoff=0.001)
    assert sent[0] == 1


def test_call_without_resend_sends_once_after_a_lost_answer_but_still_retries_a_refusal():
    sent, fn = failing(SdkError(503))
    with pytest.raises(Transient):
        call("run instance", fn, translate=translate, resend=False, backoff=0.001)
    assert sent[0] == 1
    sent, fn = failing(SdkError(429))
    assert call("run instance", fn, translate=translate, resend=False, backoff=0.001) == "ok"
    assert sent[0] == 2


def test_call_missing_ok_by_translation_or_by_predicate():
    _, fn = failing(SdkError(404))
    assert call("get keypair", fn, translate=translate, missing_ok=True) is None
    _, fn = failing(SdkError(404))
    with pytest.raises(NotFound, match="get keypair"):
        call("get keypair", fn, translate=translate)
    _, fn = failing(SdkError(410))
    assert call("get disk", fn, translate=translate, missing_ok=True,
                is_missing=lambda exc: getattr(exc, "status", None) == 410) is None
    _, fn = failing(SdkError(410))
    with pytest.raises(CloudError, match="HTTP 410"):
        call("get disk", fn, translate=translate, missing_ok=False,
             is_missing=lambda exc: getattr(exc, "status", None) == 410)


def test_call_scrubs_every_error_it_raises():
    redact.register_secret("kit-s3cr3t-password")
    _, fn = failing(SdkError(400, "bad request: password=kit-s3cr3t-password\nsecond line"))
    with pytest.raises(CloudError) as info:
        call("authenticate", fn, translate=translate)
    assert "kit-s3cr3t-password" not in str(info.value) and "\n" not in str(info.value)

    def raises_labctl() -> None:
        raise CloudError("echo kit-s3cr3t-password")

    with pytest.raises(CloudError) as info:
        call("x", raises_labctl, translate=lambda what, exc: exc)
    assert str(info.value) == f"echo {redact.MASK}"


def test_call_waits_for_the_rate_limiter_on_every_attempt():
    limiter = RateLimiter(200, burst=1)
    _, fn = failing(SdkError(429), SdkError(429))
    start = time.monotonic()
    assert call("list", fn, translate=translate, limiter=limiter, backoff=0.0001) == "ok"
    assert time.monotonic() - start >= 2 / 200 * 0.9


# -- poll_until ---------------------------------------------------------------------------------------------------
def refresher(*states: str | None) -> Callable[[], str | None]:
    seq = list(states)

    def refresh() -> str | None:
        return seq.pop(0) if len(seq) > 1 else seq[0]

    return refresh


def test_poll_until_reaches_the_target_through_pending_states():
    seen = []
    got = poll_until(refresher("BUILD", "BUILD", "ACTIVE"), status=str, pending={"BUILD"}, target={"ACTIVE"},
                     timeout=5, interval=0, what="server", on_poll=seen.append)
    assert got == "ACTIVE" and seen == ["BUILD", "BUILD", "ACTIVE"]


def test_poll_until_names_an_unexpected_status():
    with pytest.raises(CloudError, match="server: unexpected status 'ERROR'"):
        poll_until(refresher("BUILD", "ERROR"), status=str, pending={"BUILD"}, target={"ACTIVE"}, timeout=5,
                   interval=0, what="server")


def test_poll_until_tolerates_fewer_misses_than_not_found_checks():
    got = poll_until(refresher(None, None, "BUILD", None, None, "ACTIVE"), status=str, pending={"BUILD"},
                     target={"ACTIVE"}, timeout=5, interval=0, not_found_checks=3, what="server")
    assert got == "ACTIVE"  # the count is of consecutive misses: a found item resets it


def test_poll_until_raises_disappeared_after_n_consecutive_misses():
    calls = []

    def refresh() -> str | None:
        calls.append(1)
        return "BUILD" if len(calls) == 1 else None

    with pytest.raises(Disappeared, match="lease disappeared"):
        poll_until(refresh, status=str, pending={"BUILD"}, target={"ACTIVE"}, timeout=5, interval=0,
                   not_found_checks=4, what="lease")
    assert len(calls) == 5  # one found, then four misses


def test_poll_until_returns_none_for_gone_when_gone_is_the_target():
    calls = []

    def refresh() -> str | None:
        calls.append(1)
        return "deleting" if len(calls) < 3 else None

    assert poll_until(refresh, status=str, pending={"deleting"}, target={"gone"}, timeout=5, interval=0,
                      not_found_checks=2, what="volume") is None
    assert len(calls) == 4


def test_poll_until_times_out_with_a_transient_error():
    start = time.monotonic()
    with pytest.raises(WaitTimedOut, match="server: still BUILD after 0s") as info:
        poll_until(lambda: "BUILD", status=str, pending={"BUILD"}, target={"ACTIVE"}, timeout=0.05,
                   interval=0.01, what="server")
    assert isinstance(info.value, Transient) and time.monotonic() - start < 1


# -- fallbacks and in-use deletes ---------------------------------------------------------------------------------
def test_first_with_capacity_falls_back_to_the_first_candidate_with_room():
    skipped = []

    def attempt(zone: str) -> str:
        if zone in ("us-east-1a", "us-east-1b"):
            raise NoCapacity(f"no room in {zone}")
        return f"launched in {zone}"

    got = first_with_capacity(["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d"], attempt,
                              on_skip=lambda c, exc: skipped.append((c, str(exc))))
    assert got == "launched in us-east-1c"
    assert skipped == [("us-east-1a", "no room in us-east-1a"), ("us-east-1b", "no room in us-east-1b")]


def test_first_with_capacity_names_every_candidate_when_none_has_room():
    def attempt(kind: str) -> str:
        raise NoCapacity(f"no {kind}")

    with pytest.raises(NoCapacity, match=r"no g5\.xlarge \(tried p4d\.24xlarge, g5\.xlarge\)"):
        first_with_capacity(["p4d.24xlarge", "g5.xlarge"], attempt)
    with pytest.raises(QuotaExceeded):  # only NoCapacity falls through to the next candidate
        first_with_capacity(["a", "b"], lambda c: (_ for _ in ()).throw(QuotaExceeded("quota")))
    with pytest.raises(ValueError, match="no candidates"):
        first_with_capacity([], attempt)


def test_retry_in_use_retries_only_while_in_use():
    sent, fn = failing(Conflict("in use"), Conflict("in use"), result="deleted")
    assert retry_in_use(fn, is_in_use=lambda e: isinstance(e, Conflict), timeout=5, interval=0,
                        what="delete network") == "deleted"
    assert sent[0] == 3
    sent, fn = failing(CloudError("other"))
    with pytest.raises(CloudError, match="other"):
        retry_in_use(fn, is_in_use=lambda e: isinstance(e, Conflict), timeout=5, interval=0, what="delete")
    assert sent[0] == 1
    sent, fn = failing(*[Conflict("still in use")] * 1000)
    with pytest.raises(Conflict, match="still in use"):
        retry_in_use(fn, is_in_use=lambda e: isinstance(e, Conflict), timeout=0.05, interval=0.01, what="delete")
    assert 2 <= sent[0] < 1000


# -- memo and snapshot --------------------------------------------------------------------------------------------
def test_memo_computes_once_per_key_including_none_across_threads():
    memo = Memo()
    computed = []
    gate = threading.Event()

    def compute() -> None:
        computed.append(1)
        gate.wait(1)
        return None

    threads = [threading.Thread(target=memo.get, args=("public", compute)) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join()
    assert computed == [1] and memo.get("public", lambda: "again") is None and "public" in memo
    assert memo.get("other", lambda: 2) == 2 and memo.pop("other") == 2 and memo.pop("other", "none") == "none"
    with pytest.raises(KeyError):
        memo.pop("other")


def test_memo_expires_with_ttl_and_stores_nothing_on_error():
    memo = Memo(ttl=0.05)
    assert memo.get("k", lambda: 1) == 1 and memo.get("k", lambda: 2) == 1
    time.sleep(0.06)
    assert memo.peek("k") is None and memo.get("k", lambda: 3) == 3

    def boom() -> int:
        raise CloudError("boom")

    with pytest.raises(CloudError, match="boom"):
        memo.get("e", boom)
    assert "e" not in memo


def test_snapshot_shares_one_fetch_until_its_ttl_or_a_newer_change():
    snap, fetched = Snapshot(ttl=10), []
    assert snap.get(lambda: fetched.append(1) or len(fetched)) == 1
    assert snap.get(lambda: fetched.append(1) or len(fetched)) == 1
    assert snap.get(lambda: fetched.append(1) or len(fetched), newer_than=time.monotonic()) == 2


def test_snapshot_refetches_for_newer_changes_at_most_once_per_gap_and_never_older():
    """Callers that each need a list newer than their own change, arriving within the gap, share one fetch;
    every caller gets a list that started after its change."""
    snap = Snapshot(ttl=10, min_gap=0.2)
    starts: list[float] = []

    def fetch():
        starts.append(time.monotonic())
        return starts[-1]

    snap.get(fetch)
    got: list[tuple[float, float]] = []

    def caller():
        changed = time.monotonic()
        got.append((changed, snap.get(fetch, newer_than=changed)))

    threads = []
    for _ in range(8):
        threads.append(threading.Thread(target=caller))
        threads[-1].start()
        time.sleep(0.01)
    for t in threads:
        t.join(10)
    assert len(starts) == 2 and starts[1] - starts[0] >= 0.2  # one fetch for the eight, after the gap
    assert all(started >= changed for changed, started in got)


# -- handler table and the shared wait -----------------------------------------------------------------------------
TABLE = HandlerTable("test")


@TABLE.handler("server")
class Servers(Handler):
    noun = "server"

    def find(self, res, plan):
        return self.ctx["servers"].get(res.name)

    def create(self, res, plan, deps, candidate):
        self.ctx["servers"][res.name] = Found("server", f"id-{res.name}", res.name, status="pending")
        return self.ctx["servers"][res.name]

    def delete(self, found, plan):
        for f in found:
            self.ctx["servers"].pop(f.name, None)

    def status(self, res, found, plan):
        states = self.ctx["script"][res.name]
        state = states.pop(0) if len(states) > 1 else states[0]
        return None if state is None else Found("server", found.cloud_id, res.name, status=state)

    def progress(self, res, found):
        return (res.name, found.status, "")


TABLE.register("keypair", find=lambda ctx, res, plan: ctx.get("keypair"),
               delete=lambda ctx, found, plan: ctx.pop("keypair", None))


def test_handler_table_dispatches_per_kind_and_refuses_unknown_kinds():
    ctx = {"servers": {}, "keypair": Found("keypair", "k", "k")}
    handlers = TABLE.bind(ctx)
    res = Resource("server:a", "server", "a", {})
    assert handlers["server"].find(res, None) is None
    assert handlers["server"].create(res, None, {}, None).status == "pending"
    assert handlers["server"].find(res, None).cloud_id == "id-a"
    assert handlers["keypair"].find(Resource("keypair", "keypair", "k", {}), None).cloud_id == "k"
    with pytest.raises(CloudError, match="does not create keypair"):
        handlers["keypair"].create(Resource("keypair", "keypair", "k", {}), None, {}, None)
    handlers["keypair"].delete([], None)
    assert "keypair" not in ctx and handlers["server"].waits and not handlers["keypair"].waits
    with pytest.raises(CloudError, match="no handler for 'bucket'"):
        handlers["bucket"]
    assert "server" in handlers and "bucket" not in handlers  # membership asks, it does not raise
    with pytest.raises(ValueError, match="two handlers"):
        TABLE.handler("server")(Servers)
    assert sorted(TABLE.kinds()) == ["keypair", "server"]


def test_wait_each_polls_each_pending_resource_to_ready_error_disappeared_or_timeout():
    ctx = {"servers": {}, "script": {"a": ["pending", "ready"], "b": ["pending", "error"],
                                     "c": ["pending", None, None, None], "d": ["pending"]}}
    handlers = TABLE.bind(ctx)
    items = [(Resource(f"server:{n}", "server", n, {}), Found("server", f"id-{n}", n, status="pending"))
             for n in "abcd"]
    items.append((Resource("server:e", "server", "e", {}), Found("server", "id-e", "e")))  # ready: not polled
    events = []
    got = wait_each(handlers, items, None, timeout=0.2, interval=0.01, not_found_checks=3,
                    on_progress=lambda *e: events.append(e))
    assert [f.status for f in got] == ["ready", "error", "error", "error", "ready"]
    assert got[2].error == "server disappeared" and got[3].error == "still not ready after 0s"
    assert ("a", "ready", "") in events and ("b", "error", "") in events


# -- the rate limiter ------------------------------------------------------------------------------------------
def _queue_behind_a_held_bucket(limiter, ranks):
    """Threads that call `acquire` under `kit.rank(r)` for each r, in this order, while the bucket is empty;
    returns (the order they got through, the threads)."""
    order: list[int] = []
    started = []
    for i, r in enumerate(ranks):
        def go(i=i, r=r):
            with kit.rank(r):
                limiter.acquire()
            order.append(i)

        t = threading.Thread(target=go)
        t.start()
        started.append(t)
        while len(limiter._queue) < i + 1:  # queued before the next one arrives
            time.sleep(0.001)
    return order, started


def test_rate_limiter_serves_lower_ranks_first_then_by_arrival():
    limiter = kit.RateLimiter(10, burst=1)
    limiter.acquire()  # the bucket is empty now: the next token is 100 ms away, time for all five to queue
    order, threads = _queue_behind_a_held_bucket(limiter, [3, 1, 2, 1, 0])
    for t in threads:
        t.join(10)
    # the first in line (rank 3) was already waiting for the token when the others came: it keeps its turn only
    # if nobody ranked before it arrived first; here every later one outranks it
    assert order == [4, 1, 3, 2, 0]


def test_a_memo_computes_ahead_of_everyones_own_calls():
    """A look-up every caller waits for is made ahead of the queue, whatever the rank of the caller that makes it."""
    limiter = kit.RateLimiter(10, burst=1)
    limiter.acquire()  # empty: the next token is 100 ms away
    order, threads = _queue_behind_a_held_bucket(limiter, [0, 1, 2])
    memo = kit.Memo()

    def look_up() -> str:
        limiter.acquire()
        order.append("look-up")
        return "m1.small"

    def late_student():
        with kit.rank(5):
            assert memo.get("flavor", look_up) == "m1.small"

    threads.append(threading.Thread(target=late_student))
    threads[-1].start()
    for t in threads:
        t.join(10)
    assert order == ["look-up", 0, 1, 2]


def test_rate_limiter_keeps_the_rate_and_wakes_each_waiter_about_once(monkeypatch):
    limiter = kit.RateLimiter(200, burst=1)
    waits = []
    original = threading.Event.wait

    def counting(self, timeout=None):
        waits.append(timeout)
        return original(self, timeout)

    monkeypatch.setattr(threading.Event, "wait", counting)
    began = time.monotonic()
    threads = [threading.Thread(target=limiter.acquire) for _ in range(41)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    took = time.monotonic() - began
    monkeypatch.undo()
    assert took >= 40 / 200 * 0.95  # 41 calls, one token at first: 40 more at 200/s
    assert len(waits) <= 3 * 41  # a waiter sleeps until its turn, then for its token (not every few ms)


def test_cloud_clock_leaves_out_the_wait_for_the_rate_limit():
    """A create's settling time is 3x what it took at the cloud; a class's queue for the rate limit is not part
    of it (seconds long, it made every security group settle 5 s)."""
    limiter = kit.RateLimiter(4, burst=1)
    limiter.acquire()  # empty: the next token is 250 ms away
    clock = kit.CloudClock()
    limiter.acquire()
    time.sleep(0.05)  # "the call"
    wall = time.monotonic() - clock.started
    assert wall >= 0.25
    assert 0.04 <= clock.elapsed() <= 0.15
