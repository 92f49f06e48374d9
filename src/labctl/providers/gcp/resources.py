"""One table of the Compute Engine collections labctl uses (client, scope, how labctl marks its objects, their
`Found`), the look-up, listing and delete over it, and every kind's handler but the server's: networks and
subnetworks (generic), firewalls (secgroup), static addresses (floating_ip), persistent disks (volume) and their
attachments; key pairs and routers, which Compute Engine does not have."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from labctl.errors import CloudError, Conflict
from labctl.providers.base import Found
from labctl.providers.gcp import session as gs
from labctl.providers.gcp.instances import NAT_NAME, find_server, instance_ref
from labctl.providers.gcp.session import HANDLERS, Session, bound, log
from labctl.providers.kit import Handler

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource, SecgroupSpec, SubnetSpec, VolumeAttachmentSpec, VolumeSpec

KEEP_LABEL = "labctl-keep"  # a disk's label: "true" when `down` keeps it (Chameleon's `labctl:keep` metadata)
VOLUME_LABEL = "labctl-volume"  # a disk's label: the profile's name for the volume
MIN_DISK_GB = 10  # persistent disks cannot be smaller


def volume_found(disk: Any, _name: str = "") -> Found:
    status = {"READY": "ready", "CREATING": "pending", "RESTORING": "pending", "FAILED": "error"}.get(disk.status,
                                                                                                      "pending")
    vol = disk.labels.get(VOLUME_LABEL)
    return Found("volume", f"zones/{gs.last(disk.zone)}/disks/{disk.name}", disk.name, status=status,
                 error=f"disk is {disk.status}" if status == "error" else None,
                 attrs={"zone": gs.last(disk.zone), "size_gb": int(disk.size_gb), "disk_status": disk.status,
                        "keep": disk.labels.get(KEEP_LABEL) == "true", "users": [gs.rel(u) for u in disk.users],
                        **({"key": f"volume:{vol}"} if vol else {})})


#: The `Found` of an object of each kind (given the plan's name for it; servers: `instances.server_found`).
FOUND: dict[str, Callable[[Any, str], Found]] = {
    "volume": volume_found,
    "floating_ip": lambda a, name: Found(
        "floating_ip", f"regions/{gs.last(a.region)}/addresses/{a.name}", name or a.name,
        status="ready" if a.status == "IN_USE" else "incomplete",
        attrs={"floating_ip": a.address, "node": a.labels.get(gs.NODE_LABEL), "users": [gs.rel(u) for u in a.users]}),
    "secgroup": lambda fw, _n: Found("secgroup", f"global/firewalls/{fw.name}", fw.name,
                                     attrs={"firewalls": [fw.name]}),
    "network": lambda n, name: Found("network", f"global/networks/{n.name}", name or n.name,
                                     attrs={"network": n.name, "auto_subnetworks": n.auto_create_subnetworks}),
    "subnet": lambda sub, name: Found(
        "subnet", f"regions/{gs.last(sub.region)}/subnetworks/{sub.name}", name or sub.name, attrs={
            "network": gs.last(sub.network), "region": gs.last(sub.region), "cidr": sub.ip_cidr_range,
            "gateway_ip": sub.gateway_address}),
}


def described_kind(kind: str, body: Callable[[Session, Resource, Plan, Mapping[str, Found]], Any]) -> None:
    """Register a network-like kind: found by name and the deployment's mark, inserted (adopted after a lost
    answer or a concurrent run), deleted until gone."""
    c = gs.COLLECTIONS[kind]

    def find(s: Session, res: Resource, plan: Plan) -> Found | None:
        return next((FOUND[kind](o, res.name) for o in gs.named(s, kind, res.name, plan)), None)

    def create(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        if (existing := find(s, res, plan)) is not None:
            return existing
        obj = s.insert(f"create {c.noun} {gs.gce_name(res.name)}", getattr(s, c.client), c.key,
                       body(s, res, plan, deps), gs.mine(plan), **gs.where(s, kind))
        return FOUND[kind](obj, res.name)

    HANDLERS.register(kind, find=find, create=create, delete=lambda s, found, plan: gs.delete_kind(s, kind, found))


def _network(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found]) -> Any:
    from google.cloud import compute_v1

    return compute_v1.Network(name=gs.gce_name(res.name), auto_create_subnetworks=False,
                              description=gs.description(plan),
                              routing_config=compute_v1.NetworkRoutingConfig(routing_mode="REGIONAL"))


def _subnet(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found]) -> Any:
    from google.cloud import compute_v1

    spec: SubnetSpec = res.spec  # type: ignore[assignment]
    net = network(deps[spec["network"]])
    return compute_v1.Subnetwork(name=gs.gce_name(res.name), description=gs.description(plan),
                                 ip_cidr_range=spec["cidr"], network=f"global/networks/{net}")


def network(found: Found) -> str:
    return found.attrs.get("network") or gs.last(found.cloud_id)


described_kind("network", _network)
described_kind("subnet", _subnet)


# -- key pairs and routers: nothing on the cloud side ------------------------------------------------
def _keypair(s: Session, res: Resource, plan: Plan, *_: Any) -> Found:
    return Found("keypair", res.name, res.name, attrs={"public_key": res.spec["public_key"],
                                                       "note": "GCP has no key pairs: ssh-keys metadata"})


def _router(s: Session, res: Resource, plan: Plan, *_: Any) -> Found:
    return Found("router", f"implicit/{gs.gce_name(res.name)}", res.name, attrs={
        "note": "a VPC network routes to the internet itself (default route); nodes keep an ephemeral "
                "external address for outbound traffic"})


HANDLERS.register("keypair", find=_keypair, create=_keypair, delete=lambda *_: None)
HANDLERS.register("router", find=_router, create=_router, delete=lambda *_: None)


# -- firewalls (secgroup) -----------------------------------------------------------------------------
def _firewall_specs(s: Session, res: Resource, plan: Plan,
                    deps: Mapping[str, Found] | None = None) -> dict[str, dict[str, Any]]:
    """Firewall name -> {allowed: {proto: [ports]}, ranges: [cidr], network}: one rule per source range, and one
    per private network without port security that lets every protocol in from that network's CIDR. They belong
    to the deployment's own (private) network, else the site's."""
    spec: SecgroupSpec = res.spec  # type: ignore[assignment]
    nets = spec.get("networks") or []
    net = s.site_network
    if nets:
        key = nets[0]["network"]
        net = network(deps[key]) if deps and key in deps else gs.gce_name(plan.get(key).name)
    groups: dict[str, dict[str, list[str]]] = {}
    for rule in spec["rules"]:
        ports = groups.setdefault(rule["cidr"], {}).setdefault(rule["protocol"], [])
        if str(rule["port"]) not in ports:
            ports.append(str(rule["port"]))
    base = gs.gce_name(plan.deployment)
    specs = {(base if i == 0 else gs.gce_name(f"{base}-{hashlib.sha1(cidr.encode()).hexdigest()[:6]}")):
             {"allowed": allowed, "ranges": [cidr], "network": net} for i, (cidr, allowed) in enumerate(groups.items())}
    for n in nets:
        if n.get("open"):
            digest = hashlib.sha1(f"open:{n['network']}".encode()).hexdigest()[:6]
            specs[gs.gce_name(f"{base}-{digest}")] = {"allowed": {"all": []}, "ranges": [n["cidr"]], "network": net}
    return specs


def _firewall_matches(fw: Any, spec: Mapping[str, Any]) -> bool:
    have = {(a.I_p_protocol, p) for a in fw.allowed for p in a.ports}
    want = {(proto, p) for proto, ports in spec["allowed"].items() for p in ports}
    return (want <= have and set(spec["allowed"]) <= {a.I_p_protocol for a in fw.allowed}
            and set(spec["ranges"]) == set(fw.source_ranges) and gs.last(fw.network) == spec["network"])


def find_secgroup(s: Session, res: Resource, plan: Plan) -> Found | None:
    have = {fw.name: fw for fw in gs.marked(s, "secgroup", plan.deployment)}
    if not have:
        return None
    if "rules" not in res.spec:  # a teardown lookup from state records: every firewall of the deployment
        return Found("secgroup", f"global/firewalls/{min(have)}", res.name, attrs={"firewalls": sorted(have)})
    want = _firewall_specs(s, res, plan)
    complete = all(name in have and _firewall_matches(have[name], spec) for name, spec in want.items())
    return Found("secgroup", f"global/firewalls/{next(iter(want))}", res.name,
                 status="ready" if complete else "incomplete",
                 attrs={"firewalls": sorted(have), "tag": gs.gce_name(plan.deployment)})


def create_secgroup(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    from google.cloud import compute_v1

    want = _firewall_specs(s, res, plan, deps)
    have = {fw.name: fw for fw in gs.marked(s, "secgroup", plan.deployment)}
    ops = []
    for name, spec in want.items():
        body = compute_v1.Firewall(
            name=name, network=f"global/networks/{spec['network']}", direction="INGRESS", priority=1000,
            description=gs.description(plan), target_tags=[gs.gce_name(plan.deployment)], source_ranges=spec["ranges"],
            allowed=[compute_v1.Allowed(I_p_protocol=p, ports=ports) for p, ports in spec["allowed"].items()])
        if name in have and gs.last(have[name].network) != spec["network"]:
            # a firewall's network cannot be changed: make it again on the right one
            log.info("%s: firewall %s moves to network %s", s.site.name, name, spec["network"])
            s.delete_all("firewall", s.firewalls, "firewall", [({}, name)])
            del have[name]
        if name not in have:
            try:
                ops.append(s.start(f"create firewall {name}", s.firewalls, "insert_unary", firewall_resource=body))
            except Conflict:
                log.info("%s: firewall %s already exists", s.site.name, name)
        elif not _firewall_matches(have[name], spec):
            ops.append(s.start(f"update firewall {name}", s.firewalls, "patch_unary", firewall=name,
                               firewall_resource=body))
    for op in ops:
        with contextlib.suppress(Conflict):  # a concurrent run of this deployment made it first
            s.check_op(op, "firewall")
    return Found("secgroup", f"global/firewalls/{next(iter(want))}", res.name,
                 attrs={"firewalls": sorted(want), "tag": gs.gce_name(plan.deployment)})


def delete_secgroups(s: Session, found: Sequence[Found], plan: Plan) -> None:
    names = {gs.last(f.cloud_id) for f in found} | {n for f in found for n in f.attrs.get("firewalls") or []}
    gs.delete_kind(s, "secgroup", [Found("secgroup", f"global/firewalls/{n}", n) for n in sorted(names)])


HANDLERS.register("secgroup", find=find_secgroup, create=create_secgroup, delete=delete_secgroups)


# -- static addresses (floating_ip) -------------------------------------------------------------------
def find_floating_ip(s: Session, res: Resource, plan: Plan) -> Found | None:
    found = next((FOUND["floating_ip"](a, res.name) for a in gs.named(s, "floating_ip", res.name, plan)), None)
    if found is not None:
        found.attrs["node"] = res.spec.get("node")
    return found


def create_floating_ip(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    """Promote the instance's ephemeral address to a static one (same IP), or put a reserved one on it."""
    from google.cloud import compute_v1

    node, name = res.spec["node"], gs.gce_name(res.name)
    zone, iname = instance_ref(deps[res.spec["server"]])
    inst = s.get(f"get instance of {node}", s.instances, missing_ok=False, zone=zone, instance=iname)
    nic = inst.network_interfaces[0]
    current = next((ac for ac in nic.access_configs if ac.nat_i_p), None)
    addr = s.get("get address", s.addresses, region=s.region, address=name)
    if addr is None:
        body = compute_v1.Address(name=name, description=gs.description(plan, node), labels=gs.labels(plan, node),
                                  address_type="EXTERNAL", network_tier="PREMIUM")
        if current is not None:
            body.address = current.nat_i_p
        with contextlib.suppress(Conflict):  # a concurrent run of this deployment reserved it first (its name)
            s.run(f"reserve address for {node}", s.addresses, "insert_unary", region=s.region, address_resource=body)
        addr = s.get("get address", s.addresses, missing_ok=False, region=s.region, address=name)
    if not any(gs.rel(u).endswith(f"zones/{zone}/instances/{iname}") for u in addr.users):
        if addr.status != "RESERVED":
            raise CloudError(f"{s.site.name}: address {name} ({addr.address}) is in use by "
                             f"{', '.join(gs.rel(u) for u in addr.users)}")
        where_ = {"zone": zone, "instance": iname, "network_interface": nic.name}
        if current is not None:
            s.run(f"detach ephemeral address of {node}", s.instances, "delete_access_config_unary",
                  access_config=current.name, **where_)
        access = compute_v1.AccessConfig(name=NAT_NAME, type_="ONE_TO_ONE_NAT", nat_i_p=addr.address,
                                         network_tier="PREMIUM")
        s.run(f"attach address to {node}", s.instances, "add_access_config_unary", access_config_resource=access,
              **where_)
    return Found("floating_ip", f"regions/{s.region}/addresses/{name}", res.name,
                 attrs={"floating_ip": addr.address, "node": node, "zone": zone})


