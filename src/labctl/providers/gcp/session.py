"""What every Compute Engine resource kind shares: credentials, the error table, names and labels, clients,
translated calls, operations, insert-or-adopt and delete-until-gone."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from labctl import naming
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
from labctl.providers.base import create_or_adopt
from labctl.providers.kit import HandlerTable, Memo, RateLimiter, Snapshot, call, poll_until, retry_in_use
from labctl.redact import clean

if TYPE_CHECKING:
    from labctl.plan import Plan
    from labctl.providers.base import Found
    from labctl.sites import Site

T = TypeVar("T")
log = logging.getLogger("labctl.providers.gcp")

COMPUTE_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
NO_CREDENTIALS = ("no Google credentials: run 'gcloud auth application-default login' "
                  "or set GOOGLE_APPLICATION_CREDENTIALS")
NO_PROJECT = ("no Google Cloud project: set GOOGLE_CLOUD_PROJECT (or run 'gcloud config set project "
              "PROJECT'), or pass the project as the cloud name")
CAPACITY_CODES = ("ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
                  "RESOURCE_POOL_EXHAUSTED")
CAPACITY_TEXT = re.compile(r"RESOURCE_POOL_EXHAUSTED|does not have enough resources", re.I)
QUOTA_TEXT = re.compile(r"Quota '([A-Z0-9_]+)' exceeded")
AUTH_ERRORS = ("RefreshError", "DefaultCredentialsError", "ReauthFailError", "UserAccessTokenError")
RELOGIN = "run 'gcloud auth application-default login'"
IN_USE = re.compile(r"already being used by|RESOURCE_IN_USE_BY_ANOTHER_RESOURCE|resourceInUseByAnotherResource")
IN_USE_GRACE = 180.0  # seconds a delete keeps trying while its resource is in use (by something going away)

#: The GCP adapter's per-kind handlers (find, create, delete, status): each resource family registers its own.
HANDLERS = HandlerTable("Compute Engine")


# -- credentials ---------------------------------------------------------------------------------
def google_credentials(project: str | None = None) -> tuple[Any, str]:
    """(credentials, project) from Application Default Credentials; one-line CredentialsError if missing."""
    import google.auth
    from google.auth import exceptions as auth_exc

    try:
        credentials, adc_project = google.auth.default(scopes=[COMPUTE_SCOPE])
    except auth_exc.DefaultCredentialsError as exc:
        if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            raise CredentialsError(f"GOOGLE_APPLICATION_CREDENTIALS: {first_line(exc)}") from None
        if "were not found" not in str(exc):  # gcloud's file is there but broken: say so, not "log in"
            raise CredentialsError(f"Google application default credentials: {first_line(exc)}; {RELOGIN}") from None
        raise CredentialsError(NO_CREDENTIALS) from None
    except auth_exc.GoogleAuthError as exc:
        raise CredentialsError(f"Google credentials: {first_line(exc)}") from None
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

    for name in ("token", "refresh_token", "client_secret", "_refresh_token", "_client_secret"):
        value = getattr(credentials, name, None)
        if isinstance(value, str):
            register_secret(value)


# -- the error table -----------------------------------------------------------------------------
def translate(where: str, project: str, exc: BaseException) -> Exception:
    """An SDK error as a labctl error (`where`: "<site>: <what>")."""
    if isinstance(exc, LabctlError):
        return exc  # type: ignore[return-value]
    text, status = error_text(exc), getattr(exc, "code", None)
    if not isinstance(status, int):
        status = getattr(getattr(exc, "response", None), "status_code", None)
    reasons = {str(e["reason"]) for e in getattr(exc, "errors", None) or [] if isinstance(e, dict) and e.get("reason")}
    reasons.add(str(getattr(exc, "reason", None) or ""))
    kind, module = type(exc).__name__, type(exc).__module__
    if status == 401 or (module.startswith("google.auth") and kind in AUTH_ERRORS):
        return CredentialsError(f"{where}: Google credentials rejected ({text}); {RELOGIN}")
    if status == 409:
        return Conflict(text)  # names are unique in Compute Engine: find the thing and adopt it if it is ours
    if CAPACITY_TEXT.search(text):
        return NoCapacity(f"{where}: {text}")
    if status == 429 or reasons & {"rateLimitExceeded", "userRateLimitExceeded", "RATE_LIMIT_EXCEEDED"}:
        return RateLimited(f"{where}: rate limited ({text})")
    if reasons & {"quotaExceeded", "QUOTA_EXCEEDED"} or QUOTA_TEXT.search(text):
        return QuotaExceeded(f"{where}: quota exceeded ({text})")
    if status == 403:
        return CredentialsError(f"{where}: permission denied in project {project} ({text})")
    if isinstance(status, int) and status >= 500:
        return Transient(f"{where}: server error {status} ({text})")
    if kind in ("DeadlineExceeded", "RetryError") or isinstance(exc, TimeoutError | ConnectionError):
        return Transient(f"{where}: timed out or connection lost ({text})")
    if module.startswith(("requests", "urllib3")) or isinstance(exc, OSError):
        return Transient(f"{where}: cannot reach the API ({text})")
    if status == 404:
        return CloudError(f"{where}: not found ({text})")
    return CloudError(f"{where}: {text}")


def op_error(where: str, op: Any) -> Exception | None:
    """The error of a DONE operation as a labctl error (None if it succeeded)."""
    errors = list(op.error.errors) if op.error else []
    if not errors:
        return None
    codes = [e.code for e in errors]
    text = f"{where}: " + clean("; ".join(f"{e.code}: {e.message}" for e in errors), one_line=True)[:400]
    if any(c in CAPACITY_CODES for c in codes):
        return NoCapacity(text)
    if "RESOURCE_ALREADY_EXISTS" in codes:  # a concurrent insert of the same name won
        return Conflict(text)
    if "QUOTA_EXCEEDED" in codes:
        return QuotaExceeded(text)
    if "RATE_LIMIT_EXCEEDED" in codes or op.http_error_status_code == 429:
        return RateLimited(text)
    if "RESOURCE_NOT_FOUND" in codes and "delete" in (op.operation_type or ""):
        return None
    if op.http_error_status_code and op.http_error_status_code >= 500:
        return Transient(text)
    return CloudError(text)


def quota_metric(op: Any) -> str | None:
    for e in op.error.errors:
        for d in e.error_details:
            if d.quota_info and d.quota_info.metric_name:
                return d.quota_info.metric_name.rsplit("/", 1)[-1].upper()
        if m := QUOTA_TEXT.search(e.message or ""):
            return m.group(1)
    return None


def error_text(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    text = re.sub(r"^(GET|POST|PUT|PATCH|DELETE) \S+: ", "", str(text))
    return (text.strip().splitlines() or [type(exc).__name__])[0][:300]


def first_line(exc: BaseException) -> str:
    args = exc.args
    if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], BaseException):
        # google-auth's (message, cause): its str() is the tuple's repr
        text = f"{args[0].strip().rstrip('.')}: {type(args[1]).__name__}: {args[1]}"
    else:
        text = str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0][:300]


# -- names, labels, links ------------------------------------------------------------------------
def gce_name(name: str) -> str:
    """A Compute Engine resource name ([a-z]([-a-z0-9]*[a-z0-9])?, at most 63 characters)."""
    text = naming.sanitise(name, 63)
    return text if text[0].isalpha() else f"l{text}"[:63].rstrip("-")


def label_value(value: str) -> str:
    return naming.sanitise(str(value), 63)


DEPLOYMENT_LABEL = naming.TAG_DEPLOYMENT.replace(":", "-")  # label keys cannot contain ':'
NODE_LABEL = naming.TAG_NODE.replace(":", "-")
OWNER_LABEL = naming.TAG_OWNER.replace(":", "-")


def labels(plan: Plan, node: str | None = None, **more: str) -> dict[str, str]:
    tags = {naming.TAG_DEPLOYMENT: plan.deployment, **plan.tags, **({naming.TAG_NODE: node} if node else {})}
    return {**{k.replace(":", "-"): label_value(v) for k, v in tags.items()}, **more}


def label_filter(deployment: str | None, node: str | None = None) -> str:
    """A list filter on labctl's labels: this deployment (any labctl deployment if None), and node."""
    first = (f'labels.{DEPLOYMENT_LABEL} = "{label_value(deployment)}"' if deployment is not None
             else f"labels.{DEPLOYMENT_LABEL}:*")
    return f'({first}) AND (labels.{NODE_LABEL} = "{label_value(node)}")' if node is not None else first


