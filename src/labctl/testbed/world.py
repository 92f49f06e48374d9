"""The emulated Chameleon's state: one SQLite file shared by every process and thread that serves it.

All state lives in `<state_dir>/world.db` (WAL journal, short transactions, `BEGIN IMMEDIATE` for writes), so
several labctl processes can each run their own HTTP endpoint over the same world. Nothing runs in the
background: lifecycle states (lease PENDING → ACTIVE → TERMINATED, server BUILD → ACTIVE) are computed from
stored timestamps, and the few side effects of time passing (reserved floating IPs created at lease start,
servers removed at lease end) are applied lazily by whoever looks next (`World.tick`).

Besides storage, `World` is the control API that tests and the SSH side use: host counts, fault injection,
latency, the request log, an inventory of what exists, and the SSH targets.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from labctl.testbed.sqlite_world import SqliteWorld, free_port, internal_addresses

DEFAULT_TIME_SCALE = 0.01
# What `ssh_targets` reads: its cache holds while none of these kinds is written.
_SSH_KINDS = ("server", "port", "fip", "volume")
FAULT_KINDS = ("error500", "error429", "server_error_state", "hang_after", "timeout_after")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settings (site TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
                                     PRIMARY KEY (site, key));
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, site TEXT NOT NULL, id TEXT NOT NULL, name TEXT,
    created REAL NOT NULL, t_next REAL, data TEXT NOT NULL,
    PRIMARY KEY (kind, site, id));
CREATE INDEX IF NOT EXISTS objects_due ON objects (t_next) WHERE t_next IS NOT NULL;
CREATE INDEX IF NOT EXISTS objects_name ON objects (kind, site, name);
CREATE INDEX IF NOT EXISTS objects_device ON objects (kind, site, json_extract(data, '$.device_id'))
    WHERE kind = 'port';
CREATE INDEX IF NOT EXISTS objects_port ON objects (kind, site, json_extract(data, '$.port_id'))
    WHERE kind = 'fip';
CREATE INDEX IF NOT EXISTS objects_group ON objects (kind, site, json_extract(data, '$.security_group_id'))
    WHERE kind = 'sgrule';
CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, site TEXT NOT NULL, expires REAL NOT NULL,
                                   data TEXT NOT NULL);
"""


