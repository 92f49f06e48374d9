"""What a plan will cost before `up`: on-demand dollars on AWS/GCP, allocation hours (SUs) on Chameleon.

The price table ships with the package (`labctl/data/prices.json`, dated, with its source named); `--prices FILE`
replaces it with a file of the same shape. Kept cheap to import: json and dataclasses only.

Chameleon rule (ChameleonCloud/docs, source/user/project.rst, "Service Units"): one SU is one hour of one
allocatable resource -- a physical host, a network segment or a floating IP -- e.g. 5 Skylake nodes for 8 hours is
40 SUs; "for certain types of resources, more SUs will be charged". Those per-type multipliers could not be
confirmed, so only factors listed in the price file's `chameleon.su_factors` are applied and the output says the
figure is a minimum otherwise. No documented SU rule for KVM@TACC flavor reservations was found: the estimate says
so instead of guessing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labctl import inputs
from labctl.errors import UserError
from labctl.redact import strip_control

DEFAULT_PRICES = Path(__file__).parent / "data" / "prices.json"
MAX_PRICES_BYTES = inputs.MAX_PRICES_BYTES  # 10 MiB
_PROVIDERS = ("aws", "gcp")


@dataclass
class Line:
    node: str
    types: list[str]  # candidates in order; the estimate prices the first one
    hours: float
    unit_price: float | None = None  # per hour (AWS/GCP)
    cost: float | None = None
    sus: float | None = None  # Chameleon
    note: str = ""

    @property
    def type(self) -> str:
        return self.types[0] if self.types else "-"

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "type": self.type, "fallbacks": self.types[1:], "hours": self.hours,
                "unit_price": self.unit_price, "cost": self.cost, "sus": self.sus, "note": self.note}


@dataclass
class Estimate:
    kind: str  # "cost" (AWS/GCP), "sus" (Chameleon bare metal), "unknown" (no confirmed rule)
    region: str
    lines: list[Line]
    total: float | None
    currency: str = ""
    as_of: str = ""
    source: str = ""
    complete: bool = True  # False: some node has no price / the SU figure is a lower bound
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "region": self.region, "currency": self.currency, "as_of": self.as_of,
                "source": self.source, "total": self.total, "complete": self.complete,
                "lines": [line.to_json() for line in self.lines], "notes": list(self.notes)}


# ---------------------------------------------------------------------------------------------- loading
def load_prices(path: str | Path | None = None) -> dict[str, Any]:
    """The shipped table, or `path` (same shape). A bad file is a one-line UserError naming it."""
    file = Path(path) if path else DEFAULT_PRICES
    shown = str(path) if path else str(file)
    # Only a regular file of at most MAX_PRICES_BYTES (not /dev/zero, not a FIFO that would block).
    raw = inputs.read_regular_file(file, MAX_PRICES_BYTES, "price file", shown=shown)
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise UserError(f"{shown}: not a UTF-8 text file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{shown}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except ValueError as exc:  # NaN/Infinity, or an integer with thousands of digits
        raise UserError(f"{shown}: not a usable price table ({exc})") from None
    except RecursionError:
        raise UserError(f"{shown}: not a price table (JSON nested far too deeply)") from None
    problem = _check(data)
    if problem:
        raise UserError(strip_control(f"{shown}: {problem}", one_line=True))
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a price")


def _number(value: Any) -> bool:
    """A finite number >= 0 (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value >= 0


def _check(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "the top level must be an object with as_of, source, currency and aws/gcp price tables"
    for key in ("as_of", "source", "currency"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            return f"'{key}' must be a non-empty string"
    if not any(p in data for p in _PROVIDERS):
        return "no 'aws' or 'gcp' price table"
    for provider in _PROVIDERS:
        regions = data.get(provider, {})
        if not isinstance(regions, dict):
            return f"'{provider}' must map region -> {{instance type: hourly price}}"
        for region, types in regions.items():
            if not isinstance(types, dict):
                return f"{provider}.{region} must map instance type -> hourly price"
            for name, price in types.items():
                if not _number(price):
                    return f"{provider}.{region}.{name}: price must be a number >= 0, not {_short(price)}"
    cham = data.get("chameleon")
    if cham is not None:
        if not isinstance(cham, dict):
            return "'chameleon' must be an object"
        factors = cham.get("su_factors", {})
        if not isinstance(factors, dict) or not all(_number(v) for v in factors.values()):
            return "chameleon.su_factors must map node type -> a number >= 0"
        for key in ("su_per_host_hour", "su_per_floating_ip_hour"):
            if not _number(cham.get(key, 1)):
                return f"chameleon.{key} must be a number >= 0"
        if not isinstance(cham.get("source", ""), str):
            return "chameleon.source must be a string"
    for key in ("caveats", "components"):
        if key in data and not isinstance(data[key], dict):
            return f"'{key}' must be an object"
    if not all(isinstance(v, str) for v in (data.get("caveats") or {}).values()):
        return "caveats must map provider/region/type -> a string"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -------------------------------------------------------------------------------------------- estimating
def estimate(plan: Any, prices: dict[str, Any]) -> Estimate:
    """One line per node of `plan` (hours = the profile's lease_hours) and a total."""
    site = plan.site
    hours = float(plan.lease_hours)
    if site.family in _PROVIDERS:
        return _cloud_estimate(plan, prices, site.family, site.region, hours)
    if site.family == "chi":
        return _su_estimate(plan, prices, hours)
    reason = ("no documented SU rule for KVM@TACC flavor reservations was found; check the Chameleon FAQ"
              if site.family == "kvm" else f"no cost rule for {site.family} sites")
    lines = [Line(n.name, list(n.candidates), hours, note="not estimated") for n in plan.nodes]
    return Estimate("unknown", site.region, lines, None, complete=False,
                    source=(prices.get("chameleon") or {}).get("source", ""), notes=[reason])


def _cloud_estimate(plan: Any, prices: dict[str, Any], provider: str, region: str, hours: float) -> Estimate:
    table = (prices.get(provider) or {}).get(region, {})
    caveats = prices.get("caveats") or {}
    lines: list[Line] = []
    notes: list[str] = []
    for node in plan.nodes:
        line = Line(node.name, list(node.candidates), hours)
        unit = table.get(line.type)
        if unit is None:
            line.note = "no price"
        else:
            line.unit_price = float(unit)
            line.cost = float(unit) * hours
            caveat = caveats.get(f"{provider}/{region}/{line.type}")
            if caveat and caveat not in notes:
                notes.append(f"{line.type}: {caveat}")
        lines.append(line)
    priced = [line.cost for line in lines if line.cost is not None]
    complete = len(priced) == len(lines)
    if not table:
        notes.append(f"the price table has no {provider} region {region}")
    elif not complete:
        missing = sorted({line.type for line in lines if line.cost is None})
        notes.append(f"no price for {', '.join(missing)} in {region}: the total leaves them out")
    total = sum(priced) if priced else None
    return Estimate("cost", region, lines, total, currency=prices.get("currency", ""),
                    as_of=prices.get("as_of", ""), source=prices.get("source", ""), complete=complete, notes=notes)


def _su_estimate(plan: Any, prices: dict[str, Any], hours: float) -> Estimate:
    cham = prices.get("chameleon") or {}
    per_host = float(cham.get("su_per_host_hour", 1))
    per_fip = float(cham.get("su_per_floating_ip_hour", 1))
    factors = cham.get("su_factors") or {}
    lines: list[Line] = []
    unconfirmed: set[str] = set()
    for node in plan.nodes:
        line = Line(node.name, list(node.candidates), hours)
        factor = factors.get(line.type)
        if factor is None:
            factor = 1.0
            unconfirmed.add(line.type)
        sus = per_host * float(factor) * hours + (per_fip * hours if node.floating_ip else 0.0)
        line.sus = sus
        if node.floating_ip:
            line.note = "incl. floating IP"
        lines.append(line)
    notes = ["1 SU = 1 hour of one host or floating IP (ChameleonCloud docs, 'Service Units')"]
    if unconfirmed:
        notes.append(f"Chameleon charges more SUs for some node types; no confirmed factor for "
                     f"{', '.join(sorted(unconfirmed))}, so this is a minimum")
    total = sum(line.sus or 0.0 for line in lines)
    return Estimate("sus", plan.site.region, lines, total, source=cham.get("source", ""),
                    complete=not unconfirmed, notes=notes)
