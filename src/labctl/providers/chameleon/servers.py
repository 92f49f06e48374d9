"""Nova: key pairs and servers (on a lease's reservation or a plain flavor, with ports on private networks)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from labctl import naming
from labctl.errors import CloudError, UserError
from labctl.providers.base import Found, create_or_adopt, create_or_find
from labctl.providers.chameleon.network import ensure_port
from labctl.providers.chameleon.session import DELETE_TIMEOUT, TABLE, Session
from labctl.providers.kit import Handler, poll_until
from labctl.redact import clean

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource


@TABLE.handler("keypair")
class Keypairs(Handler):
    ctx: Session

    def get(self, name: str) -> Any:
        """One GET /os-keypairs/NAME (find_keypair would also list every key pair after a 404)."""
        return self.ctx.call("get keypair", lambda: self.ctx.conn.compute.get_keypair(name), missing_ok=True)

    def find(self, res: Resource, plan: Plan) -> Found | None:
        kp = self.get(res.name)
        if kp is None:
            return None
        if kp.public_key and kp.public_key.split()[:2] != res.spec["public_key"].split()[:2]:
            return Found("keypair", res.name, res.name, status="incomplete")  # stale key: replace it
        return Found("keypair", res.name, res.name)

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        s = self.ctx
        if s.found_before_create(res, plan) is not None:  # another key under this name: replace it
            s.call("delete stale keypair", lambda: s.conn.compute.delete_keypair(res.name, ignore_missing=True))

        def create() -> Found:
            s.call("create keypair", lambda: s.conn.compute.create_keypair(
                name=res.name, public_key=res.spec["public_key"]))
            return Found("keypair", res.name, res.name)

        def adopt() -> Found | None:
            # Made by a retry after a lost answer or by a concurrent run: fine if it holds this key.
            again = self.find(res, plan)
            return again if again is not None and again.status == "ready" else None

        return create_or_adopt(create, adopt)

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        for f in found:
            self.ctx.call("delete keypair", lambda f=f: self.ctx.conn.compute.delete_keypair(
                f.name, ignore_missing=True))

    def owned(self, plan: Plan) -> list[Found]:
        kp = self.get(plan.deployment)
        return [Found("keypair", kp.name, kp.name)] if kp is not None else []


@TABLE.handler("server")
class Servers(Handler):
    ctx: Session

    def find(self, res: Resource, plan: Plan) -> Found | None:
        servers = self.ctx.servers_named(f"^{re.escape(res.name)}$", plan)
        live = [s for s in servers if s.status not in ("DELETED", "SOFT_DELETED")]
        if not live:
            return None
        # Prefer a healthy one if an earlier run left an ERROR twin; the twin is swept by `down`.
        live.sort(key=lambda s: s.status == "ERROR")
        return server_found(self.ctx, live[0])

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        s, spec = self.ctx, res.spec
        image = s.lookup(f"image:{spec['image']}", "find image", lambda: s.conn.image.find_image(spec["image"]))
        if image is None:
            raise UserError(f"{s.site.name}: image '{spec['image']}' not found at this site")
        hints: dict[str, str] = {}
        if spec.get("reservation"):
            lease = deps[spec["reservation"]]
            if s.site.reservation == "flavor":
                flavor_name = f"reservation:{lease.attrs['reservation_id']}"
            else:
                flavor_name = "baremetal"
                hints["reservation"] = lease.attrs["reservation_id"]
        else:
            flavor_name = candidate or spec["candidates"][0]
        flavor = s.flavor(flavor_name)
        if flavor is None:
            raise CloudError(f"{s.site.name}: flavor '{flavor_name}' not found")
        nics: list[dict[str, str]] = [{"uuid": s.network().id}]
        for net in spec.get("networks") or []:
            nics.append({"port": ensure_port(s, spec["node"], net, deps, plan)})
        kwargs: dict[str, Any] = dict(name=res.name, image_id=image.id, flavor_id=flavor.id,
                                      key_name=deps["keypair"].name, networks=nics,
                                      metadata={**plan.tags, naming.TAG_NODE: spec["node"]})
        if hints:
            kwargs["scheduler_hints"] = hints
        if "secgroup" in deps:
            # By id: Neutron names are not unique (a concurrent run may have made a twin for a moment).
            kwargs["security_groups"] = [{"name": deps["secgroup"].cloud_id}]
        def launch() -> Found:
            server = s.call(f"launch {spec['node']}", lambda: s.conn.compute.create_server(**kwargs), resend=False)
            return Found("server", server.id, res.name, status="pending", attrs={"node": spec["node"]})

        return create_or_find(launch, lambda: self.find(res, plan))

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        s = self.ctx
        for f in found:
            s.call("delete server", lambda f=f: s.conn.compute.delete_server(f.cloud_id, ignore_missing=True))
        ids = {f.cloud_id for f in found}
        poll_until(lambda: ({x.id for x in s.polled_servers(plan)} & ids) or None, status=lambda _left: "deleting",
                   pending=("deleting",), target=("gone",), timeout=DELETE_TIMEOUT, interval=s.poll_interval,
                   not_found_checks=1, what=f"{s.site.name}: servers {sorted(ids)}")

    def status(self, res: Resource, found: Found, plan: Plan) -> Found | None:
        server = next((x for x in self.ctx.polled_servers(plan) if x.id == found.cloud_id), None)
        return server_found(self.ctx, server) if server else None

    def progress(self, res: Resource, found: Found) -> tuple[str, str, str]:
        stage = {"pending": "building", "ready": "booted", "error": "error"}[found.status]
        return (res.spec["node"], stage, found.error or "")

    def owned(self, plan: Plan) -> list[Found]:
        return [server_found(self.ctx, x) for x in self.ctx.servers_named(f"^{re.escape(plan.deployment)}-", plan)]


def server_found(s: Session, server: Any) -> Found:
    fixed, floating = None, None
    addresses = dict(server.addresses or {})
    private = {net: a.get("addr") for net, addrs in addresses.items() if net != s.site.network
               for a in addrs if a.get("OS-EXT-IPS:type") != "floating"}
    for _net, addrs in sorted(addresses.items(), key=lambda kv: kv[0] != s.site.network):  # site network first
        for a in addrs:
            if a.get("OS-EXT-IPS:type") == "floating":
                floating = a.get("addr")
            elif fixed is None:
                fixed = a.get("addr")
    status = {"ACTIVE": "ready", "ERROR": "error"}.get(server.status, "pending")
    error = None
    if status == "error":
        fault = server.fault or {}
        error = fault.get("message") if isinstance(fault, dict) else str(fault)
        error = clean(error, one_line=True) if error else "server went to ERROR"
    return Found("server", server.id, server.name, status=status, error=error, attrs={
        "node": (server.metadata or {}).get(naming.TAG_NODE), "fixed_ip": fixed, "floating_ip": floating,
        "server_status": server.status, **({"private_ips": private} if private else {})})
