"""Networks, subnetworks, firewalls (secgroup), static addresses (floating_ip); key pairs and routers, which
Compute Engine does not have."""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from labctl.errors import CloudError, Conflict
from labctl.providers.base import Found
from labctl.providers.gcp.names import (
    NAT_NAME,
    deployment_of,
    description,
    firewall_matches,
    gce_name,
    instance_of,
    instance_ref,
    labels,
    last,
    network_found,
    network_name,
    rel,
    subnet_found,
    tag,
)
from labctl.providers.gcp.session import HANDLERS, Session, log

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource


# -- key pairs and routers: nothing on the cloud side ------------------------------------------------
def find_keypair(s: Session, res: Resource, plan: Plan) -> Found:
    return Found("keypair", res.name, res.name, attrs={"public_key": res.spec["public_key"],
                                                       "note": "GCP has no key pairs: ssh-keys metadata"})


def find_router(s: Session, res: Resource, plan: Plan) -> Found:
    return Found("router", f"implicit/{gce_name(res.name)}", res.name, attrs={
        "note": "a VPC network routes to the internet itself (default route); nodes keep an ephemeral "
                "external address for outbound traffic"})


# -- networks and subnetworks (no labels: the deployment is in the description) ---------------------
def find_network(s: Session, res: Resource, plan: Plan) -> Found | None:
    net = s.get(f"get network {gce_name(res.name)}", s.networks, network=gce_name(res.name))
    return network_found(net, res.name) if net and deployment_of(net.description) == plan.deployment else None


def find_subnet(s: Session, res: Resource, plan: Plan) -> Found | None:
    name = gce_name(res.name)
    sub = s.get(f"get subnetwork {name}", s.subnetworks, region=s.region, subnetwork=name)
    return subnet_found(sub, res.name) if sub and deployment_of(sub.description) == plan.deployment else None


def _mine(plan: Plan) -> Any:
    return lambda obj: deployment_of(obj.description) == plan.deployment