def delete_floating_ips(s: Session, found: Sequence[Found], plan: Plan) -> None:
    def release(zone: str, iname: str, addr: Any) -> None:  # take the address off the instance that has it
        inst = s.get_instance(zone, iname)
        for nic in inst.network_interfaces if inst is not None else []:
            for ac in nic.access_configs:
                if ac.nat_i_p == addr.address:
                    s.run(f"detach address from {iname}", s.instances, "delete_access_config_unary",
                          missing_ok=True, zone=zone, instance=iname, access_config=ac.name, network_interface=nic.name)

    gs.delete_kind(s, "floating_ip", found, release)


HANDLERS.register("floating_ip", find=find_floating_ip, create=create_floating_ip, delete=delete_floating_ips)


# -- persistent disks (volume) and attachments --------------------------------------------------------
def attachment_found(name: str, zone: str, instance: str, disk: str, device: str) -> Found:
    return Found("volume_attachment", f"zones/{zone}/instances/{instance}/devices/{device}", name, attrs={
        "volume_id": disk, "server_id": f"zones/{zone}/instances/{instance}", "zone": zone, "device": device,
        "device_paths": [f"/dev/disk/by-id/google-{device}"]})


def device_of(inst: Any, disk: str) -> str | None:
    """The device name under which the instance has the disk (zones/Z/disks/N), if attached."""
    return next((d.device_name for d in inst.disks if not d.boot and gs.rel(d.source).endswith(disk)), None)


