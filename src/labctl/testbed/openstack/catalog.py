"""Static facts of the emulated Chameleon: sites, networks, images, flavors and bare-metal hosts.

Everything here is deterministic (ids are UUIDv5 of a stable key), so every process that opens the same world
agrees on them without storing them. Mutable state (leases, servers, floating IPs, ...) lives in the world.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from labctl import hardware

_NS = uuid.UUID("6c1d0d52-2f0e-4a8e-9a57-6b1f6c0b7a11")

USER_ID = "9a3f2d6c1b7e4f0a8c5d2e1f0a9b8c7d"
USER_NAME = "student"
PROJECT_ID = "5e8b1c4d7a2f4e6b9c0d3a1f2e4b6c8d"
PROJECT_NAME = "sim-project"
DOMAIN = {"id": "default", "name": "Default"}
APP_CRED_NAME = "labctl-testbed"
# The application credential's id and secret, and the user's password, are the world's own random ones
# (`labctl.testbed.access`, `World.credentials`).


@functools.lru_cache(maxsize=1 << 16)  # pure, and asked for each flavor and network of every view
def stable_id(*parts: object) -> str:
    return str(uuid.uuid5(_NS, "/".join(str(p) for p in parts)))


@dataclass(frozen=True)
class Site:
    name: str  # "chi@tacc": labctl's name
    slug: str  # "chi-tacc": the URL path prefix
    region: str  # "CHI@TACC": the Keystone region
    number: int  # floating IPs are 127.10.<number>.<n>
    kind: str  # "baremetal" | "kvm" | "edge"
    uid: str  # reference-API site uid ("tacc", "uc")
    location: str

    @property
    def services(self) -> tuple[str, ...]:
        if self.kind == "edge":
            return ("identity",)
        base = ("identity", "compute", "network", "image", "reservation")
        # Cinder only at KVM@TACC (bare metal has no block storage); Swift at every non-edge site.
        return (*base, "volume", "object-store") if self.kind == "kvm" else (*base, "object-store")


SITES: dict[str, Site] = {
    s.name: s
    for s in (
        Site("chi@tacc", "chi-tacc", "CHI@TACC", 1, "baremetal", "tacc", "Austin, Texas, USA"),
        Site("chi@uc", "chi-uc", "CHI@UC", 2, "baremetal", "uc", "Chicago, Illinois, USA"),
        Site("kvm@tacc", "kvm-tacc", "KVM@TACC", 3, "kvm", "tacc", "Austin, Texas, USA"),
        Site("chi@edge", "chi-edge", "CHI@Edge", 4, "edge", "edge", "Chicago, Illinois, USA"),
    )
}
BY_SLUG = {s.slug: s for s in SITES.values()}


def resolve_site(ref: str) -> Site:
    """A site by labctl name ("chi@tacc"), URL slug ("chi-tacc") or region ("CHI@TACC")."""
    key = ref.strip().lower()
    for s in SITES.values():
        if key in (s.name, s.slug, s.region.lower()):
            return s
    raise KeyError(f"unknown testbed site {ref!r} (known: {', '.join(SITES)})")


def openstack_env(site: str, auth_url: str, creds: Any) -> dict[str, str]:
    """OS_* variables for the world's application credential `creds` on `site`, authenticating at `auth_url`
    (what Chameleon's openrc sets). Here, not beside the HTTP server, so a client of a world served by other
    processes does not load the server."""
    return {
        "OS_AUTH_TYPE": "v3applicationcredential",
        "OS_AUTH_URL": auth_url,
        "OS_IDENTITY_API_VERSION": "3",
        "OS_REGION_NAME": resolve_site(site).region,
        "OS_INTERFACE": "public",
        "OS_APPLICATION_CREDENTIAL_ID": creds.app_cred_id,
        "OS_APPLICATION_CREDENTIAL_SECRET": creds.app_cred_secret,
    }


# ---------------------------------------------------------------- networks


def public_net_id(site: Site) -> str:
    return stable_id(site.name, "network", "public")


def shared_net_id(site: Site) -> str:
    return stable_id(site.name, "network", "sharednet1")


def public_subnet_id(site: Site, pool: int = 0) -> str:
    return stable_id(site.name, "subnet", "public" if pool == 0 else f"public-{pool + 1}")


def shared_subnet_id(site: Site) -> str:
    return stable_id(site.name, "subnet", "sharednet1")


def router_id(site: Site) -> str:
    return stable_id(site.name, "router", "sharednet1-router")


def shared_cidr(site: Site) -> str:
    return f"10.{50 + site.number}.0.0/16"


# The public network's subnets, a /24 each per site: one unless the world has more (`World.set_public_subnets`:
# a class of hundreds needs more floating IPs than a /24 holds, as on the real sites' larger public ranges).
PUBLIC_PREFIXES = ("127.10", "127.14", "127.15", "127.16", "127.17", "127.18")


def public_cidr(site: Site, pool: int = 0) -> str:
    return f"{PUBLIC_PREFIXES[pool]}.{site.number}.0/24"


def fixed_ip(site: Site, k: int) -> str:
    """The k-th fixed address on sharednet1 (k >= 0)."""
    k += 10
    return f"10.{50 + site.number}.{k // 250}.{k % 250 + 2}"


FIP_FIRST, FIP_LAST = 10, 254  # the floating IP hosts of each public subnet
FIPS_PER_SUBNET = FIP_LAST - FIP_FIRST + 1
# A floating IP's number `n` is host `n % 256` of public subnet `n // 256`.


def fip_number(subnet: int, host: int) -> int:
    return subnet * 256 + host


def fip_subnet(n: int) -> int:
    """Which public subnet floating IP number `n` is in (its index in `PUBLIC_PREFIXES`)."""
    return n // 256


def fip_numbers(subnets: int) -> list[int]:
    """Every floating IP number of the first `subnets` public subnets, in order."""
    return [fip_number(subnet, host) for subnet in range(subnets) for host in range(FIP_FIRST, FIP_LAST + 1)]


def floating_ip(site: Site, n: int) -> str:
    """The address of floating IP number `n`."""
    return f"{PUBLIC_PREFIXES[fip_subnet(n)]}.{site.number}.{n % 256}"


def floating_ip_number(site: Site, address: str) -> int | None:
    """`n` of `floating_ip(site, n) == address` for a host in the floating IP range; None for any other address."""
    for subnet, prefix in enumerate(PUBLIC_PREFIXES):
        head = f"{prefix}.{site.number}."
        if address.startswith(head) and address[len(head):].isdigit():
            host = int(address[len(head):])
            return fip_number(subnet, host) if FIP_FIRST <= host <= FIP_LAST else None
    return None


def mac_for(port_id: str) -> str:
    h = hashlib.sha1(port_id.encode()).hexdigest()
    return "fa:16:3e:" + ":".join(h[i : i + 2] for i in (0, 2, 4))


# ---------------------------------------------------------------- images

IMAGE_NAMES = (
    "CC-Ubuntu24.04",
    "CC-Ubuntu24.04-CUDA",
    "CC-Ubuntu24.04-ROCm",
    "CC-Ubuntu22.04",
    "CC-Ubuntu22.04-CUDA",
)


@dataclass(frozen=True)
class Image:
    id: str
    name: str
    release: str
    variant: str
    size: int


def images(site: Site) -> list[Image]:
    if site.kind == "edge":
        return []
    out = []
    for name in IMAGE_NAMES:
        release = "noble" if "24.04" in name else "jammy"
        variant = "gpu" if "CUDA" in name else "amdgpu" if "ROCm" in name else "base"
        size = 8_589_934_592 if variant != "base" else 3_221_225_472
        out.append(Image(stable_id(site.name, "image", name), name, release, variant, size))
    return out


# ---------------------------------------------------------------- flavors


@dataclass(frozen=True)
class FlavorSpec:
    id: str
    name: str
    vcpus: int
    ram: int
    disk: int
    extra_specs: dict
    gpus: int = 0
    slots: int = 0
    is_public: bool = True


def flavors(site: Site) -> list[FlavorSpec]:
    if site.kind == "baremetal":
        return [
            FlavorSpec(
                stable_id(site.name, "flavor", "baremetal"),
                "baremetal",
                48,
                196608,
                240,
                {
                    "resources:CUSTOM_BAREMETAL": "1",
                    "resources:VCPU": "0",
                    "resources:MEMORY_MB": "0",
                    "resources:DISK_GB": "0",
                },
            )
        ]
    if site.kind == "kvm":
        out = []
        for f in hardware.KVM_FLAVORS.get(site.name, ()):
            specs = {"trait:CUSTOM_GPU": "required"} if f.gpus else {}
            out.append(
                FlavorSpec(
                    stable_id(site.name, "flavor", f.name),
                    f.name,
                    f.vcpus,
                    f.ram_mb,
                    f.disk_gb,
                    specs,
                    f.gpus,
                    f.slots,
                )
            )
        return out
    return []


# ---------------------------------------------------------------- bare-metal hosts


@dataclass(frozen=True)
class Host:
    id: str  # Blazar host id ("1001")
    uid: str  # reference-API uid == Blazar hypervisor_hostname
    node_name: str
    node_type: str
    gpus: int
    gpu_model: str | None
    gpu_vendor: str | None

    @property
    def arch(self) -> str:
        return "aarch64" if "arm" in self.node_type else "x86_64"

    def properties(self) -> dict:
        """Blazar's flattened host properties, as used by `$name` in resource_properties."""
        return {
            "node_type": self.node_type,
            "node_name": self.node_name,
            "uid": self.uid,
            "hypervisor_hostname": self.uid,
            "gpu.gpu": self.gpus > 0,
            "gpu.gpu_count": self.gpus,
            "gpu.gpu_model": self.gpu_model or "",
            "gpu.gpu_vendor": self.gpu_vendor or "",
            "architecture.platform_type": self.arch,
            "architecture.smp_size": 2,
            "architecture.smt_size": 48,
            "main_memory.ram_size": 206158430208,
            "placement.rack": "1",
            "su_factor": 2.0 if self.gpus else 1.0,
        }


def node_types(site: Site) -> list[hardware.NodeType]:
    return list(hardware.BARE_METAL.get(site.name, ()))


def hosts(site: Site, overrides: dict[str, int] | None = None) -> list[Host]:
    """Every reservable host of a bare-metal site; `overrides` replaces the count of a node type."""
    overrides = overrides or {}
    out: list[Host] = []
    types = node_types(site)
    known = {t.name for t in types}
    for name, n in overrides.items():
        if name not in known:  # a node type that the catalog lacks: invented, CPU only
            types.append(hardware.NodeType(name, n))
    for index, t in enumerate(types, start=1):
        count = overrides.get(t.name, t.hosts)
        for i in range(1, count + 1):
            out.append(
                Host(
                    id=str(index * 1000 + i),
                    uid=stable_id(site.name, "host", t.name, i),
                    node_name=f"{t.name}-{i:03d}",
                    node_type=t.name,
                    gpus=t.gpus,
                    gpu_model=t.gpu_model,
                    gpu_vendor=t.gpu_vendor,
                )
            )
    return out
