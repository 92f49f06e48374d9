"""AWS adapter (boto3): key pairs, security groups, instances and Elastic IPs (in the region's default VPC, or in a
VPC of the deployment's own when the lab has a private network), EBS volumes and S3 buckets.

Credentials come from the standard chain (`--cloud PROFILE`, AWS_PROFILE, the AWS_* keys, SSO, config files)
through `boto3.session.Session`; an emulated site (`sim-aws`) talks to the testbed's EC2 front layer
(`labctl.testbed.aws`) with dummy keys and none of the user's AWS settings.

How the usual EC2 traps are handled:
- every launch carries a deterministic `ClientToken` (deployment, node, type, zone, attempt), so a retried or
  repeated `RunInstances` (client timeout, botocore retry, a rerun after a crash) never makes a second
  instance; every resource is tagged at creation (`TagSpecifications`), so a rerun finds it by tag;
- `InsufficientInstanceCapacity` / `Unsupported` in one zone: a region site tries the region's other zones
  (their default subnets) before raising `NoCapacity`, so the engine tries the next instance type;
  `VcpuLimitExceeded` / `InstanceLimitExceeded` become `QuotaExceeded`;
- clients retry at most once by themselves (`max_attempts=2`): an HTTP 500 capacity error is not repeated
  many times; throttling and transient errors are retried here with backoff;
- `wait` makes one `DescribeInstances` per poll round (filtered by the deployment tag) for all nodes;
- Elastic IPs are disassociated before they are released (AWS does it on termination, emulators may not).

How the provider-neutral kinds map onto AWS:
- `network`: a VPC of the deployment (CIDR = its subnet's), with an internet gateway attached and a 0.0.0.0/0
  route to it in the VPC's main route table: every node keeps an ephemeral public IPv4 for outbound traffic (what
  Chameleon's shared network gives), and the Elastic IP works. A rerun after a crash between these calls
  finishes them (`find` says "incomplete"). The gateway is deleted with the VPC (detached first).
- `subnet`: one subnet in that VPC, in one zone: the site's, or the zone of a volume kept for a node on it, or
  else the first zone of the region that offers every candidate type of its nodes. Its nodes are launched in
  that zone only (a full zone means the next instance type, not the next zone).
- `router`: nothing to make (the VPC's internet gateway routes already): a ready Found; delete is a no-op.
- `secgroup`: in the deployment's VPC when the lab has a network, plus "all traffic from the network's CIDR"
  when the network has no port security (nodes talk freely, as with Neutron port security off).
- `server` on a network: one interface in the subnet with the node's fixed private IP, the group, and a public
  IPv4; `attrs["private_ips"]` = {network name: private IP}, so nodes without an Elastic IP are reached through
  one with (`ssh -J`).
- `volume`: a gp3 EBS volume in its server's zone (`ClientToken` from deployment, volume and instance), tagged
  like everything plus `labctl:keep` and `labctl:volume`; a kept volume of an earlier `up` is found by tags and
  reused (on a region site the server is then launched in the volume's zone). `volume_attachment`: AttachVolume
  at /dev/sdf (/dev/sdg... for a node's further volumes); the guest sees it as
  /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol<id> on Nitro instances, /dev/xvdf on Xen ones.
- `bucket`: an S3 bucket named after the resource (lower case), tagged with the deployment and `labctl:keep`;
  delete empties it (every object version) first.
The calls without an idempotency token (CreateVpc, CreateSubnet, CreateInternetGateway, AllocateAddress) are never
resent blindly: after a lost answer the tagged resource is looked up first, and made again only if it is not there.

boto3 is imported only inside functions: `import labctl.providers.aws` loads no SDK.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import re
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
    UserError,
)
from labctl.providers.base import Found, ProgressFn, converge_created, create_or_adopt, scrub

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource
    from labctl.sites import Site

T = TypeVar("T")
log = logging.getLogger(__name__)

CANONICAL = "099720109477"
#: Abstract image name -> (owners, AMI name pattern); the newest available x86_64 match is used.
IMAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "ubuntu-24.04": ((CANONICAL,), "ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-amd64-server-*"),
    "ubuntu-22.04": ((CANONICAL,), "ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-amd64-server-*"),
    "ubuntu-24.04-cuda": (("amazon",), "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) *"),
    "ubuntu-22.04-cuda": (("amazon",), "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"),
}

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
KEEP_TAG = "labctl:keep"  # "true" when `down` keeps the volume / bucket (Chameleon's VOLUME_KEEP metadata)
VOLUME_TAG = "labctl:volume"  # the profile's name of a data volume (root volumes do not have it)
BUCKET_TAG = "labctl:bucket"  # the profile's name of an object store
VOLUME_DEVICES = "fghijklmnop"  # /dev/sdf, /dev/sdg...: a node's data volumes, in plan order
NVME_BY_ID = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_"
IN_USE_GRACE = 300.0  # seconds a delete retries DependencyViolation (interfaces of terminated instances linger)
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
LIVE = ("pending", "running")
NOT_TERMINATED = ("pending", "running", "stopping", "stopped", "shutting-down")
MISSING_GRACE = 30.0  # seconds a new instance may be absent from DescribeInstances (eventual consistency)
_DUMMY_KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
_HELP = ("set AWS_PROFILE (or --cloud PROFILE), or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
         "or run `aws sso login` / `aws configure`")


class _NotFound(CloudError):
    """A *.NotFound answer: `_call(..., missing_ok=True)` turns it into None."""


def connect(site: Site, *, cloud: str | None = None, testbed: Callable[[], Any] | None = None) -> AwsProvider:
    """Credentials from the standard AWS chain (or profile `cloud`), or the emulated testbed for `sim-aws`."""
    if site.emulated:
        if testbed is None:
            raise UserError(f"{site.name} is emulated but no testbed was given")
        tb = testbed()
        emu = tb.aws()
        site = dataclasses.replace(site, ssh_port=getattr(tb, "ssh_port", None) or emu.world.ssh_port)
        # The emulated world's own access key (private to its owner; registered with labctl.redact).
        return AwsProvider(site, emu.world.session(site.region), endpoint_url=emu.endpoint,
                           credential_source="the emulated testbed")
    session, source = _session(site, cloud)
    return AwsProvider(site, session, credential_source=source)


def describe_credentials(site: Site, cloud: str | None = None) -> str:
    """One line for `labctl sites`: where the AWS credentials come from, or what is missing."""
    try:
        return f"found: {_session(site, cloud)[1]}"
    except CredentialsError as exc:
        return "missing: " + str(exc).removeprefix(f"{site.name}: ")


def _session(site: Site, cloud: str | None) -> tuple[Any, str]:
    import os

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
        raise CredentialsError(f"{site.name}: cannot load AWS credentials ({exc}); {_HELP}") from None
    if creds is None:
        raise CredentialsError(f"{site.name}: no AWS credentials found; {_HELP}")
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


def _isolated_session(region: str) -> Any:
    """Dummy keys, and none of the user's AWS settings (AWS_PROFILE, ~/.aws/*): for the emulated site."""
    import boto3
    import botocore.session

    unset = (None, None, None, None)
    core = botocore.session.Session(session_vars={
        "profile": unset,
        "config_file": (None, None, "/nonexistent/labctl-aws-config", None),
        "credentials_file": (None, None, "/nonexistent/labctl-aws-credentials", None),
    })
    return boto3.session.Session(botocore_session=core, region_name=region, **_DUMMY_KEYS)


def client_token(deployment: str, node: str, instance_type: str, zone: str, attempt: int) -> str:
    """The launch's idempotency token: the same inputs give the same token (≤ 64 characters)."""
    digest = hashlib.sha256(f"{deployment}|{node}|{instance_type}|{zone}|{attempt}".encode()).hexdigest()
    return f"labctl-{digest[:40]}"


def volume_token(deployment: str, volume: str, instance_id: str) -> str:
    """CreateVolume's idempotency token: one per (deployment, volume, server instance), so a retry or a rerun after
    a crash never makes a second volume, and a new `up` (a new instance) after `down --delete-volumes` makes a new
    one instead of getting the deleted volume's answer back."""
    digest = hashlib.sha256(f"{deployment}|{volume}|{instance_id}".encode()).hexdigest()
    return f"labctl-{digest[:40]}"


def bucket_name(name: str) -> str | None:
    """The S3 bucket name for a resource name (lower case, '_' -> '-'), or None if it cannot be a valid one
    (3-63 characters of a-z 0-9 . -, starting and ending with a letter or digit, not an IP address...)."""
    out = name.lower().replace("_", "-")
    if not _BUCKET_NAME.match(out) or ".." in out or ".-" in out or "-." in out:
        return None
    if re.match(r"^\d+\.\d+\.\d+\.\d+$", out) or out.startswith(("xn--", "sthree-")):
        return None
    if out.endswith(("-s3alias", "--ol-s3", "--x-s3")):
        return None
    return out


def device_paths(volume_id: str, device: str) -> list[str]:
    """Where the guest finds an attached EBS volume: the NVMe by-id link (Nitro), then the Xen names."""
    letter = device[-1]
    return [f"{NVME_BY_ID}{volume_id.replace('-', '')}", f"/dev/xvd{letter}", f"/dev/sd{letter}"]


