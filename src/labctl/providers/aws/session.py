"""The AWS session: credentials, clients, the error table, the calls every handler makes, and `Ec2Kind`, the one
description of an EC2 resource family (how it is listed by labctl's tags, seen as a `Found`, and deleted) that
`list_owned`, `inventory`, the duplicate clean-up of racing creates and the plain deletes share.

boto3 is imported only inside functions: importing this module loads no SDK.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
)
from labctl.providers import kit
from labctl.providers.base import Found, converge_created

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource
    from labctl.sites import Site

T = TypeVar("T")
Item = dict[str, Any]  # one element of an EC2 describe answer
log = logging.getLogger(__name__)

# -- the error table: AWS error codes -> labctl's kinds --------------------------------------------------------
NO_CAPACITY = {"InsufficientInstanceCapacity", "InsufficientHostCapacity", "InsufficientCapacity",
               "InsufficientReservedInstanceCapacity", "Unsupported"}
QUOTA = {"VcpuLimitExceeded", "InstanceLimitExceeded", "AddressLimitExceeded", "ResourceLimitExceeded",
         "SecurityGroupLimitExceeded", "RulesPerSecurityGroupLimitExceeded", "MaxSpotInstanceCountExceeded",
         "KeyPairLimitExceeded", "VolumeLimitExceeded"}
THROTTLED = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException",
             "RequestThrottled", "SlowDown"}
CREDENTIALS = {"AuthFailure", "InvalidClientTokenId", "SignatureDoesNotMatch", "ExpiredToken",
               "ExpiredTokenException", "RequestExpired", "UnrecognizedClientException", "OptInRequired",
               "UnauthorizedOperation", "Blocked", "PendingVerification", "InvalidAccessKeyId"}
TRANSIENT = {"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable", "RequestTimeout",
             "RequestTimeoutException", "PriorRequestNotComplete",
             "InvalidIPAddress.InUse"}  # a fixed IP still held by the interface of an instance going away
# "It is there already": a retry after a lost answer or a concurrent run made it (`Conflict`: find and adopt).
EXISTS = {"InvalidKeyPair.Duplicate", "InvalidGroup.Duplicate", "InvalidPermission.Duplicate", "RouteAlreadyExists",
          "BucketAlreadyOwnedByYou", "ResourceAlreadyExists", "AlreadyExists",
          "InvalidSubnet.Conflict"}  # a subnet of that CIDR in the VPC: a racing run's
S3_MISSING = {"NoSuchBucket", "404", "NotFound", "NoSuchKey"}
IN_USE_GRACE = 300.0  # seconds a delete retries DependencyViolation (interfaces of terminated instances linger)
HELP = ("set AWS_PROFILE (or --cloud PROFILE), or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
        "or run `aws sso login` / `aws configure`")
END_TAG = "labctl-ends-at"  # a server's end (ISO 8601, UTC) that the node itself enforces (see the package doc)


def translate(where: str, exc: Exception) -> Exception:
    """A botocore exception as a labctl error kind; `where` is "<site>: <what>"."""
    from botocore import exceptions as bex

    if isinstance(exc, LabctlError):
        return exc
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error") or {}
        code = str(err.get("Code") or "")
        message = (str(err.get("Message") or "").strip().splitlines() or [code or str(exc)])[0][:300]
        status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        text = f"{code}: {message}" if code else message
        capacity = code in NO_CAPACITY and (code != "Unsupported" or "instance type" in message.lower()
                                            or "availability zone" in message.lower())
        for hit, kind, say in (
                (code.endswith("NotFound") or code in S3_MISSING, kit.NotFound, "{}"), (code in EXISTS, Conflict, "{}"),
                (capacity, NoCapacity, "{}"),
                (code in QUOTA, QuotaExceeded, "quota exceeded ({}); ask AWS for a higher limit or use a smaller "
                                               "instance type"),
                (code in THROTTLED or status == 429, RateLimited, "throttled ({})"),
                (code in CREDENTIALS, CredentialsError, "AWS refused the credentials ({})"),
                (code in TRANSIENT or (status is not None and int(status) >= 500), Transient,
                 f"AWS error {status} ({{}})")):
            if hit:
                return kind(f"{where}: " + say.format(text))
        return CloudError(f"{where}: {text}")
    sso = tuple(getattr(bex, n) for n in ("SSOError", "SSOTokenLoadError", "TokenRetrievalError",
                                            "UnauthorizedSSOTokenError", "CredentialRetrievalError") if hasattr(bex, n))
    for types, kind, say in (
            ((bex.NoCredentialsError, bex.PartialCredentialsError), CredentialsError,
             "no usable AWS credentials ({}); " + HELP),
            (sso, CredentialsError, "AWS credentials could not be loaded ({}); run `aws sso login` or check your "
                                    "profile"),
            ((bex.ProfileNotFound,), CredentialsError, "{}"),
            ((bex.ConnectTimeoutError, bex.ReadTimeoutError), Transient, "timed out ({})"),
            ((bex.EndpointConnectionError, bex.ConnectionClosedError, bex.HTTPClientError), Transient,
             "connection problem ({})"),
            ((bex.ParamValidationError,), CloudError, "invalid request ({})"),
            ((bex.BotoCoreError,), CloudError, "{}")):
        if types and isinstance(exc, types):
            return kind(f"{where}: " + say.format(exc))
    if isinstance(exc, TimeoutError | ConnectionError):
        return Transient(f"{where}: {type(exc).__name__}: {exc}")
    return CloudError(f"{where}: {type(exc).__name__}: {exc}")


def token(*parts: object) -> str:
    """An idempotency token (ClientToken, ≤ 64 characters): the same parts give the same token. A launch's parts are
    (deployment, node, type, zone, attempt); a volume's (deployment, volume, server instance), so a new `up` (a new
    instance) after `down --delete-volumes` makes a new volume instead of getting the deleted one's answer back."""
    return "labctl-" + hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:40]


