"""Instances and what they need: images, zones and default subnets, key pairs, servers (zone fallback on
NoCapacity, deterministic ClientToken), Elastic IPs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from labctl import naming
from labctl.errors import CloudError, Conflict, NoCapacity, UserError
from labctl.providers import kit
from labctl.providers.aws.session import TABLE, AwsSession, delete_each, tag_list, tagged, tags_of, token
from labctl.providers.base import Found, ProgressFn, create_or_adopt

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource

log = logging.getLogger(__name__)

CANONICAL = "099720109477"
#: Abstract image name -> (owners, AMI name pattern); the newest available x86_64 match is used.
IMAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "ubuntu-24.04": ((CANONICAL,), "ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-amd64-server-*"),
    "ubuntu-22.04": ((CANONICAL,), "ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-amd64-server-*"),
    "ubuntu-24.04-cuda": (("amazon",), "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) *"),
    "ubuntu-22.04-cuda": (("amazon",), "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"),
}
LIVE = ("pending", "running")
NOT_TERMINATED = ("pending", "running", "stopping", "stopped", "shutting-down")


# -- look-ups (cached: they do not change during a run) -------------------------------------------------------
def image(p: AwsSession, abstract: str) -> dict[str, Any]:
    return p.memo.get(("image", abstract), lambda: find_image(p, abstract))


def find_image(p: AwsSession, abstract: str) -> dict[str, Any]:
    if abstract.startswith("ami-"):
        res = p.call(f"find image {abstract}", lambda: p.ec2.describe_images(ImageIds=[abstract]), missing_ok=True)
        images = (res or {}).get("Images", [])
        if not images:
            raise UserError(f"{p.site.name}: image {abstract} not found in {p.region}")
    else:
        owners, pattern = IMAGES.get(abstract, (("self",), abstract))
        images = sorted(p.describe(f"find image {abstract}", "describe_images", "Images", Owners=list(owners),
                                   Filters=[{"Name": "name", "Values": [pattern]},
                                            {"Name": "state", "Values": ["available"]},
                                            {"Name": "architecture", "Values": ["x86_64"]}]),
                        key=lambda i: i.get("CreationDate", ""), reverse=True)
        if not images:
            known = ", ".join(sorted(IMAGES))
            raise UserError(f"{p.site.name}: no image for '{abstract}' in {p.region} (looked for "
                            f"'{pattern}' owned by {', '.join(owners)}); known images: {known}, or an AMI id")
    log.debug("%s: image %s is %s (%s)", p.site.name, abstract, images[0]["ImageId"], images[0].get("Name"))
    return images[0]


def default_vpc(p: AwsSession) -> str:
    def find() -> str:
        vpcs = p.describe("find the default VPC", "describe_vpcs", "Vpcs",
                          Filters=[{"Name": "isDefault", "Values": ["true"]}])
        if not vpcs:
            raise UserError(f"{p.site.name}: region {p.region} has no default VPC; create one with "
                            "`aws ec2 create-default-vpc`")
        return vpcs[0]["VpcId"]

    return p.memo.get("vpc", find)


def default_subnets(p: AwsSession) -> dict[str, str]:
    """Zone -> default subnet of the default VPC (only the site's zone for a zone site)."""
    def find() -> dict[str, str]:
        subnets = {s["AvailabilityZone"]: s["SubnetId"] for s in p.describe(
            "list subnets", "describe_subnets", "Subnets",
            Filters=[{"Name": "vpc-id", "Values": [default_vpc(p)]}, {"Name": "default-for-az", "Values": ["true"]}])}
        if p.site.zone:
            if p.site.zone not in subnets:
                raise UserError(f"{p.site.name}: zone {p.site.zone} has no default subnet "
                                f"(zones with one: {', '.join(sorted(subnets)) or 'none'})")
            subnets = {p.site.zone: subnets[p.site.zone]}
        return dict(sorted(subnets.items()))

    return p.memo.get("subnets", find)


def offered_zones(p: AwsSession, types: Sequence[str]) -> dict[str, set[str]]:
    """Instance type -> zones of the region that offer it (one call for all types not yet known)."""
    missing = sorted({t for t in types if ("offered", t) not in p.memo})
    if missing:
        found: dict[str, set[str]] = {t: set() for t in missing}
        for o in p.describe("list instance type offerings", "describe_instance_type_offerings",
                            "InstanceTypeOfferings", LocationType="availability-zone",
                            Filters=[{"Name": "instance-type", "Values": missing}]):
            found.setdefault(o["InstanceType"], set()).add(o["Location"])
        for t, zones in found.items():
            p.memo.put(("offered", t), zones)
    return {t: p.memo.peek(("offered", t), set()) for t in types}


def region_zones(p: AwsSession) -> set[str]:
    """The available zones of the region (only the site's for a zone site)."""
    zones = p.memo.get("zones", lambda: {z["ZoneName"] for z in p.describe(
        "list zones", "describe_availability_zones", "AvailabilityZones",
        Filters=[{"Name": "state", "Values": ["available"]}])})
    return {p.site.zone} & zones if p.site.zone else set(zones)


# -- what an instance looks like to labctl ---------------------------------------------------------------------
def instance_found(inst: Mapping[str, Any]) -> Found:
    state = inst["State"]["Name"]
    tags = tags_of(inst.get("Tags"))
    status = {"running": "ready", "pending": "pending"}.get(state, "error")
    error = None
    if status == "error":
        reason = (inst.get("StateReason") or {}).get("Message")
        error = f"instance is {state}" + (f" ({reason})" if reason else "")
    return Found("server", inst["InstanceId"], tags.get("Name", inst["InstanceId"]), status=status, error=error,
                 attrs={"node": tags.get(naming.TAG_NODE), "fixed_ip": inst.get("PrivateIpAddress"),
                        "floating_ip": inst.get("PublicIpAddress"), "node_type": inst.get("InstanceType"),
                        "server_status": state, "zone": (inst.get("Placement") or {}).get("AvailabilityZone")})


def node_found(inst: Mapping[str, Any], res: Resource, plan: Plan) -> Found:
    """An instance as the server of `res`: with `private_ips` = {network name: private IP} on a network."""
    found = instance_found(inst)
    nets = res.spec.get("networks") or []
    if nets and inst.get("PrivateIpAddress"):
        with contextlib.suppress(KeyError):  # a teardown plan has no network resources
            found.attrs["private_ips"] = {plan.get(nets[0]["network"]).name: inst["PrivateIpAddress"]}
    return found


def instances(p: AwsSession, filters: list[dict[str, Any]], what: str = "list instances") -> list[dict[str, Any]]:
    return [i for r in p.describe(what, "describe_instances", "Reservations", Filters=filters) for i in r["Instances"]]


def poll(p: AwsSession, servers: Sequence[tuple[Resource, Found]], plan: Plan, results: dict[str, Found],
         missing: bool, on_progress: ProgressFn) -> None:
    """One poll round of pending servers (`wait`); `missing`: one absent from the listing is an error now."""
    # One DescribeInstances per round for the lab, shared by the deployments a class waits for at once.
    snap = p.snapshots.setdefault(plan.lab, kit.Snapshot(p.poll_interval * 0.9))
    listed = snap.get(lambda: {i["InstanceId"]: i for r in p.describe(
        "poll instances", "describe_instances", "Reservations",
        Filters=[{"Name": f"tag:{naming.TAG_LAB}", "Values": [plan.lab]}]) for i in r["Instances"]})
    for r, f in servers:
        inst = listed.get(f.cloud_id)
        if inst is not None:
            results[r.key] = node_found(inst, r, plan)
        elif missing:
            results[r.key] = Found("server", f.cloud_id, r.name, status="error", attrs=dict(f.attrs),
                                   error="instance disappeared")
        now = results[r.key]
        stage = {"pending": "building", "ready": "booted", "error": "error"}.get(now.status, now.status)
        on_progress(r.spec["node"], stage, now.error or now.attrs.get("server_status") or "")


# -- key pairs -------------------------------------------------------------------------------------------------
def find_keypair(p: AwsSession, res: Resource, plan: Plan) -> Found | None:
    out = p.call("get key pair", lambda: p.ec2.describe_key_pairs(KeyNames=[res.name], IncludePublicKey=True),
                 missing_ok=True)
    pairs = (out or {}).get("KeyPairs") or []
    if not pairs:
        return None
    have = (pairs[0].get("PublicKey") or "").split()[:2]
    if have and have != res.spec["public_key"].split()[:2]:
        return Found("keypair", res.name, res.name, status="incomplete")  # another key: replace it
    return Found("keypair", res.name, res.name, attrs={"key_pair_id": pairs[0].get("KeyPairId")})


def create_keypair(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    def import_key() -> Found:
        out = p.call("import key pair", lambda: p.ec2.import_key_pair(
            KeyName=res.name, PublicKeyMaterial=res.spec["public_key"].encode(),
            TagSpecifications=[{"ResourceType": "key-pair", "Tags": tag_list(plan)}]))
        return Found("keypair", res.name, res.name, attrs={"key_pair_id": out.get("KeyPairId")})

    # Imported first, deleted only when another key holds the name: deleting first would pull the key pair
    # from under a concurrent run of this deployment that is launching with it right now.
    stale: list[Found] = []

    def adopt() -> Found | None:
        found = find_keypair(p, res, plan)  # a retry after a lost answer, or a concurrent run: same key?
        if found is not None and found.status != "ready":
            stale.append(found)
            return None
        return found

    try:
        return create_or_adopt(import_key, adopt)
    except Conflict:
        if not stale:
            raise
    p.call("delete stale key pair", lambda: p.ec2.delete_key_pair(KeyName=res.name), missing_ok=True)
    return import_key()


# -- servers ---------------------------------------------------------------------------------------------------
def find_server(p: AwsSession, res: Resource, plan: Plan) -> Found | None:
    found = instances(p, tagged(plan, node=res.spec["node"]))
    live = [i for i in found if i["State"]["Name"] in LIVE]
    if live:
        live.sort(key=lambda i: i["State"]["Name"] != "running")
        return node_found(live[0], res, plan)
    p.dead[(plan.deployment, res.key)] = len(found)
    stopped = [i for i in found if i["State"]["Name"] in ("stopping", "stopped")]
    if stopped:
        out = node_found(stopped[0], res, plan)
        out.error = f"instance {stopped[0]['InstanceId']} is {stopped[0]['State']['Name']}"
        return out
    return None


def _launch_zones(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found],
                  itype: str) -> tuple[list[tuple[str, str]], str]:
    """(zone, subnet) pairs to try for a launch of `itype`, and how to name where that is."""
    nets = res.spec.get("networks") or []
    if nets:  # in its subnet's zone only
        subnet = deps[nets[0]["subnet"]]
        where = str(subnet.attrs.get("zone"))
        return ([(where, subnet.cloud_id)] if where in offered_zones(p, [itype])[itype] else []), where
    offered = offered_zones(p, [itype])[itype]
    zones = [(z, s) for z, s in default_subnets(p).items() if z in offered]
    node = res.spec["node"]
    for vol in plan.by_kind("volume"):  # a volume (kept from an earlier `up`) attaches only in its own zone
        if vol.spec.get("node") != node or (kept := p.find(vol, plan)) is None:
            continue
        zone, volume_id = str(kept.attrs["zone"]), kept.cloud_id
        if p.site.zone and zone != p.site.zone:
            raise UserError(f"{p.site.name}: volume {volume_id} of {node} is in {zone}, not {p.site.zone}; run on "
                            f"aws:{p.region} or delete it (`labctl down --delete-volumes`)")
        if any(z != zone for z, _ in zones):
            log.info("%s: launching %s in %s, where its volume %s is", p.site.name, node, zone, volume_id)
        return [(z, sub) for z, sub in zones if z == zone], f"{zone} (where volume {volume_id} is)"
    return zones, p.site.zone or p.region


def create_server(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found],
                  candidate: str | None) -> Found:
    spec = res.spec
    node = spec["node"]
    itype = candidate or spec["candidates"][0]
    ami = image(p, spec["image"])
    nets = spec.get("networks") or []
    if len(nets) > 1:
        raise CloudError(f"{p.site.name}: {node} is on {len(nets)} private networks, but an AWS instance's "
                         "interfaces are all in one VPC")
    zones, where = _launch_zones(p, res, plan, deps, itype)
    if not zones:
        log.warning("%s: %s is not offered in %s", p.site.name, itype, where)
        raise NoCapacity(f"{p.site.name}: {itype} is not offered in {where}")
    dead_key = (plan.deployment, res.key)
    if dead_key not in p.dead:
        p.dead[dead_key] = len(instances(p, tagged(plan, node=node)))
    attempt = p.dead[dead_key]
    base: dict[str, Any] = dict(
        ImageId=ami["ImageId"], InstanceType=itype, MinCount=1, MaxCount=1, KeyName=deps["keypair"].name,
        TagSpecifications=[{"ResourceType": kind, "Tags": tag_list(plan, node, res.name)}
                           for kind in ("instance", "volume")])
    if spec.get("extra_keys"):
        # cloud-init user data that adds more authorized keys for the default user (boto3 base64-encodes it)
        base["UserData"] = "\n".join(["#cloud-config", "ssh_authorized_keys:",
                                      *(f"  - {k.strip()}" for k in spec["extra_keys"])]) + "\n"
    groups = [deps["secgroup"].cloud_id] if "secgroup" in deps else []
    tried: list[str] = []

    def launch(where: tuple[str, str]) -> Found:
        zone, subnet = where
        kwargs = dict(base, ClientToken=token(plan.deployment, node, itype, zone, attempt))
        if nets:
            # One interface, in the deployment's subnet, with the node's fixed IP and a public IPv4 for outbound
            # traffic (Chameleon's shared network); the Elastic IP goes only to the nodes that have one.
            nic: dict[str, Any] = {"DeviceIndex": 0, "SubnetId": subnet, "AssociatePublicIpAddress": True,
                                   "DeleteOnTermination": True, **({"Groups": groups} if groups else {})}
            if nets[0].get("fixed_ip"):
                nic["PrivateIpAddress"] = nets[0]["fixed_ip"]
            kwargs["NetworkInterfaces"] = [nic]
        else:
            kwargs.update(SubnetId=subnet, **({"SecurityGroupIds": groups} if groups else {}))
        inst = p.call(f"launch {node} ({itype} in {zone})", lambda: p.ec2.run_instances(**kwargs))["Instances"][0]
        if tried:
            log.warning("%s: launched %s as %s in %s (%s had no capacity)", p.site.name, node, itype, zone,
                        ", ".join(tried))
        else:
            log.info("%s: launched %s as %s in %s (%s)", p.site.name, node, itype, zone, inst["InstanceId"])
        return node_found(inst, res, plan)

    def skipped(where: tuple[str, str], exc: NoCapacity) -> None:
        tried.append(where[0])
        nxt = next((z for z, _ in zones[len(tried):]), None)
        log.warning("%s: no %s capacity for %s in %s%s (%s)", p.site.name, itype, node, where[0],
                    f"; trying {nxt}" if nxt else "", str(exc).rsplit(": ", 1)[-1][:120])

    try:
        found = kit.first_with_capacity(zones, launch, on_skip=skipped)
    except NoCapacity as exc:
        raise NoCapacity(f"{p.site.name}: no {itype} capacity for {node} in {', '.join(tried)}") from exc
    p.dead.pop(dead_key, None)
    found.status = "error" if found.status == "error" else "pending"
    return found


