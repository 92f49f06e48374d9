"""What the emulated Compute Engine offers: regions and zones, machine types, accelerators, images, quotas.

Zone availability of GPU accelerators follows Google's "GPU regions and zones" table (approximately, for the
regions listed); machine types come from `labctl.hardware.GCP_TYPES` plus a few common ones. Every number
here is a default: tests change capacities and quotas through `GceWorld.set_capacity` / `set_quota`.
"""

from __future__ import annotations

from dataclasses import dataclass

from labctl import hardware

PROJECT = "sim-project"
PROJECT_NUMBER = "482915367104"
UBUNTU_PROJECT = "ubuntu-os-cloud"
DLVM_PROJECT = "deeplearning-platform-release"
IMAGE_PROJECTS = (UBUNTU_PROJECT, DLVM_PROJECT)

REGIONS: dict[str, tuple[str, ...]] = {
    "us-central1": ("a", "b", "c", "f"),
    "us-east1": ("b", "c", "d"),
    "us-east4": ("a", "b", "c"),
    "us-west1": ("a", "b", "c"),
    "us-west4": ("a", "b", "c"),
    "europe-west4": ("a", "b", "c"),
    "asia-east1": ("a", "b", "c"),
}
ZONES: dict[str, str] = {f"{r}-{z}": r for r, zs in REGIONS.items() for z in zs}
REGION_IDS = {r: str(1000 + 10 * i) for i, r in enumerate(REGIONS)}
ZONE_IDS = {z: str(2000 + i) for i, z in enumerate(ZONES)}


@dataclass(frozen=True)
class Accelerator:
    name: str
    description: str
    max_cards: int
    quota_metric: str
    zones: tuple[str, ...]
    id: str


def _zones(spec: str) -> tuple[str, ...]:
    """'us-central1:abcf us-east4:abc' -> ('us-central1-a', ...)."""
    out = []
    for part in spec.split():
        region, letters = part.split(":")
        out += [f"{region}-{c}" for c in letters]
    return tuple(out)


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("nvidia-tesla-t4", "NVIDIA T4", 4, "NVIDIA_T4_GPUS",
                _zones("us-central1:abcf us-east1:cd us-east4:abc us-west1:ab us-west4:ab europe-west4:abc "
                       "asia-east1:ac"), "10018"),
    Accelerator("nvidia-l4", "NVIDIA L4", 8, "NVIDIA_L4_GPUS",
                _zones("us-central1:abc us-east1:bcd us-east4:ac us-west1:abc us-west4:ac europe-west4:abc "
                       "asia-east1:abc"), "10042"),
    Accelerator("nvidia-tesla-v100", "NVIDIA V100", 8, "NVIDIA_V100_GPUS",
                _zones("us-central1:abcf us-west1:ab europe-west4:abc asia-east1:c"), "10014"),
    Accelerator("nvidia-tesla-a100", "NVIDIA A100 40GB", 16, "NVIDIA_A100_GPUS",
                _zones("us-central1:abcf us-east1:b us-west1:b europe-west4:ab asia-east1:c"), "10026"),
    Accelerator("nvidia-a100-80gb", "NVIDIA A100 80GB", 8, "NVIDIA_A100_80GB_GPUS",
                _zones("us-central1:ac us-east4:c europe-west4:a"), "10034"),
    Accelerator("nvidia-h100-80gb", "NVIDIA H100 80GB", 8, "NVIDIA_H100_GPUS",
                _zones("us-central1:abc us-east4:abc us-west1:a europe-west4:bc"), "10051"),
)}

_SHORT_ACCELERATOR = {"NVIDIA L4": "nvidia-l4", "NVIDIA A100 40GB": "nvidia-tesla-a100",
                      "NVIDIA A100 80GB": "nvidia-a100-80gb", "NVIDIA H100 80GB": "nvidia-h100-80gb",
                      "NVIDIA T4": "nvidia-tesla-t4"}


@dataclass(frozen=True)
class MachineType:
    name: str
    cpus: int
    memory_mb: int
    accelerator: str | None = None  # built-in GPUs (a2, g2, a3)
    gpus: int = 0
    shared_cpu: bool = False

    @property
    def family(self) -> str:
        return self.name.split("-")[0]


def _machine_types() -> dict[str, MachineType]:
    types: dict[str, MachineType] = {}
    for t in hardware.GCP_TYPES.values():
        if "+" in t.name:  # labctl's pseudo type: a machine plus an attached accelerator
            continue
        built_in = t.gpus and not t.accelerator and not t.name.startswith("n1-")
        types[t.name] = MachineType(
            t.name, t.vcpus, int(t.memory_gib * 1024),
            _SHORT_ACCELERATOR.get(t.gpu_model or "") if built_in else None,
            t.gpus if built_in else 0,
            shared_cpu=t.name in ("e2-micro", "e2-small", "e2-medium"),
        )
    for extra in (
        MachineType("e2-micro", 2, 1024, shared_cpu=True),
        MachineType("n1-standard-1", 1, 3840),
        MachineType("n1-standard-2", 2, 7680),
        MachineType("n1-standard-8", 8, 30720),
        MachineType("n2-standard-2", 2, 8192),
        MachineType("n2-standard-4", 4, 16384),
        MachineType("g2-standard-8", 8, 32768, "nvidia-l4", 1),
        MachineType("a2-highgpu-2g", 24, 174080, "nvidia-tesla-a100", 2),
    ):
        types.setdefault(extra.name, extra)
    return types


