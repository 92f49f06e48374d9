"""PostgreSQL-only behaviour of the state store, against the real server of the `pg_server` fixture."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from tests.state.helpers import free_port, worker_env

if TYPE_CHECKING:
    from tests.state.conftest import PgServer

from labctl.errors import UserError
from labctl.state import StateStore
from labctl.state.db import PostgresDatabase, lock_key, redact_url


@pytest.fixture
def pg_url(pg_server: PgServer, state_env) -> str:
    return pg_server.new_database()


def test_connection_failure_is_one_line_user_error_without_password(state_env):
    port = free_port()  # nothing listens there
    url = f"postgresql://labctl:hunter2@127.0.0.1:{port}/labs"
    with pytest.raises(UserError) as info:
        StateStore.open(url)
    message = str(info.value)
    assert message.startswith(f"cannot connect to the state database postgresql://labctl@127.0.0.1:{port}/labs: ")
    assert "hunter2" not in message and "\n" not in message
    assert "refused" in message.lower()
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_database_is_a_user_error(pg_server: PgServer, state_env):
    url = pg_server.url("no_such_db", password="pw%40secret")
    with pytest.raises(UserError, match=r"cannot connect to the state database postgresql://labctl@127\.0\.0\.1:\d+/"
                       r"no_such_db: .*no_such_db.* does not exist") as info:
        StateStore.open(url)
    assert "secret" not in str(info.value)


def test_password_in_query_string_is_redacted(pg_server: PgServer, state_env):
    url = f"postgresql://127.0.0.1:{pg_server.port}/no_such_db?user=labctl&password=topsecret"
    with pytest.raises(UserError) as info:
        StateStore.open(url)
    assert "topsecret" not in str(info.value) and "password=***" in str(info.value)
    assert redact_url(url).endswith("password=***")


def test_env_url_selects_postgresql_and_local_files_stay_local(pg_url, state_env, monkeypatch):
    monkeypatch.setenv("LABCTL_STATE_URL", pg_url)
    with StateStore() as s:
        assert (s.backend, s.path, s.url) == ("postgresql", None, pg_url)
        assert s.dir == state_env and s.keys_dir == state_env / "keys" and s.logs_dir == state_env / "logs"
        assert state_env.is_dir()
        s.event("d1", "hello")
    with StateStore.open(pg_url) as s:
        assert [m for _, _, m in s.events("d1")] == ["hello"]


def test_ddl_is_converted_to_portable_postgres_types(pg_url):
    with StateStore.open(pg_url) as s:
        cols = dict((f"{t}.{c}", (dt, ident, coll)) for t, c, dt, ident, coll in s._query(
            "SELECT table_name, column_name, data_type, is_identity, collation_name FROM information_schema.columns"
            " WHERE table_schema = current_schema()"))
    assert cols["deployments.created_at"][0] == "double precision"
    assert cols["events.id"][:2] == ("bigint", "YES")
    assert cols["resources.key"][2] == "C"
    assert cols["host_keys.port"][0] == "integer"


def test_concurrent_first_opens_create_the_schema_once(pg_url):
    code = ("import sys; from labctl.state import StateStore; s = StateStore.open(sys.argv[1]); "
            "s.event('d', 'hi'); s.close()")
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url], env=worker_env(), stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    with StateStore.open(pg_url) as s:
        assert len(s.events("d")) == 4
        assert s._query("SELECT count(*) FROM meta") == [(1,)]


def test_lock_is_a_session_advisory_lock(pg_url):
    assert lock_key("env:labctl-ml-alice-lab3") == lock_key("env:labctl-ml-alice-lab3")
    assert lock_key("env:labctl-ml-alice-lab3") == -6802547496592018587  # stable across versions and hosts
    assert lock_key("a") != lock_key("b") and -(2**63) <= lock_key("x") < 2**63
    with StateStore.open(pg_url) as s:
        key = lock_key("env:x") & 0xFFFFFFFFFFFFFFFF
        query = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
                 " AND classid::bigint = ? AND objid::bigint = ?")
        with s.lock("env:x") as held:
            assert held
            assert s._query(query, (key >> 32, key & 0xFFFFFFFF)) == [(1,)]
            assert s.lock_holder("env:x").startswith("labctl ")
        assert s._query(query, (key >> 32, key & 0xFFFFFFFF)) == [(0,)]
        assert s.lock_holder("env:x") is None


def test_store_survives_the_server_dropping_its_connections(pg_url):
    with StateStore.open(pg_url) as s, StateStore.open(pg_url) as admin:
        s.event("d1", "before")
        with s.lock("env:y"):
            pass  # leaves an idle lock session in the pool
        admin._query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                     " AND pid <> pg_backend_pid()")
        s.event("d1", "after")  # the dead pooled connection is replaced
        assert [m for _, _, m in s.events("d1")] == ["before", "after"]
        with s.lock("env:y") as held:
            assert held


def test_missing_psycopg_is_explained(monkeypatch, state_env):
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(UserError, match=r"needs psycopg: pip install 'psycopg\[binary\]'"):
        PostgresDatabase("postgresql://u:pw@h/db")


def test_a_database_of_another_application_is_refused_and_left_alone(pg_url):
    """A course's shared PostgreSQL database that another application uses (with its own `events` table): labctl
    would have made its tables there and written its events into theirs."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE events (id serial PRIMARY KEY, what text)")
        conn.execute("INSERT INTO events (what) VALUES ('theirs')")
    with pytest.raises(UserError, match=r"is not a labctl state database: it holds another application's tables "
                                         r"\(events\); name another file or database"):
        StateStore.open(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
        assert tables == {"events"}
        assert conn.execute("SELECT what FROM events").fetchall() == [("theirs",)]
