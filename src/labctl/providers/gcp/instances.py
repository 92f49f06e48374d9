"""Instances: images, machine types, zone and type fallback, launch (requestIds), adopt, delete."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from labctl.errors import CloudError, Conflict, NoCapacity, QuotaExceeded, UserError
from labctl.providers.base import Found
from labctl.providers.gcp import names
from labctl.providers.gcp.session import HANDLERS, Session, bound, log, quota_metric
from labctl.providers.kit import Handler, first_with_capacity

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource

_NOT_OFFERED = re.compile(r"does not exist in zone|not (?:available|supported) in (?:the )?zone", re.I)
_REQUEST_NS = uuid.UUID("6f1d7c52-3f0e-5b7a-9c1e-4a2b8d0e6c31")
MAX_REPLAYS = 4


class TypeQuota(Exception):
    """A regional quota that only some types count against (GPUs, family CPUs) is used up: no point trying the
    other zones (`first_with_capacity` moves on at NoCapacity only); another type may still fit."""


# -- images and types ----------------------------------------------------------------------------
def image(s: Session, abstract: str) -> Any:
    """The image (newest of its family) for an abstract image name; UserError if there is none."""
    def load() -> Any:
        if abstract in names.IMAGE_FAMILIES:
            project, family = names.IMAGE_FAMILIES[abstract]
        elif m := re.match(r"^(?:projects/)?([^/]+)/(?:global/images/)?family/([^/]+)$", abstract):
            project, family = m.groups()
        else:
            known = ", ".join(sorted(names.IMAGE_FAMILIES))
            raise UserError(f"{s.site.name}: no Compute Engine image for '{abstract}' (known: {known}; "
                            "or give 'PROJECT/family/FAMILY')")
        found = s.call(f"find image family {family}", lambda: s.client("ImagesClient").get_from_family(
            request={"project": project, "family": family}, **s.opts()), missing_ok=True)
        if found is None:
            raise UserError(f"{s.site.name}: image family '{family}' not found in project '{project}'")
        return found

    return s.memo.get(f"image:{abstract}", load)


def zones_offering(s: Session, candidate: str) -> list[str]:
    """Zones of the site that offer the machine type (and accelerator) of `candidate` (one aggregated list call
    each, cached)."""
    zones = s.zones()

    def offered_in(client_name: str, attr: str, name: str) -> set[str]:
        pairs = s.listing(f"list zones offering {name}", s.client(client_name), "aggregated_list",
                          filter=f'name = "{name}"')
        return {scope.split("/")[-1] for scope, scoped in pairs if list(getattr(scoped, attr))}

    def load() -> list[str]:
        machine, accel, _ = names.parse_type(candidate)
        offered = set(zones) & offered_in("MachineTypesClient", "machine_types", machine)
        if accel:
            offered &= offered_in("AcceleratorTypesClient", "accelerator_types", accel)
        return [z for z in zones if z in offered]

    return s.memo.get(f"offered:{candidate}", load)


def preflight(s: Session, plan: Plan) -> None:
    zones = s.region_zones()  # authenticates: bad credentials or project fail here
    if s.site.zone and s.site.zone not in zones:
        raise UserError(f"{s.site.name}: zone '{s.site.zone}' is not in region {s.region} "
                        f"(zones: {', '.join(zones)})")
    for name in sorted({n.image for n in plan.nodes}):
        image(s, name)
    where = s.site.zone or f"any zone of {s.region}"
    for node in plan.nodes:
        offered = [c for c in node.candidates if zones_offering(s, c)]
        if node.candidates and not offered:
            raise UserError(f"{s.site.name}: none of {', '.join(node.candidates)} (for {node.name}) is "
                            f"offered in {where}")
        for candidate in sorted(set(node.candidates) - set(offered)):
            log.warning("%s: %s is not offered in %s; %s will skip it", s.site.name, candidate, where, node.name)


# -- find ----------------------------------------------------------------------------------------
def find_server(s: Session, res: Resource, plan: Plan) -> Found | None:
    found = [s.server_found(i) for i in s.list_instances(plan.deployment, res.spec["node"])]
    # Prefer a healthy one if an earlier run left a broken twin; the twin is swept by `down`.
    found.sort(key=lambda f: {"ready": 0, "pending": 1}.get(f.status, 2))
    return found[0] if found else None


# -- create --------------------------------------------------------------------------------------
def create_server(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
    node = res.spec["node"]
    candidate = candidate or res.spec["candidates"][0]
    names.parse_type(candidate)
    img = image(s, res.spec["image"])
    static_ip = _static_ip(s, plan, node)
    zones = zones_offering(s, candidate)
    if not zones:
        raise NoCapacity(f"{s.site.name}: {candidate} is not offered in {s.site.zone or f'any zone of {s.region}'}")
    zones = _zones_of_kept_disks(s, plan, node, candidate, zones)
    with s.lock:
        attempt = s.attempts.get((plan.deployment, node), -1) + 1
        s.attempts[(plan.deployment, node)] = attempt
    full: list[str] = []

    def skip(zone: str, exc: NoCapacity) -> None:
        full.append(zone)
        nxt = zones[zones.index(zone) + 1] if zone != zones[-1] else None
        log.info("%s: %s has no room for %s in %s (%s)%s", s.site.name, node, candidate, zone, exc,
                 f"; trying {nxt}" if nxt else "")

    try:
        found = first_with_capacity(zones, lambda zone: _insert_instance(
            s, res, plan, deps, candidate, zone, img, static_ip, attempt), on_skip=skip)
    except TypeQuota as exc:  # the same in every zone: the engine tries the next type
        raise NoCapacity(str(exc)) from None
    if full:
        log.info("%s: %s launched in %s after %s had no %s", s.site.name, node, found.attrs["zone"],
                 ", ".join(full), candidate)
    return found


def _zones_of_kept_disks(s: Session, plan: Plan, node: str, candidate: str, zones: list[str]) -> list[str]:
    """On a region site, a node whose volume survives from an earlier `up` must run in that disk's zone."""
    if s.site.zone or not any(v.spec.get("node") == node for v in plan.by_kind("volume")):
        return zones
    disks = s.list_disks(names.label_filter(plan.deployment, node))
    disk_zones = {names.last(d.zone) for d in disks if d.status != "DELETING"}
    if not disk_zones:
        return zones
    usable = [z for z in zones if z in disk_zones]
    if not usable:
        raise NoCapacity(f"{s.site.name}: {candidate} is not offered in {', '.join(sorted(disk_zones))}, "
                         f"where {node}'s kept volume is")
    if usable != zones:
        log.info("%s: %s launches in %s, where its kept volume is", s.site.name, node, ", ".join(usable))
    return usable


