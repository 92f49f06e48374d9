"""Instances: images, machine types, zone and type fallback, launch (requestIds) with the lease's end, adopt,
delete, extend."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from labctl import hardware
from labctl.errors import CloudError, Conflict, NoCapacity, QuotaExceeded, UserError
from labctl.providers.base import Found
from labctl.providers.gcp import session as gs
from labctl.providers.gcp.session import HANDLERS, Session, bound, log
from labctl.providers.kit import Handler, first_with_capacity

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource, ServerSpec

#: Abstract image name -> (image project, image family).
IMAGE_FAMILIES: dict[str, tuple[str, str]] = {
    "ubuntu-24.04": ("ubuntu-os-cloud", "ubuntu-2404-lts-amd64"),
    "ubuntu-22.04": ("ubuntu-os-cloud", "ubuntu-2204-lts"),
    "ubuntu-24.04-cuda": ("deeplearning-platform-release", "common-cu129-ubuntu-2404-nvidia-580"),
    "ubuntu-22.04-cuda": ("deeplearning-platform-release", "common-cu124-ubuntu-2204-py310"),
}
DLVM_PROJECT = "deeplearning-platform-release"
BOOT_DISK_GB = {"default": 20, "dlvm": 100}
#: Short accelerator names in labctl's pseudo types (`n1-standard-4+t4`).
ACCELERATORS = {"t4": "nvidia-tesla-t4", "l4": "nvidia-l4", "v100": "nvidia-tesla-v100", "p4": "nvidia-tesla-p4",
                "p100": "nvidia-tesla-p100", "a100": "nvidia-tesla-a100"}
GPU_FAMILIES = ("a2-", "a3-", "a4-", "g2-", "g4-")
NAT_NAME = "External NAT"
_NOT_OFFERED = re.compile(r"does not exist in zone|not (?:available|supported) in (?:the )?zone", re.I)
_REQUEST_NS = uuid.UUID("6f1d7c52-3f0e-5b7a-9c1e-4a2b8d0e6c31")
MAX_REPLAYS = 4


class TypeQuota(Exception):
    """A regional quota that only some types count against (GPUs, family CPUs) is used up: no point trying the
    other zones (`first_with_capacity` moves on at NoCapacity only); another type may still fit."""


def parse_type(candidate: str) -> tuple[str, str | None, int]:
    """labctl's type name -> (machine type, attached accelerator or None, accelerator count)."""
    known = hardware.GCP_TYPES.get(candidate)
    if known is not None and known.accelerator:
        return candidate.split("+", 1)[0], known.accelerator, max(known.gpus, 1)
    if "+" not in candidate:
        return candidate, None, 0
    machine, extra = candidate.split("+", 1)
    m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9-]+)", extra)
    if not m or not machine:
        raise UserError(f"bad GCP type '{candidate}': expected MACHINE+ACCELERATOR, e.g. n1-standard-4+t4")
    return machine, ACCELERATORS.get(m.group(2), m.group(2)), int(m.group(1) or 1)


def node_type(inst: Any) -> str:
    """An instance's labctl type name (the inverse of `parse_type`)."""
    machine = gs.last(inst.machine_type)
    if not inst.guest_accelerators:
        return machine
    acc = inst.guest_accelerators[0]
    short = next((k for k, v in ACCELERATORS.items() if v == gs.last(acc.accelerator_type)),
                 gs.last(acc.accelerator_type))
    return f"{machine}+{short}" if acc.accelerator_count <= 1 else f"{machine}+{acc.accelerator_count}x{short}"


def iso_utc(text: str | None) -> str | None:
    """An RFC 3339 time as ISO 8601 UTC to the second (None if unreadable)."""
    try:
        return datetime.fromisoformat((text or "").replace("Z", "+00:00")).astimezone(UTC).isoformat(
            timespec="seconds")
    except ValueError:
        return None


def end_of(inst: Any) -> str | None:
    """When Compute Engine deletes the instance: its scheduling.terminationTime (what labctl asks for), else the
    termination time Compute Engine derived from a maxRunDuration."""
    if inst.scheduling.instance_termination_action != "DELETE":
        return None
    return iso_utc(inst.scheduling.termination_time or inst.resource_status.scheduling.termination_timestamp)


