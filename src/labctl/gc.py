"""The leak audit (`labctl gc`): what carries labctl's tags at a site that no live deployment in the state
accounts for, and (with `--delete`) removing exactly that.

Listed: orphans (their deployment has no record in this state: a crash and a lost state file), leftovers of
deployments the state says were deleted or live elsewhere, and leftovers of ended leases (a Chameleon lease or an
AWS/GCP end that passed: the cloud deleted the servers, the floating IPs, groups, networks, key pairs remain).
Every owner's resources count, so on a state shared by course staff one audit covers the whole course.

Never listed: anything without labctl's deployment tag (the adapters' `inventory()` reports only tagged
resources, and this module drops any Found without a `labctl-` deployment id on top), anything of a live
deployment, and volumes and buckets that `down` keeps (`keep`) of a deployment the state still holds: `gc` never
deletes more than `down` would. The audit trusts this state: resources of labctl runs that keep another state
(another operator's SQLite file) look like orphans here, which is why the table names each one's owner.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from labctl import naming, service
from labctl.errors import LabctlError, UserError
from labctl.plan import KEEPABLE_KINDS
from labctl.providers.base import Found
from labctl.state import DeploymentRecord

DELETE_CONCURRENCY = 8  # deployments whose leftovers are deleted at once, per site
# `--site sim` stands for every emulated Chameleon site (one world holds them all).
SIM_CHAMELEON = ("sim:chi@tacc", "sim:chi@uc", "sim:kvm@tacc")

# Why a resource is listed
NO_RECORD = "no state record"
DELETED = "its deployment was deleted"
ELSEWHERE = "its deployment is at another site"
ENDED = "lease ended"


@dataclass
class Leak:
    """One resource the audit lists."""

    kind: str
    site: str
    name: str
    cloud_id: str
    deployment: str
    owner: str | None
    created: str | None
    age_hours: float | None
    cost_per_hour: float | None
    reason: str
    keep: bool = False  # a volume or bucket marked to outlive `down` (it may hold data)
    found: Found | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "found"}


@dataclass
class Audit:
    sites: list[str]  # audited
    leaks: list[Leak]
    skipped: list[str]  # "site: why it could not be audited"
    currency: str = "USD"
    providers: dict[str, Any] = field(default_factory=dict, repr=False)
    # A new adapter for a site (its own connection, no listing remembered): what `delete` checks with afterwards.
    reconnect: Callable[[str], Any] | None = field(default=None, repr=False)

    @property
    def cost_per_hour(self) -> float | None:
        costs = [leak.cost_per_hour for leak in self.leaks if leak.cost_per_hour is not None]
        return sum(costs) if costs else None

    def to_json(self) -> dict[str, Any]:
        return {"sites": self.sites, "skipped": self.skipped, "currency": self.currency,
                "cost_per_hour": self.cost_per_hour, "leaks": [leak.to_json() for leak in self.leaks]}


@dataclass
class Deleted:
    deleted: list[Leak]
    left: list[Leak]  # listed, deleted, but still there afterwards
    skipped: list[str]  # "deployment: why" (busy, or now accounted for)

    def to_json(self) -> dict[str, Any]:
        return {"deleted": [leak.to_json() for leak in self.deleted], "left": [leak.to_json() for leak in self.left],
                "not_deleted": self.skipped}


# -- which sites ----------------------------------------------------------------------------------
def site_names(requested: Sequence[str] | None, cloud: str | None = None) -> list[str]:
    """The sites to audit: the ones given (each `--site` may list several, comma-separated; `sim` = every emulated
    Chameleon site), else every real site with credentials. An empty `--site` is refused: it selects nothing."""
    if requested:
        names: list[str] = []
        for value in requested:
            parts = [p.strip() for p in value.split(",")]
            if not value.strip() or not all(parts):
                raise UserError("--site is empty: it selects nothing (and never means 'all'); name a site, or leave "
                                "--site out to audit every site with credentials")
            for part in parts:
                for name in SIM_CHAMELEON if part.lower() == "sim" else (part,):
                    if name not in names:
                        names.append(name)
        return names
    return _sites_with_credentials(cloud)


def _sites_with_credentials(cloud: str | None) -> list[str]:
    from labctl import sites
    from labctl.providers.base import describe_credentials

    found = []
    for site in [*sites.known_sites(), sites.resolve("aws"), sites.resolve("gcp")]:
        try:
            if describe_credentials(site, cloud).startswith("found"):
                found.append(site.name)
        except LabctlError:
            continue
    return found


# -- the audit ------------------------------------------------------------------------------------
def audit(ctx: service.Context, requested: Sequence[str] | None = None, *, cloud: str | None = None,
          deployment: str | None = None, prices: dict[str, Any] | None = None, now: datetime | None = None,
          connect: Callable[[service.Context, Any, str | None], Any] = service.connect) -> Audit:
    """List what no live deployment accounts for at each site (`deployment`: only that deployment's)."""
    from labctl import pricing, sites

    if deployment is not None and not deployment.strip():
        raise UserError("--deployment is empty: it selects nothing (and never means 'all'); give a deployment id")
    names = site_names(requested, cloud)
    resolved = [sites.resolve(name) for name in names]  # an unknown site fails here, before any cloud call
    table = prices if prices is not None else pricing.load_prices()
    now = now or datetime.now(UTC)
    known = {d.id: d for d in ctx.store.deployments(include_destroyed=True)}
    result = Audit([], [], [], currency=str(table.get("currency", "USD")))
    by_name: dict[str, Any] = {}
    result.reconnect = lambda name: connect(ctx, by_name[name], cloud)
    kept: dict[str, set[str]] = {}  # per deployment, read once
    for site in resolved:
        try:
            provider = connect(ctx, site, cloud)
            if getattr(provider, "inventory", None) is None:
                result.skipped.append(f"{site.name}: its adapter cannot list labctl's resources yet")
                continue
            inventory = provider.inventory()
        except LabctlError as exc:
            result.skipped.append(f"{site.name}: {str(exc).splitlines()[0]}")
            continue
        name = provider.site.name
        by_name[name] = site
        result.sites.append(name)
        result.providers[name] = provider
        ends = cloud_ends(inventory)
        for f in inventory:
            dep_id = _deployment_of(f)
            if dep_id not in kept:
                kept[dep_id] = _kept_ids(ctx, known.get(dep_id))
            reason = classify(f, name, known.get(dep_id), kept[dep_id], now, ends.get(dep_id))
            if reason is None or (deployment is not None and _deployment_of(f) != deployment):
                continue
            result.leaks.append(_leak(f, provider.site, reason, table, now))
    result.leaks.sort(key=lambda leak: (leak.site, leak.deployment, leak.kind, leak.name))
    return result


def _deployment_of(f: Found) -> str:
    value = f.attrs.get("deployment")
    return value if isinstance(value, str) else ""


def _kept_ids(ctx: service.Context, dep: DeploymentRecord | None) -> set[str]:
    """Cloud ids of the deployment's volumes and buckets that `down` keeps, as its state rows say."""
    if dep is None or dep.status == "destroyed":
        return set()
    return {r.cloud_id for r in ctx.store.resources(dep.id)
            if r.kind in KEEPABLE_KINDS and r.data.get("keep") and r.cloud_id}


def cloud_ends(inventory: Sequence[Found]) -> dict[str, datetime]:
    """Per deployment, the latest end the cloud itself reports (a lease, a server's scheduled end)."""
    ends: dict[str, datetime] = {}
    for f in inventory:
        end = service.parse_end(f.attrs.get("end"))
        if end is not None and _deployment_of(f):
            ends[_deployment_of(f)] = max(end, ends.get(_deployment_of(f), end))
    return ends


def classify(f: Found, site: str, dep: DeploymentRecord | None, kept_ids: set[str], now: datetime,
             cloud_end: datetime | None = None) -> str | None:
    """Why `f` (found at `site`) is a leak, or None when a live deployment accounts for it (or it is not
    labctl's: no deployment tag). A lease counts as ended when the state's end has passed and the cloud reports
    no later one (`cloud_end`: a lease extended outside labctl still runs)."""
    dep_id = _deployment_of(f)
    if not dep_id.startswith(f"{naming.PREFIX}-"):
        return None  # not tagged by labctl: never listed, whatever its name
    if dep is None:
        return NO_RECORD
    if dep.status == "destroyed":
        return DELETED
    if dep.site != site:
        return f"{ELSEWHERE} ({dep.site})"
    if f.kind in KEEPABLE_KINDS and (f.cloud_id in kept_ids or f.attrs.get("keep")):
        return None  # kept across `down` on purpose: the next `up` reattaches it
    if dep.status == "kept":
        return "left after down"
    end = service.parse_end(dep.data.get("lease_end"))
    if (end is not None and end <= now and (cloud_end is None or cloud_end <= now)
            and dep.status not in ("applying", "destroying")):
        return f"{ENDED} {dep.data.get('lease_end')}"
    return None


def _leak(f: Found, site: Any, reason: str, prices: dict[str, Any], now: datetime) -> Leak:
    created = f.attrs.get("created") if isinstance(f.attrs.get("created"), str) else None
    when = service.parse_end(created)
    age = max(0.0, (now - when).total_seconds() / 3600) if when is not None else None
    owner = f.attrs.get("owner")
    return Leak(f.kind, site.name, f.name, f.cloud_id, _deployment_of(f), owner if isinstance(owner, str) else None,
                created, age, _cost(f, site, prices), reason, bool(f.attrs.get("keep")), f)


def _cost(f: Found, site: Any, prices: dict[str, Any]) -> float | None:
    """On-demand price per hour of a server on AWS/GCP (labctl/data/prices.json), None where not known."""
    if f.kind != "server" or site.family not in ("aws", "gcp"):
        return None
    price = ((prices.get(site.family) or {}).get(site.region) or {}).get(f.attrs.get("node_type"))
    return float(price) if isinstance(price, int | float) and math.isfinite(price) else None


def age_text(hours: float | None) -> str:
    if hours is None:
        return "-"
    if hours < 1:
        return f"{int(hours * 60)}m"
    if hours < 48:
        return f"{hours:.0f}h"
    return f"{hours / 24:.0f}d"


# -- deleting what was listed ---------------------------------------------------------------------
def delete(ctx: service.Context, found: Audit, now: datetime | None = None) -> Deleted:
    """Delete exactly what the audit listed, per deployment under its lock (a `labctl up` of it waits, and one
    that began since the audit makes it skip that deployment), in teardown order; then list each site again and
    report what is still there."""
    from labctl.engine import Engine

    now = now or datetime.now(UTC)
    groups: dict[tuple[str, str], list[Leak]] = {}
    for leak in found.leaks:
        groups.setdefault((leak.site, leak.deployment), []).append(leak)
    attempted: list[Leak] = []
    skipped: list[str] = []

    def one(site: str, dep_id: str, leaks: list[Leak]) -> None:
        provider = found.providers[site]
        with ctx.store.lock(f"env:{dep_id}", wait=True, timeout=service.LOCK_WAIT) as held:
            if not held:
                skipped.append(f"{dep_id}: busy (another labctl is working on it); nothing deleted")
                return
            dep = ctx.store.get_deployment(dep_id)
            kept = _kept_ids(ctx, dep)
            end = cloud_ends([leak.found for leak in leaks if leak.found]).get(dep_id)
            if any(classify(leak.found, site, dep, kept, now, end) is None for leak in leaks if leak.found):
                skipped.append(f"{dep_id}: the state accounts for it now; nothing deleted")
                return
            attempted.extend(leaks)
            try:
                Engine(provider, ctx.store, ctx.on_progress).delete_found(
                    _plan(dep_id, leaks, provider.site), [leak.found for leak in leaks if leak.found])
            except LabctlError as exc:
                skipped.append(f"{dep_id}: {str(exc).splitlines()[0]}")

    with ThreadPoolExecutor(max_workers=DELETE_CONCURRENCY) as pool:
        for future in [pool.submit(one, site, dep_id, leaks) for (site, dep_id), leaks in groups.items()]:
            future.result()
    # What is there now, listed afresh (a new adapter: nothing remembered from before the deletions): the deletions
    # are judged by the cloud, not assumed.
    sites = {leak.site for leak in attempted}
    fresh = found.reconnect or (lambda name: found.providers[name])
    still = {(site, f.cloud_id) for site in sites for f in fresh(site).inventory()}
    return Deleted([leak for leak in attempted if (leak.site, leak.cloud_id) not in still],
                   [leak for leak in attempted if (leak.site, leak.cloud_id) in still], sorted(skipped))


def _plan(dep_id: str, leaks: list[Leak], site: Any) -> Any:
    """A teardown plan for one deployment's leftovers (as `down` builds one, from the resources' tags)."""
    from labctl.plan import Plan

    attrs = leaks[0].found.attrs if leaks[0].found else {}
    owner = leaks[0].owner or ""
    lab, course = str(attrs.get("lab") or ""), attrs.get("course")
    tags = {naming.TAG_DEPLOYMENT: dep_id, naming.TAG_LAB: lab, naming.TAG_OWNER: owner}
    if course:
        tags[naming.TAG_COURSE] = str(course)
    return Plan(dep_id, lab, owner, str(course) if course else None, site, 0, tags, [])
