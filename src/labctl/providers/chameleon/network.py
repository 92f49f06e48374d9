"""Neutron: security groups, private networks, subnets, routers, the ports made for servers on private networks,
and floating IPs (allocated per node onto its port, described with the deployment and node, deleted explicitly).

Neutron does not keep names unique: every lookup is by name *and* the deployment in the description."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from labctl.errors import CloudError, Conflict
from labctl.providers.base import Found, converge_created, create_or_adopt, create_or_find
from labctl.providers.chameleon.session import TABLE, Session, deployment_of, description
from labctl.providers.kit import Handler

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource

log = logging.getLogger(__name__)


@TABLE.handler("secgroup")
class SecurityGroups(Handler):
    ctx: Session

    def named(self, res: Resource, plan: Plan) -> list[Any]:
        groups = self.ctx.call("list security groups",
                               lambda: list(self.ctx.conn.network.security_groups(name=res.name)))
        return [g for g in groups if deployment_of(g.description) == plan.deployment]

    def find(self, res: Resource, plan: Plan) -> Found | None:
        mine = self.named(res, plan)
        if not mine:
            return None
        # Two runs that raced may have left two: every run takes the same one (`rank`).
        sg = min(mine, key=lambda g: (rank(g, res), g.id))
        return Found("secgroup", sg.id, sg.name, status="ready" if has_rules(sg, res) else "incomplete")

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        s = self.ctx
        existing = s.found_before_create(res, plan)
        if existing is None:
            started = time.monotonic()
            sg = create_or_find(
                lambda: s.call("create security group", lambda: s.conn.network.create_security_group(
                    name=res.name, description=description(plan.deployment)), resend=False),
                lambda: min(self.named(res, plan), key=lambda g: (rank(g, res), g.id), default=None))
            # Neutron does not keep names unique: a concurrent run (other state, other machine) may have made
            # one too. Both keep the same; the one that lost deletes its own.
            survivor = converge_created(
                sg, time.monotonic() - started, lambda: self.named(res, plan),
                lambda g: s.call("delete duplicate security group",
                                 lambda: s.conn.network.delete_security_group(g.id, ignore_missing=True)),
                ident=lambda g: g.id, rank=lambda g: rank(g, res))
            if survivor.id != sg.id:
                log.info("%s: security group %s was made twice (a concurrent run); using %s", s.site.name,
                         res.name, survivor.id)
            sg_id = survivor.id
            have = ingress_rules(survivor) if survivor.id != sg.id else set()
        else:
            sg_id = existing.cloud_id
            rules = s.call("list rules", lambda: list(
                s.conn.network.security_group_rules(security_group_id=sg_id, direction="ingress")))
            have = {(r.port_range_min, r.protocol, r.remote_ip_prefix) for r in rules}
        for rule in res.spec["rules"]:
            if (rule["port"], rule["protocol"], rule["cidr"]) in have:
                continue
            with contextlib.suppress(Conflict):  # a concurrent run opened it first
                s.call(f"open port {rule['port']}", lambda r=rule: s.conn.network.create_security_group_rule(
                    security_group_id=sg_id, direction="ingress", ethertype="IPv4", protocol=r["protocol"],
                    port_range_min=r["port"], port_range_max=r["port"], remote_ip_prefix=r["cidr"]))
        return Found("secgroup", sg_id, res.name)

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        for f in found:
            self.ctx.delete_in_use("delete security group", lambda f=f: self.ctx.conn.network.delete_security_group(
                f.cloud_id, ignore_missing=True))

    def owned(self, plan: Plan) -> list[Found]:
        groups = self.ctx.call("list security groups",
                               lambda: list(self.ctx.conn.network.security_groups(name=plan.deployment)))
        return [Found("secgroup", g.id, g.name) for g in groups if deployment_of(g.description) == plan.deployment]


class Owned(Handler):
    """A kind labctl tags by description: listed project-wide (one list per kind) for `list_owned`."""

    ctx: Session
    what = ""

    def lister(self) -> Callable[..., Any]:
        return getattr(self.ctx.conn.network, f"{self.kind}s")

    def owned(self, plan: Plan) -> list[Found]:
        items = self.ctx.project_list(f"{self.kind}s", lambda: list(self.lister()()), plan)
        return [Found(self.kind, i.id, i.name or "") for i in items if deployment_of(i.description) == plan.deployment]

    def mine(self, name: str, plan: Plan) -> list[Any]:
        return self.ctx.owned_named(f"{self.kind}s", self.lister(), name, plan)

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        remove = getattr(self.ctx.conn.network, f"delete_{self.kind}")
        for f in found:
            self.ctx.delete_in_use(f"delete {self.kind}", lambda f=f: remove(f.cloud_id, ignore_missing=True))


@TABLE.handler("port")
class Ports(Owned):
    # Ports are not plan resources: the adapter makes them while launching a server (`ensure_port`).
    def find(self, res: Resource, plan: Plan) -> Found | None:
        return None

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        for f in found:
            self.ctx.call("delete port", lambda f=f: self.ctx.conn.network.delete_port(f.cloud_id, ignore_missing=True))


@TABLE.handler("network")
class Networks(Owned):
    def find(self, res: Resource, plan: Plan) -> Found | None:
        mine = self.mine(res.name, plan)
        return Found("network", mine[0].id, res.name) if mine else None

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        existing = self.find(res, plan)
        if existing is not None:
            return existing
        net = self.ctx.call(f"create network {res.name}", lambda: self.ctx.conn.network.create_network(
            name=res.name, description=description(plan.deployment), port_security_enabled=res.spec["port_security"]))
        return Found("network", net.id, res.name)


@TABLE.handler("subnet")
class Subnets(Owned):
    def find(self, res: Resource, plan: Plan) -> Found | None:
        mine = self.mine(res.name, plan)
        if not mine:
            return None
        return Found("subnet", mine[0].id, res.name, attrs={"network_id": mine[0].network_id, "cidr": mine[0].cidr})

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        existing = self.find(res, plan)
        if existing is not None:
            return existing
        spec = res.spec
        subnet = self.ctx.call(f"create subnet {res.name}", lambda: self.ctx.conn.network.create_subnet(
            name=res.name, description=description(plan.deployment), network_id=deps[spec["network"]].cloud_id,
            ip_version=4, cidr=spec["cidr"], gateway_ip=spec["gateway_ip"], enable_dhcp=True,
            allocation_pools=spec["allocation_pools"]))
        return Found("subnet", subnet.id, res.name, attrs={"network_id": subnet.network_id, "cidr": subnet.cidr})


@TABLE.handler("router")
class Routers(Owned):
    def interfaces(self, router_id: str, **filters: str) -> list[Any]:
        return self.ctx.call("list router ports", lambda: list(self.ctx.conn.network.ports(
            device_id=router_id, **filters)))

    def find(self, res: Resource, plan: Plan) -> Found | None:
        mine = self.mine(res.name, plan)
        if not mine:
            return None
        router = mine[0]
        subnets = {ip.get("subnet_id") for p in self.interfaces(router.id) for ip in p.fixed_ips or []}
        # An interface or gateway missing (a crash between the calls): "incomplete", create() finishes it.
        subnet = self.ctx.owned_named("subnets", self.ctx.conn.network.subnets, subnet_name_of(res), plan)
        complete = bool(router.external_gateway_info) and bool(subnet) and subnet[0].id in subnets
        return Found("router", router.id, res.name, status="ready" if complete else "incomplete")

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        s = self.ctx
        mine = self.mine(res.name, plan)
        gateway = {"network_id": s.public_network().id}
        if mine:
            router = mine[0]
            if not router.external_gateway_info:
                router = s.call("set router gateway", lambda: s.conn.network.update_router(
                    router, external_gateway_info=gateway))
        else:
            router = s.call(f"create router {res.name}", lambda: s.conn.network.create_router(
                name=res.name, description=description(plan.deployment), external_gateway_info=gateway))
        subnet_id = deps[res.spec["subnet"]].cloud_id
        if not any(ip.get("subnet_id") == subnet_id for p in self.interfaces(router.id) for ip in p.fixed_ips or []):
            s.call("add router interface", lambda: s.conn.network.add_interface_to_router(router, subnet=subnet_id))
        return Found("router", router.id, res.name)

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        s = self.ctx
        for f in found:
            for p in self.interfaces(f.cloud_id, device_owner="network:router_interface"):
                for ip in p.fixed_ips or []:
                    s.call("remove router interface", lambda ip=ip, f=f: s.conn.network.remove_interface_from_router(
                        f.cloud_id, subnet=ip["subnet_id"]), missing_ok=True)
            s.delete_in_use("delete router", lambda f=f: s.conn.network.delete_router(f.cloud_id, ignore_missing=True))


@TABLE.handler("floating_ip")
class FloatingIps(Handler):
    ctx: Session

    def find(self, res: Resource, plan: Plan) -> Found | None:
        desc = description(plan.deployment, res.spec["node"])
        ips = self.ctx.call("list floating IPs", lambda: list(self.ctx.conn.network.ips(description=desc)))
        if not ips:
            return None
        ip = min(ips, key=lambda i: (not i.port_id, str(i.created_at or ""), i.id))  # the same for every run
        return Found("floating_ip", ip.id, res.name, status="ready" if ip.port_id else "incomplete",
                     attrs={"floating_ip": ip.floating_ip_address, "port_id": ip.port_id})

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        s, node = self.ctx, res.spec["node"]
        server = deps[res.spec["server"]]
        found = s.found_before_create(res, plan)
        ports = s.call(f"find port of {node}", lambda: list(s.conn.network.ports(
            device_id=server.cloud_id, network_id=s.network().id)))
        if not ports:
            raise CloudError(f"{s.site.name}: server of {node} has no port to attach a floating IP to")
        if found is None:  # allocated and attached in one request
            def allocate() -> Found:
                ip = s.call(f"allocate floating IP for {node}", lambda: s.conn.network.create_ip(
                    floating_network_id=s.public_network().id, description=description(plan.deployment, node),
                    port_id=ports[0].id))
                return Found("floating_ip", ip.id, res.name, attrs={"floating_ip": ip.floating_ip_address})

            # The port holds one floating IP: a 409 means a concurrent run attached its own first. Use that one.
            found = create_or_adopt(allocate, lambda: self.find(res, plan))
        if found.attrs.get("port_id", ports[0].id) != ports[0].id:  # found unattached (or elsewhere): attach it
            s.call(f"attach floating IP to {node}",
                   lambda: s.conn.network.update_ip(found.cloud_id, port_id=ports[0].id))
        found.status = "ready"
        found.attrs["port_id"] = ports[0].id
        return found

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        for f in found:
            self.ctx.call("release floating IP", lambda f=f: self.ctx.conn.network.delete_ip(
                f.cloud_id, ignore_missing=True))

    def owned(self, plan: Plan) -> list[Found]:
        return [Found("floating_ip", ip.id, ip.description or "", attrs={"floating_ip": ip.floating_ip_address})
                for ip in self.ctx.project_list("floating IPs", lambda: list(self.ctx.conn.network.ips()), plan)
                if deployment_of(ip.description) == plan.deployment]


def ensure_port(s: Session, node: str, net: Mapping[str, Any], deps: Mapping[str, Found], plan: Plan) -> str:
    """The node's port on a private network: the one an earlier (crashed) run made, else a new one."""
    network_id = deps[net["network"]].cloud_id
    ports = s.call("list ports", lambda: list(s.conn.network.ports(name=net["port_name"], network_id=network_id)))
    mine = sorted((p for p in ports if deployment_of(p.description) == plan.deployment),
                  key=lambda p: bool(p.device_id))  # an unbound one first
    if mine and not mine[0].device_id:
        for extra in mine[1:]:
            if not extra.device_id:
                s.call("delete extra port", lambda e=extra: s.conn.network.delete_port(e.id, ignore_missing=True))
        return mine[0].id
    fixed: dict[str, str] = {"subnet_id": deps[net["subnet"]].cloud_id}
    if net.get("fixed_ip"):
        fixed["ip_address"] = net["fixed_ip"]
    kwargs: dict[str, Any] = dict(network_id=network_id, name=net["port_name"], fixed_ips=[fixed],
                                  description=description(plan.deployment, node))
    if not net.get("port_security", True):
        kwargs["port_security_enabled"] = False
    return s.call(f"create port for {node}", lambda: s.conn.network.create_port(**kwargs)).id


def ingress_rules(sg: Any) -> set[tuple[Any, Any, Any]]:
    return {(r.get("port_range_min"), r.get("protocol"), r.get("remote_ip_prefix"))
            for r in sg.security_group_rules or [] if r.get("direction") == "ingress"}


def has_rules(sg: Any, res: Resource) -> bool:
    return {(r["port"], r["protocol"], r["cidr"]) for r in res.spec.get("rules") or []} <= ingress_rules(sg)


def rank(sg: Any, res: Resource) -> tuple[bool, str]:
    """Finished groups (with their rules: some run took it) first, then the oldest."""
    return (not has_rules(sg, res), str(sg.created_at or ""))


def subnet_name_of(res: Resource) -> str:
    """The subnet a router resource attaches to, by its deterministic name (<deployment>-<net>-subnet)."""
    return res.name[: -len("-router")] + "-subnet" if res.name.endswith("-router") else res.name