def server_found(inst: Any, site_network: str) -> Found:
    """What an instance says, as labctl's server `Found` (`site_network`: the site's own network)."""
    state = {"RUNNING": "ready", "PROVISIONING": "pending", "STAGING": "pending",
             "REPAIRING": "pending"}.get(inst.status, "error")
    nics = list(inst.network_interfaces)
    fixed = (nics[0].network_i_p or None) if nics else None
    floating = next((ac.nat_i_p for ac in nics[0].access_configs if ac.nat_i_p), None) if nics else None
    # a private network's address, by network (as on Chameleon)
    private = {gs.last(n.network): n.network_i_p for n in nics if n.network_i_p and gs.last(n.network) != site_network}
    error = (f"instance is {inst.status}" + (f": {inst.status_message}" if inst.status_message else "")
             if state == "error" else None)
    zone, end = gs.last(inst.zone), end_of(inst)
    return Found("server", f"zones/{zone}/instances/{inst.name}", inst.name, status=state, error=error, attrs={
        "node": inst.labels.get(gs.NODE_LABEL), "fixed_ip": fixed, "floating_ip": floating,
        "node_type": node_type(inst), "server_status": inst.status, "zone": zone, "instance_id": str(inst.id),
        **({"private_ips": private} if private else {}), **({"end": end} if end else {})})


def instance_ref(found: Found) -> tuple[str, str]:
    """(zone, name) of a server's or disk's cloud id (or its zone attr and name)."""
    if (parsed := gs.ref(found.cloud_id)) and "zone" in parsed[0]:
        return parsed[0]["zone"], parsed[1]
    if zone := found.attrs.get("zone"):
        return zone, gs.gce_name(found.name)
    raise CloudError(f"cannot tell the zone of {found.kind} {found.name} ({found.cloud_id})")


# -- images and types ----------------------------------------------------------------------------
def image(s: Session, abstract: str) -> Any:
    """The image (newest of its family) for an abstract image name; UserError if there is none."""
    def load() -> Any:
        if abstract in IMAGE_FAMILIES:
            project, family = IMAGE_FAMILIES[abstract]
        elif m := re.match(r"^(?:projects/)?([^/]+)/(?:global/images/)?family/([^/]+)$", abstract):
            project, family = m.groups()
        else:
            raise UserError(f"{s.site.name}: no Compute Engine image for '{abstract}' (known: "
                            f"{', '.join(sorted(IMAGE_FAMILIES))}; or give 'PROJECT/family/FAMILY')")
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
        machine, accel, _ = parse_type(candidate)
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


# -- find and create -----------------------------------------------------------------------------
def find_server(s: Session, res: Resource, plan: Plan) -> Found | None:
    found = [server_found(i, s.site_network) for i in s.list_instances(plan.deployment, res.spec["node"])]
    # Prefer a healthy one if an earlier run left a broken twin; the twin is swept by `down`.
    found.sort(key=lambda f: {"ready": 0, "pending": 1}.get(f.status, 2))
    return found[0] if found else None


