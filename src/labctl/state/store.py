"""The state store: deployments, their resources, SSH host keys, setup progress and events.

One code path on two databases: SQLite under the user's state directory (the default; private: 0700
directory, 0600 file) or a shared PostgreSQL database (`--state postgresql://...` or `LABCTL_STATE_URL`),
so that several operators see the same deployments. The SQL below is written once, with `?` placeholders
and portable types; `labctl.state.db` adapts it to the driver. Schema versioned in `meta.schema_version`.

Operators working on the same environment at the same time coordinate with `StateStore.lock(name)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labctl.state.db import POSTGRES_SCHEMES, Database, PostgresDatabase, SqliteDatabase, Tx

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, lab TEXT NOT NULL, owner TEXT NOT NULL, course TEXT,
    site TEXT NOT NULL, status TEXT NOT NULL, profile_path TEXT, data TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS resources (
    deployment_id TEXT NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    status TEXT NOT NULL, cloud_id TEXT, data TEXT NOT NULL DEFAULT '{}', updated_at REAL NOT NULL,
    PRIMARY KEY (deployment_id, key));
CREATE TABLE IF NOT EXISTS host_keys (
    deployment_id TEXT NOT NULL, node TEXT NOT NULL, host TEXT NOT NULL, port INTEGER NOT NULL,
    key TEXT NOT NULL, pinned_at REAL NOT NULL, PRIMARY KEY (deployment_id, node));
CREATE TABLE IF NOT EXISTS setup_steps (
    deployment_id TEXT NOT NULL, node TEXT NOT NULL, step_index INTEGER NOT NULL, step_name TEXT NOT NULL,
    status TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '', updated_at REAL NOT NULL,
    PRIMARY KEY (deployment_id, node, step_index));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, deployment_id TEXT NOT NULL, at REAL NOT NULL,
    level TEXT NOT NULL, message TEXT NOT NULL);
"""

# Schema migrations: _MIGRATIONS[v] is the DDL taking a v database to v+1 (e.g. `ALTER TABLE t ADD COLUMN
# c TEXT`), run in the same serialised transaction that creates the schema. None yet: v1 is current.
_MIGRATIONS: dict[int, str] = {}
# Every table labctl makes (SQLite's own sqlite_sequence comes with AUTOINCREMENT).
LABCTL_TABLES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", _SCHEMA + "".join(_MIGRATIONS.values()))
                          ) | {"sqlite_sequence"}


CLASS_SHARED = "class_shared"  # in a deployment's data: see DeploymentRecord.class_shared


@dataclass
class DeploymentRecord:
    id: str
    name: str
    lab: str
    owner: str
    course: str | None
    site: str
    status: str  # planned | applying | up | failed | destroying | destroyed
    profile_path: str | None
    data: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def class_shared(self) -> bool:
        """Whether it holds what a class's environments at its site share (a student's environment does not)."""
        return bool(self.data.get(CLASS_SHARED))


@dataclass
class ResourceRecord:
    deployment_id: str
    key: str
    kind: str
    name: str
    status: str  # intent | created | ready | failed | deleting | deleted
    cloud_id: str | None
    data: dict[str, Any]
    updated_at: float


def default_state_dir() -> Path:
    if env := os.environ.get("LABCTL_STATE_DIR"):
        return Path(env)
    from platformdirs import user_state_dir

    return Path(user_state_dir("labctl"))


def parse_state_url(url: str | Path | None) -> tuple[str, Any]:
    """("sqlite", Path) or ("postgresql", url) for a --state value / LABCTL_STATE_URL.

    None or "" -> LABCTL_STATE_URL if set, else `<state dir>/state.db`; `sqlite:///abs/path.db` or a plain
    path -> SQLite; `postgresql://...` (or `postgres://`) -> PostgreSQL.
    """
    if isinstance(url, Path):
        return "sqlite", url
    if not url or not url.strip():
        env = os.environ.get("LABCTL_STATE_URL", "").strip()
        if env:
            return parse_state_url(env)
        return "sqlite", default_state_dir() / "state.db"
    url = url.strip()
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in POSTGRES_SCHEMES:
        return "postgresql", url
    if scheme == "sqlite" or url.lower().startswith("sqlite:"):
        rest = url[len("sqlite:"):]
        rest = rest[2:] if rest.startswith("//") else rest
        rest = rest[1:] if rest.startswith("//") else rest  # sqlite:////abs/path (SQLAlchemy style)
        if not rest:
            return "sqlite", default_state_dir() / "state.db"
        return "sqlite", Path(rest).expanduser()
    if scheme:
        from labctl.errors import UserError
        from labctl.state.db import redact_url

        raise UserError(f"unsupported state database {redact_url(url)}: use a path, sqlite:///path or postgresql://")
    return "sqlite", _state_path(url)


