"""Lab profiles: the pydantic model of `profiles/<lab>.yaml`, the loader and the per-site checks.

The format is described in docs/architecture.md. Every problem is reported as one `ProfileError` line that
names the file and the field (`profiles/gpu.yaml: nodes.gpu.count: Input should be ...`), so that a student
can fix it without reading a traceback. `labctl.site_fit.validate_for_site` adds what can only be checked once
the site is known (node types, flavors, images).

Importing this module is cheap (pydantic and PyYAML only).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from labctl import inputs
from labctl.errors import ProfileError
from labctl.redact import strip_control

__all__ = [
    "Gpu",
    "Network",
    "NodeGroup",
    "NodeNetwork",
    "ObjectStore",
    "Output",
    "Port",
    "Profile",
    "ProfileError",
    "Step",
    "Upload",
    "Volume",
    "find_profile",
    "json_schema",
    "load_profile",
]

ROLE_PATTERN = r"^[a-z][a-z0-9-]{0,15}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: Keys of `nodes.<role>.types` that stand for every site of a family rather than one site.
FAMILIES = ("chi", "kvm", "edge", "aws", "gcp")
#: Attributes a `{node.attr}` placeholder in an output may name.
NODE_ATTRS = ("floating_ip", "fixed_ip")
SSH_PORT = 22

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_SHIPPED = Path(__file__).parent / "data"

# Documented limits (they are in the schema's descriptions too). A profile is a small hand-written file; these
# keep a careless or hostile one from making labctl (or the cloud) do absurd amounts of work.
MAX_PROFILE_BYTES = inputs.MAX_PROFILE_BYTES  # 1 MiB
MAX_YAML_DEPTH = 32  # nesting of YAML collections
MAX_YAML_NODES = 1_000_000  # values visited, aliases counted each time they are used
MIN_LEASE_HOURS = 1.0
MAX_LEASE_HOURS = 168.0  # Chameleon's 7 days
MAX_TIMEOUT = 86_400.0  # one day per setup step
MAX_NODES = 64  # nodes per deployment, all roles together
MAX_ROLES = 32
MAX_COUNT = 32  # nodes per role
MAX_GPUS = 16
MAX_STEPS = 100
MAX_UPLOADS = 100  # per step
MAX_OUTPUTS = 50
MAX_PORTS = 100
MAX_NETWORKS = 8
MAX_VOLUMES = 16
MAX_VOLUME_GB = 2000
MAX_OBJECT_STORES = 8
MAX_SITES = 32
MAX_TYPES = 16  # node types per site key
MAX_SHORT = 64  # names, node types, sites, images, targets
MAX_TEXT = 1000  # descriptions, output values
MAX_PATH = 1024  # upload and script paths
MAX_SCRIPT = 256 * 1024  # an inline `run:` command
MAX_SCRIPT_FILE = 4 * 1024 * 1024  # a `script:` file
# Where a volume may not be mounted: these directories and everything under them ...
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root", "/run",
                 "/sbin", "/snap", "/sys", "/usr", "/var/lib/apt", "/var/lib/dpkg", "/var/run")
# ... and these directories themselves (a volume over them would hide what is there; below them is fine).
_SYSTEM_DIRS = ("/home", "/tmp", "/var", "/var/lib", "/var/log", "/var/cache", "/opt", "/srv", "/mnt", "/media")
_MOUNT_COMPONENT = re.compile(r"[A-Za-z0-9._-]+\Z")
MAX_MOUNT = 255


def _no_control(value: str) -> str:
    if strip_control(value, one_line=True) != value:
        raise ValueError("must not contain control characters (line breaks, tabs, escape sequences)")
    return value


def _no_control_text(value: str) -> str:
    if strip_control(value) != value:
        raise ValueError("must not contain control characters (escape sequences)")
    return value


#: One line of text: no control characters, at most `n` characters.
def _line(n: int = MAX_SHORT, min_length: int = 0) -> Any:
    return Annotated[str, Field(min_length=min_length, max_length=n), AfterValidator(_no_control)]


Short = _line(MAX_SHORT, 1)


# --------------------------------------------------------------------------------------------- models


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Gpu(_Model):
    """The GPUs each node of a role needs."""

    model: Short = Field(
        title="GPU model",
        description="GPU model the node must have, e.g. A100, H100, MI100, P100 (matched against the "
        "node type's GPU name).",
        examples=["A100"],
    )
    count: int = Field(
        1, ge=1, le=MAX_GPUS, title="GPUs per node",
        description=f"How many GPUs each node needs (at least; 1..{MAX_GPUS}).",
    )
    alternatives: list[Short] = Field(
        default_factory=list,
        max_length=MAX_TYPES,
        title="Acceptable fallback GPU models",
        description="Other GPU models this lab also runs on, in order, for fallback types (e.g. [A10G, L4] "
        "after A100 on AWS/GCP).",
        examples=[["A10G", "L4"]],
    )

    def models(self) -> list[str]:
        return [self.model, *self.alternatives]


class Network(_Model):
    """A private network of the lab (one IPv4 subnet), made for the deployment and removed by `down`."""

    cidr: str = Field(
        title="CIDR",
        description="The subnet, a private IPv4 range such as 192.168.1.0/24 (/8 to /29). Host .1 is the "
        "gateway address and is never given to a node.",
        examples=["192.168.1.0/24"],
    )
    gateway: bool = Field(
        False,
        title="Gateway",
        description="Add a router from this network to the site's public network, so nodes on it alone can "
        "reach out. Leave false when every node also has the site's shared network (the course labs' setup).",
    )
    port_security: bool = Field(
        True,
        title="Port security",
        description="Neutron port security (security groups, anti-spoofing) on this network's ports; the "
        "course's cluster labs turn it off so nodes talk freely on the private network.",
    )

    @field_validator("cidr")
    @classmethod
    def _check_cidr(cls, value: str) -> str:
        try:
            net = ipaddress.ip_network(str(value).strip(), strict=True)
        except ValueError as exc:
            try:
                loose = ipaddress.ip_network(str(value).strip(), strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not a CIDR such as 192.168.1.0/24 ({exc})") from None
            raise ValueError(f"{value!r} has host bits set (did you mean {loose}?)") from None
        if net.version != 4:
            raise ValueError(f"{value!r} is not an IPv4 network (use e.g. 192.168.1.0/24)")
        if not 8 <= net.prefixlen <= 29:
            raise ValueError(f"{value!r}: the prefix must be /8 to /29")
        if not net.is_private or net.is_loopback or net.is_link_local:
            raise ValueError(f"{value!r} is not a private range (use 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16)")
        return str(net)


class NodeNetwork(_Model):
    """A private network a role joins, with an optional fixed address for its nodes."""

    network: Short = Field(title="Network", description="A key of the profile's `networks`.")
    first_ip: int | None = Field(
        None,
        ge=0,
        le=2**24,
        title="First host number",
        description="Host number of the role's first node on the network (e.g. 11 -> 192.168.1.11 on "
        "192.168.1.0/24); the next nodes count up (12, 13, ...). Omit for an address from the pool.",
        examples=[11],
    )


class Volume(_Model):
    """A block-storage volume attached to one node, formatted once and mounted; kept across `down` by default."""

    size_gb: int = Field(ge=1, le=MAX_VOLUME_GB, title="Size (GiB)",
                         description=f"Size in GiB (1..{MAX_VOLUME_GB}).", examples=[2])
    node: Short = Field(title="Node", description="The node it is attached to (a node name, e.g. "
                        "node-1).", examples=["node-1"])
    mount: str | None = Field(
        None, title="Mount point", max_length=MAX_MOUNT,
        description="Absolute path where it is mounted (default /mnt/<name>): components of letters, digits, "
        "'.', '_' and '-' only, no '.' or '..', not a system directory (/etc, /usr, /boot, ... or /, /home, "
        f"/tmp, /var, /mnt themselves); at most {MAX_MOUNT} characters.",
        examples=["/mnt/block"])
    filesystem: Literal["ext4", "xfs"] = Field(
        "ext4", title="Filesystem", description="Made once, only when the volume has no filesystem yet.")
    keep: bool = Field(
        True, title="Keep on down", description="`labctl down` keeps the volume (and its data) for the next "
        "`up`, which reattaches it; `labctl down --delete-volumes` deletes it.")

    @field_validator("mount")
    @classmethod
    def _check_mount(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_mount(value)


def check_mount(value: str) -> str:
    """A volume's mount point as a clean absolute path (trailing '/' dropped), else ValueError saying why."""
    shown = repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    text = value[:-1] if value.endswith("/") and len(value) > 1 else value
    if len(text) > MAX_MOUNT:
        raise ValueError(f"{shown} is longer than {MAX_MOUNT} characters")
    if not text.startswith("/"):
        raise ValueError(f"{shown} is not an absolute path such as /mnt/data")
    if text == "/":
        raise ValueError(f"{shown} is the root directory; mount the volume under /mnt or /data")
    parts = text[1:].split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"{shown} is not a clean absolute path such as /mnt/data (no '//', '.' or '..')")
        if not _MOUNT_COMPONENT.match(part):
            raise ValueError(f"{shown}: a mount point may only contain letters, digits, '.', '_', '-' and '/' "
                             "(e.g. /mnt/data)")
    if text in _SYSTEM_DIRS or any(text == t or text.startswith(t + "/") for t in _SYSTEM_TREES):
        raise ValueError(f"{shown} is a system directory; mount the volume under /mnt or /data")
    return text