def create_server(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
    spec: ServerSpec = res.spec  # type: ignore[assignment]
    node = spec["node"]
    candidate = candidate or spec["candidates"][0]
    parse_type(candidate)
    zones = zones_offering(s, candidate)
    if not zones:
        raise NoCapacity(f"{s.site.name}: {candidate} is not offered in {s.site.zone or f'any zone of {s.region}'}")
    zones = _zones_of_kept_disks(s, plan, node, candidate, zones)
    img, static_ip = image(s, spec["image"]), _static_ip(s, plan, node)
    # The lab's end, which Compute Engine enforces itself: it deletes the instance then (its boot disk with it;
    # volumes are separate disks attached with autoDelete false, so kept ones survive).
    end = datetime.now(UTC) + timedelta(hours=plan.lease_hours) if plan.lease_hours > 0 else None
    with s.lock:
        attempt = s.attempts[(plan.deployment, node)] = s.attempts.get((plan.deployment, node), -1) + 1
    full: list[str] = []

    def skip(zone: str, exc: NoCapacity) -> None:
        full.append(zone)
        nxt = zones[zones.index(zone) + 1] if zone != zones[-1] else None
        log.info("%s: %s has no room for %s in %s (%s)%s", s.site.name, node, candidate, zone, exc,
                 f"; trying {nxt}" if nxt else "")

    def launch(zone: str) -> Found:
        return _insert_instance(s, res, plan, candidate, zone, attempt,
                                _instance_body(s, res, plan, deps, candidate, zone, img, static_ip, end))

    try:
        found = first_with_capacity(zones, launch, on_skip=skip)
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
    disk_zones = {gs.last(d.zone) for d in s.aggregated("list disks", s.disks, "disks", gs.label_filter(
        plan.deployment, node)) if d.status != "DELETING"}
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
    if not gs.has(plan, f"floating_ip:{node}"):
        return None
    addr = s.get("get address", s.addresses, region=s.region, address=gs.gce_name(plan.get(f"floating_ip:{node}").name))
    return addr.address if addr is not None and addr.status == "RESERVED" else None


def _instance_body(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str, zone: str,
                   img: Any, static_ip: str | None, end: datetime | None) -> Any:
    from google.cloud import compute_v1

    spec: ServerSpec = res.spec  # type: ignore[assignment]
    machine, accel, count = parse_type(candidate)
    main_key = plan.get("keypair").spec["public_key"] if gs.has(plan, "keypair") else None
    if "keypair" in deps:
        main_key = deps["keypair"].attrs.get("public_key") or main_key
    ssh_keys = "\n".join(f"{s.site.ssh_user}:{k.strip()}" for k in [main_key, *spec.get("extra_keys", [])] if k)
    dlvm = DLVM_PROJECT in (img.self_link or "")
    metadata = [compute_v1.Items(key="ssh-keys", value=ssh_keys)]
    if dlvm:
        metadata.append(compute_v1.Items(key="install-nvidia-driver", value="True"))
    size = max(int(img.disk_size_gb or 10), BOOT_DISK_GB["dlvm" if dlvm else "default"])
    access = compute_v1.AccessConfig(name=NAT_NAME, type_="ONE_TO_ONE_NAT", network_tier="PREMIUM",
                                     **({"nat_i_p": static_ip} if static_ip else {}))
    scheduling = compute_v1.Scheduling(provisioning_model="STANDARD")
    if accel or machine.startswith(GPU_FAMILIES):
        scheduling.on_host_maintenance, scheduling.automatic_restart = "TERMINATE", True
    if end is not None:  # "Limit the run time of a VM": a standard VM may have one (legacy preemptible ones not)
        scheduling.termination_time = end.strftime("%Y-%m-%dT%H:%M:%SZ")
        scheduling.instance_termination_action = "DELETE"
    body = compute_v1.Instance(
        name=gs.gce_name(res.name), description=gs.description(plan, spec["node"]),
        machine_type=f"zones/{zone}/machineTypes/{machine}", labels=gs.labels(plan, spec["node"]),
        metadata=compute_v1.Metadata(items=metadata), scheduling=scheduling,
        disks=[compute_v1.AttachedDisk(
            boot=True, auto_delete=True, initialize_params=compute_v1.AttachedDiskInitializeParams(
                source_image=img.self_link, disk_size_gb=size, disk_type=f"zones/{zone}/diskTypes/pd-balanced"))],
        network_interfaces=[_nic(s, spec, deps, zone, access)],
    )
    if "secgroup" in deps:
        body.tags = compute_v1.Tags(items=[deps["secgroup"].attrs.get("tag") or gs.gce_name(plan.deployment)])
    if accel:
        body.guest_accelerators = [compute_v1.AcceleratorConfig(
            accelerator_type=f"zones/{zone}/acceleratorTypes/{accel}", accelerator_count=count)]
    return body


def _nic(s: Session, spec: ServerSpec, deps: Mapping[str, Found], zone: str, access: Any) -> Any:
    """The instance's one interface: on the deployment's network and subnetwork at the node's fixed IP if it is on
    a private network, else on the site's network; with an external address either way."""
    from google.cloud import compute_v1

    nets = spec.get("networks") or []
    if not nets:
        return compute_v1.NetworkInterface(network=f"global/networks/{s.site_network}", access_configs=[access])
    if len(nets) > 1:
        raise UserError(f"{s.site.name}: a Compute Engine node is on one private network here, but "
                        f"{spec['node']} asks for {len(nets)}")
    sub = deps[nets[0]["subnet"]]
    region = sub.attrs.get("region") or s.region
    if zone.rsplit("-", 1)[0] != region:
        raise CloudError(f"{s.site.name}: zone {zone} is not in {region}, the region of subnetwork "
                         f"{gs.last(sub.cloud_id)}")
    network = deps[nets[0]["network"]]
    return compute_v1.NetworkInterface(
        network=f"global/networks/{network.attrs.get('network') or gs.last(network.cloud_id)}",
        subnetwork=f"regions/{region}/subnetworks/{gs.last(sub.cloud_id)}", access_configs=[access],
        **({"network_i_p": nets[0]["fixed_ip"]} if nets[0].get("fixed_ip") else {}))


def _type_quota(s: Session, metric: str | None, candidate: str, err: Exception) -> None:
    """A quota that only some types count against (GPUs, family CPUs): TypeQuota (another type may fit)."""
    if metric and (metric.endswith("_GPUS") or (metric.endswith("_CPUS") and metric != "CPUS")):
        raise TypeQuota(f"{s.site.name}: quota {metric} in {s.region} is used up ({candidate}); {err}") from None


def _insert_instance(s: Session, res: Resource, plan: Plan, candidate: str, zone: str, attempt: int,
                     body: Any) -> Found:
    from google.cloud import compute_v1

    node, name = res.spec["node"], gs.gce_name(res.name)
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
            _type_quota(s, (gs.QUOTA_TEXT.findall(str(exc)) or [None])[0], candidate, exc)
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
                s.attempts[(plan.deployment, node)] = max(s.attempts.get((plan.deployment, node), 0), attempt)
            continue
        if isinstance(err, Conflict):  # a concurrent run's insert of this name won
            return _adopt_instance(s, plan, zone, name)
        if isinstance(err, QuotaExceeded):
            _type_quota(s, gs.quota_metric(op), candidate, err)
        if err is not None:
            raise err
        log.info("%s: %s is %s in %s", s.site.name, node, candidate, zone)
        end = iso_utc(body.scheduling.termination_time)
        return Found("server", f"zones/{zone}/instances/{name}", name, status="pending", attrs={
            "node": node, "zone": zone, "node_type": candidate, "server_status": "PROVISIONING",
            "instance_id": str(op.target_id), "fixed_ip": None, "floating_ip": None, **({"end": end} if end else {})})
    raise CloudError(f"{s.site.name}: {what}: every requestId replayed an earlier operation")


def _adopt_instance(s: Session, plan: Plan, zone: str, name: str) -> Found:
    """The instance that holds the name (made by a lost answer's insert or a concurrent run), if labctl's."""
    existing = s.get_instance(zone, name)
    if existing is None or not gs.mine(plan)(existing):
        raise CloudError(f"{s.site.name}: an instance named {name} already exists in {zone} and "
                         "is not labctl's") from None
    return server_found(existing, s.site_network)


# -- extend ---------------------------------------------------------------------------
def extend(s: Session, found: Found, hours: float) -> Found:
    """Move the instance's end (scheduling.terminationTime) by `hours` with instances.setScheduling, which
    Compute Engine accepts only on a stopped (TERMINATED) instance: on a running one its refusal becomes a
    UserError that says what to do instead."""
    zone, name = instance_ref(found)
    inst = s.get_instance(zone, name)
    if inst is None:
        raise UserError(f"{s.site.name}: instance {name} is gone (deleted at its end, or by hand): nothing to "
                        "extend; 'labctl up' makes it again")
    current = end_of(inst)
    start = max(datetime.fromisoformat(current), datetime.now(UTC)) if current else datetime.now(UTC)
    scheduling = type(inst.scheduling)(inst.scheduling)
    scheduling.termination_time = (start + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")
    scheduling.instance_termination_action = "DELETE"
    try:
        s.run(f"move the end of {name}", s.instances, "set_scheduling_unary", zone=zone, instance=name,
              scheduling_resource=scheduling)
    except CloudError as exc:
        raise UserError(
            f"{s.site.name}: Compute Engine refused to move the end of {name} ({current or 'none set'}): it changes "
            f"an instance's scheduling only while the instance is stopped, and labctl does not stop a running lab "
            f"node ({exc}). To keep working past the end: copy off what you need (volumes with keep: true "
            "survive), then 'labctl down' and 'labctl up' again for a new end") from None
    return server_found(s.get_instance(zone, name) or inst, s.site_network)


@HANDLERS.handler("server")
class Servers(Handler):
    noun = "instance"
    find, create = bound(find_server), bound(create_server)
    delete = bound(lambda s, found, plan: gs.delete_kind(s, "server", found))

    def status(self, res: Resource, found: Found, plan: Plan) -> Found | None:
        """From one list of every labctl instance of the site per poll round, shared by all polling threads
        (a class), fetched after this thread's wait began."""
        s: Session = self.ctx
        listed = s.snapshot("instances").get(lambda: s.list_instances(None), newer_than=s.wait_started())
        inst = next((i for i in listed if f"zones/{gs.last(i.zone)}/instances/{i.name}" == found.cloud_id), None)
        return server_found(inst, s.site_network) if inst is not None else None

    def progress(self, res: Resource, found: Found) -> tuple[str, str, str]:
        stage = {"pending": "building", "ready": "booted"}.get(found.status, "error")
        return res.spec["node"], stage, found.error or str(found.attrs.get("server_status", ""))