def delete_servers(p: AwsSession, found: Sequence[Found], plan: Plan, timeout: float = 900) -> None:
    ids = sorted({f.cloud_id for f in found if f.cloud_id})
    try:
        p.call("terminate instances", lambda: p.ec2.terminate_instances(InstanceIds=ids))
    except kit.NotFound:
        for iid in ids:  # some are gone already: one by one
            p.call("terminate instance", lambda iid=iid: p.ec2.terminate_instances(InstanceIds=[iid]),
                   missing_ok=True)

    p.until(f"instances {', '.join(ids)} terminating", lambda: [
        i for i in instances(p, [{"Name": "instance-id", "Values": ids}], "poll instances")
        if i["State"]["Name"] != "terminated"] or None, lambda _: "pending", timeout)
    log.info("%s: terminated %s", p.site.name, ", ".join(ids))


# -- Elastic IPs -----------------------------------------------------------------------------------------------
def node_addresses(p: AwsSession, res: Resource, plan: Plan) -> list[Found]:
    """The node's Elastic IPs (one, but for a moment two when two runs raced), status not looked at."""
    return [Found("floating_ip", a["AllocationId"], res.name, status="incomplete", attrs={
        "floating_ip": a.get("PublicIp"), "instance_id": a.get("InstanceId") or None,
        "association_id": a.get("AssociationId")}) for a in p.describe(
        "list Elastic IPs", "describe_addresses", "Addresses", Filters=tagged(plan, node=res.spec["node"]))]


