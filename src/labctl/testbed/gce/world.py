"""The emulated Compute Engine's state: one SQLite file (`<state_dir>/gce.db`) shared by threads and processes.

Every labctl process may run its own HTTP endpoint over the same file (WAL journal, `BEGIN IMMEDIATE` for
writes, so capacity and quota checks are race-free across processes). Nothing runs in the background:
operation and instance states are computed from timestamps stored at creation (already multiplied by the
time scale of the process that created them), and deleted resources disappear when their delete
operation is DONE (rows are purged lazily by whoever looks next, `GceWorld.tick`).

Besides storage, `GceWorld` is the control API for tests and the SSH side: capacity and quotas, fault
injection, the request log, an inventory of what exists and the SSH targets. Kinds stored: instance, firewall,
address, network (besides the built-in `default`), subnetwork, disk, operation.
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import re
import sqlite3
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from labctl.testbed.gce import catalog
from labctl.testbed.sqlite_world import SqliteWorld, free_port, internal_addresses

DEFAULT_TIME_SCALE = 0.01
FAULT_KINDS = ("error500", "error503", "error429", "hang_after", "timeout_after")

# Unscaled durations in seconds (multiplied by the time scale when a resource or operation is created).
INSERT_OP = {"instances": 10.0, "firewalls": 6.0, "addresses": 3.0, "networks": 8.0, "subnetworks": 6.0,
             "disks": 3.0}
DELETE_OP = {"instances": 30.0, "firewalls": 6.0, "addresses": 3.0, "networks": 8.0, "subnetworks": 6.0,
             "disks": 4.0}
ACCESS_CONFIG_OP = 4.0
DISK_OP = 4.0  # instances.attachDisk / detachDisk
DISK_READY_AT = 5.0  # CREATING -> READY (a little after the insert operation is DONE, as on Compute Engine)
PATCH_OP = 6.0
FAILED_OP = 4.0  # an insert that ends in ZONE_RESOURCE_POOL_EXHAUSTED / QUOTA_EXCEEDED
INSTANCE_STAGING_AT = 6.0  # PROVISIONING -> STAGING
INSTANCE_RUNNING_AT = 20.0  # STAGING -> RUNNING
PENDING_SHARE = 0.2  # the first 20 % of an operation's life is PENDING, then RUNNING, then DONE
WAIT_CAP = 120.0  # zoneOperations.wait returns after at most this long (real seconds), DONE or not

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL, project TEXT NOT NULL, scope TEXT NOT NULL, name TEXT NOT NULL, id TEXT NOT NULL,
    created REAL NOT NULL, gone_at REAL, data TEXT NOT NULL,
    PRIMARY KEY (kind, project, scope, name));
CREATE INDEX IF NOT EXISTS resources_gone ON resources (gone_at) WHERE gone_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS request_ids (
    project TEXT NOT NULL, request_id TEXT NOT NULL, scope TEXT NOT NULL, operation TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (project, request_id));
"""

try:
    from zoneinfo import ZoneInfo

    _PACIFIC: Any = ZoneInfo("America/Los_Angeles")
except Exception:  # noqa: BLE001 - no tz database: fixed offset
    _PACIFIC = timezone(timedelta(hours=-8))


def rfc3339(ts: float | None) -> str | None:
    """Compute Engine's timestamps: Pacific time with milliseconds, "2025-10-14T09:31:07.552-07:00"."""
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, _PACIFIC)
    text = dt.isoformat(timespec="milliseconds")
    return text


def new_id() -> str:
    """A numeric uint64 id as Compute Engine returns it (a string of 18-19 digits)."""
    return str(random.randint(10**18, 2**63 - 1))


def fingerprint() -> str:
    import base64

    return base64.b64encode(os.urandom(8)).decode()


