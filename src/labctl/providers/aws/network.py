"""A deployment's own network (VPC with an internet gateway and a default route, one subnet in one zone), its
router (the gateway: nothing to make) and its security group."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from labctl import naming
from labctl.errors import CloudError, Conflict, UserError
from labctl.providers.aws import instances
from labctl.providers.aws.session import KINDS, TABLE, AwsSession, Ec2Kind, Item, tag_spec, tagged, tags_of
from labctl.providers.base import Found, create_or_adopt

if TYPE_CHECKING:
    from labctl.plan import NetworkSpec, Plan, Resource, SecgroupSpec, SubnetSpec

log = logging.getLogger(__name__)
Rules = tuple[set[tuple[int, str, str]], set[str]]  # (port, protocol, CIDR) rules; CIDRs allowed everything


def check_fixed_ip(p: AwsSession, res: Resource, net: Mapping[str, Any], plan: Plan) -> None:
    """AWS keeps the first four addresses of a subnet and its last one: a node cannot have them."""
    if not net.get("fixed_ip"):
        return
    try:
        cidr = ipaddress.ip_network(plan.get(net["subnet"]).spec["cidr"])
    except KeyError:
        return
    address = ipaddress.ip_address(net["fixed_ip"])
    if address < cidr.network_address + 4 or address == cidr.broadcast_address:
        raise UserError(f"{p.site.name}: {res.spec['node']} would get {address} on "
                        f"{net['network'].split(':', 1)[-1]}, but AWS keeps the first four and the last address "
                        f"of a subnet ({cidr}); use first_ip 4 or more")


def attached(igw: Mapping[str, Any], vpc_id: str) -> bool:
    return any(a.get("VpcId") == vpc_id and a.get("State") in ("available", "attached", "attaching")
               for a in igw.get("Attachments") or [])


def subnet_found(subnet: Item) -> Found:
    return Found("subnet", subnet["SubnetId"], tags_of(subnet.get("Tags")).get("Name", subnet["SubnetId"]), attrs={
        "zone": subnet["AvailabilityZone"], "cidr": subnet["CidrBlock"], "vpc_id": subnet["VpcId"]})


# A gateway is kind "network" too: deleted with its VPC, or by itself when a crash left it unattached.
VPCS = Ec2Kind("network", "VPC", "describe_vpcs", "Vpcs", "VpcId", lambda v: Found(
    "network", v["VpcId"], tags_of(v.get("Tags")).get("Name", v["VpcId"]), attrs={"cidr": v.get("CidrBlock")}),
    "delete_vpc")
GATEWAYS = Ec2Kind("network", "internet gateway", "describe_internet_gateways", "InternetGateways",
                   "InternetGatewayId", lambda g: Found(
                       "network", g["InternetGatewayId"], tags_of(g.get("Tags")).get("Name", ""),
                       attrs={"vpc_ids": [a["VpcId"] for a in g.get("Attachments") or []]}), "delete_internet_gateway")
SUBNETS = Ec2Kind("subnet", "subnet", "describe_subnets", "Subnets", "SubnetId", subnet_found, "delete_subnet")
GROUPS = Ec2Kind("secgroup", "security group", "describe_security_groups", "SecurityGroups", "GroupId",
                 lambda g: Found("secgroup", g["GroupId"], g["GroupName"]), "delete_security_group")
KINDS += [GROUPS, VPCS, GATEWAYS, SUBNETS]


# -- network: VPC + internet gateway + default route -------------------------------------------------------------
def gateways_of(p: AwsSession, vpc_id: str, res: Resource, plan: Plan) -> list[Item]:
    """The network's internet gateways (tagged with its name): the one attached to the VPC first."""
    return sorted(GATEWAYS.list(p, tagged(plan, name=res.name)),
                  key=lambda g: (not attached(g, vpc_id), g["InternetGatewayId"]))


def vpc_rank(p: AwsSession, res: Resource, plan: Plan) -> Any:
    """Which of the network's VPCs (one, but for a moment two when two runs raced) every run keeps: a finished one
    (its gateway attached) first, then by id."""
    gateways = GATEWAYS.list(p, tagged(plan, name=res.name))
    return lambda v: not any(attached(g, v["VpcId"]) for g in gateways)