def _static_ip(s: Session, plan: Plan, node: str) -> str | None:
    """The node's reserved static address, if one exists and is free (else the instance gets an ephemeral)."""
    if not names.has(plan, f"floating_ip:{node}"):
        return None
    address = names.gce_name(plan.get(f"floating_ip:{node}").name)
    addr = s.get("get address", s.addresses, region=s.region, address=address)
    return addr.address if addr is not None and addr.status == "RESERVED" else None


def _instance_body(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str, zone: str,
                   img: Any, static_ip: str | None) -> Any:
    from google.cloud import compute_v1

    spec = res.spec
    machine, accel, count = names.parse_type(candidate)
    main_key = plan.get("keypair").spec["public_key"] if names.has(plan, "keypair") else None
    if "keypair" in deps:
        main_key = deps["keypair"].attrs.get("public_key") or main_key
    keys = [main_key, *spec.get("extra_keys", [])]
    ssh_keys = "\n".join(f"{s.site.ssh_user}:{k.strip()}" for k in keys if k)
    dlvm = names.DLVM_PROJECT in (img.self_link or "")
    metadata = [compute_v1.Items(key="ssh-keys", value=ssh_keys)]
    if dlvm:
        metadata.append(compute_v1.Items(key="install-nvidia-driver", value="True"))
    size = max(int(img.disk_size_gb or 10), names.BOOT_DISK_GB["dlvm" if dlvm else "default"])
    access = compute_v1.AccessConfig(name=names.NAT_NAME, type_="ONE_TO_ONE_NAT", network_tier="PREMIUM")
    if static_ip:
        access.nat_i_p = static_ip
    body = compute_v1.Instance(
        name=names.gce_name(res.name), description=names.description(plan.deployment, spec["node"]),
        machine_type=f"zones/{zone}/machineTypes/{machine}", labels=names.labels(plan, spec["node"]),
        metadata=compute_v1.Metadata(items=metadata),
        disks=[compute_v1.AttachedDisk(
            boot=True, auto_delete=True, initialize_params=compute_v1.AttachedDiskInitializeParams(
                source_image=img.self_link, disk_size_gb=size, disk_type=f"zones/{zone}/diskTypes/pd-balanced"))],
        network_interfaces=[_nic(s, spec, deps, zone, access)],
    )
    if "secgroup" in deps:
        body.tags = compute_v1.Tags(items=[deps["secgroup"].attrs.get("tag") or names.tag(plan.deployment)])
    if accel:
        body.guest_accelerators = [compute_v1.AcceleratorConfig(
            accelerator_type=f"zones/{zone}/acceleratorTypes/{accel}", accelerator_count=count)]
    if accel or machine.startswith(names.GPU_FAMILIES):
        body.scheduling = compute_v1.Scheduling(on_host_maintenance="TERMINATE", automatic_restart=True)
    return body


