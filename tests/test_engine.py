"""The engine's own rules, against an in-memory provider (the SDK paths are covered end to end in tests/e2e)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from labctl.engine import Engine
from labctl.errors import NoCapacity, QuotaExceeded
from labctl.plan import NodePlan, Plan, Resource
from labctl.providers import kit
from labctl.providers.base import Found
from labctl.state import StateStore


@dataclass
class FakeSite:
    name: str = "fake"


@dataclass
class MemoryCloud:
    """Resources by name; capacity per node type; counts creates."""

    capacity: dict[str, int] = field(default_factory=dict)
    items: dict[str, Found] = field(default_factory=dict)
    creates: list[str] = field(default_factory=list)
    crash_after_create: str | None = None
    error_once: set[str] = field(default_factory=set)

    def preflight(self, plan):
        pass

    def find(self, res, plan):
        return self.items.get(res.name)

    def create(self, res, plan, deps, candidate):
        if candidate is not None:
            if self.capacity.get(candidate, 0) < res.spec.get("count", 1):
                raise NoCapacity(f"not enough hosts for {candidate}")
            self.capacity[candidate] -= res.spec.get("count", 1)
        self.creates.append(res.key)
        status = "pending" if res.kind in ("server", "reservation") else "ready"
        found = Found(res.kind, f"id-{res.name}-{len(self.creates)}", res.name, status, {"node_type": candidate})
        self.items[res.name] = found
        if self.crash_after_create == res.key:
            raise KeyboardInterrupt("simulated crash after the create reached the cloud")
        return found

    def wait(self, items, plan, timeout, on_progress):
        out = []
        for res, f in items:
            if res.key in self.error_once:
                self.error_once.discard(res.key)
                f.status, f.error = "error", "No valid host was found"
            else:
                f.status = "ready"
            out.append(f)
        return out

    def delete(self, kind, found, plan):
        for f in found:
            self.items.pop(f.name, None)

    def list_owned(self, plan):
        return list(self.items.values())

    def extend(self, found, hours, plan):
        return found


def make_plan(candidates=("big", "small")) -> Plan:
    plan = Plan("labctl-u-lab", "lab", "u", None, FakeSite(), 1, {}, [NodePlan("n-1", "n", candidates, "img", True)])
    plan.resources += [
        Resource("keypair", "keypair", "labctl-u-lab", {"public_key": "k"}),
        Resource("reservation:n", "reservation", "labctl-u-lab-n",
                 {"role": "n", "count": 1, "kind": "host", "candidates": list(candidates), "hours": 1}),
        Resource("server:n-1", "server", "labctl-u-lab-n-1", {"node": "n-1", "reservation": "reservation:n"},
                 ("keypair", "reservation:n")),
        Resource("floating_ip:n-1", "floating_ip", "labctl-u-lab-n-1-fip", {"node": "n-1", "server": "server:n-1"},
                 ("server:n-1",)),
    ]
    return plan


@pytest.fixture
def store(tmp_path):
    return StateStore(tmp_path / "state.db")


def test_apply_twice_creates_once(store):
    cloud = MemoryCloud(capacity={"big": 1})
    plan = make_plan()
    Engine(cloud, store).apply(plan)
    Engine(cloud, store).apply(plan)
    assert sorted(cloud.creates) == ["floating_ip:n-1", "keypair", "reservation:n", "server:n-1"]
    assert {r.status for r in store.resources(plan.deployment)} == {"ready"}


@pytest.mark.parametrize("concurrency", [1, 8])
def test_a_level_starts_its_long_wait_first_and_one_at_a_time_uses_no_thread(store, concurrency, monkeypatch):
    """With concurrency 1, the caller's thread makes a level's resources, the reservation (a lease's start) before
    the key pair, whatever the plan's order; else the caller's thread makes the reservation and threads the
    others."""
    import threading

    cloud = MemoryCloud(capacity={"big": 1})
    plan = make_plan()
    assert [r.kind for r in plan.resources[:2]] == ["keypair", "reservation"]
    threads = []
    original = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: (threads.append(self), original(self))[1])
    Engine(cloud, store, concurrency=concurrency).apply(plan)
    assert set(cloud.creates[:2]) == {"reservation:n", "keypair"}
    if concurrency == 1:
        assert cloud.creates[0] == "reservation:n" and threads == []
    else:  # the caller's thread makes the reservation, one thread the key pair
        assert len(threads) == 1


def test_falls_back_to_next_type_and_records_it(store):
    cloud = MemoryCloud(capacity={"big": 0, "small": 1})
    plan = make_plan()
    seen = []
    Engine(cloud, store, on_progress=lambda s, st, d: seen.append((st, d))).apply(plan)
    assert store.resource(plan.deployment, "reservation:n").data["node_type"] == "small"
    assert any(st == "fallback" and "trying small" in d for st, d in seen)
    assert any("small" in msg for _, _, msg in store.events(plan.deployment))


def test_no_capacity_anywhere_raises_one_clear_error(store):
    cloud = MemoryCloud(capacity={})
    with pytest.raises(NoCapacity, match="none of big, small"):
        Engine(cloud, store).apply(make_plan())


def test_crash_after_create_then_rerun_finds_it(store):
    cloud = MemoryCloud(capacity={"big": 1}, crash_after_create="server:n-1")
    plan = make_plan()
    with pytest.raises(KeyboardInterrupt):
        Engine(cloud, store).apply(plan)
    assert store.resource(plan.deployment, "server:n-1").status == "intent"
    cloud.crash_after_create = None
    Engine(cloud, store).apply(plan)
    assert cloud.creates.count("server:n-1") == 1


def test_server_error_is_replaced_once(store):
    cloud = MemoryCloud(capacity={"big": 1}, error_once={"server:n-1"})
    Engine(cloud, store).apply(make_plan())
    assert cloud.creates.count("server:n-1") == 2
    assert len([f for f in cloud.items.values() if f.kind == "server"]) == 1


def test_destroy_removes_recorded_and_tagged_strays(store):
    cloud = MemoryCloud(capacity={"big": 1})
    plan = make_plan()
    Engine(cloud, store).apply(plan)
    cloud.items["stray"] = Found("server", "id-stray", "stray")
    left = Engine(cloud, store).destroy(plan)
    assert left == [] and cloud.items == {}
    assert store.resources(plan.deployment) == []


def test_delete_found_deletes_exactly_those_in_teardown_order(store):
    cloud = MemoryCloud(capacity={"big": 1})
    plan = make_plan()
    Engine(cloud, store).apply(plan)
    deleted: list[str] = []
    delete = cloud.delete
    cloud.delete = lambda kind, found, p: (deleted.append(kind), delete(kind, found, p))
    listed = [cloud.items[n] for n in ("labctl-u-lab", "labctl-u-lab-n-1", "labctl-u-lab-n-1-fip")]
    Engine(cloud, store).delete_found(plan, listed)
    assert deleted == ["floating_ip", "server", "keypair"]
    assert list(cloud.items) == ["labctl-u-lab-n"]  # the reservation was not listed: still there


# -- lease ends (service.extend_deployment over an in-memory cloud) ----------------------------------------------
def _deployment_with(store, kind: str, end: str):
    from labctl.state import DeploymentRecord

    store.save_deployment(DeploymentRecord("labctl-u-lab", "lab", "lab", "u", None, "fake", "up", None, {}))
    store.record_resource("labctl-u-lab", f"{kind}:n-1", "ready", "id-1", {"end": end}, kind=kind,
                          name="labctl-u-lab-n-1")
    store.set_deployment_status("labctl-u-lab", "up", lease_end=end)
    return store.get_deployment("labctl-u-lab")


class EndCloud(MemoryCloud):
    """Moves a server's end as AWS/GCP adapters do (or, with `movable=False`, gives no end back)."""

    movable: bool = True

    def extend(self, found, hours, plan):
        from datetime import datetime, timedelta

        if self.movable:
            found.attrs["end"] = (datetime.fromisoformat("2026-12-04T12:00:00+00:00")
                                  + timedelta(hours=hours)).isoformat().replace("+00:00", "Z")
        return found


def test_extend_moves_a_servers_end_where_the_cloud_has_no_lease(store):
    from labctl import service

    ctx = service.Context(store, "u")
    cloud = EndCloud()
    cloud.site = FakeSite()
    dep = _deployment_with(store, "server", "2026-12-04T12:00:00Z")
    st = service.extend_deployment(ctx, dep, cloud, 2)
    assert st.lease_end == "2026-12-04T14:00:00+00:00"
    assert store.resource(dep.id, "server:n-1").data["end"] == "2026-12-04T14:00:00+00:00"


def test_extend_says_in_one_line_where_the_cloud_cannot_move_the_end(store):
    from labctl import service
    from labctl.errors import UserError

    ctx = service.Context(store, "u")
    cloud = EndCloud()
    cloud.movable = False
    cloud.site = FakeSite()
    dep = _deployment_with(store, "server", "2026-12-04T12:00:00Z")
    with pytest.raises(UserError, match="cannot move the end of server labctl-u-lab-n-1") as exc:
        service.extend_deployment(ctx, dep, cloud, 2)
    assert "\n" not in str(exc.value) and exc.value.exit_code == 2
    store.delete_resource(dep.id, "server:n-1")
    with pytest.raises(UserError, match="no lease and no server"):
        service.extend_deployment(ctx, dep, cloud, 2)


@pytest.mark.parametrize(("left", "expected"), [
    (timedelta(hours=2), None),
    (timedelta(minutes=61), None),
    (timedelta(minutes=59), "ends in 59 min"),
    (timedelta(seconds=10), "ends in 1 min"),
    (-timedelta(minutes=5), "ended at"),
])
def test_status_warns_when_less_than_an_hour_is_left(left, expected):
    from datetime import UTC, datetime

    from labctl import service

    now = datetime(2026, 12, 4, 12, tzinfo=UTC)
    warning = service.end_warning("lab", "up", (now + left).isoformat(), now)
    assert (warning is None) if expected is None else (expected in warning and "\n" not in warning)
    assert service.end_warning("lab", "kept", (now + left).isoformat(), now) is None


def test_the_first_end_wins_whatever_its_notation():
    from labctl import service

    assert service.earliest_end(["2026-12-04T14:00:00Z", "2026-12-04T13:30:00+00:00", None, "garbage",
                                 "2026-12-04T08:00:00-06:00"]) == "2026-12-04T13:30:00+00:00"
    assert service.earliest_end([None, ""]) is None


# -- site failover (service.up over the engine's NoCapacity) ------------------------------------------------------
@pytest.mark.parametrize("site", [None, "auto", "AUTO", "chi@tacc,chi@uc"])
@pytest.mark.parametrize("error", [NoCapacity, QuotaExceeded])
def test_up_without_a_site_tries_the_profiles_sites_in_order(store, monkeypatch, site, error):
    from labctl import service

    tried, said = [], []

    def up_at(ctx, prof, where, **kw):
        tried.append((where.name, kw.get("clean_on_no_room")))
        if where.name == "chi@tacc":
            raise error("no capacity at chi@tacc for gpu: none of compute_liqid has 1 free host(s) now")
        return f"up at {where.name}"

    monkeypatch.setattr(service, "_up_at", up_at)
    ctx = service.Context(store, "u", lambda subject, stage, detail: said.append((subject, stage, detail)))
    assert service.up(ctx, "gpu-a100", site) == "up at chi@uc"  # gpu-a100's sites: [chi@tacc, chi@uc]
    assert tried == [("chi@tacc", True), ("chi@uc", True)]
    assert [s for s in said if s[0] == "failover"] == [(
        "failover", "moving", "chi@tacc has no room for gpu-a100 (no capacity at chi@tacc for gpu: none of "
        "compute_liqid has 1 free host(s) now); nothing left there; trying chi@uc")]
    assert store.events("labctl-u-gpu-a100")[-1][1:] == ("warning", said[-1][2])


def test_one_site_is_as_before_and_a_blank_entry_is_refused(store, monkeypatch):
    from labctl import service
    from labctl.errors import UserError

    tried = []
    monkeypatch.setattr(service, "_up_at", lambda ctx, prof, where, **kw: tried.append(kw) or "ok")
    ctx = service.Context(store, "u")
    assert service.up(ctx, "gpu-a100", "chi@uc") == "ok" and "clean_on_no_room" not in tried[0]
    with pytest.raises(UserError, match="has an empty site in it"):
        service.up(ctx, "gpu-a100", "chi@tacc, ,chi@uc")
    with pytest.raises(UserError, match="unknown site 'chi@nowhere'"):
        service.up(ctx, "gpu-a100", "chi@tacc,chi@nowhere")  # every site is checked before anything is made
    assert len(tried) == 1


def test_creates_run_in_the_callers_context(store):
    """A level's resources are made in threads of the engine's own; each sees the caller's context (a class's
    rank for the rate limit is one such value)."""
    import contextvars

    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")
    seen: dict[str, str] = {}

    class Seeing(MemoryCloud):
        def create(self, res, plan, deps, candidate):
            seen[res.key] = marker.get()
            return super().create(res, plan, deps, candidate)

    token = marker.set("student-7")
    try:
        Engine(Seeing(capacity={"big": 1}), store).apply(make_plan())
    finally:
        marker.reset(token)
    assert seen == dict.fromkeys(["keypair", "reservation:n", "server:n-1", "floating_ip:n-1"], "student-7")


def test_creates_that_start_a_long_wait_go_ahead_at_the_rate_limit(store):
    """A lease or a server is found and made under a rank ahead of the student's other calls (`kit.ahead`)."""
    ranks: dict[str, float] = {}

    class RankedCloud(MemoryCloud):
        def find(self, res, plan):
            ranks[f"find {res.kind}"] = kit.current_rank()
            return super().find(res, plan)

        def create(self, res, plan, deps, candidate):
            ranks[f"create {res.kind}"] = kit.current_rank()
            return super().create(res, plan, deps, candidate)

    engine = Engine(RankedCloud(capacity={"big": 1}), store)
    with kit.rank(7):  # the student's place in the roster
        engine.apply(make_plan())
    assert ranks["find keypair"] == ranks["create keypair"] == 7
    for kind in ("reservation", "server"):
        assert ranks[f"find {kind}"] == ranks[f"create {kind}"] == 7 - kit.AHEAD
    assert kit.SHARED_RANK < 7 - kit.AHEAD  # a shared list every student waits on still goes first


def test_a_given_resource_is_used_as_given_never_made_recorded_or_deleted(store):
    """A class's shared group comes with the plan (`Plan.given`): the server that depends on it gets it, and the
    environment's apply and destroy never touch it."""
    cloud = MemoryCloud(capacity={"big": 1})
    plan = make_plan()
    group = Found("secgroup", "sg-of-the-class", "labctl-c-class-fake-lab")
    plan.given = {"secgroup": group}
    server = plan.get("server:n-1")
    plan.resources[plan.resources.index(server)] = Resource(server.key, server.kind, server.name, server.spec,
                                                            (*server.depends_on, "secgroup"))
    seen: dict[str, Found] = {}
    create = cloud.create
    cloud.create = lambda res, p, deps, candidate: (seen.update(deps), create(res, p, deps, candidate))[1]
    found = Engine(cloud, store).apply(plan)
    assert seen["secgroup"] is group and found["secgroup"] is group
    assert "secgroup" not in cloud.creates and "secgroup" not in {r.key for r in store.resources(plan.deployment)}
    assert [[r.key for r in level] for level in plan.levels()][0] == ["keypair", "reservation:n"]
    cloud.items[group.name] = group  # in the cloud, as the class made it; not the environment's to delete
    cloud.list_owned = lambda p: [f for f in cloud.items.values() if f is not group]
    assert Engine(cloud, store).destroy(plan) == [] and list(cloud.items.values()) == [group]


def test_a_class_shares_one_key_pair_and_security_group_per_chameleon_site_and_nothing_elsewhere():
    from labctl import sites
    from labctl.plan import build_plan, class_shared_plan
    from labctl.profile import find_profile, load_profile

    hello = load_profile(find_profile("hello"))
    kvm = sites.resolve("kvm@tacc")
    key = "ssh-ed25519 AAAA k"
    shared = class_shared_plan(hello, kvm, "mlsys", "prof", key)
    assert shared is not None and shared.deployment == "labctl-mlsys-class-kvm-tacc-hello"
    pair, group = shared.resources
    assert (group.kind, group.name, group.depends_on) == ("secgroup", shared.deployment, ())
    assert group.spec["rules"] == [{"port": 22, "protocol": "tcp", "cidr": "0.0.0.0/0"}]
    assert (pair.kind, pair.name, pair.depends_on) == ("keypair", shared.deployment, ())
    # The key every environment holds, and its students' leases by pattern: `labctl-mlsys-<student>-hello-node`.
    assert pair.spec == {"public_key": key, "leases": ["labctl-mlsys-*-hello:node"]}
    assert shared.tags["labctl:owner"] == "prof" and shared.tags["labctl:course"] == "mlsys"
    student = build_plan(hello, kvm, "s01", key, course="mlsys", given={"secgroup": group, "keypair": pair})
    assert {"secgroup", "keypair"}.isdisjoint(r.key for r in student.resources)
    assert {"secgroup", "keypair"} <= set(student.get("server:node-1").depends_on)
    assert student.get("reservation:node").name == "labctl-mlsys-s01-hello-node"  # what the pattern names
    alone = build_plan(hello, kvm, "s01", key, course="mlsys")
    assert alone.get("secgroup").name == alone.get("keypair").name == alone.deployment  # `labctl up`: its own
    # Bare metal has no groups: a class there shares its key pair only.
    chi = class_shared_plan(hello, sites.resolve("chi@tacc"), "mlsys", "prof", key)
    assert chi is not None and [r.kind for r in chi.resources] == ["keypair"]
    # On AWS and GCP a group or firewall belongs to the deployment's network, and so does nothing else.
    for name in ("aws:us-east-1", "gcp:us-central1-a"):
        assert class_shared_plan(hello, sites.resolve(name), "mlsys", "prof", key) is None, name