def find_volume(s: Session, res: Resource, plan: Plan) -> Found | None:
    return next((volume_found(d) for d in gs.named(s, "volume", res.name, plan)), None)


def create_volume(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    """A pd-balanced disk in its server's zone (pending until READY: `wait` polls it), or the kept one."""
    from google.cloud import compute_v1

    spec: VolumeSpec = res.spec  # type: ignore[assignment]
    zone, name = instance_ref(deps[spec["server"]])[0], gs.gce_name(res.name)
    existing = find_volume(s, res, plan)
    if existing is not None and existing.status != "error":
        if existing.attrs["zone"] != zone:
            raise CloudError(f"{s.site.name}: volume {name} is in {existing.attrs['zone']}, but {spec['node']} runs "
                             f"in {zone} (a disk cannot move zones): run 'labctl down' and 'labctl up' again to "
                             "launch the node in the disk's zone")
        return existing
    size = max(int(spec["size_gb"]), MIN_DISK_GB)
    if size != int(spec["size_gb"]):
        log.info("%s: volume %s is %d GB (Compute Engine's smallest persistent disk), not %s", s.site.name,
                 spec["volume"], size, spec["size_gb"])
    body = compute_v1.Disk(name=name, size_gb=size, type_=f"zones/{zone}/diskTypes/pd-balanced",
                           description=gs.description(plan, spec["node"]),
                           labels=gs.labels(plan, spec["node"], **{KEEP_LABEL: "true" if spec.get("keep") else "false",
                                                                   VOLUME_LABEL: gs.label_value(spec["volume"])}))
    return volume_found(s.insert(f"create volume {name}", s.disks, "disk", body, gs.mine(plan), zone=zone))


def find_volume_attachment(s: Session, res: Resource, plan: Plan) -> Found | None:
    spec: VolumeAttachmentSpec = res.spec  # type: ignore[assignment]
    if "volume" not in spec or "server" not in spec:
        return None  # a teardown lookup: attachments are found through list_owned
    vol = find_volume(s, plan.get(spec["volume"]), plan)
    server = find_server(s, plan.get(spec["server"]), plan)
    if vol is None or server is None:
        return None
    zone, iname = instance_ref(server)
    if not any(u.endswith(f"zones/{zone}/instances/{iname}") for u in vol.attrs["users"]):
        return None
    inst = s.get_instance(zone, iname)
    device = device_of(inst, vol.cloud_id) if inst is not None else None
    return attachment_found(res.name, zone, iname, vol.cloud_id, device) if device else None


def create_volume_attachment(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found],
                             _c: str | None) -> Found:
    from google.cloud import compute_v1

    vol = deps[res.spec["volume"]]
    zone, iname = instance_ref(deps[res.spec["server"]])
    disk_zone, disk_name = instance_ref(vol)
    disk = s.get(f"get disk {disk_name}", s.disks, missing_ok=False, zone=disk_zone, disk=disk_name)
    inst = s.get(f"get instance {iname}", s.instances, missing_ok=False, zone=zone, instance=iname)
    if device := device_of(inst, vol.cloud_id):  # attached already (a rerun)
        return attachment_found(res.name, zone, iname, vol.cloud_id, device)
    for user in disk.users:  # still on a server of an earlier `up` that is going away: detach it there
        if (r := gs.ref(user)) and (r[0].get("zone"), r[1]) != (zone, iname):
            log.info("%s: detaching volume %s from %s first", s.site.name, disk_name, r[1])
            detach(s, r[0]["zone"], r[1], disk=vol.cloud_id)
    # autoDelete false: the disk outlives the instance (Compute Engine deletes that at the lab's end, or `down`)
    body = compute_v1.AttachedDisk(source=f"zones/{disk_zone}/disks/{disk_name}", device_name=disk_name,
                                   mode="READ_WRITE", auto_delete=False, boot=False, type_="PERSISTENT")
    s.run(f"attach volume {disk_name} to {iname}", s.instances, "attach_disk_unary", zone=zone, instance=iname,
          attached_disk_resource=body)
    return attachment_found(res.name, zone, iname, vol.cloud_id, disk_name)


