"""Persistent disks (volume) and their attachments (volume_attachment)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from labctl.errors import CloudError
from labctl.providers.base import Found
from labctl.providers.gcp import names
from labctl.providers.gcp.instances import find_server
from labctl.providers.gcp.session import HANDLERS, Session, bound, log
from labctl.providers.kit import Handler

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource


def get_disk(s: Session, zone: str, name: str) -> Any:
    return s.get(f"get disk {name}", s.disks, zone=zone, disk=name)


def find_volume(s: Session, res: Resource, plan: Plan) -> Found | None:
    mine = [d for d in s.list_disks(f'name = "{names.gce_name(res.name)}"')
            if names.owned_by(d, plan.deployment) and d.status != "DELETING"]
    mine.sort(key=lambda d: {"READY": 0, "CREATING": 1}.get(d.status, 2))  # a healthy one first
    return names.volume_found(mine[0]) if mine else None


def find_volume_attachment(s: Session, res: Resource, plan: Plan) -> Found | None:
    if "volume" not in res.spec or "server" not in res.spec:
        return None  # a teardown lookup: attachments are found through list_owned
    vol = find_volume(s, plan.get(res.spec["volume"]), plan)
    server = find_server(s, plan.get(res.spec["server"]), plan)
    if vol is None or server is None:
        return None
    zone, iname = names.instance_ref(server)
    if not any(u.endswith(f"zones/{zone}/instances/{iname}") for u in vol.attrs.get("users", [])):
        return None
    inst = s.get_instance(zone, iname)
    device = names.device_of(inst, vol.cloud_id) if inst is not None else None
    return names.attachment_found(res.name, zone, iname, vol.cloud_id, device) if device else None


def create_volume(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    from google.cloud import compute_v1

    spec = res.spec
    server = deps[spec["server"]]
    zone = server.attrs.get("zone") or names.instance_ref(server)[0]
    name = names.gce_name(res.name)
    existing = find_volume(s, res, plan)
    if existing is not None and existing.status != "error":
        if existing.attrs["zone"] != zone:
            raise CloudError(f"{s.site.name}: volume {name} is in {existing.attrs['zone']}, but {spec['node']} runs "
                             f"in {zone} (a disk cannot move zones): run 'labctl down' and 'labctl up' again to "
                             "launch the node in the disk's zone")
        return existing
    size = max(int(spec["size_gb"]), names.MIN_DISK_GB)
    if size != int(spec["size_gb"]):
        log.info("%s: volume %s is %d GB (Compute Engine's smallest persistent disk), not %s", s.site.name,
                 spec["volume"], size, spec["size_gb"])
    body = compute_v1.Disk(name=name, size_gb=size, type_=f"zones/{zone}/diskTypes/{names.DISK_TYPE}",
                           labels={**names.labels(plan, spec["node"]),
                                   names.KEEP_LABEL: "true" if spec.get("keep") else "false",
                                   names.VOLUME_LABEL: names.label_value(spec["volume"])},
                           description=names.description(plan.deployment, spec["node"]))
    disk = s.insert(f"create volume {name}", s.disks, "disk", body, lambda d: names.owned_by(d, plan.deployment),
                    zone=zone)
    return names.volume_found(disk)  # pending until READY: `wait` polls it


def create_volume_attachment(s: Session, res: Resource, plan: Plan, deps: Mapping[str, Found],
                             _c: str | None) -> Found:
    from google.cloud import compute_v1

    vol = deps[res.spec["volume"]]
    zone, iname = names.instance_ref(deps[res.spec["server"]])
    disk_zone, disk_name = names.disk_ref(vol)
    disk = s.get(f"get disk {disk_name}", s.disks, missing_ok=False, zone=disk_zone, disk=disk_name)
    inst = s.get(f"get instance {iname}", s.instances, missing_ok=False, zone=zone, instance=iname)
    device = names.device_of(inst, vol.cloud_id)
    if device:  # attached already (a rerun)
        return names.attachment_found(res.name, zone, iname, vol.cloud_id, device)
    for user in disk.users:  # still on a server of an earlier `up` that is going away: detach it there
        ref = names.instance_of(user)
        if ref and ref != (zone, iname):
            log.info("%s: detaching volume %s from %s first", s.site.name, disk_name, ref[1])
            detach_disk(s, *ref, vol.cloud_id)
    body = compute_v1.AttachedDisk(source=f"zones/{disk_zone}/disks/{disk_name}", device_name=disk_name,
                                   mode="READ_WRITE", auto_delete=False, boot=False, type_="PERSISTENT")
    s.run(f"attach volume {disk_name} to {iname}", s.instances, "attach_disk_unary", zone=zone, instance=iname,
          attached_disk_resource=body)
    return names.attachment_found(res.name, zone, iname, vol.cloud_id, disk_name)


def detach_disk(s: Session, zone: str, iname: str, disk: str) -> None:
    """Detach the disk (zones/Z/disks/N) from the instance and wait; nothing to do if either is gone."""
    inst = s.get_instance(zone, iname)
    device = names.device_of(inst, disk) if inst is not None else None
    if device is not None:
        detach_device(s, zone, iname, device, inst)


def detach_device(s: Session, zone: str, iname: str, device: str, inst: Any = None) -> None:
    """Detach the instance's disk with this device name and wait; nothing to do if it is not there."""
    inst = inst if inst is not None else s.get_instance(zone, iname)
    if inst is None or not any(d.device_name == device and not d.boot for d in inst.disks):
        return
    s.run(f"detach volume {device} from {iname}", s.instances, "detach_disk_unary", missing_ok=True, zone=zone,
          instance=iname, device_name=device)


