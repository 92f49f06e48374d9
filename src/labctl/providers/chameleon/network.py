"""Neutron: security groups, private networks, subnets, routers, the ports made for servers on private networks,
and floating IPs (allocated per node onto its port, described with the deployment and node, deleted explicitly).

Neutron keeps no names unique and labctl tags these by description: every lookup is by name *and* the deployment
in the description (`Listed`); a kind says what else it needs."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from labctl.errors import CloudError
from labctl.providers.base import Found, converge_created, create_or_adopt, create_or_find
from labctl.providers.chameleon.session import TABLE, Listed, Session, deployment_of, description
from labctl.providers.kit import CloudClock

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource, ServerNetwork, SubnetSpec

log = logging.getLogger(__name__)


@TABLE.handler("port")
class Ports(Listed):
    sdk, raw = "port", ("/ports", "ports")
    keep = dict.fromkeys(("device_id", "network_id"))

    def find(self, res: Resource, plan: Plan) -> Found | None:
        return None  # not plan resources: made while launching a server (`ensure_port`), found by `list_owned`


@TABLE.handler("network")
class Networks(Listed):
    sdk = "network"

    def fields(self, res: Resource, plan: Plan, deps: Mapping[str, Found]) -> dict[str, Any]:
        return {"port_security_enabled": res.spec["port_security"]}


@TABLE.handler("subnet")
class Subnets(Listed):
    sdk = "subnet"

    def found(self, item: Any) -> Found:
        return Found("subnet", item.id, item.name, attrs={"network_id": item.network_id, "cidr": item.cidr})

    def fields(self, res: Resource, plan: Plan, deps: Mapping[str, Found]) -> dict[str, Any]:
        spec = cast("SubnetSpec", res.spec)
        return {"network_id": deps[spec["network"]].cloud_id, "ip_version": 4, "cidr": spec["cidr"],
                "gateway_ip": spec["gateway_ip"], "enable_dhcp": True, "allocation_pools": spec["allocation_pools"]}


@TABLE.handler("router")
class Routers(Listed):
    """A router to the public network with an interface on its subnet; "incomplete" without either (a crash
    between the calls), which `create` finishes."""

    sdk = "router"

    def subnets(self, router_id: str, **filters: str) -> list[str]:
        """The subnet of each of the router's interfaces."""
        ports = self.ctx.call("list router ports", lambda: list(self.ctx.conn.network.ports(
            device_id=router_id, **filters)))
        return [ip.get("subnet_id") for p in ports for ip in p.fixed_ips or []]

    def find(self, res: Resource, plan: Plan) -> Found | None:
        mine = self.named(res.name, plan)
        if not mine:
            return None
        # Its subnet by name: a teardown's lookup may not have the plan's spec.
        subnet = self.ctx.handlers["subnet"].named(subnet_name_of(res), plan)  # type: ignore[attr-defined]
        complete = bool(mine[0].external_gateway_info) and bool(subnet) and subnet[0].id in self.subnets(mine[0].id)
        return Found("router", mine[0].id, res.name, status="ready" if complete else "incomplete")

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        mine = self.named(res.name, plan)
        gateway = {"network_id": self.ctx.network(public=True).id}
        if not mine:
            router = self.api("create", name=res.name, description=description(plan.deployment),
                              external_gateway_info=gateway)
        elif not mine[0].external_gateway_info:
            router = self.api("update", mine[0], external_gateway_info=gateway)
        else:
            router = mine[0]
        subnet_id = deps[res.spec["subnet"]].cloud_id
        if subnet_id not in self.subnets(router.id):
            self.ctx.call("add router interface", lambda: self.ctx.conn.network.add_interface_to_router(
                router, subnet=subnet_id))
        return Found("router", router.id, res.name)

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        for f in found:  # its interfaces first: Neutron does not delete a router that has some
            for subnet_id in self.subnets(f.cloud_id, device_owner="network:router_interface"):
                self.ctx.call("remove router interface", lambda f=f, s=subnet_id: self.ctx.conn.network
                              .remove_interface_from_router(f.cloud_id, subnet=s), missing_ok=True)
        super().delete(found, plan)