def _tags(items: Sequence[Mapping[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in items or []}


class AwsProvider:
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
        self._ec2: Any = None
        self._ec2_once: Any = None
        self._s3: Any = None
        self._lock = threading.Lock()
        self._cache: dict[str, Any] = {}
        self._dead: dict[tuple[str, str], int] = {}  # (deployment, server key) -> earlier instances, all gone

    # -- clients ----------------------------------------------------------------------------------
    @property
    def ec2(self) -> Any:
        with self._lock:
            if self._ec2 is None:
                from botocore.config import Config

                config = Config(retries={"total_max_attempts": 2, "mode": "standard"}, connect_timeout=10,
                                read_timeout=60, max_pool_connections=16, user_agent_appid="labctl")
                self._ec2 = self.session.client("ec2", region_name=self.region, endpoint_url=self.endpoint_url,
                                                config=config)
            return self._ec2

    @property
    def ec2_once(self) -> Any:
        """A client that never resends a request (for calls without an idempotency token)."""
        with self._lock:
            if self._ec2_once is None:
                from botocore.config import Config

                config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=10,
                                read_timeout=60, user_agent_appid="labctl")
                self._ec2_once = self.session.client("ec2", region_name=self.region,
                                                     endpoint_url=self.endpoint_url, config=config)
            return self._ec2_once

    @property
    def s3(self) -> Any:
        """S3 on the same session (and endpoint). Path-style addressing against a custom endpoint (the emulator on
        127.0.0.1 has no per-bucket host names); botocore's default (virtual-hosted) against AWS itself."""
        with self._lock:
            if self._s3 is None:
                from botocore.config import Config

                config = Config(retries={"total_max_attempts": 2, "mode": "standard"}, connect_timeout=10,
                                read_timeout=60, user_agent_appid="labctl",
                                s3={"addressing_style": "path" if self.endpoint_url else "auto"})
                self._s3 = self.session.client("s3", region_name=self.region, endpoint_url=self.endpoint_url,
                                               config=config)
            return self._s3

    def _call(self, what: str, fn: Callable[[], T], missing_ok: bool = False, resend: bool = True) -> T | None:
        """One EC2 call, errors translated; throttling and transient faults are retried with backoff
        (unless resend=False)."""
        from tenacity import (
            retry,
            retry_if_exception_type,
            stop_after_attempt,
            wait_random_exponential,
        )

        @retry(
            retry=retry_if_exception_type((RateLimited, Transient)),
            wait=wait_random_exponential(multiplier=max(self.poll_interval, 0.01), max=30),
            stop=stop_after_attempt(self.call_retries if resend else 1),
            reraise=True,
        )
        def attempt() -> T:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - translated below, never leaks SDK types
                register_credentials(self.session)  # as they are now (refreshed ones too), before any message
                raise scrub(self._translate(what, exc)) from exc

        try:
            return attempt()
        except _NotFound:
            if missing_ok:
                return None
            raise

    def _translate(self, what: str, exc: Exception) -> Exception:
        from botocore import exceptions as bex

        if isinstance(exc, LabctlError):
            return exc
        where = f"{self.site.name}: {what}"
        if isinstance(exc, bex.ClientError):
            err = exc.response.get("Error") or {}
            code = str(err.get("Code") or "")
            message = (str(err.get("Message") or "").strip().splitlines() or [code or str(exc)])[0][:300]
            status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            text = f"{code}: {message}" if code else message
            if code.endswith("NotFound") or code in S3_MISSING:
                return _NotFound(f"{where}: {text}")
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
            return CredentialsError(f"{where}: no usable AWS credentials ({exc}); {_HELP}")
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

    # -- look-ups (cached: they do not change during a run) ---------------------------------------
    def _image(self, abstract: str) -> dict[str, Any]:
        key = f"image:{abstract}"
        if key in self._cache:
            return self._cache[key]
        if abstract.startswith("ami-"):
            res = self._call(f"find image {abstract}", lambda: self.ec2.describe_images(ImageIds=[abstract]),
                             missing_ok=True)
            images = (res or {}).get("Images", [])
            if not images:
                raise UserError(f"{self.site.name}: image {abstract} not found in {self.region}")
        else:
            owners, pattern = IMAGES.get(abstract, (("self",), abstract))
            res = self._call(f"find image {abstract}", lambda: self.ec2.describe_images(
                Owners=list(owners), Filters=[{"Name": "name", "Values": [pattern]},
                                              {"Name": "state", "Values": ["available"]},
                                              {"Name": "architecture", "Values": ["x86_64"]}]))
            images = sorted(res["Images"], key=lambda i: i.get("CreationDate", ""), reverse=True)
            if not images:
                known = ", ".join(sorted(IMAGES))
                raise UserError(f"{self.site.name}: no image for '{abstract}' in {self.region} (looked for "
                                f"'{pattern}' owned by {', '.join(owners)}); known images: {known}, or an AMI id")
        image = images[0]
        log.debug("%s: image %s is %s (%s)", self.site.name, abstract, image["ImageId"], image.get("Name"))
        self._cache[key] = image
        return image

    def _default_vpc(self) -> str:
        if "vpc" not in self._cache:
            res = self._call("find the default VPC", lambda: self.ec2.describe_vpcs(
                Filters=[{"Name": "isDefault", "Values": ["true"]}]))
            if not res["Vpcs"]:
                raise UserError(f"{self.site.name}: region {self.region} has no default VPC; create one with "
                                "`aws ec2 create-default-vpc`")
            self._cache["vpc"] = res["Vpcs"][0]["VpcId"]
        return self._cache["vpc"]

    def _subnets(self) -> dict[str, str]:
        """Zone -> default subnet of the default VPC (only the site's zone for a zone site)."""
        if "subnets" not in self._cache:
            vpc = self._default_vpc()
            res = self._call("list subnets", lambda: self.ec2.describe_subnets(Filters=[
                {"Name": "vpc-id", "Values": [vpc]}, {"Name": "default-for-az", "Values": ["true"]}]))
            subnets = {s["AvailabilityZone"]: s["SubnetId"] for s in res["Subnets"]}
            if self.site.zone:
                if self.site.zone not in subnets:
                    raise UserError(f"{self.site.name}: zone {self.site.zone} has no default subnet "
                                    f"(zones with one: {', '.join(sorted(subnets)) or 'none'})")
                subnets = {self.site.zone: subnets[self.site.zone]}
            self._cache["subnets"] = dict(sorted(subnets.items()))
        return self._cache["subnets"]

    def _offered_zones(self, types: Sequence[str]) -> dict[str, set[str]]:
        """Instance type -> zones of the region that offer it (one call for all types not yet known)."""
        offered: dict[str, set[str]] = self._cache.setdefault("offered", {})
        missing = sorted({t for t in types if t not in offered})
        if missing:
            res = self._call("list instance type offerings", lambda: self.ec2.describe_instance_type_offerings(
                LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": missing}]))
            found: dict[str, set[str]] = {t: set() for t in missing}
            for o in res["InstanceTypeOfferings"]:
                found.setdefault(o["InstanceType"], set()).add(o["Location"])
            offered.update(found)
        return {t: offered[t] for t in types}

    def _region_zones(self) -> set[str]:
        """The available zones of the region (only the site's for a zone site)."""
        if "zones" not in self._cache:
            out = self._call("list zones", lambda: self.ec2.describe_availability_zones(Filters=[
                {"Name": "state", "Values": ["available"]}]))
            self._cache["zones"] = {z["ZoneName"] for z in out["AvailabilityZones"]}
        zones = self._cache["zones"]
        return {self.site.zone} & zones if self.site.zone else set(zones)

    def _zones_for(self, instance_type: str) -> list[tuple[str, str]]:
        offered = self._offered_zones([instance_type])[instance_type]
        return [(z, s) for z, s in self._subnets().items() if z in offered]

    def _tag_list(self, plan: Plan, node: str | None = None, name: str | None = None) -> list[dict[str, str]]:
        tags = dict(plan.tags)
        if node:
            tags[naming.TAG_NODE] = node
        if name:
            tags["Name"] = name
        return [{"Key": k, "Value": v} for k, v in tags.items()]

    def _deployment_filter(self, plan: Plan) -> list[dict[str, Any]]:
        return [{"Name": f"tag:{naming.TAG_DEPLOYMENT}", "Values": [plan.deployment]}]

    # -- preflight --------------------------------------------------------------------------------
    def preflight(self, plan: Plan) -> None:
        """Credentials (the first call fails on bad ones), images, and that each node has a type here."""
        for image in sorted({n.image for n in plan.nodes}):
            self._image(image)
        for res in plan.by_kind("bucket"):
            if bucket_name(res.name) is None:
                raise UserError(self._bad_bucket(res))
        for res in plan.by_kind("server"):
            for net in res.spec.get("networks") or []:
                self._check_fixed_ip(res, net, plan)
        types = sorted({c for n in plan.nodes for c in n.candidates})
        if not types:
            return
        offered = self._offered_zones(types)
        # Nodes on the deployment's own network use its VPC: a region without a default VPC is fine for them.
        own_network = all(r.spec.get("networks") for r in plan.by_kind("server"))
        zones = self._region_zones() if own_network else set(self._subnets())
        where = self.site.zone or self.region
        for node in plan.nodes:
            if node.candidates and not any(offered[c] & zones for c in node.candidates):
                raise UserError(f"{self.site.name}: none of {', '.join(node.candidates)} (for {node.name}) is "
                                f"offered in {where}")

    def _check_fixed_ip(self, res: Resource, net: Mapping[str, Any], plan: Plan) -> None:
        """AWS keeps the first four addresses of a subnet and its last one: a node cannot have them."""
        if not net.get("fixed_ip"):
            return
        try:
            cidr = ipaddress.ip_network(plan.get(net["subnet"]).spec["cidr"])
        except KeyError:
            return
        address = ipaddress.ip_address(net["fixed_ip"])
        if address < cidr.network_address + 4 or address == cidr.broadcast_address:
            raise UserError(f"{self.site.name}: {res.spec['node']} would get {address} on "
                            f"{net['network'].split(':', 1)[-1]}, but AWS keeps the first four and the last address "
                            f"of a subnet ({cidr}); use first_ip 4 or more")

    def _bad_bucket(self, res: Resource) -> str:
        return (f"{self.site.name}: object store '{res.spec.get('bucket', res.name)}' would be the S3 bucket "
                f"'{res.name.lower()}', which is not a valid bucket name (3-63 characters of a-z, 0-9, '.' and '-'); "
                "use a shorter lab, owner or store name, or `labctl up --name`")

    # -- find -------------------------------------------------------------------------------------
    def find(self, res: Resource, plan: Plan) -> Found | None:
        finder = getattr(self, f"_find_{res.kind}", None)
        if finder is None:
            return None  # kinds AWS does not use (reservation)
        return finder(res, plan)

    def _find_keypair(self, res: Resource, plan: Plan) -> Found | None:
        out = self._call("get key pair", lambda: self.ec2.describe_key_pairs(
            KeyNames=[res.name], IncludePublicKey=True), missing_ok=True)
        pairs = (out or {}).get("KeyPairs") or []
        if not pairs:
            return None
        kp = pairs[0]
        have = (kp.get("PublicKey") or "").split()[:2]
        if have and have != res.spec["public_key"].split()[:2]:
            return Found("keypair", res.name, res.name, status="incomplete")  # another key: replace it
        return Found("keypair", res.name, res.name, attrs={"key_pair_id": kp.get("KeyPairId")})

    def _secgroup_vpc(self, res: Resource, plan: Plan, deps: Mapping[str, Found] | None = None) -> str | None:
        """The VPC of the deployment's group: its network's (None if that does not exist), else the default VPC."""
        nets = res.spec.get("networks") or []
        if not nets:
            return self._default_vpc()
        key = nets[0]["network"]
        if deps is not None and key in deps:
            return deps[key].cloud_id
        found = self._find_network(plan.get(key), plan)
        return found.cloud_id if found is not None else None

    def _find_secgroup(self, res: Resource, plan: Plan) -> Found | None:
        filters = [{"Name": "group-name", "Values": [res.name]}]
        if "rules" in res.spec:  # a teardown look-up (no spec) searches every VPC
            vpc = self._secgroup_vpc(res, plan)
            if vpc is None:
                return None
            filters.append({"Name": "vpc-id", "Values": [vpc]})
        out = self._call("list security groups", lambda: self.ec2.describe_security_groups(Filters=filters))
        mine = [g for g in out["SecurityGroups"]
                if _tags(g.get("Tags")).get(naming.TAG_DEPLOYMENT) == plan.deployment]
        if not mine:
            return None
        sg = mine[0]
        complete = _wanted_rules(res) <= _rules_of(sg) and _wanted_open(res) <= _open_of(sg)
        return Found("secgroup", sg["GroupId"], sg["GroupName"], status="ready" if complete else "incomplete",
                     attrs={"vpc_id": sg.get("VpcId")})

    def _find_network(self, res: Resource, plan: Plan) -> Found | None:
        vpc = self._vpc_of(res, plan)
        if vpc is None:
            return None
        found = Found("network", vpc["VpcId"], res.name, status="incomplete", attrs={"cidr": vpc.get("CidrBlock")})
        igw = self._gateway_of(vpc["VpcId"], res, plan)
        if igw is None or not _attached(igw, vpc["VpcId"]):
            return found  # a crash between CreateVpc and the gateway: create() finishes it
        table = self._main_route_table(vpc["VpcId"])
        found.attrs.update(internet_gateway=igw["InternetGatewayId"], route_table=table["RouteTableId"])
        if any(r.get("DestinationCidrBlock") == "0.0.0.0/0" and r.get("GatewayId") == igw["InternetGatewayId"]
               and r.get("State", "active") == "active" for r in table.get("Routes") or []):
            found.status = "ready"
        return found

    def _find_subnet(self, res: Resource, plan: Plan) -> Found | None:
        out = self._call("list subnets", lambda: self.ec2.describe_subnets(Filters=[
            *self._deployment_filter(plan), {"Name": "tag:Name", "Values": [res.name]}]))
        subnets = sorted(out["Subnets"], key=lambda n: n["SubnetId"])
        if not subnets:
            return None
        return _subnet_found(subnets[0])

    def _find_router(self, res: Resource, plan: Plan) -> Found | None:
        net = self._router_network(res, plan)
        found = self._find_network(net, plan) if net is not None else None
        if found is None or found.status != "ready":
            return None
        return self._router_found(res, found)

    def _router_network(self, res: Resource, plan: Plan) -> Resource | None:
        """The network resource a router resource belongs to (through its subnet); None on a teardown look-up."""
        try:
            return plan.get(plan.get(res.spec["subnet"]).spec["network"])
        except KeyError:
            return None

    @staticmethod
    def _router_found(res: Resource, network: Found) -> Found:
        return Found("router", network.attrs["internet_gateway"], res.name, attrs={
            "vpc_id": network.cloud_id,
            "note": "the VPC's internet gateway (made with the network) routes to the internet; nothing else to make"})

    def _find_volume(self, res: Resource, plan: Plan) -> Found | None:
        vols = self._volumes(plan, res.name)
        if not vols:
            return None
        vols.sort(key=lambda v: (v["State"] == "error", str(v.get("CreateTime") or ""), v["VolumeId"]))
        return self._volume_found(vols[0])

    def _find_volume_attachment(self, res: Resource, plan: Plan) -> Found | None:
        if "volume" not in res.spec or "server" not in res.spec:
            return None  # a teardown look-up: attachments are found through list_owned
        vol = self._find_volume(plan.get(res.spec["volume"]), plan)
        if vol is None:
            return None
        server = self._find_server(plan.get(res.spec["server"]), plan)
        if server is None:
            return None
        for a in vol.attrs["attachments"]:
            if a["instance_id"] == server.cloud_id and a["state"] in ("attaching", "attached"):
                return self._attachment_found(res, plan, server.cloud_id, vol.cloud_id, a["state"])
        return None

    def _find_bucket(self, res: Resource, plan: Plan) -> Found | None:
        name = bucket_name(res.name)
        if name is None:
            return None
        tags = self._bucket_tags(name)
        if tags is None:
            return None  # no such bucket (or another account's)
        owner = tags.get(naming.TAG_DEPLOYMENT)
        if owner == plan.deployment:
            return self._bucket_found(name, tags, res.key)
        if owner is None:  # made by a run that crashed before tagging it: create() tags it
            return Found("bucket", name, name, status="incomplete", attrs={"key": res.key, "keep": False})
        return None

    def _node_instances(self, plan: Plan, node: str) -> list[dict[str, Any]]:
        out = self._call("list instances", lambda: self.ec2.describe_instances(Filters=[
            *self._deployment_filter(plan), {"Name": f"tag:{naming.TAG_NODE}", "Values": [node]}]))
        return [i for r in out["Reservations"] for i in r["Instances"]]

    def _find_server(self, res: Resource, plan: Plan) -> Found | None:
        instances = self._node_instances(plan, res.spec["node"])
        live = [i for i in instances if i["State"]["Name"] in LIVE]
        if live:
            live.sort(key=lambda i: i["State"]["Name"] != "running")
            return self._node_found(live[0], res, plan)
        self._dead[(plan.deployment, res.key)] = len(instances)
        stopped = [i for i in instances if i["State"]["Name"] in ("stopping", "stopped")]
        if stopped:
            found = self._node_found(stopped[0], res, plan)
            found.error = f"instance {stopped[0]['InstanceId']} is {stopped[0]['State']['Name']}"
            return found
        return None

    def _node_addresses(self, res: Resource, plan: Plan) -> list[Found]:
        """The node's Elastic IPs (one, but for a moment two when two runs raced), status not looked at."""
        out = self._call("list Elastic IPs", lambda: self.ec2.describe_addresses(Filters=[
            *self._deployment_filter(plan), {"Name": f"tag:{naming.TAG_NODE}", "Values": [res.spec["node"]]}]))
        return [Found("floating_ip", a["AllocationId"], res.name, status="incomplete", attrs={
            "floating_ip": a.get("PublicIp"), "instance_id": a.get("InstanceId") or None,
            "association_id": a.get("AssociationId")}) for a in out["Addresses"]]

    def _find_floating_ip(self, res: Resource, plan: Plan) -> Found | None:
        addresses = self._node_addresses(res, plan)
        if not addresses:
            return None
        # An associated one first, then the lowest id: what every run takes.
        found = min(addresses, key=lambda f: (not f.attrs["instance_id"], f.cloud_id))
        instance = found.attrs["instance_id"]
        status = "incomplete"
        if instance:
            inst = self._call("get instance", lambda: self.ec2.describe_instances(Filters=[
                {"Name": "instance-id", "Values": [instance]}]))
            states = [i["State"]["Name"] for r in inst["Reservations"] for i in r["Instances"]]
            if states and states[0] in LIVE:
                status = "ready"
        found.status = status
        return found

    # -- create -----------------------------------------------------------------------------------
    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        creator = getattr(self, f"_create_{res.kind}", None)
        if creator is None:
            raise CloudError(f"{self.site.name}: AWS has no '{res.kind}' resources")
        return creator(res, plan, deps, candidate)

    def _create_keypair(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        def import_key() -> Found:
            out = self._call("import key pair", lambda: self.ec2.import_key_pair(
                KeyName=res.name, PublicKeyMaterial=res.spec["public_key"].encode(),
                TagSpecifications=[{"ResourceType": "key-pair", "Tags": self._tag_list(plan)}]))
            return Found("keypair", res.name, res.name, attrs={"key_pair_id": out.get("KeyPairId")})

        # Imported first, deleted only when another key holds the name: deleting first would pull the key pair
        # from under a concurrent run of this deployment that is launching with it right now.
        stale: list[Found] = []

        def adopt() -> Found | None:
            found = self._find_keypair(res, plan)  # a retry after a lost answer, or a concurrent run: same key?
            if found is not None and found.status != "ready":
                stale.append(found)
                return None
            return found

        try:
            return create_or_adopt(import_key, adopt)
        except Conflict:
            if not stale:
                raise
        self._call("delete stale key pair", lambda: self.ec2.delete_key_pair(KeyName=res.name), missing_ok=True)
        return import_key()

    def _create_network(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        found = self._find_network(res, plan)
        if found is not None and found.status == "ready":
            return found
        if found is None:
            cidr = plan.get(f"subnet:{res.spec['network']}").spec["cidr"]

            def create_vpc() -> Found:
                out = self.ec2_once.create_vpc(CidrBlock=cidr, TagSpecifications=[
                    {"ResourceType": "vpc", "Tags": self._tag_list(plan, name=res.name)}])
                return Found("network", out["Vpc"]["VpcId"], res.name, attrs={"cidr": cidr})

            found = self._once(f"create VPC {res.name}", create_vpc, lambda: self._find_network(res, plan))
            log.info("%s: made VPC %s (%s) for %s", self.site.name, found.cloud_id, cidr, res.name)
        vpc_id = found.cloud_id
        igw = self._gateway_of(vpc_id, res, plan)
        if igw is None:
            def create_gateway() -> dict[str, Any]:
                out = self.ec2_once.create_internet_gateway(TagSpecifications=[
                    {"ResourceType": "internet-gateway", "Tags": self._tag_list(plan, name=res.name)}])
                return out["InternetGateway"]

            igw = self._once(f"create internet gateway for {res.name}", create_gateway,
                             lambda: self._gateway_of(vpc_id, res, plan))
        igw_id = igw["InternetGatewayId"]
        if not _attached(igw, vpc_id):
            try:
                self._call("attach internet gateway", lambda: self.ec2.attach_internet_gateway(
                    InternetGatewayId=igw_id, VpcId=vpc_id))
            except CloudError as exc:  # a retry after a lost answer attached it already
                again = self._gateway_of(vpc_id, res, plan)
                if again is None or not _attached(again, vpc_id):
                    raise CloudError(f"{self.site.name}: cannot attach internet gateway {igw_id} to {vpc_id}: "
                                     f"{exc}") from exc
        table = self._main_route_table(vpc_id)
        routes = [r for r in table.get("Routes") or [] if r.get("DestinationCidrBlock") == "0.0.0.0/0"]
        if not routes:
            try:
                self._call("add the default route", lambda: self.ec2.create_route(
                    RouteTableId=table["RouteTableId"], DestinationCidrBlock="0.0.0.0/0", GatewayId=igw_id))
            except CloudError as exc:
                if "RouteAlreadyExists" not in str(exc):
                    raise
        elif routes[0].get("GatewayId") != igw_id or routes[0].get("State", "active") != "active":
            self._call("replace the default route", lambda: self.ec2.replace_route(
                RouteTableId=table["RouteTableId"], DestinationCidrBlock="0.0.0.0/0", GatewayId=igw_id))
        return Found("network", vpc_id, res.name, attrs={"cidr": found.attrs.get("cidr"), "internet_gateway": igw_id,
                                                         "route_table": table["RouteTableId"]})

    def _create_subnet(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        existing = self._find_subnet(res, plan)
        if existing is not None:
            return existing
        vpc_id = deps[res.spec["network"]].cloud_id
        zone = self._subnet_zone(res, plan)
        cidr = res.spec["cidr"]

        def create() -> Found:
            out = self.ec2_once.create_subnet(VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=zone, TagSpecifications=[
                {"ResourceType": "subnet", "Tags": self._tag_list(plan, name=res.name)}])
            return _subnet_found(out["Subnet"])

        found = self._once(f"create subnet {res.name}", create, lambda: self._find_subnet(res, plan))
        log.info("%s: made subnet %s (%s) in %s", self.site.name, found.cloud_id, cidr, zone)
        return found

    def _subnet_zone(self, res: Resource, plan: Plan) -> str:
        """The zone of a network's subnet: the site's; else that of a volume kept for a node on it (a volume
        attaches only in its zone); else the first zone that offers every candidate type of its nodes."""
        if self.site.zone:
            return self.site.zone
        servers = [r for r in plan.by_kind("server")
                   if any(n.get("subnet") == res.key for n in r.spec.get("networks") or [])]
        nodes = {r.spec["node"] for r in servers}
        for vol in plan.by_kind("volume"):
            if vol.spec.get("node") in nodes and (kept := self._find_volume(vol, plan)) is not None:
                log.info("%s: subnet %s goes to %s, where volume %s is", self.site.name, res.name,
                         kept.attrs["zone"], kept.cloud_id)
                return str(kept.attrs["zone"])
        candidates = [list(r.spec.get("candidates") or []) for r in servers]
        every = sorted({c for cs in candidates for c in cs})
        if not every:
            return sorted(self._region_zones())[0]
        offered = self._offered_zones(every)
        common = set.intersection(*(offered[t] for t in every))
        if not common:  # no zone has them all: one that has each node's first choice
            common = set.intersection(*(offered[cs[0]] for cs in candidates if cs))
        if not common:
            raise CloudError(f"{self.site.name}: no zone of {self.region} offers {', '.join(every)} together, but "
                             f"the nodes on {res.spec['network'].split(':', 1)[-1]} share one subnet (one zone); "
                             "give them types offered in one zone, or run on a zone site (aws:<zone>)")
        return sorted(common)[0]

    def _create_router(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        net = self._router_network(res, plan)
        if net is None:
            raise CloudError(f"{self.site.name}: router {res.name} has no network in the plan")
        return self._router_found(res, self._create_network(net, plan, deps, None))  # finishes it if needed

    def _create_secgroup(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        existing = self._find_secgroup(res, plan)
        if existing is None:
            vpc = self._secgroup_vpc(res, plan, deps)
            if vpc is None:
                raise CloudError(f"{self.site.name}: the network of security group {res.name} does not exist")

            def create() -> Found:
                out = self._call("create security group", lambda: self.ec2.create_security_group(
                    GroupName=res.name, Description=f"labctl {plan.deployment}", VpcId=vpc,
                    TagSpecifications=[{"ResourceType": "security-group",
                                        "Tags": self._tag_list(plan, name=res.name)}]))
                return Found("secgroup", out["GroupId"], res.name, attrs={"new": True})

            def adopt() -> Found:
                # Group names are unique in a VPC: a retry after a lost answer or a concurrent run made it.
                found = self._find_secgroup(res, plan)
                if found is None:
                    raise CloudError(f"{self.site.name}: a security group named {res.name} exists in VPC {vpc} "
                                     "but is not this deployment's (no labctl tags); delete or rename it")
                return found

            existing = create_or_adopt(create, adopt)
        sg_id = existing.cloud_id
        if existing.attrs.get("new"):
            have, have_open = set(), set()
        else:
            out = self._call("get security group", lambda: self.ec2.describe_security_groups(GroupIds=[sg_id]))
            have, have_open = _rules_of(out["SecurityGroups"][0]), _open_of(out["SecurityGroups"][0])
        for cidr in sorted(_wanted_open(res) - have_open):
            # A network without port security: its nodes talk freely (every protocol from its CIDR).
            perms = [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": cidr, "Description": "labctl: private network"}]}]
            with contextlib.suppress(Conflict):  # a concurrent run allowed it first
                self._call(f"allow all traffic from {cidr}", lambda p=perms: self.ec2.authorize_security_group_ingress(
                    GroupId=sg_id, IpPermissions=p))
        missing = sorted(_wanted_rules(res) - have)
        if missing:
            perms = [{"IpProtocol": proto, "FromPort": port, "ToPort": port,
                      "IpRanges": [{"CidrIp": cidr, "Description": "labctl"}]} for port, proto, cidr in missing]
            with contextlib.suppress(Conflict):  # a concurrent run opened them first
                self._call(f"open ports {', '.join(str(p) for p, _, _ in missing)}",
                           lambda: self.ec2.authorize_security_group_ingress(GroupId=sg_id, IpPermissions=perms))
        return Found("secgroup", sg_id, res.name)

    def _create_server(self, res: Resource, plan: Plan, deps: Mapping[str, Found],
                       candidate: str | None) -> Found:
        spec = res.spec
        node = spec["node"]
        itype = candidate or spec["candidates"][0]
        image = self._image(spec["image"])
        nets = spec.get("networks") or []
        if len(nets) > 1:
            raise CloudError(f"{self.site.name}: {node} is on {len(nets)} private networks, but an AWS instance's "
                             "interfaces are all in one VPC")
        if nets:  # in its subnet's zone only
            subnet = deps[nets[0]["subnet"]]
            where = str(subnet.attrs.get("zone"))
            zones = [(where, subnet.cloud_id)] if where in self._offered_zones([itype])[itype] else []
        else:
            zones = self._zones_for(itype)
            where = self.site.zone or self.region
            kept = self._volume_zone(node, plan)
            if kept is not None:  # a volume (kept from an earlier `up`) attaches only in its own zone
                zone, volume_id = kept
                if self.site.zone and zone != self.site.zone:
                    raise UserError(f"{self.site.name}: volume {volume_id} of {node} is in {zone}, not "
                                    f"{self.site.zone}; run on aws:{self.region} or delete it "
                                    "(`labctl down --delete-volumes`)")
                if any(z != zone for z, _ in zones):
                    log.info("%s: launching %s in %s, where its volume %s is", self.site.name, node, zone, volume_id)
                zones = [(z, sub) for z, sub in zones if z == zone]
                where = f"{zone} (where volume {volume_id} is)"
        if not zones:
            log.warning("%s: %s is not offered in %s", self.site.name, itype, where)
            raise NoCapacity(f"{self.site.name}: {itype} is not offered in {where}")
        dead_key = (plan.deployment, res.key)
        if dead_key not in self._dead:
            self._dead[dead_key] = len(self._node_instances(plan, node))
        attempt = self._dead[dead_key]
        base: dict[str, Any] = dict(
            ImageId=image["ImageId"], InstanceType=itype, MinCount=1, MaxCount=1, KeyName=deps["keypair"].name,
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": self._tag_list(plan, node, res.name)},
                {"ResourceType": "volume", "Tags": self._tag_list(plan, node, res.name)},
            ],
        )
        if spec.get("extra_keys"):
            base["UserData"] = _cloud_config(spec["extra_keys"])
        groups = [deps["secgroup"].cloud_id] if "secgroup" in deps else []
        tried: list[str] = []
        for index, (zone, subnet) in enumerate(zones):
            kwargs = dict(base, ClientToken=client_token(plan.deployment, node, itype, zone, attempt))
            if nets:
                # One interface, in the deployment's subnet, with the node's fixed IP and a public IPv4 for outbound
                # traffic (Chameleon's shared network); the Elastic IP goes only to the nodes that have one.
                nic: dict[str, Any] = {"DeviceIndex": 0, "SubnetId": subnet, "AssociatePublicIpAddress": True,
                                       "DeleteOnTermination": True}
                if nets[0].get("fixed_ip"):
                    nic["PrivateIpAddress"] = nets[0]["fixed_ip"]
                if groups:
                    nic["Groups"] = groups
                kwargs["NetworkInterfaces"] = [nic]
            else:
                kwargs["SubnetId"] = subnet
                if groups:
                    kwargs["SecurityGroupIds"] = groups
            try:
                out = self._call(f"launch {node} ({itype} in {zone})", lambda kw=kwargs: self.ec2.run_instances(**kw))
            except NoCapacity as exc:
                tried.append(zone)
                nxt = zones[index + 1][0] if index + 1 < len(zones) else None
                reason = str(exc).rsplit(": ", 1)[-1][:120]
                if nxt:
                    log.warning("%s: no %s capacity for %s in %s; trying %s (%s)", self.site.name, itype, node,
                                zone, nxt, reason)
                else:
                    log.warning("%s: no %s capacity for %s in %s (%s)", self.site.name, itype, node, zone, reason)
                continue
            inst = out["Instances"][0]
            if tried:
                log.warning("%s: launched %s as %s in %s (%s had no capacity)", self.site.name, node, itype, zone,
                            ", ".join(tried))
            else:
                log.info("%s: launched %s as %s in %s (%s)", self.site.name, node, itype, zone, inst["InstanceId"])
            self._dead.pop(dead_key, None)
            found = self._node_found(inst, res, plan)
            found.status = "pending" if found.status != "error" else found.status
            return found
        raise NoCapacity(f"{self.site.name}: no {itype} capacity for {node} in {', '.join(tried)}")

    def _create_floating_ip(self, res: Resource, plan: Plan, deps: Mapping[str, Found],
                            _c: str | None) -> Found:
        node = res.spec["node"]
        server = deps[res.spec["server"]]
        found = self._find_floating_ip(res, plan)
        if found is None:
            started = time.monotonic()
            mine = self._allocate_address(res, plan, node)
            # AllocateAddress has no idempotency token and EIPs have no unique names: a concurrent run of this
            # deployment (other state, other machine) may have allocated one for the node too. Both keep the same
            # (one already associated with the node's instance first: a racer took it), the loser releases its own.
            found = converge_created(
                mine, time.monotonic() - started, lambda: self._node_addresses(res, plan),
                lambda f: self._call("release duplicate Elastic IP", lambda: self.ec2.release_address(
                    AllocationId=f.cloud_id), missing_ok=True),
                ident=lambda f: f.cloud_id, rank=lambda f: f.attrs.get("instance_id") != server.cloud_id)
            if found.cloud_id != mine.cloud_id:
                log.info("%s: a concurrent run allocated an Elastic IP for %s too; using %s", self.site.name, node,
                         found.attrs.get("floating_ip"))
        if found.attrs.get("instance_id") != server.cloud_id or found.status != "ready":
            out = self._call(f"associate Elastic IP with {node}", lambda: self.ec2.associate_address(
                AllocationId=found.cloud_id, InstanceId=server.cloud_id, AllowReassociation=True))
            found.attrs["association_id"] = out.get("AssociationId")
        found.status = "ready"
        found.attrs["instance_id"] = server.cloud_id
        log.info("%s: %s has Elastic IP %s", self.site.name, node, found.attrs.get("floating_ip"))
        return found

    def _allocate_address(self, res: Resource, plan: Plan, node: str) -> Found:
        """AllocateAddress has no ClientToken: never resent blindly (see `_once`); it is tagged at allocation."""
        def allocate() -> Found:
            out = self.ec2_once.allocate_address(Domain="vpc", TagSpecifications=[
                {"ResourceType": "elastic-ip", "Tags": self._tag_list(plan, node, res.name)}])
            return Found("floating_ip", out["AllocationId"], res.name, attrs={"floating_ip": out["PublicIp"]})

        return self._once(f"allocate Elastic IP for {node}", allocate, lambda: self._find_floating_ip(res, plan))

    def _once(self, what: str, create: Callable[[], T], lookup: Callable[[], T | None]) -> T:
        """A create call without an idempotency token, tagged at creation: sent once (no client retry); after a
        lost answer (timeout, 5xx, throttling), look the tagged resource up first and send again only if there is
        none."""
        for attempt in range(3):
            try:
                return self._call(what, create, resend=False)
            except (Transient, RateLimited):
                found = lookup()
                if found is not None:
                    return found
                if attempt == 2:
                    raise
                time.sleep(max(self.poll_interval, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")

    def _create_volume(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        spec = res.spec
        keep = "true" if spec.get("keep") else "false"
        existing = self._find_volume(res, plan)
        if existing is not None and existing.status != "error":
            if existing.attrs["keep"] != bool(spec.get("keep")):  # the profile changed its mind
                self._call("tag volume", lambda: self.ec2.create_tags(
                    Resources=[existing.cloud_id], Tags=[{"Key": KEEP_TAG, "Value": keep}]))
                existing.attrs["keep"] = bool(spec.get("keep"))
            log.info("%s: reusing volume %s (%s)", self.site.name, existing.cloud_id, existing.attrs.get("zone"))
            return existing
        server = deps[spec["server"]]
        zone = server.attrs.get("zone")
        if not zone:
            raise CloudError(f"{self.site.name}: no zone known for the server of volume {res.name}")
        tags = [*self._tag_list(plan, spec["node"], res.name), {"Key": KEEP_TAG, "Value": keep},
                {"Key": VOLUME_TAG, "Value": spec["volume"]}]
        out = self._call(f"create volume {res.name}", lambda: self.ec2.create_volume(
            AvailabilityZone=zone, Size=int(spec["size_gb"]), VolumeType="gp3",
            ClientToken=volume_token(plan.deployment, spec["volume"], server.cloud_id),
            TagSpecifications=[{"ResourceType": "volume", "Tags": tags}]))
        found = self._volume_found(out)
        log.info("%s: made volume %s (%d GiB, %s)", self.site.name, found.cloud_id, int(spec["size_gb"]), zone)
        return found

    def _create_volume_attachment(self, res: Resource, plan: Plan, deps: Mapping[str, Found],
                                  _c: str | None) -> Found:
        volume_id = deps[res.spec["volume"]].cloud_id
        server_id = deps[res.spec["server"]].cloud_id
        vol = self._get_volume(volume_id)
        if vol is None:
            raise CloudError(f"{self.site.name}: volume {volume_id} is gone")
        attached = vol.get("Attachments") or []
        for a in attached:
            if a.get("InstanceId") == server_id and a.get("State") in ("attaching", "attached"):
                return self._attachment_found(res, plan, server_id, volume_id, a["State"])
        others = [a for a in attached if a.get("InstanceId") != server_id]
        for a in others:  # attached to the instance of an earlier `up` that is still going away
            log.info("%s: detaching volume %s from %s first", self.site.name, volume_id, a.get("InstanceId"))
            self._detach(volume_id, a["InstanceId"])
        if others:
            self._wait_volume(volume_id, lambda v: v is None or not v.get("Attachments"))
        device = self._device_for(res, plan)
        try:
            out = self._call(f"attach volume {volume_id} to {res.spec['node']}", lambda: self.ec2.attach_volume(
                VolumeId=volume_id, InstanceId=server_id, Device=device))
            state = out.get("State") or "attaching"
        except CloudError as exc:
            if "VolumeInUse" not in str(exc):
                raise
            vol = self._get_volume(volume_id) or {}  # a retry after a lost answer: attached here already?
            mine = [a for a in vol.get("Attachments") or [] if a.get("InstanceId") == server_id]
            if not mine:
                raise
            state = mine[0].get("State") or "attaching"
        return self._attachment_found(res, plan, server_id, volume_id, state)

    def _create_bucket(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        name = bucket_name(res.name)
        if name is None:
            raise CloudError(self._bad_bucket(res))
        kwargs: dict[str, Any] = {"Bucket": name}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._call(f"create bucket {name}", lambda: self.s3.create_bucket(**kwargs))
        except CloudError as exc:
            if "BucketAlreadyExists" in str(exc) and "BucketAlreadyOwnedByYou" not in str(exc):
                raise CloudError(f"{self.site.name}: the S3 bucket name '{name}' is taken by another AWS account "
                                 "(bucket names are global); choose another deployment name with `labctl up --name`"
                                 ) from None
            if "BucketAlreadyOwnedByYou" not in str(exc):
                raise
        tags = self._bucket_tags(name)
        if tags is None:
            raise CloudError(f"{self.site.name}: bucket {name} cannot be read after creating it")
        owner = tags.get(naming.TAG_DEPLOYMENT)
        if owner not in (None, plan.deployment):
            raise CloudError(f"{self.site.name}: S3 bucket '{name}' belongs to another deployment ({owner})")
        keep = "true" if res.spec.get("keep") else "false"
        wanted = {**plan.tags, "Name": res.name, KEEP_TAG: keep, BUCKET_TAG: res.spec.get("bucket") or res.name}
        if any(tags.get(k) != v for k, v in wanted.items()):
            tag_set = [{"Key": k, "Value": v} for k, v in {**tags, **wanted}.items()]
            self._call(f"tag bucket {name}", lambda: self.s3.put_bucket_tagging(
                Bucket=name, Tagging={"TagSet": tag_set}))
        log.info("%s: bucket %s is ready", self.site.name, name)
        return self._bucket_found(name, {**tags, **wanted}, res.key)

    # -- wait -------------------------------------------------------------------------------------
    def wait(self, items: Sequence[tuple[Resource, Found]], plan: Plan, timeout: float,
             on_progress: ProgressFn) -> list[Found]:
        results = {res.key: found for res, found in items}
        start = time.monotonic()
        deadline = start + timeout
        while True:
            pending = [(r, results[r.key]) for r, _ in items if results[r.key].status == "pending"]
            if not pending:
                return [results[r.key] for r, _ in items]
            if any(r.kind == "server" for r, _ in pending):
                instances = {i["InstanceId"]: i for i in self._deployment_instances(plan)}  # one call per round
                for r, f in pending:
                    if r.kind != "server":
                        continue
                    inst = instances.get(f.cloud_id)
                    if inst is not None:
                        results[r.key] = self._node_found(inst, r, plan)
                    elif time.monotonic() - start > MISSING_GRACE:
                        results[r.key] = Found("server", f.cloud_id, r.name, status="error", attrs=dict(f.attrs),
                                               error="instance disappeared")
                    now = results[r.key]
                    stage = {"pending": "building", "ready": "booted", "error": "error"}.get(now.status, now.status)
                    on_progress(r.spec["node"], stage, now.error or now.attrs.get("server_status") or "")
            storage = [(r, f) for r, f in pending if r.kind in ("volume", "volume_attachment")]
            if storage:  # one DescribeVolumes per round for every pending volume and attachment
                ids = sorted({f.attrs.get("volume_id") or f.cloud_id for _, f in storage})
                out = self._call("poll volumes", lambda ids=ids: self.ec2.describe_volumes(
                    Filters=[{"Name": "volume-id", "Values": ids}]))
                vols = {v["VolumeId"]: v for v in out["Volumes"]}
                missing = time.monotonic() - start > MISSING_GRACE
                for r, f in storage:
                    vol = vols.get(f.attrs.get("volume_id") or f.cloud_id)
                    if r.kind == "volume":
                        if vol is not None:
                            results[r.key] = self._volume_found(vol)
                        elif missing:
                            f.status, f.error = "error", "volume disappeared"
                        now = results[r.key]
                        on_progress(r.key, now.attrs.get("volume_status") or now.status, now.error or "")
                        continue
                    mine = [a for a in (vol or {}).get("Attachments") or [] if a.get("InstanceId") ==
                            f.attrs.get("server_id")]
                    state = mine[0].get("State") if mine else None
                    if state == "attached":
                        f.status = "ready"
                    elif state in ("detaching", "detached") or (state is None and missing):
                        f.status, f.error = "error", f"volume {f.attrs.get('volume_id')} did not attach ({state})"
                    on_progress(r.key, state or "attaching", f.error or "")
            for r, _ in pending:
                if r.kind not in ("server", "volume", "volume_attachment"):  # nothing else has a pending state
                    results[r.key].status = "ready"
            if time.monotonic() > deadline:
                for r, _ in pending:
                    if results[r.key].status == "pending":
                        results[r.key].status = "error"
                        results[r.key].error = f"still not running after {timeout:.0f}s"
                return [results[r.key] for r, _ in items]
            if any(results[r.key].status == "pending" for r, _ in items):
                time.sleep(self.poll_interval)

    def _deployment_instances(self, plan: Plan, states: Sequence[str] | None = None) -> list[dict[str, Any]]:
        filters = self._deployment_filter(plan)
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        pages = self._pages("list instances", self.ec2.describe_instances, Filters=filters)
        return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]

    def _pages(self, what: str, operation: Callable[..., Any], **kwargs: Any) -> list[dict[str, Any]]:
        """Every page of a paginated EC2 describe call, each page one `_call` (retried on its own)."""
        pages: list[dict[str, Any]] = []
        while True:
            page = self._call(what, lambda kw=dict(kwargs): operation(**kw))
            pages.append(page)
            if not page.get("NextToken"):
                return pages
            kwargs["NextToken"] = page["NextToken"]

    # -- delete -----------------------------------------------------------------------------------
    def delete(self, kind: str, found: Sequence[Found], plan: Plan) -> None:
        if not found:
            return
        if kind == "floating_ip":
            ids = [f.cloud_id for f in found]
            out = self._call("list Elastic IPs", lambda: self.ec2.describe_addresses(
                Filters=[{"Name": "allocation-id", "Values": ids}]))
            for a in out["Addresses"]:
                if a.get("AssociationId"):
                    self._call("disassociate Elastic IP", lambda a=a: self.ec2.disassociate_address(
                        AssociationId=a["AssociationId"]), missing_ok=True)
                self._call("release Elastic IP", lambda a=a: self.ec2.release_address(
                    AllocationId=a["AllocationId"]), missing_ok=True)
        elif kind == "server":
            ids = sorted({f.cloud_id for f in found if f.cloud_id})
            try:
                self._call("terminate instances", lambda: self.ec2.terminate_instances(InstanceIds=ids))
            except _NotFound:
                for iid in ids:  # some are gone already: one by one
                    self._call("terminate instance", lambda iid=iid: self.ec2.terminate_instances(
                        InstanceIds=[iid]), missing_ok=True)
            self._wait_terminated(ids)
            log.info("%s: terminated %s", self.site.name, ", ".join(ids))
        elif kind == "volume_attachment":
            pairs = []
            for f in found:
                instance_id, _, volume_id = f.cloud_id.partition("/")
                pairs.append((f.attrs.get("server_id") or instance_id, f.attrs.get("volume_id") or volume_id))
            for instance_id, volume_id in pairs:
                self._detach(volume_id, instance_id)
            for instance_id, volume_id in pairs:
                self._wait_volume(volume_id, lambda v, i=instance_id: v is None or not any(
                    a.get("InstanceId") == i for a in v.get("Attachments") or []))
            log.info("%s: detached %s", self.site.name, ", ".join(v for _, v in pairs))
        elif kind == "volume":
            ids = [f.cloud_id for f in found]
            for volume_id in ids:  # still attached (an instance not terminated): detach first
                vol = self._get_volume(volume_id)
                for a in (vol or {}).get("Attachments") or []:
                    self._detach(volume_id, a["InstanceId"])
                if vol and vol.get("Attachments"):
                    self._wait_volume(volume_id, lambda v: v is None or not v.get("Attachments"))
            for volume_id in ids:
                self._in_use_retry("delete volume", lambda v=volume_id: self.ec2.delete_volume(VolumeId=v),
                                   codes=("VolumeInUse",))
            for volume_id in ids:
                self._wait_volume(volume_id, lambda v: v is None or v["State"] == "deleted")
            log.info("%s: deleted %s", self.site.name, ", ".join(ids))
        elif kind == "bucket":
            for f in found:
                self._delete_bucket(f.cloud_id or f.name)
        elif kind == "router":
            pass  # the internet gateway goes with the network (VPC)
        elif kind == "subnet":
            for f in found:
                self._in_use_retry("delete subnet", lambda f=f: self.ec2.delete_subnet(SubnetId=f.cloud_id))
        elif kind == "network":
            for f in sorted(found, key=lambda f: not f.cloud_id.startswith("igw-")):  # stray gateways first
                if f.cloud_id.startswith("igw-"):
                    self._delete_gateways(Filters=[{"Name": "internet-gateway-id", "Values": [f.cloud_id]}])
                    continue
                self._delete_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [f.cloud_id]}])
                self._in_use_retry("delete VPC", lambda f=f: self.ec2.delete_vpc(VpcId=f.cloud_id))
                log.info("%s: deleted VPC %s", self.site.name, f.cloud_id)
        elif kind == "secgroup":
            for f in found:
                self._delete_secgroup(f.cloud_id)
        elif kind == "keypair":
            for f in found:
                self._call("delete key pair", lambda f=f: self.ec2.delete_key_pair(KeyName=f.cloud_id or f.name),
                           missing_ok=True)

    def _wait_terminated(self, ids: Sequence[str], timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while True:
            out = self._call("poll instances", lambda: self.ec2.describe_instances(
                Filters=[{"Name": "instance-id", "Values": list(ids)}]))
            left = [i["InstanceId"] for r in out["Reservations"] for i in r["Instances"]
                    if i["State"]["Name"] != "terminated"]
            if not left:
                return
            if time.monotonic() > deadline:
                raise CloudError(f"{self.site.name}: instances {', '.join(left)} still not terminated")
            time.sleep(self.poll_interval)

    def _delete_secgroup(self, group_id: str) -> None:
        # An instance's network interface holds the group for a while after termination.
        self._in_use_retry("delete security group", lambda: self.ec2.delete_security_group(GroupId=group_id))

    def _in_use_retry(self, what: str, fn: Callable[[], Any], codes: Sequence[str] = ("DependencyViolation",),
                      timeout: float | None = None) -> None:
        """A delete (NotFound is success) retried while AWS says something still uses the resource (the network
        interfaces of terminated instances linger for a while), for at most `timeout` (IN_USE_GRACE) seconds."""
        deadline = time.monotonic() + (IN_USE_GRACE if timeout is None else timeout)
        while True:
            try:
                self._call(what, fn, missing_ok=True)
                return
            except CloudError as exc:
                if not any(code in str(exc) for code in codes) or time.monotonic() > deadline:
                    raise
            time.sleep(max(self.poll_interval, 0.05))

    def _delete_gateways(self, **query: Any) -> None:
        """Detach the matching internet gateways from their VPCs and delete them."""
        out = self._call("list internet gateways", lambda: self.ec2.describe_internet_gateways(**query))
        for igw in out["InternetGateways"]:
            igw_id = igw["InternetGatewayId"]
            for a in igw.get("Attachments") or []:
                try:
                    self._in_use_retry("detach internet gateway", lambda a=a, g=igw_id:
                                       self.ec2.detach_internet_gateway(InternetGatewayId=g, VpcId=a["VpcId"]))
                except CloudError as exc:
                    if "Gateway.NotAttached" not in str(exc):
                        raise
            self._in_use_retry("delete internet gateway", lambda g=igw_id: self.ec2.delete_internet_gateway(
                InternetGatewayId=g))
            log.info("%s: deleted internet gateway %s", self.site.name, igw_id)

    def _delete_bucket(self, name: str, timeout: float = 300) -> None:
        """Empty the bucket (every object version and delete marker) and delete it; a missing bucket is fine."""
        from botocore.exceptions import ClientError

        def empty_and_delete() -> None:
            paginator = self.s3.get_paginator("list_object_versions")
            try:
                for page in paginator.paginate(Bucket=name):
                    objects = [{"Key": o["Key"], "VersionId": o["VersionId"]}
                               for o in [*(page.get("Versions") or []), *(page.get("DeleteMarkers") or [])]]
                    for i in range(0, len(objects), 1000):
                        out = self.s3.delete_objects(Bucket=name, Delete={"Objects": objects[i:i + 1000],
                                                                          "Quiet": True})
                        if out.get("Errors"):
                            e = out["Errors"][0]
                            raise CloudError(f"{self.site.name}: cannot empty bucket {name}: {e.get('Key')}: "
                                             f"{e.get('Code')} {e.get('Message')}")
                self.s3.delete_bucket(Bucket=name)
            except ClientError as exc:
                if (exc.response.get("Error") or {}).get("Code") not in S3_MISSING:
                    raise

        # Objects written meanwhile make the delete fail with BucketNotEmpty: empty it again.
        self._in_use_retry(f"delete bucket {name}", empty_and_delete, codes=("BucketNotEmpty",), timeout=timeout)
        deadline = time.monotonic() + timeout
        while self._bucket_tags(name) is not None:
            if time.monotonic() > deadline:
                raise CloudError(f"{self.site.name}: bucket {name} still exists after delete")
            time.sleep(max(self.poll_interval, 0.05))
        log.info("%s: deleted bucket %s", self.site.name, name)

    # -- inventory --------------------------------------------------------------------------------
    def list_owned(self, plan: Plan) -> list[Found]:
        owned: list[Found] = [self._instance_found(i) for i in self._deployment_instances(plan, NOT_TERMINATED)]
        flt = self._deployment_filter(plan)
        for a in self._call("list Elastic IPs", lambda: self.ec2.describe_addresses(Filters=flt))["Addresses"]:
            owned.append(Found("floating_ip", a["AllocationId"], _tags(a.get("Tags")).get("Name", ""),
                               attrs={"floating_ip": a.get("PublicIp"), "instance_id": a.get("InstanceId")}))
        for g in self._call("list security groups",
                            lambda: self.ec2.describe_security_groups(Filters=flt))["SecurityGroups"]:
            owned.append(Found("secgroup", g["GroupId"], g["GroupName"]))
        for k in self._call("list key pairs", lambda: self.ec2.describe_key_pairs(Filters=flt))["KeyPairs"]:
            owned.append(Found("keypair", k["KeyName"], k["KeyName"]))
        # The deployment's network: its VPC and internet gateway are both kind "network" (the gateway is deleted
        # with the VPC; one left alone by a crash before it was attached is deleted by itself), its subnet.
        for v in self._call("list VPCs", lambda: self.ec2.describe_vpcs(Filters=flt))["Vpcs"]:
            owned.append(Found("network", v["VpcId"], _tags(v.get("Tags")).get("Name", v["VpcId"]),
                               attrs={"cidr": v.get("CidrBlock")}))
        for g in self._call("list internet gateways",
                            lambda: self.ec2.describe_internet_gateways(Filters=flt))["InternetGateways"]:
            owned.append(Found("network", g["InternetGatewayId"], _tags(g.get("Tags")).get("Name", ""),
                               attrs={"vpc_ids": [a["VpcId"] for a in g.get("Attachments") or []]}))
        for n in self._call("list subnets", lambda: self.ec2.describe_subnets(Filters=flt))["Subnets"]:
            owned.append(_subnet_found(n))
        for v in self._volumes(plan):
            vol = self._volume_found(v)
            owned.append(vol)
            for a in v.get("Attachments") or []:
                owned.append(Found("volume_attachment", f"{a['InstanceId']}/{v['VolumeId']}", f"{vol.name}-attachment",
                                   attrs={"server_id": a["InstanceId"], "volume_id": v["VolumeId"],
                                          "device": a.get("Device")}))
        # S3 only when the deployment has buckets: an EC2-only account (IAM policy) is never asked.
        if plan.by_kind("bucket"):
            owned += self._owned_buckets(plan)
        return owned

    def _owned_buckets(self, plan: Plan) -> list[Found]:
        prefix = f"{plan.deployment.lower()}-"
        out = self._call("list buckets", lambda: self.s3.list_buckets())
        owned = []
        for b in out.get("Buckets") or []:
            if not b["Name"].startswith(prefix):
                continue
            tags = self._bucket_tags(b["Name"])
            if tags is not None and tags.get(naming.TAG_DEPLOYMENT) == plan.deployment:
                owned.append(self._bucket_found(b["Name"], tags))
        return owned

    def extend(self, found: Found, hours: float, plan: Plan) -> Found:
        """No leases on AWS: instances run until deleted."""
        return found

    # -- helpers ----------------------------------------------------------------------------------
    def _vpc_of(self, res: Resource, plan: Plan) -> dict[str, Any] | None:
        out = self._call("list VPCs", lambda: self.ec2.describe_vpcs(Filters=[
            *self._deployment_filter(plan), {"Name": "tag:Name", "Values": [res.name]}]))
        vpcs = sorted(out["Vpcs"], key=lambda v: v["VpcId"])
        return vpcs[0] if vpcs else None

    def _gateway_of(self, vpc_id: str, res: Resource, plan: Plan) -> dict[str, Any] | None:
        """The network's internet gateway (tagged with its name): the one attached to the VPC first."""
        out = self._call("list internet gateways", lambda: self.ec2.describe_internet_gateways(Filters=[
            *self._deployment_filter(plan), {"Name": "tag:Name", "Values": [res.name]}]))
        gateways = sorted(out["InternetGateways"], key=lambda g: (not _attached(g, vpc_id), g["InternetGatewayId"]))
        return gateways[0] if gateways else None

    def _main_route_table(self, vpc_id: str) -> dict[str, Any]:
        out = self._call("get the main route table", lambda: self.ec2.describe_route_tables(Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "association.main", "Values": ["true"]}]))
        if not out["RouteTables"]:
            raise CloudError(f"{self.site.name}: VPC {vpc_id} has no main route table")
        return out["RouteTables"][0]

    def _node_found(self, inst: Mapping[str, Any], res: Resource, plan: Plan) -> Found:
        """An instance as the server of `res`: with `private_ips` = {network name: private IP} on a network."""
        found = self._instance_found(inst)
        nets = res.spec.get("networks") or []
        if nets and inst.get("PrivateIpAddress"):
            with contextlib.suppress(KeyError):  # a teardown plan has no network resources
                found.attrs["private_ips"] = {plan.get(nets[0]["network"]).name: inst["PrivateIpAddress"]}
        return found

    def _volume_zone(self, node: str, plan: Plan) -> tuple[str, str] | None:
        """(zone, volume id) of an existing volume of `node` (kept from an earlier `up`), if any."""
        for vol in plan.by_kind("volume"):
            if vol.spec.get("node") == node and (found := self._find_volume(vol, plan)) is not None:
                return str(found.attrs["zone"]), found.cloud_id
        return None

    def _volumes(self, plan: Plan, name: str | None = None) -> list[dict[str, Any]]:
        """The deployment's data volumes (tagged labctl:volume; root volumes are not), but those going away."""
        filters = [*self._deployment_filter(plan), {"Name": "tag-key", "Values": [VOLUME_TAG]}]
        if name:
            filters.append({"Name": "tag:Name", "Values": [name]})
        pages = self._pages("list volumes", self.ec2.describe_volumes, Filters=filters)
        return [v for page in pages for v in page["Volumes"] if v["State"] not in ("deleting", "deleted")]

    def _get_volume(self, volume_id: str) -> dict[str, Any] | None:
        out = self._call("get volume", lambda: self.ec2.describe_volumes(VolumeIds=[volume_id]), missing_ok=True)
        vols = (out or {}).get("Volumes") or []
        return vols[0] if vols else None

    def _wait_volume(self, volume_id: str, done: Callable[[dict[str, Any] | None], bool],
                     timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            vol = self._get_volume(volume_id)
            if done(vol):
                return
            if vol is not None and vol["State"] == "error":
                raise CloudError(f"{self.site.name}: volume {volume_id} is in error")
            if time.monotonic() > deadline:
                raise CloudError(f"{self.site.name}: volume {volume_id} still {vol['State'] if vol else '?'} "
                                 f"after {timeout:.0f}s")
            time.sleep(max(self.poll_interval, 0.05))

    def _detach(self, volume_id: str, instance_id: str) -> None:
        try:
            self._call("detach volume", lambda: self.ec2.detach_volume(VolumeId=volume_id, InstanceId=instance_id),
                       missing_ok=True)
        except CloudError as exc:
            if "IncorrectState" not in str(exc):  # detached already
                raise

    @staticmethod
    def _volume_found(vol: Mapping[str, Any]) -> Found:
        tags = _tags(vol.get("Tags"))
        state = vol["State"]
        status = {"available": "ready", "in-use": "ready", "error": "error"}.get(state, "pending")
        name = tags.get(VOLUME_TAG)
        return Found("volume", vol["VolumeId"], tags.get("Name", vol["VolumeId"]), status=status,
                     error="volume went to error" if status == "error" else None, attrs={
                         "zone": vol["AvailabilityZone"], "size_gb": vol["Size"], "keep": tags.get(KEEP_TAG) == "true",
                         "volume_status": state, **({"key": f"volume:{name}"} if name else {}),
                         "attachments": [{"instance_id": a.get("InstanceId"), "device": a.get("Device"),
                                          "state": a.get("State")} for a in vol.get("Attachments") or []]})

    @staticmethod
    def _device_for(res: Resource, plan: Plan) -> str:
        """/dev/sdf for a node's first volume, /dev/sdg for its second..., in plan order."""
        mine = [r.key for r in plan.by_kind("volume_attachment") if r.spec.get("node") == res.spec.get("node")]
        index = mine.index(res.key) if res.key in mine else 0
        return f"/dev/sd{VOLUME_DEVICES[min(index, len(VOLUME_DEVICES) - 1)]}"

    def _attachment_found(self, res: Resource, plan: Plan, server_id: str, volume_id: str, state: str) -> Found:
        device = self._device_for(res, plan)
        return Found("volume_attachment", f"{server_id}/{volume_id}", res.name,
                     status="ready" if state == "attached" else "pending", attrs={
                         "server_id": server_id, "volume_id": volume_id, "device": device,
                         "device_paths": device_paths(volume_id, device)})

    def _bucket_tags(self, name: str) -> dict[str, str] | None:
        """A bucket's tags ({} if none), or None if there is no such bucket of this account."""
        from botocore.exceptions import ClientError

        def get() -> dict[str, str] | None:
            try:
                return _tags(self.s3.get_bucket_tagging(Bucket=name)["TagSet"])
            except ClientError as exc:
                code = str((exc.response.get("Error") or {}).get("Code") or "")
                if code == "NoSuchTagSet":
                    return {}
                if code in S3_MISSING or code in ("403", "AccessDenied"):  # 403: another account's bucket
                    return None
                raise

        return self._call(f"get tags of bucket {name}", get)

    @staticmethod
    def _bucket_found(name: str, tags: Mapping[str, str], key: str | None = None) -> Found:
        store = tags.get(BUCKET_TAG)
        key = key or (f"bucket:{store}" if store else None)
        attrs: dict[str, Any] = {"keep": tags.get(KEEP_TAG) == "true"}
        if key:
            attrs["key"] = key
        return Found("bucket", name, name, attrs=attrs)

    def _instance_found(self, inst: Mapping[str, Any]) -> Found:
        state = inst["State"]["Name"]
        tags = _tags(inst.get("Tags"))
        status = {"running": "ready", "pending": "pending"}.get(state, "error")
        error = None
        if status == "error":
            reason = (inst.get("StateReason") or {}).get("Message")
            error = f"instance is {state}" + (f" ({reason})" if reason else "")
        return Found("server", inst["InstanceId"], tags.get("Name", inst["InstanceId"]), status=status,
                     error=error, attrs={
                         "node": tags.get(naming.TAG_NODE), "fixed_ip": inst.get("PrivateIpAddress"),
                         "floating_ip": inst.get("PublicIpAddress"), "node_type": inst.get("InstanceType"),
                         "server_status": state, "zone": (inst.get("Placement") or {}).get("AvailabilityZone"),
                     })


def _wanted_rules(res: Resource) -> set[tuple[int, str, str]]:
    return {(int(r["port"]), str(r["protocol"]), str(r["cidr"])) for r in res.spec.get("rules") or []}


def _wanted_open(res: Resource) -> set[str]:
    """CIDRs of the networks without port security: all traffic from them is allowed."""
    return {str(n["cidr"]) for n in res.spec.get("networks") or [] if n.get("open")}


def _open_of(group: Mapping[str, Any]) -> set[str]:
    return {str(r.get("CidrIp")) for p in group.get("IpPermissions") or [] if p.get("IpProtocol") == "-1"
            for r in p.get("IpRanges") or []}


def _attached(igw: Mapping[str, Any], vpc_id: str) -> bool:
    return any(a.get("VpcId") == vpc_id and a.get("State") in ("available", "attached", "attaching")
               for a in igw.get("Attachments") or [])


def _subnet_found(subnet: Mapping[str, Any]) -> Found:
    return Found("subnet", subnet["SubnetId"], _tags(subnet.get("Tags")).get("Name", subnet["SubnetId"]), attrs={
        "zone": subnet["AvailabilityZone"], "cidr": subnet["CidrBlock"], "vpc_id": subnet["VpcId"]})


def _rules_of(group: Mapping[str, Any]) -> set[tuple[int, str, str]]:
    have = set()
    for p in group.get("IpPermissions") or []:
        if p.get("FromPort") is None or p.get("FromPort") != p.get("ToPort"):
            continue
        for r in p.get("IpRanges") or []:
            have.add((int(p["FromPort"]), str(p.get("IpProtocol")), str(r.get("CidrIp"))))
    return have


def _cloud_config(keys: Sequence[str]) -> str:
    """cloud-init user data that adds more authorized keys for the default user (boto3 base64-encodes it)."""
    lines = ["#cloud-config", "ssh_authorized_keys:"] + [f"  - {k.strip()}" for k in keys]
    return "\n".join(lines) + "\n"


__all__ = ["IMAGES", "AwsProvider", "bucket_name", "client_token", "connect", "volume_token"]