# `host=db password=x`, `dbname = labs`: libpq's key=value form, which is not a file name.
_KEY_VALUE = re.compile(r"(^|\s)[A-Za-z_][A-Za-z0-9_]*\s*=")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _state_path(text: str) -> Path:
    """A --state / LABCTL_STATE_URL given as a SQLite file path, or a one-line UserError.

    What is refused never becomes a file: text in libpq's key=value form or with user:password@ (a PostgreSQL
    connection meant as a URL; it would otherwise become a SQLite file named after the password), control
    characters, a directory, a path whose directory does not exist. The refusal never echoes the text, which
    may hold a password.
    """
    from labctl.errors import UserError

    expected = ("expected a SQLite file path (in an existing directory) or a postgresql://user@host/db URL "
                "(password from PGPASSWORD or ~/.pgpass)")
    if _CONTROL.search(text):
        raise UserError(f"the state database (--state / LABCTL_STATE_URL) contains control characters; {expected}")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~name/..." for a user this machine does not have
        raise UserError("the state database (--state / LABCTL_STATE_URL) starts with ~ and a user name this "
                        f"machine does not know (not shown: it may hold a password); {expected}") from None
    if path.is_file():
        return path
    if _KEY_VALUE.search(text) or "=" in path.name or ("@" in text and ":" in text.split("@", 1)[0]):
        raise UserError("the state database (--state / LABCTL_STATE_URL) looks like connection settings, not a "
                        f"file (not shown: it may hold a password); {expected}")
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise UserError(f"the state database {text!r} is a directory; name a file in it, e.g. {path / 'state.db'}")
    if not path.parent.is_dir():
        raise UserError(f"the state database {text!r} is in a directory that does not exist ({path.parent}); "
                        "create it first or use another path")
    return path


def telling_tables(tables: set[str], meta: bool | None) -> set[str]:
    """The tables that show a database is another application's; empty when it is new or labctl's.

    `meta`: labctl's schema version is in its `meta` table (True), `meta` has labctl's columns but no version
    (False: a first open cut short after `meta` was made, as `_SCHEMA` makes it first), or is not labctl's
    (None: no such table, or other columns). labctl's own state may hold a table someone added."""
    if meta is True or not tables:
        return set()
    foreign = tables - LABCTL_TABLES
    if meta is None:
        foreign |= tables & {"meta"} or tables - {"sqlite_sequence"}  # its `events` is not labctl's either
    return foreign