MACHINE_TYPES: dict[str, MachineType] = _machine_types()
MACHINE_TYPE_IDS = {name: str(801000 + i) for i, name in enumerate(sorted(MACHINE_TYPES))}


def machine_type_zones(mt: MachineType) -> tuple[str, ...]:
    """Zones that offer a machine type: GPU families only where their GPU is, the rest everywhere."""
    if mt.accelerator:
        return ACCELERATORS[mt.accelerator].zones
    return tuple(ZONES)


def machine_type_in_zone(name: str, zone: str) -> MachineType | None:
    mt = MACHINE_TYPES.get(name)
    return mt if mt is not None and zone in machine_type_zones(mt) else None


def accelerator_in_zone(name: str, zone: str) -> Accelerator | None:
    acc = ACCELERATORS.get(name)
    return acc if acc is not None and zone in acc.zones else None


def is_gpu_type(name: str) -> bool:
    mt = MACHINE_TYPES.get(name)
    return name in ACCELERATORS or bool(mt and mt.accelerator)


# -- images ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    project: str
    name: str
    family: str
    description: str
    disk_size_gb: int
    created: str
    id: str
    deprecated: bool = False
    architecture: str = "X86_64"


IMAGES: tuple[Image, ...] = (
    Image(UBUNTU_PROJECT, "ubuntu-2404-noble-amd64-v20250828", "ubuntu-2404-lts-amd64",
          "Canonical, Ubuntu, 24.04 LTS, amd64 noble image built on 2025-08-28", 10,
          "2025-08-28T10:12:44.183-07:00", "4413918329735582511", deprecated=True),
    Image(UBUNTU_PROJECT, "ubuntu-2404-noble-amd64-v20251014", "ubuntu-2404-lts-amd64",
          "Canonical, Ubuntu, 24.04 LTS, amd64 noble image built on 2025-10-14", 10,
          "2025-10-14T09:31:07.552-07:00", "7019472536271835842"),
    Image(UBUNTU_PROJECT, "ubuntu-2404-noble-arm64-v20251014", "ubuntu-2404-lts-arm64",
          "Canonical, Ubuntu, 24.04 LTS, arm64 noble image built on 2025-10-14", 10,
          "2025-10-14T09:33:51.020-07:00", "1955017763412309127", architecture="ARM64"),
    Image(UBUNTU_PROJECT, "ubuntu-2204-jammy-v20251014", "ubuntu-2204-lts",
          "Canonical, Ubuntu, 22.04 LTS, amd64 jammy image built on 2025-10-14", 10,
          "2025-10-14T09:29:15.774-07:00", "2893310546157401224"),
    Image(DLVM_PROJECT, "common-cu129-ubuntu-2404-nvidia-580-v20251009", "common-cu129-ubuntu-2404-nvidia-580",
          "Google, Deep Learning VM with CUDA 12.9, M132, Ubuntu 24.04, NVIDIA driver 580", 50,
          "2025-10-09T16:02:31.441-07:00", "6320775193815623041"),
    Image(DLVM_PROJECT, "common-cu124-ubuntu-2204-py310-v20250925", "common-cu124-ubuntu-2204-py310",
          "Google, Deep Learning VM with CUDA 12.4, M131, Ubuntu 22.04, Python 3.10", 50,
          "2025-09-25T12:44:10.307-07:00", "3108829556604419217"),
    Image(DLVM_PROJECT, "pytorch-2-7-cu128-ubuntu-2204-nvidia-570-v20251009",
          "pytorch-2-7-cu128-ubuntu-2204-nvidia-570",
          "Google, Deep Learning VM for PyTorch 2.7 with CUDA 12.8, M132, Ubuntu 22.04", 50,
          "2025-10-09T16:20:55.918-07:00", "8841736301935120557"),
)


def images(project: str) -> list[Image]:
    return [i for i in IMAGES if i.project == project]


def image(project: str, name: str) -> Image | None:
    return next((i for i in IMAGES if i.project == project and i.name == name), None)


def image_from_family(project: str, family: str) -> Image | None:
    live = [i for i in IMAGES if i.project == project and i.family == family and not i.deprecated]
    return max(live, key=lambda i: i.created) if live else None


# -- quotas (per region) and capacity (per zone) -----------------------------------------------------
DEFAULT_QUOTAS: dict[str, float] = {
    "CPUS": 2400,
    "INSTANCES": 1000,
    "IN_USE_ADDRESSES": 500,
    "STATIC_ADDRESSES": 200,
    **{a.quota_metric: 64 for a in ACCELERATORS.values()},
}
DEFAULT_GPU_CAPACITY = 8  # per zone: instances of each GPU machine type, cards of each accelerator type
DEFAULT_CPU_CAPACITY = 1000  # per zone: instances of each CPU-only machine type
