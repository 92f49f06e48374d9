"""Flavors, hosts and Blazar leases: reservable capacity, host requirements, lease creation, update, release,
and a lease's API view."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

from labctl.testbed.errors import HTTPError
from labctl.testbed.openstack import catalog
from labctl.testbed.openstack.catalog import PROJECT_ID, USER_ID, Site
from labctl.testbed.openstack.model.base import BEFORE_END_MINUTES, LEASE_START_DELAY, blazar_created, blazar_dt, new_id
from labctl.testbed.openstack.model.network import free_fip_numbers


def flavor_slots(db, site: Site, flavor_name: str) -> int:
    override = db.setting(site.name, f"slots:{flavor_name}")
    if override is not None:
        return int(override)
    spec = next((f for f in catalog.flavors(site) if f.name == flavor_name), None)
    return spec.slots if spec else 0


def all_flavors(db, site: Site) -> list[dict]:
    """Public flavors of the site plus the private `reservation:<id>` flavors Blazar made."""
    return _public_flavors(site) + db.find("flavor", site.name)


def flavors_by_id(db, site: Site, ids: Iterable[str]) -> dict[str, dict]:
    """The flavors with these ids (public or reserved; unknown ids left out), in one query: a server list
    needs only its servers' flavors, not every reservation's."""
    public = {f["id"]: f for f in _public_flavors(site)}
    wanted = set(ids)
    found = {i: public[i] for i in wanted if i in public}
    found.update((f["id"], f) for f in db.get_many("flavor", site.name, wanted - set(found)))
    return found


def _public_flavors(site: Site) -> list[dict]:
    return [
        {
            "id": f.id,
            "name": f.name,
            "vcpus": f.vcpus,
            "ram": f.ram,
            "disk": f.disk,
            "extra_specs": dict(f.extra_specs),
            "is_public": True,
            "created": 0.0,
        }
        for f in catalog.flavors(site)
    ]


def get_flavor(db, site: Site, ref: str) -> dict | None:
    """The flavor whose id is `ref` (a public one, or a reservation's), looked up by id."""
    if not isinstance(ref, str):
        return None
    return flavors_by_id(db, site, [ref]).get(ref)


def site_hosts(db, site: Site) -> list[catalog.Host]:
    overrides = {k: int(v) for k, v in db.settings(site.name, "hosts:").items()}
    return catalog.hosts(site, overrides)


def _overlaps(lease: dict, start: float, end: float) -> bool:
    return lease["start"] < end and start < lease["end"]


def busy_hosts(db, site: Site, start: float, end: float, exclude_lease: str | None = None) -> set[str]:
    busy: set[str] = set()
    for lease in db.find("lease", site.name):
        if lease["id"] == exclude_lease or not _overlaps(lease, start, end):
            continue
        for r in lease["reservations"]:
            busy.update(r.get("hosts", []))
    return busy


def used_flavor_slots(
    db, site: Site, flavor_name: str, start: float, end: float, exclude_lease: str | None = None
) -> int:
    used = 0
    for lease in db.find("lease", site.name):
        if lease["id"] == exclude_lease or not _overlaps(lease, start, end):
            continue
        for r in lease["reservations"]:
            if r["resource_type"] == "flavor:instance" and r.get("source_flavor_name") == flavor_name:
                used += int(r["amount"])
    return used


_OPS = ("==", "=", "!=", "<", "<=", ">", ">=")


def parse_requirements(text) -> list | None:
    """Blazar's resource_properties/hypervisor_properties: a JSON string (or list); '' means none."""
    if text in (None, "", [], "[]"):
        return None
    try:
        expr = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        raise HTTPError(400, f"Malformed requirements {text}", "MalformedRequirements") from None
    if not isinstance(expr, list):
        raise HTTPError(400, f"Malformed requirements {text}", "MalformedRequirements")
    _check_expr(expr, text)
    return expr or None


def _check_expr(expr: list, text) -> None:
    if not expr:
        return
    if expr[0] in ("and", "or"):
        for sub in expr[1:]:
            if not isinstance(sub, list):
                raise HTTPError(400, f"Malformed requirements {text}", "MalformedRequirements")
            _check_expr(sub, text)
        return
    if len(expr) != 3 or expr[0] not in _OPS or not isinstance(expr[1], str) or not expr[1].startswith("$"):
        raise HTTPError(400, f"Malformed requirements {text}", "MalformedRequirements")


def _compare(op: str, have, want) -> bool:
    if isinstance(have, bool) or isinstance(want, bool) or str(want).lower() in ("true", "false"):
        have, want = str(have).lower(), str(want).lower()
    else:
        try:
            have, want = float(have), float(want)
        except (TypeError, ValueError):
            have, want = str(have), str(want)
    try:
        return {
            "==": have == want,
            "=": have == want,
            "!=": have != want,
            "<": have < want,
            "<=": have <= want,
            ">": have > want,
            ">=": have >= want,
        }[op]
    except TypeError:
        return False


def host_matches(expr: list | None, props: dict) -> bool:
    if not expr:
        return True
    if expr[0] == "and":
        return all(host_matches(e, props) for e in expr[1:])
    if expr[0] == "or":
        return any(host_matches(e, props) for e in expr[1:])
    op, key, want = expr
    key = key[1:]
    if key not in props:
        return False
    return _compare(op, props[key], want)


def not_enough_hosts() -> HTTPError:
    # Blazar raises NotEnoughHostsAvailable in the manager; the API renders the RPC error with the
    # exception's code as both error_code and error_name (blazar/api/v1/utils.py).
    return HTTPError(500, "Not enough hosts available", "NotEnoughHostsAvailable")


def parse_lease_date(value, now: float, field: str) -> float:
    if value in (None, "now"):
        return now
    if not isinstance(value, str):
        raise HTTPError(400, f"{value} is an invalid date. Required format: %Y-%m-%d %H:%M", "InvalidDate")
    for fmt in (
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S.%f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ):
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    raise HTTPError(400, f"{value} is an invalid date. Required format: %Y-%m-%d %H:%M", "InvalidDate")


def lease_status(lease: dict, now: float) -> str:
    if now < lease["active_at"]:
        return "PENDING"
    if lease.get("error"):
        return "ERROR"
    if now >= lease["end"]:
        return "TERMINATED"
    return "ACTIVE"


def reservation_status(lease: dict, now: float) -> str:
    return {"PENDING": "pending", "ACTIVE": "active", "ERROR": "error", "TERMINATED": "deleted"}[
        lease_status(lease, now)
    ]


def find_reservation(db, site: Site, reservation_id: str) -> tuple[dict, dict] | None:
    if not isinstance(reservation_id, str):
        return None
    for lease in db.find_by_item("lease", site.name, "reservations", "id", reservation_id):
        for r in lease["reservations"]:
            if r["id"] == reservation_id:
                return lease, r
    return None


def _before_end(start: float, end: float) -> float:
    return max(start, end - BEFORE_END_MINUTES * 60)


def create_lease(db, site: Site, body: dict, now: float, scale: float, *, error: bool = False) -> dict:
    if not isinstance(body, dict) or not body.get("name"):
        raise HTTPError(400, "Missing parameter name", "MissingParameter")
    name = body["name"]
    if isinstance(name, str) and db.count("lease", site.name, name=name):
        raise HTTPError(409, f"The lease with name: {name} already exists", "LeaseNameAlreadyExists")
    start = parse_lease_date(body.get("start_date", "now"), now, "start_date")
    if "end_date" not in body:
        raise HTTPError(400, "Missing parameter end_date", "MissingParameter")
    end = parse_lease_date(body.get("end_date"), now, "end_date")
    if body.get("start_date", "now") != "now" and start < now - 60:
        raise HTTPError(400, "Start date must be later than current date", "InvalidInput")
    if end <= start:
        raise HTTPError(400, "End date must be later than start date.", "InvalidInput")
    before_end = (
        parse_lease_date(body["before_end_date"], now, "before_end_date")
        if body.get("before_end_date")
        else _before_end(start, end)
    )
    lease_id = new_id()
    reservations = []
    claimed: set[str] = set()
    requested = body.get("reservations") or []
    if not isinstance(requested, list) or not all(isinstance(r, dict) for r in requested):
        raise HTTPError(400, "Malformed parameter reservations", "MalformedParameter")
    for req in requested:
        reservations.append(_reserve(db, site, lease_id, req, start, end, claimed))
    active_at = max(start, now) + LEASE_START_DELAY * scale
    lease = {
        "id": lease_id,
        "name": name,
        "site": site.name,
        "project_id": PROJECT_ID,
        "user_id": USER_ID,
        "created": now,
        "updated": None,
        "start": start,
        "end": end,
        "active_at": active_at,
        "before_end": before_end,
        "error": bool(error),
        "reservations": reservations,
        "events": {e: new_id() for e in ("start_lease", "before_end_lease", "end_lease")},
        "trust_id": uuid.uuid4().hex,
        "phase": "pending",
        "t_next": active_at,
    }
    for r in reservations:
        if r["resource_type"] == "flavor:instance":
            _create_reserved_flavor(db, site, lease, r, now)
    return db.put("lease", site.name, lease)


def _reserve(db, site: Site, lease_id: str, req: dict, start: float, end: float, claimed: set[str]) -> dict:
    rtype = req.get("resource_type")
    base = {
        "id": new_id(),
        "lease_id": lease_id,
        "resource_id": new_id(),
        "resource_type": rtype,
        "created": time.time(),
    }
    if rtype == "physical:host" and site.kind == "baremetal":
        try:
            lo, hi = int(req.get("min", 1)), int(req.get("max", req.get("min", 1)))
        except (TypeError, ValueError):
            raise HTTPError(400, "Malformed parameter min/max", "MalformedParameter") from None
        if lo < 1 or hi < lo:
            raise HTTPError(
                400,
                "Invalid values for min/max of hosts. Max must be equal to or larger than min.",
                "InvalidRange",
            )
        props = req.get("resource_properties", "")
        expr = parse_requirements(props)
        parse_requirements(req.get("hypervisor_properties", ""))
        busy = busy_hosts(db, site, start, end) | claimed
        free = [h for h in site_hosts(db, site) if h.id not in busy and host_matches(expr, h.properties())]
        if len(free) < lo:
            raise not_enough_hosts()
        chosen = [h.id for h in free[:hi]]
        claimed.update(chosen)
        props_text = props if isinstance(props, str) else json.dumps(props)
        return {
            **base,
            "min": lo,
            "max": hi,
            "resource_properties": props_text,
            "hypervisor_properties": req.get("hypervisor_properties", "") or "",
            "before_end": req.get("before_end", "default"),
            "on_start": req.get("on_start", "default"),
            "on_end": req.get("on_end", "default"),
            "hosts": chosen,
        }
    if rtype == "flavor:instance" and site.kind == "kvm":
        try:
            amount = int(req.get("amount", 1))
        except (TypeError, ValueError):
            raise HTTPError(400, "Malformed parameter amount", "MalformedParameter") from None
        if amount < 1:
            raise HTTPError(400, "Malformed parameter amount", "MalformedParameter")
        if not req.get("flavor_id"):
            raise HTTPError(400, "Missing parameter flavor_id", "MissingParameter")
        source = next((f for f in catalog.flavors(site) if req["flavor_id"] in (f.id, f.name)), None)
        if source is None:
            raise HTTPError(404, f"Flavor {req['flavor_id']} could not be found.", "NotFound")
        slots = flavor_slots(db, site, source.name)
        if used_flavor_slots(db, site, source.name, start, end) + amount > slots:
            raise not_enough_hosts()
        return {
            **base,
            "amount": amount,
            "affinity": req.get("affinity"),
            "source_flavor_id": source.id,
            "source_flavor_name": source.name,
            "vcpus": source.vcpus,
            "memory_mb": source.ram,
            "disk_gb": source.disk,
            "flavor_id": base["id"],
            "resource_properties": json.dumps(
                {
                    "id": source.id,
                    "name": source.name,
                    "vcpus": source.vcpus,
                    "ram": source.ram,
                    "disk": source.disk,
                    "OS-FLV-EXT-DATA:ephemeral": 0,
                    "extra_specs": source.extra_specs,
                }
            ),
            "aggregate_id": db.counter(f"aggregate:{site.name}", 10),
        }
    if rtype == "virtual:floatingip" and site.kind in ("baremetal", "kvm"):
        try:
            amount = int(req.get("amount", 1))
        except (TypeError, ValueError):
            raise HTTPError(400, "Malformed parameter amount", "MalformedParameter") from None
        if req.get("network_id") != catalog.public_net_id(site):
            raise HTTPError(
                400,
                f"Network {req.get('network_id')} is not a public network with floating IPs",
                "InvalidInput",
            )
        pending = sum(
            int(r.get("amount", 0))
            for lease in db.find("lease", site.name)
            if lease["phase"] == "pending" and _overlaps(lease, start, end)
            for r in lease["reservations"]
            if r["resource_type"] == "virtual:floatingip"
        )
        if amount < 1 or amount + pending > len(free_fip_numbers(db, site)):
            raise HTTPError(400, "Not enough floating IPs available", "NotEnoughFloatingIPAvailable")
        return {
            **base,
            "network_id": req["network_id"],
            "amount": amount,
            "required_floatingips": req.get("required_floatingips", []),
        }
    raise HTTPError(500, f"The {rtype} resource type is not supported", "UnsupportedResourceType")


def _create_reserved_flavor(db, site: Site, lease: dict, r: dict, now: float) -> None:
    source = get_flavor(db, site, r["source_flavor_id"])
    rid = r["id"]
    specs = dict(source["extra_specs"])
    specs["aggregate_instance_extra_specs:reservation"] = rid
    specs["resources:CUSTOM_RESERVATION_" + rid.upper().replace("-", "_")] = "1"
    db.put(
        "flavor",
        site.name,
        {
            "id": rid,
            "name": f"reservation:{rid}",
            "vcpus": source["vcpus"],
            "ram": source["ram"],
            "disk": source["disk"],
            "extra_specs": specs,
            "is_public": False,
            "lease_id": lease["id"],
            "reservation_id": rid,
            "source_flavor_name": r["source_flavor_name"],
            "created": now,
        },
    )


def update_lease(db, site: Site, lease: dict, body: dict, now: float) -> dict:
    status = lease_status(lease, now)
    if status == "TERMINATED":
        raise HTTPError(400, "Cannot update a lease that has already ended", "InvalidInput")
    start, end = lease["start"], lease["end"]
    if body.get("name"):
        named = db.find("lease", site.name, name=body["name"]) if isinstance(body["name"], str) else []
        if any(x["id"] != lease["id"] for x in named):
            raise HTTPError(
                409, f"The lease with name: {body['name']} already exists", "LeaseNameAlreadyExists"
            )
        lease["name"] = body["name"]
    if body.get("start_date"):
        new_start = parse_lease_date(body["start_date"], now, "start_date")
        if new_start != start:
            if status != "PENDING":
                raise HTTPError(400, "Cannot modify the start date of already started leases", "InvalidInput")
            if new_start < now - 60:
                raise HTTPError(400, "Start date must be later than current date", "InvalidInput")
            start = new_start
    for key, sign in (("defer_by", 1), ("advance_by", -1)):
        if body.get(key):
            if status != "PENDING":
                raise HTTPError(400, "Cannot modify the start date of already started leases", "InvalidInput")
            start += sign * _elapsed(body[key])
    if body.get("end_date"):
        end = parse_lease_date(body["end_date"], now, "end_date")
    if body.get("prolong_for"):
        end += _elapsed(body["prolong_for"])
    if body.get("reduce_by"):
        end -= _elapsed(body["reduce_by"])
    if end <= start or end <= now:
        raise HTTPError(400, "End date must be later than start date and current date.", "InvalidInput")
    # The hosts and slots the lease already holds must stay free over the new window.
    busy = busy_hosts(db, site, start, end, exclude_lease=lease["id"])
    for r in lease["reservations"]:
        if set(r.get("hosts", [])) & busy:
            raise not_enough_hosts()
        if r["resource_type"] == "flavor:instance":
            used = used_flavor_slots(db, site, r["source_flavor_name"], start, end, exclude_lease=lease["id"])
            if used + int(r["amount"]) > flavor_slots(db, site, r["source_flavor_name"]):
                raise not_enough_hosts()
    if start != lease["start"]:
        lease["active_at"] += start - lease["start"]
    lease.update(start=start, end=end, updated=now)
    if not body.get("before_end_date"):
        lease["before_end"] = _before_end(start, end)
    lease["t_next"] = lease["active_at"] if lease["phase"] == "pending" else end
    return db.put("lease", site.name, lease)


def _elapsed(text: str) -> float:
    """Blazar's "1h", "30m", "2d", "45s" (and "1w")."""
    text = str(text).strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        if text[-1].isdigit():
            return float(text) * 86400
        return float(text[:-1]) * units[text[-1].lower()]
    except (KeyError, ValueError, IndexError):
        raise HTTPError(400, f"Unsupported time format {text}", "InvalidInput") from None


def lease_view(lease: dict, now: float) -> dict:
    status = lease_status(lease, now)
    rstatus = reservation_status(lease, now)
    created = blazar_created(lease["created"])
    updated = blazar_created(lease["updated"]) if lease.get("updated") else None
    reservations = []
    for r in lease["reservations"]:
        view = {
            "id": r["id"],
            "lease_id": lease["id"],
            "resource_id": r["resource_id"],
            "resource_type": r["resource_type"],
            "status": rstatus,
            "missing_resources": False,
            "resources_changed": False,
            "created_at": created,
            "updated_at": updated,
        }
        if r["resource_type"] == "physical:host":
            view.update(
                min=r["min"],
                max=r["max"],
                resource_properties=r["resource_properties"],
                hypervisor_properties=r["hypervisor_properties"],
                before_end=r["before_end"],
                on_start=r["on_start"],
                on_end=r["on_end"],
            )
        elif r["resource_type"] == "flavor:instance":
            view.update(
                amount=r["amount"],
                affinity=r["affinity"],
                flavor_id=r["flavor_id"],
                vcpus=r["vcpus"],
                memory_mb=r["memory_mb"],
                disk_gb=r["disk_gb"],
                resource_properties=r["resource_properties"],
                aggregate_id=r["aggregate_id"],
                server_group_id=None,
            )
        elif r["resource_type"] == "virtual:floatingip":
            view.update(
                network_id=r["network_id"], amount=r["amount"], required_floatingips=r["required_floatingips"]
            )
        reservations.append(view)
    times = {
        "start_lease": lease["active_at"],
        "before_end_lease": lease["before_end"],
        "end_lease": lease["end"],
    }
    shown = {
        "start_lease": lease["start"],
        "before_end_lease": lease["before_end"],
        "end_lease": lease["end"],
    }
    events = []
    for etype, eid in lease["events"].items():
        done = now >= times[etype]
        estatus = "DONE" if done else "UNDONE"
        if etype == "start_lease" and done and lease.get("error"):
            estatus = "ERROR"
        if lease.get("error") and etype != "start_lease" and now >= lease["active_at"]:
            estatus = "UNDONE"
        events.append(
            {
                "id": eid,
                "lease_id": lease["id"],
                "event_type": etype,
                "time": blazar_dt(shown[etype]),
                "status": estatus,
                "created_at": created,
                "updated_at": updated,
            }
        )
    return {
        "id": lease["id"],
        "name": lease["name"],
        "start_date": blazar_dt(lease["start"]),
        "end_date": blazar_dt(lease["end"]),
        "status": status,
        "degraded": False,
        "user_id": lease["user_id"],
        "project_id": lease["project_id"],
        "trust_id": lease["trust_id"],
        "created_at": created,
        "updated_at": updated,
        "reservations": reservations,
        "events": events,
    }
