"""The plan: what a deployment needs, as provider-neutral resources with dependencies.

`build_plan(profile, site, owner)` is pure (no cloud calls): `labctl plan` prints it, `labctl up` applies it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Required, TypedDict, Union

from labctl import hardware, naming

if TYPE_CHECKING:
    from labctl.profile import Profile
    from labctl.sites import Site

# Creation order; teardown runs it backwards: floating IPs, volume attachments, servers, object-store containers
# ("bucket"), volumes, then the ports made for servers on private networks (not plan resources: the adapter makes
# them while launching a server, `list_owned` reports them), leases, security groups (before the network: an AWS
# security group lives in the deployment's VPC), routers (their interfaces first), subnets, networks, the keypair.
# Volumes and buckets with `keep` survive `down` (see Engine.destroy).
KIND_ORDER = ("keypair", "network", "subnet", "router", "secgroup", "reservation", "port", "volume", "bucket",
              "server", "volume_attachment", "floating_ip")
#: Kinds that may outlive a deployment's `down` (their spec / recorded data says keep: true).
KEEPABLE_KINDS = ("volume", "bucket")
# Kinds whose create starts a long wait at the cloud (a lease's start, a boot): the engine makes them first of
# their level, so the wait runs while the others are made.
LONG_WAIT_KINDS = ("reservation", "server")
#: What the students of a class share at one site, per provider: made once for the class (a deployment of its own,
#: `class_shared_plan`) before their environments, which use it as given (`Plan.given`), and deleted after the last
#: of them. A Neutron security group belongs to the project, not to a network (as on AWS and GCP), and every
#: student's would hold the same rules: one group for the class instead of a group and its rules per student,
#: each counted against the project's quotas (Neutron's defaults: 10 groups, 100 rules). Every student's key pair
#: would hold the same key (the instructor's, whose user Nova counts key pairs against: 100 by default), so the
#: class has one, whose comment names its students' leases by pattern (`KeypairSpec.leases`).
CLASS_SHARED_KINDS = {"chameleon": ("secgroup", "keypair")}
# A site's reservations made as Blazar leases, one per node role (`build_plan`).
LEASED_RESERVATIONS = ("host", "flavor")


# -- specs: what each kind of resource asks of a cloud (typed per kind; plain dicts at run time, so a plan stays
# JSON as `labctl plan --json` prints it). Values named "kind:key" refer to another resource of the plan.


class KeypairSpec(TypedDict, total=False):
    public_key: Required[str]
    # The leases the key pair vouches for (Blazar keeps no tags; see providers.chameleon.leases), when not the
    # plan's own: a class's, as `DEPLOYMENT_GLOB:ROLE` marks (`class_shared_plan`).
    leases: list[str]


class NetworkSpec(TypedDict):
    network: str  # the profile's network name
    port_security: bool


class Pool(TypedDict):
    start: str
    end: str


class SubnetSpec(TypedDict):
    network: str  # "network:<name>"
    cidr: str
    gateway_ip: str | None  # None: no gateway (an isolated network)
    allocation_pools: list[Pool]


class RouterSpec(TypedDict):
    subnet: str  # "subnet:<name>"
    external_network: str | None


class PortRule(TypedDict):
    port: int
    protocol: str
    cidr: str


class SecgroupNetwork(TypedDict):
    network: str  # "network:<name>"
    cidr: str
    open: bool  # port security off: all traffic from the network's CIDR


class SecgroupSpec(TypedDict):
    rules: list[PortRule]
    networks: list[SecgroupNetwork]


class ReservationSpec(TypedDict):
    role: str
    count: int
    kind: str  # "host" (bare metal) or "flavor" (KVM)
    candidates: list[str]
    hours: float


class ServerNetwork(TypedDict):
    network: str  # "network:<name>"
    subnet: str  # "subnet:<name>"
    fixed_ip: str | None
    port_security: bool
    port_name: str


class ServerSpec(TypedDict):
    node: str
    role: str
    candidates: list[str]  # node types in order of preference
    image: str
    reservation: str | None  # "reservation:<role>" where the site leases
    extra_keys: list[str]
    networks: list[ServerNetwork]


class FloatingIpSpec(TypedDict):
    node: str
    server: str  # "server:<node>"


class VolumeSpec(TypedDict):
    volume: str
    size_gb: int
    keep: bool
    node: str
    server: str  # "server:<node>"


class VolumeAttachmentSpec(TypedDict):
    volume: str  # "volume:<name>"
    server: str  # "server:<node>"
    node: str
    mount: str
    filesystem: str


class BucketSpec(TypedDict):
    bucket: str
    keep: bool


Spec = Union[KeypairSpec, NetworkSpec, SubnetSpec, RouterSpec, SecgroupSpec, ReservationSpec, ServerSpec,  # noqa: UP007
             FloatingIpSpec, VolumeSpec, VolumeAttachmentSpec, BucketSpec]


@dataclass(frozen=True)
class Resource:
    key: str  # unique within the deployment: "server:gpu-1", "reservation:gpu", "keypair"
    kind: str
    name: str  # the cloud-side name
    spec: Spec | dict[str, Any]  # the TypedDict of its kind (see above); teardown plans carry what the state kept
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodePlan:
    name: str  # gpu-1
    role: str
    candidates: tuple[str, ...]  # node types / flavors in order of preference
    image: str  # concrete image name at the site
    floating_ip: bool


@dataclass
class Plan:
    deployment: str
    lab: str
    owner: str
    course: str | None
    site: Site
    lease_hours: float
    tags: dict[str, str]
    nodes: list[NodePlan]
    resources: list[Resource] = field(default_factory=list)
    # Resources another deployment made and owns, by key (a class's shared group: the providers' `Found`s): this
    # one's resources depend on them, but never makes, records or deletes them.
    given: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Resource:
        for res in self.resources:
            if res.key == key:
                return res
        raise KeyError(key)

    def by_kind(self, kind: str) -> list[Resource]:
        return [r for r in self.resources if r.kind == kind]

    def levels(self) -> list[list[Resource]]:
        """Resources grouped so that each group depends only on earlier groups (for concurrent apply)."""
        placed: dict[str, int] = dict.fromkeys(self.given, -1)
        pending = list(self.resources)
        levels: list[list[Resource]] = []
        while pending:
            ready = [r for r in pending if all(d in placed for d in r.depends_on)]
            if not ready:
                raise ValueError(f"dependency cycle among {[r.key for r in pending]}")
            for r in ready:
                placed[r.key] = len(levels)
            levels.append(ready)
            pending = [r for r in pending if r.key not in placed]
        return levels


def build_plan(
    profile: Profile,
    site: Site,
    owner: str,
    public_key: str,
    name: str | None = None,
    course: str | None = None,
    extra_keys: tuple[str, ...] = (),
    given: Mapping[str, Any] | None = None,
) -> Plan:
    """`given`: what the environment uses without making it (a class's shared resources, by key)."""
    deployment = naming.deployment_id(name or profile.name, owner, course)
    tags = {
        naming.TAG_DEPLOYMENT: deployment,
        naming.TAG_LAB: profile.name,
        naming.TAG_OWNER: owner,
    }
    if course:
        tags[naming.TAG_COURSE] = course
    real_site = site.stands_for or site.name
    def candidates(role: str) -> tuple[str, ...]:
        explicit = profile.types_for(role, real_site, site.family) or profile.types_for(
            role, site.catalog or real_site, site.family)
        if explicit or site.family not in ("aws", "gcp"):
            return tuple(explicit)
        gpu = profile.nodes[role].gpu
        return hardware.default_types(site.family, gpu.models() if gpu else None)

    nodes = [
        NodePlan(
            name=node,
            role=role,
            candidates=candidates(role),
            image=site.images.get(profile.image_for(role), profile.image_for(role)),
            floating_ip=profile.nodes[role].floating_ip_for(int(node.rsplit("-", 1)[1])),
        )
        for node, role in profile.node_names()
    ]
    plan = Plan(deployment, profile.name, owner, course, site, profile.lease_hours, tags, nodes,
                given=dict(given or {}))
    res = plan.resources
    if "keypair" not in plan.given:
        res.append(Resource("keypair", "keypair", deployment, KeypairSpec(public_key=public_key)))
    server_deps = ["keypair"]
    fixed = profile.fixed_ips()
    for net_name, net in profile.networks.items():
        cidr = ipaddress.IPv4Network(net.cidr)  # the profile admits IPv4 networks only
        gateway = str(cidr.network_address + 1)
        taken = sorted(ipaddress.IPv4Address(a) for (_, n), a in fixed.items() if n == net_name and a)
        res.append(Resource(f"network:{net_name}", "network", naming.resource_name(deployment, net_name),
                            NetworkSpec(network=net_name, port_security=net.port_security)))
        res.append(Resource(
            f"subnet:{net_name}", "subnet", naming.resource_name(deployment, f"{net_name}-subnet"),
            SubnetSpec(network=f"network:{net_name}", cidr=str(cidr), gateway_ip=gateway if net.gateway else None,
                       allocation_pools=_pools(cidr, taken)),
            (f"network:{net_name}",)))
        if net.gateway:
            res.append(Resource(
                f"router:{net_name}", "router", naming.resource_name(deployment, f"{net_name}-router"),
                RouterSpec(subnet=f"subnet:{net_name}", external_network=site.public_network),
                (f"subnet:{net_name}",)))
    if site.security_groups:
        if "secgroup" not in plan.given:
            spec = _secgroup_spec(profile, with_networks=True)
            res.append(Resource("secgroup", "secgroup", deployment, spec,
                                tuple(n["network"] for n in spec["networks"])))
        server_deps.append("secgroup")
    reservations: dict[str, str] = {}
    if site.reservation in LEASED_RESERVATIONS:
        for role, group in profile.nodes.items():
            key = f"reservation:{role}"
            reservations[role] = key
            role_types = next(n.candidates for n in nodes if n.role == role)
            res.append(
                Resource(
                    key,
                    "reservation",
                    naming.resource_name(deployment, role),
                    ReservationSpec(role=role, count=group.count, kind=site.reservation,
                                    candidates=list(role_types), hours=profile.lease_hours),
                )
            )
    for node in nodes:
        deps = list(server_deps)
        if node.role in reservations:
            deps.append(reservations[node.role])
        networks = []
        for ref in profile.nodes[node.role].network_refs():
            networks.append(ServerNetwork(
                network=f"network:{ref.network}",
                subnet=f"subnet:{ref.network}",
                fixed_ip=fixed.get((node.name, ref.network)),
                port_security=profile.networks[ref.network].port_security,
                port_name=naming.resource_name(deployment, f"{node.name}-{ref.network}"),
            ))
            deps += [f"network:{ref.network}", f"subnet:{ref.network}"]
        res.append(
            Resource(
                f"server:{node.name}",
                "server",
                naming.resource_name(deployment, node.name),
                ServerSpec(
                    node=node.name,
                    role=node.role,
                    candidates=list(node.candidates),
                    image=node.image,
                    reservation=reservations.get(node.role),
                    extra_keys=list(extra_keys),
                    networks=networks,
                ),
                tuple(deps),
            )
        )
        if node.floating_ip:
            res.append(
                Resource(
                    f"floating_ip:{node.name}",
                    "floating_ip",
                    naming.resource_name(deployment, f"{node.name}-fip"),
                    FloatingIpSpec(node=node.name, server=f"server:{node.name}"),
                    (f"server:{node.name}",),
                )
            )
    for vol_name, vol in profile.volumes.items():
        # Made once the server is up: on AWS and GCP a volume lives in one zone, and must be in its server's.
        res.append(Resource(f"volume:{vol_name}", "volume", naming.resource_name(deployment, vol_name),
                            VolumeSpec(volume=vol_name, size_gb=vol.size_gb, keep=vol.keep, node=vol.node,
                                       server=f"server:{vol.node}"),
                            (f"server:{vol.node}",)))
        res.append(Resource(
            f"volume_attachment:{vol_name}", "volume_attachment",
            naming.resource_name(deployment, f"{vol_name}-attachment"),
            VolumeAttachmentSpec(volume=f"volume:{vol_name}", server=f"server:{vol.node}", node=vol.node,
                                 mount=profile.mount_of(vol_name), filesystem=vol.filesystem),
            (f"volume:{vol_name}", f"server:{vol.node}")))
    for store_name, store in profile.object_stores.items():
        res.append(Resource(f"bucket:{store_name}", "bucket", naming.resource_name(deployment, store_name),
                            BucketSpec(bucket=store_name, keep=store.keep)))
    return plan


def _secgroup_spec(profile: Profile, *, with_networks: bool) -> SecgroupSpec:
    rules = [PortRule(port=p.port, protocol=p.protocol, cidr=p.cidr) for p in profile.port_rules()]
    # On AWS and GCP the group / firewall belongs to the deployment's network, and a network without port
    # security lets its nodes talk freely (all traffic from its CIDR), as Neutron does with port security off.
    nets = [SecgroupNetwork(network=f"network:{n}", cidr=net.cidr, open=not net.port_security)
            for n, net in profile.networks.items()] if with_networks else []
    return SecgroupSpec(rules=rules, networks=nets)


def class_shared_plan(profile: Profile, site: Site, course: str, owner: str, public_key: str) -> Plan | None:
    """The deployment of what a class's environments at `site` share (`CLASS_SHARED_KINDS`), made by `owner` (the
    instructor, whose `public_key` every environment holds); None where they share nothing. Its id names the
    course, the site and the lab."""
    kinds = CLASS_SHARED_KINDS.get(site.provider, ())
    if not kinds:
        return None
    deployment = naming.deployment_id(profile.name, naming.class_shared_owner(site.name), course)
    tags = {naming.TAG_DEPLOYMENT: deployment, naming.TAG_LAB: profile.name, naming.TAG_OWNER: owner,
            naming.TAG_COURSE: course}
    plan = Plan(deployment, profile.name, owner, course, site, profile.lease_hours, tags, [])
    if "keypair" in kinds:
        # Its students' leases are named `<their deployment>-<role>` (`build_plan`), whoever the student is.
        glob = naming.class_deployments_glob(profile.name, course)
        leased = site.reservation in LEASED_RESERVATIONS
        leases = [f"{glob}:{naming.sanitise(role, 40)}" for role in profile.nodes] if leased else []
        plan.resources.append(Resource("keypair", "keypair", deployment,
                                       KeypairSpec(public_key=public_key, leases=leases)))
    if "secgroup" in kinds and site.security_groups:
        # A Neutron group is the project's: its rules name ports and addresses, not the students' networks.
        plan.resources.append(Resource("secgroup", "secgroup", deployment,
                                       _secgroup_spec(profile, with_networks=False)))
    return plan


def _pools(cidr: ipaddress.IPv4Network, taken: list[ipaddress.IPv4Address]) -> list[Pool]:
    """Allocation pools of a subnet: its hosts after the gateway (.1), minus the nodes' fixed addresses, so
    an address from the pool never takes one a node asks for."""
    pools: list[Pool] = []
    start = cidr.network_address + 2
    last = cidr.broadcast_address - 1
    for address in [*taken, last + 1]:
        if address > start:
            pools.append(Pool(start=str(start), end=str(min(address - 1, last))))
        start = max(start, address + 1)
    return pools