def default_state_dir() -> Path:
    env = os.environ.get("LABCTL_TESTBED_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_state_dir("labctl")) / "testbed"


def _site_name(site: str | None) -> str | None:
    if site is None:
        return None
    from labctl.testbed.openstack.catalog import resolve_site

    return resolve_site(site).name


def _norm_operation(operation: str) -> str:
    operation = operation.strip()
    if operation == "*":
        return "*"
    method, _, path = operation.partition(" ")
    path = path.strip() or "*"
    if path != "*" and not path.startswith("/"):
        path = "/" + path
    return f"{method.upper()} {path.rstrip('/') or '/'}"


def _request_names(method: str, template: str, path: str) -> set[str]:
    """The names a fault or latency may give a request: its route template, its concrete path, any path."""
    return {_norm_operation(f"{method} {template}"), _norm_operation(f"{method} {path}"), f"{method.upper()} *"}


class Db:
    """One open transaction on the world: typed helpers over the generic `objects` table."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    # objects -----------------------------------------------------------------------------------
    def get(self, kind: str, site: str, id: str) -> dict | None:
        row = self.conn.execute(
            "SELECT data FROM objects WHERE kind=? AND site=? AND id=?", (kind, site, id)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def get_many(self, kind: str, site: str, ids: Iterable[str]) -> list[dict]:
        """The objects of `kind` at `site` with these ids (those that exist), oldest first."""
        ids = [i for i in ids if isinstance(i, str)]  # stored ids are strings
        out: list[tuple[float, int, dict]] = []
        for start in range(0, len(ids), 500):  # under SQLite's limit on bound variables
            chunk = ids[start:start + 500]
            rows = self.conn.execute(
                f"SELECT created, rowid, data FROM objects WHERE kind=? AND site=? AND id IN "
                f"({','.join('?' * len(chunk))})", [kind, site, *chunk])
            out += [(created, rowid, json.loads(data)) for created, rowid, data in rows]
        return [obj for *_, obj in sorted(out, key=lambda row: row[:2])]

    def find(self, kind: str, site: str | None = None, **equal: str) -> list[dict]:
        """Objects of a kind (at a site), oldest first; `equal` keeps those whose top-level fields have these
        values, compared by SQLite itself (a class-sized world has thousands of rows: parsing them all in
        Python for each lookup made listings grow with the square of the class). `name` is its own indexed
        column; ports' `device_id`, floating IPs' `port_id` and rules' `security_group_id` have indexes."""
        where, args = self._where(kind, site, equal)
        rows = self.conn.execute(f"SELECT data FROM objects WHERE {where} ORDER BY created, rowid", args)
        return [json.loads(r[0]) for r in rows]

    def find_any(self, kind: str, site: str, **values: Iterable[str]) -> list[dict]:
        """Objects of `kind` at `site` where any of these top-level fields has one of its values, oldest
        first (matched by SQLite: only those rows are parsed)."""
        where, args = self._where(kind, site, {})
        alternatives = []
        for field, wanted in values.items():
            wanted = [w for w in wanted if isinstance(w, str)]
            if not field.isidentifier():
                raise ValueError(f"bad field name {field!r}")
            if wanted:
                alternatives.append(f"json_extract(data, '$.{field}') IN ({','.join('?' * len(wanted))})")
                args += wanted
        if not alternatives:
            return []
        rows = self.conn.execute(
            f"SELECT data FROM objects WHERE {where} AND ({' OR '.join(alternatives)}) ORDER BY created, rowid", args)
        return [json.loads(r[0]) for r in rows]

    def find_by_item(self, kind: str, site: str, field: str, key: str, value: str) -> list[dict]:
        """Objects of `kind` at `site` whose list `field` holds an object with `key` equal to `value`
        (a lease by one of its reservations' ids), matched by SQLite."""
        where, args = self._where(kind, site, {})
        if not (field.isidentifier() and key.isidentifier()):
            raise ValueError(f"bad field name {field!r} or {key!r}")
        rows = self.conn.execute(
            f"SELECT data FROM objects WHERE {where} AND EXISTS (SELECT 1 FROM json_each(objects.data, "
            f"'$.{field}') AS item WHERE json_extract(item.value, '$.{key}') = ?) ORDER BY created, rowid",
            [*args, value])
        return [json.loads(r[0]) for r in rows]

    def count(self, kind: str, site: str | None = None, **equal: str) -> int:
        """How many objects `find` would return, counted by SQLite (quota usage: nothing parsed)."""
        where, args = self._where(kind, site, equal)
        return int(self.conn.execute(f"SELECT COUNT(*) FROM objects WHERE {where}", args).fetchone()[0])

    @staticmethod
    def _where(kind: str, site: str | None, equal: dict[str, str]) -> tuple[str, list[Any]]:
        if not kind.isidentifier():
            raise ValueError(f"bad kind {kind!r}")
        # The kind inline: SQLite uses the partial indexes (WHERE kind = 'port'...) only for a literal kind.
        sql, args = f"kind='{kind}'", []
        if site is not None:
            sql, args = sql + " AND site=?", [*args, site]
        for field, value in equal.items():
            if not field.isidentifier():
                raise ValueError(f"bad field name {field!r}")
            # `name` mirrors the object's name (see `put`); other fields are read from the JSON by SQLite, in
            # the very form of the indexes' expressions (SQLite uses an index only for the same expression).
            if not isinstance(value, str):  # stored names and ids are strings: a number, list... matches none
                sql += " AND 0"
                continue
            column = "name" if field == "name" else f"json_extract(data, '$.{field}')"
            sql, args = sql + f" AND {column}=?", [*args, value]
        return sql, args

    def any_listed(self, kind: str, site: str, field: str, value: str) -> bool:
        """Whether an object of `kind` at `site` has `value` in its list `field` (looked up by SQLite)."""
        where, args = self._where(kind, site, {})
        if not field.isidentifier():
            raise ValueError(f"bad field name {field!r}")
        row = self.conn.execute(
            f"SELECT 1 FROM objects, json_each(objects.data, '$.{field}') AS item WHERE {where} "
            "AND item.value = ? LIMIT 1", [*args, value]).fetchone()
        return row is not None

    def generation(self, kinds: Iterable[str]) -> tuple[int, ...]:
        """Numbers that change whenever an object of one of `kinds` is written or deleted (readers' caches
        compare them)."""
        kinds = list(kinds)
        rows = dict(self.conn.execute(
            f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(kinds))})",
            [f"objects_gen:{kind}" for kind in kinds]).fetchall())
        return tuple(int(rows.get(f"objects_gen:{kind}", 0)) for kind in kinds)

    def _bump(self, kind: str) -> None:
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, '1') "
            "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1", (f"objects_gen:{kind}",))

    def put(self, kind: str, site: str, obj: dict) -> dict:
        """Insert or replace `obj` (needs `id`; `name`, `created`, `t_next` are mirrored into columns)."""
        if obj.get("name") is not None and not isinstance(obj["name"], str):
            raise ValueError(f"{kind} name must be a string, not {type(obj['name']).__name__}")
        obj.setdefault("created", time.time())
        self.conn.execute(
            "INSERT INTO objects (kind, site, id, name, created, t_next, data) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT (kind, site, id) DO UPDATE SET name=excluded.name, t_next=excluded.t_next, "
            "data=excluded.data",
            (kind, site, obj["id"], obj.get("name"), obj["created"], obj.get("t_next"), json.dumps(obj)),
        )
        self._bump(kind)
        return obj

    def delete(self, kind: str, site: str, id: str) -> bool:
        cur = self.conn.execute("DELETE FROM objects WHERE kind=? AND site=? AND id=?", (kind, site, id))
        if cur.rowcount > 0:
            self._bump(kind)
        return cur.rowcount > 0

    def due(self, now: float) -> list[tuple[str, str, dict]]:
        rows = self.conn.execute(
            "SELECT kind, site, data FROM objects WHERE t_next IS NOT NULL AND t_next <= ? ORDER BY t_next",
            (now,),
        )
        return [(k, s, json.loads(d)) for k, s, d in rows]

    # meta, settings, counters --------------------------------------------------------------------
    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: object) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))

    def setting(self, site: str, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM settings WHERE site=? AND key=?", (site, key)).fetchone()
        return row[0] if row else default

    def settings(self, site: str, prefix: str) -> dict[str, str]:
        rows = self.conn.execute(
            "SELECT key, value FROM settings WHERE site=? AND key LIKE ?", (site, prefix + "%")
        )
        return {k[len(prefix) :]: v for k, v in rows}

    def set_setting(self, site: str, key: str, value: object) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO settings (site, key, value) VALUES (?,?,?)", (site, key, str(value))
        )

    def counter(self, key: str, start: int = 0) -> int:
        """Return the next value of a named counter (first call returns `start`)."""
        value = int(self.meta(f"counter:{key}", str(start)))
        self.set_meta(f"counter:{key}", value + 1)
        return value

    # tokens --------------------------------------------------------------------------------------
    def token(self, token_id: str) -> dict | None:
        row = self.conn.execute("SELECT site, expires, data FROM tokens WHERE id=?", (token_id,)).fetchone()
        if not row or row[1] < time.time():
            return None
        data = json.loads(row[2])
        data["site"] = row[0]
        return data

    def put_token(self, token_id: str, site: str, expires: float, data: dict) -> None:
        self.conn.execute("DELETE FROM tokens WHERE expires < ?", (time.time(),))
        self.conn.execute(
            "INSERT OR REPLACE INTO tokens (id, site, expires, data) VALUES (?,?,?,?)",
            (token_id, site, expires, json.dumps(data)),
        )

    def delete_token(self, token_id: str) -> None:
        self.conn.execute("DELETE FROM tokens WHERE id=?", (token_id,))


