"""What the dashboard shows, read from the state store: one JSON-ready snapshot of a class.

Read through the service layer (`classroom.class_deployments`, `service.status`), as `labctl class status` reads
it, so the dashboard sees exactly what the CLI sees, on SQLite or on a PostgreSQL store shared by the staff while
`class up` writes to it. Nothing here writes. Every string that came from a roster, a cloud or an error passes
`redact.clean` (secrets masked, control characters gone); escaping for HTML is the page's job (it only ever sets
text, never markup).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from labctl import classroom, service
from labctl.errors import LabctlError
from labctl.redact import clean

#: Deployment states, in the order the page's legend lists them (`state.py`'s: planned -> destroyed).
STATES = ("planned", "applying", "up", "failed", "destroying")
PRICED_FAMILIES = ("aws", "gcp")  # on-demand prices per hour (labctl/data/prices.json); Chameleon counts SUs
MAX_ERROR = 500  # characters of one error shown on the page


def _text(value: Any, limit: int = 200) -> str:
    """A value as one line of plain text, at most `limit` characters."""
    text = clean("" if value is None else value, one_line=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Prices:
    """The price table (labctl.pricing.load_prices), looked up per site family, region and node type."""

    table: dict[str, Any]

    def per_hour(self, family: str, region: str, node_type: str) -> float | None:
        price = ((self.table.get(family) or {}).get(region) or {}).get(node_type)
        if isinstance(price, int | float) and not isinstance(price, bool) and math.isfinite(price):
            return float(price)
        return None


def _site_of(name: str) -> tuple[str, str]:
    """(family, region) of a site name; ("", "") for one this labctl does not know any more."""
    from labctl.sites import resolve

    try:
        site = resolve(name)
    except LabctlError:
        return "", ""
    return site.family, site.region


def _lease_ts(end: str | None) -> float | None:
    when = service.parse_end(end)
    return when.timestamp() if when is not None else None


def _student(ctx: service.Context, dep: Any, prices: Prices, sites: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """One student's tile: who, where, state, setup progress, lease end, error, and servers' price per hour."""
    st = service.status(ctx, dep.id)
    who = dep.data.get("student") or {}
    family, region = sites.setdefault(dep.site, _site_of(dep.site))
    setups = sorted({n.setup for n in st.nodes}) or ["-"]
    failed_steps = [f"{n.name}: {n.setup}" for n in st.nodes if n.setup.startswith("failed")]
    error = dep.data.get("error") or ("; ".join(failed_steps) if failed_steps else None)
    # Servers that exist (their type is known once made) cost money on AWS/GCP; Chameleon is not priced here.
    types = [n.node_type for n in st.nodes if n.node_type] if family in PRICED_FAMILIES else []
    costs = {t: prices.per_hour(family, region, t) for t in set(types)}
    priced = [costs[t] for t in types if costs[t] is not None]
    return {
        "id": _text(who.get("id", dep.owner)),
        "name": _text(who.get("name", "")),
        "deployment": _text(dep.id),
        "site": _text(dep.site),
        "state": _text(dep.status, 40),
        "setup": _text(", ".join(setups)),
        "nodes": len(st.nodes),
        "lease_end": _text(st.lease_end) if st.lease_end else None,
        "lease_end_ts": _lease_ts(st.lease_end),
        "error": _text(error, MAX_ERROR) if error else None,
        "cost_per_hour": sum(priced) if priced else None,
        "unpriced": sorted(_text(f"{family}/{region}/{t}") for t, c in costs.items() if c is None),
        "updated_at": dep.updated_at,
    }


def _per_site(students: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for site in sorted({s["site"] for s in students}):
        mine = [s for s in students if s["site"] == site]
        costs = [s["cost_per_hour"] for s in mine if s["cost_per_hour"] is not None]
        out.append({"site": site, "total": len(mine), "counts": dict(Counter(s["state"] for s in mine)),
                    "cost_per_hour": sum(costs) if costs else None})
    return out


def snapshot(ctx: service.Context, lab: str, course: str, prices: Prices, now: float | None = None) -> dict[str, Any]:
    """The class `course`/`lab` now: students (sorted by id), counts per site and state, failures, cost."""
    sites: dict[str, tuple[str, str]] = {}
    students = []
    for dep in classroom.class_deployments(ctx, course, lab):
        try:
            students.append(_student(ctx, dep, prices, sites))
        except LabctlError:
            continue  # forgotten by a `class down` between the listing and this read: gone from the class
    students.sort(key=lambda s: (s["id"], s["deployment"]))
    costs = [s["cost_per_hour"] for s in students if s["cost_per_hour"] is not None]
    return {
        "lab": _text(lab),
        "course": _text(course),
        "now": time.time() if now is None else now,
        "states": list(STATES),
        "total": len(students),
        "counts": dict(Counter(s["state"] for s in students)),
        "students": students,
        "sites": _per_site(students),
        "failures": [{"id": s["id"], "site": s["site"], "error": s["error"]} for s in students if s["error"]],
        "cost": {
            "per_hour": sum(costs) if costs else None,
            "currency": _text(prices.table.get("currency", ""), 8),
            "as_of": _text(prices.table.get("as_of", ""), 40),
            "unpriced": sorted({u for s in students for u in s["unpriced"]}),
        },
    }
