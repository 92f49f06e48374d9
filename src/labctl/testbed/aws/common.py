"""What the emulated EC2's parts share: file names and limits, sessions straight to moto, EC2's XML errors
(`ApiError`, `error_xml`), request parameters and filters, and the SigV4 check of the front layer."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import uuid
from typing import Any

log = logging.getLogger(__name__)


MOTO_FILE = "moto.json"


MOTO_LOCK = "moto.lock"


MOTO_LOG = "moto.log"


AMIS_FILE = "moto-amis.json"


DB_FILE = "aws.db"


LOOPBACK_PREFIX = "127.20"


INTERNAL_PREFIX = "127.12"  # each running instance's own address, reached only through a jump host


FAULT_KINDS = ("error503", "throttle", "hang_after", "timeout_after")


FAULT_ALIASES = {"RequestLimitExceeded": "throttle", "error500": "error503"}


MOTO_ENV = {
    "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true",
    "MOTO_ENABLE_AMI_VALIDATION": "true",
    "MOTO_ENABLE_KEYPAIR_VALIDATION": "true",
}


EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"


LIVE_STATES = ("pending", "running")


NOT_TERMINATED = ("pending", "running", "stopping", "stopped", "shutting-down")


HANG_SECONDS = 600.0
DEFAULT_LEASE_SCALE = 1.0  # lease ends run in real time unless a test says otherwise, as Blazar's and GCE's do
LEASE_TAG = "labctl-ends-at"  # the end (ISO 8601, UTC) a node's labctl timer reads from its instance metadata
# What labctl's timer in a node's user data does: reads that tag through IMDS and powers the node off.
LEASE_TIMER_MARKS = (f"/meta-data/tags/instance/{LEASE_TAG}", "systemctl poweroff", "labctl-lease.timer")


MOTO_KEY_HEADER = "X-Labctl-Moto-Key"  # what the front layer (and the world's own clients) show the moto daemon


MOTO_IDLE_SECONDS = 900.0  # no request this long and nothing held: the daemon exits (LABCTL_MOTO_IDLE_SECONDS)


CANONICAL = "099720109477"


AMAZON = "898082745236"  # the account that publishes the AWS Deep Learning AMIs (alias "amazon")


def isolated_session(region: str, access_key_id: str, secret_access_key: str) -> Any:
    """A boto3 session with these keys (an emulated world's: `AwsWorld.session`) that reads none of the user's
    AWS settings (AWS_PROFILE, ~/.aws/config and credentials), so a stray profile cannot break or redirect it."""
    import boto3
    import botocore.session

    unset = (None, None, None, None)
    core = botocore.session.Session(session_vars={
        "profile": unset,
        "config_file": (None, None, "/nonexistent/labctl-aws-config", None),
        "credentials_file": (None, None, "/nonexistent/labctl-aws-credentials", None),
    })
    return boto3.session.Session(botocore_session=core, region_name=region, aws_access_key_id=access_key_id,
                                 aws_secret_access_key=secret_access_key)


def with_moto_key(client: Any, key: str) -> Any:
    """`client` (boto3, straight to the moto daemon) sending the daemon's key with every request."""
    def add_key(request: Any, **_: Any) -> None:
        request.headers[MOTO_KEY_HEADER] = key

    client.meta.events.register("before-send", add_key)
    return client


# Parameters left out of the request log summary (long or secret) and of the idempotency hash.
NOT_LOGGED = {"Action", "Version", "PublicKeyMaterial", "UserData"}


IPV4 = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])")


IPV4_DASHED = re.compile(r"(?:(?<=ec2-)|(?<=ip-))(\d{1,3}(?:-\d{1,3}){3})(?![\d-])")  # DNS names


PUBLIC_IP_TAGS = re.compile(r"<(ipAddress|publicIp|carrierIp)>([\d.]+)</\1>")


LOOP = re.compile(rf"^{re.escape(LOOPBACK_PREFIX)}\.\d{{1,3}}\.\d{{1,3}}$")


REGION = re.compile(r"Credential=[^/,\s]+/\d{8}/([a-z0-9-]+)/")


