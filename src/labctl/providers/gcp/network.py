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
from labctl.providers.gcp import names
from labctl.providers.gcp.session import HANDLERS, Session, log

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource


# -- key pairs and routers: nothing on the cloud side ------------------------------------------------
def find_keypair(s: Session, res: Resource, plan: Plan) -> Found:
    return Found("keypair", res.name, res.name, attrs={"public_key": res.spec["public_key"],
                                                       "note": "GCP has no key pairs: ssh-keys metadata"})


def find_router(s: Session, res: Resource, plan: Plan) -> Found:
    return Found("router", f"implicit/{names.gce_name(res.name)}", res.name, attrs={
        "note": "a VPC network routes to the internet itself (default route); nodes keep an ephemeral "
                "external address for outbound traffic"})


# -- networks and subnetworks (no labels: the deployment is in the description) ---------------------
def find_network(s: Session, res: Resource, plan: Plan) -> Found | None:
    net = s.get(f"get network {names.gce_name(res.name)}", s.networks, network=names.gce_name(res.name))
    return names.network_found(net, res.name) if net is not None and _mine(plan)(net) else None


def find_subnet(s: Session, res: Resource, plan: Plan) -> Found | None:
    name = names.gce_name(res.name)
    sub = s.get(f"get subnetwork {name}", s.subnetworks, region=s.region, subnetwork=name)
    return names.subnet_found(sub, res.name) if sub is not None and _mine(plan)(sub) else None


def _mine(plan: Plan) -> Any:
    return lambda obj: names.deployment_of(obj.description) == plan.deployment


