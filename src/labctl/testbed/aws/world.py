"""`AwsWorld`: the front layer's state (`aws.db`) and what it adds to moto: ClientToken idempotency, capacity and
vCPU limits, loopback addresses for moto's public IPs, boot time, refusals moto lacks, the control API."""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from labctl.testbed.access import world_credentials
from labctl.testbed.aws import checks
from labctl.testbed.aws.common import (
    DB_FILE,
    DEFAULT_LEASE_SCALE,
    EC2_NS,
    FAULT_ALIASES,
    FAULT_KINDS,
    INTERNAL_PREFIX,
    IPV4,
    IPV4_DASHED,
    LEASE_TAG,
    LOOP,
    NOT_LOGGED,
    NOT_TERMINATED,
    PUBLIC_IP_TAGS,
    ApiError,
    cloud_config_keys,
    isolated_session,
    lease_end,
    loop_address,
    runs_lease_timer,
    tag_map,
    with_moto_key,
)
from labctl.testbed.aws.daemon import ensure_moto, pid_alive
from labctl.testbed.aws.launches import Launches
from labctl.testbed.sqlite_world import SqliteWorld, free_port, internal_addresses

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ips (real TEXT PRIMARY KEY, loop TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS tokens (generation TEXT NOT NULL, region TEXT NOT NULL, action TEXT NOT NULL,
    token TEXT NOT NULL, params_hash TEXT NOT NULL, status INTEGER NOT NULL, body BLOB NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (generation, region, action, token));
CREATE TABLE IF NOT EXISTS capacity (zone TEXT NOT NULL, itype TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (zone, itype));
CREATE TABLE IF NOT EXISTS keys (region TEXT NOT NULL, name TEXT NOT NULL, public_key TEXT NOT NULL,
    PRIMARY KEY (region, name));
CREATE TABLE IF NOT EXISTS launches (instance_id TEXT PRIMARY KEY, region TEXT NOT NULL, launched REAL NOT NULL,
    keys TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS regions (region TEXT PRIMARY KEY);
"""


class AwsWorld(Launches, SqliteWorld):
    """The emulated EC2's shared state (`<state_dir>/aws.db`) and its control API for tests and SSH."""

    def __init__(self, state_dir: Path, ssh_port: int | None = None, lease_scale: float | None = None) -> None:
        self.state_dir = Path(state_dir)
        if lease_scale is None and os.environ.get("LABCTL_TESTBED_LEASE_SCALE"):
            lease_scale = float(os.environ["LABCTL_TESTBED_LEASE_SCALE"])
        self.explicit_scale = lease_scale
        self.state_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(self.state_dir / DB_FILE, _SCHEMA)
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()
        self._ip_cache: dict[str, str] = {}  # real -> loop
        self._loop_cache: dict[str, str] = {}  # loop -> real
        self._static: dict[tuple, Any] = {}  # offerings, vCPUs, subnet zones (never change)
        self._targets_cache: tuple[float, list[dict]] | None = None
        self._moto: dict[str, Any] | None = None
        self._init(ssh_port)

    def __repr__(self) -> str:
        return f"AwsWorld({str(self.state_dir)!r})"

    # -- storage (connections: `SqliteWorld`) --------------------------------------------------------
    def _tx(self, mode: str = "IMMEDIATE"):
        return self._transaction(mode)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._conn().execute(sql, args).fetchall()

    def _init(self, ssh_port: int | None) -> None:
        with self._tx() as db:
            if not db.execute("SELECT 1 FROM meta WHERE key='ssh_port'").fetchone():
                db.execute("INSERT INTO meta (key, value) VALUES ('ssh_port', ?)", (str(ssh_port or free_port()),))
                db.execute("INSERT INTO meta (key, value) VALUES ('created', ?)", (str(time.time()),))
                db.execute("INSERT INTO meta (key, value) VALUES ('lease_scale', ?)",
                           (str(self.explicit_scale if self.explicit_scale is not None else DEFAULT_LEASE_SCALE),))

    def _meta(self, key: str, default: str | None = None) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else default

    @property
    def lease_scale(self) -> float:
        """Emulated seconds per real second for lease ends (this process's LABCTL_TESTBED_LEASE_SCALE, else the
        world's own: real time unless set, as the emulated Blazar leases and Compute Engine time limits; the
        testbed's time scale, which shortens boots and waits, would end an ordinary test's lab under it)."""
        if self.explicit_scale is not None:
            return float(self.explicit_scale)
        return float(self._meta("lease_scale", str(DEFAULT_LEASE_SCALE)) or DEFAULT_LEASE_SCALE)

    @property
    def ssh_port(self) -> int:
        return int(self._meta("ssh_port"))

    @property
    def credentials(self) -> Any:
        """This world's own credentials (`labctl.testbed.access`): only its access key opens the front layer,
        only its moto key the moto daemon."""
        return world_credentials(self.state_dir)

    def session(self, region: str) -> Any:
        """A boto3 session with this world's access key (none of the user's AWS settings)."""
        creds = self.credentials
        return isolated_session(region, creds.aws_access_key_id, creds.aws_secret_access_key)

    # -- moto --------------------------------------------------------------------------------------
    def moto(self) -> dict[str, Any]:
        """The moto daemon's {"pid", "port", "generation"}; (re)started if it is not alive."""
        info = self._moto
        if info is None or not pid_alive(int(info["pid"])):
            info = ensure_moto(self.state_dir)
            if self._moto is not None and info.get("generation") != self._moto.get("generation"):
                with self._clients_lock:
                    self._clients.clear()
            self._moto = info
        return info

    @property
    def moto_url(self) -> str:
        return f"http://127.0.0.1:{self.moto()['port']}"

    def client(self, region: str) -> Any:
        """A boto3 EC2 client straight to moto (internal look-ups: not logged, no faults, real IPs)."""
        url = self.moto_url
        with self._clients_lock:
            cli = self._clients.get(region)
            if cli is None or cli.meta.endpoint_url != url:
                from botocore.config import Config

                cli = with_moto_key(self.session(region).client(
                    "ec2", endpoint_url=url,
                    config=Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=60)),
                    self.credentials.moto_key)
                self._clients[region] = cli
            return cli

    def s3_client(self, region: str) -> Any:
        """A boto3 S3 client straight to moto (path-style addressing: the endpoint is 127.0.0.1)."""
        url = self.moto_url
        key = f"s3:{region}"
        with self._clients_lock:
            cli = self._clients.get(key)
            if cli is None or cli.meta.endpoint_url != url:
                from botocore.config import Config

                cli = with_moto_key(self.session(region).client(
                    "s3", endpoint_url=url,
                    config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1, "mode": "standard"},
                                  read_timeout=60)), self.credentials.moto_key)
                self._clients[key] = cli
            return cli

    # -- control API -------------------------------------------------------------------------------
    def set_capacity(self, zone: str, instance_type: str, n: int | None) -> None:
        """At most `n` running instances of `instance_type` in `zone` (None: no limit, the default)."""
        with self._tx() as db:
            if n is None:
                db.execute("DELETE FROM capacity WHERE zone=? AND itype=?", (zone, instance_type))
            else:
                db.execute("INSERT OR REPLACE INTO capacity (zone, itype, n) VALUES (?,?,?)",
                           (zone, instance_type, int(n)))

    def capacity(self, zone: str, instance_type: str) -> int | None:
        rows = self._read("SELECT n FROM capacity WHERE zone=? AND itype=?", (zone, instance_type))
        return int(rows[0][0]) if rows else None

    def set_vcpu_limit(self, n: int | None, region: str | None = None) -> None:
        """The On-Demand vCPU limit of `region` (None: every region); n=None removes it."""
        key = f"vcpu_limit:{region or '*'}"
        with self._tx() as db:
            if n is None:
                db.execute("DELETE FROM meta WHERE key=?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?,?)", (key, str(int(n))))

    def vcpu_limit(self, region: str) -> int | None:
        value = self._meta(f"vcpu_limit:{region}") or self._meta("vcpu_limit:*")
        return int(value) if value is not None else None

    def set_lease_scale(self, scale: float) -> None:
        """Lease ends at this scale from now on, in this process (which the reaper of its front layer reads) and
        for the processes that do not set LABCTL_TESTBED_LEASE_SCALE."""
        self.explicit_scale = float(scale)
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('lease_scale', ?)", (str(float(scale)),))

    def reset_controls(self) -> None:
        """Back to defaults: no capacity or vCPU limits, no faults or latency, no boot time, no other account's
        buckets."""
        with self._tx() as db:
            db.execute("DELETE FROM capacity")
            db.execute("DELETE FROM faults")
            db.execute("DELETE FROM latency")
            db.execute("DELETE FROM meta WHERE key LIKE 'vcpu_limit:%' OR key = 'boot_seconds' "
                       "OR key LIKE 'foreign_bucket:%'")

    def inject_fault(self, action: str, kind: str, count: int = 1) -> None:
        """Make the next `count` requests of `action` ("RunInstances", "*" for any) misbehave.

        kind: error503 (HTTP 503 Unavailable) | throttle (alias RequestLimitExceeded: HTTP 503 throttling) |
        hang_after (forwarded and committed, then no answer ever) | timeout_after (forwarded and committed,
        then the connection is dropped).
        """
        kind = FAULT_ALIASES.get(kind, kind)
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(FAULT_KINDS)})")
        self.queue_fault(None, action, kind, count)

    def claim_bucket(self, name: str) -> None:
        """Make S3 bucket `name` another account's (names are global): CreateBucket answers BucketAlreadyExists
        (409), every other request on it AccessDenied (403)."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, '1')", (f"foreign_bucket:{name}",))

    def check_s3(self, method: str, url: Any) -> None:
        """S3's answers for a bucket of another account (see `claim_bucket`)."""
        bucket = url.path.lstrip("/").split("/", 1)[0]
        if not bucket or self._meta(f"foreign_bucket:{bucket}") is None:
            return
        if method == "PUT" and url.path.strip("/") == bucket and not url.query:
            raise ApiError(409, "BucketAlreadyExists", "The requested bucket name is not available. The bucket "
                           "namespace is shared by all users of the system. Please select a different name and try "
                           "again.")
        raise ApiError(403, "AccessDenied", "Access Denied")

    def take_fault(self, action: str) -> str | None:
        fault = self.pop_fault(None, [action])
        return fault[0] if fault else None

    def log_request(self, region: str | None, action: str, params: dict[str, str]) -> int:
        summary = " ".join(f"{k}={v[:80]}" for k, v in sorted(params.items()) if k not in NOT_LOGGED)
        return self.record_request(region, None, None, summary, action)

    def request_log(self, detail: bool = False) -> list:
        """Every request the front layers served, in order: (action, params summary). With detail=True,
        dicts with ts, region, action, summary and the HTTP status (None if no answer was sent)."""
        rows = self.logged_requests()
        if detail:
            return [{"ts": r["ts"], "region": r["scope"], "action": r["operation"], "summary": r["query"],
                     "status": r["status"]} for r in rows]
        return [(r["operation"], r["query"]) for r in rows]

    def regions(self) -> list[str]:
        return [r[0] for r in self._read("SELECT region FROM regions ORDER BY region")]

    def note_region(self, region: str) -> None:
        if region not in self._static.setdefault(("regions",), set()):
            with self._tx() as db:
                db.execute("INSERT OR IGNORE INTO regions (region) VALUES (?)", (region,))
            self._static[("regions",)].add(region)

    # -- public IP <-> loopback -----------------------------------------------------------------------
    def loopback_for(self, real: str) -> str:
        loop = self._ip_cache.get(real)
        if loop is not None:
            return loop
        rows = self._read("SELECT loop FROM ips WHERE real=?", (real,))
        if not rows:
            with self._tx() as db:
                row = db.execute("SELECT loop FROM ips WHERE real=?", (real,)).fetchone()
                if row is None:
                    seq = int(db.execute("SELECT COUNT(*) FROM ips").fetchone()[0])
                    loop = loop_address(seq)
                    db.execute("INSERT INTO ips (real, loop) VALUES (?,?)", (real, loop))
                    rows = [(loop,)]
                else:
                    rows = [row]
        loop = rows[0][0]
        self._ip_cache[real] = loop
        self._loop_cache[loop] = real
        return loop

    def real_for(self, loop: str) -> str | None:
        real = self._loop_cache.get(loop)
        if real is None:
            rows = self._read("SELECT real FROM ips WHERE loop=?", (loop,))
            if rows:
                real = rows[0][0]
                self._loop_cache[loop] = real
                self._ip_cache[real] = loop
        return real

    def _known_reals(self, candidates: set[str]) -> dict[str, str]:
        out = {ip: self._ip_cache[ip] for ip in candidates if ip in self._ip_cache}
        missing = [ip for ip in candidates if ip not in out]
        if missing:
            marks = ",".join("?" * len(missing))
            for real, loop in self._read(f"SELECT real, loop FROM ips WHERE real IN ({marks})", tuple(missing)):
                out[real] = loop
                self._ip_cache[real] = loop
                self._loop_cache[loop] = real
        return out

    def map_response(self, body: bytes) -> bytes:
        """Replace every public IP moto handed out (and DNS names made of it) by its loopback address."""
        if not body:
            return body
        text = body.decode("utf-8", errors="surrogateescape")
        for _, ip in PUBLIC_IP_TAGS.findall(text):
            if ip and not ip.startswith(("10.", "192.168.")):
                self.loopback_for(ip)
        quads = set(IPV4.findall(text))
        dashed = {d.replace("-", ".") for d in IPV4_DASHED.findall(text)}
        known = self._known_reals(quads | dashed)
        if not known:
            return body
        text = IPV4.sub(lambda m: known.get(m.group(1), m.group(1)), text)
        text = IPV4_DASHED.sub(
            lambda m: known[m.group(1).replace("-", ".")].replace(".", "-")
            if m.group(1).replace("-", ".") in known else m.group(1), text)
        return text.encode("utf-8", errors="surrogateescape")

    def map_public(self, ip: str | None) -> str | None:
        return self.loopback_for(ip) if ip else ip

    def unmap_params(self, params: dict[str, str]) -> dict[str, str]:
        out = {}
        for k, v in params.items():
            if LOOP.match(v):
                v = self.real_for(v) or v
            out[k] = v
        return out

    # -- key pairs -------------------------------------------------------------------------------------
    def record_key(self, region: str, name: str, material_b64: str) -> None:
        try:
            line = base64.b64decode(material_b64).decode().strip()
        except (ValueError, UnicodeDecodeError):
            line = material_b64.strip()
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO keys (region, name, public_key) VALUES (?,?,?)", (region, name, line))

    def key_line(self, region: str, name: str) -> str | None:
        rows = self._read("SELECT public_key FROM keys WHERE region=? AND name=?", (region, name))
        return rows[0][0] if rows else None

    def record_launch(self, region: str, params: dict[str, str], body: bytes) -> None:
        """Remember when each new instance was launched and which keys it accepts (the key pair's line as
        imported, plus `ssh_authorized_keys` of cloud-config user data)."""
        keys = []
        if params.get("KeyName") and (line := self.key_line(region, params["KeyName"])):
            keys.append(line)
        keys += cloud_config_keys(params.get("UserData"))
        ids = re.findall(r"<instanceId>(i-[0-9a-f]+)</instanceId>", body.decode(errors="replace"))
        now = time.time()
        with self._tx() as db:
            for iid in ids:
                db.execute("INSERT OR IGNORE INTO launches (instance_id, region, launched, keys) VALUES (?,?,?,?)",
                           (iid, region, now, json.dumps(keys)))

    def instance_keys(self, instance_id: str) -> list[str] | None:
        rows = self._read("SELECT keys FROM launches WHERE instance_id=?", (instance_id,))
        return json.loads(rows[0][0]) if rows else None

    # -- boot time ---------------------------------------------------------------------------------------
    def set_boot_seconds(self, seconds: float) -> None:
        """New instances say `pending` for this long after launch (moto says `running` at once; default 0)."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('boot_seconds', ?)", (str(float(seconds)),))

    def boot_seconds(self) -> float:
        return float(self._meta("boot_seconds", "0") or 0)

    def booting(self) -> set[str]:
        """Instances launched less than boot_seconds ago."""
        boot = self.boot_seconds()
        if boot <= 0:
            return set()
        rows = self._read("SELECT instance_id FROM launches WHERE launched > ?", (time.time() - boot,))
        return {r[0] for r in rows}

    def apply_boot(self, body: bytes) -> bytes:
        """Show instances that are still booting as `pending` (DescribeInstances, RunInstances answers)."""
        booting = self.booting()
        if not booting or not any(i.encode() in body for i in booting):
            return body
        import xml.etree.ElementTree as ET

        ns = EC2_NS.rstrip("/")
        ET.register_namespace("", ns)
        root = ET.fromstring(body)
        for item in root.iter(f"{{{ns}}}item"):
            iid = item.findtext(f"{{{ns}}}instanceId")
            state = item.find(f"{{{ns}}}instanceState")
            if iid in booting and state is not None and state.findtext(f"{{{ns}}}name") == "running":
                state.find(f"{{{ns}}}code").text = "0"
                state.find(f"{{{ns}}}name").text = "pending"
        return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)

    # -- EC2 facts (from moto's data) ------------------------------------------------------------------
    def offered_zones(self, region: str, itype: str) -> list[str]:
        key = ("offer", region, itype)
        if key not in self._static:
            res = self.client(region).describe_instance_type_offerings(
                LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": [itype]}])
            self._static[key] = sorted(o["Location"] for o in res["InstanceTypeOfferings"])
        return self._static[key]

    def zones(self, region: str) -> list[str]:
        key = ("zones", region)
        if key not in self._static:
            res = self.client(region).describe_availability_zones()
            self._static[key] = sorted(z["ZoneName"] for z in res["AvailabilityZones"])
        return self._static[key]

    def vcpus(self, region: str, itype: str) -> int:
        key = ("vcpus", itype)
        if key not in self._static:
            try:
                res = self.client(region).describe_instance_types(InstanceTypes=[itype])
                self._static[key] = int(res["InstanceTypes"][0]["VCpuInfo"]["DefaultVCpus"])
            except Exception:  # noqa: BLE001 - unknown type: moto itself will reject the launch
                return 0
        return self._static[key]

    def subnet_zone(self, region: str, subnet_id: str) -> str | None:
        key = ("subnet", region, subnet_id)
        if key not in self._static:
            try:
                res = self.client(region).describe_subnets(SubnetIds=[subnet_id])
            except Exception:  # noqa: BLE001 - moto answers the launch with the real error
                return None
            self._static[key] = res["Subnets"][0]["AvailabilityZone"]
        return self._static[key]

    def _instances(self, region: str, states: tuple[str, ...] | None = None) -> list[dict]:
        kwargs: dict[str, Any] = {}
        if states:
            kwargs["Filters"] = [{"Name": "instance-state-name", "Values": list(states)}]
        out = []
        for page in self.client(region).get_paginator("describe_instances").paginate(**kwargs):
            for r in page["Reservations"]:
                out.extend(r["Instances"])
        return out

    # -- the lease end a node enforces itself ------------------------------------------------------------------------
    def reap_expired(self) -> list[str]:
        """What labctl's timer does on a real node, at its time-scaled end (`common.lease_end`, from the tag as it is
        now: `extend` moves it): a running instance whose user data runs the timer and whose tags are in its
        instance metadata (so the timer can read them) powers off once its end has passed; launched with shutdown
        behaviour `terminate` it is terminated, else stopped. Nothing else is ended. Returns the ids ended."""
        ended = []
        now, scale = time.time(), self.lease_scale
        for region in self.regions():
            cli = self.client(region)
            pages = cli.get_paginator("describe_instances").paginate(Filters=[
                {"Name": "instance-state-name", "Values": ["running"]}, {"Name": "tag-key", "Values": [LEASE_TAG]}])
            for i in (i for page in pages for r in page["Reservations"] for i in r["Instances"]):
                end = lease_end(i, scale)
                tags_in_imds = (i.get("MetadataOptions") or {}).get("InstanceMetadataTags") == "enabled"
                if end is None or now < end or not tags_in_imds:
                    continue
                iid = i["InstanceId"]
                data = cli.describe_instance_attribute(InstanceId=iid, Attribute="userData").get("UserData") or {}
                if not runs_lease_timer(data.get("Value")):
                    continue
                behaviour = cli.describe_instance_attribute(
                    InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")["InstanceInitiatedShutdownBehavior"]
                if behaviour["Value"] == "terminate":
                    cli.terminate_instances(InstanceIds=[iid])
                else:
                    cli.stop_instances(InstanceIds=[iid])
                ended.append(iid)
        return ended

    # -- what moto does not check (answered as EC2 answers: `labctl.testbed.aws.checks`) --------------------
    def check_request(self, region: str, action: str, params: dict[str, str]) -> dict[str, str]:
        """EC2's refusals that moto lacks, raised as EC2's errors; returns the params to forward."""
        return checks.check_request(lambda: self.client(region), action, params)

    # -- views -----------------------------------------------------------------------------------------
    def inventory(self, region: str = "us-east-1") -> dict[str, list[dict]]:
        """What exists in `region`, as labctl would see it (public IPs are loopback addresses):
        instances (not terminated), addresses, security_groups (not `default`), key_pairs; each with tags."""
        cli = self.client(region)
        instances = [{
            "id": i["InstanceId"], "name": tag_map(i.get("Tags")).get("Name"), "state": i["State"]["Name"],
            "type": i["InstanceType"], "zone": i["Placement"]["AvailabilityZone"],
            "public_ip": self.map_public(i.get("PublicIpAddress")), "private_ip": i.get("PrivateIpAddress"),
            "key_name": i.get("KeyName"), "client_token": i.get("ClientToken"), "tags": tag_map(i.get("Tags")),
        } for i in self._instances(region, NOT_TERMINATED)]
        addresses = [{
            "id": a.get("AllocationId"), "public_ip": self.map_public(a.get("PublicIp")),
            "instance_id": a.get("InstanceId") or None, "association_id": a.get("AssociationId"),
            "tags": tag_map(a.get("Tags")),
        } for a in cli.describe_addresses()["Addresses"]]
        groups = [{
            "id": g["GroupId"], "name": g["GroupName"], "vpc_id": g.get("VpcId"), "tags": tag_map(g.get("Tags")),
            "ingress": [(p.get("IpProtocol"), p.get("FromPort"), p.get("ToPort"),
                         [r["CidrIp"] for r in p.get("IpRanges", [])]) for p in g.get("IpPermissions", [])],
        } for g in cli.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"]
        keys = [{"id": k.get("KeyPairId"), "name": k["KeyName"], "tags": tag_map(k.get("Tags"))}
                for k in cli.describe_key_pairs()["KeyPairs"]]
        out: dict[str, list[dict]] = {"instances": instances, "addresses": addresses, "security_groups": groups,
                                      "key_pairs": keys}
        # The deployment networks, data volumes and buckets: each key only when there is at least one.
        vpcs = [{"id": v["VpcId"], "name": tag_map(v.get("Tags")).get("Name"), "cidr": v.get("CidrBlock"),
                 "tags": tag_map(v.get("Tags"))} for v in cli.describe_vpcs()["Vpcs"] if not v.get("IsDefault")]
        subnets = [{"id": n["SubnetId"], "name": tag_map(n.get("Tags")).get("Name"), "vpc_id": n["VpcId"],
                    "cidr": n["CidrBlock"], "zone": n["AvailabilityZone"], "tags": tag_map(n.get("Tags"))}
                   for n in cli.describe_subnets()["Subnets"] if not n.get("DefaultForAz")]
        gateways = [{"id": g["InternetGatewayId"], "name": tag_map(g.get("Tags")).get("Name"),
                     "vpc_ids": [a["VpcId"] for a in g.get("Attachments") or []], "tags": tag_map(g.get("Tags"))}
                    for g in cli.describe_internet_gateways()["InternetGateways"]]
        roots = {(i["InstanceId"], i.get("RootDeviceName")) for i in self._instances(region)}
        volumes = [{"id": v["VolumeId"], "name": tag_map(v.get("Tags")).get("Name"), "state": v["State"],
                    "size": v["Size"], "zone": v["AvailabilityZone"], "type": v.get("VolumeType"),
                    "attachments": [{"instance_id": a["InstanceId"], "device": a["Device"], "state": a["State"]}
                                    for a in v.get("Attachments") or []],
                    "tags": tag_map(v.get("Tags"))}
                   for v in cli.describe_volumes()["Volumes"]
                   if not any((a["InstanceId"], a["Device"]) in roots for a in v.get("Attachments") or [])]
        buckets = []
        s3 = self.s3_client(region)
        for b in s3.list_buckets().get("Buckets", []):
            try:
                tags = tag_map(s3.get_bucket_tagging(Bucket=b["Name"])["TagSet"])
            except Exception:  # noqa: BLE001 - NoSuchTagSet: an untagged bucket
                tags = {}
            objects = s3.list_object_versions(Bucket=b["Name"])
            buckets.append({"id": b["Name"], "name": b["Name"], "tags": tags,
                            "objects": len(objects.get("Versions") or []) + len(objects.get("DeleteMarkers") or [])})
        for key, items in (("vpcs", vpcs), ("subnets", subnets), ("internet_gateways", gateways),
                           ("volumes", volumes), ("buckets", buckets)):
            if items:
                out[key] = items
        return out

    def ssh_targets(self) -> list[dict[str, Any]]:
        """Every running instance, as `labctl.testbed.sshd.SSHNodes` serves it: `address` is its public IP's
        loopback address (None without a public IP), `fixed_ips` = {VPC id: private IP}, and `internal_address`
        a loopback address of its own (127.12.x.y, derived from the instance id), on which it is reachable only
        through an instance of the same VPC that forwards to `<private IP>:22` (the `ssh -J` hop)."""
        cached = self._targets_cache
        if cached is not None and time.monotonic() - cached[0] < 0.2:
            return [dict(t) for t in cached[1]]
        port = self.ssh_port
        booting = self.booting()
        targets = []
        for region in self.regions():
            for i in self._instances(region, ("running",)):
                public = i.get("PublicIpAddress")
                if i["InstanceId"] in booting:
                    continue
                keys = self.instance_keys(i["InstanceId"])
                if keys is None:
                    keys = [line] if i.get("KeyName") and (line := self.key_line(region, i["KeyName"])) else []
                tags = tag_map(i.get("Tags"))
                targets.append({
                    "server_id": i["InstanceId"], "site": f"aws:{region}",
                    "name": tags.get("Name") or i["InstanceId"],
                    "address": self.loopback_for(public) if public else None,
                    "fixed_ips": {i["VpcId"]: i["PrivateIpAddress"]} if i.get("VpcId") and i.get(
                        "PrivateIpAddress") else {},
                    "port": port, "user": "ubuntu", "authorized_keys": keys,
                    "node_dir": self.state_dir / "nodes" / i["InstanceId"],
                    "security_groups": sorted({g["GroupId"] for g in i.get("SecurityGroups") or []}
                                              | {g["GroupId"] for n in i.get("NetworkInterfaces") or []
                                                 for g in n.get("Groups") or []}),
                })
        internal = internal_addresses((t["server_id"] for t in targets), INTERNAL_PREFIX)
        for t in targets:
            t["internal_address"] = internal[t["server_id"]]
        self._targets_cache = (time.monotonic(), targets)
        return [dict(t) for t in targets]

    def ingress_allowed(self, target: dict[str, Any], port: int, peer) -> bool:
        """Whether the instance's security groups let `peer` (`labctl.testbed.firewall.Peer`) reach `port` of
        the instance `target` (one of `ssh_targets()`): the SSH side asks on every connection."""
        from labctl.testbed.firewall import aws_allows

        return aws_allows(self, target, port, peer)

    def close(self) -> None:
        """Close this thread's connection only (the front layer's threads may still be serving)."""
        self.release()