def _nic(s: Session, spec: Mapping[str, Any], deps: Mapping[str, Found], zone: str, access: Any) -> Any:
    """The instance's one interface: on the deployment's network and subnetwork at the node's fixed IP if it is on
    a private network, else on the site's network; with an external address either way."""
    from google.cloud import compute_v1

    nets = spec.get("networks") or []
    if not nets:
        return compute_v1.NetworkInterface(network=f"global/networks/{s.site_network}", access_configs=[access])
    if len(nets) > 1:
        raise UserError(f"{s.site.name}: a Compute Engine node is on one private network here, but "
                        f"{spec['node']} asks for {len(nets)}")
    net = nets[0]
    sub = deps[net["subnet"]]
    region = sub.attrs.get("region") or s.region
    if zone.rsplit("-", 1)[0] != region:
        raise CloudError(f"{s.site.name}: zone {zone} is not in {region}, the region of subnetwork "
                         f"{names.last(sub.cloud_id)}")
    nic = compute_v1.NetworkInterface(network=f"global/networks/{names.network_name(deps[net['network']])}",
                                      subnetwork=f"regions/{region}/subnetworks/{names.last(sub.cloud_id)}",
                                      access_configs=[access])
    if net.get("fixed_ip"):
        nic.network_i_p = net["fixed_ip"]
    return nic


def _type_quota(s: Session, metric: str | None, candidate: str, err: Exception) -> None:
    """A quota that only some types count against (GPUs, family CPUs): TypeQuota (another type may fit)."""
    if metric and (metric.endswith("_GPUS") or (metric.endswith("_CPUS") and metric != "CPUS")):
        raise TypeQuota(f"{s.site.name}: quota {metric} in {s.region} is used up ({candidate}); {err}") from None