def main_route_table(p: AwsSession, vpc_id: str) -> Item:
    tables = p.describe("get the main route table", "describe_route_tables", "RouteTables", Filters=[
        {"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "association.main", "Values": ["true"]}])
    if not tables:
        raise CloudError(f"{p.site.name}: VPC {vpc_id} has no main route table")
    return tables[0]


def find_network(p: AwsSession, res: Resource, plan: Plan) -> Found | None:
    """The network's VPC, "incomplete" until its gateway is attached and the default route goes through it."""
    if not (vpcs := VPCS.list(p, tagged(plan, name=res.name))):
        return None
    rank = vpc_rank(p, res, plan) if len(vpcs) > 1 else lambda v: 0
    vpc = min(vpcs, key=lambda v: (rank(v), v["VpcId"]))
    found = Found("network", vpc["VpcId"], res.name, status="incomplete", attrs={"cidr": vpc.get("CidrBlock")})
    igw = next(iter(gateways_of(p, found.cloud_id, res, plan)), None)
    if igw is None or not attached(igw, found.cloud_id):
        return found  # a crash between CreateVpc and the gateway: create() finishes it
    table = main_route_table(p, found.cloud_id)
    found.attrs.update(internet_gateway=igw["InternetGatewayId"], route_table=table["RouteTableId"])
    if any(r.get("DestinationCidrBlock") == "0.0.0.0/0" and r.get("GatewayId") == igw["InternetGatewayId"]
           and r.get("State", "active") == "active" for r in table.get("Routes") or []):
        found.status = "ready"
    return found


def create_network(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    if (found := find_network(p, res, plan)) is not None and found.status == "ready":
        return found
    if found is None:
        cidr = plan.get(f"subnet:{cast('NetworkSpec', res.spec)['network']}").spec["cidr"]
        # CreateVpc has no idempotency token and VPC names are not unique: two racing runs converge on one.
        vpc = p.create_unique(VPCS, f"create VPC {res.name}", lambda: p.ec2_once.create_vpc(
            CidrBlock=cidr, TagSpecifications=tag_spec(plan, "vpc", name=res.name))["Vpc"],
            lambda: VPCS.list(p, tagged(plan, name=res.name)), rank=lambda v: vpc_rank(p, res, plan)(v))
        found = Found("network", vpc["VpcId"], res.name, attrs={"cidr": cidr})
        log.info("%s: made VPC %s (%s) for %s", p.site.name, found.cloud_id, cidr, res.name)
    vpc_id = found.cloud_id
    if (igw := next(iter(gateways_of(p, vpc_id, res, plan)), None)) is None:
        igw = p.create_unique(GATEWAYS, f"create internet gateway for {res.name}", lambda: p.ec2_once.
                              create_internet_gateway(TagSpecifications=tag_spec(plan, "internet-gateway",
                                                                                 name=res.name))["InternetGateway"],
                              lambda: gateways_of(p, vpc_id, res, plan), rank=lambda g: not attached(g, vpc_id))
    igw_id = igw["InternetGatewayId"]
    if not attached(igw, vpc_id):
        try:
            p.call("attach internet gateway", lambda: p.ec2.attach_internet_gateway(
                InternetGatewayId=igw_id, VpcId=vpc_id))
        except CloudError as exc:  # a retry after a lost answer attached it already
            if not any(attached(g, vpc_id) for g in gateways_of(p, vpc_id, res, plan)):
                raise CloudError(f"{p.site.name}: cannot attach internet gateway {igw_id} to {vpc_id}: "
                                 f"{exc}") from exc
    table = main_route_table(p, vpc_id)
    route = {"RouteTableId": table["RouteTableId"], "DestinationCidrBlock": "0.0.0.0/0", "GatewayId": igw_id}
    routes = [r for r in table.get("Routes") or [] if r.get("DestinationCidrBlock") == "0.0.0.0/0"]
    if not routes:
        with contextlib.suppress(Conflict):  # RouteAlreadyExists: a retry after a lost answer made it
            p.call("add the default route", lambda: p.ec2.create_route(**route))
    elif routes[0].get("GatewayId") != igw_id or routes[0].get("State", "active") != "active":
        p.call("replace the default route", lambda: p.ec2.replace_route(**route))
    return Found("network", vpc_id, res.name, attrs={"cidr": found.attrs.get("cidr"), "internet_gateway": igw_id,
                                                     "route_table": table["RouteTableId"]})


def delete_networks(p: AwsSession, found: Sequence[Found], plan: Plan) -> None:
    """VPCs (their internet gateways detached and deleted first) and gateways left alone by a crash."""
    for f in sorted(found, key=lambda f: not f.cloud_id.startswith("igw-")):  # stray gateways first
        stray = f.cloud_id.startswith("igw-")
        for igw in GATEWAYS.list(p, [{"Name": "internet-gateway-id" if stray else "attachment.vpc-id",
                                      "Values": [f.cloud_id]}]):
            for a in igw.get("Attachments") or []:
                try:
                    p.in_use_retry("detach internet gateway", lambda a=a, g=igw["InternetGatewayId"]:
                                   p.ec2.detach_internet_gateway(InternetGatewayId=g, VpcId=a["VpcId"]))
                except CloudError as exc:
                    if "Gateway.NotAttached" not in str(exc):
                        raise
            GATEWAYS.remove(p, igw["InternetGatewayId"])
            log.info("%s: deleted internet gateway %s", p.site.name, igw["InternetGatewayId"])
        if not stray:
            VPCS.remove(p, f.cloud_id)
            log.info("%s: deleted VPC %s", p.site.name, f.cloud_id)


# -- subnet -------------------------------------------------------------------------------------------------------
def subnets_of(p: AwsSession, res: Resource, plan: Plan) -> list[Item]:
    """The subnets of that name (one, but for a moment two when two runs raced): one in use first, then by id."""
    return sorted(SUBNETS.list(p, tagged(plan, name=res.name)),
                  key=lambda n: (n.get("AvailableIpAddressCount", 0), n["SubnetId"]))


def find_subnet(p: AwsSession, res: Resource, plan: Plan) -> Found | None:
    return subnet_found(subnets[0]) if (subnets := subnets_of(p, res, plan)) else None


def create_subnet(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    if (existing := find_subnet(p, res, plan)) is not None:
        return existing
    spec = cast("SubnetSpec", res.spec)
    vpc_id, zone, cidr = deps[spec["network"]].cloud_id, subnet_zone(p, res, plan), spec["cidr"]

    def create() -> Item:
        return p.create_unique(SUBNETS, f"create subnet {res.name}", lambda: p.ec2_once.create_subnet(
            VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=zone,
            TagSpecifications=tag_spec(plan, "subnet", name=res.name))["Subnet"],
            lambda: subnets_of(p, res, plan), rank=lambda n: n.get("AvailableIpAddressCount", 0))

    # AWS refuses a second subnet of that CIDR in the VPC (Conflict): a racing run's, adopted.
    found = subnet_found(create_or_adopt(create, lambda: next(iter(subnets_of(p, res, plan)), None)))
    log.info("%s: made subnet %s (%s) in %s", p.site.name, found.cloud_id, cidr, zone)
    return found


def subnet_zone(p: AwsSession, res: Resource, plan: Plan) -> str:
    """The zone of a network's subnet: the site's; else that of a volume kept for a node on it (a volume
    attaches only in its zone); else the first zone that offers every candidate type of its nodes."""
    if p.site.zone:
        return p.site.zone
    servers = [r for r in plan.by_kind("server")
               if any(n.get("subnet") == res.key for n in r.spec.get("networks") or [])]
    nodes = {r.spec["node"] for r in servers}
    for vol in plan.by_kind("volume"):
        if vol.spec.get("node") in nodes and (kept := p.find(vol, plan)) is not None:
            log.info("%s: subnet %s goes to %s, where volume %s is", p.site.name, res.name, kept.attrs["zone"],
                     kept.cloud_id)
            return str(kept.attrs["zone"])
    candidates = [list(r.spec.get("candidates") or []) for r in servers]
    if not (every := sorted({c for cs in candidates for c in cs})):
        return sorted(instances.region_zones(p))[0]
    offered = instances.offered_zones(p, every)
    common = set.intersection(*(offered[t] for t in every))
    if not common:  # no zone has them all: one that has each node's first choice
        common = set.intersection(*(offered[cs[0]] for cs in candidates if cs))
    if not common:
        raise CloudError(f"{p.site.name}: no zone of {p.region} offers {', '.join(every)} together, but "
                         f"the nodes on {res.spec['network'].split(':', 1)[-1]} share one subnet (one zone); "
                         "give them types offered in one zone, or run on a zone site (aws:<zone>)")
    return sorted(common)[0]


# -- router: the VPC's internet gateway (nothing of its own to make or delete) -----------------------------------
def router(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found] | None = None) -> Found | None:
    """The router as its network's gateway: with `deps` (create) the network finished if needed, else looked up."""
    try:  # the network resource a router belongs to (through its subnet); none on a teardown look-up
        net = plan.get(plan.get(res.spec["subnet"]).spec["network"])
    except KeyError:
        if deps is None:
            return None
        raise CloudError(f"{p.site.name}: router {res.name} has no network in the plan") from None
    found = find_network(p, net, plan) if deps is None else create_network(p, net, plan, deps, None)
    return None if found is None or found.status != "ready" else Found(
        "router", found.attrs["internet_gateway"], res.name, attrs={"vpc_id": found.cloud_id, "note": (
            "the VPC's internet gateway (made with the network) routes to the internet; nothing else to make")})


# -- security group ----------------------------------------------------------------------------------------------
def wanted(spec: SecgroupSpec) -> Rules:
    """The group's rules, and the CIDRs of the networks without port security (all traffic from them allowed)."""
    return ({(int(r["port"]), str(r["protocol"]), str(r["cidr"])) for r in spec.get("rules") or []},
            {str(n["cidr"]) for n in spec.get("networks") or [] if n.get("open")})


def rules_of(group: Mapping[str, Any]) -> Rules:
    """What a group allows, as `wanted` says it."""
    perms = group.get("IpPermissions") or []
    return ({(int(p["FromPort"]), str(p.get("IpProtocol")), str(r.get("CidrIp"))) for p in perms
             if p.get("FromPort") is not None and p.get("FromPort") == p.get("ToPort")
             for r in p.get("IpRanges") or []},
            {str(r.get("CidrIp")) for p in perms if p.get("IpProtocol") == "-1" for r in p.get("IpRanges") or []})


def secgroup_vpc(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found] | None = None) -> str | None:
    """The VPC of the deployment's group: its network's (None if that does not exist), else the default VPC."""
    if not (nets := res.spec.get("networks") or []):
        return instances.default_vpc(p)
    if deps is not None and (key := nets[0]["network"]) in deps:
        return deps[key].cloud_id
    found = find_network(p, plan.get(nets[0]["network"]), plan)
    return found.cloud_id if found is not None else None


def find_secgroup(p: AwsSession, res: Resource, plan: Plan) -> Found | None:
    filters = [{"Name": "group-name", "Values": [res.name]}]
    if "rules" in res.spec:  # a teardown look-up (no spec) searches every VPC
        if (vpc := secgroup_vpc(p, res, plan)) is None:
            return None
        filters.append({"Name": "vpc-id", "Values": [vpc]})
    mine = [g for g in GROUPS.list(p, filters) if tags_of(g.get("Tags")).get(naming.TAG_DEPLOYMENT) == plan.deployment]
    if not mine:
        return None
    (rules, open_), (have, have_open) = wanted(cast("SecgroupSpec", res.spec)), rules_of(mine[0])
    return Found("secgroup", mine[0]["GroupId"], mine[0]["GroupName"], attrs={"vpc_id": mine[0].get("VpcId")},
                 status="ready" if rules <= have and open_ <= have_open else "incomplete")


def create_secgroup(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    if (existing := find_secgroup(p, res, plan)) is None:
        if (vpc := secgroup_vpc(p, res, plan, deps)) is None:
            raise CloudError(f"{p.site.name}: the network of security group {res.name} does not exist")

        def create() -> Found:
            out = p.call("create security group", lambda: p.ec2.create_security_group(
                GroupName=res.name, Description=f"labctl {plan.deployment}", VpcId=vpc,
                TagSpecifications=tag_spec(plan, "security-group", name=res.name)))
            return Found("secgroup", out["GroupId"], res.name, attrs={"new": True})

        def adopt() -> Found:
            # Group names are unique in a VPC: a retry after a lost answer or a concurrent run made it.
            if (found := find_secgroup(p, res, plan)) is None:
                raise CloudError(f"{p.site.name}: a security group named {res.name} exists in VPC {vpc} "
                                 "but is not this deployment's (no labctl tags); delete or rename it")
            return found

        existing = create_or_adopt(create, adopt)
    sg_id = existing.cloud_id
    (rules, open_), (have, have_open) = wanted(cast("SecgroupSpec", res.spec)), (set(), set()) if existing.attrs.get(
        "new") else rules_of(GROUPS.list(p, [{"Name": "group-id", "Values": [sg_id]}])[0])
    # A network without port security: its nodes talk freely (every protocol from its CIDR).
    grants = [(f"allow all traffic from {cidr}", [{"IpProtocol": "-1", "IpRanges": [
        {"CidrIp": cidr, "Description": "labctl: private network"}]}]) for cidr in sorted(open_ - have_open)]
    if missing := sorted(rules - have):
        grants.append((f"open ports {', '.join(str(port) for port, _, _ in missing)}", [
            {"IpProtocol": proto, "FromPort": port, "ToPort": port,
             "IpRanges": [{"CidrIp": cidr, "Description": "labctl"}]} for port, proto, cidr in missing]))
    for what, perms in grants:
        with contextlib.suppress(Conflict):  # a concurrent run allowed it first
            p.call(what, lambda perms=perms: p.ec2.authorize_security_group_ingress(GroupId=sg_id, IpPermissions=perms))
    return Found("secgroup", sg_id, res.name)


TABLE.register("network", find=find_network, create=create_network, delete=delete_networks)
TABLE.register("subnet", find=find_subnet, create=create_subnet, delete=SUBNETS.delete_all)
TABLE.register("router", find=router, create=lambda p, res, plan, deps, _c: router(p, res, plan, deps),
               delete=lambda p, found, plan: None)
TABLE.register("secgroup", find=find_secgroup, create=create_secgroup, delete=GROUPS.delete_all)