def find_floating_ip(p: AwsSession, res: Resource, plan: Plan) -> Found | None:
    addresses = node_addresses(p, res, plan)
    if not addresses:
        return None
    # An associated one first, then the lowest id: what every run takes.
    found = min(addresses, key=lambda f: (not f.attrs["instance_id"], f.cloud_id))
    if instance := found.attrs["instance_id"]:
        states = [i["State"]["Name"] for i in instances(p, [{"Name": "instance-id", "Values": [instance]}])]
        found.status = "ready" if states and states[0] in LIVE else "incomplete"
    return found


def create_floating_ip(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found],
                       _c: str | None) -> Found:
    node = res.spec["node"]
    server = deps[res.spec["server"]]
    found = find_floating_ip(p, res, plan)
    if found is None:
        def allocate() -> Found:  # no ClientToken: never resent blindly (see `create_unique`); tagged
            out = p.ec2_once.allocate_address(Domain="vpc", TagSpecifications=[
                {"ResourceType": "elastic-ip", "Tags": tag_list(plan, node, res.name)}])
            return Found("floating_ip", out["AllocationId"], res.name, attrs={"floating_ip": out["PublicIp"]})

        # Elastic IPs have no unique names: a concurrent run of this deployment (other state, other machine) may
        # have allocated one for the node too. Both keep the same (one already associated with the node's instance
        # first: a racer took it), the loser releases its own.
        found = p.create_unique(
            f"allocate Elastic IP for {node}", allocate, lambda: find_floating_ip(p, res, plan),
            lambda: node_addresses(p, res, plan),
            lambda f: p.call("release duplicate Elastic IP", lambda: p.ec2.release_address(
                AllocationId=f.cloud_id), missing_ok=True),
            ident=lambda f: f.cloud_id, rank=lambda f: f.attrs.get("instance_id") != server.cloud_id)
    if found.attrs.get("instance_id") != server.cloud_id or found.status != "ready":
        out = p.call(f"associate Elastic IP with {node}", lambda: p.ec2.associate_address(
            AllocationId=found.cloud_id, InstanceId=server.cloud_id, AllowReassociation=True))
        found.attrs["association_id"] = out.get("AssociationId")
    found.status = "ready"
    found.attrs["instance_id"] = server.cloud_id
    log.info("%s: %s has Elastic IP %s", p.site.name, node, found.attrs.get("floating_ip"))
    return found