@TABLE.handler("secgroup")
class SecurityGroups(Listed):
    """Its rules are added after it: "incomplete" without all of them (a crash between the calls)."""

    sdk, shared_find, raw = "security_group", True, ("/security-groups", "security_groups")
    keep = {"security_group_rules": ("direction", "protocol", "port_range_min", "remote_ip_prefix")}

    def lookup(self, res: Resource, plan: Plan, *, shared: bool) -> Found | None:
        # Two runs that raced may have left two: every run takes the same one (`rank`).
        sg = min(self.named(res.name, plan, shared=shared), key=lambda g: rank(g, res), default=None)
        if sg is None:
            return None
        return Found("secgroup", sg.id, sg.name, status="ready" if has_rules(sg, res) else "incomplete")

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        s = self.ctx
        existing = s.found_before_create(res, plan)
        if existing is None:
            clock = CloudClock()
            sg = create_or_find(
                lambda: s.call("create security group", lambda: s.raw_create(
                    "network", "/security-groups", "security_group",
                    {"name": res.name, "description": description(plan.deployment)}), resend=False),
                lambda: min(self.named(res.name, plan), key=lambda g: rank(g, res), default=None))
            # Neutron does not keep names unique: a concurrent run (other state, other machine) may have made
            # one too. Both keep the same; the one that lost deletes its own. The list is the class's shared one,
            # fetched after the settling time as a GET of its own would be.
            survivor = converge_created(
                sg, clock.elapsed(),
                lambda: self.named(res.name, plan, shared=True, newer_than=time.monotonic()),
                lambda g: self.api("delete", g.id, ignore_missing=True), ident=lambda g: g.id,
                rank=lambda g: rank(g, res))
            if survivor.id != sg.id:
                log.info("%s: security group %s was made twice (a concurrent run); using %s", s.site.name,
                         res.name, survivor.id)
            sg_id, have = survivor.id, ingress_rules(survivor) if survivor.id != sg.id else set()
        else:
            sg_id, have = existing.cloud_id, ingress_rules(self.api("get", existing.cloud_id))
        for rule in res.spec["rules"]:
            if rule_key(rule) not in have:
                self.open_port(sg_id, rule)
        return Found("secgroup", sg_id, res.name)

    def open_port(self, sg_id: str, rule: Mapping[str, Any]) -> None:
        s = self.ctx

        def create() -> bool:
            s.call(f"open port {rule['port']}", lambda: s.raw_create(
                "network", "/security-group-rules", "security_group_rule", {
                    "security_group_id": sg_id, "direction": "ingress", "ethertype": "IPv4",
                    "protocol": rule["protocol"], "port_range_min": rule["port"], "port_range_max": rule["port"],
                    "remote_ip_prefix": rule["cidr"]}))
            return True

        # Refused as taken (a concurrent run opened it first) or for quota (the resend of a create whose answer was
        # lost, and which took the project's last room): fine when the group has the rule.
        create_or_adopt(create, lambda: rule_key(rule) in ingress_rules(self.api("get", sg_id)) or None)


@TABLE.handler("floating_ip")
class FloatingIps(Listed):
    """One per node, found by the deployment and node in its description; "incomplete" until attached."""

    sdk, shared_find, raw = "ip", True, ("/floatingips", "floatingips")
    keep = dict.fromkeys(("port_id", "floating_ip_address"))

    def found(self, item: Any) -> Found:
        return Found("floating_ip", item.id, item.description or "", status="ready" if item.port_id else "incomplete",
                     attrs={"floating_ip": item.floating_ip_address, "port_id": item.port_id})

    def lookup(self, res: Resource, plan: Plan, *, shared: bool) -> Found | None:
        text = description(plan.deployment, res.spec["node"])
        if shared:
            ips = [i for i in self.listing(plan, self.ctx.written(self.kind, res.name)) if i.description == text]
        else:
            ips = self.api("", description=text)
        if not ips:
            return None
        found = self.found(min(ips, key=lambda i: (not i.port_id, str(i.created_at or ""), i.id)))  # as every run
        found.name = res.name
        return found

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        s, node = self.ctx, res.spec["node"]
        found = s.found_before_create(res, plan)
        ports = server_ports(s, deps[res.spec["server"]].cloud_id, plan)
        if not ports:
            raise CloudError(f"{s.site.name}: server of {node} has no port to attach a floating IP to")
        if found is None:  # allocated and attached in one request
            def allocate() -> Found:
                ip = s.call(f"allocate floating IP for {node}", lambda: s.raw_create("network", "/floatingips",
                            "floatingip", {"floating_network_id": s.network(public=True).id,
                                           "description": description(plan.deployment, node),
                                           "port_id": ports[0].id}))
                return Found("floating_ip", ip.id, res.name, attrs={"floating_ip": ip.floating_ip_address})

            # The port holds one floating IP: a 409 means a concurrent run attached its own first. Use that one.
            found = create_or_adopt(allocate, lambda: self.look(res, plan))
        if found.attrs.get("port_id", ports[0].id) != ports[0].id:  # found unattached (or elsewhere): attach it
            self.api("update", found.cloud_id, port_id=ports[0].id)
        found.status = "ready"
        found.attrs["port_id"] = ports[0].id
        return found


def server_ports(s: Session, server_id: str, plan: Plan) -> list[Any]:
    """The server's ports on the site's network: from the project's list of ports the class shares, else (a list
    fetched before the server had its port) from a GET of its own."""
    net_id = s.network().id
    ports = [p for p in s.handlers["port"].listing(plan)  # type: ignore[attr-defined]
             if p.device_id == server_id and p.network_id == net_id]
    return ports or s.call("find port of server", lambda: list(s.conn.network.ports(
        device_id=server_id, network_id=net_id)))


def ensure_port(s: Session, node: str, net: ServerNetwork, deps: Mapping[str, Found], plan: Plan) -> str:
    """The node's port on a private network: the one an earlier (crashed) run made, else a new one."""
    network_id = deps[net["network"]].cloud_id
    ports = s.call("list ports", lambda: list(s.conn.network.ports(name=net["port_name"], network_id=network_id)))
    mine = sorted((p for p in ports if deployment_of(p) == plan.deployment),
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


def rule_key(rule: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """A plan's port rule as `ingress_rules` lists a group's."""
    return rule["port"], rule["protocol"], rule["cidr"]


def has_rules(sg: Any, res: Resource) -> bool:
    return {rule_key(r) for r in res.spec.get("rules") or []} <= ingress_rules(sg)


def rank(sg: Any, res: Resource) -> tuple[bool, str, str]:
    """Finished groups (with their rules: some run took it) first, then the oldest."""
    return (not has_rules(sg, res), str(sg.created_at or ""), sg.id)


def subnet_name_of(res: Resource) -> str:
    """The subnet a router resource attaches to, by its deterministic name (<deployment>-<net>-subnet)."""
    return res.name[: -len("-router")] + "-subnet" if res.name.endswith("-router") else res.name