def delete_attachments(s: Session, found: Sequence[Found], plan: Plan) -> None:
    for f in found:
        detach_device(s, *names.attachment_ref(f))


def delete_volumes(s: Session, found: Sequence[Found], plan: Plan) -> None:
    refs = []
    for f in found:
        try:
            refs.append(names.disk_ref(f))
        except CloudError:
            refs += [(names.last(d.zone), d.name) for d in s.list_disks(f'name = "{names.gce_name(f.name)}"')]
    ops = []
    for zone, name in refs:
        disk = get_disk(s, zone, name)
        if disk is None:
            continue
        for user in disk.users:  # a disk in use cannot be deleted: detach it first
            if ref := names.instance_of(user):
                detach_disk(s, *ref, f"zones/{zone}/disks/{name}")
        op = s.start(f"delete disk {name}", s.disks, "delete_unary", missing_ok=True, zone=zone, disk=name)
        if op is not None:
            ops.append((zone, name, op))
    start = time.monotonic()
    for zone, name, op in ops:
        s.check_op(op, f"delete disk {name}")
        s.wait_gone(f"delete disk {name}", s.disks, s.op_timeout - (time.monotonic() - start), zone=zone, disk=name)


def owned_disks(s: Session, deployment: str) -> list[Found]:
    return [names.volume_found(d) for d in s.list_disks(names.label_filter(deployment)) if d.status != "DELETING"]


@HANDLERS.handler("volume")
class Volumes(Handler):
    noun = "disk"
    find, create, delete = bound(find_volume), bound(create_volume), bound(delete_volumes)

    def status(self, res: Resource, found: Found, plan: Plan) -> Found | None:
        disk = get_disk(self.ctx, *names.disk_ref(found))  # CREATING until READY (a few per deployment: one get each)
        return names.volume_found(disk) if disk is not None else None

    def progress(self, res: Resource, found: Found) -> tuple[str, str, str]:
        return res.key, str(found.attrs.get("disk_status", "gone")).lower(), ""


HANDLERS.register("volume_attachment", find=find_volume_attachment, create=create_volume_attachment,
                  delete=delete_attachments)