def external_ip(k: int) -> str:
    """The k-th external address: 127.30.1.1, 127.30.1.2, ... (loopback, bindable on Linux)."""
    n, m = divmod(k, 254)
    if n >= 254:
        raise RuntimeError("the emulated Compute Engine ran out of external addresses")
    return f"127.30.{n + 1}.{m + 1}"


# ------------------------------------------------------------------------------------ storage
class Db:
    """One open transaction: typed helpers over the `resources` table."""

    def __init__(self, conn: sqlite3.Connection, now: float):
        self.conn = conn
        self.now = now

    def get(self, kind: str, project: str, scope: str, name: str, include_gone: bool = False) -> dict | None:
        row = self.conn.execute(
            "SELECT data, gone_at FROM resources WHERE kind=? AND project=? AND scope=? AND name=?",
            (kind, project, scope, name),
        ).fetchone()
        if not row or (not include_gone and row[1] is not None and row[1] <= self.now):
            return None
        return json.loads(row[0])

    def find(self, kind: str, project: str | None = None, scope: str | None = None) -> list[dict]:
        sql = "SELECT data FROM resources WHERE kind=? AND (gone_at IS NULL OR gone_at > ?)"
        args: list[Any] = [kind, self.now]
        if project is not None:
            sql += " AND project=?"
            args.append(project)
        if scope is not None:
            sql += " AND scope=?"
            args.append(scope)
        rows = self.conn.execute(sql + " ORDER BY created, rowid", args)
        return [json.loads(r[0]) for r in rows]

    def put(self, kind: str, obj: dict) -> dict:
        """Insert or replace `obj` (needs `_project`, `_scope`, `name`, `id`; `_gone_at` mirrors a column)."""
        obj.setdefault("_created", self.now)
        self.conn.execute(
            "INSERT INTO resources (kind, project, scope, name, id, created, gone_at, data) "
            "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (kind, project, scope, name) DO UPDATE SET "
            "id=excluded.id, created=excluded.created, gone_at=excluded.gone_at, data=excluded.data",
            (kind, obj["_project"], obj["_scope"], obj["name"], obj["id"], obj["_created"],
             obj.get("_gone_at"), json.dumps(obj)),
        )
        return obj

    def delete(self, kind: str, project: str, scope: str, name: str) -> None:
        self.conn.execute("DELETE FROM resources WHERE kind=? AND project=? AND scope=? AND name=?",
                          (kind, project, scope, name))

    def setting(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_setting(self, key: str, value: object) -> None:
        self.conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, str(value)))

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: object) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))

    def counter(self, key: str, start: int = 0) -> int:
        value = int(self.meta(f"counter:{key}", str(start)))
        self.set_meta(f"counter:{key}", value + 1)
        return value


# ------------------------------------------------------------------------------------ lifecycles
def instance_status(inst: dict, now: float) -> str:
    if inst.get("_stopping_at") is not None and now >= inst["_stopping_at"]:
        return "STOPPING"
    if inst.get("_end_at") is not None and now >= inst["_end_at"]:  # its time limit (see `scheduling`)
        return "TERMINATED" if inst["scheduling"].get("instanceTerminationAction") == "STOP" else "STOPPING"
    if now < inst["_staging_at"]:
        return "PROVISIONING"
    if now < inst["_running_at"]:
        return "STAGING"
    return "RUNNING"


def operation_status(op: dict, now: float) -> str:
    if now >= op["_done_at"]:
        return "DONE"
    if now >= op["_start_at"]:
        return "RUNNING"
    return "PENDING"


