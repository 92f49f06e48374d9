"""What each Chameleon site offers: bare-metal node types (with host and GPU counts) and KVM flavors.

Facts from Chameleon's reference repository (node types per site, June 2026) and the KVM@TACC flavor list
used by the course labs. Profiles are validated against this catalog, and the emulated testbed serves it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeType:
    name: str
    hosts: int
    gpus: int = 0
    gpu_model: str | None = None
    gpu_vendor: str | None = None


@dataclass(frozen=True)
class Flavor:
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    gpus: int = 0
    gpu_model: str | None = None
    slots: int = 50  # how many instances of this flavor the emulated site can reserve at once


_A100_40 = "GA100 [A100 PCIe 40GB]"
_A100_80 = "GA100 [A100 PCIe 80GB]"

# Sites whose node types are mixed (same name, different GPU counts) are summed per node type; the GPU
# count is the most common one.
BARE_METAL: dict[str, tuple[NodeType, ...]] = {
    "chi@tacc": (
        NodeType("compute_arm64", 8),
        NodeType("compute_cascadelake", 24),
        NodeType("compute_cascadelake_r", 56),
        NodeType("compute_gigaio", 6, 1, _A100_40, "NVIDIA"),
        NodeType("compute_haswell_ib", 17),
        NodeType("compute_icelake_r650", 52),
        NodeType("compute_icelake_r750", 20),
        NodeType("compute_liqid", 8, 1, _A100_40, "NVIDIA"),
        NodeType("compute_skylake", 32),
        NodeType("compute_zen3", 32),
        NodeType("gpu_h100", 2, 4, "GH100 [H100 SXM5 94GB]", "NVIDIA"),
        NodeType("gpu_k80", 2, 2, "GK210GL [Tesla K80]", "NVIDIA"),
        NodeType("gpu_m40", 2, 1, "GM200GL [Tesla M40]", "NVIDIA"),
        NodeType("gpu_mi100", 8, 2, "Arcturus GL-XL [Instinct MI100]", "AMD"),
        NodeType("gpu_p100", 15, 2, "GP100GL [Tesla P100 PCIe 16GB]", "NVIDIA"),
        NodeType("gpu_p100_nvlink", 4, 4, "GP100GL [Tesla P100 SXM2 16GB]", "NVIDIA"),
        NodeType("gpu_p100_v100", 1, 2, "GV100GL [Tesla V100 PCIe 16GB]", "NVIDIA"),
        NodeType("gpu_pontevecchio", 2, 4, "Data Center GPU Max 1550", "Intel"),
        NodeType("storage", 20),
        NodeType("storage_hierarchy", 2),
    ),
    "chi@uc": (
        NodeType("compute_cascadelake_r", 42),
        NodeType("compute_gigaio", 8, 1, _A100_80, "NVIDIA"),
        NodeType("compute_nvdimm", 2),
        NodeType("compute_skylake", 23),
        NodeType("fpga", 1),
        NodeType("gpu_a100_nvlink", 1, 4, "GA100 [A100 SXM4 80GB]", "NVIDIA"),
        NodeType("gpu_a100_pcie", 4, 4, _A100_80, "NVIDIA"),
        NodeType("gpu_rtx_6000", 37, 1, "TU102GL [Quadro RTX 6000/8000]", "NVIDIA"),
        NodeType("gpu_v100", 4, 4, "GV100GL [Tesla V100 32GB]", "NVIDIA"),
        NodeType("storage_nvme", 10),
    ),
}

KVM_FLAVORS: dict[str, tuple[Flavor, ...]] = {
    "kvm@tacc": (
        Flavor("m1.tiny", 1, 512, 1),
        Flavor("m1.small", 1, 2048, 20),
        Flavor("m1.medium", 2, 4096, 40),
        Flavor("m1.large", 4, 8192, 40),
        Flavor("m1.xlarge", 8, 16384, 40),
        Flavor("g1.h100.pci.1", 24, 229376, 200, 1, "H100 PCIe", slots=4),
        Flavor("g1.h100.pci.4", 96, 917504, 800, 4, "H100 PCIe", slots=1),
    ),
}

# Chameleon's CHI@Edge site leases devices (containers on Raspberry Pis), not servers.
EDGE_DEVICES: dict[str, tuple[str, ...]] = {"chi@edge": ("raspberrypi4-64", "raspberrypi5", "jetson-nano")}


def node_types(site: str) -> dict[str, NodeType]:
    return {t.name: t for t in BARE_METAL.get(site, ())}


def flavors(site: str) -> dict[str, Flavor]:
    return {f.name: f for f in KVM_FLAVORS.get(site, ())}


def gpu_count(site: str, type_name: str) -> int:
    if t := node_types(site).get(type_name):
        return t.gpus
    if f := flavors(site).get(type_name):
        return f.gpus
    return 0


# -- commercial clouds ------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceType:
    name: str
    vcpus: int
    memory_gib: float
    gpus: int = 0
    gpu_model: str | None = None
    accelerator: str | None = None  # GCP: the acceleratorType attached (N1 machines), if not built in


# EC2 instance types labctl maps lab needs to (GPU data as in EC2 DescribeInstanceTypes / moto's catalog).
AWS_TYPES: dict[str, InstanceType] = {t.name: t for t in (
    InstanceType("t3.micro", 2, 1),
    InstanceType("t3.small", 2, 2),
    InstanceType("t3.medium", 2, 4),
    InstanceType("t3.large", 2, 8),
    InstanceType("m5.large", 2, 8),
    InstanceType("m5.xlarge", 4, 16),
    InstanceType("m5.2xlarge", 8, 32),
    InstanceType("g4dn.xlarge", 4, 16, 1, "NVIDIA T4"),
    InstanceType("g5.xlarge", 4, 16, 1, "NVIDIA A10G"),
    InstanceType("g5.2xlarge", 8, 32, 1, "NVIDIA A10G"),
    InstanceType("g6.xlarge", 4, 16, 1, "NVIDIA L4"),
    InstanceType("p3.2xlarge", 8, 61, 1, "NVIDIA V100"),
    InstanceType("p4d.24xlarge", 96, 1152, 8, "NVIDIA A100"),
    InstanceType("p5.48xlarge", 192, 2048, 8, "NVIDIA H100"),
)}

# Compute Engine machine types (a2/g2/a3 carry their GPUs; n1 takes an attached accelerator).
GCP_TYPES: dict[str, InstanceType] = {t.name: t for t in (
    InstanceType("e2-small", 2, 2),
    InstanceType("e2-medium", 2, 4),
    InstanceType("e2-standard-2", 2, 8),
    InstanceType("e2-standard-4", 4, 16),
    InstanceType("n1-standard-4", 4, 15),
    InstanceType("n1-standard-4+t4", 4, 15, 1, "NVIDIA T4", "nvidia-tesla-t4"),
    InstanceType("g2-standard-4", 4, 16, 1, "NVIDIA L4"),
    InstanceType("a2-highgpu-1g", 12, 85, 1, "NVIDIA A100 40GB"),
    InstanceType("a2-ultragpu-1g", 12, 170, 1, "NVIDIA A100 80GB"),
    InstanceType("a3-highgpu-8g", 208, 1872, 8, "NVIDIA H100 80GB"),
)}

# What a profile gets on a commercial cloud when it names no types there: by GPU model, best first. A profile
# that accepts other GPU models (`gpu.alternatives`) gets their types after these.
DEFAULT_TYPES: dict[str, dict[str, tuple[str, ...]]] = {
    "aws": {"cpu": ("t3.medium", "m5.large"), "A100": ("p4d.24xlarge",), "H100": ("p5.48xlarge",),
            "A10G": ("g5.xlarge",), "L4": ("g6.xlarge",), "T4": ("g4dn.xlarge",),
            "V100": ("p3.2xlarge",), "gpu": ("g5.xlarge", "g4dn.xlarge")},
    "gcp": {"cpu": ("e2-medium", "e2-standard-2"), "A100": ("a2-highgpu-1g", "a2-ultragpu-1g"),
            "H100": ("a3-highgpu-8g",), "L4": ("g2-standard-4",), "T4": ("n1-standard-4+t4",),
            "gpu": ("g2-standard-4", "n1-standard-4+t4")},
}


def instance_types(provider: str) -> dict[str, InstanceType]:
    return {"aws": AWS_TYPES, "gcp": GCP_TYPES}.get(provider, {})


def default_types(provider: str, gpu_models: str | list[str] | None) -> tuple[str, ...]:
    """Instance types for a node's needs on AWS/GCP: the GPU models in order, or CPU-only types."""
    table = DEFAULT_TYPES.get(provider, {})
    if gpu_models is None:
        return table.get("cpu", ())
    models = [gpu_models] if isinstance(gpu_models, str) else gpu_models
    found: list[str] = []
    for model in models:
        for key, types in table.items():
            if key not in ("cpu", "gpu") and key.lower() in model.lower():
                found += [t for t in types if t not in found]
    return tuple(found) or table.get("gpu", ())
