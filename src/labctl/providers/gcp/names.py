"""Names, labels, links and the `Found`s of Compute Engine objects: pure functions, no SDK."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from labctl import hardware, naming
from labctl.errors import CloudError, UserError
from labctl.providers.base import Found

if TYPE_CHECKING:
    from labctl.plan import Plan

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
KEEP_LABEL = "labctl-keep"  # a disk's label: "true" when `down` keeps it (Chameleon's `labctl:keep` metadata)
VOLUME_LABEL = "labctl-volume"  # a disk's label: the profile's name for the volume
DISK_TYPE = "pd-balanced"
MIN_DISK_GB = 10  # persistent disks cannot be smaller
DEVICE_PREFIX = "/dev/disk/by-id/google-"


def parse_type(candidate: str) -> tuple[str, str | None, int]:
    """labctl's type name -> (machine type, attached accelerator or None, accelerator count)."""
    known = hardware.GCP_TYPES.get(candidate)
    if known is not None and known.accelerator:
        return candidate.split("+", 1)[0], known.accelerator, max(known.gpus, 1)
    if "+" in candidate:
        machine, extra = candidate.split("+", 1)
        m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9-]+)", extra)
        if not m or not machine:
            raise UserError(f"bad GCP type '{candidate}': expected MACHINE+ACCELERATOR, e.g. n1-standard-4+t4")
        return machine, ACCELERATORS.get(m.group(2), m.group(2)), int(m.group(1) or 1)
    return candidate, None, 0


def node_type(inst: Any) -> str:
    """An instance's labctl type name (the inverse of `parse_type`)."""
    machine = last(inst.machine_type)
    if inst.guest_accelerators:
        acc = inst.guest_accelerators[0]
        accel = last(acc.accelerator_type)
        short = next((k for k, v in ACCELERATORS.items() if v == accel), accel)
        count = acc.accelerator_count
        return f"{machine}+{short}" if count <= 1 else f"{machine}+{count}x{short}"
    return machine


def gce_name(name: str) -> str:
    """A Compute Engine resource name ([a-z]([-a-z0-9]*[a-z0-9])?, at most 63 characters)."""
    clean = naming.sanitise(name, 63)
    return clean if clean[0].isalpha() else f"l{clean}"[:63].rstrip("-")


def tag(deployment: str) -> str:
    return gce_name(deployment)


def label_key(tag_name: str) -> str:
    return tag_name.replace(":", "-")


def label_value(value: str) -> str:
    return naming.sanitise(str(value), 63)


DEPLOYMENT_LABEL = label_key(naming.TAG_DEPLOYMENT)
NODE_LABEL = label_key(naming.TAG_NODE)


def labels(plan: Plan, node: str | None = None) -> dict[str, str]:
    tags = {naming.TAG_DEPLOYMENT: plan.deployment, **plan.tags}
    if node is not None:
        tags[naming.TAG_NODE] = node
    return {label_key(k): label_value(v) for k, v in tags.items()}


def label_filter(deployment: str | None, node: str | None = None) -> str:
    """A list filter on labctl's labels: this deployment (any labctl deployment if None), and node."""
    terms = [f'labels.{DEPLOYMENT_LABEL} = "{label_value(deployment)}"' if deployment is not None
             else f"labels.{DEPLOYMENT_LABEL}:*"]
    if node is not None:
        terms.append(f'labels.{NODE_LABEL} = "{label_value(node)}"')
    return " AND ".join(f"({t})" for t in terms) if len(terms) > 1 else terms[0]


def owned_by(obj: Any, deployment: str) -> bool:
    """Whether a labelled object (instance, disk, address) carries this deployment's label."""
    return obj.labels.get(DEPLOYMENT_LABEL) == label_value(deployment)


def description(deployment: str, node: str | None = None) -> str:
    text = f"{naming.TAG_DEPLOYMENT}={deployment}"
    return f"{text} {naming.TAG_NODE}={node}" if node else text


def deployment_of(text: str | None) -> str | None:
    m = re.search(rf"{re.escape(naming.TAG_DEPLOYMENT)}=(\S+)", text or "")
    return m.group(1) if m else None


def last(link: str | None) -> str:
    return (link or "").rstrip("/").rsplit("/", 1)[-1]


def rel(link: str) -> str:
    """A link without its host and API prefix: "projects/p/zones/z/instances/i"."""
    return link.split("/compute/v1/", 1)[1] if "/compute/v1/" in link else link


def instance_of(link: str) -> tuple[str, str] | None:
    """(zone, instance) of an instance link, or None."""
    m = re.search(r"zones/([^/]+)/instances/([^/]+)$", link or "")
    return (m.group(1), m.group(2)) if m else None


def _zonal_ref(found: Found, what: str) -> tuple[str, str]:
    m = re.search(rf"zones/([^/]+)/{what}s/([^/]+)$", found.cloud_id or "")
    if m:
        return m.group(1), m.group(2)
    zone = found.attrs.get("zone")
    if zone:
        return zone, gce_name(found.name)
    raise CloudError(f"cannot tell the zone of {what} {found.name} ({found.cloud_id})")


