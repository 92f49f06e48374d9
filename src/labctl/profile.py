"""Lab profiles: the pydantic model of `profiles/<lab>.yaml` (`Profile`), its cross-field checks, and loading.

The format is described in docs/architecture.md. The parts of a profile (node groups, networks, volumes, steps,
outputs) and the limits are in `labctl.profile_parts`; reading YAML safely is `labctl.profile_yaml`; the one-line
error messages are `labctl.profile_errors`; where a lab's files may come from is `labctl.profile_paths`. This
module re-exports what callers use, so `from labctl.profile import ...` stays the one door. Every problem is
reported as one `ProfileError` line that names the file and the field (`profiles/gpu.yaml: nodes.gpu.count:
Input should be ...`), so that a student can fix it without reading a traceback. `labctl.site_fit.validate_for_site`
adds what can only be checked once the site is known (node types, flavors, images).

Importing this module is cheap (pydantic and PyYAML only).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from labctl import inputs
from labctl.errors import ProfileError
from labctl.profile_errors import display_path, first_of, format_validation_error, profile_error, suggest
from labctl.profile_parts import (
    FAMILIES,
    MAX_LEASE_HOURS,
    MAX_NETWORKS,
    MAX_NODES,
    MAX_OBJECT_STORES,
    MAX_OUTPUTS,
    MAX_PORTS,
    MAX_ROLES,
    MAX_SCRIPT_FILE,
    MAX_SITES,
    MAX_STEPS,
    MAX_TEXT,
    MAX_VOLUMES,
    MIN_LEASE_HOURS,
    NAME_PATTERN,
    NODE_ATTRS,
    ROLE_PATTERN,
    SSH_PORT,
    Gpu,
    Model,
    Network,
    NodeGroup,
    NodeNetwork,
    ObjectStore,
    Output,
    Port,
    PortSpec,
    Short,
    Step,
    Upload,
    Volume,
    check_mount,
    text_line,
)
from labctl.profile_paths import COMMON_LAB, confined_path, lab_dir_for, lab_roots
from labctl.profile_yaml import MAX_PROFILE_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, read_yaml

__all__ = [
    "COMMON_LAB",
    "MAX_NODES",
    "MAX_PROFILE_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
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
    "available_profiles",
    "check_mount",
    "confined_path",
    "display_path",
    "find_profile",
    "first_of",
    "format_validation_error",
    "json_schema",
    "lab_dir_for",
    "lab_roots",
    "load_profile",
    "profile_error",
    "read_yaml",
    "shipped_profiles_dir",
    "suggest",
]

_SHIPPED = Path(__file__).parent / "data"


class Profile(Model):
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
    description: text_line(MAX_TEXT) = Field(  # type: ignore[valid-type]
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


# ---------------------------------------------------------------------------------------- loading


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
        raise profile_error(shown, format_validation_error(exc, Profile)) from None
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