def description(plan: Plan, node: str | None = None) -> str:
    """labctl's marks in a description (firewalls, networks and subnetworks have no labels)."""
    owner = plan.tags.get(naming.TAG_OWNER) or plan.owner
    return " ".join(f"{k}={v}" for k, v in ((naming.TAG_DEPLOYMENT, plan.deployment), (naming.TAG_OWNER, owner),
                                            (naming.TAG_NODE, node)) if v)


def described(text: str | None, tag: str = naming.TAG_DEPLOYMENT) -> str | None:
    """The value of one of labctl's marks in a description (None: not labctl's)."""
    m = re.search(rf"(?:^|\s){re.escape(tag)}=(\S+)", text or "")
    return m.group(1) if m else None


def last(link: str | None) -> str:
    return (link or "").rstrip("/").rsplit("/", 1)[-1]


def rel(link: str) -> str:
    """A link without its host and API prefix: "projects/p/zones/z/instances/i"."""
    return link.split("/compute/v1/", 1)[1] if "/compute/v1/" in link else link


_REF = re.compile(r"(?:(zones|regions)/([^/]+)|global)/([a-zA-Z]+)/([^/]+)$")


def ref(link: str | None) -> tuple[dict[str, str], str] | None:
    """The scope ({"zone": z}, {"region": r} or {}) and name of a link or cloud id ("zones/Z/disks/N")."""
    m = _REF.search(link or "")
    return ({m.group(1)[:-1]: m.group(2)} if m.group(1) else {}, m.group(4)) if m else None


