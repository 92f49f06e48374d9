"""The AWS session: credentials, clients, the error table, and the calls every handler makes.

boto3 is imported only inside functions: importing this module loads no SDK.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
          "BucketAlreadyOwnedByYou", "ResourceAlreadyExists", "AlreadyExists"}
S3_MISSING = {"NoSuchBucket", "404", "NotFound", "NoSuchKey"}
IN_USE_GRACE = 300.0  # seconds a delete retries DependencyViolation (interfaces of terminated instances linger)
HELP = ("set AWS_PROFILE (or --cloud PROFILE), or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
        "or run `aws sso login` / `aws configure`")


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
        if code.endswith("NotFound") or code in S3_MISSING:
            return kit.NotFound(f"{where}: {text}")
        if code in EXISTS:
            return Conflict(f"{where}: {text}")
        if code in NO_CAPACITY and (code != "Unsupported" or "instance type" in message.lower()
                                    or "availability zone" in message.lower()):
            return NoCapacity(f"{where}: {text}")
        if code in QUOTA:
            return QuotaExceeded(f"{where}: quota exceeded ({text}); ask AWS for a higher limit or "
                                 "use a smaller instance type")
        if code in THROTTLED or status == 429:
            return RateLimited(f"{where}: throttled ({text})")
        if code in CREDENTIALS:
            return CredentialsError(f"{where}: AWS refused the credentials ({text})")
        if code in TRANSIENT or (status is not None and int(status) >= 500):
            return Transient(f"{where}: AWS error {status} ({text})")
        return CloudError(f"{where}: {text}")
    if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
        return CredentialsError(f"{where}: no usable AWS credentials ({exc}); {HELP}")
    sso = tuple(getattr(bex, n) for n in ("SSOError", "SSOTokenLoadError", "TokenRetrievalError",
                                            "UnauthorizedSSOTokenError", "CredentialRetrievalError")
                if hasattr(bex, n))
    if sso and isinstance(exc, sso):
        return CredentialsError(f"{where}: AWS credentials could not be loaded ({exc}); "
                                "run `aws sso login` or check your profile")
    if isinstance(exc, bex.ProfileNotFound):
        return CredentialsError(f"{where}: {exc}")
    if isinstance(exc, bex.ConnectTimeoutError | bex.ReadTimeoutError):
        return Transient(f"{where}: timed out ({exc})")
    if isinstance(exc, bex.EndpointConnectionError | bex.ConnectionClosedError | bex.HTTPClientError):
        return Transient(f"{where}: connection problem ({exc})")
    if isinstance(exc, bex.ParamValidationError):
        return CloudError(f"{where}: invalid request ({exc})")
    if isinstance(exc, bex.BotoCoreError):
        return CloudError(f"{where}: {exc}")
    if isinstance(exc, TimeoutError | ConnectionError):
        return Transient(f"{where}: {type(exc).__name__}: {exc}")
    return CloudError(f"{where}: {type(exc).__name__}: {exc}")


def error_code(exc: Exception) -> str:
    """The AWS error code of a botocore ClientError ("" for anything else)."""
    return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code") or "")


# -- credentials ---------------------------------------------------------------------------------------------
def load_session(site: Site, cloud: str | None) -> tuple[Any, str]:
    """A boto3 session from the standard chain (or profile `cloud`), and where its credentials come from."""
    import boto3
    from botocore import exceptions as bex

    def profile_missing() -> CredentialsError:
        if cloud:
            return CredentialsError(
                f"{site.name}: AWS profile '{cloud}' not found in ~/.aws/config or ~/.aws/credentials")
        env = "AWS_PROFILE" if os.environ.get("AWS_PROFILE") else "AWS_DEFAULT_PROFILE"
        return CredentialsError(f"{site.name}: AWS profile '{os.environ.get(env)}' (named by {env}) not found "
                                f"in ~/.aws/config or ~/.aws/credentials; fix or unset {env}")

    try:
        session = boto3.session.Session(profile_name=cloud, region_name=site.region)
        creds = session.get_credentials()
    except bex.ProfileNotFound:
        raise profile_missing() from None
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
    if creds is None:
        return
    held = vars(creds)  # static credentials: plain attributes; refreshable ones: _secret_key/_token until refreshed
    for name in ("secret_key", "_secret_key", "token", "_token"):
        value = held.get(name)
        if isinstance(value, str):
            register_secret(value)


# -- tags ----------------------------------------------------------------------------------------------------
def tags_of(items: Sequence[Mapping[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in items or []}


def tag_list(plan: Plan, node: str | None = None, name: str | None = None) -> list[dict[str, str]]:
    tags = dict(plan.tags)
    if node:
        tags[naming.TAG_NODE] = node
    if name:
        tags["Name"] = name
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def tagged(plan: Plan, **tags: str) -> list[dict[str, Any]]:
    """EC2 filters: the deployment's tag, plus `tag:<key>` = value for each of `tags` (Name=..., node=...)."""
    keys = {"name": "Name", "node": naming.TAG_NODE}
    return [{"Name": f"tag:{naming.TAG_DEPLOYMENT}", "Values": [plan.deployment]},
            *({"Name": f"tag:{keys.get(k, k)}", "Values": [v]} for k, v in tags.items())]