# -- credentials ---------------------------------------------------------------------------------------------
def load_session(site: Site, cloud: str | None) -> tuple[Any, str]:
    """A boto3 session from the standard chain (or profile `cloud`), and where its credentials come from."""
    import boto3
    from botocore import exceptions as bex

    try:
        session = boto3.session.Session(profile_name=cloud, region_name=site.region)
        creds = session.get_credentials()
    except bex.ProfileNotFound:
        env = "AWS_PROFILE" if os.environ.get("AWS_PROFILE") else "AWS_DEFAULT_PROFILE"
        named = f"'{cloud}'" if cloud else f"'{os.environ.get(env)}' (named by {env})"
        raise CredentialsError(f"{site.name}: AWS profile {named} not found in ~/.aws/config or ~/.aws/credentials"
                               + ("" if cloud else f"; fix or unset {env}")) from None
    except bex.PartialCredentialsError as exc:
        raise CredentialsError(f"{site.name}: incomplete AWS credentials ({exc})") from None
    except (bex.BotoCoreError, ValueError) as exc:
        raise CredentialsError(f"{site.name}: cannot load AWS credentials ({exc}); {HELP}") from None
    if creds is None:
        raise CredentialsError(f"{site.name}: no AWS credentials found; {HELP}")
    register_credentials(session)
    method = getattr(creds, "method", None) or "unknown"
    where = f"profile '{session.profile_name}'" if session.profile_name != "default" or cloud else method
    log.debug("%s: AWS credentials from %s (%s)", site.name, where, method)
    return session, str(where)


def register_credentials(session: Any) -> None:
    """Register the session's resolved secret key and session token with `labctl.redact` (masked in every
    message from then on), as far as they are loaded: never triggers a refresh or a network call."""
    from labctl.redact import register_secret

    try:
        creds = session.get_credentials()
    except Exception:  # noqa: BLE001 - nothing to register; the call itself reports what is wrong
        return
    held = vars(creds) if creds is not None else {}  # static: attributes; refreshable: _secret_key/_token
    for value in (held.get(name) for name in ("secret_key", "_secret_key", "token", "_token")):
        if isinstance(value, str):
            register_secret(value)


