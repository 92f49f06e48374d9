"""What the emulated worlds (Chameleon's `World`, Compute Engine's `GceWorld`, EC2's `AwsWorld`) share.

Each keeps its state in one SQLite file that every thread and process serving it opens (`SqliteWorld`, their
base class), gives its SSH side a port (`free_port`) and serves each running node on an internal loopback
address of its own (`internal_addresses`).

`SqliteWorld` also holds the one implementation of what the tests steer and read on every cloud: injected
faults (`queue_fault` / `pop_fault`: each world keeps its cloud's own fault kinds and answers them in its API's
own error shapes), latency (`set_latency` / `latency_of`) and the request log (`record_request`,
`logged_requests`). Each world names operations its own way (Chameleon: "POST /servers", Compute Engine:
"instances.insert", EC2: "RunInstances") and scopes them by site or region.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from labctl.writer_locks import writer_lock

REQUEST_LOG_MAX = 100_000  # requests kept in a world's log (older ones are pruned every 1,000)

# The tables of faults, latency and the request log (every world's; `scope` is a site or region, or NULL).
_CONTROLS = {
    "faults": "CREATE TABLE faults (id INTEGER PRIMARY KEY AUTOINCREMENT, scope TEXT, operation TEXT NOT NULL, "
              "kind TEXT NOT NULL, remaining INTEGER NOT NULL, message TEXT)",
    "latency": "CREATE TABLE latency (operation TEXT PRIMARY KEY, seconds REAL NOT NULL)",
    "requests": "CREATE TABLE requests (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, scope TEXT, "
                "method TEXT, path TEXT, query TEXT NOT NULL DEFAULT '', operation TEXT, status INTEGER)",
}
_CONTROL_COLUMNS = {
    "faults": ["id", "scope", "operation", "kind", "remaining", "message"],
    "latency": ["operation", "seconds"],
    "requests": ["seq", "ts", "scope", "method", "path", "query", "operation", "status"],
}


class SqliteWorld:
    """A world kept in one SQLite file shared by threads and processes: a connection per thread, WAL journal,
    short transactions.

    The directory is made 0700 and the file 0600 (see `labctl.testbed.access`). Write transactions hold the
    process's writer lock for the file (see `labctl.writer_locks`); a transaction
    opened inside another one on the same thread joins it.
    """

    def __init__(self, db_path: Path, schema: str) -> None:
        from labctl.testbed.access import private_dir, private_file, private_files

        self.db_path = db_path
        # The world is its owner's alone: the directory 0700, the database (and SQLite's -wal and -shm files,
        # which SQLite creates with the database's mode) 0600 before SQLite opens it.
        private_dir(db_path.parent)
        private_file(db_path)
        private_files(db_path.parent, (db_path.name + "-wal", db_path.name + "-shm"))
        self._local = threading.local()
        self._writer_lock = writer_lock(db_path)  # looked up once: its key is the file's realpath (syscalls)
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        conn = self._conn()
        for attempt in range(100):  # "locked" while another process is creating the file
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if attempt == 99:
                    raise
                time.sleep(0.05)
        with self._transaction("IMMEDIATE") as db:
            for statement in schema.split(";"):
                if statement.strip():
                    db.execute(statement)
            for table, create in _CONTROLS.items():
                columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
                if columns != _CONTROL_COLUMNS[table]:  # absent, or a world made before the tables were shared
                    db.execute(f"DROP TABLE IF EXISTS {table}")
                    db.execute(create)

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use, in autocommit mode: transactions are explicit)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=60000")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            self._local.depth = 0
            self._local.joined = None
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @contextlib.contextmanager
    def _transaction(self, mode: str, wrap: Callable[[sqlite3.Connection], Any] = lambda conn: conn) -> Iterator[Any]:
        """`BEGIN <mode>` (DEFERRED, IMMEDIATE), COMMIT at the end or ROLLBACK on an exception; yields
        `wrap(conn)`. Nested in another transaction of this thread, it yields what the outer one did."""
        conn = self._conn()
        if self._local.depth:
            self._local.depth += 1
            try:
                yield self._local.joined
            finally:
                self._local.depth -= 1
            return
        with self._writer_lock if mode != "DEFERRED" else contextlib.nullcontext():
            for attempt in range(50):
                try:
                    conn.execute(f"BEGIN {mode}")
                    break
                except sqlite3.OperationalError as e:  # "database is locked" beyond busy_timeout, rare
                    if "locked" not in str(e) or attempt == 49:
                        raise
                    time.sleep(0.05)
            self._local.depth = 1
            try:
                self._local.joined = wrapped = wrap(conn)
                yield wrapped
            except BaseException:
                self._local.depth, self._local.joined = 0, None
                conn.execute("ROLLBACK")
                raise
            self._local.depth, self._local.joined = 0, None
            conn.execute("COMMIT")

    def _read_one(self, sql: str, args: tuple = ()) -> list[tuple]:
        """The rows of one SELECT: in the thread's open transaction if there is one, else on its own (a single
        statement is its own consistent snapshot: no BEGIN/COMMIT round trips, which every request paid)."""
        conn = self._conn()
        return conn.execute(sql, args).fetchall()

    # faults ------------------------------------------------------------------------------------------
    def queue_fault(self, scope: str | None, operation: str, kind: str, count: int = 1,
                    message: str | None = None) -> None:
        """Make the next `count` requests of `operation` (a name `pop_fault` is given, or "*") in `scope` (None:
        any) misbehave as `kind` (the world checks its cloud's kinds and answers them in its API's shape)."""
        with self._transaction("IMMEDIATE"):
            self._conn().execute(
                "INSERT INTO faults (scope, operation, kind, remaining, message) VALUES (?,?,?,?,?)",
                (scope, operation, kind, int(count), message))

    def pop_fault(self, scope: str | None, names: Iterable[str], glob: bool = False) -> tuple[str, str | None] | None:
        """Consume the oldest fault for a request in `scope` known by any of `names`, if any: (kind, message).
        A fault's operation matches when it is "*" or one of `names` (with `glob`, an fnmatch pattern of one)."""
        if not self._read_one("SELECT 1 FROM faults WHERE remaining > 0 LIMIT 1"):
            return None
        conn = self._conn()
        names = list(names)
        with self._transaction("IMMEDIATE"):
            rows = conn.execute("SELECT id, scope, operation, kind, message FROM faults WHERE remaining > 0 "
                                "ORDER BY id").fetchall()
            for fid, fault_scope, pattern, kind, message in rows:
                if fault_scope is not None and fault_scope != scope:
                    continue
                if pattern == "*" or pattern in names or (glob and any(fnmatch.fnmatchcase(n, pattern)
                                                                        for n in names)):
                    conn.execute("UPDATE faults SET remaining = remaining - 1 WHERE id = ?", (fid,))
                    return kind, message
        return None

    def pending_faults(self) -> list[dict]:
        """The faults not yet used up, oldest first: scope, operation, kind, remaining, message."""
        with self._transaction("DEFERRED"):
            rows = self._conn().execute("SELECT scope, operation, kind, remaining, message FROM faults "
                                        "WHERE remaining > 0 ORDER BY id").fetchall()
        return [dict(zip(("scope", "operation", "kind", "remaining", "message"), r, strict=True)) for r in rows]

    def clear_faults(self) -> None:
        with self._transaction("IMMEDIATE"):
            self._conn().execute("DELETE FROM faults")

    # latency -------------------------------------------------------------------------------------------
    def set_latency(self, operation: str, seconds: float) -> None:
        """Delay requests of `operation` ("*": every request) by `seconds` × the world's time scale (EC2's world has
        none: seconds as they are); 0 removes it."""
        with self._transaction("IMMEDIATE"):
            if seconds:
                self._conn().execute("INSERT OR REPLACE INTO latency (operation, seconds) VALUES (?, ?)",
                                     (operation, float(seconds)))
            else:
                self._conn().execute("DELETE FROM latency WHERE operation = ?", (operation,))

    def latency_of(self, names: Iterable[str]) -> float:
        """The longest latency set for any of a request's `names` (or "*"), in unscaled seconds."""
        wanted = {*names, "*"}
        rows = self._read_one("SELECT operation, seconds FROM latency")
        return max((s for op, s in rows if op in wanted), default=0.0)

    # request log -----------------------------------------------------------------------------------------
    def record_request(self, scope: str | None, method: str | None, path: str | None, query: str = "",
                       operation: str | None = None) -> int:
        """Log a request (its `seq` is returned, for `set_request_status`); the log keeps the last
        `REQUEST_LOG_MAX` requests."""
        with self._transaction("IMMEDIATE"):
            conn = self._conn()
            cur = conn.execute(
                "INSERT INTO requests (ts, scope, method, path, query, operation) VALUES (?,?,?,?,?,?)",
                (time.time(), scope, method, path, query, operation))
            seq = int(cur.lastrowid)
            if seq % 1000 == 0:
                conn.execute("DELETE FROM requests WHERE seq <= ?", (seq - REQUEST_LOG_MAX,))
        return seq

    def set_request_status(self, seq: int, status: int) -> None:
        with self._transaction("IMMEDIATE"):
            self._conn().execute("UPDATE requests SET status=? WHERE seq=?", (status, seq))

    def logged_requests(self) -> list[dict[str, Any]]:
        """The request log, in order: dicts of ts, scope, method, path, query, operation, status."""
        with self._transaction("DEFERRED"):
            rows = self._conn().execute(
                "SELECT ts, scope, method, path, query, operation, status FROM requests ORDER BY seq").fetchall()
        keys = ("ts", "scope", "method", "path", "query", "operation", "status")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def clear_request_log(self) -> None:
        with self._transaction("IMMEDIATE"):
            self._conn().execute("DELETE FROM requests")

    # connections ------------------------------------------------------------------------------------------
    def release(self) -> None:
        """Close this thread's connection, unless a transaction is open (HTTP handlers call it when their
        connection ends: the servers run a thread per connection)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.depth:
            return
        self._local.conn = None
        with self._conns_lock:
            if conn in self._conns:
                self._conns.remove(conn)
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def close(self) -> None:
        """Close every thread's connection."""
        with self._conns_lock:
            for conn in self._conns:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._conns.clear()
        self._local = threading.local()


def free_port(lo: int = 20000, hi: int = 40000) -> int:
    """A TCP port free on every address now (a world's SSH port, chosen once when the world is created)."""
    for _ in range(200):
        port = random.randint(lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {lo}-{hi}")


def internal_addresses(node_ids: Iterable[str], prefix: str) -> dict[str, str]:
    """Each node's internal loopback address, `<prefix>.x.y`: derived from its id, so it stays while the node
    lives, and unique among `node_ids` (on a clash the id later in sorted order takes the next free one)."""
    taken: set[str] = set()
    out: dict[str, str] = {}
    for node_id in sorted(set(node_ids)):
        n = int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:4], "big")
        while (address := f"{prefix}.{n // 254 % 256}.{n % 254 + 1}") in taken:
            n += 1
        taken.add(address)
        out[node_id] = address
    return out
