"""The state store's behaviour, the same on SQLite and on a real PostgreSQL server (fixture `store`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.state.helpers import expect_line, read_line, worker

from labctl.errors import UserError
from labctl.state import DeploymentRecord, DeploymentView, StateStore
from labctl.state import store as store_mod
from labctl.state.db import redact_url
from labctl.state.store import SCHEMA_VERSION, parse_state_url


def dep(dep_id: str = "labctl-alice-lab3", **kw) -> DeploymentRecord:
    fields = dict(name=dep_id, lab="lab3", owner="alice", course="ml", site="chi@tacc", status="applying",
                  profile_path="/p/lab3.yaml")
    fields.update(kw)
    return DeploymentRecord(dep_id, **fields)


# -- deployments ---------------------------------------------------------------------------------------
def test_deployments_roundtrip_and_filters(store):
    store.save_deployment(dep("d1", owner="alice", data={"k": [1, 2]}))
    time.sleep(0.01)
    store.save_deployment(dep("d2", owner="bob", lab="lab4"))
    d1 = store.get_deployment("d1")
    assert (d1.id, d1.owner, d1.course, d1.site, d1.status, d1.data) == ("d1", "alice", "ml", "chi@tacc",
                                                                         "applying", {"k": [1, 2]})
    assert isinstance(d1.created_at, float) and d1.created_at > 0 and d1.updated_at >= d1.created_at
    assert store.get_deployment("nope") is None
    assert [d.id for d in store.deployments()] == ["d1", "d2"]
    assert [d.id for d in store.deployments(owner="bob")] == ["d2"]
    assert [d.id for d in store.find_deployments("lab4")] == ["d2"]
    assert [d.id for d in store.find_deployments("d1", owner="bob")] == []


def test_save_again_keeps_created_at_and_updates_status(store):
    store.save_deployment(dep("d1"))
    first = store.get_deployment("d1")
    store.save_deployment(dep("d1", status="up", site="chi@uc", data={"x": 1}))
    again = store.get_deployment("d1")
    assert (again.status, again.site, again.data, again.created_at) == ("up", "chi@uc", {"x": 1},
                                                                        first.created_at)


def test_set_status_merges_data(store):
    store.save_deployment(dep("d1", data={"a": 1}))
    store.set_deployment_status("d1", "setup", lease_end="2030-01-01T00:00:00")
    store.set_deployment_status("d1", "up", b=2)
    d1 = store.get_deployment("d1")
    assert d1.status == "up" and d1.data == {"a": 1, "lease_end": "2030-01-01T00:00:00", "b": 2}
    store.set_deployment_status("missing", "up")  # no row: nothing happens
    assert store.get_deployment("missing") is None


def test_concurrent_status_updates_lose_nothing(store):
    """Read-modify-write of the data column under many threads (FOR UPDATE on PostgreSQL)."""
    store.save_deployment(dep("d1"))

    def writer(t: int) -> None:
        for i in range(10):
            store.set_deployment_status("d1", "up", **{f"t{t}-{i}": i})

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.get_deployment("d1").data) == 40


def test_concurrent_first_records_of_one_resource_merge(store):
    """Threads racing to record a resource that does not exist yet: one inserts, the others merge."""
    for round_ in range(5):
        barrier = threading.Barrier(4)

        def writer(t: int, key: str = f"server:r{round_}", barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            store.record_resource("d1", key, "created", data={f"t{t}": t})

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.resource("d1", f"server:r{round_}").data == {f"t{t}": t for t in range(4)}


def test_forget_marks_destroyed_and_drops_children(store):
    store.save_deployment(dep("d1"))
    store.record_intent("d1", "server:n-1", "server", "labctl-alice-lab3-n-1")
    store.pin_host_key("d1", "n-1", "10.0.0.1", 22, "ssh-ed25519 AAAA")
    store.mark_step("d1", "n-1", 0, "hello", "done")
    store.event("d1", "hello")
    store.forget_deployment("d1")
    assert store.get_deployment("d1").status == "destroyed"
    assert store.deployments() == [] and [d.id for d in store.deployments(include_destroyed=True)] == ["d1"]
    assert store.resources("d1") == [] and store.get_host_key("d1", "n-1") is None and store.steps("d1") == []
    assert [m for _, _, m in store.events("d1")] == ["hello"]  # the history stays


# -- resources: intent -> created -> ready, deleting --------------------------------------------------
def test_resource_lifecycle(store):
    store.record_intent("d1", "server:n-1", "server", "labctl-a-n-1", {"node_type": "big"})
    r = store.resource("d1", "server:n-1")
    assert (r.status, r.kind, r.name, r.cloud_id, r.data) == ("intent", "server", "labctl-a-n-1", None,
                                                              {"node_type": "big"})
    store.record_resource("d1", "server:n-1", "created", "uuid-1", {"ip": "10.0.0.5"})
    store.record_resource("d1", "server:n-1", "ready")
    r = store.resource("d1", "server:n-1")
    assert (r.status, r.cloud_id, r.data) == ("ready", "uuid-1", {"node_type": "big", "ip": "10.0.0.5"})
    assert isinstance(r.updated_at, float)
    # a created/ready resource is not reset to intent by a rerun
    store.record_intent("d1", "server:n-1", "server", "labctl-a-n-1", {"node_type": "small"})
    assert store.resource("d1", "server:n-1").status == "ready"
    store.record_resource("d1", "server:n-1", "deleting")
    assert store.resource("d1", "server:n-1").status == "deleting"
    store.delete_resource("d1", "server:n-1")
    assert store.resource("d1", "server:n-1") is None and store.resources("d1") == []


def test_intent_after_failure_resets_and_merges(store):
    store.record_intent("d1", "reservation:n", "reservation", "lease", {"node_type": "a"})
    store.record_resource("d1", "reservation:n", "failed", data={"error": "no hosts"})
    store.record_intent("d1", "reservation:n", "reservation", "lease", {"node_type": "b"})
    r = store.resource("d1", "reservation:n")
    assert (r.status, r.data) == ("intent", {"node_type": "b", "error": "no hosts"})


def test_record_resource_without_intent_and_ordering(store):
    store.record_resource("d1", "server:n-10", "ready", "id10")
    store.record_resource("d1", "keypair:k", "created", "kp", kind="keypair", name="labctl-k")
    store.record_resource("d1", "Server:N-2", "ready", "id2")
    store.record_resource("d1", "server:n-1", "ready", "id1")
    keys = [r.key for r in store.resources("d1")]
    assert keys == sorted(keys)  # bytewise, the same on both backends
    assert keys == ["Server:N-2", "keypair:k", "server:n-1", "server:n-10"]
    r = store.resource("d1", "server:n-10")
    assert (r.kind, r.name) == ("server", "server:n-10")
    assert (store.resource("d1", "keypair:k").kind, store.resource("d1", "keypair:k").name) == ("keypair",
                                                                                                "labctl-k")


def test_text_survives_quotes_percent_question_marks_and_nul(store):
    message = "it's 100% done? \"yes\" -- ; DROP TABLE x; ?"
    store.event("d1", message)
    store.mark_step("d1", "n-1", 0, "s", "failed", "bin\x00ary")
    assert store.events("d1")[0][2] == message
    assert store.steps("d1")[0][4] in ("bin\x00ary", "bin\ufffdary")


# -- host keys, steps, events ------------------------------------------------------------------------
def test_host_keys(store):
    assert store.get_host_key("d1", "n-1") is None
    store.pin_host_key("d1", "n-1", "127.10.0.1", 2222, "ssh-ed25519 AAA1")
    store.pin_host_key("d1", "n-1", "127.10.0.2", 22, "ssh-ed25519 AAA2")
    assert store.get_host_key("d1", "n-1") == "ssh-ed25519 AAA2"
    assert store.get_host_key("d2", "n-1") is None
    store.forget_host_key("d1", "n-1")
    assert store.get_host_key("d1", "n-1") is None


def test_steps_and_view(store):
    view = DeploymentView(store, "d1")
    view.mark_step("n-1", 0, "first", "done")
    view.mark_step("n-1", 1, "second", "running")
    view.mark_step("n-2", 0, "first", "done")
    view.mark_step("n-1", 1, "second", "failed", "exit 1")
    assert store.steps("d1") == [("n-1", 0, "first", "done", ""), ("n-1", 1, "second", "failed", "exit 1"),
                                 ("n-2", 0, "first", "done", "")]
    assert view.steps_done("n-1") == {0}
    store.reset_steps("d1", "n-1")
    assert [s[0] for s in store.steps("d1")] == ["n-2"]
    store.reset_steps("d1")
    assert store.steps("d1") == []
    view.pin_host_key("n-1", "h", 22, "ssh-ed25519 K")
    assert view.get_host_key("n-1") == "ssh-ed25519 K"
    assert "pinned SSH host key" in store.events("d1")[-1][2]


def test_events_in_order(store):
    for i in range(5):
        store.event("d1", f"m{i}", "warning" if i % 2 else "info")
    store.event("d2", "other")
    events = store.events("d1")
    assert [m for _, _, m in events] == [f"m{i}" for i in range(5)]
    assert [lvl for _, lvl, _ in events] == ["info", "warning", "info", "warning", "info"]
    assert all(isinstance(at, float) for at, _, _ in events)


def test_threads_share_one_store(store):
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(15):
                store.record_intent("d1", f"server:t{t}-{i}", "server", f"n{t}-{i}")
                store.record_resource("d1", f"server:t{t}-{i}", "ready", f"id{t}-{i}")
                store.event("d1", f"t{t}-{i}")
                assert store.resource("d1", f"server:t{t}-{i}").status == "ready"
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.resources("d1")) == 120 and len(store.events("d1")) == 120


# -- schema ------------------------------------------------------------------------------------------
def test_schema_version_recorded_and_reopen_keeps_data(store, state_url):
    assert store._query("SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    store.save_deployment(dep("d1"))
    with StateStore.open(state_url) as again:
        assert again.get_deployment("d1").id == "d1"
        assert again._query("SELECT count(*) FROM meta") == [(1,)]


def test_newer_schema_is_refused(store, state_url):
    with store._tx() as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(UserError, match="schema v99 is newer"):
        StateStore.open(state_url)


def test_migration_from_older_version_runs(store, state_url, monkeypatch):
    """The migration path: a v1 database opened by a labctl whose schema is v2."""
    from labctl.state import store as store_module

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(store_module, "_MIGRATIONS", {1: "ALTER TABLE deployments ADD COLUMN note TEXT"})
    with StateStore.open(state_url) as again:
        assert again._query("SELECT value FROM meta WHERE key='schema_version'") == [("2",)]
        again._query("SELECT note FROM deployments")


# -- where the state lives ---------------------------------------------------------------------------
def test_local_dirs(store, state_env):
    assert store.dir == state_env
    assert store.logs_dir == state_env / "logs" and store.keys_dir == state_env / "keys"
    assert stat.S_IMODE(os.stat(state_env).st_mode) == 0o700


def test_sqlite_file_and_dir_are_private(tmp_path):
    path = tmp_path / "deep" / "state.db"
    with StateStore(path) as s:
        s.event("d1", "x")
        assert s.path == path and s.dir == path.parent and s.backend == "sqlite"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        with s.lock("env:x"):
            pass
        locks = path.parent / "state.db.locks"
        assert stat.S_IMODE(os.stat(locks).st_mode) == 0o700
        assert all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in locks.iterdir())


def test_open_resolves_urls_and_env(tmp_path, state_env, monkeypatch):
    assert parse_state_url(None) == ("sqlite", state_env / "state.db")
    assert parse_state_url(f"sqlite://{tmp_path}/a.db") == ("sqlite", tmp_path / "a.db")
    assert parse_state_url(f"sqlite:///{tmp_path}/a.db") == ("sqlite", tmp_path / "a.db")  # sqlite:////abs
    assert parse_state_url(str(tmp_path / "b.db")) == ("sqlite", tmp_path / "b.db")
    assert parse_state_url("postgresql://u@h/db") == ("postgresql", "postgresql://u@h/db")
    assert parse_state_url("postgres://u@h/db") == ("postgresql", "postgres://u@h/db")
    with pytest.raises(UserError, match=r"unsupported state database mysql://u@h/db"):
        parse_state_url("mysql://u:secret@h/db")
    monkeypatch.setenv("LABCTL_STATE_URL", f"sqlite://{tmp_path}/env.db")
    with StateStore.open() as s, StateStore() as t:
        assert s.path == t.path == tmp_path / "env.db"
    with StateStore(tmp_path / "explicit.db") as s:  # an explicit path wins over the environment
        assert s.path == tmp_path / "explicit.db"


def test_redact_url():
    assert redact_url("postgresql://alice:s3cr%40t@db.example:5432/labs") == "postgresql://alice@db.example:5432/labs"
    assert redact_url("postgresql://db/labs?user=a&password=hunter2&sslmode=require") == (
        "postgresql://db/labs?user=a&password=***&sslmode=require")
    assert redact_url("postgresql://alice@db/labs") == "postgresql://alice@db/labs"


def test_repr_and_url_never_show_a_password(store, state_url):
    assert repr(store) == f"StateStore({store.url!r})"
    if store.backend == "postgresql":
        assert store.url == state_url
        with StateStore.open(state_url.replace("labctl@", "labctl:s3cret@")) as with_password:
            assert with_password.url == state_url and "s3cret" not in repr(with_password)


# -- locks: in one process ---------------------------------------------------------------------------
def test_lock_basics_in_one_process(store):
    with store.lock("env:a") as held:
        assert held is True
        assert "pid" in (store.lock_holder("env:a") or "")
        with store.lock("env:a") as again:  # re-entrant in the same thread
            assert again is True
        with store.lock("env:b") as other:
            assert other is True
        result: list[bool] = []

        def other_thread() -> None:  # another thread is another holder
            with store.lock("env:a") as h:
                result.append(h)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert result == [False]
    assert store.lock_holder("env:a") is None
    with store.lock("env:a") as held:
        assert held is True


def test_lock_wait_timeout_and_handover_between_threads(store):
    taken, release = threading.Event(), threading.Event()

    def holder() -> None:
        with store.lock("env:w") as h:
            assert h
            taken.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert taken.wait(10)
    start = time.monotonic()
    with store.lock("env:w", wait=True, timeout=0.3) as held:
        assert held is False
    assert 0.25 <= time.monotonic() - start < 5
    threading.Timer(0.2, release.set).start()
    with store.lock("env:w", wait=True, timeout=10) as held:
        assert held is True
    t.join()


def test_lock_name_must_be_text(store):
    with pytest.raises(ValueError), store.lock(""):
        pass


# -- locks: two real processes -----------------------------------------------------------------------
N_ENVS = 30


def _run_operators(url: str, mode: str, *flags: str) -> list[dict]:
    """Two worker processes doing `mode` on the same N_ENVS environments, started together."""
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(worker(url, mode, str(N_ENVS), *flags)) for _ in range(2)]
        for p in procs:
            expect_line(p, "ready")
        for p in procs:  # both go at (nearly) the same instant
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(read_line(p, 120)) for p in procs]
        for p in procs:
            assert p.wait(30) == 0, p.stderr.read()
        return results


def _counts(store: StateStore, verb: str) -> Counter:
    return Counter({f"env-{i:03d}": sum(m.startswith(f"{verb} by ") for _, _, m in store.events(f"env-{i:03d}"))
                    for i in range(N_ENVS)})


@pytest.mark.parametrize("wait", [False, True], ids=["try", "wait"])
def test_two_processes_never_both_create_or_both_delete(store, state_url, wait):
    flags = ["--wait"] if wait else []
    up = _run_operators(state_url, "up", *flags)
    created = _counts(store, "created")
    assert set(created.values()) == {1}, f"created more than once: {[n for n, c in created.items() if c != 1]}"
    assert sorted(up[0]["done"] + up[1]["done"]) == sorted(created)
    if wait:  # the follower waited for each name in turn, then found it created
        assert up[0]["skipped"] == up[1]["skipped"] == []
    else:  # the two leapfrog: each takes the names the other holds at that moment
        assert up[0]["done"] and up[1]["done"], "both operators should have done part of the work"
    down = _run_operators(state_url, "down", *flags)
    deleted = _counts(store, "deleted")
    assert set(deleted.values()) == {1}, f"deleted more than once: {[n for n, c in deleted.items() if c != 1]}"
    assert sorted(down[0]["done"] + down[1]["done"]) == sorted(deleted)
    assert all(d.status == "destroyed" for d in store.deployments(include_destroyed=True))


def test_without_the_lock_two_processes_do_race(store, state_url):
    """The control: the same workers without the lock create some environments twice."""
    _run_operators(state_url, "up", "--no-lock")
    created = _counts(store, "created")
    assert max(created.values()) == 2, "the race window was not hit: the lock tests would prove nothing"


def test_lock_held_by_another_process_then_released(store, state_url):
    with worker(state_url, "hold", "env:shared") as holder:
        expect_line(holder, "held")
        with store.lock("env:shared") as held:
            assert held is False
        assert f"pid {holder.pid}" in (store.lock_holder("env:shared") or "")
        start = time.monotonic()
        with store.lock("env:shared", wait=True, timeout=0.3) as held:
            assert held is False
        assert time.monotonic() - start >= 0.25
        threading.Timer(0.3, lambda: (holder.stdin.write("release\n"), holder.stdin.flush())).start()
        with store.lock("env:shared", wait=True, timeout=20) as held:
            assert held is True
        expect_line(holder, "released")
        assert holder.wait(20) == 0


def test_lock_of_a_killed_holder_is_released(store, state_url):
    with worker(state_url, "hold", "env:crash") as holder:
        expect_line(holder, "held")
        with store.lock("env:crash") as held:
            assert held is False
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(20)
    start = time.monotonic()
    with store.lock("env:crash", wait=True, timeout=20) as held:
        assert held is True, "the lock of a SIGKILLed holder was not released"
    assert time.monotonic() - start < 10
    with worker(state_url, "hold", "env:crash") as other:  # and another process can take it after us
        expect_line(other, "held")
        other.stdin.write("release\n")
        other.stdin.flush()
        expect_line(other, "released")
        assert other.wait(20) == 0


def test_tests_use_fresh_databases(store):
    assert store.deployments(include_destroyed=True) == []
    assert isinstance(store.dir, Path)


_NAMES = st.one_of(st.sampled_from(sorted(store_mod.LABCTL_TABLES)),
                   st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))


@given(tables=st.sets(_NAMES, max_size=8), meta=st.sampled_from([True, False, None]))
def test_a_database_is_labctls_only_when_nothing_in_it_says_otherwise(tables, meta):
    """`telling_tables`: a new database, or labctl's (its version in its `meta`, or a first open cut short
    after `meta` was made) is opened; any other table, a `meta` of other columns, or labctl's table names without
    labctl's `meta` mark another application's database, and are named."""
    meta = meta if "meta" in tables else None  # no table, no version
    told = store_mod.telling_tables(tables, meta)
    if meta is True or not tables:
        assert told == set()
        return
    assert told <= tables
    assert tables - store_mod.LABCTL_TABLES <= told
    if meta is None:  # labctl makes `meta` first: tables without labctl's are someone else's
        assert told or tables == {"sqlite_sequence"}  # (SQLite's own, left by a dropped table: nothing to take)
    else:
        assert told == tables - store_mod.LABCTL_TABLES
