"""AWS EC2 adapter (boto3): key pairs, security groups, instances and Elastic IPs in the region's default VPC.

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

boto3 is imported only inside functions: `import labctl.providers.aws` loads no SDK.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from labctl import naming
from labctl.errors import (
    CloudError,
    CredentialsError,
    LabctlError,
    NoCapacity,
    QuotaExceeded,
    RateLimited,
    Transient,
    UserError,
)
from labctl.providers.base import Found, ProgressFn

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
             "RequestTimeoutException", "PriorRequestNotComplete"}
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
        return AwsProvider(site, _isolated_session(site.region), endpoint_url=emu.endpoint,
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
    method = getattr(creds, "method", None) or "unknown"
    where = f"profile '{session.profile_name}'" if session.profile_name != "default" or cloud else method
    log.debug("%s: AWS credentials from %s (%s)", site.name, where, method)
    return session, str(where)


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
                raise self._translate(what, exc) from exc

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
            if code.endswith("NotFound"):
                return _NotFound(f"{where}: {text}")
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
        types = sorted({c for n in plan.nodes for c in n.candidates})
        if not types:
            return
        offered = self._offered_zones(types)
        zones = set(self._subnets())
        where = self.site.zone or self.region
        for node in plan.nodes:
            if node.candidates and not any(offered[c] & zones for c in node.candidates):
                raise UserError(f"{self.site.name}: none of {', '.join(node.candidates)} (for {node.name}) is "
                                f"offered in {where}")

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

    def _find_secgroup(self, res: Resource, plan: Plan) -> Found | None:
        vpc = self._default_vpc()
        out = self._call("list security groups", lambda: self.ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": [res.name]}, {"Name": "vpc-id", "Values": [vpc]}]))
        mine = [g for g in out["SecurityGroups"]
                if _tags(g.get("Tags")).get(naming.TAG_DEPLOYMENT) == plan.deployment]
        if not mine:
            return None
        sg = mine[0]
        status = "ready" if _wanted_rules(res) <= _rules_of(sg) else "incomplete"
        return Found("secgroup", sg["GroupId"], sg["GroupName"], status=status)

    def _node_instances(self, plan: Plan, node: str) -> list[dict[str, Any]]:
        out = self._call("list instances", lambda: self.ec2.describe_instances(Filters=[
            *self._deployment_filter(plan), {"Name": f"tag:{naming.TAG_NODE}", "Values": [node]}]))
        return [i for r in out["Reservations"] for i in r["Instances"]]

    def _find_server(self, res: Resource, plan: Plan) -> Found | None:
        instances = self._node_instances(plan, res.spec["node"])
        live = [i for i in instances if i["State"]["Name"] in LIVE]
        if live:
            live.sort(key=lambda i: i["State"]["Name"] != "running")
            return self._instance_found(live[0])
        self._dead[(plan.deployment, res.key)] = len(instances)
        stopped = [i for i in instances if i["State"]["Name"] in ("stopping", "stopped")]
        if stopped:
            found = self._instance_found(stopped[0])
            found.error = f"instance {stopped[0]['InstanceId']} is {stopped[0]['State']['Name']}"
            return found
        return None

    def _find_floating_ip(self, res: Resource, plan: Plan) -> Found | None:
        out = self._call("list Elastic IPs", lambda: self.ec2.describe_addresses(Filters=[
            *self._deployment_filter(plan), {"Name": f"tag:{naming.TAG_NODE}", "Values": [res.spec["node"]]}]))
        addresses = out["Addresses"]
        if not addresses:
            return None
        addresses.sort(key=lambda a: not a.get("InstanceId"))
        a = addresses[0]
        instance = a.get("InstanceId") or None
        status = "incomplete"
        if instance:
            inst = self._call("get instance", lambda: self.ec2.describe_instances(Filters=[
                {"Name": "instance-id", "Values": [instance]}]))
            states = [i["State"]["Name"] for r in inst["Reservations"] for i in r["Instances"]]
            if states and states[0] in LIVE:
                status = "ready"
        return Found("floating_ip", a["AllocationId"], res.name, status=status, attrs={
            "floating_ip": a.get("PublicIp"), "instance_id": instance, "association_id": a.get("AssociationId")})

    # -- create -----------------------------------------------------------------------------------
    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        creator = getattr(self, f"_create_{res.kind}", None)
        if creator is None:
            raise CloudError(f"{self.site.name}: AWS has no '{res.kind}' resources")
        return creator(res, plan, deps, candidate)

    def _create_keypair(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        self._call("delete stale key pair", lambda: self.ec2.delete_key_pair(KeyName=res.name), missing_ok=True)
        try:
            out = self._call("import key pair", lambda: self.ec2.import_key_pair(
                KeyName=res.name, PublicKeyMaterial=res.spec["public_key"].encode(),
                TagSpecifications=[{"ResourceType": "key-pair", "Tags": self._tag_list(plan)}]))
        except CloudError as exc:
            # A retry after a lost answer, or a concurrent run: fine if it is the same key.
            found = self._find_keypair(res, plan) if "Duplicate" in str(exc) else None
            if found is None or found.status != "ready":
                raise
            return found
        return Found("keypair", res.name, res.name, attrs={"key_pair_id": out.get("KeyPairId")})

    def _create_secgroup(self, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
        existing = self._find_secgroup(res, plan)
        if existing is None:
            vpc = self._default_vpc()
            try:
                out = self._call("create security group", lambda: self.ec2.create_security_group(
                    GroupName=res.name, Description=f"labctl {plan.deployment}", VpcId=vpc,
                    TagSpecifications=[{"ResourceType": "security-group",
                                        "Tags": self._tag_list(plan, name=res.name)}]))
            except CloudError as exc:
                if "Duplicate" not in str(exc):
                    raise
                existing = self._find_secgroup(res, plan)  # a retry after a lost answer made it already
                if existing is None:
                    raise CloudError(f"{self.site.name}: a security group named {res.name} exists in the default "
                                     "VPC but is not this deployment's (no labctl tags); delete or rename it") from exc
        if existing is None:
            sg_id, have = out["GroupId"], set()
        else:
            sg_id = existing.cloud_id
            out = self._call("get security group", lambda: self.ec2.describe_security_groups(GroupIds=[sg_id]))
            have = _rules_of(out["SecurityGroups"][0])
        missing = sorted(_wanted_rules(res) - have)
        if missing:
            perms = [{"IpProtocol": proto, "FromPort": port, "ToPort": port,
                      "IpRanges": [{"CidrIp": cidr, "Description": "labctl"}]} for port, proto, cidr in missing]
            try:
                self._call(f"open ports {', '.join(str(p) for p, _, _ in missing)}",
                           lambda: self.ec2.authorize_security_group_ingress(GroupId=sg_id, IpPermissions=perms))
            except CloudError as exc:
                if "Duplicate" not in str(exc):
                    raise
        return Found("secgroup", sg_id, res.name)

    def _create_server(self, res: Resource, plan: Plan, deps: Mapping[str, Found],
                       candidate: str | None) -> Found:
        spec = res.spec
        node = spec["node"]
        itype = candidate or spec["candidates"][0]
        image = self._image(spec["image"])
        zones = self._zones_for(itype)
        where = self.site.zone or self.region
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
        if "secgroup" in deps:
            base["SecurityGroupIds"] = [deps["secgroup"].cloud_id]
        if spec.get("extra_keys"):
            base["UserData"] = _cloud_config(spec["extra_keys"])
        tried: list[str] = []
        for index, (zone, subnet) in enumerate(zones):
            kwargs = dict(base, SubnetId=subnet, ClientToken=client_token(plan.deployment, node, itype, zone, attempt))
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
            found = self._instance_found(inst)
            found.status = "pending" if found.status != "error" else found.status
            return found
        raise NoCapacity(f"{self.site.name}: no {itype} capacity for {node} in {', '.join(tried)}")

    def _create_floating_ip(self, res: Resource, plan: Plan, deps: Mapping[str, Found],
                            _c: str | None) -> Found:
        node = res.spec["node"]
        server = deps[res.spec["server"]]
        found = self._find_floating_ip(res, plan)
        if found is None:
            found = self._allocate_address(res, plan, node)
        if found.attrs.get("instance_id") != server.cloud_id or found.status != "ready":
            out = self._call(f"associate Elastic IP with {node}", lambda: self.ec2.associate_address(
                AllocationId=found.cloud_id, InstanceId=server.cloud_id, AllowReassociation=True))
            found.attrs["association_id"] = out.get("AssociationId")
        found.status = "ready"
        found.attrs["instance_id"] = server.cloud_id
        log.info("%s: %s has Elastic IP %s", self.site.name, node, found.attrs.get("floating_ip"))
        return found

    def _allocate_address(self, res: Resource, plan: Plan, node: str) -> Found:
        """AllocateAddress has no ClientToken: never resent blindly. After a lost answer, look for the tagged
        address first (it is tagged at allocation) and allocate again only if there is none."""
        def allocate() -> Any:
            return self.ec2_once.allocate_address(Domain="vpc", TagSpecifications=[
                {"ResourceType": "elastic-ip", "Tags": self._tag_list(plan, node, res.name)}])

        for attempt in range(3):
            try:
                out = self._call(f"allocate Elastic IP for {node}", allocate, resend=False)
                return Found("floating_ip", out["AllocationId"], res.name, attrs={"floating_ip": out["PublicIp"]})
            except (Transient, RateLimited):
                found = self._find_floating_ip(res, plan)
                if found is not None:
                    return found
                if attempt == 2:
                    raise
                time.sleep(max(self.poll_interval, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")

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
                        results[r.key] = self._instance_found(inst)
                    elif time.monotonic() - start > MISSING_GRACE:
                        results[r.key] = Found("server", f.cloud_id, r.name, status="error", attrs=dict(f.attrs),
                                               error="instance disappeared")
                    now = results[r.key]
                    stage = {"pending": "building", "ready": "booted", "error": "error"}.get(now.status, now.status)
                    on_progress(r.spec["node"], stage, now.error or now.attrs.get("server_status") or "")
            for r, _ in pending:
                if r.kind != "server":  # nothing else here has a pending state
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
        out: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Filters": filters}
            if token:
                kwargs["NextToken"] = token
            page = self._call("list instances", lambda kw=kwargs: self.ec2.describe_instances(**kw))
            out += [i for r in page["Reservations"] for i in r["Instances"]]
            token = page.get("NextToken")
            if not token:
                return out

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

    def _delete_secgroup(self, group_id: str, timeout: float = 300) -> None:
        # An instance's network interface holds the group for a while after termination.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._call("delete security group", lambda: self.ec2.delete_security_group(GroupId=group_id),
                           missing_ok=True)
                return
            except CloudError as exc:
                if "DependencyViolation" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(max(self.poll_interval, 0.05))

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
        return owned

    def extend(self, found: Found, hours: float, plan: Plan) -> Found:
        """No leases on AWS: instances run until deleted."""
        return found

    # -- helpers ----------------------------------------------------------------------------------
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
    return {(int(r["port"]), str(r["protocol"]), str(r["cidr"])) for r in res.spec["rules"]}


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


__all__ = ["IMAGES", "AwsProvider", "client_token", "connect"]