class World(SqliteWorld):
    """The emulated Chameleon's state and its control API (see the module docstring)."""

    def __init__(self, state_dir: str | os.PathLike | None = None, time_scale: float | None = None):
        self.state_dir = Path(state_dir).expanduser() if state_dir is not None else default_state_dir()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if time_scale is None and os.environ.get("LABCTL_TESTBED_TIME_SCALE"):
            time_scale = float(os.environ["LABCTL_TESTBED_TIME_SCALE"])
        self.explicit_scale = time_scale  # given to this process (None: the one stored in the world)
        self._ssh_cache: tuple[tuple[int, ...], float, list[dict[str, Any]]] | None = None  # see ssh_targets
        self._node_dirs: dict[str, Path] = {}
        super().__init__(self.state_dir / "world.db", _SCHEMA)
        self._init()

    def __repr__(self) -> str:
        return f"World({str(self.state_dir)!r})"

    @property
    def credentials(self):
        """This world's own credentials (`labctl.testbed.access`): only they open its APIs."""
        from labctl.testbed.access import world_credentials

        return world_credentials(self.state_dir)

    # transactions (connections: `SqliteWorld`) ---------------------------------------------------
    def tx(self):
        """A write transaction (`BEGIN IMMEDIATE`): `with world.tx() as db: ...`."""
        return self._transaction("IMMEDIATE", Db)

    def read(self):
        """A read transaction (a consistent snapshot)."""
        return self._transaction("DEFERRED", Db)

    def _init(self) -> None:
        with self.tx() as db:
            if db.meta("created") is None:
                db.set_meta("created", time.time())
                db.set_meta("ssh_port", free_port())
                db.set_meta(
                    "time_scale",
                    self.explicit_scale if self.explicit_scale is not None else DEFAULT_TIME_SCALE,
                )
                from labctl.testbed.openstack import model

                model.seed(db)

    # world-level settings ----------------------------------------------------------------------------
    @property
    def time_scale(self) -> float:
        if self.explicit_scale is not None:
            return float(self.explicit_scale)
        with self.read() as db:
            return float(db.meta("time_scale", str(DEFAULT_TIME_SCALE)))

    @property
    def ssh_port(self) -> int:
        with self.read() as db:
            return int(db.meta("ssh_port"))

    def set_hosts(self, site: str, node_type: str, n: int) -> None:
        """Make `node_type` at `site` have exactly `n` reservable hosts (0 = none free)."""
        site = _site_name(site)
        with self.tx() as db:
            db.set_setting(site, f"hosts:{node_type}", int(n))

    def set_flavor_slots(self, site: str, flavor: str, n: int) -> None:
        """How many instances of KVM `flavor` the site can reserve at once."""
        site = _site_name(site)
        with self.tx() as db:
            db.set_setting(site, f"slots:{flavor}", int(n))

    def set_fip_quota(self, site: str, n: int) -> None:
        """The project's floating IP quota at `site` (default 50)."""
        self.set_quota(site, "floatingip", n)

    def set_quota(self, site: str, resource: str, n: int) -> None:
        """The project's quota for `resource` at `site`: Neutron's (floatingip, network, port, router, subnet,
        security_group, security_group_rule) or Nova's (instances, cores, ram, key_pairs...); by default what
        the APIs report (`QUOTA_DEFAULTS`)."""
        from labctl.testbed.openstack.model.base import QUOTA_DEFAULTS

        if resource not in QUOTA_DEFAULTS:
            raise ValueError(f"no quota named {resource!r}: {', '.join(QUOTA_DEFAULTS)}")
        site = _site_name(site)
        with self.tx() as db:
            db.set_setting(site, f"quota:{resource}", int(n))

    def set_public_subnets(self, site: str, n: int) -> None:
        """How many /24 subnets `site`'s public network has (default 1: 245 floating IPs; at most 6)."""
        from labctl.testbed.openstack import catalog

        if not 1 <= int(n) <= len(catalog.PUBLIC_PREFIXES):
            raise ValueError(f"public subnets: 1 to {len(catalog.PUBLIC_PREFIXES)}, not {n}")
        site = _site_name(site)
        with self.tx() as db:
            db.set_setting(site, "public_subnets", int(n))

    # faults, latency, request log (their storage: `SqliteWorld`) ---------------------------------------------
    def inject_fault(
        self, site: str | None, operation: str, kind: str, count: int = 1, message: str | None = None
    ) -> None:
        """Make the next `count` requests matching `operation` at `site` (None: any site) misbehave.

        `operation` is "METHOD /path" relative to the service's versioned endpoint, either as the route
        template or the concrete path: "POST /leases", "POST /servers", "DELETE /servers/{id}",
        "POST /v2.0/floatingips", "PUT /v2.0/floatingips/{id}"; "*" matches everything.
        `kind`: error500 | error429 | server_error_state | hang_after | timeout_after.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(FAULT_KINDS)})")
        self.queue_fault(_site_name(site), _norm_operation(operation), kind, count, message)

    def faults(self) -> list[dict]:
        return [{"site": f.pop("scope"), **f} for f in self.pending_faults()]

    def take_fault(self, site: str, method: str, template: str, path: str) -> tuple[str, str | None] | None:
        """Consume one matching fault for this request, if any: (kind, message)."""
        return self.pop_fault(site, _request_names(method, template, path))

    def set_latency(self, operation: str, seconds: float) -> None:
        """Delay matching requests by `seconds` × time scale ("*" for every request; 0 removes)."""
        super().set_latency(_norm_operation(operation), seconds)

    def latency_for(self, method: str, template: str, path: str) -> float:
        return self.latency_of(_request_names(method, template, path))

    def log_request(
        self, site: str | None, method: str, path: str, query: str = "", operation: str | None = None
    ) -> None:
        self.record_request(site, method, path, query, operation)

    def request_log(self, detail: bool = False) -> list:
        """Every request served, in order: (site, method, path) with path below the site prefix
        (e.g. ("chi@tacc", "POST", "/reservation/v1/leases")); site is "refapi" for the reference API.
        With detail=True, dicts that also carry ts, query and operation ("POST /leases")."""
        rows = self.logged_requests()
        if detail:
            keys = ("ts", "site", "method", "path", "query", "operation")
            return [dict(zip(keys, (r["ts"], r["scope"], r["method"], r["path"], r["query"], r["operation"]),
                             strict=True)) for r in rows]
        return [(r["scope"], r["method"], r["path"]) for r in rows]

    # lifecycle -----------------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Apply what time has done since the last look (lease starts and ends)."""
        from labctl.testbed.openstack import model

        now = time.time() if now is None else now
        due = self._read_one("SELECT 1 FROM objects WHERE t_next IS NOT NULL AND t_next <= ? LIMIT 1", (now,))
        if due:
            with self.tx() as db:
                model.process_due(db, now)

    # views -----------------------------------------------------------------------------------------------
    def inventory(self, site: str | None = None) -> dict[str, list[dict]]:
        """What exists (per site, or everywhere): servers, leases (not terminated), floating_ips,
        security_groups (not `default`), keypairs, and the project's own networks, subnets, routers and
        ports (not the built-in public/sharednet1 networks, their subnets and router, nor the ports Nova
        made on sharednet1 for a server; ports made through POST /ports and router interfaces are listed); those four
        keys are present only when there is at least one such item.
        Each item has at least id, name and site."""
        from labctl.testbed.openstack import model

        self.tick()
        now = time.time()
        with self.read() as db:
            return model.inventory(db, _site_name(site), now)

    def ssh_targets(self) -> list[dict[str, Any]]:
        """Every ACTIVE server, as the SSH side needs it: `address` is its floating IP (None without one),
        `fixed_ips` its fixed IP per network id, `internal_address` a loopback address (127.11.x.y, derived
        from the server id) on which it is reachable only through a node that shares one of its networks."""
        from labctl.testbed.openstack import model

        self.tick()
        now = time.time()
        with self.read() as db:
            # The SSH side asks many times a second: the same answer while no object was written and no
            # server finished booting (a copy of each target, so a caller's change stays its own).
            generation = db.generation(_SSH_KINDS)
            cached = self._ssh_cache
            if cached is not None and cached[0] == generation and now < cached[1]:
                return [dict(t) for t in cached[2]]
            targets, changes_at = model.ssh_targets(db, now)
            port = int(db.meta("ssh_port"))
            # Attached volumes, for nodes that are machines (a loop file each: `labctl.testbed.node_machine`).
            volumes: dict[str, list[dict]] = {}
            for site in {t["site"] for t in targets}:
                for v in db.find("volume", site):
                    for a in v.get("attachments") or []:
                        volumes.setdefault(a["server_id"], []).append({
                            "id": v["id"], "device": a["device"], "size_gb": v.get("size") or 1,
                            "file": self.state_dir / "volumes" / f"{v['id']}.img"})
        internal = internal_addresses((t["server_id"] for t in targets), "127.11")
        for t in targets:
            t["internal_address"] = internal[t["server_id"]]
            t["port"] = port
            t["node_dir"] = self._node_dir(t["server_id"])
            t["volumes"] = volumes.get(t["server_id"], [])
        self._ssh_cache = (generation, changes_at, targets)
        return [dict(t) for t in targets]

    def _node_dir(self, server_id: str) -> Path:
        """`<state dir>/nodes/<server id>` (memoized: building paths was a fair part of each SSH poll)."""
        path = self._node_dirs.get(server_id)
        if path is None:
            path = self._node_dirs[server_id] = self.state_dir / "nodes" / server_id
        return path

    def ingress_allowed(self, target: dict[str, Any], port: int, peer) -> bool:
        """Whether the site's security groups let `peer` (`labctl.testbed.firewall.Peer`) reach `port` of the
        server `target` (one of `ssh_targets()`): the SSH side asks on every connection."""
        from labctl.testbed.firewall import openstack_allows

        return openstack_allows(self, target, port, peer)
