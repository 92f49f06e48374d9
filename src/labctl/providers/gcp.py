"""Google Compute Engine adapter (google-cloud-compute over REST, Application Default Credentials).

How labctl's plan maps onto Compute Engine:
- `keypair`: GCP has no key pairs. The public key goes into each instance's `ssh-keys` metadata as
  `<site.ssh_user>:<key>`; the keypair resource is a Found that only carries the key.
- `secgroup`: a VPC firewall rule named after the deployment (one more per extra source range), with
  `targetTags=[<deployment>]`; instances carry that network tag. Firewalls have no labels: the deployment id
  is in the name and the description (`labctl:deployment=<id>`).
- `server`: `instances.insert` with labels `labctl-deployment`, `labctl-lab`, `labctl-owner`, `labctl-node`
  (label keys cannot contain ':'), the candidate machine type (`n1-standard-4+t4` = n1-standard-4 with one
  nvidia-tesla-t4), `onHostMaintenance=TERMINATE` for GPU machines, a boot disk from the image family that
  the abstract image name maps to, and an external IP (ephemeral, or the node's static address if one is
  reserved). Every insert carries a `requestId` derived from deployment, node, type, zone and attempt, so an
  insert that is retried after a timeout returns the first operation instead of making a second instance.
- `floating_ip`: a static regional address named after the node and labelled; the instance's ephemeral
  address is promoted in place (same IP), or the address is put into the instance's access config.
- `network` / `subnet`: a custom-mode VPC network (`autoCreateSubnetworks: false`) and one subnetwork in the
  site's region (`ipCidrRange` = the profile's cidr; Compute Engine sets the gateway to its first host). Networks
  and subnetworks have no labels: the deployment id is in the description, as for firewalls. A node on the
  network has its one interface there, with `networkIP` = its fixed IP, and keeps an ephemeral external address
  (outbound traffic, as on Chameleon's shared network); `attrs["private_ips"]` = {network name: networkIP}.
- `router`: nothing to make (a VPC network has a default route to the internet); a ready Found, delete is a no-op.
- `secgroup` with private networks: the firewalls go on the deployment's network, plus one per network without
  port security allowing every protocol from its CIDR to the deployment's instances (nodes talk freely).
- `volume`: a pd-balanced zonal disk in its server's zone (at least 10 GB: Compute Engine's minimum), labelled
  like instances plus `labctl-keep` and `labctl-volume`; a kept disk of an earlier `up` is found by name and
  labels and reused (on a region site the server is then launched in the disk's zone). `volume_attachment`:
  `instances.attachDisk` with deviceName = the disk's name, seen in the guest as /dev/disk/by-id/google-<name>.
- Zones: `gcp:<zone>` uses that zone only; `gcp:<region>` tries the region's zones that offer the type, in
  order, moving on when one answers ZONE_RESOURCE_POOL_EXHAUSTED, and raises NoCapacity when none has room
  (the engine then tries the next type). Regional quota errors are the same in every zone: a quota on a
  type-specific metric (NVIDIA_T4_GPUS, A2_CPUS...) raises NoCapacity at once (another type may have quota),
  any other (CPUS, IN_USE_ADDRESSES...) raises QuotaExceeded.
- `wait` polls with one `instances.list` (one zone) or `instances.aggregatedList` (several zones) per round,
  filtered by the deployment label. Operations are waited with the operations clients built on the same
  endpoint (`ExtendedOperation.result()` would poll the default Google host).

`google.cloud.compute_v1` takes seconds to import: it is imported only inside methods.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from labctl import hardware, naming
from labctl.errors import (
    CloudError,
    Conflict,
    CredentialsError,
    LabctlError,
    NoCapacity,
    QuotaExceeded,
    RateLimited,
    Transient,
    UserError,
)
from labctl.providers.base import Found, ProgressFn, create_or_adopt, scrub
from labctl.redact import clean

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource
    from labctl.sites import Site

T = TypeVar("T")
log = logging.getLogger(__name__)

COMPUTE_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
NO_CREDENTIALS = ("no Google credentials: run 'gcloud auth application-default login' "
                  "or set GOOGLE_APPLICATION_CREDENTIALS")
NO_PROJECT = ("no Google Cloud project: set GOOGLE_CLOUD_PROJECT (or run 'gcloud config set project "
              "PROJECT'), or pass the project as the cloud name")

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
CAPACITY_CODES = ("ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
                  "RESOURCE_POOL_EXHAUSTED")
_CAPACITY_TEXT = re.compile(r"RESOURCE_POOL_EXHAUSTED|does not have enough resources", re.I)
_NOT_OFFERED = re.compile(r"does not exist in zone|not (?:available|supported) in (?:the )?zone", re.I)
_REQUEST_NS = uuid.UUID("6f1d7c52-3f0e-5b7a-9c1e-4a2b8d0e6c31")
NAT_NAME = "External NAT"
MAX_REPLAYS = 4
KEEP_LABEL = "labctl-keep"  # a disk's label: "true" when `down` keeps it (Chameleon's `labctl:keep` metadata)
VOLUME_LABEL = "labctl-volume"  # a disk's label: the profile's name for the volume
DISK_TYPE = "pd-balanced"
MIN_DISK_GB = 10  # persistent disks cannot be smaller
DEVICE_PREFIX = "/dev/disk/by-id/google-"
IN_USE_GRACE = 180.0  # seconds a delete keeps trying while its resource is in use (by something going away)
_IN_USE = re.compile(r"already being used by|RESOURCE_IN_USE_BY_ANOTHER_RESOURCE|resourceInUseByAnotherResource")


def connect(site: Site, *, cloud: str | None = None, testbed: Callable[[], Any] | None = None) -> GcpProvider:
    """Application Default Credentials and a project (`cloud`, GOOGLE_CLOUD_PROJECT, CLOUDSDK_CORE_PROJECT or
    ADC's), or the emulated Compute Engine of the testbed for `sim-gcp`."""
    if site.emulated:
        if testbed is None:
            raise UserError(f"{site.name} is emulated but no testbed was given")
        tb = testbed()
        emu = tb.gce()
        site = dataclasses.replace(site, ssh_port=getattr(tb, "ssh_port", None) or emu.world.ssh_port)
        # The emulated world's own bearer token (private to its owner; registered with labctl.redact).
        return GcpProvider(site, emu.project, credentials=emu.credentials(), endpoint=emu.endpoint)
    credentials, project = google_credentials(cloud)
    return GcpProvider(site, project, credentials=credentials)


def describe_credentials(site: Site, cloud: str | None = None) -> str:
    """One line for `labctl sites`: Application Default Credentials and project, or what is missing."""
    try:
        credentials, project = google_credentials(cloud)
    except CredentialsError as exc:
        return f"missing: {exc}"
    kind = type(credentials).__name__
    return f"found: Application Default Credentials ({kind}), project {project}"


def google_credentials(project: str | None = None) -> tuple[Any, str]:
    """(credentials, project) from Application Default Credentials; one-line CredentialsError if missing."""
    import google.auth
    from google.auth import exceptions as auth_exc

    try:
        credentials, adc_project = google.auth.default(scopes=[COMPUTE_SCOPE])
    except auth_exc.DefaultCredentialsError as exc:
        if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            raise CredentialsError(f"GOOGLE_APPLICATION_CREDENTIALS: {_first_line(exc)}") from None
        raise CredentialsError(NO_CREDENTIALS) from None
    except auth_exc.GoogleAuthError as exc:
        raise CredentialsError(f"Google credentials: {_first_line(exc)}") from None
    register_credentials(credentials)
    project = (project or os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("CLOUDSDK_CORE_PROJECT")
               or adc_project)
    if not project:
        raise CredentialsError(NO_PROJECT)
    return credentials, project


def register_credentials(credentials: Any) -> None:
    """Register what of Google credentials is secret (access token, refresh token, client secret) with
    `labctl.redact`, as far as it is loaded (no refresh here)."""
    from labctl.redact import register_secret

    if credentials is None:
        return
    for name in ("token", "refresh_token", "client_secret", "_refresh_token", "_client_secret"):
        value = getattr(credentials, name, None)
        if isinstance(value, str):
            register_secret(value)


class _ZoneFull(Exception):
    """This zone has no room for the type (or does not offer it): try the next zone."""


class GcpProvider:
    def __init__(self, site: Site, project: str, credentials: Any = None, endpoint: str | None = None,
                 poll_interval: float | None = None, call_retries: int = 6, call_timeout: float = 60.0,
                 op_timeout: float = 900.0) -> None:
        self.site = site
        self.project = project
        self.credentials = credentials
        self.endpoint = endpoint
        self.region = site.region
        self.poll_interval = poll_interval if poll_interval is not None else site.poll_interval
        self.call_retries = call_retries
        self.call_timeout = call_timeout
        self.op_timeout = op_timeout
        self._clients: dict[str, Any] = {}
        self._cache: dict[str, Any] = {}
        self._attempts: dict[tuple[str, str], int] = {}
        self._lock = threading.RLock()

    # -- clients ----------------------------------------------------------------------------------
    def _client(self, name: str) -> Any:
        with self._lock:
            if name not in self._clients:
                from google.cloud import compute_v1

                credentials = self.credentials
                if credentials is None:
                    from google.auth.credentials import AnonymousCredentials

                    credentials = AnonymousCredentials()
                kwargs: dict[str, Any] = {"credentials": credentials}
                if self.endpoint:
                    kwargs["client_options"] = {"api_endpoint": self.endpoint}
                self._clients[name] = getattr(compute_v1, name)(**kwargs)
            return self._clients[name]

    @property
    def instances(self) -> Any:
        return self._client("InstancesClient")

    @property
    def firewalls(self) -> Any:
        return self._client("FirewallsClient")

    @property
    def addresses(self) -> Any:
        return self._client("AddressesClient")

    @property
    def networks(self) -> Any:
        return self._client("NetworksClient")

    @property
    def subnetworks(self) -> Any:
        return self._client("SubnetworksClient")

    @property
    def disks(self) -> Any:
        return self._client("DisksClient")

    def _opts(self, timeout: float | None = None) -> dict[str, Any]:
        """Per-call options: our own timeout, and no SDK-level retry (`_call` retries, and counts)."""
        return {"timeout": timeout or self.call_timeout, "retry": None}

    def _call(self, what: str, fn: Callable[[], T], *, missing_ok: bool = False) -> T:
        """One cloud call, errors translated; rate limits and transient faults are retried.

        With missing_ok, a 404 returns None. A 409 raises `_Exists` (callers that insert handle it)."""
        from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

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
                status = _status_of(exc)
                if missing_ok and status == 404:
                    return None  # type: ignore[return-value]
                register_credentials(self.credentials)  # as they are now (a refreshed token too)
                if status == 409:
                    raise scrub(_Exists(_error_text(exc))) from exc
                raise scrub(self._translate(what, exc)) from exc

        return attempt()

    def _translate(self, what: str, exc: BaseException) -> Exception:
        if isinstance(exc, LabctlError | _Exists | _ZoneFull):
            return exc  # type: ignore[return-value]
        where = f"{self.site.name}: {what}"
        text = _error_text(exc)
        status = _status_of(exc)
        reasons = _reasons(exc)
        kind = type(exc).__name__
        module = type(exc).__module__
        if module.startswith("google.auth") and kind in ("RefreshError", "DefaultCredentialsError",
                                                          "ReauthFailError", "UserAccessTokenError"):
            return CredentialsError(f"{where}: Google credentials rejected ({text}); "
                                    "run 'gcloud auth application-default login'")
        if status == 401:
            return CredentialsError(f"{where}: Google credentials rejected ({text}); "
                                    "run 'gcloud auth application-default login'")
        if _CAPACITY_TEXT.search(text):
            return NoCapacity(f"{where}: {text}")
        if status == 429 or reasons & {"rateLimitExceeded", "userRateLimitExceeded", "RATE_LIMIT_EXCEEDED"}:
            return RateLimited(f"{where}: rate limited ({text})")
        if reasons & {"quotaExceeded", "QUOTA_EXCEEDED"} or re.search(r"Quota '[A-Z0-9_]+' exceeded", text):
            return QuotaExceeded(f"{where}: quota exceeded ({text})")
        if status == 403:
            return CredentialsError(f"{where}: permission denied in project {self.project} ({text})")
        if status is not None and status >= 500:
            return Transient(f"{where}: server error {status} ({text})")
        if kind in ("DeadlineExceeded", "RetryError") or isinstance(exc, TimeoutError | ConnectionError):
            return Transient(f"{where}: timed out or connection lost ({text})")
        if module.startswith(("requests", "urllib3")) or isinstance(exc, OSError):
            return Transient(f"{where}: cannot reach the API ({text})")
        if status == 404:
            return CloudError(f"{where}: not found ({text})")
        return CloudError(f"{where}: {text}")

    # -- operations -------------------------------------------------------------------------------
    def _wait_op(self, op: Any, what: str) -> Any:
        """Wait until the operation is DONE (zone, region or global), with `wait` calls on our endpoint."""
        from google.cloud import compute_v1

        done = compute_v1.Operation.Status.DONE
        deadline = time.monotonic() + self.op_timeout
        while op.status != done:
            if time.monotonic() > deadline:
                raise Transient(f"{self.site.name}: {what}: operation {op.name} not done after "
                                f"{self.op_timeout:.0f}s")
            name = op.name
            if op.zone:
                client, scope = self._client("ZoneOperationsClient"), {"zone": _last(op.zone)}
            elif op.region:
                client, scope = self._client("RegionOperationsClient"), {"region": _last(op.region)}
            else:
                client, scope = self._client("GlobalOperationsClient"), {}
            op = self._call(f"wait for {what}", lambda c=client, s=scope, n=name: c.wait(
                request={"project": self.project, "operation": n, **s}, **self._opts(max(150.0, self.call_timeout))))
        return op

    def _op_failed(self, op: Any, what: str) -> Exception | None:
        """The error of a DONE operation as a labctl error (None if it succeeded)."""
        errors = list(op.error.errors) if op.error else []
        if not errors:
            return None
        codes = [e.code for e in errors]
        text = clean("; ".join(f"{e.code}: {e.message}" for e in errors), one_line=True)[:400]
        where = f"{self.site.name}: {what}"
        if any(c in CAPACITY_CODES for c in codes):
            return NoCapacity(f"{where}: {text}")
        if "RESOURCE_ALREADY_EXISTS" in codes:  # a concurrent insert of the same name won
            return Conflict(f"{where}: {text}")
        if "QUOTA_EXCEEDED" in codes:
            return QuotaExceeded(f"{where}: {text}")
        if "RATE_LIMIT_EXCEEDED" in codes or op.http_error_status_code == 429:
            return RateLimited(f"{where}: {text}")
        if any(c in ("RESOURCE_NOT_FOUND",) for c in codes) and "delete" in (op.operation_type or ""):
            return None
        if op.http_error_status_code and op.http_error_status_code >= 500:
            return Transient(f"{where}: {text}")
        return CloudError(f"{where}: {text}")

    # -- look-ups (cached) ------------------------------------------------------------------------
    def _cached(self, key: str, fn: Callable[[], T]) -> T:
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        value = fn()
        with self._lock:
            self._cache[key] = value
        return value

    def _region_zones(self) -> list[str]:
        def load() -> list[str]:
            region = self._call(f"get region {self.region}", lambda: self._client("RegionsClient").get(
                request={"project": self.project, "region": self.region}, **self._opts()), missing_ok=True)
            if region is None:
                raise UserError(f"{self.site.name}: region '{self.region}' not found in project '{self.project}' "
                                "(check the project id, and that the Compute Engine API is enabled)")
            return sorted(_last(z) for z in region.zones)

        return self._cached("zones", load)

    def _zones(self) -> list[str]:
        return [self.site.zone] if self.site.zone else self._region_zones()

    def _zones_offering(self, candidate: str) -> list[str]:
        """Zones of the site that offer the machine type (and accelerator) of `candidate` (one aggregated
        list call each, cached)."""
        zones = self._zones()

        def load() -> list[str]:
            machine, accel, _ = parse_type(candidate)
            offered = set(zones) & self._aggregated_zones("MachineTypesClient", "machine_types", machine)
            if accel:
                offered &= self._aggregated_zones("AcceleratorTypesClient", "accelerator_types", accel)
            return [z for z in zones if z in offered]

        return self._cached(f"offered:{candidate}", load)

    def _aggregated_zones(self, client_name: str, attr: str, name: str) -> set[str]:
        client = self._client(client_name)
        pager = self._call(f"find zones offering {name}", lambda: client.aggregated_list(
            request={"project": self.project, "filter": f'name = "{name}"'}, **self._opts()))
        zones: set[str] = set()
        for scope, scoped in self._call(f"list zones offering {name}", lambda: list(pager)):
            if list(getattr(scoped, attr)):
                zones.add(scope.split("/")[-1])
        return zones

    def _image(self, abstract: str) -> Any:
        """The image (newest of its family) for an abstract image name; UserError if there is none."""
        def load() -> Any:
            if abstract in IMAGE_FAMILIES:
                project, family = IMAGE_FAMILIES[abstract]
            elif m := re.match(r"^(?:projects/)?([^/]+)/(?:global/images/)?family/([^/]+)$", abstract):
                project, family = m.groups()
            else:
                known = ", ".join(sorted(IMAGE_FAMILIES))
                raise UserError(f"{self.site.name}: no Compute Engine image for '{abstract}' (known: {known}; "
                                "or give 'PROJECT/family/FAMILY')")
            image = self._call(f"find image family {family}", lambda: self._client("ImagesClient").get_from_family(
                request={"project": project, "family": family}, **self._opts()), missing_ok=True)
            if image is None:
                raise UserError(f"{self.site.name}: image family '{family}' not found in project '{project}'")
            return image

        return self._cached(f"image:{abstract}", load)

    # -- preflight --------------------------------------------------------------------------------
    def preflight(self, plan: Plan) -> None:
        zones = self._region_zones()  # authenticates: bad credentials or project fail here
        if self.site.zone and self.site.zone not in zones:
            raise UserError(f"{self.site.name}: zone '{self.site.zone}' is not in region {self.region} "
                            f"(zones: {', '.join(zones)})")
        for image in sorted({n.image for n in plan.nodes}):
            self._image(image)
        where = self.site.zone or f"any zone of {self.region}"
        for node in plan.nodes:
            offered = [c for c in node.candidates if self._zones_offering(c)]
            if node.candidates and not offered:
                raise UserError(f"{self.site.name}: none of {', '.join(node.candidates)} (for {node.name}) is "
                                f"offered in {where}")
            for candidate in sorted(set(node.candidates) - set(offered)):
                log.warning("%s: %s is not offered in %s; %s will skip it", self.site.name, candidate, where,
                            node.name)

    # -- find -------------------------------------------------------------------------------------
    def find(self, res: Resource, plan: Plan) -> Found | None:
        finder = getattr(self, f"_find_{res.kind}", None)
        return finder(res, plan) if finder is not None else None  # kinds labctl never makes on GCP

    def _find_network(self, res: Resource, plan: Plan) -> Found | None:
        name = gce_name(res.name)
        net = self._call(f"get network {name}", lambda: self.networks.get(
            request={"project": self.project, "network": name}, **self._opts()), missing_ok=True)
        if net is None or _deployment_of(net.description) != plan.deployment:
            return None
        return _network_found(net, res.name)

    def _find_subnet(self, res: Resource, plan: Plan) -> Found | None:
        name = gce_name(res.name)
        sub = self._call(f"get subnetwork {name}", lambda: self.subnetworks.get(
            request={"project": self.project, "region": self.region, "subnetwork": name}, **self._opts()),
            missing_ok=True)
        if sub is None or _deployment_of(sub.description) != plan.deployment:
            return None
        return _subnet_found(sub, res.name)

    def _find_router(self, res: Resource, plan: Plan) -> Found | None:
        return Found("router", f"implicit/{gce_name(res.name)}", res.name, attrs={
            "note": "a VPC network routes to the internet itself (default route); nodes keep an ephemeral "
                    "external address for outbound traffic"})

    def _find_volume(self, res: Resource, plan: Plan) -> Found | None:
        name = gce_name(res.name)
        mine = [d for d in self._list_disks(f'name = "{name}"')
                if d.labels.get(_label_key(naming.TAG_DEPLOYMENT)) == _label_value(plan.deployment)
                and d.status != "DELETING"]
        if not mine:
            return None
        mine.sort(key=lambda d: {"READY": 0, "CREATING": 1}.get(d.status, 2))  # a healthy one first
        return _volume_found(mine[0])

    def _find_volume_attachment(self, res: Resource, plan: Plan) -> Found | None:
        if "volume" not in res.spec or "server" not in res.spec:
            return None  # a teardown lookup: attachments are found through list_owned
        vol = self._find_volume(plan.get(res.spec["volume"]), plan)
        server = self._find_server(plan.get(res.spec["server"]), plan)
        if vol is None or server is None:
            return None
        zone, iname = _instance_ref(server)
        if not any(u.endswith(f"zones/{zone}/instances/{iname}") for u in vol.attrs.get("users", [])):
            return None
        inst = self._get_instance(zone, iname)
        device = _device_of(inst, vol.cloud_id) if inst is not None else None
        return _attachment_found(res.name, zone, iname, vol.cloud_id, device) if device else None

    def _find_keypair(self, res: Resource, plan: Plan) -> Found | None:
        return Found("keypair", res.name, res.name, attrs={"public_key": res.spec["public_key"],
                                                           "note": "GCP has no key pairs: ssh-keys metadata"})

    def _find_secgroup(self, res: Resource, plan: Plan) -> Found | None:
        have = {fw.name: fw for fw in self._owned_firewalls(plan.deployment)}
        if not have:
            return None
        if "rules" not in res.spec:  # a teardown lookup from state records: every firewall of the deployment
            return Found("secgroup", f"global/firewalls/{min(have)}", res.name, attrs={"firewalls": sorted(have)})
        want = self._firewall_specs(res, plan)
        primary = next(iter(want))
        complete = all(name in have and _firewall_matches(have[name], spec) for name, spec in want.items())
        return Found("secgroup", f"global/firewalls/{primary}", res.name,
                     status="ready" if complete else "incomplete",
                     attrs={"firewalls": sorted(have), "tag": _tag(plan.deployment)})

    def _find_server(self, res: Resource, plan: Plan) -> Found | None:
        node = res.spec["node"]
        found = [self._server_found(i) for i in self._list_instances(plan.deployment, None, node=node)]
        if not found:
            return None
        # Prefer a healthy one if an earlier run left a broken twin; the twin is swept by `down`.
        found.sort(key=lambda f: {"ready": 0, "pending": 1}.get(f.status, 2))
        return found[0]

    def _find_floating_ip(self, res: Resource, plan: Plan) -> Found | None:
        name = gce_name(res.name)
        addr = self._call("get address", lambda: self.addresses.get(
            request={"project": self.project, "region": self.region, "address": name}, **self._opts()),
            missing_ok=True)
        if addr is None:
            return None
        status = "ready" if addr.status == "IN_USE" else "incomplete"
        return Found("floating_ip", f"regions/{self.region}/addresses/{name}", res.name, status=status,
                     attrs={"floating_ip": addr.address, "node": res.spec.get("node"),
                            "users": [_rel(u) for u in addr.users]})

    # -- create -----------------------------------------------------------------------------------
    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        creator = getattr(self, f"_create_{res.kind}", None)
        if creator is None:
            raise UserError(f"{self.site.name}: labctl does not make '{res.kind}' resources on Compute Engine "
                            f"({res.key})")
        return creator(res, plan, deps, candidate)

    def _insert(self, what: str, send: Callable[[str], Any], get: Callable[[], Any], deployment: str,
                owner: Callable[[Any], str | None]) -> Any:
        """Insert with a requestId (the same one when `_call` sends again after a lost answer, so the emulated or
        real API answers with the first operation), wait for the operation, return the object. A 409 returns the
        existing object if it is this deployment's (made by a run that crashed before recording it)."""
        rid = str(uuid.uuid4())

        def create() -> Any:
            self._check_op(self._call(what, lambda: send(rid)), what)
            return self._call(f"{what}: get", get)

        def adopt() -> Any:
            existing = self._call(f"{what}: get", get, missing_ok=True)
            if existing is None or owner(existing) != deployment:
                raise CloudError(f"{self.site.name}: {what}: the name is taken by something that is not this "
                                 "deployment's") from None
            return existing

        return create_or_adopt(create, adopt)

    def _create_network(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        from google.cloud import compute_v1

        existing = self._find_network(res, plan)
        if existing is not None:
            return existing
        name = gce_name(res.name)
        body = compute_v1.Network(name=name, auto_create_subnetworks=False, description=_description(plan.deployment),
                                  routing_config=compute_v1.NetworkRoutingConfig(routing_mode="REGIONAL"))
        net = self._insert(f"create network {name}", lambda r: self.networks.insert_unary(
            request={"project": self.project, "network_resource": body, "request_id": r}, **self._opts()),
            lambda: self.networks.get(request={"project": self.project, "network": name}, **self._opts()),
            plan.deployment, lambda n: _deployment_of(n.description))
        return _network_found(net, res.name)

    def _create_subnet(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        from google.cloud import compute_v1

        existing = self._find_subnet(res, plan)
        if existing is not None:
            return existing
        name = gce_name(res.name)
        network = _network_name(deps[res.spec["network"]])
        body = compute_v1.Subnetwork(name=name, description=_description(plan.deployment),
                                     network=f"global/networks/{network}", ip_cidr_range=res.spec["cidr"])
        sub = self._insert(f"create subnetwork {name}", lambda r: self.subnetworks.insert_unary(
            request={"project": self.project, "region": self.region, "subnetwork_resource": body, "request_id": r},
            **self._opts()), lambda: self.subnetworks.get(
            request={"project": self.project, "region": self.region, "subnetwork": name}, **self._opts()),
            plan.deployment, lambda n: _deployment_of(n.description))
        return _subnet_found(sub, res.name)

    def _create_router(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        found = self._find_router(res, plan)
        assert found is not None
        return found

    def _create_volume(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        from google.cloud import compute_v1

        spec = res.spec
        server = deps[spec["server"]]
        zone = server.attrs.get("zone") or _instance_ref(server)[0]
        name = gce_name(res.name)
        existing = self._find_volume(res, plan)
        if existing is not None and existing.status != "error":
            if existing.attrs["zone"] != zone:
                raise CloudError(f"{self.site.name}: volume {name} is in {existing.attrs['zone']}, but "
                                 f"{spec['node']} runs in {zone} (a disk cannot move zones): run 'labctl down' and "
                                 "'labctl up' again to launch the node in the disk's zone")
            return existing
        size = max(int(spec["size_gb"]), MIN_DISK_GB)
        if size != int(spec["size_gb"]):
            log.info("%s: volume %s is %d GB (Compute Engine's smallest persistent disk), not %s", self.site.name,
                     spec["volume"], size, spec["size_gb"])
        labels = {**_labels(plan, spec["node"]), KEEP_LABEL: "true" if spec.get("keep") else "false",
                  VOLUME_LABEL: _label_value(spec["volume"])}
        body = compute_v1.Disk(name=name, size_gb=size, type_=f"zones/{zone}/diskTypes/{DISK_TYPE}", labels=labels,
                               description=_description(plan.deployment, spec["node"]))
        disk = self._insert(f"create volume {name}", lambda r: self.disks.insert_unary(
            request={"project": self.project, "zone": zone, "disk_resource": body, "request_id": r}, **self._opts()),
            lambda: self.disks.get(request={"project": self.project, "zone": zone, "disk": name}, **self._opts()),
            _label_value(plan.deployment), lambda d: d.labels.get(_label_key(naming.TAG_DEPLOYMENT)))
        return _volume_found(disk)  # pending until READY: `wait` polls it

    def _create_volume_attachment(self, res: Resource, plan: Plan, deps: Mapping[str, Found],
                                  _c: str | None) -> Found:
        from google.cloud import compute_v1

        vol = deps[res.spec["volume"]]
        zone, iname = _instance_ref(deps[res.spec["server"]])
        disk_zone, disk_name = _disk_ref(vol)
        disk = self._call(f"get disk {disk_name}", lambda: self.disks.get(
            request={"project": self.project, "zone": disk_zone, "disk": disk_name}, **self._opts()))
        inst = self._call(f"get instance {iname}", lambda: self.instances.get(
            request={"project": self.project, "zone": zone, "instance": iname}, **self._opts()))
        device = _device_of(inst, vol.cloud_id)
        if device:  # attached already (a rerun)
            return _attachment_found(res.name, zone, iname, vol.cloud_id, device)
        for user in disk.users:  # still on a server of an earlier `up` that is going away: detach it there
            um = re.search(r"zones/([^/]+)/instances/([^/]+)$", user)
            if um and (um.group(1), um.group(2)) != (zone, iname):
                log.info("%s: detaching volume %s from %s first", self.site.name, disk_name, um.group(2))
                self._detach_disk(um.group(1), um.group(2), vol.cloud_id)
        body = compute_v1.AttachedDisk(source=f"zones/{disk_zone}/disks/{disk_name}", device_name=disk_name,
                                       mode="READ_WRITE", auto_delete=False, boot=False, type_="PERSISTENT")
        rid = str(uuid.uuid4())
        what = f"attach volume {disk_name} to {iname}"
        op = self._call(what, lambda: self.instances.attach_disk_unary(request={
            "project": self.project, "zone": zone, "instance": iname, "attached_disk_resource": body,
            "request_id": rid}, **self._opts()))
        self._check_op(op, what)
        return _attachment_found(res.name, zone, iname, vol.cloud_id, disk_name)

    def _create_keypair(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        found = self._find_keypair(res, plan)
        assert found is not None
        return found

    def _firewall_network(self, res: Resource, plan: Plan, deps: Mapping[str, Found] | None = None) -> str:
        """The network the deployment's firewalls belong to: its own (private) network, else the site's."""
        nets = res.spec.get("networks") or []
        if not nets:
            return self.site.network or "default"
        key = nets[0]["network"]
        if deps and key in deps:
            return _network_name(deps[key])
        return gce_name(plan.get(key).name)

    def _firewall_specs(self, res: Resource, plan: Plan,
                        deps: Mapping[str, Found] | None = None) -> dict[str, dict[str, Any]]:
        """Firewall name -> {allowed: {proto: [ports]}, ranges: [cidr], network}: one rule per source range, and one
        per private network without port security that lets every protocol in from that network's CIDR."""
        network = self._firewall_network(res, plan, deps)
        groups: dict[str, dict[str, list[str]]] = {}
        for rule in res.spec["rules"]:
            ports = groups.setdefault(rule["cidr"], {}).setdefault(rule["protocol"], [])
            if str(rule["port"]) not in ports:
                ports.append(str(rule["port"]))
        base = gce_name(plan.deployment)
        specs: dict[str, dict[str, Any]] = {}
        for i, (cidr, allowed) in enumerate(groups.items()):
            name = base if i == 0 else gce_name(f"{base}-{hashlib.sha1(cidr.encode()).hexdigest()[:6]}")
            specs[name] = {"allowed": allowed, "ranges": [cidr], "network": network}
        for net in res.spec.get("networks") or []:
            if net.get("open"):
                digest = hashlib.sha1(f"open:{net['network']}".encode()).hexdigest()[:6]
                specs[gce_name(f"{base}-{digest}")] = {"allowed": {"all": []}, "ranges": [net["cidr"]],
                                                       "network": network}
        return specs

    def _create_secgroup(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        from google.cloud import compute_v1

        want = self._firewall_specs(res, plan, deps)
        have = {fw.name: fw for fw in self._owned_firewalls(plan.deployment)}
        tag = _tag(plan.deployment)
        ops = []
        for name, spec in want.items():
            body = compute_v1.Firewall(
                name=name, network=f"global/networks/{spec['network']}", direction="INGRESS",
                priority=1000, description=_description(plan.deployment), target_tags=[tag],
                source_ranges=spec["ranges"],
                allowed=[compute_v1.Allowed(I_p_protocol=p, ports=ports) for p, ports in spec["allowed"].items()],
            )
            rid = str(uuid.uuid4())
            if name in have and _last(have[name].network) != spec["network"]:
                # a firewall's network cannot be changed: make it again on the right one
                log.info("%s: firewall %s moves to network %s", self.site.name, name, spec["network"])
                self._delete_firewalls([name])
                del have[name]
            if name not in have:
                try:
                    ops.append(self._call(f"create firewall {name}", lambda b=body, r=rid: self.firewalls.insert_unary(
                        request={"project": self.project, "firewall_resource": b, "request_id": r},
                        **self._opts())))
                except _Exists:
                    log.info("%s: firewall %s already exists", self.site.name, name)
            elif not _firewall_matches(have[name], spec):
                ops.append(self._call(f"update firewall {name}", lambda n=name, b=body, r=rid:
                                      self.firewalls.patch_unary(request={
                                          "project": self.project, "firewall": n, "firewall_resource": b,
                                          "request_id": r}, **self._opts())))
        for op in ops:
            op = self._wait_op(op, "firewall")
            if (err := self._op_failed(op, "firewall")) is not None and not isinstance(err, Conflict):
                raise err  # (a Conflict: a concurrent run of this deployment made it first)
        primary = next(iter(want))
        return Found("secgroup", f"global/firewalls/{primary}", res.name, attrs={"firewalls": sorted(want),
                                                                                 "tag": tag})

    def _create_server(self, res: Resource, plan: Plan, deps: Mapping[str, Found],
                       candidate: str | None) -> Found:
        spec = res.spec
        node = spec["node"]
        candidate = candidate or spec["candidates"][0]
        parse_type(candidate)
        image = self._image(spec["image"])
        static_ip = self._static_ip(plan, node)
        zones = self._zones_offering(candidate)
        if not zones:
            where = self.site.zone or f"any zone of {self.region}"
            raise NoCapacity(f"{self.site.name}: {candidate} is not offered in {where}")
        zones = self._zones_of_kept_disks(plan, node, candidate, zones)
        with self._lock:
            attempt = self._attempts.get((plan.deployment, node), -1) + 1
            self._attempts[(plan.deployment, node)] = attempt
        full: list[str] = []
        for zone in zones:
            try:
                found = self._insert_instance(res, plan, deps, candidate, zone, image, static_ip, attempt)
            except _ZoneFull as exc:
                full.append(zone)
                nxt = zones[zones.index(zone) + 1] if zone != zones[-1] else None
                log.info("%s: %s has no room for %s in %s (%s)%s", self.site.name, node, candidate, zone, exc,
                         f"; trying {nxt}" if nxt else "")
                continue
            if full:
                log.info("%s: %s launched in %s after %s had no %s", self.site.name, node, zone,
                         ", ".join(full), candidate)
            return found
        raise NoCapacity(f"{self.site.name}: no capacity for {candidate} in {', '.join(full)}")

    def _zones_of_kept_disks(self, plan: Plan, node: str, candidate: str, zones: list[str]) -> list[str]:
        """On a region site, a node whose volume survives from an earlier `up` must run in that disk's zone."""
        if self.site.zone or not any(v.spec.get("node") == node for v in plan.by_kind("volume")):
            return zones
        flt = (f'(labels.{_label_key(naming.TAG_DEPLOYMENT)} = "{_label_value(plan.deployment)}") '
               f'(labels.{_label_key(naming.TAG_NODE)} = "{_label_value(node)}")')
        disk_zones = {_last(d.zone) for d in self._list_disks(flt) if d.status != "DELETING"}
        if not disk_zones:
            return zones
        usable = [z for z in zones if z in disk_zones]
        if not usable:
            raise NoCapacity(f"{self.site.name}: {candidate} is not offered in {', '.join(sorted(disk_zones))}, "
                             f"where {node}'s kept volume is")
        if usable != zones:
            log.info("%s: %s launches in %s, where its kept volume is", self.site.name, node, ", ".join(usable))
        return usable

    def _static_ip(self, plan: Plan, node: str) -> str | None:
        """The node's reserved static address, if one exists and is free (else the instance gets an ephemeral)."""
        try:
            fip = plan.get(f"floating_ip:{node}")
        except KeyError:
            return None
        addr = self._call("get address", lambda: self.addresses.get(
            request={"project": self.project, "region": self.region, "address": gce_name(fip.name)},
            **self._opts()), missing_ok=True)
        return addr.address if addr is not None and addr.status == "RESERVED" else None

    def _instance_body(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str, zone: str,
                       image: Any, static_ip: str | None) -> Any:
        from google.cloud import compute_v1

        spec = res.spec
        machine, accel, count = parse_type(candidate)
        user = self.site.ssh_user
        main_key = plan.get("keypair").spec["public_key"] if _has(plan, "keypair") else None
        if "keypair" in deps:
            main_key = deps["keypair"].attrs.get("public_key") or main_key
        keys = [main_key, *spec.get("extra_keys", [])]
        ssh_keys = "\n".join(f"{user}:{k.strip()}" for k in keys if k)
        dlvm = DLVM_PROJECT in (image.self_link or "")
        metadata = [compute_v1.Items(key="ssh-keys", value=ssh_keys)]
        if dlvm:
            metadata.append(compute_v1.Items(key="install-nvidia-driver", value="True"))
        size = max(int(image.disk_size_gb or 10), BOOT_DISK_GB["dlvm" if dlvm else "default"])
        access = compute_v1.AccessConfig(name=NAT_NAME, type_="ONE_TO_ONE_NAT", network_tier="PREMIUM")
        if static_ip:
            access.nat_i_p = static_ip
        gpu = bool(accel) or machine.startswith(GPU_FAMILIES)
        body = compute_v1.Instance(
            name=gce_name(res.name),
            description=_description(plan.deployment, spec["node"]),
            machine_type=f"zones/{zone}/machineTypes/{machine}",
            labels=_labels(plan, spec["node"]),
            metadata=compute_v1.Metadata(items=metadata),
            disks=[compute_v1.AttachedDisk(
                boot=True, auto_delete=True, initialize_params=compute_v1.AttachedDiskInitializeParams(
                    source_image=image.self_link, disk_size_gb=size,
                    disk_type=f"zones/{zone}/diskTypes/pd-balanced"))],
            network_interfaces=[self._nic(spec, deps, zone, access)],
        )
        if "secgroup" in deps:
            body.tags = compute_v1.Tags(items=[deps["secgroup"].attrs.get("tag") or _tag(plan.deployment)])
        if accel:
            body.guest_accelerators = [compute_v1.AcceleratorConfig(
                accelerator_type=f"zones/{zone}/acceleratorTypes/{accel}", accelerator_count=count)]
        if gpu:
            body.scheduling = compute_v1.Scheduling(on_host_maintenance="TERMINATE", automatic_restart=True)
        return body

    def _nic(self, spec: Mapping[str, Any], deps: Mapping[str, Found], zone: str, access: Any) -> Any:
        """The instance's one interface: on the deployment's network and subnetwork at the node's fixed IP if it is
        on a private network, else on the site's network; with an external address either way."""
        from google.cloud import compute_v1

        nets = spec.get("networks") or []
        if not nets:
            return compute_v1.NetworkInterface(network=f"global/networks/{self.site.network or 'default'}",
                                               access_configs=[access])
        if len(nets) > 1:
            raise UserError(f"{self.site.name}: a Compute Engine node is on one private network here, but "
                            f"{spec['node']} asks for {len(nets)}")
        net = nets[0]
        sub = deps[net["subnet"]]
        region = sub.attrs.get("region") or self.region
        if zone.rsplit("-", 1)[0] != region:
            raise CloudError(f"{self.site.name}: zone {zone} is not in {region}, the region of subnetwork "
                             f"{_last(sub.cloud_id)}")
        nic = compute_v1.NetworkInterface(network=f"global/networks/{_network_name(deps[net['network']])}",
                                          subnetwork=f"regions/{region}/subnetworks/{_last(sub.cloud_id)}",
                                          access_configs=[access])
        if net.get("fixed_ip"):
            nic.network_i_p = net["fixed_ip"]
        return nic

    def _insert_instance(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str, zone: str,
                         image: Any, static_ip: str | None, attempt: int) -> Found:
        from google.cloud import compute_v1

        node = res.spec["node"]
        name = gce_name(res.name)
        body = self._instance_body(res, plan, deps, candidate, zone, image, static_ip)
        what = f"launch {node} ({candidate}) in {zone}"
        for _replay in range(MAX_REPLAYS):
            rid = str(uuid.uuid5(_REQUEST_NS, f"{self.project}/{plan.deployment}/{node}/{candidate}/{zone}/{attempt}"))
            sends = [0]

            def send(r: str = rid, sends: list[int] = sends) -> Any:
                sends[0] += 1
                return self.instances.insert_unary(request=compute_v1.InsertInstanceRequest(
                    project=self.project, zone=zone, instance_resource=body, request_id=r), **self._opts())

            log.debug("%s: %s (requestId %s)", self.site.name, what, rid)
            try:
                op = self._call(what, send)
            except _Exists:
                return self._adopt_instance(plan, zone, name)
            except NoCapacity as exc:
                raise _ZoneFull(str(exc)) from None
            except QuotaExceeded as exc:
                metric = (re.findall(r"Quota '([A-Z0-9_]+)' exceeded", str(exc)) or [None])[0]
                if metric and _type_specific_quota(metric):
                    raise NoCapacity(f"{self.site.name}: quota {metric} in {self.region} is used up "
                                     f"({candidate}); {exc}") from None
                raise
            except CloudError as exc:
                if _NOT_OFFERED.search(str(exc)):
                    raise _ZoneFull(f"not offered: {exc}") from None
                raise
            replay = sends[0] == 1 and op.status == compute_v1.Operation.Status.DONE
            op = self._wait_op(op, what)
            err = self._op_failed(op, what)
            if replay:
                # A DONE operation on the first send is an earlier attempt's (same requestId, e.g. a rerun of
                # labctl): if it failed, or its instance is gone, that says nothing about now: insert anew.
                gone = err is None and self._call(f"get {name}", lambda: self.instances.get(
                    request={"project": self.project, "zone": zone, "instance": name}, **self._opts()),
                    missing_ok=True) is None
                if err is not None or gone:
                    log.info("%s: requestId %s answered with an earlier operation; launching anew", self.site.name,
                             rid)
                    attempt += 1
                    with self._lock:
                        key = (plan.deployment, node)
                        self._attempts[key] = max(self._attempts.get(key, 0), attempt)
                    continue
            if isinstance(err, Conflict):  # a concurrent run's insert of this name won
                return self._adopt_instance(plan, zone, name)
            if isinstance(err, NoCapacity):
                raise _ZoneFull(str(err))
            if isinstance(err, QuotaExceeded):
                metric = _quota_metric(op)
                if metric and _type_specific_quota(metric):
                    raise NoCapacity(f"{self.site.name}: quota {metric} in {self.region} is used up "
                                     f"({candidate}); {err}")
                raise err
            if err is not None:
                raise err
            log.info("%s: %s is %s in %s", self.site.name, node, candidate, zone)
            return Found("server", f"zones/{zone}/instances/{name}", name, status="pending", attrs={
                "node": node, "zone": zone, "node_type": candidate, "server_status": "PROVISIONING",
                "instance_id": str(op.target_id), "fixed_ip": None, "floating_ip": None})
        raise CloudError(f"{self.site.name}: {what}: every requestId replayed an earlier operation")

    def _adopt_instance(self, plan: Plan, zone: str, name: str) -> Found:
        """The instance that holds the name (made by a lost answer's insert or a concurrent run), if labctl's."""
        existing = self._call(f"get {name}", lambda: self.instances.get(
            request={"project": self.project, "zone": zone, "instance": name}, **self._opts()), missing_ok=True)
        if existing is None or existing.labels.get(_label_key(naming.TAG_DEPLOYMENT)) != \
                _label_value(plan.deployment):
            raise CloudError(f"{self.site.name}: an instance named {name} already exists in {zone} and "
                             "is not labctl's") from None
        return self._server_found(existing)

    def _create_floating_ip(self, res: Resource, plan: Plan, deps: Mapping[str, Found],
                            _c: str | None) -> Found:
        from google.cloud import compute_v1

        node = res.spec["node"]
        server = deps[res.spec["server"]]
        zone, iname = _instance_ref(server)
        name = gce_name(res.name)
        inst = self._call(f"get instance of {node}", lambda: self.instances.get(
            request={"project": self.project, "zone": zone, "instance": iname}, **self._opts()))
        nic = inst.network_interfaces[0]
        current = next((ac for ac in nic.access_configs if ac.nat_i_p), None)
        def get() -> Any:
            return self.addresses.get(request={"project": self.project, "region": self.region, "address": name},
                                      **self._opts())

        addr = self._call("get address", get, missing_ok=True)
        if addr is None:
            body = compute_v1.Address(name=name, description=_description(plan.deployment, node),
                                      labels=_labels(plan, node), address_type="EXTERNAL", network_tier="PREMIUM")
            if current is not None:
                body.address = current.nat_i_p  # promote the ephemeral address: same IP, now static
            try:
                op = self._call(f"reserve address for {node}", lambda: self.addresses.insert_unary(
                    request={"project": self.project, "region": self.region, "address_resource": body,
                             "request_id": str(uuid.uuid4())}, **self._opts()))
                op = self._wait_op(op, f"reserve address for {node}")
                if (err := self._op_failed(op, f"reserve address for {node}")) is not None:
                    raise err
            except Conflict:
                pass  # a concurrent run of this deployment reserved it first (the name is the node's)
            addr = self._call("get address", get)
        mine = any(_rel(u).endswith(f"zones/{zone}/instances/{iname}") for u in addr.users)
        if not mine:
            if addr.status != "RESERVED":
                raise CloudError(f"{self.site.name}: address {name} ({addr.address}) is in use by "
                                 f"{', '.join(_rel(u) for u in addr.users)}")
            if current is not None:
                detach = {"project": self.project, "zone": zone, "instance": iname, "access_config": current.name,
                          "network_interface": nic.name, "request_id": str(uuid.uuid4())}
                op = self._call(f"detach ephemeral address of {node}", lambda: self.instances
                                .delete_access_config_unary(request=detach, **self._opts()))
                self._check_op(op, f"detach ephemeral address of {node}")
            access = compute_v1.AccessConfig(name=NAT_NAME, type_="ONE_TO_ONE_NAT", nat_i_p=addr.address,
                                             network_tier="PREMIUM")
            op = self._call(f"attach address to {node}", lambda: self.instances.add_access_config_unary(
                request={"project": self.project, "zone": zone, "instance": iname, "network_interface": nic.name,
                         "access_config_resource": access, "request_id": str(uuid.uuid4())}, **self._opts()))
            self._check_op(op, f"attach address to {node}")
        return Found("floating_ip", f"regions/{self.region}/addresses/{name}", res.name,
                     attrs={"floating_ip": addr.address, "node": node, "zone": zone})

    def _check_op(self, op: Any, what: str) -> Any:
        op = self._wait_op(op, what)
        if (err := self._op_failed(op, what)) is not None:
            raise err
        return op

    # -- wait -------------------------------------------------------------------------------------
    def wait(self, items: Sequence[tuple[Resource, Found]], plan: Plan, timeout: float,
             on_progress: ProgressFn) -> list[Found]:
        results = {res.key: found for res, found in items}
        deadline = time.monotonic() + timeout
        while True:
            pending = [(r, results[r.key]) for r, _ in items if results[r.key].status == "pending"]
            if not pending:
                return [results[r.key] for r, _ in items]
            servers = [(r, f) for r, f in pending if r.kind == "server"]
            for r, f in pending:
                if r.kind not in ("server", "volume"):  # everything else is done when its operation is
                    results[r.key] = dataclasses.replace(f, status="ready")
            for r, f in pending:
                if r.kind == "volume":  # CREATING until READY (a few per deployment: one get each)
                    zone, name = _disk_ref(f)
                    disk = self._call(f"get disk {name}", lambda z=zone, n=name: self.disks.get(
                        request={"project": self.project, "zone": z, "disk": n}, **self._opts()), missing_ok=True)
                    results[r.key] = _volume_found(disk) if disk is not None else dataclasses.replace(
                        f, status="error", error="disk disappeared")
                    on_progress(r.key, str(results[r.key].attrs.get("disk_status", "gone")).lower(), "")
            if servers:
                zones = {_instance_ref(f)[0] for _, f in servers}
                listed = {}
                for inst in self._list_instances(plan.deployment, zones):
                    listed[f"zones/{_last(inst.zone)}/instances/{inst.name}"] = inst
                for r, f in servers:
                    inst = listed.get(f.cloud_id)
                    if inst is None:
                        results[r.key] = Found("server", f.cloud_id, f.name, status="error", attrs=dict(f.attrs),
                                               error="instance disappeared")
                    else:
                        new = self._server_found(inst)
                        new.attrs.setdefault("node_type", f.attrs.get("node_type"))
                        results[r.key] = new
                    now = results[r.key]
                    stage = {"pending": "building", "ready": "booted"}.get(now.status, "error")
                    on_progress(r.spec["node"], stage, now.error or str(now.attrs.get("server_status", "")))
            if time.monotonic() > deadline:
                for r, _ in pending:
                    if results[r.key].status == "pending":
                        results[r.key].status = "error"
                        results[r.key].error = f"still not running after {timeout:.0f}s"
                return [results[r.key] for r, _ in items]
            time.sleep(self.poll_interval)

    # -- delete -----------------------------------------------------------------------------------
    def delete(self, kind: str, found: Sequence[Found], plan: Plan) -> None:
        if not found:
            return
        if kind == "server":
            self._delete_instances(found)
        elif kind == "floating_ip":
            for f in found:
                self._delete_address(f)
        elif kind == "secgroup":
            names = set()
            for f in found:
                names.add(_last(f.cloud_id))
                names.update(f.attrs.get("firewalls") or [])
            self._delete_firewalls(sorted(names))
        elif kind == "volume_attachment":
            for f in found:
                self._detach_device(*_attachment_ref(f))
        elif kind == "volume":
            self._delete_disks(found)
        elif kind == "subnet":
            for f in found:
                name = _last(f.cloud_id) if "/subnetworks/" in (f.cloud_id or "") else gce_name(f.name)
                region = f.attrs.get("region") or (f.cloud_id.split("/")[1] if (f.cloud_id or "").startswith(
                    "regions/") else self.region)
                self._delete_until_gone(f"delete subnetwork {name}", lambda r, n=name, g=region: (
                    self.subnetworks.delete_unary(request={"project": self.project, "region": g, "subnetwork": n,
                                                           "request_id": r}, **self._opts())),
                    lambda n=name, g=region: self.subnetworks.get(
                        request={"project": self.project, "region": g, "subnetwork": n}, **self._opts()))
        elif kind == "network":
            for f in found:
                name = _last(f.cloud_id) if "/networks/" in (f.cloud_id or "") else gce_name(f.name)
                if name == (self.site.network or "default"):
                    continue  # never the site's own network
                self._delete_until_gone(f"delete network {name}", lambda r, n=name: self.networks.delete_unary(
                    request={"project": self.project, "network": n, "request_id": r}, **self._opts()),
                    lambda n=name: self.networks.get(request={"project": self.project, "network": n},
                                                     **self._opts()))
        elif kind in ("keypair", "router"):
            return  # nothing on the cloud side
        else:
            log.warning("%s: nothing to delete for kind %s", self.site.name, kind)

    def _delete_firewalls(self, names: Sequence[str]) -> None:
        ops = []
        for name in names:
            op = self._call(f"delete firewall {name}", lambda n=name: self.firewalls.delete_unary(
                request={"project": self.project, "firewall": n, "request_id": str(uuid.uuid4())},
                **self._opts()), missing_ok=True)
            if op is not None:
                ops.append(op)
        for op in ops:
            self._check_op(op, "delete firewall")

    def _delete_until_gone(self, what: str, send: Callable[[str], Any], get: Callable[[], Any]) -> None:
        """Delete (404 = done); while the resource is still in use (a subnetwork's instance still going away, a
        network's firewall or subnetwork), try again for a while (IN_USE_GRACE); then wait until a get says 404."""
        deadline = time.monotonic() + min(self.op_timeout, IN_USE_GRACE)
        while True:
            rid = str(uuid.uuid4())  # a new request each round: the same requestId would replay the failure
            try:
                op = self._call(what, lambda r=rid: send(r), missing_ok=True)
                if op is None:
                    return
                self._check_op(op, what)
                break
            except CloudError as exc:
                if not _IN_USE.search(str(exc)) or time.monotonic() > deadline:
                    raise
                log.debug("%s: %s: still in use, trying again (%s)", self.site.name, what, exc)
                time.sleep(max(self.poll_interval, 0.01))
        while self._call(what, get, missing_ok=True) is not None:
            if time.monotonic() > deadline:
                raise CloudError(f"{self.site.name}: {what}: still there {self.op_timeout:.0f}s after the delete")
            time.sleep(max(self.poll_interval, 0.01))

    def _get_instance(self, zone: str, name: str) -> Any:
        return self._call(f"get instance {name}", lambda: self.instances.get(
            request={"project": self.project, "zone": zone, "instance": name}, **self._opts()), missing_ok=True)

    def _detach_disk(self, zone: str, iname: str, disk_id: str) -> None:
        """Detach the disk (zones/Z/disks/N) from the instance and wait; nothing to do if either is gone."""
        inst = self._get_instance(zone, iname)
        device = _device_of(inst, disk_id) if inst is not None else None
        if device is not None:
            self._detach_device(zone, iname, device, inst)

    def _detach_device(self, zone: str, iname: str, device: str, inst: Any = None) -> None:
        """Detach the instance's disk with this device name and wait; nothing to do if it is not there."""
        inst = inst if inst is not None else self._get_instance(zone, iname)
        if inst is None or not any(d.device_name == device and not d.boot for d in inst.disks):
            return
        what = f"detach volume {device} from {iname}"
        op = self._call(what, lambda: self.instances.detach_disk_unary(request={
            "project": self.project, "zone": zone, "instance": iname, "device_name": device,
            "request_id": str(uuid.uuid4())}, **self._opts()), missing_ok=True)
        if op is not None:
            self._check_op(op, what)

    def _delete_disks(self, found: Sequence[Found]) -> None:
        refs = []
        for f in found:
            try:
                refs.append(_disk_ref(f))
            except CloudError:
                refs += [(_last(d.zone), d.name) for d in self._list_disks(f'name = "{gce_name(f.name)}"')]
        ops = []
        for zone, name in refs:
            disk = self._call(f"get disk {name}", lambda z=zone, n=name: self.disks.get(
                request={"project": self.project, "zone": z, "disk": n}, **self._opts()), missing_ok=True)
            if disk is None:
                continue
            for user in disk.users:  # a disk in use cannot be deleted: detach it first
                um = re.search(r"zones/([^/]+)/instances/([^/]+)$", user)
                if um:
                    self._detach_disk(um.group(1), um.group(2), f"zones/{zone}/disks/{name}")
            op = self._call(f"delete disk {name}", lambda z=zone, n=name: self.disks.delete_unary(request={
                "project": self.project, "zone": z, "disk": n, "request_id": str(uuid.uuid4())}, **self._opts()),
                missing_ok=True)
            if op is not None:
                ops.append((zone, name, op))
        deadline = time.monotonic() + self.op_timeout
        for zone, name, op in ops:
            self._check_op(op, f"delete disk {name}")
            while self._call(f"get disk {name}", lambda z=zone, n=name: self.disks.get(
                    request={"project": self.project, "zone": z, "disk": n}, **self._opts()),
                    missing_ok=True) is not None:
                if time.monotonic() > deadline:
                    raise CloudError(f"{self.site.name}: disk {name} still there after its delete")
                time.sleep(max(self.poll_interval, 0.01))

    def _delete_instances(self, found: Sequence[Found]) -> None:
        ops = []
        for f in found:
            try:
                zone, name = _instance_ref(f)
            except CloudError:
                refs = [(_last(i.zone), i.name) for i in self._list_by_name(gce_name(f.name))]
                if not refs:
                    continue
                zone, name = refs[0]
            rid = str(uuid.uuid4())
            op = self._call(f"delete instance {name}", lambda z=zone, n=name, r=rid: self.instances.delete_unary(
                request={"project": self.project, "zone": z, "instance": n, "request_id": r}, **self._opts()),
                missing_ok=True)
            if op is not None:
                ops.append((name, op))
        for name, op in ops:
            self._check_op(op, f"delete instance {name}")

    def _delete_address(self, f: Found) -> None:
        m = re.match(r"^regions/([^/]+)/addresses/([^/]+)$", f.cloud_id)
        region, name = m.groups() if m else (self.region, gce_name(f.name))
        addr = self._call(f"get address {name}", lambda: self.addresses.get(
            request={"project": self.project, "region": region, "address": name}, **self._opts()), missing_ok=True)
        if addr is None:
            return
        for user in addr.users:  # detach it from its instance first (an address in use cannot be deleted)
            um = re.search(r"zones/([^/]+)/instances/([^/]+)$", user)
            if not um:
                continue
            zone, iname = um.groups()
            inst = self._call(f"get instance {iname}", lambda z=zone, n=iname: self.instances.get(
                request={"project": self.project, "zone": z, "instance": n}, **self._opts()), missing_ok=True)
            if inst is None:
                continue
            for nic in inst.network_interfaces:
                for ac in nic.access_configs:
                    if ac.nat_i_p == addr.address:
                        op = self._call(f"detach address from {iname}", lambda z=zone, n=iname, a=ac.name, i=nic.name:
                                        self.instances.delete_access_config_unary(request={
                                            "project": self.project, "zone": z, "instance": n, "access_config": a,
                                            "network_interface": i, "request_id": str(uuid.uuid4())},
                                            **self._opts()), missing_ok=True)
                        if op is not None:
                            self._check_op(op, f"detach address from {iname}")
        op = self._call(f"release address {name}", lambda: self.addresses.delete_unary(
            request={"project": self.project, "region": region, "address": name, "request_id": str(uuid.uuid4())},
            **self._opts()), missing_ok=True)
        if op is not None:
            self._check_op(op, f"release address {name}")

    # -- inventory --------------------------------------------------------------------------------
    def list_owned(self, plan: Plan) -> list[Found]:
        instances = self._list_instances(plan.deployment, None)
        owned = [self._server_found(i) for i in instances]
        for fw in self._owned_firewalls(plan.deployment):
            owned.append(Found("secgroup", f"global/firewalls/{fw.name}", fw.name,
                               attrs={"firewalls": [fw.name]}))
        label = f'labels.{_label_key(naming.TAG_DEPLOYMENT)} = "{_label_value(plan.deployment)}"'
        pager = self._call("list addresses", lambda: self.addresses.list(
            request={"project": self.project, "region": self.region, "filter": label}, **self._opts()))
        for addr in self._call("list addresses", lambda: list(pager)):
            node = addr.labels.get(_label_key(naming.TAG_NODE))
            owned.append(Found("floating_ip", f"regions/{self.region}/addresses/{addr.name}", addr.name,
                               attrs={"floating_ip": addr.address, "node": node}))
        # Private networks (no labels: the deployment is in the description) and disks, with their attachments
        # as the deployment's instances show them.
        pager = self._call("list networks", lambda: self.networks.list(
            request={"project": self.project}, **self._opts()))
        for net in self._call("list networks", lambda: list(pager)):
            if _deployment_of(net.description) == plan.deployment:
                owned.append(_network_found(net, net.name))
        pager = self._call("list subnetworks", lambda: self.subnetworks.list(
            request={"project": self.project, "region": self.region}, **self._opts()))
        for sub in self._call("list subnetworks", lambda: list(pager)):
            if _deployment_of(sub.description) == plan.deployment:
                owned.append(_subnet_found(sub, sub.name))
        disks = {}
        for disk in self._list_disks(label):
            if disk.status != "DELETING":
                vol = _volume_found(disk)
                disks[vol.cloud_id] = vol
                owned.append(vol)
        for inst in instances:
            zone = _last(inst.zone)
            for ad in inst.disks:
                disk_id = _disk_id(ad.source)
                if not ad.boot and disk_id in disks:
                    owned.append(_attachment_found(f"{disks[disk_id].name}-attachment", zone, inst.name, disk_id,
                                                   ad.device_name))
        return owned

    def extend(self, found: Found, hours: float, plan: Plan) -> Found:
        log.info("%s: Compute Engine has no leases; nothing to extend (instances run until deleted)",
                 self.site.name)
        found.attrs.setdefault("note", "no leases on GCP: instances run until deleted")
        return found

    # -- helpers ----------------------------------------------------------------------------------
    def _list_instances(self, deployment: str, zones: Iterable[str] | None, node: str | None = None) -> list[Any]:
        """Instances labelled with the deployment (and node): one list call for one zone, else one
        aggregatedList call for all zones."""
        terms = [f'labels.{_label_key(naming.TAG_DEPLOYMENT)} = "{_label_value(deployment)}"']
        if node is not None:
            terms.append(f'labels.{_label_key(naming.TAG_NODE)} = "{_label_value(node)}"')
        flt = " AND ".join(f"({t})" for t in terms) if len(terms) > 1 else terms[0]
        zones = sorted(set(zones)) if zones is not None else (self._zones() if self.site.zone else None)
        if zones is not None and len(zones) == 1:
            pager = self._call("list instances", lambda: self.instances.list(
                request={"project": self.project, "zone": zones[0], "filter": flt}, **self._opts()))
            return self._call("list instances", lambda: list(pager))
        pager = self._call("list instances", lambda: self.instances.aggregated_list(
            request={"project": self.project, "filter": flt}, **self._opts()))
        pairs = self._call("list instances", lambda: list(pager))
        return [i for _, scoped in pairs for i in scoped.instances]

    def _list_disks(self, flt: str) -> list[Any]:
        """Disks matching a filter, in every zone (one aggregatedList call)."""
        pager = self._call("list disks", lambda: self.disks.aggregated_list(
            request={"project": self.project, "filter": flt}, **self._opts()))
        return [d for _, scoped in self._call("list disks", lambda: list(pager)) for d in scoped.disks]

    def _list_by_name(self, name: str) -> list[Any]:
        pager = self._call("find instance", lambda: self.instances.aggregated_list(
            request={"project": self.project, "filter": f'name = "{name}"'}, **self._opts()))
        return [i for _, scoped in self._call("find instance", lambda: list(pager)) for i in scoped.instances]

    def _owned_firewalls(self, deployment: str) -> list[Any]:
        pager = self._call("list firewalls", lambda: self.firewalls.list(
            request={"project": self.project}, **self._opts()))
        return [fw for fw in self._call("list firewalls", lambda: list(pager))
                if _deployment_of(fw.description) == deployment]

    def _server_found(self, inst: Any) -> Found:
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
            if nic.network_i_p and _last(nic.network) != (self.site.network or "default"):
                private[_last(nic.network)] = nic.network_i_p
        error = None
        if state == "error":
            error = f"instance is {status}" + (f": {inst.status_message}" if inst.status_message else "")
        zone = _last(inst.zone)
        return Found("server", f"zones/{zone}/instances/{inst.name}", inst.name, status=state, error=error,
                     attrs={"node": inst.labels.get(_label_key(naming.TAG_NODE)), "fixed_ip": fixed,
                            "floating_ip": floating, "node_type": _node_type(inst), "server_status": status,
                            "zone": zone, "instance_id": str(inst.id),
                            **({"private_ips": private} if private else {})})


class _Exists(Conflict):
    """HTTP 409 alreadyExists (names are unique in Compute Engine: find the thing and adopt it if it is ours)."""


# ------------------------------------------------------------------------------------ module helpers
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
        count = int(m.group(1) or 1)
        accel = ACCELERATORS.get(m.group(2), m.group(2))
        return machine, accel, count
    return candidate, None, 0


def _node_type(inst: Any) -> str:
    machine = _last(inst.machine_type)
    if inst.guest_accelerators:
        acc = inst.guest_accelerators[0]
        accel = _last(acc.accelerator_type)
        short = next((k for k, v in ACCELERATORS.items() if v == accel), accel)
        count = acc.accelerator_count
        return f"{machine}+{short}" if count <= 1 else f"{machine}+{count}x{short}"
    return machine


def gce_name(name: str) -> str:
    """A Compute Engine resource name ([a-z]([-a-z0-9]*[a-z0-9])?, at most 63 characters)."""
    clean = naming.sanitise(name, 63)
    return clean if clean[0].isalpha() else f"l{clean}"[:63].rstrip("-")


def _tag(deployment: str) -> str:
    return gce_name(deployment)


def _label_key(tag: str) -> str:
    return tag.replace(":", "-")


def _label_value(value: str) -> str:
    return naming.sanitise(str(value), 63)


def _labels(plan: Plan, node: str | None = None) -> dict[str, str]:
    tags = {naming.TAG_DEPLOYMENT: plan.deployment, **plan.tags}
    if node is not None:
        tags[naming.TAG_NODE] = node
    return {_label_key(k): _label_value(v) for k, v in tags.items()}


def _description(deployment: str, node: str | None = None) -> str:
    text = f"{naming.TAG_DEPLOYMENT}={deployment}"
    return f"{text} {naming.TAG_NODE}={node}" if node else text


def _deployment_of(description: str | None) -> str | None:
    m = re.search(rf"{re.escape(naming.TAG_DEPLOYMENT)}=(\S+)", description or "")
    return m.group(1) if m else None


def _firewall_matches(fw: Any, spec: Mapping[str, Any]) -> bool:
    have = {(a.I_p_protocol, p) for a in fw.allowed for p in a.ports}
    want = {(proto, p) for proto, ports in spec["allowed"].items() for p in ports}
    protocols = {a.I_p_protocol for a in fw.allowed}
    return (want <= have and set(spec["allowed"]) <= protocols and set(spec["ranges"]) == set(fw.source_ranges)
            and _last(fw.network) == spec.get("network", _last(fw.network)))


def _network_found(net: Any, name: str) -> Found:
    return Found("network", f"global/networks/{net.name}", name,
                 attrs={"network": net.name, "auto_subnetworks": net.auto_create_subnetworks})


def _network_name(found: Found) -> str:
    return found.attrs.get("network") or _last(found.cloud_id)


def _subnet_found(sub: Any, name: str) -> Found:
    region = _last(sub.region)
    return Found("subnet", f"regions/{region}/subnetworks/{sub.name}", name, attrs={
        "network": _last(sub.network), "region": region, "cidr": sub.ip_cidr_range, "gateway_ip": sub.gateway_address})


def _volume_found(disk: Any) -> Found:
    status = {"READY": "ready", "CREATING": "pending", "RESTORING": "pending", "FAILED": "error"}.get(disk.status,
                                                                                                      "pending")
    zone = _last(disk.zone)
    vol = disk.labels.get(VOLUME_LABEL)
    return Found("volume", f"zones/{zone}/disks/{disk.name}", disk.name, status=status,
                 error=f"disk is {disk.status}" if status == "error" else None,
                 attrs={"zone": zone, "size_gb": int(disk.size_gb), "keep": disk.labels.get(KEEP_LABEL) == "true",
                        "disk_status": disk.status, "users": [_rel(u) for u in disk.users],
                        **({"key": f"volume:{vol}"} if vol else {})})


def _attachment_found(name: str, zone: str, instance: str, disk_id: str, device: str) -> Found:
    return Found("volume_attachment", f"zones/{zone}/instances/{instance}/devices/{device}", name, attrs={
        "volume_id": disk_id, "server_id": f"zones/{zone}/instances/{instance}", "zone": zone, "device": device,
        "device_paths": [f"{DEVICE_PREFIX}{device}"]})


def _disk_id(link: str | None) -> str:
    """An attached disk's source link -> "zones/Z/disks/N"."""
    m = re.search(r"zones/([^/]+)/disks/([^/]+)$", link or "")
    return f"zones/{m.group(1)}/disks/{m.group(2)}" if m else ""


def _disk_ref(found: Found) -> tuple[str, str]:
    m = re.search(r"zones/([^/]+)/disks/([^/]+)$", found.cloud_id or "")
    if m:
        return m.group(1), m.group(2)
    zone = found.attrs.get("zone")
    if zone:
        return zone, gce_name(found.name)
    raise CloudError(f"cannot tell the zone of disk {found.name} ({found.cloud_id})")


def _attachment_ref(found: Found) -> tuple[str, str, str]:
    """(zone, instance, device name) of a volume attachment."""
    m = re.search(r"zones/([^/]+)/instances/([^/]+)/devices/([^/]+)$", found.cloud_id or "")
    if not m:
        raise CloudError(f"cannot tell the instance of volume attachment {found.name} ({found.cloud_id})")
    return m.group(1), m.group(2), m.group(3)


def _device_of(inst: Any, disk_id: str) -> str | None:
    """The device name under which the instance has the disk (zones/Z/disks/N), if attached."""
    return next((d.device_name for d in inst.disks if not d.boot and _disk_id(d.source) == disk_id), None)


def _has(plan: Plan, key: str) -> bool:
    try:
        plan.get(key)
    except KeyError:
        return False
    return True


def _last(link: str | None) -> str:
    return (link or "").rstrip("/").rsplit("/", 1)[-1]


def _rel(link: str) -> str:
    """A link without its host and API prefix: "projects/p/zones/z/instances/i"."""
    return link.split("/compute/v1/", 1)[1] if "/compute/v1/" in link else link


def _instance_ref(found: Found) -> tuple[str, str]:
    m = re.search(r"zones/([^/]+)/instances/([^/]+)$", found.cloud_id or "")
    if m:
        return m.group(1), m.group(2)
    zone = found.attrs.get("zone")
    if zone:
        return zone, gce_name(found.name)
    raise CloudError(f"cannot tell the zone of instance {found.name} ({found.cloud_id})")


def _quota_metric(op: Any) -> str | None:
    for e in op.error.errors:
        for d in e.error_details:
            if d.quota_info and d.quota_info.metric_name:
                return d.quota_info.metric_name.rsplit("/", 1)[-1].upper()
        m = re.search(r"Quota '([A-Z0-9_]+)' exceeded", e.message or "")
        if m:
            return m.group(1)
    return None


def _type_specific_quota(metric: str) -> bool:
    """Quotas that only some types count against (another type may still fit): GPUs and family CPUs."""
    return metric.endswith("_GPUS") or (metric.endswith("_CPUS") and metric != "CPUS")


def _status_of(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _reasons(exc: BaseException) -> set[str]:
    out: set[str] = set()
    for e in getattr(exc, "errors", None) or []:
        if isinstance(e, dict) and e.get("reason"):
            out.add(str(e["reason"]))
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        out.add(reason)
    return out


def _error_text(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    text = re.sub(r"^(GET|POST|PUT|PATCH|DELETE) \S+: ", "", str(text))
    return (text.strip().splitlines() or [type(exc).__name__])[0][:300]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
