"""Whether a lab profile can run at a site: node types, images, lease length, networks and storage there.

Apart from the profile model (labctl.profile) so that the model needs nothing of labctl.sites, which itself reads
its YAML through labctl.profile: the dependency runs one way, site_fit -> sites -> profile.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from labctl import hardware
from labctl.profile import NodeGroup, Profile, display_path, first_of, profile_error, suggest

if TYPE_CHECKING:
    from labctl.sites import Site


def _catalog(site: Site) -> str:
    return getattr(site, "catalog", None) or site.stands_for or site.name


def _gpu_matches(wanted: str, have: str | None) -> bool:
    def norm(s: str) -> str:
        return re.sub(r"[^a-z0-9]", "", s.lower())

    return bool(have) and norm(wanted) in norm(have or "")


def validate_for_site(profile: Profile, site: Site) -> list[str]:
    """Problems with running `profile` at `site`, each one line naming the field ([] if none)."""
    real = site.stands_for or site.name
    if site.family == "edge" or site.reservation == "device":
        return [f"sites: not supported at this site: {real} leases devices (containers), not servers"]
    problems: list[str] = []
    declared = {real, site.catalog or real, f"{site.family}:{site.zone or site.region}", site.family}
    if not declared & set(profile.sites):
        what = f"{site.name} (stands for {real})" if site.emulated else site.name
        problems.append(f"sites: {what} is not one of this profile's sites ({', '.join(profile.sites)})")
    if profile.lease_hours > site.max_lease_hours:
        problems.append(
            f"lease_hours: {profile.lease_hours:g} h is longer than {real} allows "
            f"({site.max_lease_hours:g} h)"
        )
    problems += _network_site_problems(profile, site, real)
    problems += _storage_site_problems(profile, site, real)
    catalog = _catalog(site)
    bare_metal = hardware.node_types(catalog)
    flavors = hardware.flavors(catalog)
    images_reported: set[str] = set()
    for role, group in profile.nodes.items():
        key = next((k for k in (real, site.catalog) if k and k in group.types), site.family)
        wanted = profile.types_for(role, key, site.family)
        if not wanted and site.family in ("aws", "gcp"):
            wanted = list(hardware.default_types(site.family, group.gpu.models() if group.gpu else None))
        if not wanted:
            problems.append(
                f"nodes.{role}.types: no node types for {real} (add a '{real}' or '{site.family}' key)"
            )
        for i, name in enumerate(wanted):
            field = f"nodes.{role}.types.{key}[{i}]"
            problem = _check_type(role, group, name, real, site.family, bare_metal, flavors)
            if problem:
                problems.append(f"{field}: {problem}")
        image = profile.image_for(role)
        field = f"nodes.{role}.image" if group.image else "image"
        known_image = image in site.images or image in site.images.values()
        if site.images and not known_image and field not in images_reported:
            images_reported.add(field)
            problems.append(
                f"{field}: unknown image '{image}' at {real} (known: {', '.join(site.images)})"
                + suggest(image, site.images)
            )
    return problems


def _network_site_problems(profile: Profile, site: Site, real: str) -> list[str]:
    """AWS and GCP give a deployment one private network: a VPC of its own with one subnet on AWS, a network
    with one subnetwork on GCP (an instance's network interfaces cannot span VPCs on AWS)."""
    if not profile.networks or site.provider == "chameleon":
        return []
    if len(profile.networks) > 1:
        return [f"networks: {real} gives a deployment one private network, but this profile declares "
                f"{len(profile.networks)} ({', '.join(profile.networks)})"]
    name, net = next(iter(profile.networks.items()))
    cidr = ipaddress.ip_network(net.cidr)
    if site.family == "aws" and not 16 <= cidr.prefixlen <= 28:
        return [f"networks.{name}.cidr: an AWS subnet is /16 to /28, not /{cidr.prefixlen}"]
    # The addresses the cloud keeps for itself in every subnet: AWS the first four and the last, GCP the
    # first two and the last two.
    first, last = {"aws": (4, 1), "gcp": (2, 2)}.get(site.family, (0, 0))
    for (node, _), address in sorted(profile.fixed_ips().items()):
        if address is None:
            continue
        offset = int(ipaddress.ip_address(address)) - int(cidr.network_address)
        if offset < first or offset > cidr.num_addresses - 1 - last:
            return [f"networks.{name}: {node} would get {address}, which {site.family.upper()} keeps for itself in "
                    f"{cidr} (its first {first} and last {last} addresses); start first_ip at {first} or more"]
    return []


def _storage_site_problems(profile: Profile, site: Site, real: str) -> list[str]:
    problems: list[str] = []
    if profile.volumes and not getattr(site, "block_storage", False):
        name = next(iter(profile.volumes))  # one line is enough: every volume has the same problem
        problems.append(f"volumes.{name}: {real} has no block storage (volumes need a KVM site such as kvm@tacc, "
                        "or AWS / GCP)")
    if profile.object_stores and not getattr(site, "object_storage", None):
        name = next(iter(profile.object_stores))
        if site.family == "gcp":
            problems.append(f"object_stores.{name}: labctl does not create Cloud Storage buckets ({real}); object "
                            "stores are Swift containers on chi@tacc, chi@uc, kvm@tacc and S3 buckets on AWS")
        else:
            problems.append(f"object_stores.{name}: {real} has no object store (use chi@tacc, chi@uc, kvm@tacc "
                            "or an AWS site)")
    return problems


def _check_type(
    role: str,
    group: NodeGroup,
    name: str,
    site_name: str,
    family: str,
    bare_metal: Mapping[str, hardware.NodeType],
    flavors: Mapping[str, hardware.Flavor],
) -> str | None:
    if family in ("aws", "gcp"):
        catalog: Mapping[str, Any] = hardware.instance_types(family)
        noun = "instance type" if family == "aws" else "machine type"
    elif family == "kvm":
        catalog = flavors
        noun = "flavor"
    else:
        catalog = bare_metal
        noun = "node type"
    if not catalog:
        return None  # a user site without a hardware catalog: nothing to check against
    item = catalog.get(name)
    if item is None:
        if group.gpu:
            known = [n for n, t in catalog.items() if t.gpus]
            label = "known GPU flavors" if family == "kvm" else "known GPU types"
        else:
            known = list(catalog)
            label = f"known {noun}s"
        return f"unknown {noun} '{name}' at {site_name} ({label}: {', '.join(known)})" + suggest(
            name, catalog
        )
    if group.gpu:
        want = group.gpu
        if not item.gpus:
            return f"{name} has no GPU, but nodes.{role}.gpu asks for {want.count}x {want.model}"
        if item.gpus < want.count:
            return f"{name} has {item.gpus} GPU(s), but nodes.{role}.gpu asks for {want.count}"
        if not any(_gpu_matches(model, item.gpu_model) for model in want.models()):
            also = f" (or {', '.join(want.alternatives)})" if want.alternatives else ""
            return f"{name} has {item.gpu_model} GPUs, but nodes.{role}.gpu asks for {want.model}{also}"
    return None


def require_valid_for_site(profile: Profile, site: Site) -> None:
    """`validate_for_site` as a `ProfileError` (every problem on one line) naming the profile file."""
    problems = validate_for_site(profile, site)
    if problems:
        shown = display_path(profile.path) if profile.path else f"profile {profile.name}"
        raise profile_error(shown, first_of(problems))
