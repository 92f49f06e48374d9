"""The parts of a lab profile: the pydantic models of a node group (GPU, types, networks), a private network, a
volume, an object store, a port, a setup step and an output, and the documented limits every number and string is
held to. `labctl.profile.Profile` puts them together and checks them against each other.

Importing this module is cheap (pydantic only).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from labctl.redact import strip_control

ROLE_PATTERN = r"^[a-z][a-z0-9-]{0,15}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: Keys of `nodes.<role>.types` that stand for every site of a family rather than one site.
FAMILIES = ("chi", "kvm", "edge", "aws", "gcp")
#: Attributes a `{node.attr}` placeholder in an output may name.
NODE_ATTRS = ("floating_ip", "fixed_ip")
SSH_PORT = 22

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")

# Documented limits (they are in the schema's descriptions too). A profile is a small hand-written file; these
# keep a careless or hostile one from making labctl (or the cloud) do absurd amounts of work.
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


def no_control(value: str) -> str:
    if strip_control(value, one_line=True) != value:
        raise ValueError("must not contain control characters (line breaks, tabs, escape sequences)")
    return value


def _no_control_text(value: str) -> str:
    if strip_control(value) != value:
        raise ValueError("must not contain control characters (escape sequences)")
    return value


def text_line(n: int = MAX_SHORT, min_length: int = 0) -> Any:
    """One line of text: no control characters, at most `n` characters (a type for a field)."""
    return Annotated[str, Field(min_length=min_length, max_length=n), AfterValidator(no_control)]


Short = text_line(MAX_SHORT, 1)


# --------------------------------------------------------------------------------------------- models


class Model(BaseModel):
    """What every part of a profile is: unknown fields refused, no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Gpu(Model):
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


class Network(Model):
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


class NodeNetwork(Model):
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


class Volume(Model):
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


class ObjectStore(Model):
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


class NodeGroup(Model):
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


class Port(Model):
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


class Upload(Model):
    """A file (or directory) under `labs/<lab>/` copied to the node before the step runs."""

    src: text_line(MAX_PATH, 1) = Field(  # type: ignore[valid-type]
        title="Source",
        description="Path under labs/<lab>/ (symbolic links may point into labs/_common/, nowhere else; a directory "
        "is uploaded with everything in it).")
    dest: text_line(MAX_PATH, 1) = Field(  # type: ignore[valid-type]
        title="Destination", description="Path on the node (relative to home).")


class Step(Model):
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
    script: text_line(MAX_PATH, 1) | None = Field(  # type: ignore[valid-type]
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
            return no_control(value)
        if isinstance(value, list):
            if not value:
                raise ValueError('must not be an empty list (use "all", a role or a node name)')
            if len(value) > MAX_NODES + MAX_ROLES:
                raise ValueError(f"at most {MAX_NODES + MAX_ROLES} targets")
            if all(isinstance(v, str) and v.strip() for v in value):
                for v in value:
                    if len(v) > MAX_SHORT:
                        raise ValueError(f"a target name is at most {MAX_SHORT} characters")
                    no_control(v)
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


class Output(Model):
    """Something to show the user after `up`, e.g. a URL built from a node's address."""

    name: Short = Field(title="Output name")
    value: text_line(MAX_TEXT) = Field(  # type: ignore[valid-type]
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