def release_addresses(p: AwsSession, found: Sequence[Found], plan: Plan) -> None:
    for a in p.describe("list Elastic IPs", "describe_addresses", "Addresses",
                        Filters=[{"Name": "allocation-id", "Values": [f.cloud_id for f in found]}]):
        if a.get("AssociationId"):
            p.call("disassociate Elastic IP", lambda a=a: p.ec2.disassociate_address(
                AssociationId=a["AssociationId"]), missing_ok=True)
        p.call("release Elastic IP", lambda a=a: p.ec2.release_address(AllocationId=a["AllocationId"]),
               missing_ok=True)


def owned(p: AwsSession, plan: Plan) -> list[Found]:
    """The deployment's instances, Elastic IPs and key pairs (for list_owned)."""
    return [*(instance_found(i) for i in instances(p, [
                *tagged(plan), {"Name": "instance-state-name", "Values": list(NOT_TERMINATED)}])),
            *(Found("floating_ip", a["AllocationId"], tags_of(a.get("Tags")).get("Name", ""), attrs={
                "floating_ip": a.get("PublicIp"), "instance_id": a.get("InstanceId")})
              for a in p.describe("list Elastic IPs", "describe_addresses", "Addresses", Filters=tagged(plan))),
            *(Found("keypair", k["KeyName"], k["KeyName"])
              for k in p.describe("list key pairs", "describe_key_pairs", "KeyPairs", Filters=tagged(plan)))]


TABLE.register("keypair", find=find_keypair, create=create_keypair,
               delete=delete_each("delete key pair", "delete_key_pair", "KeyName"))
TABLE.register("server", find=find_server, create=create_server, delete=delete_servers)
TABLE.register("floating_ip", find=find_floating_ip, create=create_floating_ip, delete=release_addresses)
