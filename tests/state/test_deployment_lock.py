"""One lock per deployment: `up`, `down` and `extend` take `env:<deployment id>`, the lock class mode takes per
student, so a second single-user command and a class operator exclude each other (on SQLite and PostgreSQL).
"""

from __future__ import annotations

import threading
import time

import pytest

from labctl import classroom, service
from labctl.state import DeploymentRecord, StateStore


def seed(store: StateStore, dep_id: str, owner: str = "student1", course: str | None = None) -> DeploymentRecord:
    dep = DeploymentRecord(dep_id, "hello", "hello", owner, course, "sim", "up", None,
                           {"nodes": [["node-1", "node"]], **({"student": {"id": owner}} if course else {})})
    store.save_deployment(dep)
    return dep


@pytest.fixture
def short_wait(monkeypatch):
    monkeypatch.setattr(service, "LOCK_WAIT", 0.5)


def test_busy_deployment_waits_then_names_the_holder(store, state_url, short_wait):
    ctx = service.Context(store, "student1")
    with StateStore.open(state_url) as other, other.lock("env:labctl-student1-hello") as held:
        assert held
        started = time.monotonic()
        with (pytest.raises(service.DeploymentBusy, match=r"^hello is busy: labctl \S+ pid \d+ is working on it"),
              service.deployment_lock(ctx, "labctl-student1-hello", "hello")):
            pytest.fail("got the lock another process holds")
        assert 0.4 <= time.monotonic() - started < 5
    assert service.DeploymentBusy("x").exit_code == 2


def test_a_lock_released_within_the_wait_is_taken(store, state_url, short_wait):
    ctx = service.Context(store, "student1")
    other = StateStore.open(state_url)
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with other.lock("env:labctl-student1-hello") as held:
            assert held
            taken.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert taken.wait(5)
        threading.Timer(0.15, release.set).start()
        with service.deployment_lock(ctx, "labctl-student1-hello", "hello"):
            pass
    finally:
        release.set()
        t.join(5)
        other.close()


def test_single_down_and_extend_wait_for_a_class_operator(store, state_url, short_wait):
    """Class mode holds `env:<id>` while it works on a student; `labctl down`/`extend` of that deployment
    (same owner, e.g. the instructor acting as the student) is refused as busy, and nothing changes."""
    dep = seed(store, "labctl-student1-hello")
    ctx = service.Context(store, "student1")
    with StateStore.open(state_url) as operator, operator.lock(f"env:{dep.id}") as held:
        assert held
        with pytest.raises(service.DeploymentBusy, match="hello is busy"):
            service.down(ctx, "hello")
        with pytest.raises(service.DeploymentBusy, match="hello is busy"):
            service.extend(ctx, "hello", 1)
    assert store.get_deployment(dep.id).status == "up"


def test_class_down_skips_a_deployment_a_single_command_holds(store, state_url, short_wait):
    dep = seed(store, "labctl-c-alice-hello", owner="alice", course="c")
    ctx = service.Context(store, "instructor")
    with StateStore.open(state_url) as single:
        single_ctx = service.Context(single, "alice")
        with service.deployment_lock(single_ctx, dep.id, dep.name):
            (result,) = classroom.class_down(ctx, "hello", "c")
    assert result.status == classroom.BUSY and result.deployment == dep.id
    assert store.get_deployment(dep.id).status == "up"


def test_the_lock_is_reentrant_for_the_holding_thread(store):
    ctx = service.Context(store, "student1")
    with (service.deployment_lock(ctx, "labctl-student1-x", "x"),
          service.deployment_lock(ctx, "labctl-student1-x", "x", wait=0)):
        pass