SERVICE = re.compile(r"Credential=[^/,\s]+/\d{8}/[a-z0-9-]+/([a-z0-9-]+)/")


def loop_address(seq: int) -> str:
    hi, lo = divmod(seq, 245)
    if hi > 255:
        raise RuntimeError("the emulated AWS ran out of loopback addresses")
    return f"{LOOPBACK_PREFIX}.{hi}.{10 + lo}"


def error_xml(code: str, message: str, s3: bool = False) -> bytes:
    """EC2's error document (what botocore's EC2 parser reads), or S3's with `s3`."""
    if s3:
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{_esc(code)}</Code>'
                f"<Message>{_esc(message)}</Message><RequestId>{uuid.uuid4()}</RequestId></Error>").encode()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        f"<Code>{_esc(code)}</Code><Message>{_esc(message)}</Message></Error></Errors>"
        f"<RequestID>{uuid.uuid4()}</RequestID></Response>"
    ).encode()


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def tag_map(items: list[dict] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in items or []}


def cloud_config_keys(user_data: str | None) -> list[str]:
    """`ssh_authorized_keys` of base64 cloud-config user data (what cloud-init would add on a real node)."""
    if not user_data:
        return []
    try:
        text = base64.b64decode(user_data).decode()
    except (ValueError, UnicodeDecodeError):
        return []
    if not text.startswith("#cloud-config"):
        return []
    keys, inside = [], False
    for line in text.splitlines():
        if re.match(r"^ssh_authorized_keys:\s*$", line):
            inside = True
        elif inside and (m := re.match(r"^\s+-\s+(.+?)\s*$", line)):
            keys.append(m.group(1).strip("'\""))
        elif inside and line.strip():
            inside = False
    return keys


def runs_lease_timer(user_data: str | None) -> bool:
    """Whether base64 user data installs labctl's lease timer (what the node would run on a real EC2)."""
    try:
        text = base64.b64decode(user_data or "").decode()
    except (ValueError, UnicodeDecodeError):
        return False
    return all(mark in text for mark in LEASE_TIMER_MARKS)


def lease_end(instance: dict[str, Any], lease_scale: float) -> float | None:
    """When the instance's lease timer powers it off, in scaled time (epoch seconds): the end its LEASE_TAG says
    now, counted from its launch at `lease_scale`; None without a readable end."""
    from datetime import datetime

    end = tag_map(instance.get("Tags")).get(LEASE_TAG)
    try:
        end_ts = datetime.fromisoformat(str(end).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    launched = instance["LaunchTime"].timestamp()
    return launched + max(0.0, end_ts - launched) * lease_scale


def split_filter(params: dict[str, str], name: str) -> tuple[dict[str, str], list[str] | None]:
    """Take filter `name` out of query parameters (renumbering the others): (params, its values or None)."""
    filters: dict[int, dict[str, Any]] = {}
    rest: dict[str, str] = {}
    for key, value in params.items():
        m = re.match(r"^Filter\.(\d+)\.(Name|Value\.(\d+))$", key)
        if not m:
            rest[key] = value
            continue
        f = filters.setdefault(int(m.group(1)), {"name": None, "values": {}})
        if m.group(2) == "Name":
            f["name"] = value
        else:
            f["values"][int(m.group(3))] = value
    wanted = [f for _, f in sorted(filters.items()) if f["name"] == name]
    if not wanted:
        return params, None
    kept = [f for _, f in sorted(filters.items()) if f["name"] != name]
    for i, f in enumerate(kept, 1):
        rest[f"Filter.{i}.Name"] = f["name"]
        for j, (_, v) in enumerate(sorted(f["values"].items()), 1):
            rest[f"Filter.{i}.Value.{j}"] = v
    return rest, [v for f in wanted for _, v in sorted(f["values"].items())]


def keep_instances(body: bytes, keep) -> bytes:
    """A DescribeInstances answer with only the instances for which keep(item) is true (and their reservations)."""
    import xml.etree.ElementTree as ET

    ns = EC2_NS.rstrip("/")
    ET.register_namespace("", ns)
    root = ET.fromstring(body)
    rset = root.find(f"{{{ns}}}reservationSet")
    if rset is None:
        return body
    for reservation in list(rset):
        iset = reservation.find(f"{{{ns}}}instancesSet")
        for item in list(iset if iset is not None else []):
            if not keep(item, ns):
                iset.remove(item)
        if iset is None or not len(iset):
            rset.remove(reservation)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)