class ObjectStore(_Model):
    """An object-storage container (Swift on Chameleon) made for the lab; kept across `down` by default."""

    keep: bool = Field(
        True, title="Keep on down", description="`labctl down` keeps the container and its objects; "
        "`labctl down --delete-volumes` deletes them.")


def _net_kind(value: Any) -> str:
    return "str" if isinstance(value, str) else "NodeNetwork"


NodeNetworkSpec = Annotated[
    Union[  # noqa: UP007 - a discriminated union needs the Union[...] spelling for its tags
        Annotated[Short, Tag("str")],
        Annotated[NodeNetwork, Tag("NodeNetwork")],
    ],
    Discriminator(_net_kind),
]


class NodeGroup(_Model):
    """A role: `count` identical nodes named `<role>-1`, `<role>-2`, ..."""

    count: int = Field(1, ge=1, le=MAX_COUNT, title="Node count",
                       description=f"How many nodes of this role (1..{MAX_COUNT}; at most {MAX_NODES} nodes in "
                       "all roles together).")
    gpu: Gpu | None = Field(None, title="GPU", description="GPUs each node needs; omit for CPU-only nodes.")
    image: Short | None = Field(
        None,
        title="Image override",
        description="Abstract image name for this role only (overrides the profile's `image`).",
    )
    floating_ip: bool | Literal["first"] = Field(
        False, title="Floating IP",
        description="Give each node of this role a public (floating) IP; `first`: only the role's first node "
        "(the others are reached through it over a private network they share, as with `ssh -J`).",
    )
    types: dict[Short, Annotated[list[Short], Field(min_length=1, max_length=MAX_TYPES)]] = Field(
        min_length=1,
        max_length=MAX_SITES,
        title="Node types per site",
        description="Site name (e.g. chi@tacc) or site family (chi, kvm, aws, gcp) -> node types or flavors, "
        "in order of preference; the next one is tried when a site has no capacity for the previous.",
        examples=[{"chi@tacc": ["compute_liqid"], "chi@uc": ["gpu_a100_pcie", "compute_gigaio"]}],
    )
    def floating_ip_for(self, index: int) -> bool:
        """Whether the role's node number `index` (1-based) gets a floating IP."""
        return self.floating_ip is True or (self.floating_ip == "first" and index == 1)

    networks: list[NodeNetworkSpec] = Field(
        default_factory=list,
        max_length=MAX_NETWORKS,
        title="Private networks",
        description="Private networks (keys of the profile's `networks`) this role joins, as names or "
        "{network, first_ip}; the site's shared network stays the first NIC and carries the floating IP.",
        examples=[[{"network": "cluster", "first_ip": 11}]],
    )

    def network_refs(self) -> list[NodeNetwork]:
        """`networks` as `NodeNetwork`s."""
        return [NodeNetwork(network=n) if isinstance(n, str) else n for n in self.networks]


