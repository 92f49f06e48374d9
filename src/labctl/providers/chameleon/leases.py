"""Blazar leases (the plan's "reservation" kind): a host or flavor reservation per role and candidate type.

A lease in ERROR is a Found in error (the engine tries the next type); a taken lease name is a concurrent run's
lease (or a lost answer's), adopted. Blazar keeps no tags: `list_owned` knows a deployment's leases by the
plan's names, `inventory` those the key pairs record in their comments. A deployment's key pair names its leases;
a class's (one per site, the students share it) gives `DEPLOYMENT_GLOB:ROLE` marks, e.g. `labctl-ml-*-hello:node`:
a lease named `<deployment>-<role>` whose deployment fits the glob is that deployment's, and the glob's `*` its
owner (the student)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from labctl.errors import UserError
from labctl.providers.base import Found, create_or_adopt
from labctl.providers.chameleon.session import BLAZAR_DATE, TABLE, Session, iso_utc, kept, parse_lease_date
from labctl.providers.kit import Handler

if TYPE_CHECKING:
    from labctl.plan import Plan, ReservationSpec, Resource

LEASE_DONE = ("TERMINATED", "DELETED", "DELETING", "TERMINATING")


@TABLE.handler("reservation")
class Leases(Handler):
    noun = "lease"
    ctx: Session

    def find(self, res: Resource, plan: Plan) -> Found | None:
        """From the list of leases the class shares (fetched after this session's last create of the name)."""
        live = self.live(plan, newer_than=self.ctx.written(self.kind, res.name))
        return next((lease_found(x) for x in live if x["name"] == res.name), None)

    def look(self, res: Resource, plan: Plan) -> Found | None:
        """From a list of its own (Blazar filters leases by nothing)."""
        leases = self.ctx.call("list leases", lambda: list_leases(self.ctx))
        return next((lease_found(x) for x in leases if x["name"] == res.name and x["status"] not in LEASE_DONE), None)

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        s, spec = self.ctx, cast("ReservationSpec", res.spec)
        count = spec["count"]
        if spec["kind"] == "host":
            reservation: dict[str, Any] = {
                "resource_type": "physical:host", "resource_properties": json.dumps(["==", "$node_type", candidate]),
                "hypervisor_properties": "", "min": count, "max": count,
            }
        else:
            flavor = s.flavor(str(candidate))
            if flavor is None:
                raise UserError(f"{s.site.name}: flavor '{candidate}' does not exist at this site")
            reservation = {"resource_type": "flavor:instance", "flavor_id": flavor.id, "amount": count}
        end = datetime.now(UTC) + timedelta(hours=spec["hours"])

        def create() -> Found:
            lease = s.call(f"create lease {res.name} ({candidate})", lambda: s.blazar.lease.create(
                name=res.name, start="now", end=end.strftime(BLAZAR_DATE), reservations=[reservation], events=[]))
            found = lease_found(lease)
            found.attrs["node_type"] = candidate
            return found

        # Lease names are unique in a project: a taken name is a concurrent run's lease (or a lost answer's).
        return create_or_adopt(create, lambda: self.look(res, plan))

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        for f in found:
            self.ctx.call("delete lease", lambda f=f: self.ctx.blazar.lease.delete(f.cloud_id), missing_ok=True)

    def status(self, res: Resource, found: Found, plan: Plan) -> Found | None:
        leases = self.ctx.polled("leases", lambda: list_leases(self.ctx))
        lease = next((x for x in leases if x["id"] == found.cloud_id), None)
        return lease_found(lease, found) if lease else None

    def progress(self, res: Resource, found: Found) -> tuple[str, str, str]:
        return (res.key, "lease " + found.attrs.get("lease_status", "?").lower(), "")

    def live(self, plan: Plan | None, newer_than: float = -1e18) -> list[Any]:
        return [x for x in self.ctx.project_list("leases", lambda: list_leases(self.ctx), plan,
                                                 newer_than=newer_than) if x["status"] not in LEASE_DONE]

    def owned(self, plan: Plan) -> list[Found]:
        names = {r.name for r in plan.by_kind("reservation")}
        return [Found("reservation", x["id"], x["name"]) for x in self.live(plan, self.ctx.changed(plan.deployment))
                if x["name"] in names]

    def inventory(self, marks: Sequence[tuple[str, str]]) -> list[Found]:
        """The live leases the key pairs' `marks` (mark, the key pair's deployment) name, never a lease for its
        name alone: a lease name is its key pair's deployment's; a class's mark gives the deployment and owner its
        glob matches."""
        named = {mark: deployment for mark, deployment in marks if ":" not in mark}
        patterns = [mark.split(":", 1) for mark, _ in marks if ":" in mark]
        found = []
        for lease in self.live(None, self.ctx.changed(None)):
            owner = None
            deployment = named.get(lease["name"])
            if deployment is None:
                deployment, owner = class_lease_owner(lease["name"], patterns)
            if deployment is not None:
                found.append(lease_found(lease))
                found[-1].attrs.update(deployment=deployment, created=iso_utc(lease.get("created_at")))
                if owner:
                    found[-1].attrs["owner"] = owner
        return found


# What `lease_found` and the lookups read of a listed lease (Blazar lists each with its reservations and events).
LEASE_FIELDS = kept({"end_date": None, "degraded": None, "reservations": ("id", "resource_properties")})


def class_lease_owner(name: str, patterns: Sequence[Sequence[str]]) -> tuple[str | None, str | None]:
    """(deployment, owner) of the lease `name` by a class's (glob, role) marks; (None, None) if none fits."""
    for glob, role in patterns:
        prefix, _, suffix = glob.partition("*")
        deployment = name.removesuffix(f"-{role}")
        if (deployment != name and deployment.startswith(prefix) and deployment.endswith(suffix)
                and len(deployment) > len(prefix) + len(suffix)):
            return deployment, deployment[len(prefix): len(deployment) - len(suffix)]
    return None, None


def list_leases(s: Session) -> list[Any]:
    return [LEASE_FIELDS(lease) for lease in s.blazar.lease.list()]


def extend(s: Session, found: Found, hours: float) -> Found:
    lease = s.call("get lease", lambda: s.blazar.lease.get(found.cloud_id))
    end = parse_lease_date(lease["end_date"]) + timedelta(hours=hours)
    lease = s.call("extend lease", lambda: s.blazar.lease.update(found.cloud_id, end_date=end.strftime(BLAZAR_DATE)))
    found.attrs["end"] = parse_lease_date(lease["end_date"]).isoformat()
    return found


def lease_found(lease: Mapping[str, Any], previous: Found | None = None) -> Found:
    status = lease["status"]
    reservations = lease.get("reservations") or []
    attrs = dict(previous.attrs) if previous else {}
    attrs.update(lease_status=status, reservation_id=reservations[0]["id"] if reservations else None,
                 end=parse_lease_date(lease["end_date"]).isoformat())
    properties = (reservations[0].get("resource_properties") or "") if reservations else ""
    if m := re.search(r'"\$node_type",\s*"([^"]+)"', properties):
        attrs["node_type"] = m.group(1)
    if status == "ERROR":
        reason = (lease.get("degraded") and "degraded") or "lease went to ERROR (not enough hosts?)"
        return Found("reservation", lease["id"], lease["name"], status="error", attrs=attrs, error=reason)
    return Found("reservation", lease["id"], lease["name"], status="ready" if status == "ACTIVE" else "pending",
                 attrs=attrs)