#: The one table of the adapter's per-kind handlers (find, create, delete), filled by instances, network, storage.
TABLE = kit.HandlerTable("aws")


class AwsSession:
    """What every handler uses: the site, the clients, `call` (errors translated, retried), look-ups by kind."""

    def __init__(self, site: Site, session: Any, endpoint_url: str | None = None,
                 poll_interval: float | None = None, call_retries: int = 5,
                 credential_source: str | None = None) -> None:
        self.site = site
        self.session = session
        self.endpoint_url = endpoint_url
        self.region = site.region
        self.poll_interval = poll_interval if poll_interval is not None else site.poll_interval
        self.call_retries = call_retries
        self.credential_source = credential_source
        self.limiter = kit.RateLimiter(None)
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.memo = kit.Memo()  # look-ups that do not change during a run: images, default VPC, zones, offers
        self.handlers = TABLE.bind(self)
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

    @property
    def ec2(self) -> Any:
        return self._client("ec2", "ec2", 2, max_pool_connections=16)

    @property
    def ec2_once(self) -> Any:
        """A client that never resends a request (for calls without an idempotency token)."""
        return self._client("ec2_once", "ec2", 1)

    @property
    def s3(self) -> Any:
        """S3 on the same session (and endpoint). Path-style addressing against a custom endpoint (the emulator on
        127.0.0.1 has no per-bucket host names); botocore's default (virtual-hosted) against AWS itself."""
        return self._client("s3", "s3", 2, s3={"addressing_style": "path" if self.endpoint_url else "auto"})

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

    def once(self, what: str, create: Callable[[], T], lookup: Callable[[], T | None]) -> T:
        """A create call without an idempotency token, tagged at creation: sent once (no client retry); after a
        lost answer (timeout, 5xx), look the tagged resource up first and send again only if there is none."""
        for attempt in range(3):
            try:
                return self.call(what, create, resend=False)
            except (Transient, RateLimited):
                found = lookup()
                if found is not None:
                    return found
                if attempt == 2:
                    raise
                time.sleep(max(self.poll_interval, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")

    def create_unique(self, what: str, create: Callable[[], T], lookup: Callable[[], T | None],
                      relist: Callable[[], Sequence[T]], delete: Callable[[T], None], *,
                      ident: Callable[[T], str], rank: Callable[[T], Any] = lambda item: 0) -> T:
        """`once`, then for a resource whose name AWS does not keep unique (VPC, subnet, gateway, Elastic IP): if
        this run made one, `converge_created` with a concurrent run's (both keep the same one)."""
        made: list[T] = []

        def send() -> T:
            made.append(create())
            return made[-1]

        started = time.monotonic()
        found = self.once(what, send, lookup)
        if not made:
            return found  # looked up after a lost answer: nothing of this run's to converge
        return converge_created(found, time.monotonic() - started, relist, delete, ident=ident, rank=rank)

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

    # -- dispatch --------------------------------------------------------------------------------------------
    def find(self, res: Resource, plan: Plan) -> Found | None:
        """The look-up of `res` by its kind's handler (None for kinds AWS does not use: reservation)."""
        return self.handlers[res.kind].find(res, plan) if res.kind in self.handlers else None