def params_hash(params: dict[str, str]) -> str:
    items = sorted((k, v) for k, v in params.items() if k not in ("Action", "Version", "ClientToken"))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def internal_headers(region: str, creds: Any) -> dict[str, str]:
    # moto reads the region and service from the credential scope; it does not check signatures (the daemon
    # checks the moto key).
    return {
        "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
        "Authorization": f"AWS4-HMAC-SHA256 Credential={creds.aws_access_key_id}/20250101/{region}/ec2/"
                         "aws4_request, SignedHeaders=host, Signature=0",
        MOTO_KEY_HEADER: creds.moto_key,
    }


_AUTH = re.compile(r"^AWS4-HMAC-SHA256\s+Credential=([^/,\s]+)/(\d{8})/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request,"
                   r"\s*SignedHeaders=([a-z0-9;._-]+),\s*Signature=([0-9a-f]{64})$")


def check_signature(method: str, raw_path: str, headers: Any, body: bytes, creds: Any, s3: bool) -> None:
    """Refuse a request not signed (AWS Signature Version 4, checked with botocore's own signer) with this world's
    access key, the way EC2 (or S3) refuses it: no signature → MissingAuthenticationToken (S3: AccessDenied),
    another access key → AuthFailure (S3: InvalidAccessKeyId), a wrong signature → SignatureDoesNotMatch."""
    from botocore.auth import S3SigV4Auth, SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from labctl.testbed.access import same_secret

    header = " ".join((headers.get("Authorization") or "").split())
    if not header:
        if s3:
            raise ApiError(403, "AccessDenied", "Access Denied")
        raise ApiError(403, "MissingAuthenticationToken",
                       "The request must contain either a valid (registered) AWS access key ID or X.509 certificate.")
    m = _AUTH.match(header)
    if not m:
        if s3:
            raise ApiError(400, "AuthorizationHeaderMalformed", "The authorization header is malformed.")
        raise ApiError(400, "IncompleteSignature", "The request signature does not conform to AWS standards.")
    key_id, day, region, service, signed, signature = m.groups()
    if not same_secret(key_id, creds.aws_access_key_id):
        if s3:
            raise ApiError(403, "InvalidAccessKeyId",
                           "The AWS Access Key Id you provided does not exist in our records.")
        raise ApiError(401, "AuthFailure", "AWS was not able to validate the provided access credentials")
    names = signed.split(";")
    stamp = headers.get("X-Amz-Date") or ""
    if "host" not in names or not re.fullmatch(r"\d{8}T\d{6}Z", stamp) or stamp[:8] != day:
        raise ApiError(403, "SignatureDoesNotMatch", _MISMATCH)
    request = AWSRequest(method=method, url=f"http://{headers.get('Host', '')}{raw_path}", data=body)
    for name in names:
        for value in headers.get_all(name) or []:
            request.headers.add_header(name, value)
    request.context["timestamp"] = stamp
    signer_class = S3SigV4Auth if s3 else SigV4Auth
    signer = signer_class(Credentials(key_id, creds.aws_secret_access_key), service, region)
    signer.headers_to_sign = lambda req: _only(req, names)  # exactly the headers the client signed
    try:
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
    except (ValueError, TypeError, UnicodeError):
        raise ApiError(403, "SignatureDoesNotMatch", _MISMATCH) from None
    if not same_secret(signature, expected):
        raise ApiError(403, "SignatureDoesNotMatch", _MISMATCH)


_MISMATCH = ("The request signature we calculated does not match the signature you provided. Check your AWS Secret "
             "Access Key and signing method. Consult the service documentation for details.")


def _only(request: Any, names: list[str]) -> Any:
    from botocore.awsrequest import HTTPHeaders

    out = HTTPHeaders()
    for name, value in request.headers.items():
        if name.lower() in names:
            out[name.lower()] = value
    return out