def create_network(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    from google.cloud import compute_v1

    if (existing := find_network(s, res, plan)) is not None:
        return existing
    name = names.gce_name(res.name)
    body = compute_v1.Network(name=name, auto_create_subnetworks=False, description=names.description(plan.deployment),
                              routing_config=compute_v1.NetworkRoutingConfig(routing_mode="REGIONAL"))
    return names.network_found(s.insert(f"create network {name}", s.networks, "network", body, _mine(plan)), res.name)


def create_subnet(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    from google.cloud import compute_v1

    if (existing := find_subnet(s, res, plan)) is not None:
        return existing
    name = names.gce_name(res.name)
    body = compute_v1.Subnetwork(name=name, description=names.description(plan.deployment),
                                 ip_cidr_range=res.spec["cidr"],
                                 network=f"global/networks/{names.network_name(deps[res.spec['network']])}")
    sub = s.insert(f"create subnetwork {name}", s.subnetworks, "subnetwork", body, _mine(plan), region=s.region)
    return names.subnet_found(sub, res.name)


def delete_subnets(s: Session, found: Sequence[Found], plan: Plan) -> None:
    for f in found:
        name = names.last(f.cloud_id) if "/subnetworks/" in (f.cloud_id or "") else names.gce_name(f.name)
        region = f.attrs.get("region") or (f.cloud_id.split("/")[1] if (f.cloud_id or "").startswith(
            "regions/") else s.region)
        s.delete_until_gone(f"delete subnetwork {name}", s.subnetworks, region=region, subnetwork=name)


def delete_networks(s: Session, found: Sequence[Found], plan: Plan) -> None:
    for f in found:
        name = names.last(f.cloud_id) if "/networks/" in (f.cloud_id or "") else names.gce_name(f.name)
        if name != s.site_network:  # never the site's own network
            s.delete_until_gone(f"delete network {name}", s.networks, network=name)


# -- firewalls (secgroup) -----------------------------------------------------------------------------
def owned_firewalls(s: Session, deployment: str) -> list[Any]:
    return [fw for fw in s.listing("list firewalls", s.firewalls) if names.deployment_of(fw.description) == deployment]


def _firewall_specs(s: Session, res: Resource, plan: Plan,
                    deps: Mapping[str, Found] | None = None) -> dict[str, dict[str, Any]]:
    """Firewall name -> {allowed: {proto: [ports]}, ranges: [cidr], network}: one rule per source range, and one
    per private network without port security that lets every protocol in from that network's CIDR. They belong
    to the deployment's own (private) network, else the site's."""
    nets = res.spec.get("networks") or []
    network = s.site_network
    if nets:
        key = nets[0]["network"]
        network = names.network_name(deps[key]) if deps and key in deps else names.gce_name(plan.get(key).name)
    groups: dict[str, dict[str, list[str]]] = {}
    for rule in res.spec["rules"]:
        ports = groups.setdefault(rule["cidr"], {}).setdefault(rule["protocol"], [])
        if str(rule["port"]) not in ports:
            ports.append(str(rule["port"]))
    base = names.gce_name(plan.deployment)
    specs: dict[str, dict[str, Any]] = {}
    for i, (cidr, allowed) in enumerate(groups.items()):
        name = base if i == 0 else names.gce_name(f"{base}-{hashlib.sha1(cidr.encode()).hexdigest()[:6]}")
        specs[name] = {"allowed": allowed, "ranges": [cidr], "network": network}
    for net in nets:
        if net.get("open"):
            digest = hashlib.sha1(f"open:{net['network']}".encode()).hexdigest()[:6]
            specs[names.gce_name(f"{base}-{digest}")] = {"allowed": {"all": []}, "ranges": [net["cidr"]],
                                                         "network": network}
    return specs


def find_secgroup(s: Session, res: Resource, plan: Plan) -> Found | None:
    have = {fw.name: fw for fw in owned_firewalls(s, plan.deployment)}
    if not have:
        return None
    if "rules" not in res.spec:  # a teardown lookup from state records: every firewall of the deployment
        return Found("secgroup", f"global/firewalls/{min(have)}", res.name, attrs={"firewalls": sorted(have)})
    want = _firewall_specs(s, res, plan)
    complete = all(name in have and names.firewall_matches(have[name], spec) for name, spec in want.items())
    return Found("secgroup", f"global/firewalls/{next(iter(want))}", res.name,
                 status="ready" if complete else "incomplete",
                 attrs={"firewalls": sorted(have), "tag": names.tag(plan.deployment)})


def create_secgroup(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    from google.cloud import compute_v1

    want = _firewall_specs(s, res, plan, deps)
    have = {fw.name: fw for fw in owned_firewalls(s, plan.deployment)}
    ops = []
    for name, spec in want.items():
        body = compute_v1.Firewall(
            name=name, network=f"global/networks/{spec['network']}", direction="INGRESS", priority=1000,
            description=names.description(plan.deployment), target_tags=[names.tag(plan.deployment)],
            source_ranges=spec["ranges"],
            allowed=[compute_v1.Allowed(I_p_protocol=p, ports=ports) for p, ports in spec["allowed"].items()])
        if name in have and names.last(have[name].network) != spec["network"]:
            # a firewall's network cannot be changed: make it again on the right one
            log.info("%s: firewall %s moves to network %s", s.site.name, name, spec["network"])
            _delete_firewalls(s, [name])
            del have[name]
        if name not in have:
            try:
                ops.append(s.start(f"create firewall {name}", s.firewalls, "insert_unary", firewall_resource=body))
            except Conflict:
                log.info("%s: firewall %s already exists", s.site.name, name)
        elif not names.firewall_matches(have[name], spec):
            ops.append(s.start(f"update firewall {name}", s.firewalls, "patch_unary", firewall=name,
                               firewall_resource=body))
    for op in ops:
        with contextlib.suppress(Conflict):  # a concurrent run of this deployment made it first
            s.check_op(op, "firewall")
    return Found("secgroup", f"global/firewalls/{next(iter(want))}", res.name,
                 attrs={"firewalls": sorted(want), "tag": names.tag(plan.deployment)})


def delete_secgroups(s: Session, found: Sequence[Found], plan: Plan) -> None:
    fws = {names.last(f.cloud_id) for f in found} | {n for f in found for n in f.attrs.get("firewalls") or []}
    _delete_firewalls(s, sorted(fws))


def _delete_firewalls(s: Session, fws: Sequence[str]) -> None:
    ops = [s.start(f"delete firewall {name}", s.firewalls, "delete_unary", missing_ok=True, firewall=name)
           for name in fws]
    for op in ops:
        s.check_op(op, "delete firewall")


# -- static addresses (floating_ip) -------------------------------------------------------------------
def find_floating_ip(s: Session, res: Resource, plan: Plan) -> Found | None:
    name = names.gce_name(res.name)
    addr = s.get("get address", s.addresses, region=s.region, address=name)
    if addr is None:
        return None
    return Found("floating_ip", f"regions/{s.region}/addresses/{name}", res.name,
                 status="ready" if addr.status == "IN_USE" else "incomplete",
                 attrs={"floating_ip": addr.address, "node": res.spec.get("node"),
                        "users": [names.rel(u) for u in addr.users]})


def create_floating_ip(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    from google.cloud import compute_v1

    node = res.spec["node"]
    zone, iname = names.instance_ref(deps[res.spec["server"]])
    name = names.gce_name(res.name)
    inst = s.get(f"get instance of {node}", s.instances, missing_ok=False, zone=zone, instance=iname)
    nic = inst.network_interfaces[0]
    current = next((ac for ac in nic.access_configs if ac.nat_i_p), None)
    addr = s.get("get address", s.addresses, region=s.region, address=name)
    if addr is None:
        body = compute_v1.Address(name=name, description=names.description(plan.deployment, node),
                                  labels=names.labels(plan, node), address_type="EXTERNAL", network_tier="PREMIUM")
        if current is not None:
            body.address = current.nat_i_p  # promote the ephemeral address: same IP, now static
        with contextlib.suppress(Conflict):  # a concurrent run of this deployment reserved it first (its name)
            s.run(f"reserve address for {node}", s.addresses, "insert_unary", region=s.region, address_resource=body)
        addr = s.get("get address", s.addresses, missing_ok=False, region=s.region, address=name)
    if not any(names.rel(u).endswith(f"zones/{zone}/instances/{iname}") for u in addr.users):
        if addr.status != "RESERVED":
            raise CloudError(f"{s.site.name}: address {name} ({addr.address}) is in use by "
                             f"{', '.join(names.rel(u) for u in addr.users)}")
        where = {"zone": zone, "instance": iname, "network_interface": nic.name}
        if current is not None:
            s.run(f"detach ephemeral address of {node}", s.instances, "delete_access_config_unary",
                  access_config=current.name, **where)
        access = compute_v1.AccessConfig(name=names.NAT_NAME, type_="ONE_TO_ONE_NAT", nat_i_p=addr.address,
                                         network_tier="PREMIUM")
        s.run(f"attach address to {node}", s.instances, "add_access_config_unary", access_config_resource=access,
              **where)
    return Found("floating_ip", f"regions/{s.region}/addresses/{name}", res.name,
                 attrs={"floating_ip": addr.address, "node": node, "zone": zone})


def delete_floating_ips(s: Session, found: Sequence[Found], plan: Plan) -> None:
    for f in found:
        m = re.match(r"^regions/([^/]+)/addresses/([^/]+)$", f.cloud_id)
        region, name = m.groups() if m else (s.region, names.gce_name(f.name))
        addr = s.get(f"get address {name}", s.addresses, region=region, address=name)
        if addr is None:
            continue
        for user in addr.users:  # detach it from its instance first (an address in use cannot be deleted)
            ref = names.instance_of(user)
            inst = s.get_instance(*ref) if ref else None
            for nic in inst.network_interfaces if inst is not None else []:
                for ac in nic.access_configs:
                    if ac.nat_i_p == addr.address:
                        s.run(f"detach address from {ref[1]}", s.instances, "delete_access_config_unary",
                              missing_ok=True, zone=ref[0], instance=ref[1], access_config=ac.name,
                              network_interface=nic.name)
        s.run(f"release address {name}", s.addresses, "delete_unary", missing_ok=True, region=region, address=name)


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