def instance_ref(found: Found) -> tuple[str, str]:
    return _zonal_ref(found, "instance")


def disk_ref(found: Found) -> tuple[str, str]:
    return _zonal_ref(found, "disk")


def disk_id(link: str | None) -> str:
    """An attached disk's source link -> "zones/Z/disks/N"."""
    m = re.search(r"zones/([^/]+)/disks/([^/]+)$", link or "")
    return f"zones/{m.group(1)}/disks/{m.group(2)}" if m else ""


def attachment_ref(found: Found) -> tuple[str, str, str]:
    """(zone, instance, device name) of a volume attachment."""
    m = re.search(r"zones/([^/]+)/instances/([^/]+)/devices/([^/]+)$", found.cloud_id or "")
    if not m:
        raise CloudError(f"cannot tell the instance of volume attachment {found.name} ({found.cloud_id})")
    return m.group(1), m.group(2), m.group(3)


def device_of(inst: Any, disk: str) -> str | None:
    """The device name under which the instance has the disk (zones/Z/disks/N), if attached."""
    return next((d.device_name for d in inst.disks if not d.boot and disk_id(d.source) == disk), None)


def has(plan: Plan, key: str) -> bool:
    try:
        plan.get(key)
    except KeyError:
        return False
    return True


def firewall_matches(fw: Any, spec: Mapping[str, Any]) -> bool:
    have = {(a.I_p_protocol, p) for a in fw.allowed for p in a.ports}
    want = {(proto, p) for proto, ports in spec["allowed"].items() for p in ports}
    protocols = {a.I_p_protocol for a in fw.allowed}
    return (want <= have and set(spec["allowed"]) <= protocols and set(spec["ranges"]) == set(fw.source_ranges)
            and last(fw.network) == spec.get("network", last(fw.network)))


def network_found(net: Any, name: str) -> Found:
    return Found("network", f"global/networks/{net.name}", name,
                 attrs={"network": net.name, "auto_subnetworks": net.auto_create_subnetworks})


def network_name(found: Found) -> str:
    return found.attrs.get("network") or last(found.cloud_id)


def subnet_found(sub: Any, name: str) -> Found:
    region = last(sub.region)
    return Found("subnet", f"regions/{region}/subnetworks/{sub.name}", name, attrs={
        "network": last(sub.network), "region": region, "cidr": sub.ip_cidr_range, "gateway_ip": sub.gateway_address})


def volume_found(disk: Any) -> Found:
    status = {"READY": "ready", "CREATING": "pending", "RESTORING": "pending", "FAILED": "error"}.get(disk.status,
                                                                                                      "pending")
    zone = last(disk.zone)
    vol = disk.labels.get(VOLUME_LABEL)
    return Found("volume", f"zones/{zone}/disks/{disk.name}", disk.name, status=status,
                 error=f"disk is {disk.status}" if status == "error" else None,
                 attrs={"zone": zone, "size_gb": int(disk.size_gb), "keep": disk.labels.get(KEEP_LABEL) == "true",
                        "disk_status": disk.status, "users": [rel(u) for u in disk.users],
                        **({"key": f"volume:{vol}"} if vol else {})})


def attachment_found(name: str, zone: str, instance: str, disk: str, device: str) -> Found:
    return Found("volume_attachment", f"zones/{zone}/instances/{instance}/devices/{device}", name, attrs={
        "volume_id": disk, "server_id": f"zones/{zone}/instances/{instance}", "zone": zone, "device": device,
        "device_paths": [f"{DEVICE_PREFIX}{device}"]})


def server_found(inst: Any, site_network: str) -> Found:
    """What an instance says, as labctl's server `Found` (`site_network`: the site's own network)."""
    status = inst.status
    state = {"RUNNING": "ready", "PROVISIONING": "pending", "STAGING": "pending",
             "REPAIRING": "pending"}.get(status, "error")
    fixed = floating = None
    private: dict[str, str] = {}
    if inst.network_interfaces:
        nic = inst.network_interfaces[0]
        fixed = nic.network_i_p or None
        floating = next((ac.nat_i_p for ac in nic.access_configs if ac.nat_i_p), None)
    for nic in inst.network_interfaces:  # a private network's address, by network (as on Chameleon)
        if nic.network_i_p and last(nic.network) != site_network:
            private[last(nic.network)] = nic.network_i_p
    error = None
    if state == "error":
        error = f"instance is {status}" + (f": {inst.status_message}" if inst.status_message else "")
    zone = last(inst.zone)
    return Found("server", f"zones/{zone}/instances/{inst.name}", inst.name, status=state, error=error,
                 attrs={"node": inst.labels.get(NODE_LABEL), "fixed_ip": fixed,
                        "floating_ip": floating, "node_type": node_type(inst), "server_status": status,
                        "zone": zone, "instance_id": str(inst.id),
                        **({"private_ips": private} if private else {})})