def new_operation(db: Db, project: str, scope: str, op_type: str, target_link: str, target_id: str,
                  duration: float, *, user: str, error: dict | None = None, http_status: int | None = None,
                  http_message: str | None = None) -> dict:
    """Store an operation that is PENDING now, RUNNING soon and DONE after `duration` (already scaled)."""
    now = db.now
    name = (f"operation-{int(now * 1000)}-{uuid.uuid4().hex[:13]}-{uuid.uuid4().hex[:8]}-"
            f"{uuid.uuid4().hex[:8]}")
    op: dict[str, Any] = {
        "kind": "compute#operation",
        "id": new_id(),
        "name": name,
        "operationType": op_type,
        "targetLink": target_link,
        "targetId": target_id,
        "user": user,
        "insertTime": rfc3339(now),
        "selfLink": f"projects/{project}/{scope}/operations/{name}",
        "_project": project,
        "_scope": scope,
        "_start_at": now + duration * PENDING_SHARE,
        "_done_at": now + duration,
    }
    if scope.startswith("zones/"):
        op["zone"] = f"projects/{project}/{scope}"
    elif scope.startswith("regions/"):
        op["region"] = f"projects/{project}/{scope}"
    if error is not None:
        op["_error"] = error
        op["_http"] = [http_status, http_message]
    return db.put("operation", op)


def render_operation(op: dict, now: float) -> dict:
    out = {k: v for k, v in op.items() if not k.startswith("_")}
    status = operation_status(op, now)
    out["status"] = status
    out["progress"] = {"PENDING": 0, "RUNNING": 50, "DONE": 100}[status]
    if status != "PENDING":
        out["startTime"] = rfc3339(op["_start_at"])
    if status == "DONE":
        out["endTime"] = rfc3339(op["_done_at"])
        if op.get("_error"):
            out["error"] = op["_error"]
            out["httpErrorStatusCode"], out["httpErrorMessage"] = op["_http"]
    return out


def render_instance(inst: dict, now: float) -> dict:
    out = {k: v for k, v in inst.items() if not k.startswith("_")}
    status = instance_status(inst, now)
    out["status"] = status
    if status == "PROVISIONING":  # no external address and no CPU platform until the VM is placed
        out["cpuPlatform"] = "Unknown CPU Platform"
        out["networkInterfaces"] = [
            {**nic, "accessConfigs": [{k: v for k, v in ac.items() if k != "natIP"}
                                      for ac in nic.get("accessConfigs", [])]}
            for nic in inst["networkInterfaces"]
        ]
    if status in ("RUNNING", "STOPPING"):
        out["lastStartTimestamp"] = rfc3339(inst["_running_at"])
    sched = inst.get("scheduling") or {}
    if status == "RUNNING" and inst.get("_end_at") is not None:  # set by Compute Engine once the VM runs
        end = sched.get("terminationTime") or rfc3339(inst["_running_at"] + float(
            sched["maxRunDuration"].get("seconds", 0)))
        out["resourceStatus"] = {"scheduling": {"terminationTimestamp": end}}
    return out


def disk_status(disk: dict, now: float) -> str:
    if disk.get("_gone_at") is not None:
        return "DELETING"
    return "CREATING" if now < disk["_ready_at"] else "READY"


def render_disk(disk: dict, now: float) -> dict:
    out = {k: v for k, v in disk.items() if not k.startswith("_")}
    out["status"] = disk_status(disk, now)
    return out


def render_address(addr: dict, now: float) -> dict:
    return {k: v for k, v in addr.items() if not k.startswith("_")}


def render_plain(obj: dict, now: float) -> dict:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


RENDER = {"instance": render_instance, "address": render_address, "firewall": render_plain,
          "operation": render_operation, "network": render_plain, "subnetwork": render_plain, "disk": render_disk}
DEFAULT_NETWORK = "default"


def labels_of(obj: dict) -> dict[str, str]:
    return dict(obj.get("labels") or {})


def nat_ips(inst: dict) -> list[str]:
    return [ac["natIP"] for nic in inst.get("networkInterfaces", []) for ac in nic.get("accessConfigs", [])
            if ac.get("natIP")]


# ------------------------------------------------------------------------------------ filters
_TERM = re.compile(
    r"""\s*(?:AND\s+)?\(?\s*(?P<field>[A-Za-z_][\w.\-]*)\s*(?P<op>!=|=|:|\beq\b|\bne\b)\s*
        (?P<value>"(?:[^"\\]|\\.)*"|'[^']*'|[^\s()]+)\s*\)?\s*""",
    re.X,
)