def _insert_instance(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str, zone: str,
                     img: Any, static_ip: str | None, attempt: int) -> Found:
    from google.cloud import compute_v1

    node = res.spec["node"]
    name = names.gce_name(res.name)
    body = _instance_body(s, res, plan, deps, candidate, zone, img, static_ip)
    what = f"launch {node} ({candidate}) in {zone}"
    for _replay in range(MAX_REPLAYS):
        rid = str(uuid.uuid5(_REQUEST_NS, f"{s.project}/{plan.deployment}/{node}/{candidate}/{zone}/{attempt}"))
        sends = [0]

        def send(r: str = rid, sends: list[int] = sends) -> Any:
            sends[0] += 1
            return s.instances.insert_unary(request=compute_v1.InsertInstanceRequest(
                project=s.project, zone=zone, instance_resource=body, request_id=r), **s.opts())

        log.debug("%s: %s (requestId %s)", s.site.name, what, rid)
        try:
            op = s.call(what, send)
        except Conflict:
            return _adopt_instance(s, plan, zone, name)
        except QuotaExceeded as exc:
            _type_quota(s, (re.findall(r"Quota '([A-Z0-9_]+)' exceeded", str(exc)) or [None])[0], candidate, exc)
            raise
        except CloudError as exc:
            if _NOT_OFFERED.search(str(exc)):
                raise NoCapacity(f"not offered: {exc}") from None
            raise
        replay = sends[0] == 1 and op.status == compute_v1.Operation.Status.DONE
        op = s.wait_op(op, what)
        err = s.op_failed(op, what)
        # A DONE operation on the first send is an earlier attempt's (same requestId, e.g. a rerun of labctl): if
        # it failed, or its instance is gone, that says nothing about now: insert anew.
        if replay and (err is not None or s.get_instance(zone, name) is None):
            log.info("%s: requestId %s answered with an earlier operation; launching anew", s.site.name, rid)
            attempt += 1
            with s.lock:
                key = (plan.deployment, node)
                s.attempts[key] = max(s.attempts.get(key, 0), attempt)
            continue
        if isinstance(err, Conflict):  # a concurrent run's insert of this name won
            return _adopt_instance(s, plan, zone, name)
        if isinstance(err, QuotaExceeded):
            _type_quota(s, quota_metric(op), candidate, err)
        if err is not None:
            raise err
        log.info("%s: %s is %s in %s", s.site.name, node, candidate, zone)
        return Found("server", f"zones/{zone}/instances/{name}", name, status="pending", attrs={
            "node": node, "zone": zone, "node_type": candidate, "server_status": "PROVISIONING",
            "instance_id": str(op.target_id), "fixed_ip": None, "floating_ip": None})
    raise CloudError(f"{s.site.name}: {what}: every requestId replayed an earlier operation")


def _adopt_instance(s: Session, plan: Plan, zone: str, name: str) -> Found:
    """The instance that holds the name (made by a lost answer's insert or a concurrent run), if labctl's."""
    existing = s.get_instance(zone, name)
    if existing is None or not names.owned_by(existing, plan.deployment):
        raise CloudError(f"{s.site.name}: an instance named {name} already exists in {zone} and "
                         "is not labctl's") from None
    return s.server_found(existing)


# -- delete --------------------------------------------------------------------------------------
def delete_servers(s: Session, found: Sequence[Found], plan: Plan | None = None) -> None:
    ops = []
    for f in found:
        try:
            zone, name = names.instance_ref(f)
        except CloudError:
            refs = [(names.last(i.zone), i.name) for i in s.aggregated("find instance", s.instances, "instances",
                                                                 f'name = "{names.gce_name(f.name)}"')]
            if not refs:
                continue
            zone, name = refs[0]
        if (op := s.start(f"delete instance {name}", s.instances, "delete_unary", missing_ok=True, zone=zone,
                          instance=name)) is not None:
            ops.append((name, op))
    for name, op in ops:
        s.check_op(op, f"delete instance {name}")


@HANDLERS.handler("server")
class Servers(Handler):
    noun = "instance"
    find, create, delete = bound(find_server), bound(create_server), bound(delete_servers)

    def status(self, res: Resource, found: Found, plan: Plan) -> Found | None:
        """From one list of every labctl instance of the site per poll round, shared by all polling threads
        (a class), fetched after this thread's wait began."""
        s: Session = self.ctx
        snap = s.snapshot("instances")
        listed = snap.get(lambda: s.list_instances(None), newer_than=s.wait_started())
        inst = next((i for i in listed if f"zones/{names.last(i.zone)}/instances/{i.name}" == found.cloud_id), None)
        return s.server_found(inst) if inst is not None else None

    def progress(self, res: Resource, found: Found) -> tuple[str, str, str]:
        stage = {"pending": "building", "ready": "booted"}.get(found.status, "error")
        return res.spec["node"], stage, found.error or str(found.attrs.get("server_status", ""))
