"""Compute Engine's read-only catalogue and operations: zones, regions, machine and accelerator types, images,
zone/region/global operations (get, list, wait)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from labctl.testbed.gce import catalog
from labctl.testbed.gce import world as w
from labctl.testbed.gce.common import (
    EPOCH,
    Call,
    aggregated_page,
    check_project,
    links,
    list_page,
    not_found,
    parse_ref,
    region_param,
    zone_param,
)
from labctl.testbed.gce.world import Db

T = TypeVar("T")


# ------------------------------------------------------------------------------------ zones, regions
def _zone_obj(project: str, zone: str) -> dict:
    return {"kind": "compute#zone", "id": catalog.ZONE_IDS[zone], "creationTimestamp": EPOCH, "name": zone,
            "description": zone, "status": "UP", "region": f"projects/{project}/regions/{catalog.ZONES[zone]}",
            "selfLink": f"projects/{project}/zones/{zone}",
            "availableCpuPlatforms": ["Intel Sapphire Rapids", "Intel Cascade Lake", "Intel Skylake",
                                      "Intel Broadwell", "AMD Milan", "AMD Rome"],
            "supportsPzs": True}


def zones_list(call: Call) -> dict:
    check_project(call)
    items = [_zone_obj(call.project, z) for z in catalog.ZONES]
    return list_page(call, "compute#zoneList", items, f"projects/{call.project}/zones")


def _named(call: Call, param: str, known: Mapping[str, object], collection: str) -> str:
    """The zone or region the call names (`{param}`), 404 as Compute Engine says it when there is none."""
    check_project(call)
    name = call.params[param]
    if name not in known:
        raise not_found(f"projects/{call.project}/{collection}/{name}")
    return name


def zones_get(call: Call) -> dict:
    zone = _named(call, "zone", catalog.ZONES, "zones")
    return links(_zone_obj(call.project, zone), call.base)


def _region_obj(call: Call, region: str, db: Db) -> dict:
    usage = call.world.quota_usage(region, db)
    quotas = [{"metric": m, "limit": call.world.quota(region, m, db), "usage": usage.get(m, 0.0)}
              for m in sorted(catalog.DEFAULT_QUOTAS)]
    return {"kind": "compute#region", "id": catalog.REGION_IDS[region], "creationTimestamp": EPOCH,
            "name": region, "description": region, "status": "UP",
            "zones": [f"projects/{call.project}/zones/{region}-{z}" for z in catalog.REGIONS[region]],
            "quotas": quotas, "selfLink": f"projects/{call.project}/regions/{region}", "supportsPzs": False}


def regions_get(call: Call) -> dict:
    region = _named(call, "region", catalog.REGIONS, "regions")
    with call.world.read() as db:
        return links(_region_obj(call, region, db), call.base)


def regions_list(call: Call) -> dict:
    check_project(call)
    with call.world.read() as db:
        items = [_region_obj(call, r, db) for r in catalog.REGIONS]
    return list_page(call, "compute#regionList", items, f"projects/{call.project}/regions")


# ------------------------------------------------------------------------------------ catalog resources
def _machine_type_obj(project: str, zone: str, mt: catalog.MachineType) -> dict:
    gb = mt.memory_mb / 1024
    memory = f"{gb:g} GB" if gb >= 1 else f"{mt.memory_mb} MB"
    obj: dict[str, Any] = {
        "kind": "compute#machineType", "id": catalog.MACHINE_TYPE_IDS[mt.name], "creationTimestamp": EPOCH,
        "name": mt.name, "description": f"{mt.cpus} vCPU{'s' if mt.cpus > 1 else ''}, {memory} RAM",
        "guestCpus": mt.cpus, "memoryMb": mt.memory_mb, "imageSpaceGb": 0,
        "maximumPersistentDisks": 128, "maximumPersistentDisksSizeGb": "263168",
        "zone": zone, "selfLink": f"projects/{project}/zones/{zone}/machineTypes/{mt.name}",
        "isSharedCpu": mt.shared_cpu, "architecture": "X86_64",
    }
    if mt.accelerator:
        obj["accelerators"] = [{"guestAcceleratorType": mt.accelerator, "guestAcceleratorCount": mt.gpus}]
    return obj


def _machine_types_in(zone: str) -> list[catalog.MachineType]:
    return [mt for mt in catalog.MACHINE_TYPES.values() if zone in catalog.machine_type_zones(mt)]


def _accelerator_obj(project: str, zone: str, acc: catalog.Accelerator) -> dict:
    return {"kind": "compute#acceleratorType", "id": acc.id, "creationTimestamp": EPOCH, "name": acc.name,
            "description": acc.description, "zone": f"projects/{project}/zones/{zone}",
            "selfLink": f"projects/{project}/zones/{zone}/acceleratorTypes/{acc.name}",
            "maximumCardsPerInstance": acc.max_cards}


def _accelerators_in(zone: str) -> list[catalog.Accelerator]:
    return [a for a in catalog.ACCELERATORS.values() if zone in a.zones]


@dataclass(frozen=True)
class _ZonalCatalog(Generic[T]):
    """A read-only zonal collection of the catalogue: its list, get and aggregatedList pages, all rendered from
    the same items by one function, as Compute Engine shows machine types and accelerator types."""

    collection: str  # "machineTypes": the URL's collection and the aggregated list's key
    kind: str  # "compute#machineType"; the list pages' kinds add "List" and "AggregatedList"
    items_in: Callable[[str], list[T]]  # zone -> what it offers
    find: Callable[[str, str], T | None]  # (name, zone) -> the item if the zone offers it
    render: Callable[[str, str, T], dict]  # (project, zone, item) -> the resource

    def list(self, call: Call) -> dict:
        check_project(call)
        zone = zone_param(call)
        items = [self.render(call.project, zone, x) for x in self.items_in(zone)]
        return list_page(call, f"{self.kind}List", items, f"projects/{call.project}/zones/{zone}/{self.collection}")

    def get(self, call: Call) -> dict:
        check_project(call)
        zone = zone_param(call)
        found = self.find(call.params["name"], zone)
        if found is None:
            raise not_found(f"projects/{call.project}/zones/{zone}/{self.collection}/{call.params['name']}")
        return links(self.render(call.project, zone, found), call.base)

    def aggregated(self, call: Call) -> dict:
        check_project(call)
        per = {f"zones/{z}": [self.render(call.project, z, x) for x in self.items_in(z)] for z in catalog.ZONES}
        return aggregated_page(call, f"{self.kind}AggregatedList", self.collection, per,
                               f"projects/{call.project}/aggregated/{self.collection}")


_MACHINE_TYPES = _ZonalCatalog("machineTypes", "compute#machineType", _machine_types_in,
                               catalog.machine_type_in_zone, _machine_type_obj)
_ACCELERATOR_TYPES = _ZonalCatalog("acceleratorTypes", "compute#acceleratorType", _accelerators_in,
                                   catalog.accelerator_in_zone, _accelerator_obj)
machine_types_list = _MACHINE_TYPES.list
machine_types_get = _MACHINE_TYPES.get
machine_types_aggregated = _MACHINE_TYPES.aggregated
accelerator_types_list = _ACCELERATOR_TYPES.list
accelerator_types_get = _ACCELERATOR_TYPES.get
accelerator_types_aggregated = _ACCELERATOR_TYPES.aggregated


def _image_obj(img: catalog.Image) -> dict:
    obj: dict[str, Any] = {
        "kind": "compute#image", "id": img.id, "creationTimestamp": img.created, "name": img.name,
        "description": img.description, "sourceType": "RAW", "rawDisk": {"source": "", "containerType": "TAR"},
        "status": "READY", "archiveSizeBytes": str(img.disk_size_gb * 97_000_000),
        "diskSizeGb": str(img.disk_size_gb), "family": img.family,
        "selfLink": f"projects/{img.project}/global/images/{img.name}",
        "labelFingerprint": "42WmSpB8rSM=", "architecture": img.architecture,
        "guestOsFeatures": [{"type": t} for t in ("VIRTIO_SCSI_MULTIQUEUE", "SEV_CAPABLE", "UEFI_COMPATIBLE",
                                                   "GVNIC", "IDPF")],
        "storageLocations": ["us", "eu", "asia"],
        "licenses": [f"projects/{img.project}/global/licenses/{img.family}"],
    }
    if img.deprecated:
        obj["deprecated"] = {"state": "DEPRECATED",
                             "replacement": f"projects/{img.project}/global/images/"
                                            f"{catalog.image_from_family(img.project, img.family).name}"}
    return obj


def images_list(call: Call) -> dict:
    check_project(call, read_only_image=True)
    items = [_image_obj(i) for i in catalog.images(call.project)]
    return list_page(call, "compute#imageList", items, f"projects/{call.project}/global/images")


def _image_page(call: Call, img: catalog.Image | None, rel: str) -> dict:
    """The image as the API shows it, or 404 naming what was asked for (`rel`)."""
    if img is None:
        raise not_found(f"projects/{call.project}/{rel}")
    return links(_image_obj(img), call.base)


def images_get(call: Call) -> dict:
    check_project(call, read_only_image=True)
    name = call.params["name"]
    return _image_page(call, catalog.image(call.project, name), f"global/images/{name}")


def images_family(call: Call) -> dict:
    check_project(call, read_only_image=True)
    family = call.params["family"]
    return _image_page(call, catalog.image_from_family(call.project, family), f"global/images/family/{family}")


def image_family_views_get(call: Call) -> dict:
    """imageFamilyViews.get: the newest non-deprecated image of a family, as seen from a zone ("-": any)."""
    check_project(call, read_only_image=True)
    zone = call.params["zone"]
    if zone != "-":
        zone_param(call)
    family = call.params["family"]
    img = catalog.image_from_family(call.project, family)
    return {"kind": "compute#imageFamilyView",
            "image": _image_page(call, img, f"zones/{zone}/imageFamilyViews/{family}")}


def resolve_image(call: Call, source: object,
                  field_name: str = "resource.disks[0].initializeParams.sourceImage") -> catalog.Image:
    """The image a sourceImage names: by name, by family (global/images/family/F) or by zonal family view
    (zones/Z/imageFamilyViews/F, Z may be "-"); 400 for a malformed reference, 404 for a missing image."""
    ref = parse_ref(source, field_name, ("images", "imageFamilyViews"), call.project)
    zone = ref.where
    if ref.project not in (call.world.project, *catalog.IMAGE_PROJECTS):
        raise not_found(ref.rel)
    if ref.collection == "imageFamilyViews" and zone != "-" and zone not in catalog.ZONES:
        raise not_found(f"projects/{ref.project}/zones/{zone}")
    img = catalog.image_from_family(ref.project, ref.name) if ref.family else catalog.image(ref.project, ref.name)
    if img is None:
        raise not_found(ref.rel)
    return img


# ------------------------------------------------------------------------------------ the project
# Project-wide quotas (the regional ones are on each region): metric -> limit.
PROJECT_QUOTAS = {"SNAPSHOTS": 5000.0, "NETWORKS": 15.0, "FIREWALLS": 200.0, "IMAGES": 2000.0,
                  "STATIC_ADDRESSES": 175.0, "ROUTES": 250.0, "FORWARDING_RULES": 75.0, "TARGET_POOLS": 50.0,
                  "HEALTH_CHECKS": 75.0, "IN_USE_ADDRESSES": 575.0, "TARGET_INSTANCES": 50.0,
                  "TARGET_HTTP_PROXIES": 10.0, "URL_MAPS": 10.0, "BACKEND_SERVICES": 50.0,
                  "INSTANCE_TEMPLATES": 1000.0, "TARGET_VPN_GATEWAYS": 15.0, "VPN_TUNNELS": 30.0,
                  "SUBNETWORKS": 275.0, "SSL_CERTIFICATES": 30.0, "CPUS_ALL_REGIONS": 32.0,
                  "GPUS_ALL_REGIONS": 16.0, "GLOBAL_INTERNAL_ADDRESSES": 5000.0}


def projects_get(call: Call) -> dict:
    """projects.get: the project resource, its usage of the project-wide quotas counted from the world."""
    check_project(call)
    project = call.project
    with call.world.read() as db:
        instances = db.find("instance", project)
        usage = {
            "NETWORKS": 1.0 + len(db.find("network", project, "global")),  # with the built-in default
            "FIREWALLS": float(len(db.find("firewall", project, "global"))),
            "SUBNETWORKS": float(len(db.find("subnetwork", project))),
            "STATIC_ADDRESSES": float(len(db.find("address", project))),
            "IN_USE_ADDRESSES": float(sum(1 for i in instances if w.nat_ips(i))),
            "CPUS_ALL_REGIONS": sum(w.instance_quota(i)["CPUS"] for i in instances),
            "GPUS_ALL_REGIONS": float(sum(n for i in instances for m, n in w.instance_quota(i).items()
                                          if m.endswith("_GPUS"))),
        }
    quotas = [{"metric": m, "limit": limit, "usage": usage.get(m, 0.0)} for m, limit in PROJECT_QUOTAS.items()]
    return links({
        "kind": "compute#project", "id": catalog.PROJECT_NUMBER, "creationTimestamp": EPOCH, "name": project,
        "commonInstanceMetadata": {"kind": "compute#metadata", "fingerprint": "p6hNFq6Y7l4=", "items": []},
        "quotas": quotas, "selfLink": f"projects/{project}",
        "defaultServiceAccount": f"{catalog.PROJECT_NUMBER}-compute@developer.gserviceaccount.com",
        "xpnProjectStatus": "UNSPECIFIED_XPN_PROJECT_STATUS", "defaultNetworkTier": "PREMIUM",
        "vmDnsSetting": "ZONAL_ONLY",
    }, call.base)


# ------------------------------------------------------------------------------------ operations
def _op_scope(call: Call) -> str:
    if "zone" in call.params:
        return f"zones/{zone_param(call)}"
    if "region" in call.params:
        return f"regions/{region_param(call)}"
    return "global"


def _operation(call: Call) -> tuple[dict, float]:
    """The operation the call names (done ones too) and the world's time it was read at, or 404."""
    check_project(call)
    scope = _op_scope(call)
    with call.world.read() as db:
        op = db.get("operation", call.project, scope, call.params["operation"], include_gone=True)
        now = db.now
    if op is None:
        raise not_found(f"projects/{call.project}/{scope}/operations/{call.params['operation']}")
    return op, now


def operations_get(call: Call) -> dict:
    op, now = _operation(call)
    return links(w.render_operation(op, now), call.base)


def operations_wait(call: Call) -> dict:
    """Like get, but returns only when the operation is DONE (or after at most two minutes)."""
    op, _ = _operation(call)
    left = min(op["_done_at"] - time.time(), w.WAIT_CAP)
    if left > 0:
        call.stop_event.wait(left)
    return links(w.render_operation(op, time.time()), call.base)


def operations_list(call: Call) -> dict:
    check_project(call)
    scope = _op_scope(call)
    with call.world.read() as db:
        items = [w.render_operation(o, db.now) for o in db.find("operation", call.project, scope)]
    return list_page(call, "compute#operationList", items, f"projects/{call.project}/{scope}/operations")
