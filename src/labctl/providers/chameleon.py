"""Chameleon (OpenStack + Blazar) adapter: openstacksdk for Nova/Neutron/Glance, python-blazarclient for leases.

Both run on one keystoneauth session. python-chi's own helpers are deliberately not used on this path
because of its traps (see docs/architecture.md): it leaks floating IPs on delete, takes any unbound
floating IP of the project, and reports a lease in ERROR as success. Here:
- floating IPs are allocated per node, described with the deployment and node, and deleted explicitly;
- a lease in ERROR or a "not enough hosts" answer becomes `NoCapacity`, so the engine tries the next type;
- every lookup is by deterministic name *and* labctl's metadata/description, never "the first one".
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from labctl import naming
from labctl.errors import (
    CloudError,
    Conflict,
    CredentialsError,
    NoCapacity,
    QuotaExceeded,
    RateLimited,
    Transient,
    UserError,
)
from labctl.providers.base import (
    Found,
    ProgressFn,
    converge_created,
    create_or_adopt,
    scrub,
)
from labctl.providers.kit import RateLimiter, Snapshot
from labctl.redact import clean

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource
    from labctl.sites import Site

T = TypeVar("T")
log = logging.getLogger(__name__)

LEASE_DONE = ("TERMINATED", "DELETED", "DELETING", "TERMINATING")
VOLUME_GONE = ("deleting", "deleted", "error_deleting")
VOLUME_BUSY = ("creating", "attaching", "detaching", "in-use", "reserved", "extending", "downloading")
VOLUME_NAME = "labctl:volume"  # volume metadata: the profile's name for it (its key in the plan)
VOLUME_KEEP = "labctl:keep"  # "true" when `down` keeps it
# Swift container metadata (X-Container-Meta-Labctl-Deployment / -Labctl-Keep): who made it, and keep on down.
CONTAINER_DEPLOYMENT = "labctl-deployment"
CONTAINER_KEEP = "labctl-keep"
_BLAZAR_DATE = "%Y-%m-%d %H:%M"


def describe_credentials(site: Site, cloud: str | None = None) -> str:
    """One line for `labctl sites`: which OpenStack source was found for the site, or what is missing."""
    from labctl.credentials import describe

    return describe(site, cloud)


def connect(site: Site, *, cloud: str | None = None, testbed: Callable[[], Any] | None = None) -> ChameleonProvider:
    """Credentials from clouds.yaml / OS_* variables, or from the emulated testbed for `sim` sites."""
    import dataclasses

    from labctl.credentials import find_openstack_credentials

    if site.emulated:
        if testbed is None:
            raise UserError(f"{site.name} is emulated but no testbed was given")
        tb = testbed()
        real = site.stands_for or site.name
        site = dataclasses.replace(site, auth_url=tb.auth_url(real), ssh_port=tb.ssh_port or tb.world.ssh_port)
        return ChameleonProvider(site, find_openstack_credentials(site, env=tb.os_env(real)))
    return ChameleonProvider(site, find_openstack_credentials(site, cloud=cloud))


class ChameleonProvider:
    def __init__(self, site: Site, credentials: Any, poll_interval: float | None = None,
                 call_retries: int = 6) -> None:
        self.site = site
        self.credentials = credentials
        self.poll_interval = poll_interval if poll_interval is not None else site.poll_interval
        self.call_retries = call_retries
        self._conn: Any = None
        self._blazar: Any = None
        self._cache: dict[str, Any] = {}
        self.limiter = RateLimiter(None)
        # Polls share one list call per round across all deployments on this site (class mode).
        self._server_list = Snapshot(self.poll_interval * 0.9)
        self._lease_list = Snapshot(self.poll_interval * 0.9)
        # What `find` just said about a resource, for the `create` the engine calls right after it in the same
        # thread (so create does not list again what find listed). Taken once; a missing entry means "look".
        self._just_found: dict[tuple[str, str], Found | None] = {}
        # Project-wide lists for `list_owned`, shared by the deployments a class tears down at once; a
        # deployment's own deletes (time in `_deleted_at`) make it fetch again rather than see its old items.
        self._owned_lists: dict[str, Snapshot] = {}
        self._deleted_at: dict[str, float] = {}

    def set_rate_limit(self, calls_per_second: float | None) -> None:
        self.limiter = RateLimiter(calls_per_second)

    # -- clients ----------------------------------------------------------------------------------
    @property
    def conn(self) -> Any:
        if self._conn is None:
            import openstack

            c = self.credentials
            self._conn = openstack.connect(
                auth_type=c.auth_type,
                auth=dict(c.auth),
                region_name=c.region_name,
                interface=c.interface or "public",
                identity_api_version="3",
                load_yaml_config=False,
                load_envvars=False,
                app_name="labctl",
            )
            self._limit_requests(self._conn.session)
        return self._conn

    def _limit_requests(self, session: Any) -> None:
        """Apply the client-side rate limit to every HTTP request of this adapter's own session (Nova,
        Neutron, Glance, Blazar and Keystone all go through it), not to whole adapter calls."""
        send = session.request

        def limited(*args: Any, **kwargs: Any) -> Any:
            self.limiter.acquire()
            return send(*args, **kwargs)

        session.request = limited

    @property
    def blazar(self) -> Any:
        if self._blazar is None:
            from blazarclient import client as blazar_client

            self._blazar = blazar_client.Client(
                "1", session=self.conn.session, service_type="reservation",
                region_name=self.credentials.region_name, interface="public",
            )
        return self._blazar

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """One cloud call, with its errors translated; rate limits and transient faults are retried."""
        from tenacity import (
            retry,
            retry_if_exception_type,
            stop_after_attempt,
            wait_random_exponential,
        )

        @retry(
            retry=retry_if_exception_type((RateLimited, Transient)),
            wait=wait_random_exponential(multiplier=max(self.poll_interval, 0.01), max=30),
            stop=stop_after_attempt(self.call_retries),
            reraise=True,
        )
        def attempt() -> T:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - translated below, never leaks SDK types
                raise scrub(self._translate(what, exc)) from exc

        return attempt()

    def _translate(self, what: str, exc: Exception) -> Exception:
        from keystoneauth1 import exceptions as ks_exc

        if isinstance(exc, UserError | CloudError):
            return exc
        # openstacksdk wraps keystoneauth's errors (e.g. a 401 at authorize()) in a bare SDKException:
        # look through the chain for the most specific one.
        chain = [exc]
        while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 8:
            chain.append(nxt)
        exc = next((e for e in chain if isinstance(e, ks_exc.ClientException)), exc)
        # blazarclient's exceptions carry the HTTP status in kwargs["code"]; their `code` attribute is always 500.
        kwargs = getattr(exc, "kwargs", None)
        status = getattr(exc, "status_code", None) or getattr(exc, "http_status", None) or (
            kwargs.get("code") if isinstance(kwargs, dict) else None) or getattr(
            exc, "code", None) or getattr(getattr(exc, "response", None), "status_code", None)
        text = _error_text(exc)
        where = f"{self.site.name}: {what}"
        if isinstance(exc, ks_exc.Unauthorized) or status == 401:
            return CredentialsError(f"{where}: credentials rejected ({text}); check your openrc or clouds.yaml")
        if isinstance(exc, ks_exc.ConnectFailure | ks_exc.ConnectTimeout):
            return Transient(f"{where}: cannot reach the API ({text})")
        if isinstance(exc, ks_exc.EndpointNotFound):
            return UserError(f"{where}: the site's catalog has no such service ({text})")
        if re.search(r"not enough .* available|no valid host", text, re.I):
            return NoCapacity(f"{where}: {text}")
        if status == 409 or re.search(r"already exists|already has a floating IP", text, re.I):
            # Blazar answers a taken lease name with a 500 through blazarclient: the text says what it is.
            return Conflict(f"{where}: {text}")
        if status == 429:
            return RateLimited(f"{where}: rate limited ({text})")
        if re.search(r"quota|OverQuota|limit exceeded", text, re.I) or status == 413:
            return QuotaExceeded(f"{where}: quota exceeded ({text})")
        if status is not None and int(status) >= 500:
            return Transient(f"{where}: server error {status} ({text})")
        if isinstance(exc, TimeoutError | ks_exc.RequestTimeout):
            return Transient(f"{where}: timed out")
        return CloudError(f"{where}: {text}")

    def _find_one(self, key: str, what: str, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = self._call(what, fn)
        return self._cache[key]

    def _public_network(self) -> Any:
        net = self._find_one("public", "find public network",
                             lambda: self.conn.network.find_network(self.site.public_network))
        if net is None:
            raise CloudError(f"{self.site.name}: no network named '{self.site.public_network}'")
        return net

    def _network(self) -> Any:
        net = self._find_one("network", "find network", lambda: self.conn.network.find_network(self.site.network))
        if net is None:
            raise CloudError(f"{self.site.name}: no network named '{self.site.network}'")
        return net

    # -- preflight --------------------------------------------------------------------------------
    def preflight(self, plan: Plan) -> None:
        # Authenticates (a wrong secret fails here, before anything is created) and checks the images.
        self._call("authenticate", lambda: self.conn.authorize())
        for image in sorted({n.image for n in plan.nodes}):
            found = self._call(f"find image {image}", lambda im=image: self.conn.image.find_image(im))
            if found is None:
                raise UserError(f"{self.site.name}: image '{image}' not found at this site")
            self._cache[f"image:{image}"] = found

    # -- find -------------------------------------------------------------------------------------
    def find(self, res: Resource, plan: Plan) -> Found | None:
        finder = getattr(self, f"_find_{res.kind}")
        found = finder(res, plan)
        self._just_found[(plan.deployment, res.key)] = found
        return found

    def _found_before_create(self, res: Resource, plan: Plan) -> Found | None:
        """What `find` said just before this create, else a fresh look."""
        key = (plan.deployment, res.key)
        if key in self._just_found:
            return self._just_found.pop(key)
        return getattr(self, f"_find_{res.kind}")(res, plan)

    def _get_keypair(self, name: str) -> Any:
        """One GET /os-keypairs/NAME (find_keypair would also list every key pair after a 404)."""
        from openstack import exceptions as os_exc

        def get() -> Any:
            try:
                return self.conn.compute.get_keypair(name)
            except os_exc.NotFoundException:
                return None

        return self._call("get keypair", get)

    def _find_keypair(self, res: Resource, plan: Plan) -> Found | None:
        kp = self._get_keypair(res.name)
        if kp is None:
            return None
        if kp.public_key and kp.public_key.split()[:2] != res.spec["public_key"].split()[:2]:
            return Found("keypair", res.name, res.name, status="incomplete")  # stale key: replace it
        return Found("keypair", res.name, res.name)

    def _find_secgroup(self, res: Resource, plan: Plan) -> Found | None:
        mine = self._secgroups_named(res, plan)
        if not mine:
            return None
        # Two runs that raced may have left two: every run takes the same one (`_secgroup_rank`).
        sg = min(mine, key=lambda g: (self._secgroup_rank(g, res), g.id))
        status = "ready" if _has_rules(sg, res) else "incomplete"
        return Found("secgroup", sg.id, sg.name, status=status)

    def _secgroups_named(self, res: Resource, plan: Plan) -> list[Any]:
        groups = self._call("list security groups",
                            lambda: list(self.conn.network.security_groups(name=res.name)))
        return [g for g in groups if _deployment_of(g.description) == plan.deployment]

    @staticmethod
    def _secgroup_rank(sg: Any, res: Resource) -> tuple[bool, str]:
        """Finished groups (with their rules: some run took it) first, then the oldest."""
        return (not _has_rules(sg, res), str(sg.created_at or ""))

    def _find_reservation(self, res: Resource, plan: Plan) -> Found | None:
        leases = self._call("list leases", lambda: self.blazar.lease.list())
        for lease in leases:
            if lease["name"] == res.name and lease["status"] not in LEASE_DONE:
                return self._lease_found(lease, res)
        return None

    def _find_server(self, res: Resource, plan: Plan) -> Found | None:
        servers = self._servers_named(f"^{re.escape(res.name)}$", plan)
        live = [s for s in servers if s.status not in ("DELETED", "SOFT_DELETED")]
        if not live:
            return None
        # Prefer a healthy one if an earlier run left an ERROR twin; the twin is swept by `down`.
        live.sort(key=lambda s: s.status == "ERROR")
        return self._server_found(live[0])

    def _owned_named(self, what: str, lister: Callable[..., Any], name: str, plan: Plan) -> list[Any]:
        items = self._call(f"list {what}", lambda: list(lister(name=name)))
        return [i for i in items if _deployment_of(i.description) == plan.deployment]

    def _find_network(self, res: Resource, plan: Plan) -> Found | None:
        mine = self._owned_named("networks", self.conn.network.networks, res.name, plan)
        return Found("network", mine[0].id, res.name) if mine else None

    def _find_subnet(self, res: Resource, plan: Plan) -> Found | None:
        mine = self._owned_named("subnets", self.conn.network.subnets, res.name, plan)
        if not mine:
            return None
        return Found("subnet", mine[0].id, res.name, attrs={"network_id": mine[0].network_id,
                                                            "cidr": mine[0].cidr})

    def _find_router(self, res: Resource, plan: Plan) -> Found | None:
        mine = self._owned_named("routers", self.conn.network.routers, res.name, plan)
        if not mine:
            return None
        router = mine[0]
        ports = self._call("list router ports", lambda: list(self.conn.network.ports(device_id=router.id)))
        subnets = {ip.get("subnet_id") for p in ports for ip in p.fixed_ips or []}
        have_gateway = bool(router.external_gateway_info)
        # An interface or gateway missing (a crash between the calls): "incomplete", create() finishes it.
        subnet_name = _subnet_name_of(res)
        subnet = self._owned_named("subnets", self.conn.network.subnets, subnet_name, plan)
        complete = have_gateway and bool(subnet) and subnet[0].id in subnets
        return Found("router", router.id, res.name, status="ready" if complete else "incomplete")

    def _find_volume(self, res: Resource, plan: Plan) -> Found | None:
        vols = self._call("list volumes", lambda: list(self.conn.block_storage.volumes(details=True, name=res.name)))
        mine = [v for v in vols if (v.metadata or {}).get(naming.TAG_DEPLOYMENT) == plan.deployment
                and v.status not in VOLUME_GONE]
        if not mine:
            return None
        mine.sort(key=lambda v: v.status == "error")  # a healthy one first
        return self._volume_found(mine[0])

    def _find_volume_attachment(self, res: Resource, plan: Plan) -> Found | None:
        if "volume" not in res.spec or "server" not in res.spec:
            return None  # a teardown lookup: attachments are found through list_owned
        vol = self._find_volume(plan.get(res.spec["volume"]), plan)
        server = self._find_server(plan.get(res.spec["server"]), plan)
        if vol is None or server is None:
            return None
        for a in vol.attrs.get("attachments", []):
            if a.get("server_id") == server.cloud_id:
                return self._attachment_found(res.name, server.cloud_id, vol, a.get("device"))
        return None

    def _find_bucket(self, res: Resource, plan: Plan) -> Found | None:
        meta = self._container_meta(res.name)
        if meta is None or meta.get(CONTAINER_DEPLOYMENT) != plan.deployment:
            return None
        return Found("bucket", res.name, res.name, attrs={"key": res.key, "keep": meta.get(CONTAINER_KEEP) == "true"})

    def _find_floating_ip(self, res: Resource, plan: Plan) -> Found | None:
        desc = _description(plan.deployment, res.spec["node"])
        ips = self._call("list floating IPs", lambda: list(self.conn.network.ips(description=desc)))
        if not ips:
            return None
        ip = min(ips, key=lambda i: (not i.port_id, str(i.created_at or ""), i.id))  # the same for every run
        status = "ready" if ip.port_id else "incomplete"
        return Found("floating_ip", ip.id, res.name, status=status,
                     attrs={"floating_ip": ip.floating_ip_address, "port_id": ip.port_id})

    # -- create -----------------------------------------------------------------------------------
    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        creator = getattr(self, f"_create_{res.kind}")
        return creator(res, plan, deps, candidate)

    def _create_keypair(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        if self._found_before_create(res, plan) is not None:  # another key under this name: replace it
            self._call("delete stale keypair",
                       lambda: self.conn.compute.delete_keypair(res.name, ignore_missing=True))
        def create() -> Found:
            self._call("create keypair", lambda: self.conn.compute.create_keypair(
                name=res.name, public_key=res.spec["public_key"]))
            return Found("keypair", res.name, res.name)

        def adopt() -> Found | None:
            # Made by a retry after a lost answer or by a concurrent run: fine if it holds this key.
            again = self._find_keypair(res, plan)
            return again if again is not None and again.status == "ready" else None

        return create_or_adopt(create, adopt)

    def _create_secgroup(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        existing = self._found_before_create(res, plan)
        if existing is None:
            started = time.monotonic()
            sg = self._call("create security group", lambda: self.conn.network.create_security_group(
                name=res.name, description=_description(plan.deployment)))
            # Neutron does not keep names unique: a concurrent run (other state, other machine) may have made
            # one too. Both keep the same; the one that lost deletes its own.
            survivor = converge_created(
                sg, time.monotonic() - started, lambda: self._secgroups_named(res, plan),
                lambda g: self._call("delete duplicate security group",
                                     lambda: self.conn.network.delete_security_group(g.id, ignore_missing=True)),
                ident=lambda g: g.id, rank=lambda g: self._secgroup_rank(g, res))
            if survivor.id != sg.id:
                log.info("%s: security group %s was made twice (a concurrent run); using %s", self.site.name,
                         res.name, survivor.id)
            sg_id = survivor.id
            have = _ingress_rules(survivor) if survivor.id != sg.id else set()
        else:
            sg_id = existing.cloud_id
            rules = self._call("list rules", lambda: list(
                self.conn.network.security_group_rules(security_group_id=sg_id, direction="ingress")))
            have = {(r.port_range_min, r.protocol, r.remote_ip_prefix) for r in rules}
        for rule in res.spec["rules"]:
            if (rule["port"], rule["protocol"], rule["cidr"]) in have:
                continue
            with contextlib.suppress(Conflict):  # a concurrent run opened it first
                self._call(f"open port {rule['port']}", lambda r=rule: self.conn.network.create_security_group_rule(
                    security_group_id=sg_id, direction="ingress", ethertype="IPv4", protocol=r["protocol"],
                    port_range_min=r["port"], port_range_max=r["port"], remote_ip_prefix=r["cidr"]))
        return Found("secgroup", sg_id, res.name)

    def _create_network(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        existing = self._find_network(res, plan)
        if existing is not None:
            return existing
        net = self._call(f"create network {res.name}", lambda: self.conn.network.create_network(
            name=res.name, description=_description(plan.deployment),
            port_security_enabled=res.spec["port_security"]))
        return Found("network", net.id, res.name)

    def _create_subnet(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        existing = self._find_subnet(res, plan)
        if existing is not None:
            return existing
        spec = res.spec
        subnet = self._call(f"create subnet {res.name}", lambda: self.conn.network.create_subnet(
            name=res.name, description=_description(plan.deployment), network_id=deps[spec["network"]].cloud_id,
            ip_version=4, cidr=spec["cidr"], gateway_ip=spec["gateway_ip"], enable_dhcp=True,
            allocation_pools=spec["allocation_pools"]))
        return Found("subnet", subnet.id, res.name, attrs={"network_id": subnet.network_id, "cidr": subnet.cidr})

    def _create_router(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        mine = self._owned_named("routers", self.conn.network.routers, res.name, plan)
        gateway = {"network_id": self._public_network().id}
        if mine:
            router = mine[0]
            if not router.external_gateway_info:
                router = self._call("set router gateway", lambda: self.conn.network.update_router(
                    router, external_gateway_info=gateway))
        else:
            router = self._call(f"create router {res.name}", lambda: self.conn.network.create_router(
                name=res.name, description=_description(plan.deployment), external_gateway_info=gateway))
        subnet_id = deps[res.spec["subnet"]].cloud_id
        ports = self._call("list router ports", lambda: list(self.conn.network.ports(device_id=router.id)))
        if not any(ip.get("subnet_id") == subnet_id for p in ports for ip in p.fixed_ips or []):
            self._call("add router interface", lambda: self.conn.network.add_interface_to_router(
                router, subnet=subnet_id))
        return Found("router", router.id, res.name)

    def _create_volume(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        existing = self._find_volume(res, plan)
        if existing is not None and existing.status != "error":
            return existing
        metadata = {**plan.tags, VOLUME_NAME: res.spec["volume"], VOLUME_KEEP: "true" if res.spec["keep"] else "false"}
        vol = self._call(f"create volume {res.name}", lambda: self.conn.block_storage.create_volume(
            size=res.spec["size_gb"], name=res.name, metadata=metadata,
            description=_description(plan.deployment)))
        return self._volume_found(vol)

    def _create_volume_attachment(self, res: Resource, plan: Plan, deps: Mapping[str, Found],
                                  _c: str | None) -> Found:
        vol_found = deps[res.spec["volume"]]
        server_id = deps[res.spec["server"]].cloud_id
        vol = self._call("get volume", lambda: self.conn.block_storage.get_volume(vol_found.cloud_id))
        for a in vol.attachments or []:
            if a.get("server_id") == server_id:
                return self._attachment_found(res.name, server_id, self._volume_found(vol), a.get("device"))
        for a in vol.attachments or []:
            # Attached to a server of an earlier `up` that is still going away: detach it from that one first.
            self._call("detach volume from old server", lambda a=a: self.conn.compute.delete_volume_attachment(
                a["server_id"], vol.id, ignore_missing=True))
        if vol.attachments:
            self._wait_volume(vol.id, lambda v: not v.attachments and v.status == "available")
        att = self._call(f"attach volume {res.name}", lambda: self.conn.compute.create_volume_attachment(
            server_id, vol.id))
        found = self._attachment_found(res.name, server_id, self._volume_found(vol), att.device)
        found.status = "pending"  # until Cinder says in-use
        return found

    def _create_bucket(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        meta = self._container_meta(res.name)
        if meta is not None and meta.get(CONTAINER_DEPLOYMENT) not in (None, plan.deployment):
            raise CloudError(f"{self.site.name}: object-store container '{res.name}' belongs to another deployment")
        metadata = {CONTAINER_DEPLOYMENT: plan.deployment, CONTAINER_KEEP: "true" if res.spec["keep"] else "false"}
        self._call(f"create container {res.name}", lambda: self.conn.object_store.create_container(
            name=res.name, metadata=metadata))
        return Found("bucket", res.name, res.name, attrs={"key": res.key, "keep": bool(res.spec["keep"])})

    def _create_reservation(self, res: Resource, plan: Plan, deps: Mapping[str, Found],
                            candidate: str | None) -> Found:
        spec = res.spec
        count = spec["count"]
        if spec["kind"] == "host":
            reservation = {
                "resource_type": "physical:host",
                "resource_properties": json.dumps(["==", "$node_type", candidate]),
                "hypervisor_properties": "",
                "min": count,
                "max": count,
            }
        else:
            flavor = self._find_one(f"flavor:{candidate}", f"find flavor {candidate}",
                                    lambda: self.conn.compute.find_flavor(candidate, ignore_missing=True))
            if flavor is None:
                raise UserError(f"{self.site.name}: flavor '{candidate}' does not exist at this site")
            reservation = {"resource_type": "flavor:instance", "flavor_id": flavor.id, "amount": count}
        end = datetime.now(UTC) + timedelta(hours=spec["hours"])

        def create() -> Found:
            lease = self._call(f"create lease {res.name} ({candidate})", lambda: self.blazar.lease.create(
                name=res.name, start="now", end=end.strftime(_BLAZAR_DATE), reservations=[reservation],
                events=[]))
            found = self._lease_found(lease, res)
            found.attrs["node_type"] = candidate
            return found

        # Lease names are unique in a project: a taken name is a concurrent run's lease (or a lost answer's).
        return create_or_adopt(create, lambda: self._find_reservation(res, plan))

    def _create_server(self, res: Resource, plan: Plan, deps: Mapping[str, Found],
                       candidate: str | None) -> Found:
        spec = res.spec
        image = self._cache.get(f"image:{spec['image']}") or self._call(
            "find image", lambda: self.conn.image.find_image(spec["image"]))
        if image is None:
            raise UserError(f"{self.site.name}: image '{spec['image']}' not found at this site")
        hints: dict[str, str] = {}
        if spec.get("reservation"):
            lease = deps[spec["reservation"]]
            if self.site.reservation == "flavor":
                flavor_name = f"reservation:{lease.attrs['reservation_id']}"
            else:
                flavor_name = "baremetal"
                hints["reservation"] = lease.attrs["reservation_id"]
        else:
            flavor_name = candidate or spec["candidates"][0]
        flavor = self._find_one(f"flavor:{flavor_name}", f"find flavor {flavor_name}",
                                lambda: self.conn.compute.find_flavor(flavor_name, ignore_missing=True))
        if flavor is None:
            raise CloudError(f"{self.site.name}: flavor '{flavor_name}' not found")
        metadata = {**plan.tags, naming.TAG_NODE: spec["node"]}
        nics: list[dict[str, str]] = [{"uuid": self._network().id}]
        for net in spec.get("networks") or []:
            nics.append({"port": self._ensure_port(spec["node"], net, deps, plan)})
        kwargs: dict[str, Any] = dict(
            name=res.name, image_id=image.id, flavor_id=flavor.id, key_name=deps["keypair"].name,
            networks=nics, metadata=metadata,
        )
        if hints:
            kwargs["scheduler_hints"] = hints
        if "secgroup" in deps:
            # By id: Neutron names are not unique (a concurrent run may have made a twin for a moment).
            kwargs["security_groups"] = [{"name": deps["secgroup"].cloud_id}]
        server = self._call(f"launch {spec['node']}", lambda: self.conn.compute.create_server(**kwargs))
        return Found("server", server.id, res.name, status="pending", attrs={"node": spec["node"]})

    def _ensure_port(self, node: str, net: Mapping[str, Any], deps: Mapping[str, Found], plan: Plan) -> str:
        """The node's port on a private network: the one an earlier (crashed) run made, else a new one."""
        network_id = deps[net["network"]].cloud_id
        subnet_id = deps[net["subnet"]].cloud_id
        ports = self._call("list ports", lambda: list(self.conn.network.ports(
            name=net["port_name"], network_id=network_id)))
        mine = [p for p in ports if _deployment_of(p.description) == plan.deployment]
        mine.sort(key=lambda p: bool(p.device_id))  # an unbound one first
        if mine and not mine[0].device_id:
            for extra in mine[1:]:
                if not extra.device_id:
                    self._call("delete extra port", lambda e=extra: self.conn.network.delete_port(
                        e.id, ignore_missing=True))
            return mine[0].id
        fixed: dict[str, str] = {"subnet_id": subnet_id}
        if net.get("fixed_ip"):
            fixed["ip_address"] = net["fixed_ip"]
        kwargs: dict[str, Any] = dict(
            network_id=network_id, name=net["port_name"], description=_description(plan.deployment, node),
            fixed_ips=[fixed])
        if not net.get("port_security", True):
            kwargs["port_security_enabled"] = False
        port = self._call(f"create port for {node}", lambda: self.conn.network.create_port(**kwargs))
        return port.id

    def _create_floating_ip(self, res: Resource, plan: Plan, deps: Mapping[str, Found],
                            _c: str | None) -> Found:
        node = res.spec["node"]
        server = deps[res.spec["server"]]
        found = self._found_before_create(res, plan)
        ports = self._call(f"find port of {node}", lambda: list(self.conn.network.ports(
            device_id=server.cloud_id, network_id=self._network().id)))
        if not ports:
            raise CloudError(f"{self.site.name}: server of {node} has no port to attach a floating IP to")
        if found is None:  # allocated and attached in one request
            def allocate() -> Found:
                ip = self._call(f"allocate floating IP for {node}", lambda: self.conn.network.create_ip(
                    floating_network_id=self._public_network().id,
                    description=_description(plan.deployment, node), port_id=ports[0].id))
                return Found("floating_ip", ip.id, res.name, attrs={"floating_ip": ip.floating_ip_address})

            # The port holds one floating IP: a 409 means a concurrent run attached its own first. Use that one.
            found = create_or_adopt(allocate, lambda: self._find_floating_ip(res, plan))
        if found.attrs.get("port_id", ports[0].id) != ports[0].id:  # found unattached (or elsewhere): attach it
            self._call(f"attach floating IP to {node}",
                       lambda: self.conn.network.update_ip(found.cloud_id, port_id=ports[0].id))
        found.status = "ready"
        found.attrs["port_id"] = ports[0].id
        return found

    # -- wait -------------------------------------------------------------------------------------
    def wait(self, items: Sequence[tuple[Resource, Found]], plan: Plan, timeout: float,
             on_progress: ProgressFn) -> list[Found]:
        results = {res.key: found for res, found in items}
        missing: dict[str, int] = {}  # a list shared across threads may predate a create: allow a few misses
        deadline = time.monotonic() + timeout
        while True:
            pending = [(r, results[r.key]) for r, _ in items if results[r.key].status == "pending"]
            if not pending:
                return [results[r.key] for r, _ in items]
            kinds = {r.kind for r, _ in pending}
            if "reservation" in kinds:
                leases = {lease["id"]: lease for lease in self._polled_leases()}
                for r, f in pending:
                    if r.kind == "reservation":
                        lease = leases.get(f.cloud_id)
                        if lease:
                            results[r.key] = self._lease_found(lease, r, f)
                        elif self._gone(missing, r.key):
                            results[r.key] = Found("reservation", f.cloud_id, r.name, status="error",
                                                   error="lease disappeared")
                        on_progress(r.key, "lease " + results[r.key].attrs.get("lease_status", "?").lower(), "")
            if "server" in kinds:
                servers = {s.id: s for s in self._polled_servers(plan)}
                for r, f in pending:
                    if r.kind == "server":
                        server = servers.get(f.cloud_id)
                        if server:
                            results[r.key] = self._server_found(server)
                        elif self._gone(missing, r.key):
                            results[r.key] = Found("server", f.cloud_id, r.name, status="error",
                                                   error="server disappeared")
                        stage = {"pending": "building", "ready": "booted", "error": "error"}[results[r.key].status]
                        on_progress(r.spec["node"], stage, results[r.key].error or "")
            if kinds & {"volume", "volume_attachment"}:
                for r, f in pending:
                    if r.kind not in ("volume", "volume_attachment"):
                        continue
                    vol_id = f.attrs.get("volume_id") or f.cloud_id
                    vol = self._call("get volume", lambda v=vol_id: self.conn.block_storage.get_volume(v))
                    if r.kind == "volume":
                        results[r.key] = self._volume_found(vol)
                    else:
                        attached = [a for a in vol.attachments or [] if a.get("server_id") == f.attrs["server_id"]]
                        if vol.status == "in-use" and attached:
                            f.status = "ready"
                            f.attrs["device"] = attached[0].get("device") or f.attrs.get("device")
                        elif vol.status in ("error", "error_attaching") or (vol.status == "available"
                                                                              and f.attrs.get("polled")):
                            f.status, f.error = "error", f"volume {vol.id} did not attach (status {vol.status})"
                        f.attrs["polled"] = True
                    on_progress(r.key, results[r.key].attrs.get("volume_status", "attaching"), "")
            if time.monotonic() > deadline:
                for r, _ in pending:
                    if results[r.key].status == "pending":
                        results[r.key].status = "error"
                        results[r.key].error = f"still not ready after {timeout:.0f}s"
                return [results[r.key] for r, _ in items]
            time.sleep(self.poll_interval)

    @staticmethod
    def _gone(missing: dict[str, int], key: str, rounds: int = 5) -> bool:
        missing[key] = missing.get(key, 0) + 1
        return missing[key] >= rounds

    # -- delete -----------------------------------------------------------------------------------
    def delete(self, kind: str, found: Sequence[Found], plan: Plan) -> None:
        try:
            self._delete(kind, found, plan)
        finally:
            self._deleted_at[plan.deployment] = time.monotonic()  # its next list_owned must be fresh

    def _delete(self, kind: str, found: Sequence[Found], plan: Plan) -> None:
        if not found:
            return
        if kind == "floating_ip":
            for f in found:
                self._call("release floating IP", lambda f=f: self.conn.network.delete_ip(f.cloud_id,
                                                                                          ignore_missing=True))
        elif kind == "server":
            for f in found:
                self._call("delete server", lambda f=f: self.conn.compute.delete_server(f.cloud_id,
                                                                                        ignore_missing=True))
            self._wait_gone({f.cloud_id for f in found}, plan)
        elif kind == "reservation":
            for f in found:
                self._call("delete lease", lambda f=f: self._delete_lease(f.cloud_id))
        elif kind == "volume_attachment":
            for f in found:
                server_id, _, vol_id = f.cloud_id.partition("/")
                self._call("detach volume", lambda s=server_id, v=vol_id: self._detach(s, v))
            for f in found:
                server_id, _, vol_id = f.cloud_id.partition("/")
                self._wait_volume(vol_id, lambda v, s=server_id: v is None or not any(
                    a.get("server_id") == s for a in v.attachments or []))
        elif kind == "volume":
            for f in found:
                self._wait_volume(f.cloud_id, lambda v: v is None or v.status not in VOLUME_BUSY)
                self._call("delete volume", lambda f=f: self.conn.block_storage.delete_volume(
                    f.cloud_id, ignore_missing=True))
            for f in found:
                self._wait_volume(f.cloud_id, lambda v: v is None)
        elif kind == "bucket":
            for f in found:
                self._call("delete container", lambda f=f: self._delete_container(f.cloud_id))
        elif kind == "port":
            for f in found:
                self._call("delete port", lambda f=f: self.conn.network.delete_port(f.cloud_id,
                                                                                    ignore_missing=True))
        elif kind == "router":
            for f in found:
                ports = self._call("list router ports", lambda f=f: list(self.conn.network.ports(
                    device_id=f.cloud_id, device_owner="network:router_interface")))
                for p in ports:
                    for ip in p.fixed_ips or []:
                        self._call("remove router interface", lambda ip=ip, f=f: self._remove_interface(
                            f.cloud_id, ip["subnet_id"]))
                self._call("delete router", lambda f=f: self.conn.network.delete_router(
                    f.cloud_id, ignore_missing=True))
        elif kind == "subnet":
            for f in found:
                self._call("delete subnet", lambda f=f: self.conn.network.delete_subnet(
                    f.cloud_id, ignore_missing=True))
        elif kind == "network":
            for f in found:
                self._call("delete network", lambda f=f: self.conn.network.delete_network(
                    f.cloud_id, ignore_missing=True))
        elif kind == "secgroup":
            for f in found:
                self._call("delete security group", lambda f=f: self.conn.network.delete_security_group(
                    f.cloud_id, ignore_missing=True))
        elif kind == "keypair":
            for f in found:
                self._call("delete keypair", lambda f=f: self.conn.compute.delete_keypair(
                    f.name, ignore_missing=True))

    def _detach(self, server_id: str, volume_id: str) -> None:
        import contextlib

        from openstack import exceptions as os_exc

        with contextlib.suppress(os_exc.NotFoundException):  # the server or the attachment is gone already
            self.conn.compute.delete_volume_attachment(server_id, volume_id, ignore_missing=True)

    def _delete_container(self, name: str) -> None:
        import contextlib

        from openstack import exceptions as os_exc

        with contextlib.suppress(os_exc.NotFoundException):
            for obj in list(self.conn.object_store.objects(name)):
                self.conn.object_store.delete_object(obj, container=name, ignore_missing=True)
            self.conn.object_store.delete_container(name, ignore_missing=True)

    def _container_meta(self, name: str) -> dict[str, str] | None:
        """A container's labctl metadata ({} if none), or None if there is no such container."""
        from openstack import exceptions as os_exc

        def head() -> dict[str, str] | None:
            try:
                c = self.conn.object_store.get_container_metadata(name)
            except os_exc.NotFoundException:
                return None
            return {str(k).lower(): str(v) for k, v in (c.metadata or {}).items()}

        return self._call(f"get container {name}", head)

    def _get_volume(self, volume_id: str) -> Any:
        from openstack import exceptions as os_exc

        try:
            vol = self.conn.block_storage.get_volume(volume_id)
        except os_exc.NotFoundException:
            return None
        return None if vol.status in ("deleted",) else vol

    def _wait_volume(self, volume_id: str, done: Callable[[Any], bool], timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            vol = self._call("get volume", lambda: self._get_volume(volume_id))
            if done(vol):
                return
            if vol is not None and vol.status in ("error_deleting", "error_detaching"):
                raise CloudError(f"{self.site.name}: volume {volume_id} is in {vol.status}")
            if time.monotonic() > deadline:
                raise CloudError(f"{self.site.name}: volume {volume_id} still {vol.status if vol else '?'} "
                                 f"after {timeout:.0f}s")
            time.sleep(self.poll_interval)

    def _volume_found(self, vol: Any) -> Found:
        meta = vol.metadata or {}
        status = {"available": "ready", "in-use": "ready", "error": "error"}.get(vol.status, "pending")
        name = meta.get(VOLUME_NAME)
        return Found("volume", vol.id, vol.name or "", status=status,
                     error=f"volume went to {vol.status}" if status == "error" else None,
                     attrs={"size_gb": vol.size, "volume_status": vol.status, "keep": meta.get(VOLUME_KEEP) == "true",
                            **({"key": f"volume:{name}"} if name else {}),
                            "attachments": [{"server_id": a.get("server_id"), "device": a.get("device")}
                                            for a in vol.attachments or []]})

    @staticmethod
    def _attachment_found(name: str, server_id: str, vol: Found, device: str | None) -> Found:
        return Found("volume_attachment", f"{server_id}/{vol.cloud_id}", name,
                     attrs={"server_id": server_id, "volume_id": vol.cloud_id, "device": device})

    def _remove_interface(self, router_id: str, subnet_id: str) -> None:
        import contextlib

        from openstack import exceptions as os_exc

        with contextlib.suppress(os_exc.NotFoundException):  # already gone
            self.conn.network.remove_interface_from_router(router_id, subnet=subnet_id)

    def _delete_lease(self, lease_id: str) -> None:
        from blazarclient import exception as bz_exc

        try:
            self.blazar.lease.delete(lease_id)
        except bz_exc.BlazarClientException as exc:
            if getattr(exc, "code", None) != 404:
                raise

    def _wait_gone(self, ids: set[str], plan: Plan, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = {s.id for s in self._polled_servers(plan)} & ids
            if not left:
                return
            if time.monotonic() > deadline:
                raise CloudError(f"{self.site.name}: servers {sorted(left)} still exist after delete")
            time.sleep(self.poll_interval)

    # -- inventory --------------------------------------------------------------------------------
    def _project_list(self, what: str, fetch: Callable[[], Any], plan: Plan) -> Any:
        """Everything of one kind in the project, from a list shared with other deployments' teardowns."""
        snap = self._owned_lists.setdefault(what, Snapshot(max(self.poll_interval, 1.0)))
        return snap.get(lambda: self._call(f"list {what}", fetch),
                        newer_than=self._deleted_at.get(plan.deployment, -1e18))

    def list_owned(self, plan: Plan) -> list[Found]:
        owned: list[Found] = []
        for s in self._servers_named(f"^{re.escape(plan.deployment)}-", plan):
            owned.append(self._server_found(s))
        for ip in self._project_list("floating IPs", lambda: list(self.conn.network.ips()), plan):
            if _deployment_of(ip.description) == plan.deployment:
                owned.append(Found("floating_ip", ip.id, ip.description or "",
                                   attrs={"floating_ip": ip.floating_ip_address}))
        lease_names = {r.name for r in plan.by_kind("reservation")}
        for lease in self._project_list("leases", lambda: self.blazar.lease.list(), plan):
            if lease["name"] in lease_names and lease["status"] not in LEASE_DONE:
                owned.append(Found("reservation", lease["id"], lease["name"]))
        for sg in self._call("list security groups",
                             lambda: list(self.conn.network.security_groups(name=plan.deployment))):
            if _deployment_of(sg.description) == plan.deployment:
                owned.append(Found("secgroup", sg.id, sg.name))
        # Private networks and the ports made for servers on them: matched by the deployment in the
        # description (one list call per kind; the ports Nova makes on sharednet1 have no description).
        for kind, lister in (("port", self.conn.network.ports), ("router", self.conn.network.routers),
                             ("subnet", self.conn.network.subnets), ("network", self.conn.network.networks)):
            for item in self._project_list(f"{kind}s", lambda lister=lister: list(lister()), plan):
                if _deployment_of(item.description) == plan.deployment:
                    owned.append(Found(kind, item.id, item.name or ""))
        kp = self._get_keypair(plan.deployment)
        if kp is not None:
            owned.append(Found("keypair", kp.name, kp.name))
        # Volumes (and their attachments) and containers: only asked for when the deployment has some, so that
        # labs without storage cost no extra calls (and sites without the service are never asked).
        if self.site.block_storage and (plan.by_kind("volume") or plan.by_kind("volume_attachment")):
            for vol in self._call("list volumes", lambda: list(self.conn.block_storage.volumes(details=True))):
                if (vol.metadata or {}).get(naming.TAG_DEPLOYMENT) != plan.deployment or vol.status in VOLUME_GONE:
                    continue
                found = self._volume_found(vol)
                owned.append(found)
                for a in found.attrs["attachments"]:
                    owned.append(self._attachment_found(f"{vol.name}-attachment", a["server_id"], found, a["device"]))
        if self.site.object_storage and plan.by_kind("bucket"):
            for c in self._call("list containers", lambda: list(self.conn.object_store.containers(
                    prefix=f"{plan.deployment}-"))):
                meta = self._container_meta(c.name)
                if meta is not None and meta.get(CONTAINER_DEPLOYMENT) == plan.deployment:
                    owned.append(Found("bucket", c.name, c.name, attrs={"keep": meta.get(CONTAINER_KEEP) == "true"}))
        return owned

    def extend(self, found: Found, hours: float, plan: Plan) -> Found:
        lease = self._call("get lease", lambda: self.blazar.lease.get(found.cloud_id))
        end = _parse_lease_date(lease["end_date"]) + timedelta(hours=hours)
        lease = self._call("extend lease", lambda: self.blazar.lease.update(
            found.cloud_id, end_date=end.strftime(_BLAZAR_DATE)))
        found.attrs["end"] = _parse_lease_date(lease["end_date"]).isoformat()
        return found

    # -- helpers ----------------------------------------------------------------------------------
    def _polled_servers(self, plan: Plan) -> list[Any]:
        """This deployment's servers, from the poll round's one list of every labctl server on the site."""
        servers = self._server_list.get(lambda: self._call("poll servers", lambda: list(
            self.conn.compute.servers(details=True, name=f"^{naming.PREFIX}-"))))
        return [s for s in servers if (s.metadata or {}).get(naming.TAG_DEPLOYMENT) == plan.deployment]

    def _polled_leases(self) -> list[Any]:
        return self._lease_list.get(lambda: self._call("poll leases", lambda: self.blazar.lease.list()))

    def _servers_named(self, pattern: str, plan: Plan) -> list[Any]:
        servers = self._call("list servers", lambda: list(self.conn.compute.servers(details=True, name=pattern)))
        return [s for s in servers if (s.metadata or {}).get(naming.TAG_DEPLOYMENT) == plan.deployment]

    def _server_found(self, server: Any) -> Found:
        fixed, floating = None, None
        addresses = dict(server.addresses or {})
        private = {net: a.get("addr") for net, addrs in addresses.items() if net != self.site.network
                   for a in addrs if a.get("OS-EXT-IPS:type") != "floating"}
        ordered = sorted(addresses.items(), key=lambda kv: kv[0] != self.site.network)  # the site network first
        for _net, addrs in ordered:
            for a in addrs:
                if a.get("OS-EXT-IPS:type") == "floating":
                    floating = a.get("addr")
                elif fixed is None:
                    fixed = a.get("addr")
        status = {"ACTIVE": "ready", "ERROR": "error"}.get(server.status, "pending")
        error = None
        if status == "error":
            fault = server.fault or {}
            error = fault.get("message") if isinstance(fault, dict) else str(fault)
            error = clean(error, one_line=True) if error else "server went to ERROR"
        return Found("server", server.id, server.name, status=status, error=error, attrs={
            "node": (server.metadata or {}).get(naming.TAG_NODE), "fixed_ip": fixed, "floating_ip": floating,
            "server_status": server.status, **({"private_ips": private} if private else {})})

    def _lease_found(self, lease: Mapping[str, Any], res: Resource, previous: Found | None = None) -> Found:
        status = lease["status"]
        reservations = lease.get("reservations") or []
        rid = reservations[0]["id"] if reservations else None
        attrs = dict(previous.attrs) if previous else {}
        attrs.update(lease_status=status, reservation_id=rid, end=_parse_lease_date(lease["end_date"]).isoformat())
        if reservations and reservations[0].get("resource_properties"):
            m = re.search(r'"\$node_type",\s*"([^"]+)"', reservations[0]["resource_properties"])
            if m:
                attrs["node_type"] = m.group(1)
        if status == "ACTIVE":
            return Found("reservation", lease["id"], lease["name"], attrs=attrs)
        if status == "ERROR":
            reason = (lease.get("degraded") and "degraded") or "lease went to ERROR (not enough hosts?)"
            return Found("reservation", lease["id"], lease["name"], status="error", attrs=attrs, error=reason)
        return Found("reservation", lease["id"], lease["name"], status="pending", attrs=attrs)


def _ingress_rules(sg: Any) -> set[tuple[Any, Any, Any]]:
    return {(r.get("port_range_min"), r.get("protocol"), r.get("remote_ip_prefix"))
            for r in sg.security_group_rules or [] if r.get("direction") == "ingress"}


def _has_rules(sg: Any, res: Resource) -> bool:
    want = {(r["port"], r["protocol"], r["cidr"]) for r in res.spec.get("rules") or []}
    return want <= _ingress_rules(sg)


def _description(deployment: str, node: str | None = None) -> str:
    text = f"{naming.TAG_DEPLOYMENT}={deployment}"
    return f"{text} {naming.TAG_NODE}={node}" if node else text


def _subnet_name_of(res: Resource) -> str:
    """The subnet a router resource attaches to, by its deterministic name (<deployment>-<net>-subnet)."""
    return res.name[: -len("-router")] + "-subnet" if res.name.endswith("-router") else res.name


def _deployment_of(description: str | None) -> str | None:
    m = re.search(rf"{re.escape(naming.TAG_DEPLOYMENT)}=(\S+)", description or "")
    return m.group(1) if m else None


def _parse_lease_date(text: str) -> datetime:
    for fmt in ("%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    raise CloudError(f"unexpected lease date format: {text!r}")


def _error_text(exc: Exception) -> str:
    details = getattr(exc, "details", None)
    text = str(details or exc) or type(exc).__name__
    return text.replace("ERROR: ", "").strip().splitlines()[0][:300]