def _foreign_sqlite_tables(path: Path) -> set[str]:
    """`telling_tables` of an existing SQLite file (`--state mlflow.db`), read without writing a byte (labctl's
    own connection would switch the file to WAL). Empty too when it cannot be read this way: the usual open then
    says what is wrong."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except (sqlite3.Error, ValueError):
        return set()
    try:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        meta = None
        if "meta" in tables:
            with contextlib.suppress(sqlite3.Error):  # other columns: not labctl's
                meta = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() is not None
        return telling_tables(tables, meta)
    except sqlite3.Error:
        return set()
    finally:
        conn.close()


def _another_applications(where: object, foreign: set[str]) -> Exception:
    from labctl.errors import UserError

    shown = ", ".join(sorted(foreign)[:4]) + (", ..." if len(foreign) > 4 else "")
    return UserError(f"{where} is not a labctl state database: it holds another application's tables ({shown}); "
                     "name another file or database")


class StateStore:
    """Thread-safe access to one state database (SQLite file or PostgreSQL).

    `StateStore()` and `StateStore.open()` use `LABCTL_STATE_URL` if set, else the SQLite default;
    `StateStore(path)` is that SQLite file. Local artefacts (SSH keys, logs, known_hosts) live in `dir`,
    the database's directory for SQLite and the local state directory for PostgreSQL.
    """

    def __init__(self, path: Path | None = None, *, url: str | None = None) -> None:
        if path is not None and url is not None:
            raise TypeError("give a path or a url, not both")
        backend, target = parse_state_url(Path(path) if path is not None else url)
        self.backend: str = backend
        self.path: Path | None
        self._db: Database
        if backend == "sqlite":
            self.path = target
            self.dir = target.parent
            # labctl's own directory is made private; a directory the user named is left as it is (labctl does
            # not chmod someone's home because `--state ~/state.db`), only the database file is private.
            if not self.dir.exists() or self.dir == default_state_dir():
                self._private_dir(self.dir)
            try:
                if not target.exists():
                    # Create the file private before SQLite writes anything into it.
                    fd = os.open(target, os.O_CREAT | os.O_WRONLY, 0o600)
                    os.close(fd)
                with open(target, "rb") as f:
                    head = f.read(16)
                if head not in (b"", b"SQLite format 3\x00"):
                    from labctl.errors import UserError

                    raise UserError(f"{target} is not a labctl state database (not a SQLite file); name another file")
                if head and (foreign := _foreign_sqlite_tables(target)):  # before labctl's connection writes WAL
                    raise _another_applications(target, foreign)
            except OSError as exc:
                from labctl.errors import UserError

                raise UserError(f"cannot open the state database {target}: {exc.strerror or exc}") from None
            self._db = SqliteDatabase(target)
        else:
            self.path = None
            self.dir = default_state_dir()
            self._db = PostgresDatabase(target)
            self._private_dir(self.dir)
        try:
            self._init_schema()
            if self.path is not None:
                os.chmod(self.path, 0o600)  # only once it is known to be labctl's (or new)
        except OSError as exc:
            self._db.close()
            from labctl.errors import UserError

            raise UserError(f"cannot open the state database {self.path}: {exc.strerror or exc}") from None
        except sqlite3.OperationalError as exc:
            self._db.close()
            from labctl.errors import CloudError, UserError

            if "locked" in str(exc):  # a busy database is not a bad file: say what it is, retryable
                raise CloudError(f"the state database {self.path} stayed locked by another process; "
                                 "run the command again") from None
            raise UserError(f"{self.path} is not a labctl state database ({exc})") from None
        except sqlite3.DatabaseError as exc:
            self._db.close()
            from labctl.errors import UserError

            raise UserError(f"{self.path} is not a labctl state database ({exc})") from None
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open(cls, url: str | None = None) -> StateStore:
        """The store at `url` (a path, sqlite:///path or postgresql://...); None: LABCTL_STATE_URL or default."""
        return cls(url=url)

    @property
    def url(self) -> str:
        """Where the state lives, safe to print (a PostgreSQL URL's password is removed)."""
        return self._db.url

    def __repr__(self) -> str:
        return f"StateStore({self.url!r})"

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _private_dir(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)

    def _init_schema(self) -> None:
        if self._db.has_table("meta") and self._query(
            "SELECT value FROM meta WHERE key='schema_version'"
        ) == [(str(SCHEMA_VERSION),)]:
            return  # the usual case: nothing to create or migrate
        self._refuse_another_applications_database()
        with self._tx(serialize="labctl-schema") as db:  # concurrent first opens must not race on DDL
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                return
            version = int(row[0])
            if version > SCHEMA_VERSION:
                from labctl.errors import UserError

                raise UserError(
                    f"{self.path or self.url}: state schema v{version} is newer than this labctl "
                    f"(v{SCHEMA_VERSION}); upgrade labctl"
                )
            while version < SCHEMA_VERSION:
                db.executescript(_MIGRATIONS[version])
                version += 1
                db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))

    def _refuse_another_applications_database(self) -> None:
        """A database that is someone else's (`telling_tables`: a course's shared PostgreSQL database; a SQLite
        file is checked before it is opened for writing) is refused: labctl would add its tables to it, or take
        a table of the same name (`events`) for its own."""
        tables = self._db.tables()
        meta = None
        if "meta" in tables:
            try:
                meta = bool(self._query("SELECT value FROM meta WHERE key='schema_version'"))
            except Exception:  # noqa: BLE001 - another application's `meta` (other columns): not labctl's
                meta = None
        if foreign := telling_tables(tables, meta):
            raise _another_applications(self.path or self.url, foreign)

    # -- plumbing ---------------------------------------------------------------------------------
    @contextmanager
    def _tx(self, serialize: str | None = None) -> Iterator[Tx]:
        with self._db.tx(serialize) as tx:
            yield tx

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._db.query(sql, args)

    # -- locks between operators --------------------------------------------------------------------
    def lock(self, name: str, *, wait: bool = False, timeout: float | None = None) -> AbstractContextManager[bool]:
        """`with store.lock("env:<name>") as held:` -- True if this process now holds the lock `name`.

        Every process using the same store (on any host, for PostgreSQL) sees the same lock. Without
        `wait`, False at once when another process holds it; with `wait`, blocks until it is free, or until
        `timeout` seconds have passed (then False). The lock is released when the block ends, and by the
        OS / the database server if the holder dies. Re-entrant within one thread.
        """
        return self._db.lock(name, wait=wait, timeout=timeout)

    def lock_holder(self, name: str) -> str | None:
        """Who holds the lock `name` ("labctl <host> pid <pid>"), or None: for messages to the operator."""
        return self._db.lock_holder(name)

    @property
    def logs_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def keys_dir(self) -> Path:
        return self.dir / "keys"

    # -- deployments ------------------------------------------------------------------------------
    def save_deployment(self, dep: DeploymentRecord) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                """INSERT INTO deployments VALUES (?,?,?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(id) DO UPDATE SET site=excluded.site, status=excluded.status,
                   profile_path=excluded.profile_path, data=excluded.data, updated_at=excluded.updated_at""",
                (dep.id, dep.name, dep.lab, dep.owner, dep.course, dep.site, dep.status, dep.profile_path,
                 json.dumps(dep.data), dep.created_at or now, now),
            )

    def set_deployment_status(self, dep_id: str, status: str, **data: Any) -> None:
        with self._tx() as db:
            row = db.execute("SELECT data FROM deployments WHERE id=? FOR UPDATE", (dep_id,)).fetchone()
            merged = {**json.loads(row[0]), **data} if row else data
            db.execute(
                "UPDATE deployments SET status=?, data=?, updated_at=? WHERE id=?",
                (status, json.dumps(merged), time.time(), dep_id),
            )

    def get_deployment(self, dep_id: str) -> DeploymentRecord | None:
        rows = self._query("SELECT * FROM deployments WHERE id=?", (dep_id,))
        return _deployment(rows[0]) if rows else None

    def deployments(self, owner: str | None = None, include_destroyed: bool = False) -> list[DeploymentRecord]:
        sql, args = "SELECT * FROM deployments", []
        clauses = []
        if owner:
            clauses.append("owner=?")
            args.append(owner)
        if not include_destroyed:
            clauses.append("status<>'destroyed'")
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        return [_deployment(r) for r in self._query(sql + " ORDER BY created_at", tuple(args))]

    def find_deployments(self, name: str, owner: str | None = None) -> list[DeploymentRecord]:
        return [d for d in self.deployments(owner) if name in (d.name, d.id, d.lab)]

    def forget_deployment(self, dep_id: str) -> None:
        with self._tx() as db:
            for table in ("resources", "host_keys", "setup_steps"):
                db.execute(f"DELETE FROM {table} WHERE deployment_id=?", (dep_id,))
            db.execute("UPDATE deployments SET status='destroyed', updated_at=? WHERE id=?", (time.time(), dep_id))

    # -- resources --------------------------------------------------------------------------------
    def record_intent(self, dep_id: str, key: str, kind: str, name: str, data: dict | None = None) -> None:
        """Written before the create call: a crash after it is recovered by looking the name up."""
        with self._tx() as db:
            row = db.execute(
                "SELECT status, data FROM resources WHERE deployment_id=? AND key=? FOR UPDATE", (dep_id, key)
            ).fetchone()
            if row and row[0] in ("created", "ready"):
                return
            merged = {**(json.loads(row[1]) if row else {}), **(data or {})}
            db.execute(
                """INSERT INTO resources VALUES (?,?,?,?,'intent',NULL,?,?)
                   ON CONFLICT(deployment_id, key) DO UPDATE SET status='intent', name=excluded.name,
                   data=excluded.data, updated_at=excluded.updated_at""",
                (dep_id, key, kind, name, json.dumps(merged), time.time()),
            )

    def record_resource(
        self, dep_id: str, key: str, status: str, cloud_id: str | None = None, data: dict | None = None,
        kind: str | None = None, name: str | None = None,
    ) -> None:
        select = "SELECT cloud_id, data FROM resources WHERE deployment_id=? AND key=? FOR UPDATE"
        with self._tx() as db:
            row = db.execute(select, (dep_id, key)).fetchone()
            now = time.time()
            if row is None:
                inserted = db.execute(
                    "INSERT INTO resources VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(deployment_id, key) DO NOTHING",
                    (dep_id, key, kind or key.split(":")[0], name or key, status, cloud_id,
                     json.dumps(data or {}), now),
                ).rowcount
                if inserted:
                    return
                row = db.execute(select, (dep_id, key)).fetchone()  # another writer inserted it meanwhile
            merged = {**json.loads(row[1]), **(data or {})}
            db.execute(
                "UPDATE resources SET status=?, cloud_id=?, data=?, updated_at=? WHERE deployment_id=? AND key=?",
                (status, cloud_id if cloud_id is not None else row[0], json.dumps(merged), now, dep_id, key),
            )

    def delete_resource(self, dep_id: str, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM resources WHERE deployment_id=? AND key=?", (dep_id, key))

    def resources(self, dep_id: str) -> list[ResourceRecord]:
        rows = self._query("SELECT * FROM resources WHERE deployment_id=? ORDER BY key", (dep_id,))
        return [ResourceRecord(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7]) for r in rows]

    def resource(self, dep_id: str, key: str) -> ResourceRecord | None:
        return next((r for r in self.resources(dep_id) if r.key == key), None)

    # -- SSH host keys (the runner's HostKeyStore, per deployment) ----------------------------------
    def get_host_key(self, dep_id: str, node: str) -> str | None:
        rows = self._query("SELECT key FROM host_keys WHERE deployment_id=? AND node=?", (dep_id, node))
        return rows[0][0] if rows else None

    def pin_host_key(self, dep_id: str, node: str, host: str, port: int, key: str) -> None:
        with self._tx() as db:
            db.execute(
                """INSERT INTO host_keys VALUES (?,?,?,?,?,?) ON CONFLICT(deployment_id, node)
                   DO UPDATE SET host=excluded.host, port=excluded.port, key=excluded.key,
                   pinned_at=excluded.pinned_at""",
                (dep_id, node, host, port, key, time.time()),
            )

    def host_key_record(self, dep_id: str, node: str) -> tuple[str, int, str] | None:
        """(host, port, key) pinned for a node, or None."""
        rows = self._query("SELECT host, port, key FROM host_keys WHERE deployment_id=? AND node=?", (dep_id, node))
        return (rows[0][0], int(rows[0][1]), rows[0][2]) if rows else None

    def forget_host_key(self, dep_id: str, node: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM host_keys WHERE deployment_id=? AND node=?", (dep_id, node))

    # -- setup progress (the runner's ProgressStore, per deployment) --------------------------------
    def steps(self, dep_id: str, node: str | None = None) -> list[tuple[str, int, str, str, str]]:
        sql = "SELECT node, step_index, step_name, status, detail FROM setup_steps WHERE deployment_id=?"
        args: tuple = (dep_id,)
        if node:
            sql += " AND node=?"
            args += (node,)
        return self._query(sql + " ORDER BY node, step_index", args)

    def mark_step(self, dep_id: str, node: str, index: int, name: str, status: str, detail: str = "") -> None:
        with self._tx() as db:
            db.execute(
                """INSERT INTO setup_steps VALUES (?,?,?,?,?,?,?) ON CONFLICT(deployment_id, node, step_index)
                   DO UPDATE SET step_name=excluded.step_name, status=excluded.status,
                   detail=excluded.detail, updated_at=excluded.updated_at""",
                (dep_id, node, index, name, status, detail, time.time()),
            )

    def reset_steps(self, dep_id: str, node: str | None = None) -> None:
        with self._tx() as db:
            if node:
                db.execute("DELETE FROM setup_steps WHERE deployment_id=? AND node=?", (dep_id, node))
            else:
                db.execute("DELETE FROM setup_steps WHERE deployment_id=?", (dep_id,))

    # -- events -----------------------------------------------------------------------------------
    def event(self, dep_id: str, message: str, level: str = "info") -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO events (deployment_id, at, level, message) VALUES (?,?,?,?)",
                (dep_id, time.time(), level, message),
            )

    def events(self, dep_id: str) -> list[tuple[float, str, str]]:
        return self._query(
            "SELECT at, level, message FROM events WHERE deployment_id=? ORDER BY id", (dep_id,)
        )


def _deployment(row: tuple) -> DeploymentRecord:
    return DeploymentRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                            json.loads(row[8]), row[9], row[10])


class DeploymentView:
    """The per-deployment view the SSH runner needs (HostKeyStore + ProgressStore)."""

    def __init__(self, store: StateStore, dep_id: str) -> None:
        self.store, self.dep_id = store, dep_id

    def get_host_key(self, node: str) -> str | None:
        return self.store.get_host_key(self.dep_id, node)

    def pin_host_key(self, node: str, host: str, port: int, key: str) -> None:
        self.store.pin_host_key(self.dep_id, node, host, port, key)
        self.store.event(self.dep_id, f"{node}: pinned SSH host key of {host}:{port}")

    def steps_done(self, node: str) -> set[int]:
        return {r[1] for r in self.store.steps(self.dep_id, node) if r[3] == "done"}

    def mark_step(self, node: str, index: int, name: str, status: str, detail: str = "") -> None:
        self.store.mark_step(self.dep_id, node, index, name, status, detail)