class FilterError(ValueError):
    pass


def parse_filter(expr: str | None) -> list[tuple[str, str, str]]:
    """`labels.a = "x"`, `labels.a=x`, `(labels.a = "x") (name != "y")`, `... AND ...`, `name eq 'regex'`."""
    if not expr or not expr.strip():
        return []
    terms = []
    pos = 0
    text = expr.strip()
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(f"Invalid list filter expression '{expr}'.")
        value = m.group("value")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1].replace('\\"', '"')
        terms.append((m.group("field"), m.group("op"), value))
        pos = m.end()
    return terms


def _field(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(obj, dict):
            obj = obj.get(part)
        else:
            return None
    return obj


def _eq(actual: Any, value: str) -> bool:
    if actual is None:
        return False
    if isinstance(actual, bool):
        actual = "true" if actual else "false"
    actual = str(actual)
    if "/" in actual and "/" not in value:  # links compare by their last segment (zone = us-central1-a)
        actual = actual.rsplit("/", 1)[-1]
    return fnmatch.fnmatchcase(actual, value) if "*" in value else actual == value


def matches(obj: dict, terms: list[tuple[str, str, str]]) -> bool:
    for field, op, value in terms:
        actual = _field(obj, field)
        if op == "=":
            ok = _eq(actual, value)
        elif op == "!=":
            ok = not _eq(actual, value)
        elif op == ":":
            ok = actual is not None if value == "*" else _eq(actual, value)
        else:  # eq / ne: RE2 full match
            try:
                ok = actual is not None and re.fullmatch(value, str(actual)) is not None
            except re.error:
                raise FilterError(f"Invalid regular expression '{value}' in list filter.") from None
            ok = ok if op == "eq" else not ok
        if not ok:
            return False
    return True


# ------------------------------------------------------------------------------------ the world
class GceWorld(SqliteWorld):
    """The emulated Compute Engine's state and control API (see the module docstring)."""

    def __init__(self, state_dir: str | os.PathLike, time_scale: float | None = None,
                 project: str = catalog.PROJECT):
        self.state_dir = Path(state_dir).expanduser()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if time_scale is None and os.environ.get("LABCTL_TESTBED_TIME_SCALE"):
            time_scale = float(os.environ["LABCTL_TESTBED_TIME_SCALE"])
        self.explicit_scale = time_scale
        self.project = project
        super().__init__(self.state_dir / "gce.db", _SCHEMA)
        self._init()
        with self.read() as db:
            self.ssh_port: int = int(db.meta("ssh_port"))

    def __repr__(self) -> str:
        return f"GceWorld({str(self.state_dir)!r})"

    @property
    def credentials(self):
        """This world's own credentials (`labctl.testbed.access`): its bearer token alone opens the API."""
        from labctl.testbed.access import world_credentials

        return world_credentials(self.state_dir)

    # transactions (connections: `SqliteWorld`) ---------------------------------------------------
    def _tx(self, mode: str, now: float | None):
        # `db.now` is `now` or the time the transaction began; a nested one shares the outer one's.
        return self._transaction(mode, lambda conn: Db(conn, time.time() if now is None else now))

    def tx(self, now: float | None = None):
        """A write transaction (`BEGIN IMMEDIATE`): `with world.tx() as db: ...`."""
        return self._tx("IMMEDIATE", now)

    def read(self, now: float | None = None):
        """A read transaction (a consistent snapshot)."""
        return self._tx("DEFERRED", now)

    def _init(self) -> None:
        with self.tx() as db:
            if db.meta("created") is None:
                db.set_meta("created", time.time())
                db.set_meta("ssh_port", free_port())
                db.set_meta("time_scale", self.explicit_scale if self.explicit_scale is not None
                            else DEFAULT_TIME_SCALE)

    # settings -----------------------------------------------------------------------------------------
    @property
    def time_scale(self) -> float:
        if self.explicit_scale is not None:
            return float(self.explicit_scale)
        with self.read() as db:
            return float(db.meta("time_scale", str(DEFAULT_TIME_SCALE)))

    def set_time_scale(self, scale: float) -> None:
        """Change the time scale (for resources and operations created from now on, by every process that
        did not choose its own)."""
        self.explicit_scale = float(scale)
        with self.tx() as db:
            db.set_meta("time_scale", float(scale))

    @property
    def lease_scale(self) -> float:
        """How fast instances' time limits (scheduling.terminationTime / maxRunDuration) run out: 1.0 (real time,
        as the emulated Blazar leases) unless `LABCTL_TESTBED_LEASE_SCALE` or `set_lease_scale` says otherwise
        (a test ends a lab in seconds with it). Applies to instances created from then on."""
        if os.environ.get("LABCTL_TESTBED_LEASE_SCALE"):
            return float(os.environ["LABCTL_TESTBED_LEASE_SCALE"])
        with self.read() as db:
            return float(db.meta("lease_scale", "1.0"))

    def set_lease_scale(self, scale: float) -> None:
        with self.tx() as db:
            db.set_meta("lease_scale", float(scale))

    def set_capacity(self, zone: str, machine_or_accelerator_type: str, n: int) -> None:
        """How many instances of a machine type (or cards of an accelerator type) `zone` can hold at once.

        Defaults: 8 for GPU machine types and accelerators, 1000 for CPU machine types. Beyond it, an insert's
        operation ends DONE with ZONE_RESOURCE_POOL_EXHAUSTED (httpErrorStatusCode 503)."""
        if zone not in catalog.ZONES:
            raise ValueError(f"unknown zone {zone!r}")
        with self.tx() as db:
            db.set_setting(f"capacity:{zone}:{machine_or_accelerator_type}", int(n))

    def capacity(self, zone: str, type_name: str, db: Db | None = None) -> int:
        default = catalog.DEFAULT_GPU_CAPACITY if catalog.is_gpu_type(type_name) else catalog.DEFAULT_CPU_CAPACITY
        if db is None:
            with self.read() as db2:
                return int(db2.setting(f"capacity:{zone}:{type_name}", str(default)))
        return int(db.setting(f"capacity:{zone}:{type_name}", str(default)))

    def set_quota(self, region: str, metric: str, limit: float) -> None:
        """A regional quota limit (CPUS, INSTANCES, IN_USE_ADDRESSES, STATIC_ADDRESSES, NVIDIA_T4_GPUS, ...)."""
        if region not in catalog.REGIONS:
            raise ValueError(f"unknown region {region!r}")
        with self.tx() as db:
            db.set_setting(f"quota:{region}:{metric}", float(limit))

    def quota(self, region: str, metric: str, db: Db) -> float:
        return float(db.setting(f"quota:{region}:{metric}", str(catalog.DEFAULT_QUOTAS.get(metric, 1e9))))

    def quota_usage(self, region: str, db: Db) -> dict[str, float]:
        usage: dict[str, float] = dict.fromkeys(catalog.DEFAULT_QUOTAS, 0.0)
        for inst in db.find("instance", self.project):
            if catalog.ZONES.get(inst["_scope"].split("/")[1]) != region:
                continue
            for metric, amount in instance_quota(inst).items():
                usage[metric] = usage.get(metric, 0.0) + amount
        for addr in db.find("address", self.project, f"regions/{region}"):
            usage["STATIC_ADDRESSES"] += 1
            if addr.get("status") == "IN_USE":
                usage["IN_USE_ADDRESSES"] += 1
        return usage

    # faults and request log (their storage: `SqliteWorld`) -----------------------------------------------
    def inject_fault(self, operation: str, kind: str, count: int = 1, message: str | None = None) -> None:
        """Make the next `count` requests of `operation` misbehave.

        `operation` is an API method id as in the discovery document ("instances.insert", "instances.list",
        "zoneOperations.wait", "firewalls.insert", "addresses.delete"), a glob of them ("instances.*"),
        or "*". `kind`: error503 | error500 | error429 (answer with that error, do nothing) |
        hang_after (do it and commit, then never answer) | timeout_after (do it and commit, then drop
        the connection)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(FAULT_KINDS)})")
        self.queue_fault(None, operation.strip(), kind, count, message)

    def faults(self) -> list[dict]:
        return [{k: v for k, v in f.items() if k != "scope"} for f in self.pending_faults()]

    def take_fault(self, operation: str) -> tuple[str, str | None] | None:
        """Consume one fault matching this API method, if any: (kind, message)."""
        return self.pop_fault(None, [operation], glob=True)

    def log_request(self, method: str, path: str, query: str = "", operation: str | None = None) -> None:
        self.record_request(None, method, path, query, operation)

    def request_log(self, detail: bool = False) -> list:
        """Every request served, in order: (method, path), e.g. ("POST", "/compute/v1/projects/sim-project/
        zones/us-central1-a/instances"). With detail=True, dicts that also carry ts, query and operation
        (the API method id, "instances.insert")."""
        rows = self.logged_requests()
        if detail:
            keys = ("ts", "method", "path", "query", "operation")
            return [{k: r[k] for k in keys} for r in rows]
        return [(r["method"], r["path"]) for r in rows]

    # lifecycle ----------------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Purge what was deleted (delete operation DONE) and free the addresses it held."""
        now = time.time() if now is None else now
        with self.read(now) as db:
            due = db.conn.execute(f"SELECT 1 FROM resources WHERE (gone_at IS NOT NULL AND gone_at <= ?) OR {_ENDED} "
                                  "LIMIT 1", (now, now)).fetchone()
        if due:
            with self.tx(now) as db:
                purge(db)

    # views --------------------------------------------------------------------------------------------
    def inventory(self) -> dict[str, list[dict]]:
        """What exists in the project: instances (with status, labels, zone, machine type, internal and
        external IPs, network, subnetwork, attached disks by device name), firewalls (with description, target
        tags, allowed) and addresses (with labels, status, users); and, only when there is at least one,
        networks (other than `default`), subnetworks and disks (with status, size, labels, users)."""
        self.tick()
        with self.read() as db:
            now = db.now
            instances = []
            for inst in db.find("instance", self.project):
                r = render_instance(inst, now)
                instances.append({
                    "id": inst["id"], "name": inst["name"], "zone": inst["_scope"].split("/")[1],
                    "status": r["status"], "labels": labels_of(inst),
                    "machine_type": inst["machineType"].rsplit("/", 1)[-1],
                    "accelerators": [(a["acceleratorType"].rsplit("/", 1)[-1], a["acceleratorCount"])
                                     for a in inst.get("guestAccelerators", [])],
                    "tags": list((inst.get("tags") or {}).get("items", [])),
                    "internal_ip": inst["networkInterfaces"][0].get("networkIP"),
                    "external_ip": (nat_ips(inst) or [None])[0],
                    "network": inst["networkInterfaces"][0]["network"].rsplit("/", 1)[-1],
                    "subnetwork": inst["networkInterfaces"][0].get("subnetwork", "").rsplit("/", 1)[-1],
                    "attached_disks": {d["deviceName"]: d["source"].rsplit("/", 1)[-1]
                                       for d in inst.get("disks", []) if not d.get("boot")},
                })
            firewalls = [{"id": f["id"], "name": f["name"], "description": f.get("description", ""),
                          "target_tags": f.get("targetTags", []), "allowed": f.get("allowed", []),
                          "source_ranges": f.get("sourceRanges", []),
                          "network": f.get("network", "").rsplit("/", 1)[-1]}
                         for f in db.find("firewall", self.project)]
            addresses = [{"id": a["id"], "name": a["name"], "region": a["_scope"].split("/")[1],
                          "address": a["address"], "status": a["status"], "labels": labels_of(a),
                          "description": a.get("description", ""), "users": list(a.get("users", []))}
                         for a in db.find("address", self.project)]
            networks = [{"id": n["id"], "name": n["name"], "description": n.get("description", ""),
                         "auto_create_subnetworks": n.get("autoCreateSubnetworks", False),
                         "subnetworks": [s["name"] for s in db.find("subnetwork", self.project)
                                         if s["network"] == n["selfLink"]]}
                        for n in db.find("network", self.project)]
            subnetworks = [{"id": s["id"], "name": s["name"], "region": s["_scope"].split("/")[1],
                            "network": s["network"].rsplit("/", 1)[-1], "ip_cidr_range": s["ipCidrRange"],
                            "gateway_address": s["gatewayAddress"], "description": s.get("description", "")}
                           for s in db.find("subnetwork", self.project)]
            disks = [{"id": d["id"], "name": d["name"], "zone": d["_scope"].split("/")[1],
                      "status": disk_status(d, now), "size_gb": int(d["sizeGb"]), "type": d["type"].rsplit("/", 1)[-1],
                      "labels": labels_of(d), "description": d.get("description", ""),
                      "users": [u.rsplit("/", 1)[-1] for u in d.get("users", [])]}
                     for d in db.find("disk", self.project)]
        out = {"instances": instances, "firewalls": firewalls, "addresses": addresses}
        # the kinds labctl's private networks and volumes add are listed only when there are some
        for key, items in (("networks", networks), ("subnetworks", subnetworks), ("disks", disks)):
            if items:
                out[key] = items
        return out

    def ssh_targets(self) -> list[dict[str, Any]]:
        """Every RUNNING instance, as the SSH side (`labctl.testbed.sshd`) needs it: `address` is its external
        IP (None without one), `fixed_ips` its networkIP per network (link), `internal_address` a loopback
        address of its own (127.13.x.y, derived from the instance id, unique in the world) on which it is
        reachable only through a node on one of its networks (`ssh -J`). A VPC network is global: `site` is
        the project, so nodes of one network in different zones reach each other."""
        self.tick()
        out = []
        with self.read() as db:
            now = db.now
            for inst in db.find("instance", self.project):
                if instance_status(inst, now) != "RUNNING":
                    continue
                ips = nat_ips(inst)
                keys, users = [], []
                for item in (inst.get("metadata") or {}).get("items", []):
                    if item.get("key") != "ssh-keys":
                        continue
                    for line in str(item.get("value") or "").splitlines():
                        user, sep, key = line.strip().partition(":")
                        if sep and key.strip():
                            keys.append(key.strip())
                            users.append(user)
                zone = inst["_scope"].split("/")[1]
                out.append({
                    "server_id": inst["id"],
                    "site": f"gcp:{self.project}",
                    "zone": zone,
                    "name": inst["name"],
                    "address": ips[0] if ips else None,
                    "port": self.ssh_port,
                    "authorized_keys": keys,
                    "user": users[0] if users else None,
                    "users": sorted(set(users)),
                    "node_dir": self.state_dir / "nodes" / inst["id"],
                    "fixed_ips": {nic["network"]: nic["networkIP"] for nic in inst.get("networkInterfaces", [])
                                  if nic.get("networkIP")},
                })
        internal = internal_addresses((t["server_id"] for t in out), "127.13")
        for t in out:
            t["internal_address"] = internal[t["server_id"]]
        return out

    def ingress_allowed(self, target: dict[str, Any], port: int, peer) -> bool:
        """Whether the firewall rules of the instance's network let `peer` (`labctl.testbed.firewall.Peer`)
        reach `port` of the instance `target` (one of `ssh_targets()`): the SSH side asks on every connection."""
        from labctl.testbed.firewall import gce_allows

        return gce_allows(self, target, port, peer)


# ------------------------------------------------------------------------------------ shared behaviour
def instance_quota(inst: dict) -> dict[str, float]:
    """What one instance counts against its region's quotas."""
    mt = catalog.MACHINE_TYPES.get(inst["machineType"].rsplit("/", 1)[-1])
    use: dict[str, float] = {"INSTANCES": 1.0, "CPUS": float(mt.cpus if mt else 1)}
    if mt and mt.accelerator:
        metric = catalog.ACCELERATORS[mt.accelerator].quota_metric
        use[metric] = use.get(metric, 0.0) + mt.gpus
    for acc in inst.get("guestAccelerators", []):
        a = catalog.ACCELERATORS.get(acc["acceleratorType"].rsplit("/", 1)[-1])
        if a:
            use[a.quota_metric] = use.get(a.quota_metric, 0.0) + int(acc.get("acceleratorCount", 1))
    if nat_ips(inst):
        use["IN_USE_ADDRESSES"] = 1.0
    return use


# Instances whose time limit has come and that are not yet being deleted (their end is `_end_at`, see `scheduling`).
_ENDED = ("(kind = 'instance' AND gone_at IS NULL AND json_extract(data, '$._end_at') <= ? "
          "AND json_extract(data, '$.scheduling.instanceTerminationAction') = 'DELETE')")


def purge(db: Db) -> None:
    """Remove resources whose delete operation is DONE; an instance's static addresses become RESERVED. An
    instance whose time limit has come (action DELETE) is deleted as if asked then."""
    for (data,) in db.conn.execute(f"SELECT data FROM resources WHERE {_ENDED}", (db.now,)).fetchall():
        inst = json.loads(data)
        inst["_stopping_at"], inst["_gone_at"] = inst["_end_at"], inst["_end_at"] + inst["_end_delete"]
        db.put("instance", inst)
    rows = db.conn.execute(
        "SELECT kind, project, scope, name, data FROM resources WHERE gone_at IS NOT NULL AND gone_at <= ?",
        (db.now,)).fetchall()
    for kind, project, scope, name, data in rows:
        if kind == "instance":
            inst = json.loads(data)
            release_static(db, project, inst)
            release_disks(db, project, inst)
        db.delete(kind, project, scope, name)
    # operations and request ids are kept for a day (Compute Engine keeps them for a while too)
    db.conn.execute("DELETE FROM resources WHERE kind='operation' AND created < ?", (db.now - 86400,))
    db.conn.execute("DELETE FROM request_ids WHERE created < ?", (db.now - 86400,))


def release_static(db: Db, project: str, inst: dict, only_ip: str | None = None) -> None:
    region = catalog.ZONES[inst["_scope"].split("/")[1]]
    link = inst["selfLink"]
    for addr in db.find("address", project, f"regions/{region}"):
        if link in addr.get("users", []) and (only_ip is None or addr["address"] == only_ip):
            addr["users"] = [u for u in addr["users"] if u != link]
            addr["status"] = "IN_USE" if addr["users"] else "RESERVED"
            db.put("address", addr)


def release_disks(db: Db, project: str, inst: dict) -> None:
    """A deleted instance no longer uses the disks attached to it: they stay, READY, unless attached with
    autoDelete (then they go with it)."""
    link = inst["selfLink"]
    auto = {d["source"] for d in inst.get("disks", []) if d.get("autoDelete") and not d.get("boot")}
    for disk in db.find("disk", project, inst["_scope"]):
        if disk["selfLink"] in auto:
            db.delete("disk", project, disk["_scope"], disk["name"])
        elif link in disk.get("users", []):
            disk["users"] = [u for u in disk["users"] if u != link]
            disk["lastDetachTimestamp"] = rfc3339(db.now)
            db.put("disk", disk)