def create_network(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    from google.cloud import compute_v1

    if (existing := find_network(s, res, plan)) is not None:
        return existing
    name = gce_name(res.name)
    body = compute_v1.Network(name=name, auto_create_subnetworks=False, description=description(plan.deployment),
                              routing_config=compute_v1.NetworkRoutingConfig(routing_mode="REGIONAL"))
    net = s.insert(f"create network {name}", lambda r: s.networks.insert_unary(
        request={"project": s.project, "network_resource": body, "request_id": r}, **s.opts()),
        lambda: s.networks.get(request={"project": s.project, "network": name}, **s.opts()), _mine(plan))
    return network_found(net, res.name)


def create_subnet(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    from google.cloud import compute_v1

    if (existing := find_subnet(s, res, plan)) is not None:
        return existing
    name = gce_name(res.name)
    body = compute_v1.Subnetwork(name=name, description=description(plan.deployment), ip_cidr_range=res.spec["cidr"],
                                 network=f"global/networks/{network_name(deps[res.spec['network']])}")
    sub = s.insert(f"create subnetwork {name}", lambda r: s.subnetworks.insert_unary(
        request={"project": s.project, "region": s.region, "subnetwork_resource": body, "request_id": r},
        **s.opts()), lambda: s.subnetworks.get(
        request={"project": s.project, "region": s.region, "subnetwork": name}, **s.opts()), _mine(plan))
    return subnet_found(sub, res.name)


def delete_subnets(s: Session, found: Sequence[Found], plan: Plan) -> None:
    for f in found:
        name = last(f.cloud_id) if "/subnetworks/" in (f.cloud_id or "") else gce_name(f.name)
        region = f.attrs.get("region") or (f.cloud_id.split("/")[1] if (f.cloud_id or "").startswith(
            "regions/") else s.region)
        s.delete_until_gone(f"delete subnetwork {name}", lambda r, n=name, g=region: s.subnetworks.delete_unary(
            request={"project": s.project, "region": g, "subnetwork": n, "request_id": r}, **s.opts()),
            lambda n=name, g=region: s.subnetworks.get(
                request={"project": s.project, "region": g, "subnetwork": n}, **s.opts()))


def delete_networks(s: Session, found: Sequence[Found], plan: Plan) -> None:
    for f in found:
        name = last(f.cloud_id) if "/networks/" in (f.cloud_id or "") else gce_name(f.name)
        if name == s.site_network:
            continue  # never the site's own network
        s.delete_until_gone(f"delete network {name}", lambda r, n=name: s.networks.delete_unary(
            request={"project": s.project, "network": n, "request_id": r}, **s.opts()),
            lambda n=name: s.networks.get(request={"project": s.project, "network": n}, **s.opts()))


# -- firewalls (secgroup) -----------------------------------------------------------------------------
def owned_firewalls(s: Session, deployment: str) -> list[Any]:
    return [fw for fw in s.listing("list firewalls", s.firewalls) if deployment_of(fw.description) == deployment]


def _firewall_specs(s: Session, res: Resource, plan: Plan,
                    deps: Mapping[str, Found] | None = None) -> dict[str, dict[str, Any]]:
    """Firewall name -> {allowed: {proto: [ports]}, ranges: [cidr], network}: one rule per source range, and one
    per private network without port security that lets every protocol in from that network's CIDR. They belong
    to the deployment's own (private) network, else the site's."""
    nets = res.spec.get("networks") or []
    network = s.site_network
    if nets:
        key = nets[0]["network"]
        network = network_name(deps[key]) if deps and key in deps else gce_name(plan.get(key).name)
    groups: dict[str, dict[str, list[str]]] = {}
    for rule in res.spec["rules"]:
        ports = groups.setdefault(rule["cidr"], {}).setdefault(rule["protocol"], [])
        if str(rule["port"]) not in ports:
            ports.append(str(rule["port"]))
    base = gce_name(plan.deployment)
    specs: dict[str, dict[str, Any]] = {}
    for i, (cidr, allowed) in enumerate(groups.items()):
        name = base if i == 0 else gce_name(f"{base}-{hashlib.sha1(cidr.encode()).hexdigest()[:6]}")
        specs[name] = {"allowed": allowed, "ranges": [cidr], "network": network}
    for net in nets:
        if net.get("open"):
            digest = hashlib.sha1(f"open:{net['network']}".encode()).hexdigest()[:6]
            specs[gce_name(f"{base}-{digest}")] = {"allowed": {"all": []}, "ranges": [net["cidr"]], "network": network}
    return specs


def find_secgroup(s: Session, res: Resource, plan: Plan) -> Found | None:
    have = {fw.name: fw for fw in owned_firewalls(s, plan.deployment)}
    if not have:
        return None
    if "rules" not in res.spec:  # a teardown lookup from state records: every firewall of the deployment
        return Found("secgroup", f"global/firewalls/{min(have)}", res.name, attrs={"firewalls": sorted(have)})
    want = _firewall_specs(s, res, plan)
    complete = all(name in have and firewall_matches(have[name], spec) for name, spec in want.items())
    return Found("secgroup", f"global/firewalls/{next(iter(want))}", res.name,
                 status="ready" if complete else "incomplete",
                 attrs={"firewalls": sorted(have), "tag": tag(plan.deployment)})


def create_secgroup(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    from google.cloud import compute_v1

    want = _firewall_specs(s, res, plan, deps)
    have = {fw.name: fw for fw in owned_firewalls(s, plan.deployment)}
    ops = []
    for name, spec in want.items():
        body = compute_v1.Firewall(
            name=name, network=f"global/networks/{spec['network']}", direction="INGRESS", priority=1000,
            description=description(plan.deployment), target_tags=[tag(plan.deployment)],
            source_ranges=spec["ranges"],
            allowed=[compute_v1.Allowed(I_p_protocol=p, ports=ports) for p, ports in spec["allowed"].items()])
        rid = {"project": s.project, "request_id": s.request_id()}
        if name in have and last(have[name].network) != spec["network"]:
            # a firewall's network cannot be changed: make it again on the right one
            log.info("%s: firewall %s moves to network %s", s.site.name, name, spec["network"])
            _delete_firewalls(s, [name])
            del have[name]
        if name not in have:
            try:
                ops.append(s.call(f"create firewall {name}", lambda b=body, r=rid: s.firewalls.insert_unary(
                    request={**r, "firewall_resource": b}, **s.opts())))
            except Conflict:
                log.info("%s: firewall %s already exists", s.site.name, name)
        elif not firewall_matches(have[name], spec):
            ops.append(s.call(f"update firewall {name}", lambda n=name, b=body, r=rid: s.firewalls.patch_unary(
                request={**r, "firewall": n, "firewall_resource": b}, **s.opts())))
    for op in ops:
        with contextlib.suppress(Conflict):  # a concurrent run of this deployment made it first
            s.check_op(op, "firewall")
    return Found("secgroup", f"global/firewalls/{next(iter(want))}", res.name,
                 attrs={"firewalls": sorted(want), "tag": tag(plan.deployment)})


def delete_secgroups(s: Session, found: Sequence[Found], plan: Plan) -> None:
    names = {last(f.cloud_id) for f in found} | {n for f in found for n in f.attrs.get("firewalls") or []}
    _delete_firewalls(s, sorted(names))


def _delete_firewalls(s: Session, names: Sequence[str]) -> None:
    ops = [s.call(f"delete firewall {name}", lambda n=name: s.firewalls.delete_unary(
        request={"project": s.project, "firewall": n, "request_id": s.request_id()}, **s.opts()), missing_ok=True)
        for name in names]
    for op in ops:
        s.check_op(op, "delete firewall")


# -- static addresses (floating_ip) -------------------------------------------------------------------
def find_floating_ip(s: Session, res: Resource, plan: Plan) -> Found | None:
    name = gce_name(res.name)
    addr = s.get("get address", s.addresses, region=s.region, address=name)
    if addr is None:
        return None
    return Found("floating_ip", f"regions/{s.region}/addresses/{name}", res.name,
                 status="ready" if addr.status == "IN_USE" else "incomplete",
                 attrs={"floating_ip": addr.address, "node": res.spec.get("node"),
                        "users": [rel(u) for u in addr.users]})


def create_floating_ip(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    from google.cloud import compute_v1

    node = res.spec["node"]
    zone, iname = instance_ref(deps[res.spec["server"]])
    name = gce_name(res.name)
    inst = s.call(f"get instance of {node}", lambda: s.instances.get(
        request={"project": s.project, "zone": zone, "instance": iname}, **s.opts()))
    nic = inst.network_interfaces[0]
    current = next((ac for ac in nic.access_configs if ac.nat_i_p), None)
    addr = s.get("get address", s.addresses, region=s.region, address=name)
    if addr is None:
        body = compute_v1.Address(name=name, description=description(plan.deployment, node),
                                  labels=labels(plan, node), address_type="EXTERNAL", network_tier="PREMIUM")
        if current is not None:
            body.address = current.nat_i_p  # promote the ephemeral address: same IP, now static
        with contextlib.suppress(Conflict):  # a concurrent run of this deployment reserved it first (the name is
            s.send(f"reserve address for {node}", lambda r: s.addresses.insert_unary(  # the node's)
                request={"project": s.project, "region": s.region, "address_resource": body, "request_id": r},
                **s.opts()))
        addr = s.call("get address", lambda: s.addresses.get(
            request={"project": s.project, "region": s.region, "address": name}, **s.opts()))
    if not any(rel(u).endswith(f"zones/{zone}/instances/{iname}") for u in addr.users):
        if addr.status != "RESERVED":
            raise CloudError(f"{s.site.name}: address {name} ({addr.address}) is in use by "
                             f"{', '.join(rel(u) for u in addr.users)}")
        where = {"project": s.project, "zone": zone, "instance": iname, "network_interface": nic.name}
        if current is not None:
            s.send(f"detach ephemeral address of {node}", lambda r: s.instances.delete_access_config_unary(
                request={**where, "access_config": current.name, "request_id": r}, **s.opts()))
        access = compute_v1.AccessConfig(name=NAT_NAME, type_="ONE_TO_ONE_NAT", nat_i_p=addr.address,
                                         network_tier="PREMIUM")
        s.send(f"attach address to {node}", lambda r: s.instances.add_access_config_unary(
            request={**where, "access_config_resource": access, "request_id": r}, **s.opts()))
    return Found("floating_ip", f"regions/{s.region}/addresses/{name}", res.name,
                 attrs={"floating_ip": addr.address, "node": node, "zone": zone})


def delete_floating_ips(s: Session, found: Sequence[Found], plan: Plan) -> None:
    for f in found:
        m = re.match(r"^regions/([^/]+)/addresses/([^/]+)$", f.cloud_id)
        region, name = m.groups() if m else (s.region, gce_name(f.name))
        addr = s.get(f"get address {name}", s.addresses, region=region, address=name)
        if addr is None:
            continue
        for user in addr.users:  # detach it from its instance first (an address in use cannot be deleted)
            ref = instance_of(user)
            inst = s.get_instance(*ref) if ref else None
            for nic in inst.network_interfaces if inst is not None else []:
                for ac in nic.access_configs:
                    if ac.nat_i_p == addr.address:
                        s.send(f"detach address from {ref[1]}", lambda r, a=ac.name, i=nic.name, z=ref:
                               s.instances.delete_access_config_unary(request={
                                   "project": s.project, "zone": z[0], "instance": z[1], "access_config": a,
                                   "network_interface": i, "request_id": r}, **s.opts()), missing_ok=True)
        s.send(f"release address {name}", lambda r, g=region, n=name: s.addresses.delete_unary(
            request={"project": s.project, "region": g, "address": n, "request_id": r}, **s.opts()), missing_ok=True)


def _nothing(s: Session, found: Sequence[Found], plan: Plan) -> None:
    """Nothing on the cloud side to delete."""


HANDLERS.register("keypair", find=find_keypair, create=lambda s, res, plan, *_: find_keypair(s, res, plan),
                  delete=_nothing)
HANDLERS.register("router", find=find_router, create=lambda s, res, plan, *_: find_router(s, res, plan),
                  delete=_nothing)
HANDLERS.register("network", find=find_network, create=create_network, delete=delete_networks)
HANDLERS.register("subnet", find=find_subnet, create=create_subnet, delete=delete_subnets)
HANDLERS.register("secgroup", find=find_secgroup, create=create_secgroup, delete=delete_secgroups)
HANDLERS.register("floating_ip", find=find_floating_ip, create=create_floating_ip, delete=delete_floating_ips)