def detach(s: Session, zone: str, iname: str, *, disk: str | None = None, device: str | None = None) -> None:
    """Detach a disk (zones/Z/disks/N, or by device name) from the instance and wait; nothing to do if either is
    gone or it is not attached."""
    inst = s.get_instance(zone, iname)
    device = device if inst is None or disk is None else device_of(inst, disk)
    if inst is not None and any(d.device_name == device and not d.boot for d in inst.disks):
        s.run(f"detach volume {device} from {iname}", s.instances, "detach_disk_unary", missing_ok=True, zone=zone,
              instance=iname, device_name=device)


def delete_attachments(s: Session, found: Sequence[Found], plan: Plan) -> None:
    for f in found:
        server, _, device = f.cloud_id.partition("/devices/")
        if not device or not (r := gs.ref(server)):
            raise CloudError(f"cannot tell the instance of volume attachment {f.name} ({f.cloud_id})")
        detach(s, r[0]["zone"], r[1], device=device)


def delete_volumes(s: Session, found: Sequence[Found], plan: Plan) -> None:
    gs.delete_kind(s, "volume", found, lambda zone, iname, disk: detach(
        s, zone, iname, disk=f"zones/{gs.last(disk.zone)}/disks/{disk.name}"))


@HANDLERS.handler("volume")
class Volumes(Handler):
    noun = "disk"
    find, create, delete = bound(find_volume), bound(create_volume), bound(delete_volumes)

    def status(self, res: Resource, found: Found, plan: Plan) -> Found | None:
        zone, name = instance_ref(found)  # CREATING until READY (a few per deployment: one get each)
        disk = self.ctx.get(f"get disk {name}", self.ctx.disks, zone=zone, disk=name)
        return volume_found(disk) if disk is not None else None

    def progress(self, res: Resource, found: Found) -> tuple[str, str, str]:
        return res.key, str(found.attrs.get("disk_status", "gone")).lower(), ""


HANDLERS.register("volume_attachment", find=find_volume_attachment, create=create_volume_attachment,
                  delete=delete_attachments)
