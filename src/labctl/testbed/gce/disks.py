"""Compute Engine zonal persistent disks, and instances.attachDisk / detachDisk."""

from __future__ import annotations

import re

from labctl.testbed.gce import catalog
from labctl.testbed.gce import world as w
from labctl.testbed.gce.common import (
    USER,
    ApiError,
    Call,
    aggregated_page,
    check_labels,
    check_name,
    check_project,
    get_stored,
    idempotent,
    in_use,
    invalid,
    not_found,
    parse_ref,
    scaled,
    scheduled_delete,
    stored_handlers,
    zone_param,
    zone_scope,
)
from labctl.testbed.gce.instances import get_instance
from labctl.testbed.gce.world import Db

# ------------------------------------------------------------------------------------ disks
DISK_TYPES = ("pd-standard", "pd-balanced", "pd-ssd", "pd-extreme", "hyperdisk-balanced")


MIN_DISK_GB = 10  # persistent disks (pd-*) are at least 10 GB


def _disk(db: Db, call: Call, zone: str) -> dict:
    return get_stored(db, call, "disk", f"zones/{zone}", "disks")


def disks_insert(call: Call) -> dict:
    check_project(call)
    zone = zone_param(call)
    body = call.json()
    name = check_name(body.get("name"))
    labels = check_labels(body.get("labels"))
    if body.get("sourceImage") or body.get("sourceSnapshot") or body.get("sourceDisk"):
        raise invalid("resource.sourceImage", body.get("sourceImage") or body.get("sourceSnapshot"),
                      "The emulator makes blank disks only.")
    disk_type = parse_ref(body.get("type") or f"zones/{zone}/diskTypes/pd-standard", "resource.type",
                          ("diskTypes",), call.project, zone=zone, bare=True)
    type_link = disk_type.rel
    if disk_type.project != call.project or disk_type.where != zone or disk_type.name not in DISK_TYPES:
        raise not_found(type_link)
    try:
        size = int(body.get("sizeGb") or 500)
    except (TypeError, ValueError):
        raise invalid("resource.sizeGb", body.get("sizeGb"), "Must be an integer.") from None
    if size < MIN_DISK_GB and disk_type.name.startswith("pd-"):
        raise invalid("resource.sizeGb", size, f"Disk size cannot be smaller than {MIN_DISK_GB} GB.")
    if size > 65536:
        raise invalid("resource.sizeGb", size, "Disk size cannot be larger than 65536 GB.")

    def perform(db: Db) -> dict:
        scope = f"zones/{zone}"
        link = f"projects/{call.project}/{scope}/disks/{name}"
        if db.get("disk", call.project, scope, name) is not None:
            raise ApiError(409, f"The resource '{link}' already exists", "alreadyExists")
        disk_id = w.new_id()
        db.put("disk", {
            "kind": "compute#disk", "id": disk_id, "creationTimestamp": w.rfc3339(db.now), "name": name,
            "description": str(body.get("description", "")), "sizeGb": str(size),
            "zone": f"projects/{call.project}/{scope}", "selfLink": link, "type": type_link, "labels": labels,
            "labelFingerprint": w.fingerprint(), "physicalBlockSizeBytes": "4096", "users": [],
            "_project": call.project, "_scope": scope, "_ready_at": db.now + scaled(call, w.DISK_READY_AT),
        })
        return w.new_operation(db, call.project, scope, "insert", link, disk_id,
                               scaled(call, w.INSERT_OP["disks"]), user=USER)

    return idempotent(call, perform)


disks_get, disks_list = stored_handlers("disk", "disks", zone_scope, w.render_disk)


def disks_aggregated(call: Call) -> dict:
    check_project(call)
    per: dict[str, list[dict]] = {f"zones/{z}": [] for z in catalog.ZONES}
    with call.world.read() as db:
        for disk in db.find("disk", call.project):
            per[disk["_scope"]].append(w.render_disk(disk, db.now))
    return aggregated_page(call, "compute#diskAggregatedList", "disks", per,
                       f"projects/{call.project}/aggregated/disks")


