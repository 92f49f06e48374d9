"""The engine: converge a site to a plan (apply) or to nothing (destroy). Provider-neutral.

Every create is bracketed by the state store: intent before the call, the cloud's id after it. A rerun
after a crash first asks the provider to find each resource by name and tags, so nothing is created twice.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from labctl.errors import CloudError, Interrupted, NoCapacity
from labctl.plan import KEEPABLE_KINDS, KIND_ORDER, LONG_WAIT_KINDS, Plan, Resource
from labctl.providers.base import Found, Provider
from labctl.providers.kit import ahead
from labctl.redact import clean
from labctl.state import StateStore

log = logging.getLogger(__name__)

# on_progress(subject, stage, detail): subject is a node name or a resource key.
Progress = Callable[[str, str, str], None]

SERVER_RETRIES = 1  # a server that goes to ERROR is deleted and launched once more


@dataclass
class Timeouts:
    reservation: float = 1800.0
    server: float = 3600.0


class Engine:
    def __init__(self, provider: Provider, store: StateStore, on_progress: Progress | None = None,
                 concurrency: int = 8, timeouts: Timeouts | None = None,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.should_stop = should_stop or (lambda: False)
        self.provider = provider
        self.store = store
        self.on_progress = on_progress or (lambda subject, stage, detail: None)
        self.concurrency = concurrency
        self.timeouts = timeouts or Timeouts()

    # -- apply ------------------------------------------------------------------------------------
    def apply(self, plan: Plan) -> dict[str, Found]:
        """Create what is missing, wait until ready; returns what the cloud says per resource key (and what the
        plan was given)."""
        found: dict[str, Found] = dict(plan.given)
        for level in plan.levels():
            self._converge_level(plan, level, found)
        return found

    def _converge_level(self, plan: Plan, level: list[Resource], found: dict[str, Found]) -> None:
        attempts: dict[str, int] = {}  # resource key -> index of the candidate to try next
        retries: dict[str, int] = {}
        todo = sorted(level, key=lambda r: r.kind not in LONG_WAIT_KINDS)  # start the long waits first
        while todo:
            results = self._ensure_all(plan, todo, found, attempts)
            for res, f in zip(todo, results, strict=True):
                found[res.key] = f
            pending = [(r, found[r.key]) for r in todo if found[r.key].status == "pending"]
            if pending:
                self._wait(plan, pending, found)
            again = []
            for res in todo:
                f = found[res.key]
                if f.status == "ready":
                    self._record(plan, res, "ready", f)
                    continue
                self._record(plan, res, "failed", f)
                again.append(self._recover(plan, res, f, attempts, retries))
            todo = [r for r in again if r is not None]

    def _ensure_all(self, plan: Plan, todo: list[Resource], found: dict[str, Found],
                    attempts: dict[str, int]) -> list[Found]:
        # The caller's thread makes the first resource, threads the others (a class runs hundreds of labs at once:
        # each thread costs memory and a start). Each runs in a copy of the caller's context (its rank for the
        # rate limit, say).
        first, rest = todo[0], todo[1:]
        if not rest or self.concurrency <= 1:
            return [self._ensure(plan, r, found, attempts) for r in todo]
        with ThreadPoolExecutor(max_workers=min(self.concurrency - 1, len(rest))) as pool:
            futures = [pool.submit(contextvars.copy_context().run, self._ensure, plan, r, found, attempts)
                       for r in rest]
            mine = self._ensure(plan, first, found, attempts)
            return [mine, *(f.result() for f in futures)]

    def _recover(self, plan: Plan, res: Resource, f: Found, attempts: dict[str, int],
                 retries: dict[str, int]) -> Resource | None:
        """A resource ended in error: delete it, then try the next candidate type or launch once more."""
        self.provider.delete(res.kind, [f], plan)
        self.store.delete_resource(plan.deployment, res.key)
        if res.kind == "reservation" or f.no_capacity:
            self._note(plan, res.key, "no-capacity", f"{f.attrs.get('node_type')}: {f.error}")
            attempts[res.key] = attempts.get(res.key, 0) + 1
            return res
        if retries.get(res.key, 0) < SERVER_RETRIES:
            retries[res.key] = retries.get(res.key, 0) + 1
            self._note(plan, res.spec.get("node", res.key), "retrying", f"{f.error}; launching again")
            return res
        raise CloudError(clean(f"{res.key} failed at {plan.site.name}: {f.error}", one_line=True))

    def _ensure(self, plan: Plan, res: Resource, found: dict[str, Found], attempts: dict[str, int]) -> Found:
        # A lease's or a server's wait at the cloud starts with its create: it goes ahead at the rate limit.
        with ahead() if res.kind in LONG_WAIT_KINDS else contextlib.nullcontext():
            return self._make(plan, res, found, attempts)

    def _make(self, plan: Plan, res: Resource, found: dict[str, Found], attempts: dict[str, int]) -> Found:
        existing = self.provider.find(res, plan)
        if existing is not None and existing.status in ("ready", "pending"):
            self._record(plan, res, "created", existing)
            return existing
        if existing is not None and existing.status == "error":
            return existing  # handled by _recover after the level's wait
        deps = {key: found[key] for key in res.depends_on}
        candidates: list[str | None] = list(res.spec.get("candidates") or []) or [None]
        if res.kind not in ("reservation", "server") or res.spec.get("reservation"):
            candidates = [None]  # the type was chosen by the reservation this server runs on
        start = attempts.get(res.key, 0)
        tried = []
        for index in range(start, len(candidates)):
            if self.should_stop():
                raise Interrupted(f"stopped before creating {res.key}: state is saved, rerun to resume")
            candidate = candidates[index]
            attempts[res.key] = index
            self.store.record_intent(plan.deployment, res.key, res.kind, res.name,
                                     {"candidate": candidate} if candidate else None)
            self._note(plan, res.spec.get("node", res.key), "creating", candidate or res.name)
            try:
                created = self.provider.create(res, plan, deps, candidate)
            except NoCapacity as exc:
                tried.append(candidate)
                nxt = candidates[index + 1] if index + 1 < len(candidates) else None
                msg = f"no free {candidate} hosts at {plan.site.name}"
                self._note(plan, res.key, "fallback" if nxt else "no-capacity",
                           f"{msg}; trying {nxt}" if nxt else msg)
                log.debug("%s", exc)
                continue
            if candidate:
                created.attrs.setdefault("node_type", candidate)
                if index > 0:
                    self._note(plan, res.key, "fallback",
                               f"using {candidate} instead of {candidates[0]} ({', '.join(map(str, tried))} "
                               "had no free hosts)")
            self._record(plan, res, "created", created)
            return created
        raise NoCapacity(
            f"no capacity at {plan.site.name} for {res.spec.get('role', res.key)}: none of "
            f"{', '.join(str(c) for c in candidates)} has {res.spec.get('count', 1)} free host(s) now; "
            "try another site, a later time, or fewer nodes"
        )

    def _wait(self, plan: Plan, pending: list[tuple[Resource, Found]], found: dict[str, Found]) -> None:
        by_kind: dict[str, list[tuple[Resource, Found]]] = {}
        for res, f in pending:
            by_kind.setdefault(res.kind, []).append((res, f))
        for kind, items in by_kind.items():
            timeout = self.timeouts.reservation if kind == "reservation" else self.timeouts.server
            for res, f in zip([r for r, _ in items], self.provider.wait(items, plan, timeout, self.on_progress),
                              strict=True):
                found[res.key] = f

    def _record(self, plan: Plan, res: Resource, status: str, f: Found) -> None:
        data = {**f.attrs, "error": clean(f.error, one_line=True)} if f.error else dict(f.attrs)
        if res.kind in KEEPABLE_KINDS:
            data["keep"] = bool(res.spec.get("keep"))  # read back by destroy(keep=True), without the profile
        self.store.record_resource(plan.deployment, res.key, status, f.cloud_id, data, kind=res.kind, name=res.name)

    def _note(self, plan: Plan, subject: str, stage: str, detail: str) -> None:
        detail = clean(detail, one_line=True)  # may hold a cloud's words (a fault message)
        self.on_progress(subject, stage, detail)
        if stage in ("fallback", "no-capacity", "retrying"):
            self.store.event(plan.deployment, f"{subject}: {detail}", "warning")

    # -- destroy ----------------------------------------------------------------------------------
    def destroy(self, plan: Plan, keep: bool = False) -> list[Found]:
        """Delete everything recorded for the deployment and everything tagged with it, in reverse order.

        With `keep`, resources of a keepable kind (volumes, buckets) marked keep -- in their recorded data, or in
        `attrs["keep"]` of what `list_owned` reports -- are left alone, and so are their state rows; they are
        returned in `self.kept`. Returns what is still there afterwards, kept resources excluded (empty on
        success).
        """
        recorded = self.store.resources(plan.deployment)
        owned = self.provider.list_owned(plan)
        kept_ids: set[str] = set()
        self.kept: list[Found] = []
        if keep:
            for rec in recorded:
                if rec.kind in KEEPABLE_KINDS and rec.data.get("keep") and rec.cloud_id:
                    kept_ids.add(rec.cloud_id)
                    self.kept.append(Found(rec.kind, rec.cloud_id, rec.name, attrs={**rec.data, "key": rec.key}))
            for f in owned:
                if f.kind in KEEPABLE_KINDS and f.attrs.get("keep") and f.cloud_id not in kept_ids:
                    kept_ids.add(f.cloud_id)
                    self.kept.append(f)
        for kind in reversed(KIND_ORDER):
            targets: dict[str, Found] = {}
            for rec in recorded:
                if rec.kind != kind or rec.cloud_id in kept_ids:
                    continue
                if rec.cloud_id:
                    targets[rec.cloud_id] = Found(kind, rec.cloud_id, rec.name)
                else:  # intent only: the create may have reached the cloud before a crash
                    res = Resource(rec.key, rec.kind, rec.name, _spec_for_lookup(plan, rec.key, rec.data))
                    f = self.provider.find(res, plan)
                    if f is not None:
                        targets[f.cloud_id] = f
            for f in owned:
                if f.kind == kind and f.cloud_id not in kept_ids:
                    targets.setdefault(f.cloud_id, f)
            if targets:
                self.on_progress(kind, "deleting", f"{len(targets)}")
                self.provider.delete(kind, list(targets.values()), plan)
            for rec in recorded:
                if rec.kind == kind and rec.cloud_id not in kept_ids:
                    self.store.delete_resource(plan.deployment, rec.key)
        return [f for f in self.provider.list_owned(plan) if f.cloud_id not in kept_ids]

    def delete_found(self, plan: Plan, found: list[Found]) -> None:
        """Delete exactly these resources of one deployment (what a leak audit listed), in teardown order:
        reverse KIND_ORDER, kinds the engine does not know last. Records nothing: the state holds no row of them."""
        order = {kind: i for i, kind in enumerate(reversed(KIND_ORDER))}
        by_kind: dict[str, list[Found]] = {}
        for f in found:
            by_kind.setdefault(f.kind, []).append(f)
        for kind in sorted(by_kind, key=lambda k: order.get(k, len(order))):
            self.on_progress(kind, "deleting", f"{len(by_kind[kind])} of {plan.deployment}")
            self.provider.delete(kind, by_kind[kind], plan)


def _spec_for_lookup(plan: Plan, key: str, data: dict) -> dict:
    try:
        return dict(plan.get(key).spec)
    except KeyError:
        node = key.split(":", 1)[1] if ":" in key else key
        return {"node": node, **data}
