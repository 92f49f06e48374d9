"""Instances and what they need: images, zones and default subnets, key pairs, servers (zone fallback on
NoCapacity, deterministic ClientToken, the end they enforce themselves), Elastic IPs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from labctl import naming
from labctl.errors import CloudError, NoCapacity, UserError
from labctl.providers import kit
from labctl.providers.aws import session
from labctl.providers.aws.session import END_TAG, TABLE, AwsSession, Ec2Kind, Item, tag_spec, tagged, tags_of
from labctl.providers.base import Found, ProgressFn, create_or_adopt

if TYPE_CHECKING:
    from labctl.plan import FloatingIpSpec, KeypairSpec, Plan, Resource, ServerSpec

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
# The node's own timer (a systemd timer from its cloud-config): every minute it reads its END_TAG through IMDSv2
# (instance tags in metadata) and powers off once that has passed; the instance was launched to terminate on
# power-off. A tag it cannot read (none, or IMDS off) ends nothing.
LEASE_TIMER = rf"""write_files:
  - path: /usr/local/sbin/labctl-lease-check
    permissions: '0755'
    content: |
      #!/bin/sh
      imds=http://169.254.169.254/latest
      t=$(curl -sf -m 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' $imds/api/token) || exit 0
      end=$(curl -sf -m 5 -H "X-aws-ec2-metadata-token: $t" $imds/meta-data/tags/instance/{END_TAG}) || exit 0
      [ "$(date -u +%s)" -ge "$(date -u -d "$end" +%s)" ] && exec systemctl poweroff
  - path: /etc/systemd/system/labctl-lease.service
    content: "[Service]\nType=oneshot\nExecStart=/usr/local/sbin/labctl-lease-check\n"
  - path: /etc/systemd/system/labctl-lease.timer
    content: "[Timer]\nOnBootSec=1min\nOnUnitActiveSec=1min\n[Install]\nWantedBy=timers.target\n"
runcmd:
  - systemctl daemon-reload && systemctl enable --now labctl-lease.timer
"""


# -- look-ups (cached: they do not change during a run) -------------------------------------------------------
def image(p: AwsSession, abstract: str) -> dict[str, Any]:
    return p.memo.get(("image", abstract), lambda: find_image(p, abstract))


def find_image(p: AwsSession, abstract: str) -> dict[str, Any]:
    owners, pattern = IMAGES.get(abstract, (("self",), abstract))
    if abstract.startswith("ami-"):  # (EC2 answers an unknown id with InvalidAMIID.NotFound)
        out = p.call(f"find image {abstract}", lambda: p.ec2.describe_images(ImageIds=[abstract]), missing_ok=True)
        images = (out or {}).get("Images") or []
    else:
        images = sorted(p.describe(f"find image {abstract}", "describe_images", "Images", Owners=list(owners),
                                   Filters=[{"Name": "name", "Values": [pattern]},
                                            {"Name": "state", "Values": ["available"]},
                                            {"Name": "architecture", "Values": ["x86_64"]}]),
                        key=lambda i: i.get("CreationDate", ""), reverse=True)
    if not images and abstract.startswith("ami-"):
        raise UserError(f"{p.site.name}: image {abstract} not found in {p.region}")
    if not images:
        raise UserError(f"{p.site.name}: no image for '{abstract}' in {p.region} (looked for '{pattern}' owned by "
                        f"{', '.join(owners)}); known images: {', '.join(sorted(IMAGES))}, or an AMI id")
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
        if p.site.zone and p.site.zone not in subnets:
            raise UserError(f"{p.site.name}: zone {p.site.zone} has no default subnet "
                            f"(zones with one: {', '.join(sorted(subnets)) or 'none'})")
        return {z: s for z, s in sorted(subnets.items()) if z == p.site.zone or not p.site.zone}

    return p.memo.get("subnets", find)


def offered_zones(p: AwsSession, types: Sequence[str]) -> dict[str, set[str]]:
    """Instance type -> zones of the region that offer it (one call for all types not yet known)."""
    if missing := sorted({t for t in types if ("offered", t) not in p.memo}):
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
def instance_found(inst: Item) -> Found:
    state, tags = inst["State"]["Name"], tags_of(inst.get("Tags"))
    status = {"running": "ready", "pending": "pending"}.get(state, "error")
    reason = (inst.get("StateReason") or {}).get("Message")
    return Found("server", inst["InstanceId"], tags.get("Name", inst["InstanceId"]), status=status,
                 error=f"instance is {state}" + (f" ({reason})" if reason else "") if status == "error" else None,
                 attrs={"node": tags.get(naming.TAG_NODE), "fixed_ip": inst.get("PrivateIpAddress"),
                        "floating_ip": inst.get("PublicIpAddress"), "node_type": inst.get("InstanceType"),
                        "server_status": state, "zone": (inst.get("Placement") or {}).get("AvailabilityZone"),
                        **({"end": tags[END_TAG]} if END_TAG in tags else {})})


def node_found(inst: Item, res: Resource, plan: Plan) -> Found:
    """An instance as the server of `res`: with `private_ips` = {network name: private IP} on a network."""
    found = instance_found(inst)
    nets = res.spec.get("networks") or []
    if nets and inst.get("PrivateIpAddress"):
        with contextlib.suppress(KeyError):  # a teardown plan has no network resources
            found.attrs["private_ips"] = {plan.get(nets[0]["network"]).name: inst["PrivateIpAddress"]}
    return found


SERVERS = Ec2Kind("server", "instance", "describe_instances", "Reservations", "InstanceId", instance_found,
                  created="LaunchTime", owned=({"Name": "instance-state-name", "Values": list(NOT_TERMINATED)},))
ADDRESSES = Ec2Kind("floating_ip", "Elastic IP", "describe_addresses", "Addresses", "AllocationId", lambda a: Found(
    "floating_ip", a["AllocationId"], tags_of(a.get("Tags")).get("Name", ""),
    attrs={"floating_ip": a.get("PublicIp"), "instance_id": a.get("InstanceId")}), "release_address")
KEYPAIRS = Ec2Kind("keypair", "key pair", "describe_key_pairs", "KeyPairs", "KeyName",
                   lambda k: Found("keypair", k["KeyName"], k["KeyName"]), "delete_key_pair", created="CreateTime")
session.KINDS += [SERVERS, ADDRESSES, KEYPAIRS]


def poll(p: AwsSession, servers: Sequence[tuple[Resource, Found]], plan: Plan, results: dict[str, Found],
         missing: bool, on_progress: ProgressFn) -> None:
    """One poll round of pending servers (`wait`); `missing`: one absent from the listing is an error now."""
    # One DescribeInstances per round for the lab, shared by the deployments a class waits for at once.
    snap = p.snapshots.setdefault(plan.lab, kit.Snapshot(p.poll_interval * 0.9))
    listed = snap.get(lambda: {i["InstanceId"]: i for i in SERVERS.list(
        p, [{"Name": f"tag:{naming.TAG_LAB}", "Values": [plan.lab]}])})
    for r, f in servers:
        if (inst := listed.get(f.cloud_id)) is not None:
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
    if not (pairs := (out or {}).get("KeyPairs") or []):
        return None
    have = (pairs[0].get("PublicKey") or "").split()[:2]
    if have and have != cast("KeypairSpec", res.spec)["public_key"].split()[:2]:
        return Found("keypair", res.name, res.name, status="incomplete")  # another key: replace it
    return Found("keypair", res.name, res.name, attrs={"key_pair_id": pairs[0].get("KeyPairId")})


def create_keypair(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    def import_key() -> Found:
        out = p.call("import key pair", lambda: p.ec2.import_key_pair(
            KeyName=res.name, PublicKeyMaterial=cast("KeypairSpec", res.spec)["public_key"].encode(),
            TagSpecifications=tag_spec(plan, "key-pair")))
        return Found("keypair", res.name, res.name, attrs={"key_pair_id": out.get("KeyPairId")})

    # Deleted only when another key holds the name (a concurrent run of this deployment imports the same key: it
    # is adopted, never pulled from under that run's launch).
    if (found := find_keypair(p, res, plan)) is not None and found.status == "ready":
        return found
    if found is not None:
        p.call("delete stale key pair", lambda: p.ec2.delete_key_pair(KeyName=res.name), missing_ok=True)
    return create_or_adopt(import_key, lambda: find_keypair(p, res, plan))


# -- servers ---------------------------------------------------------------------------------------------------
def find_server(p: AwsSession, res: Resource, plan: Plan) -> Found | None:
    found = SERVERS.list(p, tagged(plan, node=res.spec["node"]))
    if live := sorted((i for i in found if i["State"]["Name"] in LIVE), key=lambda i: i["State"]["Name"] != "running"):
        return node_found(live[0], res, plan)
    p.dead[(plan.deployment, res.key)] = len(found)
    if stopped := [i for i in found if i["State"]["Name"] in ("stopping", "stopped")]:
        out = node_found(stopped[0], res, plan)
        out.error = f"instance {stopped[0]['InstanceId']} is {stopped[0]['State']['Name']}"
        return out
    return None


def _launch_zones(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found],
                  itype: str) -> tuple[list[tuple[str, str]], str]:
    """(zone, subnet) pairs to try for a launch of `itype`, and how to name where that is."""
    spec, offered = cast("ServerSpec", res.spec), offered_zones(p, [itype])[itype]
    if nets := spec.get("networks"):  # in its subnet's zone only
        subnet = deps[nets[0]["subnet"]]
        where = str(subnet.attrs.get("zone"))
        return ([(where, subnet.cloud_id)] if where in offered else []), where
    zones = [(z, s) for z, s in default_subnets(p).items() if z in offered]
    for vol in plan.by_kind("volume"):  # a volume (kept from an earlier `up`) attaches only in its own zone
        if vol.spec.get("node") != spec["node"] or (kept := p.find(vol, plan)) is None:
            continue
        zone, volume_id = str(kept.attrs["zone"]), kept.cloud_id
        if p.site.zone and zone != p.site.zone:
            raise UserError(f"{p.site.name}: volume {volume_id} of {spec['node']} is in {zone}, not {p.site.zone}; "
                            f"run on aws:{p.region} or delete it (`labctl down --delete-volumes`)")
        if any(z != zone for z, _ in zones):
            log.info("%s: launching %s in %s, where its volume %s is", p.site.name, spec["node"], zone, volume_id)
        return [(z, sub) for z, sub in zones if z == zone], f"{zone} (where volume {volume_id} is)"
    return zones, p.site.zone or p.region


def user_data(spec: ServerSpec) -> str:
    """cloud-config: the lease timer, and more authorized keys for the default user (boto3 base64-encodes it)."""
    keys = ["ssh_authorized_keys:", *(f"  - {k.strip()}" for k in spec.get("extra_keys") or [])]
    return "\n".join(["#cloud-config", *(keys if len(keys) > 1 else [])]) + "\n" + LEASE_TIMER


def end_after(hours: float, start: datetime | None = None) -> str:
    return ((start or datetime.now(UTC)) + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


def create_server(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found],
                  candidate: str | None) -> Found:
    spec = cast("ServerSpec", res.spec)
    node, nets = spec["node"], spec.get("networks") or []
    itype = candidate or spec["candidates"][0]
    ami = image(p, spec["image"])
    if len(nets) > 1:
        raise CloudError(f"{p.site.name}: {node} is on {len(nets)} private networks, but an AWS instance's "
                         "interfaces are all in one VPC")
    zones, where = _launch_zones(p, res, plan, deps, itype)
    if not zones:
        log.warning("%s: %s is not offered in %s", p.site.name, itype, where)
        raise NoCapacity(f"{p.site.name}: {itype} is not offered in {where}")
    dead_key = (plan.deployment, res.key)
    if dead_key not in p.dead:
        p.dead[dead_key] = len(SERVERS.list(p, tagged(plan, node=node)))
    attempt = p.dead[dead_key]
    # The end: set once per launch (a resend with the same token must send the same request); the node enforces it.
    base: dict[str, Any] = dict(
        ImageId=ami["ImageId"], InstanceType=itype, MinCount=1, MaxCount=1, KeyName=deps["keypair"].name,
        UserData=user_data(spec), InstanceInitiatedShutdownBehavior="terminate",
        MetadataOptions={"InstanceMetadataTags": "enabled"},
        TagSpecifications=tag_spec(plan, "instance", "volume", node=node, name=res.name,
                                   **{END_TAG: end_after(plan.lease_hours)}))
    groups = [deps["secgroup"].cloud_id] if "secgroup" in deps else []
    tried: list[str] = []

    def launch(where: tuple[str, str]) -> Found:
        zone, subnet = where
        kwargs = dict(base, ClientToken=session.token(plan.deployment, node, itype, zone, attempt))
        if nets:
            # One interface, in the deployment's subnet, with the node's fixed IP and a public IPv4 for outbound
            # traffic (Chameleon's shared network); the Elastic IP goes only to the nodes that have one.
            kwargs["NetworkInterfaces"] = [{
                "DeviceIndex": 0, "SubnetId": subnet, "AssociatePublicIpAddress": True, "DeleteOnTermination": True,
                **({"Groups": groups} if groups else {}),
                **({"PrivateIpAddress": nets[0]["fixed_ip"]} if nets[0].get("fixed_ip") else {})}]
        else:
            kwargs.update(SubnetId=subnet, **({"SecurityGroupIds": groups} if groups else {}))
        try:
            inst = p.call(f"launch {node} ({itype} in {zone})", lambda: p.ec2.run_instances(**kwargs))["Instances"][0]
        except CloudError as exc:  # this token's launch, sent by a run that crashed (with another end): adopt it
            if "IdempotentParameterMismatch" not in str(exc) or (again := find_server(p, res, plan)) is None:
                raise
            return again
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
        i for i in SERVERS.list(p, [{"Name": "instance-id", "Values": ids}]) if i["State"]["Name"] != "terminated"]
        or None, lambda _: "pending", timeout)
    log.info("%s: terminated %s", p.site.name, ", ".join(ids))


def extend(p: AwsSession, found: Found, hours: float) -> Found:
    """Move the server's end (its END_TAG, which the node reads every minute) `hours` later."""
    insts = SERVERS.list(p, [{"Name": "instance-id", "Values": [found.cloud_id]}])
    if not insts or insts[0]["State"]["Name"] not in LIVE:
        raise UserError(f"{p.site.name}: instance {found.cloud_id} of {found.name} is not running")
    if (end := tags_of(insts[0].get("Tags")).get(END_TAG)) is None:
        raise UserError(f"{p.site.name}: instance {found.cloud_id} has no end to move (launched by an older labctl)")
    new_end = end_after(hours, max(datetime.now(UTC), datetime.fromisoformat(end.replace("Z", "+00:00"))))
    p.call(f"move the end of {found.name}", lambda: p.ec2.create_tags(
        Resources=[found.cloud_id], Tags=[{"Key": END_TAG, "Value": new_end}]))
    log.info("%s: %s now ends at %s", p.site.name, found.name, new_end)
    return Found("server", found.cloud_id, found.name, attrs={**found.attrs, "end": new_end})


# -- Elastic IPs -----------------------------------------------------------------------------------------------
def find_floating_ip(p: AwsSession, res: Resource, plan: Plan, addresses: Sequence[Item] | None = None) -> Found | None:
    """The node's Elastic IP (an associated one first, then the lowest id: what every racing run takes)."""
    if addresses is None:
        addresses = ADDRESSES.list(p, tagged(plan, node=res.spec["node"]))
    if (a := min(addresses, key=lambda a: (not a.get("InstanceId"), a["AllocationId"]), default=None)) is None:
        return None
    found = Found("floating_ip", a["AllocationId"], res.name, status="incomplete", attrs={
        "floating_ip": a.get("PublicIp"), "instance_id": a.get("InstanceId") or None})
    if instance := found.attrs["instance_id"]:
        states = [i["State"]["Name"] for i in SERVERS.list(p, [{"Name": "instance-id", "Values": [instance]}])]
        found.status = "ready" if states and states[0] in LIVE else "incomplete"
    return found


def create_floating_ip(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found],
                       _c: str | None) -> Found:
    spec = cast("FloatingIpSpec", res.spec)
    server = deps[spec["server"]]
    if (found := find_floating_ip(p, res, plan)) is None:
        # Elastic IPs have no unique names: a concurrent run of this deployment (other state, other machine) may
        # have allocated one for the node too. Both keep the same (one already associated with the node's instance
        # first: a racer took it), the loser releases its own.
        def allocate() -> Item:  # no ClientToken: sent once (`create_unique`); tagged
            return p.ec2_once.allocate_address(Domain="vpc", TagSpecifications=tag_spec(
                plan, "elastic-ip", node=spec["node"], name=res.name))

        made = p.create_unique(ADDRESSES, f"allocate Elastic IP for {spec['node']}", allocate,
                               lambda: ADDRESSES.list(p, tagged(plan, node=spec["node"])),
                               rank=lambda a: a.get("InstanceId") != server.cloud_id)
        found = find_floating_ip(p, res, plan, [made])
    if found.attrs.get("instance_id") != server.cloud_id or found.status != "ready":
        p.call(f"associate Elastic IP with {spec['node']}", lambda: p.ec2.associate_address(
            AllocationId=found.cloud_id, InstanceId=server.cloud_id, AllowReassociation=True))
    found.status, found.attrs["instance_id"] = "ready", server.cloud_id
    log.info("%s: %s has Elastic IP %s", p.site.name, spec["node"], found.attrs.get("floating_ip"))
    return found


def release_addresses(p: AwsSession, found: Sequence[Found], plan: Plan) -> None:
    """Disassociated first (AWS does it on termination, emulators may not), then released."""
    for a in ADDRESSES.list(p, [{"Name": "allocation-id", "Values": [f.cloud_id for f in found]}]):
        if a.get("AssociationId"):
            p.call("disassociate Elastic IP", lambda a=a: p.ec2.disassociate_address(
                AssociationId=a["AssociationId"]), missing_ok=True)
        ADDRESSES.remove(p, a["AllocationId"])


TABLE.register("keypair", find=find_keypair, create=create_keypair, delete=KEYPAIRS.delete_all)
TABLE.register("server", find=find_server, create=create_server, delete=delete_servers)
TABLE.register("floating_ip", find=find_floating_ip, create=create_floating_ip, delete=release_addresses)