def disks_delete(call: Call) -> dict:
    check_project(call)
    zone = zone_param(call)

    def perform(db: Db) -> dict:
        disk = _disk(db, call, zone)
        if disk.get("users"):
            raise in_use("disk", disk["selfLink"], disk["users"][0])
        return scheduled_delete(db, call, "disk", disk, "disks")

    return idempotent(call, perform)


def instances_attach_disk(call: Call) -> dict:
    check_project(call)
    zone = zone_param(call)
    body = call.json()
    if not body.get("source"):
        raise invalid("resource.source", "", "The source disk must be specified.")
    mode = body.get("mode") or "READ_WRITE"
    if mode not in ("READ_WRITE", "READ_ONLY"):
        raise invalid("resource.mode", mode, "Must be READ_WRITE or READ_ONLY.")
    device = body.get("deviceName")
    if device is not None and not re.fullmatch(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?", str(device)):
        raise invalid("resource.deviceName", device, "Must be a match of regex '[a-z]([-a-z0-9]*[a-z0-9])?'")

    def perform(db: Db) -> dict:
        inst = get_instance(db, call, zone, call.params["name"])
        ref = parse_ref(body["source"], "resource.source", ("disks",), call.project, zone=zone, bare=True)
        src = ref.rel
        if ref.where != zone:
            raise invalid("resource.source", body["source"], "Disk must be in the same zone as the instance.")
        disk = db.get("disk", call.project, f"zones/{zone}", ref.name) if ref.project == call.project else None
        if disk is None:
            raise not_found(src)
        if inst.get("_gone_at") is not None:
            raise ApiError(400, f"The resource '{inst['selfLink']}' is not ready", "resourceNotReady")
        if w.disk_status(disk, db.now) != "READY":
            raise ApiError(400, f"The resource '{src}' is not ready", "resourceNotReady")
        if disk.get("users"):
            raise in_use("disk", src, disk["users"][0])
        attached = inst.setdefault("disks", [])
        index = max((d.get("index", 0) for d in attached), default=-1) + 1
        name = device or f"persistent-disk-{index}"
        if any(d.get("deviceName") == name for d in attached):
            raise invalid("resource.deviceName", name, "A disk with this device name is already attached.")
        attached.append({
            "kind": "compute#attachedDisk", "type": "PERSISTENT", "mode": mode, "source": src, "deviceName": name,
            "index": index, "boot": False, "autoDelete": bool(body.get("autoDelete", False)), "interface": "SCSI",
            "diskSizeGb": disk["sizeGb"],
        })
        db.put("instance", inst)
        disk["users"] = [*disk.get("users", []), inst["selfLink"]]
        disk["lastAttachTimestamp"] = w.rfc3339(db.now)
        db.put("disk", disk)
        return w.new_operation(db, call.project, inst["_scope"], "attachDisk", inst["selfLink"], inst["id"],
                               scaled(call, w.DISK_OP), user=USER)

    return idempotent(call, perform)


def instances_detach_disk(call: Call) -> dict:
    check_project(call)
    zone = zone_param(call)
    device = call.q("deviceName")
    if not device:
        raise ApiError(400, "Required parameter 'deviceName' not specified", "required")

    def perform(db: Db) -> dict:
        inst = get_instance(db, call, zone, call.params["name"])
        found = next((d for d in inst.get("disks", []) if d.get("deviceName") == device), None)
        if found is None:
            raise invalid("deviceName", device, f"No attached disk found with device name '{device}'.")
        if found.get("boot"):
            raise invalid("deviceName", device, "The boot disk cannot be detached.")
        inst["disks"] = [d for d in inst["disks"] if d is not found]
        db.put("instance", inst)
        m = re.match(r"^projects/[^/]+/(zones/[^/]+)/disks/([^/]+)$", found["source"])
        disk = db.get("disk", call.project, m.group(1), m.group(2)) if m else None
        if disk is not None:
            disk["users"] = [u for u in disk.get("users", []) if u != inst["selfLink"]]
            disk["lastDetachTimestamp"] = w.rfc3339(db.now)
            db.put("disk", disk)
        return w.new_operation(db, call.project, inst["_scope"], "detachDisk", inst["selfLink"], inst["id"],
                               scaled(call, w.DISK_OP), user=USER)

    return idempotent(call, perform)