# -- tags ----------------------------------------------------------------------------------------------------
def tags_of(items: Sequence[Mapping[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in items or []}


def tag_spec(plan: Plan, *types: str, node: str | None = None, name: str | None = None,
             **extra: str) -> list[dict[str, Any]]:
    """TagSpecifications: every resource is tagged as it is made (a rerun after a crash finds it by its tags)."""
    tags = {**plan.tags, **({naming.TAG_NODE: node} if node else {}), **({"Name": name} if name else {}), **extra}
    return [{"ResourceType": t, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]} for t in types]


def tagged(plan: Plan, **tags: str) -> list[dict[str, Any]]:
    """EC2 filters: the deployment's tag, plus `tag:<key>` = value for each of `tags` (name=..., node=...)."""
    keys = {"name": "Name", "node": naming.TAG_NODE}
    return [{"Name": f"tag:{naming.TAG_DEPLOYMENT}", "Values": [plan.deployment]},
            *({"Name": f"tag:{keys.get(k, k)}", "Values": [v]} for k, v in tags.items())]


def labelled(found: Found, tags: Mapping[str, str], created: Any = None) -> Found:
    """`found` with what `inventory` reports: deployment, owner and end (from its tags), creation time."""
    found.attrs.update(deployment=tags.get(naming.TAG_DEPLOYMENT), owner=tags.get(naming.TAG_OWNER),
                       created=created.isoformat() if hasattr(created, "isoformat") else created, end=tags.get(END_TAG))
    return found


@dataclass(frozen=True)
class Ec2Kind:
    """An EC2 resource family: listed by `describe` (its answer's `key`; instances flattened out of their
    reservations), `id` its id field; `found` makes labctl's view of one; `delete` the boto3 call that deletes one
    by id (`param`, the id field by default); `owned` filters added to the listing of what labctl owns (data volumes
    only, instances not terminated); `created` the item's creation-time field."""

    kind: str
    noun: str
    describe: str
    key: str
    id: str
    found: Callable[[Item], Found]
    delete: str = ""
    param: str = ""
    owned: tuple[dict[str, Any], ...] = ()
    created: str = ""

    def list(self, p: AwsSession, filters: Sequence[Mapping[str, Any]], owned: bool = False) -> list[Item]:
        items = p.describe(f"list {self.noun}s", self.describe, self.key,
                           Filters=[*filters, *(self.owned if owned else ())])
        return [i for r in items for i in r["Instances"]] if self.key == "Reservations" else items

    def remove(self, p: AwsSession, ident: str) -> None:
        """Delete one (missing is fine), retried while in use (an instance's network interface holds its security
        group and subnet for a while after termination)."""
        p.in_use_retry(f"delete {self.noun}", lambda: getattr(p.ec2, self.delete)(**{self.param or self.id: ident}))

    def delete_all(self, p: AwsSession, found: Sequence[Found], plan: Plan) -> None:
        for f in found:
            self.remove(p, f.cloud_id or f.name)


#: The families labctl makes, in the order `list_owned` and `inventory` report them (filled by the modules).
KINDS: list[Ec2Kind] = []
#: The one table of the adapter's per-kind handlers (find, create, delete), filled by instances, network, storage.
TABLE = kit.HandlerTable("aws")


class AwsSession:
    """What every handler uses: the site, the clients, `call` (errors translated, retried), look-ups by kind."""

    def __init__(self, site: Site, session: Any, endpoint_url: str | None = None,
                 poll_interval: float | None = None, call_retries: int = 5,
                 credential_source: str | None = None) -> None:
        self.site, self.session, self.endpoint_url, self.region = site, session, endpoint_url, site.region
        self.poll_interval = poll_interval if poll_interval is not None else site.poll_interval
        self.call_retries, self.credential_source = call_retries, credential_source
        self.limiter = kit.RateLimiter(None)
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.memo = kit.Memo()  # look-ups that do not change during a run: images, default VPC, zones, offers
        self.handlers = TABLE.bind(self)
        self.kinds = frozenset(self.handlers)  # (`kind in handlers` raises CloudError)
        self.snapshots: dict[str, kit.Snapshot] = {}  # lab -> its instances, one listing per poll round
        self.dead: dict[tuple[str, str], int] = {}  # (deployment, server key) -> earlier instances, all gone

    def set_rate_limit(self, calls_per_second: float | None) -> None:
        """Class mode's --rate: at most this many HTTP requests per second from this adapter (every client)."""
        self.limiter = kit.RateLimiter(calls_per_second)

    # -- clients ---------------------------------------------------------------------------------------------
    def _client(self, key: str, service: str, attempts: int, **extra: Any) -> Any:
        with self._lock:
            if key not in self._clients:
                from botocore.config import Config

                config = Config(retries={"total_max_attempts": attempts, "mode": "standard"}, connect_timeout=10,
                                read_timeout=60, user_agent_appid="labctl", **extra)
                client = self.session.client(service, region_name=self.region, endpoint_url=self.endpoint_url,
                                             config=config)
                client.meta.events.register("before-send", lambda **_: self.limiter.acquire())
                self._clients[key] = client
            return self._clients[key]

    ec2 = property(lambda self: self._client("ec2", "ec2", 2, max_pool_connections=16))
    # A client that never resends a request (for calls without an idempotency token).
    ec2_once = property(lambda self: self._client("ec2_once", "ec2", 1))
    # S3 on the same session (and endpoint). Path-style addressing against a custom endpoint (the emulator on
    # 127.0.0.1 has no per-bucket host names); botocore's default (virtual-hosted) against AWS itself.
    s3 = property(lambda self: self._client("s3", "s3", 2, s3={"addressing_style": "path" if self.endpoint_url
                                                               else "auto"}))

    # -- calls -----------------------------------------------------------------------------------------------
    def translate(self, what: str, exc: Exception) -> Exception:
        register_credentials(self.session)  # as they are now (refreshed ones too), before any message
        return translate(f"{self.site.name}: {what}", exc)

    def call(self, what: str, fn: Callable[[], T], missing_ok: bool = False, resend: bool = True) -> T | None:
        """One AWS call, errors translated (the table above); throttling and transient faults are retried with
        backoff (transient ones only if resend). The rate limit applies to every HTTP request (client hook)."""
        return kit.call(what, fn, translate=self.translate, missing_ok=missing_ok, resend=resend,
                        attempts=self.call_retries, backoff=self.poll_interval)

    def describe(self, what: str, operation: str, key: str, **kwargs: Any) -> list[Any]:
        """Every item (`key` of the answer) of an EC2 describe call, through its boto3 paginator if it has one."""
        if self.ec2.can_paginate(operation):
            out = self.call(what, lambda: self.ec2.get_paginator(operation).paginate(**kwargs).build_full_result())
        else:
            out = self.call(what, lambda: getattr(self.ec2, operation)(**kwargs))
        return list((out or {}).get(key) or [])

    def create_unique(self, family: Ec2Kind, what: str, create: Callable[[], Item],
                      relist: Callable[[], Sequence[Item]], rank: Callable[[Item], Any] = lambda item: 0) -> Item:
        """A create without an idempotency token (CreateVpc, CreateSubnet, CreateInternetGateway, AllocateAddress),
        tagged at creation: sent once (no client retry); after a lost answer (timeout, 5xx) the tagged resource is
        looked up first (the first of `relist()` by rank) and made again only if there is none. AWS does not keep
        these names unique: when this run made one, `converge_created` with a concurrent run's (both keep the
        same one, the loser deletes its own)."""
        def ident(item: Item) -> str:
            return str(item[family.id])

        for attempt in range(3):
            clock = kit.CloudClock()
            try:
                made = self.call(what, create, resend=False)
            except (Transient, RateLimited):
                if (found := min(relist(), key=lambda i: (rank(i), ident(i)), default=None)) is not None:
                    return found  # nothing of this run's to converge
                if attempt == 2:
                    raise
                time.sleep(max(self.poll_interval, 0.05) * (attempt + 1))
                continue
            return converge_created(made, clock.elapsed(), relist,
                                    lambda i: family.remove(self, ident(i)), ident=ident, rank=rank)
        raise AssertionError("unreachable")

    def in_use_retry(self, what: str, fn: Callable[[], Any], codes: Sequence[str] = ("DependencyViolation",),
                     timeout: float | None = None) -> None:
        """A delete (NotFound is success) retried while AWS says something still uses the resource (the network
        interfaces of terminated instances linger for a while), for at most `timeout` (IN_USE_GRACE) seconds."""
        kit.retry_in_use(lambda: self.call(what, fn, missing_ok=True),
                         is_in_use=lambda exc: any(code in str(exc) for code in codes),
                         timeout=IN_USE_GRACE if timeout is None else timeout,
                         interval=max(self.poll_interval, 0.05), what=what)

    def until(self, what: str, refresh: Callable[[], Any], status: Callable[[Any], str], timeout: float) -> None:
        """Poll `refresh` until it says "done" or returns None (gone); "error" (or another status) fails."""
        kit.poll_until(refresh, status=status, pending=("pending",), target=("done", "gone"), timeout=timeout,
                       interval=max(self.poll_interval, 0.05), not_found_checks=1, what=f"{self.site.name}: {what}")

    def find(self, res: Resource, plan: Plan) -> Found | None:
        """The look-up of `res` by its kind's handler (None for kinds AWS does not use: reservation)."""
        return self.handlers[res.kind].find(res, plan) if res.kind in self.kinds else None