def has(plan: Plan, key: str) -> bool:
    return any(r.key == key for r in plan.resources)


def bound(fn: Callable[..., T]) -> Callable[..., T]:
    """A handler method that calls `fn(handler.ctx, ...)` (the session)."""
    return lambda handler, *args: fn(handler.ctx, *args)


# -- the session ---------------------------------------------------------------------------------
class Session:
    """Clients on one endpoint, translated and retried calls, operations, cached look-ups, shared lists."""

    def __init__(self, site: Site, project: str, credentials: Any = None, endpoint: str | None = None,
                 poll_interval: float | None = None, call_retries: int = 6, call_timeout: float = 60.0,
                 op_timeout: float = 900.0) -> None:
        self.site, self.project, self.credentials, self.endpoint = site, project, credentials, endpoint
        self.region = site.region
        self.poll_interval = poll_interval if poll_interval is not None else site.poll_interval
        self.call_retries, self.call_timeout, self.op_timeout = call_retries, call_timeout, op_timeout
        self.site_network = site.network or "default"
        self._clients: dict[str, Any] = {}
        self.memo = Memo()  # look-ups that do not change during a run (zones, images, types offered)
        self.limiter = RateLimiter(None)
        self._polls: dict[str, Snapshot] = {}
        self._waiting = threading.local()
        self.attempts: dict[tuple[str, str], int] = {}  # (deployment, node) -> insert attempt (the requestId)
        self.lock = threading.RLock()

    def client(self, name: str) -> Any:
        with self.lock:
            if name not in self._clients:
                from google.auth.credentials import AnonymousCredentials
                from google.cloud import compute_v1

                options = {"client_options": {"api_endpoint": self.endpoint}} if self.endpoint else {}
                self._clients[name] = getattr(compute_v1, name)(
                    credentials=self.credentials or AnonymousCredentials(), **options)
            return self._clients[name]

    instances = property(lambda self: self.client("InstancesClient"))
    firewalls = property(lambda self: self.client("FirewallsClient"))
    addresses = property(lambda self: self.client("AddressesClient"))
    networks = property(lambda self: self.client("NetworksClient"))
    subnetworks = property(lambda self: self.client("SubnetworksClient"))
    disks = property(lambda self: self.client("DisksClient"))

    def opts(self, timeout: float | None = None) -> dict[str, Any]:
        """Per-call options: our own timeout, and no SDK-level retry (`call` retries, and counts)."""
        return {"timeout": timeout or self.call_timeout, "retry": None}

    def set_rate_limit(self, calls_per_second: float | None) -> None:
        """Class mode's --rate: at most this many calls per second from this adapter (all its threads)."""
        self.limiter = RateLimiter(calls_per_second)

    def translate(self, what: str, exc: Exception) -> Exception:
        register_credentials(self.credentials)  # as they are now (a refreshed token too)
        return translate(f"{self.site.name}: {what}", self.project, exc)

    def call(self, what: str, fn: Callable[[], T], *, missing_ok: bool = False) -> T:
        """One cloud call, errors translated; rate limits and transient faults are retried.

        With missing_ok, a 404 returns None. A 409 raises Conflict (callers that insert handle it)."""
        return call(what, fn, translate=self.translate, missing_ok=missing_ok, limiter=self.limiter,
                    is_missing=lambda exc: getattr(exc, "code", None) == 404, attempts=self.call_retries,
                    backoff=max(self.poll_interval, 0.01))  # type: ignore[return-value]

    def get(self, what: str, client: Any, *, missing_ok: bool = True, **request: Any) -> Any:
        """`client.get` of one object in the project (None on 404 if missing_ok)."""
        return self.call(what, lambda: client.get(request={"project": self.project, **request}, **self.opts()),
                         missing_ok=missing_ok)

    def listing(self, what: str, client: Any, method: str = "list", **request: Any) -> list[Any]:
        """Every item of a list call (all pages); for aggregated lists, the (scope, scoped list) pairs."""
        return self.call(what, lambda: list(getattr(client, method)(
            request={"project": self.project, **request}, **self.opts())))

    def aggregated(self, what: str, client: Any, attr: str, flt: str, region_only: bool = False) -> list[Any]:
        """The items (`attr` of each scope) of an aggregatedList call, in every zone (of the site's region)."""
        return [i for scope, scoped in self.listing(what, client, "aggregated_list", filter=flt)
                if not region_only or last(scope).rsplit("-", 1)[0] == self.region for i in getattr(scoped, attr)]

    # -- operations -------------------------------------------------------------------------------
    def wait_op(self, op: Any, what: str) -> Any:
        """Wait until the operation is DONE (zone, region or global), with `wait` calls on our endpoint
        (`ExtendedOperation.result()` would poll the default Google host; `wait` itself blocks a while)."""
        if op.status == op.Status.DONE:
            return op
        scope = {"zone": last(op.zone)} if op.zone else {"region": last(op.region)} if op.region else {}
        client = self.client(f"{(next(iter(scope)) if scope else 'global').capitalize()}OperationsClient")
        request = {"project": self.project, "operation": op.name, **scope}
        return poll_until(lambda: self.call(f"wait for {what}", lambda: client.wait(
            request=request, **self.opts(max(150.0, self.call_timeout)))),
            status=lambda o: "DONE" if o.status == o.Status.DONE else "RUNNING", pending={"RUNNING"},
            target={"DONE"}, timeout=self.op_timeout, interval=0, what=f"{self.site.name}: {what}: operation {op.name}")

    def op_failed(self, op: Any, what: str) -> Exception | None:
        return op_error(f"{self.site.name}: {what}", op)

    def check_op(self, op: Any, what: str) -> Any:
        """Wait for the operation (None: nothing was sent) and raise its error."""
        if op is not None and (err := self.op_failed(op := self.wait_op(op, what), what)) is not None:
            raise err
        return op

    def start(self, what: str, client: Any, method: str, *, missing_ok: bool = False, **request: Any) -> Any:
        """Send a mutating call with the project and a new requestId (the same one when `call` sends it again
        after a lost answer, so the API answers with the first operation); the operation (None: 404)."""
        rid = str(uuid.uuid4())
        return self.call(what, lambda: getattr(client, method)(
            request={"project": self.project, **request, "request_id": rid}, **self.opts()), missing_ok=missing_ok)

    def run(self, what: str, client: Any, method: str, *, missing_ok: bool = False, **request: Any) -> Any:
        """`start`, then wait for the operation and raise its error."""
        return self.check_op(self.start(what, client, method, missing_ok=missing_ok, **request), what)

    def insert(self, what: str, client: Any, key: str, body: Any, mine: Callable[[Any], bool], **scope: Any) -> Any:
        """Insert `body` (`<key>_resource`) and wait, return the object. A 409 returns the existing object if it is
        this deployment's (`mine`: made by a run that crashed before recording it)."""
        def get(missing_ok: bool) -> Any:
            return self.get(f"{what}: get", client, missing_ok=missing_ok, **scope, **{key: body.name})

        def create() -> Any:
            self.run(what, client, "insert_unary", **scope, **{f"{key}_resource": body})
            return get(False)

        def adopt() -> Any:
            existing = get(True)
            if existing is None or not mine(existing):
                raise CloudError(f"{self.site.name}: {what}: the name is taken by something that is not this "
                                 "deployment's") from None
            return existing

        return create_or_adopt(create, adopt)

    def delete_all(self, noun: str, client: Any, key: str, refs: Sequence[tuple[dict[str, str], str]]) -> None:
        """Delete these objects ((scope, name) pairs; 404 = done): all sent at once, then each waited for until a
        get says 404. One refused while in use (a subnetwork by an instance going away, a network by its
        firewalls) is sent again for a while (IN_USE_GRACE; a new requestId each time: the same one would replay
        the failure)."""
        start, grace = time.monotonic(), min(self.op_timeout, IN_USE_GRACE)

        def in_use(exc: Exception) -> bool:
            return isinstance(exc, CloudError) and bool(IN_USE.search(str(exc)))

        def send(scope: dict[str, str], name: str) -> Any:
            return self.start(f"delete {noun} {name}", client, "delete_unary", missing_ok=True, **scope, **{key: name})

        def send_or_refusal(scope: dict[str, str], name: str) -> Any:
            try:
                return send(scope, name)
            except CloudError as exc:
                if not in_use(exc):
                    raise
                return exc

        sent = [(scope, name, [send_or_refusal(scope, name)]) for scope, name in refs]
        for scope, name, first in sent:
            what = f"delete {noun} {name}"

            def attempt(scope: dict[str, str] = scope, name: str = name, what: str = what, first: list = first) -> Any:
                op = first.pop() if first else send(scope, name)
                if isinstance(op, Exception):
                    raise op
                return self.check_op(op, what)

            retry_in_use(attempt, is_in_use=in_use, timeout=max(0.0, grace - (time.monotonic() - start)),
                         interval=max(self.poll_interval, 0.01), what=what)
            poll_until(lambda s=scope, n=name, w=what: self.get(w, client, **s, **{key: n}), status=lambda _: "there",
                       pending={"there"}, target={"gone"}, timeout=max(0.0, grace - (time.monotonic() - start)),
                       interval=max(self.poll_interval, 0.01), not_found_checks=1, what=f"{self.site.name}: {what}")

    # -- shared look-ups --------------------------------------------------------------------------
    def region_zones(self) -> list[str]:
        def load() -> list[str]:
            region = self.get(f"get region {self.region}", self.client("RegionsClient"), region=self.region)
            if region is None:
                raise UserError(f"{self.site.name}: region '{self.region}' not found in project '{self.project}' "
                                "(check the project id, and that the Compute Engine API is enabled)")
            return sorted(last(z) for z in region.zones)

        return self.memo.get("zones", load)

    def zones(self) -> list[str]:
        return [self.site.zone] if self.site.zone else self.region_zones()

    def get_instance(self, zone: str, name: str) -> Any:
        return self.get(f"get instance {name}", self.instances, zone=zone, instance=name)

    def list_instances(self, deployment: str | None, node: str | None = None) -> list[Any]:
        """Instances labelled with the deployment (any labctl deployment if None; and node): one list call on a
        zone site, else one aggregatedList call for all zones."""
        flt = label_filter(deployment, node)
        if self.site.zone:
            return self.listing("list instances", self.instances, zone=self.site.zone, filter=flt)
        return self.aggregated("list instances", self.instances, "instances", flt)

    def snapshot(self, what: str) -> Snapshot:
        """The list of `what` shared by the threads polling this site (one call per poll round)."""
        with self.lock:
            return self._polls.setdefault(what, Snapshot(self.poll_interval * 0.9))

    def wait_started(self) -> float:
        """When this thread's current `wait` began (a shared list must be newer than that)."""
        return getattr(self._waiting, "since", -1e18)