class Port(_Model):
    """A port to open to the world (on sites that use security groups)."""

    port: int = Field(ge=1, le=65535, title="Port", description="Port number (1..65535).")
    protocol: Literal["tcp", "udp"] = Field("tcp", title="Protocol", description="tcp or udp.")
    cidr: str = Field(
        "0.0.0.0/0", max_length=MAX_SHORT, title="Source CIDR",
        description="Who may connect, as a CIDR (default: anyone)."
    )

    @field_validator("cidr")
    @classmethod
    def _check_cidr(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_network(value.strip(), strict=True))
        except ValueError as exc:
            try:
                loose = ipaddress.ip_network(value.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not a CIDR such as 10.0.0.0/24 ({exc})") from None
            raise ValueError(f"{value!r} has host bits set (did you mean {loose}?)") from None


def _port_kind(value: Any) -> str:
    return "int" if isinstance(value, int) and not isinstance(value, bool) else "Port"


PortSpec = Annotated[
    Union[  # noqa: UP007 - a discriminated union needs the Union[...] spelling for its tags
        Annotated[Annotated[int, Field(ge=1, le=65535)], Tag("int")],
        Annotated[Port, Tag("Port")],
    ],
    Discriminator(_port_kind),
]
_UNION_TAGS = {"int", "Port", "str", "NodeNetwork"}


class Upload(_Model):
    """A file (or directory) under `labs/<lab>/` copied to the node before the step runs."""

    src: _line(MAX_PATH, 1) = Field(  # type: ignore[valid-type]
        title="Source",
        description="Path under labs/<lab>/ (symbolic links may point into labs/_common/, nowhere else; a directory "
        "is uploaded with everything in it).")
    dest: _line(MAX_PATH, 1) = Field(  # type: ignore[valid-type]
        title="Destination", description="Path on the node (relative to home).")


class Step(_Model):
    """One setup step: runs on all its targets in parallel; the next step starts when it is done."""

    name: Short = Field(title="Step name", description="Short unique name, shown in progress.")
    on: str | list[str] = Field(
        "all",
        title="Targets",
        description='"all", a role, a node name (e.g. gpu-1), or a list of those.',
    )
    run: Annotated[str, Field(max_length=MAX_SCRIPT), AfterValidator(_no_control_text)] | None = Field(
        None, title="Command",
        description=f"Inline shell command (give run or script; at most {MAX_SCRIPT // 1024} KiB).")
    script: _line(MAX_PATH, 1) | None = Field(  # type: ignore[valid-type]
        None, title="Script", description="A script under labs/<lab>/ to run (give run or script)."
    )
    upload: list[Upload] = Field(
        default_factory=list, max_length=MAX_UPLOADS, title="Uploads",
        description=f"Files under labs/<lab>/ to upload first (at most {MAX_UPLOADS})."
    )
    timeout: float = Field(
        600, gt=0, le=MAX_TIMEOUT, title="Timeout",
        description=f"Seconds before the step counts as failed (more than 0, at most {MAX_TIMEOUT:.0f}).",
    )
    safe_on_sim: bool = Field(
        False,
        title="Safe on the emulated site",
        description="Run this step on --site sim too; leave false for steps that change the host "
        "(apt, sudo, docker).",
    )

    @field_validator("on", mode="before")
    @classmethod
    def _check_on(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError('must not be empty (use "all", a role or a node name)')
            if len(value) > MAX_SHORT:
                raise ValueError(f"a target name is at most {MAX_SHORT} characters")
            return _no_control(value)
        if isinstance(value, list):
            if not value:
                raise ValueError('must not be an empty list (use "all", a role or a node name)')
            if len(value) > MAX_NODES + MAX_ROLES:
                raise ValueError(f"at most {MAX_NODES + MAX_ROLES} targets")
            if all(isinstance(v, str) and v.strip() for v in value):
                for v in value:
                    if len(v) > MAX_SHORT:
                        raise ValueError(f"a target name is at most {MAX_SHORT} characters")
                    _no_control(v)
                return value
        raise ValueError('should be "all", a role, a node name, or a list of those')

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        if (self.run is None) == (self.script is None):
            raise ValueError("give exactly one of 'run' (a command) or 'script' (a file under labs/<lab>/)")
        return self

    def targets(self) -> list[str]:
        """`on` as a list."""
        return [self.on] if isinstance(self.on, str) else list(self.on)


class Output(_Model):
    """Something to show the user after `up`, e.g. a URL built from a node's address."""

    name: Short = Field(title="Output name")
    value: _line(MAX_TEXT) = Field(  # type: ignore[valid-type]
        title="Value",
        description="Text with {node.floating_ip} / {node.fixed_ip} placeholders, e.g. "
        "http://{gpu-1.floating_ip}:8888 (write {{ and }} for literal braces).",
    )
    forward: int | None = Field(
        None, ge=1, le=65535, title="Forwarded port", description="Port for `labctl ssh LAB --forward PORT`."
    )

    def placeholders(self) -> list[tuple[str, str]]:
        """The (node, attribute) pairs the value refers to."""
        out = []
        for m in _PLACEHOLDER.finditer(_strip_escapes(self.value)):
            node, _, attr = m.group(1).strip().rpartition(".")
            out.append((node, attr))
        return out

    def render(self, addresses: Mapping[str, Mapping[str, Any]]) -> str:
        """Fill the placeholders from {node: {"floating_ip": ..., "fixed_ip": ...}} (missing -> '?')."""

        def repl(m: re.Match[str]) -> str:
            node, _, attr = m.group(1).strip().rpartition(".")
            value = addresses.get(node, {}).get(attr)
            return "?" if value in (None, "") else str(value)

        parts = self.value.split("{{")
        rendered = ["}".join(_PLACEHOLDER.sub(repl, seg) for seg in p.split("}}")) for p in parts]
        return "{".join(rendered)


def _strip_escapes(text: str) -> str:
    return text.replace("{{", "").replace("}}", "")


class Profile(_Model):
    """A lab profile (profiles/<lab>.yaml): where it runs, what nodes it needs, and how to set them up."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        title="labctl lab profile",
        json_schema_extra={"$comment": "See docs/architecture.md, 'The profile format'."},
    )

    name: str = Field(
        pattern=NAME_PATTERN, title="Lab name", description="Must equal the file name without .yaml."
    )
    description: _line(MAX_TEXT) = Field(  # type: ignore[valid-type]
        "", title="Description", description=f"One line shown by `labctl profiles` (at most {MAX_TEXT} characters)."
    )
    sites: list[Short] = Field(
        min_length=1,
        max_length=MAX_SITES,
        title="Sites",
        description="Where the lab may run, in order of preference (e.g. chi@tacc, chi@uc, kvm@tacc); "
        "the first Chameleon site is what `--site sim` stands for.",
    )
    lease_hours: float = Field(
        ge=MIN_LEASE_HOURS, le=MAX_LEASE_HOURS, title="Lease length (hours)",
        description=f"{MIN_LEASE_HOURS:g} to {MAX_LEASE_HOURS:g} hours (Chameleon caps leases at 7 days).",
    )
    image: Short = Field(
        title="Image",
        description="Abstract image name mapped per site, e.g. ubuntu-24.04, ubuntu-24.04-cuda.",
    )
    nodes: dict[Annotated[str, Field(pattern=ROLE_PATTERN)], NodeGroup] = Field(
        min_length=1,
        max_length=MAX_ROLES,
        title="Nodes",
        description=f"Role -> node group (at most {MAX_ROLES} roles and {MAX_NODES} nodes in all). Nodes are named "
        "<role>-<i>, 1-based (gpu-1, gpu-2, ...).",
        json_schema_extra={"additionalProperties": False},
    )
    networks: dict[Annotated[str, Field(pattern=ROLE_PATTERN)], Network] = Field(
        default_factory=dict,
        max_length=MAX_NETWORKS,
        title="Private networks",
        description="Name -> private network made for the deployment (a Neutron network on Chameleon, a VPC on "
        "AWS, a VPC network on GCP; one per deployment on AWS/GCP); roles join them through nodes.<role>.networks. "
        f"At most {MAX_NETWORKS}.",
        json_schema_extra={"additionalProperties": False},
    )
    volumes: dict[Annotated[str, Field(pattern=ROLE_PATTERN)], Volume] = Field(
        default_factory=dict,
        max_length=MAX_VOLUMES,
        title="Block volumes",
        description="Name -> a persistent block volume attached to one node and mounted (Cinder on Chameleon "
        f"KVM sites, EBS on AWS, a persistent disk on GCP). At most {MAX_VOLUMES}.",
        json_schema_extra={"additionalProperties": False},
    )
    object_stores: dict[Annotated[str, Field(pattern=ROLE_PATTERN)], ObjectStore] = Field(
        default_factory=dict,
        max_length=MAX_OBJECT_STORES,
        title="Object-store containers",
        description="Name -> an object-storage container on the site's object store (Swift on Chameleon, an "
        f"S3 bucket on AWS; none on GCP). At most {MAX_OBJECT_STORES}.",
        json_schema_extra={"additionalProperties": False},
    )
    ports: list[PortSpec] = Field(
        default_factory=list,
        max_length=MAX_PORTS,
        title="Open ports",
        description=f"Ports to open (22/tcp is always open): ints 1..65535, or {{port, protocol, cidr}}; at most "
        f"{MAX_PORTS}.",
    )
    setup: list[Step] = Field(
        default_factory=list, max_length=MAX_STEPS, title="Setup steps",
        description=f"Run in order after boot (at most {MAX_STEPS} steps)."
    )
    outputs: list[Output] = Field(
        default_factory=list, max_length=MAX_OUTPUTS, title="Outputs",
        description=f"Shown after `labctl up` (URLs, SSH hints); at most {MAX_OUTPUTS}."
    )

    _lab_dir: Path | None = PrivateAttr(None)
    _path: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _cross_check(self) -> Profile:
        problems = _cross_field_problems(self)
        if problems:
            raise ValueError(first_of(problems))
        return self

    # -- accessors

    def node_names(self) -> list[tuple[str, str]]:
        """[(node, role)] in profile order: gpu-1, gpu-2, ..."""
        return [
            (f"{role}-{i}", role) for role, group in self.nodes.items() for i in range(1, group.count + 1)
        ]

    def types_for(self, role: str, site_name: str, family: str) -> list[str]:
        """Node types / flavors of `role` at a site: the exact site key, else the family key, else []."""
        types_ = self.nodes[role].types
        if site_name in types_:
            return list(types_[site_name])
        return list(types_.get(family, []))

    def fixed_ips(self) -> dict[tuple[str, str], str | None]:
        """{(node, network): fixed address or None (from the pool)} for every node on a private network."""
        out: dict[tuple[str, str], str | None] = {}
        for role, group in self.nodes.items():
            for ref in group.network_refs():
                net = self.networks.get(ref.network)
                for i in range(1, group.count + 1):
                    address = None
                    if net is not None and ref.first_ip is not None:
                        address = str(ipaddress.ip_network(net.cidr).network_address + ref.first_ip + i - 1)
                    out[(f"{role}-{i}", ref.network)] = address
        return out

    def mount_of(self, volume: str) -> str:
        """Where a volume is mounted: its `mount`, else /mnt/<name>."""
        return self.volumes[volume].mount or f"/mnt/{volume}"

    def image_for(self, role: str) -> str:
        """The abstract image of a role (its override, else the profile's)."""
        return self.nodes[role].image or self.image

    def port_rules(self) -> list[Port]:
        """Ports as `Port`s, without duplicates, always including 22/tcp (first)."""
        rules: list[Port] = []
        seen: set[tuple[int, str, str]] = set()
        for spec in [SSH_PORT, *self.ports]:
            port = Port(port=spec) if isinstance(spec, int) else spec
            key = (port.port, port.protocol, port.cidr)
            if key not in seen:
                seen.add(key)
                rules.append(port)
        return rules

    @property
    def lab_dir(self) -> Path:
        """The lab's files (scripts, uploads): `X/labs/<lab>/` for a profile at `X/profiles/<lab>.yaml`."""
        return self._lab_dir if self._lab_dir is not None else Path("labs") / self.name

    @lab_dir.setter
    def lab_dir(self, value: Path | str) -> None:
        self._lab_dir = Path(value)

    @property
    def path(self) -> Path | None:
        """The file this profile was loaded from (None if built in code)."""
        return self._path

    def lab_roots(self) -> tuple[Path, ...]:
        """Where the lab's scripts and uploads may come from (links resolved): labs/<lab>/ and labs/_common/."""
        return lab_roots(self.lab_dir)

    def lab_file(self, rel: str, field: str = "") -> Path:
        """`labs/<lab>/<rel>` resolved and checked as `load_profile` checks it (again: it may have changed since);
        a `ProfileError` naming the profile and `field` otherwise."""
        try:
            return confined_path(self.lab_dir, rel)
        except ValueError as exc:
            shown = display_path(self.path) if self.path else f"profile {self.name}"
            raise profile_error(shown, f"{field}: {exc}" if field else str(exc), field or None) from None

    def read_script(self, rel: str, field: str = "") -> str:
        """The text of the script `labs/<lab>/<rel>`, checked like `lab_file` and read only if it is a regular
        file of at most `MAX_SCRIPT_FILE` bytes."""
        path = self.lab_file(rel, field)
        shown = display_path(path)
        data = inputs.read_regular_file(path, MAX_SCRIPT_FILE, "setup script file", shown=shown, error=ProfileError)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise profile_error(shown, "a setup script must be UTF-8 text") from None


# ------------------------------------------------------------------------------- cross-field checks


def first_of(problems: list[str]) -> str:
    more = len(problems) - 1
    return problems[0] + (f" (+{more} more)" if more else "")


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean ...?)': names that extend the word (gpu_a100 -> gpu_a100_pcie), else the closest."""
    options = list(choices)
    longer = [c for c in options if c.startswith(word) and c != word][:3]
    match = longer or difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not match:
        return ""
    return " (did you mean " + " or ".join(f"'{m}'" for m in match) + "?)"


def _cross_field_problems(p: Profile) -> list[str]:
    problems: list[str] = []
    total = sum(group.count for group in p.nodes.values())
    if total > MAX_NODES:
        # Checked first: the checks below are per node, and a plan of thousands of nodes helps nobody.
        return [f"nodes: {total} nodes in all; a deployment has at most {MAX_NODES}"]
    roles = list(p.nodes)
    nodes = [n for n, _ in p.node_names()]
    for role in roles:
        if role in nodes:
            problems.append(f"nodes.{role}: role name '{role}' clashes with a node name of another role")
    for role, group in p.nodes.items():
        for key in group.types:
            if key not in p.sites and key not in FAMILIES:
                problems.append(
                    f"nodes.{role}.types.{key}: '{key}' is neither one of the profile's sites "
                    f"({', '.join(p.sites)}) nor a site family ({', '.join(FAMILIES)})"
                    + suggest(key, [*p.sites, *FAMILIES])
                )
    problems += _network_problems(p)
    problems += _storage_problems(p, nodes)
    targets = ["all", *roles, *nodes]
    seen_steps: dict[str, int] = {}
    for i, step in enumerate(p.setup):
        if step.name in seen_steps:
            problems.append(
                f"setup[{i}].name: duplicate step name '{step.name}' (also setup[{seen_steps[step.name]}])"
            )
        seen_steps.setdefault(step.name, i)
        on = step.targets()
        for j, target in enumerate(on):
            field = "on" if isinstance(step.on, str) else f"on[{j}]"
            if target not in targets:
                problems.append(
                    f"setup[{i}].{field}: unknown target '{target}' (use all, a role or a node: "
                    f"{', '.join(targets)})" + suggest(target, targets)
                )
    seen_outputs: set[str] = set()
    groups = dict(p.node_names())
    for i, out in enumerate(p.outputs):
        if out.name in seen_outputs:
            problems.append(f"outputs[{i}].name: duplicate output name '{out.name}'")
        seen_outputs.add(out.name)
        for node, attr in out.placeholders():
            text = f"{node}.{attr}" if node else attr
            if not node:
                problems.append(
                    f"outputs[{i}].value: placeholder {{{text}}} should be {{<node>.<attribute>}}, "
                    f"e.g. {{{nodes[0]}.floating_ip}} (write {{{{ and }}}} for literal braces)"
                )
            elif node not in groups:
                problems.append(
                    f"outputs[{i}].value: placeholder {{{text}}} names unknown node '{node}' "
                    f"(nodes: {', '.join(nodes)})" + suggest(node, nodes)
                )
            elif attr not in NODE_ATTRS:
                problems.append(
                    f"outputs[{i}].value: placeholder {{{text}}} has unknown attribute '{attr}' "
                    f"(known: {', '.join(NODE_ATTRS)})" + suggest(attr, NODE_ATTRS)
                )
            elif attr == "floating_ip" and not p.nodes[groups[node]].floating_ip_for(int(node.rsplit("-")[-1])):
                problems.append(
                    f"outputs[{i}].value: {{{text}}}: {node} has no floating IP "
                    f"(set nodes.{groups[node]}.floating_ip: true)"
                )
    return problems


def _network_problems(p: Profile) -> list[str]:
    problems: list[str] = []
    names = list(p.networks)
    nets = {name: ipaddress.ip_network(n.cidr) for name, n in p.networks.items()}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if nets[a].overlaps(nets[b]):
                problems.append(f"networks.{b}.cidr: {nets[b]} overlaps networks.{a} ({nets[a]})")
    taken: dict[tuple[str, str], str] = {}  # (network, address) -> node
    for role, group in p.nodes.items():
        seen: set[str] = set()
        for j, entry in enumerate(group.networks):
            ref = NodeNetwork(network=entry) if isinstance(entry, str) else entry
            field = f"nodes.{role}.networks[{j}]" + ("" if isinstance(entry, str) else ".network")
            if ref.network not in p.networks:
                known = f"networks: {', '.join(names)}" if names else "the profile has no `networks`"
                problems.append(f"{field}: unknown network '{ref.network}' ({known})" + suggest(ref.network, names))
                continue
            if ref.network in seen:
                problems.append(f"{field}: network '{ref.network}' is listed twice for role {role}")
                continue
            seen.add(ref.network)
            if ref.first_ip is None:
                continue
            net = nets[ref.network]
            field = f"nodes.{role}.networks[{j}].first_ip"
            for i in range(1, group.count + 1):
                node = f"{role}-{i}"
                address = net.network_address + ref.first_ip + i - 1
                if address not in net or address == net.broadcast_address:
                    problems.append(
                        f"{field}: {node} would get host {ref.first_ip + i - 1}, outside {ref.network} ({net}, "
                        f"hosts 2..{net.num_addresses - 2})"
                    )
                    break
                if address == net.network_address:
                    problems.append(f"{field}: {node} would get {address}, the network address of {ref.network}")
                    break
                if address == net.network_address + 1:
                    problems.append(f"{field}: {node} would get {address}, the gateway address of {ref.network}")
                    break
                other = taken.setdefault((ref.network, str(address)), node)
                if other != node:
                    problems.append(f"{field}: {node} would get {address} on {ref.network}, already {other}'s")
                    break
    return problems


def _storage_problems(p: Profile, nodes: list[str]) -> list[str]:
    problems: list[str] = []
    mounts: dict[tuple[str, str], str] = {}
    for name, vol in p.volumes.items():
        if vol.node not in nodes:
            problems.append(f"volumes.{name}.node: unknown node '{vol.node}' (nodes: {', '.join(nodes)})"
                            + suggest(vol.node, nodes))
            continue
        mount = vol.mount or f"/mnt/{name}"
        other = mounts.setdefault((vol.node, mount), name)
        if other != name:
            problems.append(f"volumes.{name}.mount: {mount} on {vol.node} is already volumes.{other}'s mount point")
    return problems


COMMON_LAB = "_common"  # labs/_common/: scripts the labs share through symbolic links


def lab_roots(lab_dir: Path | str) -> tuple[Path, ...]:
    """The directories a lab's scripts and uploads may come from, symbolic links resolved: `labs/<lab>/` and
    `labs/_common/` (the one that exists of the latter)."""
    lab = Path(os.path.abspath(lab_dir))
    roots = [lab.resolve(), (lab.parent / COMMON_LAB).resolve()]
    return tuple(dict.fromkeys(roots))


def confined_path(lab_dir: Path | str, rel: str, *, want_file: bool = False) -> Path:
    """`labs/<lab>/<rel>` with every symbolic link resolved, checked to lie under `lab_roots(lab_dir)`; for a
    directory every file in it (recursively, links resolved) is checked too. Raises `ValueError` saying why."""
    shown = display_path(lab_dir)
    text = _clip(rel)
    if "\x00" in rel:
        raise ValueError(f"{text} is not a file name")
    if os.path.isabs(rel):
        raise ValueError(f"{text} must be a path relative to {shown}/")
    root = Path(os.path.abspath(lab_dir))
    candidate = Path(os.path.abspath(root / rel))
    if not candidate.is_relative_to(root):
        raise ValueError(f"{text} is outside the lab directory {shown}/")
    roots = lab_roots(root)
    try:
        target = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise ValueError(f"{text} not found under {shown}/") from None
    except (OSError, RuntimeError) as exc:  # a symbolic-link loop, a path too long, ...
        raise ValueError(f"{text}: cannot resolve it ({getattr(exc, 'strerror', None) or exc})") from None
    if not inputs.under(target, roots):
        raise ValueError(f"{text} leads outside the lab directory {shown}/ (to {target}) through a symbolic link; "
                         f"only links into {display_path(root.parent / COMMON_LAB)}/ are allowed")
    if want_file and not target.is_file():
        raise ValueError(f"{text} is not a file under {shown}/")
    if target.is_dir():
        for inner in inputs.walk_confined(target, roots):
            del inner  # walk_confined raises on the first file that is not allowed
    elif not target.is_file():
        raise ValueError(f"{text} is not a regular file or directory")
    return target


def _clip(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 3] + "...")


def _file_problems(p: Profile, lab_dir: Path) -> list[str]:
    """Scripts and uploads must be files under the lab directory (or, through symbolic links, labs/_common/)."""
    problems: list[str] = []

    def check(field: str, rel: str, want_file: bool) -> None:
        try:
            confined_path(lab_dir, rel, want_file=want_file)
        except ValueError as exc:
            problems.append(f"{field}: {exc}")

    for i, step in enumerate(p.setup):
        if step.script is not None:
            check(f"setup[{i}].script", step.script, True)
        for j, up in enumerate(step.upload):
            check(f"setup[{i}].upload[{j}].src", up.src, False)
    return problems


# ------------------------------------------------------------------------------------ error format


def _loc(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        text = str(part)
        if len(text) > 40:
            text = text[:37] + "..."
        out += f"[{text}]" if isinstance(part, int) else (f".{text}" if out else text)
    return out


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop discriminated-union tags ('ports', 0, 'Port', 'cidr') -> ('ports', 0, 'cidr')."""
    out: list[Any] = []
    for part in loc:
        if part in _UNION_TAGS and out and isinstance(out[-1], int):
            continue
        out.append(part)
    return tuple(out)


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _descend(tp: Any, key: Any) -> Any:
    tp = _unwrap(tp)
    origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(key) if isinstance(key, str) else None
        return field.annotation if field else None
    if origin is list:
        return get_args(tp)[0] if isinstance(key, int) else None
    if origin is dict:
        return get_args(tp)[1]
    if origin in (Union, types.UnionType):
        for member in get_args(tp):
            found = _descend(member, key)
            if found is not None:
                return found
    return None


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    tp: Any = root
    for part in loc:
        tp = _descend(tp, part)
        if tp is None:
            return None
    tp = _unwrap(tp)
    candidates = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    for c in candidates:
        c = _unwrap(c)
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _describe_error(err: Mapping[str, Any], root: type[BaseModel]) -> str:
    loc = _clean_loc(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    msg = str(err.get("msg", ""))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if "[key]" in loc:
        where = _loc(p for p in loc if p != "[key]")
        if kind == "string_pattern_mismatch":
            what = {"networks": "network", "volumes": "volume", "object_stores": "object store"}.get(
                str(loc[0]) if loc else "", "role")
            msg = (
                f"{what} names are lower-case letters, digits and '-', start with a letter, "
                "at most 16 characters"
            )
        return f"{where}: {msg}"
    where = _loc(loc)
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1], root)
        known = list(model.model_fields) if model else []
        hint = suggest(str(loc[-1]), known) if known else ""
        if known and not hint:
            hint = f" (known fields: {', '.join(known)})"
        return f"{where}: unknown field{hint}"
    value = err.get("input")
    if (
        kind not in ("missing",)
        and not kind.startswith("value_error")
        and isinstance(value, (str, int, float, bool))
    ):
        shown = repr(value)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        msg = f"{msg} (got {shown})"
    return f"{where}: {msg}" if where else msg


def format_validation_error(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """A pydantic error of `model` (default: Profile) as one line: the first problem, plus '(+N more)'."""
    root = model or Profile
    errors = exc.errors(include_url=False)
    if not errors:
        return _one_line(str(exc))
    return first_of([_one_line(_describe_error(e, root)) for e in errors])


def _one_line(text: str) -> str:
    return " ".join(text.split())


def display_path(path: Path | str) -> str:
    """The path as the user will recognise it: relative to the current directory when under it."""
    absolute = os.path.abspath(path)
    try:
        rel = os.path.relpath(absolute)
    except ValueError:
        return str(path)
    return absolute if rel.startswith("..") else rel


MAX_MESSAGE = 2000
# Invisible characters that reorder text ("Trojan Source"): never in an error line.
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def profile_error(shown: str, message: str, field: str | None = None) -> ProfileError:
    text = _one_line(_BIDI.sub("", strip_control(f"{shown}: {message}", one_line=True)))
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + "..."
    err = ProfileError(text)
    err.path = shown  # type: ignore[attr-defined]
    err.field = field  # type: ignore[attr-defined]
    return err


# ------------------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (so `on:` stays a key), no timestamps (dates stay strings), that rejects
    duplicate keys and collections nested more than `MAX_YAML_DEPTH` deep."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.CollectionStartEvent):
            if self._depth >= MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", mark)
            self._depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml_error(shown: str, exc: yaml.YAMLError) -> ProfileError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark is not None else shown
    return profile_error(where, f"YAML syntax error: {problem}")


def _check_shape(shown: str, data: Any) -> None:
    """Refuse data nested too deep (or containing itself, through YAML aliases) or too big once aliases are
    expanded ("billion laughs"), before anything walks it recursively."""
    budget = MAX_YAML_NODES
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise profile_error(shown, f"too many values once YAML aliases are expanded (more than {MAX_YAML_NODES:,})")
        if isinstance(item, dict):
            children: Iterable[Any] = [*item.keys(), *item.values()]
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= MAX_YAML_DEPTH:
            raise profile_error(shown, f"nested more than {MAX_YAML_DEPTH} levels deep (or a YAML alias inside itself)")
        stack.extend((child, depth + 1) for child in children)


def read_yaml(path: Path | str, what: str = "a profile mapping", shown: str | None = None) -> Any:
    """Parse a YAML file with labctl's loader; errors are one-line `ProfileError`s with line:column.

    Only a regular file of at most `MAX_PROFILE_BYTES` is read (see `labctl.inputs`), collections may nest at
    most `MAX_YAML_DEPTH` deep, and nothing but a `ProfileError` comes out of a hostile file."""
    shown = shown or display_path(path)
    data_bytes = inputs.read_regular_file(path, MAX_PROFILE_BYTES, "YAML file", shown=shown, error=ProfileError)
    try:
        text = data_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data_bytes.count(b"\n", 0, exc.start) + 1
        raise profile_error(shown, f"not UTF-8 text (byte 0x{data_bytes[exc.start]:02x} on line {line})") from None
    if not text.strip():
        raise profile_error(shown, f"empty file (expected {what})")
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise _yaml_error(shown, exc) from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. an explicit !!timestamp that is no date
        raise profile_error(shown, f"YAML value error: {exc}") from None
    except RecursionError:
        raise profile_error(shown, f"nested too deeply (at most {MAX_YAML_DEPTH} levels)") from None
    if data is None:
        raise profile_error(shown, f"empty file (only comments; expected {what})")
    _check_shape(shown, data)
    return data


# ---------------------------------------------------------------------------------------- loading


def lab_dir_for(path: Path | str) -> Path:
    """`X/labs/<lab>/` for a profile at `X/profiles/<lab>.yaml` (else `<dir>/labs/<lab>/`)."""
    p = Path(os.path.abspath(path))
    base = p.parent.parent if p.parent.name == "profiles" else p.parent
    return base / "labs" / p.stem


def load_profile(path: Path | str) -> Profile:
    """Load and check a profile file. Raises `ProfileError` (one line naming the file and the field)."""
    shown = display_path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string"}.get(type(data), type(data).__name__)
        raise profile_error(
            shown, f"the top level must be a mapping of profile fields (name, sites, ...), not {kind}"
        )
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise profile_error(shown, format_validation_error(exc)) from None
    stem = Path(path).stem
    if profile.name != stem:
        raise profile_error(
            shown, f"name: '{profile.name}' must equal the file name without .yaml ('{stem}')", "name"
        )
    lab_dir = lab_dir_for(path)
    problems = _file_problems(profile, lab_dir)
    if problems:
        raise profile_error(shown, first_of(problems))
    profile._lab_dir = lab_dir
    profile._path = Path(path)
    return profile


def shipped_profiles_dir() -> Path:
    return _SHIPPED / "profiles"


def available_profiles() -> dict[str, Path]:
    """Profile name -> file: the shipped ones, overridden by ./profiles/."""
    found: dict[str, Path] = {}
    for directory in (shipped_profiles_dir(), Path("profiles")):
        if directory.is_dir():
            for f in sorted(directory.glob("*.yaml")):
                found[f.stem] = f
    return found


def find_profile(name_or_path: str | Path) -> Path:
    """A path if it exists; else ./profiles/<name>.yaml; else the shipped profile <name>."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    text = str(name_or_path)
    if "/" in text or os.sep in text or text.endswith((".yaml", ".yml")):
        if os.path.lexists(p):
            return p  # a directory, FIFO, device, dangling link: load_profile says which, without reading it
        raise profile_error(display_path(p), "no such file")
    for candidate in (Path("profiles") / f"{text}.yaml", shipped_profiles_dir() / f"{text}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(available_profiles())
    raise ProfileError(
        f"no profile named '{text}' in ./profiles/ or the shipped profiles "
        f"({', '.join(names) or 'none'})" + suggest(text, names)
    )


# ------------------------------------------------------------------------------------------ schema


def json_schema() -> dict[str, Any]:
    """JSON Schema of a profile, for editors (yaml-language-server) and `labctl schema`."""
    schema = Profile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema.setdefault(
        "description", "A labctl lab profile: where a lab runs, what nodes it needs and how to set them up."
    )
    return schema