# -- the collections labctl uses, and what is done the same way on each -------------------------------
@dataclass(frozen=True)
class Collection:
    """A Compute Engine collection: its client (a Session attribute), request field, scope, and whether labctl
    marks its objects with labels (else in the description: firewalls, networks, subnetworks have no labels)."""

    noun: str
    client: str
    key: str
    scope: str  # "global" | "region" | "zone"
    labelled: bool


COLLECTIONS = {
    "server": Collection("instance", "instances", "instance", "zone", True),
    "volume": Collection("disk", "disks", "disk", "zone", True),
    "floating_ip": Collection("address", "addresses", "address", "region", True),
    "secgroup": Collection("firewall", "firewalls", "firewall", "global", False),
    "network": Collection("network", "networks", "network", "global", False),
    "subnet": Collection("subnetwork", "subnetworks", "subnetwork", "region", False),
}


def where(s: Session, kind: str) -> dict[str, str]:
    return {"region": s.region} if COLLECTIONS[kind].scope == "region" else {}


def deployment_of(obj: Any) -> str | None:
    """The labctl deployment an object is marked with (its label, or for kinds without labels the mark in its
    description), or None."""
    labels = getattr(obj, "labels", None)  # (proto-plus: AttributeError for a field the kind does not have)
    return labels.get(DEPLOYMENT_LABEL) if labels is not None else described(obj.description)


def mine(plan: Plan) -> Callable[[Any], bool]:
    """Whether an object is marked with this deployment (labels carry it as a label value: sanitised)."""
    return lambda obj: deployment_of(obj) in (plan.deployment, label_value(plan.deployment))


def marked(s: Session, kind: str, deployment: str | None = None) -> list[Any]:
    """The objects of a collection in the site's project and region marked by labctl (this deployment's, or any
    deployment's if None): labelled ones by a list filter, the others by their description. Never an unmarked
    object, whatever its name."""
    c = COLLECTIONS[kind]
    client, flt = getattr(s, c.client), label_filter(deployment)
    if c.scope == "zone":
        return [o for o in s.aggregated(f"list {c.noun}s", client, f"{c.noun}s", flt, region_only=True)
                if o.status != "DELETING"]
    if c.labelled:
        return s.listing(f"list {c.noun}s", client, filter=flt, **where(s, kind))
    return [o for o in s.listing(f"list {c.noun}s", client, **where(s, kind))
            if (dep := described(o.description)) is not None and deployment in (None, dep)]


def named(s: Session, kind: str, name: str, plan: Plan) -> list[Any]:
    """This deployment's objects of a kind with this name: one get, or for a zonal one (its zone is not known)
    one aggregated list, healthy ones first."""
    c, name = COLLECTIONS[kind], gce_name(name)
    client = getattr(s, c.client)
    if c.scope == "zone":
        objs = s.aggregated(f"find {c.noun} {name}", client, f"{c.noun}s", f'name = "{name}"')
    else:
        objs = [o for o in [s.get(f"get {c.noun} {name}", client, **where(s, kind), **{c.key: name})] if o]
    return sorted((o for o in objs if mine(plan)(o) and getattr(o, "status", "") != "DELETING"),
                  key=lambda o: {"READY": 0, "RUNNING": 0, "CREATING": 1}.get(getattr(o, "status", ""), 2))


def delete_kind(s: Session, kind: str, found: Sequence[Found],
                release: Callable[[str, str, Any], None] | None = None) -> None:
    """Delete these (404 = done) and wait until they are gone. A record without its zone is looked up by name in
    every zone. With `release(zone, instance, obj)`, each object is first let go by the instances it lists as
    users (an address or a disk in use cannot be deleted). Never the site's own network."""
    c = COLLECTIONS[kind]
    client, targets = getattr(s, c.client), []
    for f in found:
        if (parsed := ref(f.cloud_id)) is None and c.scope == "zone":
            targets += [({"zone": last(o.zone)}, o.name) for o in s.aggregated(
                f"find {c.noun}", client, f"{c.noun}s", f'name = "{gce_name(f.name)}"')]
        else:
            targets.append(parsed or (where(s, kind), gce_name(f.name)))
    for scope, name in targets if release else []:
        obj = s.get(f"get {c.noun} {name}", client, **scope, **{c.key: name})
        for user in obj.users if obj is not None else []:
            if (r := ref(user)) and "zone" in r[0]:
                release(r[0]["zone"], r[1], obj)
    s.delete_all(c.noun, client, c.key, [(scope, name) for scope, name in targets
                                         if not (kind == "network" and name == s.site_network)])
