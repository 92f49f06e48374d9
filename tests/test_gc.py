"""The leak audit's rules (labctl.gc) against an in-memory cloud and a real state store; the SDK paths are covered
end to end in tests/e2e/test_gc_sim.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labctl import gc, service
from labctl.errors import CloudError, UserError
from labctl.providers.base import Found
from labctl.sites import resolve
from labctl.state import DeploymentRecord, StateStore

SITE = "sim:kvm@tacc"
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
PRICES = {"currency": "USD", "aws": {"us-east-1": {"t3.small": 0.0208}}}


def tagged(kind: str, name: str, deployment: str, owner: str = "alice", **attrs: Any) -> Found:
    return Found(kind, f"id-{name}", name, attrs={"deployment": deployment, "owner": owner, **attrs})


@dataclass
class InventoryCloud:
    """What a site holds; `inventory()` reports what carries a deployment tag, as the adapters do."""

    site: Any
    items: list[Found] = field(default_factory=list)
    deleted: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, name, plan's deployment)
    fail_delete: set[str] = field(default_factory=set)

    def inventory(self) -> list[Found]:
        return [f for f in self.items if f.attrs.get("deployment")]

    def delete(self, kind: str, found: list[Found], plan: Any) -> None:
        for f in found:
            if f.name in self.fail_delete:
                raise CloudError(f"{f.name}: the cloud refused")
            self.deleted.append((kind, f.name, plan.deployment))
            self.items = [i for i in self.items if i.cloud_id != f.cloud_id]


@pytest.fixture
def ctx(tmp_path):
    return service.Context(StateStore(tmp_path / "state.db"), "alice")


def record(ctx, dep_id: str, site: str = SITE, status: str = "up", owner: str = "alice", **data: Any) -> None:
    ctx.store.save_deployment(DeploymentRecord(dep_id, dep_id, "hello", owner, None, site, status, None, data))


def run_audit(ctx, cloud: InventoryCloud, **kw: Any) -> gc.Audit:
    return gc.audit(ctx, [cloud.site.name], prices=PRICES, now=NOW, connect=lambda c, s, cl: cloud, **kw)


# -- classify -------------------------------------------------------------------------------------
def dep(status: str = "up", site: str = SITE, **data: Any) -> DeploymentRecord:
    return DeploymentRecord("labctl-alice-hello", "hello", "hello", "alice", None, site, status, None, data)


@pytest.mark.parametrize(("record_", "kind", "expected"), [
    (None, "server", gc.NO_RECORD),
    (dep(), "server", None),
    (dep(status="failed"), "floating_ip", None),  # the state remembers it: `labctl down` is its cleanup
    (dep(status="destroyed"), "keypair", gc.DELETED),
    (dep(site="sim:chi@uc"), "server", f"{gc.ELSEWHERE} (sim:chi@uc)"),
    (dep(lease_end=(NOW - timedelta(minutes=1)).isoformat()), "floating_ip", f"{gc.ENDED} "
     f"{(NOW - timedelta(minutes=1)).isoformat()}"),
    (dep(lease_end=(NOW + timedelta(minutes=1)).isoformat()), "floating_ip", None),
    (dep(status="kept"), "secgroup", "left after down"),
])
def test_classify(record_, kind, expected):
    f = tagged(kind, "labctl-alice-hello-x", "labctl-alice-hello")
    assert gc.classify(f, SITE, record_, set(), NOW) == expected


def test_a_kept_volume_is_accounted_for_even_after_its_lease_ended():
    ended = dep(lease_end=(NOW - timedelta(hours=1)).isoformat())
    volume = tagged("volume", "labctl-alice-hello-data", "labctl-alice-hello")
    assert gc.classify(volume, SITE, ended, {volume.cloud_id}, NOW) is None
    assert gc.classify(volume, SITE, dep(status="kept"), {volume.cloud_id}, NOW) is None
    assert gc.classify(volume, SITE, ended, set(), NOW).startswith(gc.ENDED)  # not marked keep: a leftover


@given(name=st.text(max_size=40), attrs=st.dictionaries(st.sampled_from(["owner", "lab", "created", "keep"]),
                                                        st.text(max_size=10)))
def test_without_labctls_deployment_tag_nothing_is_ever_listed(name, attrs):
    """Whatever its name (labctl-like or not) and other attributes, a resource without a `labctl-` deployment tag
    is never a leak."""
    f = Found("server", "id", name, attrs=dict(attrs))
    assert gc.classify(f, SITE, None, set(), NOW) is None
    f.attrs["deployment"] = "someone-elses"
    assert gc.classify(f, SITE, None, set(), NOW) is None


# -- audit ----------------------------------------------------------------------------------------
def test_audit_lists_orphans_and_never_a_live_deployments_or_an_untagged_resource(ctx):
    cloud = InventoryCloud(resolve(SITE), [
        tagged("server", "labctl-alice-live-node-1", "labctl-alice-live"),
        tagged("server", "labctl-bob-lost-node-1", "labctl-bob-lost", owner="bob", created="2026-12-04T10:00:00Z"),
        tagged("keypair", "labctl-bob-lost", "labctl-bob-lost", owner="bob"),
        Found("server", "id-untagged", "labctl-alice-live-node-2"),  # a labctl-like name without the tags
    ])
    record(ctx, "labctl-alice-live")
    found = run_audit(ctx, cloud)
    assert found.sites == [SITE] and found.skipped == []
    assert [(x.kind, x.name, x.reason, x.owner) for x in found.leaks] == [
        ("keypair", "labctl-bob-lost", gc.NO_RECORD, "bob"), ("server", "labctl-bob-lost-node-1", gc.NO_RECORD, "bob")]
    server = found.leaks[1]
    assert server.age_hours == pytest.approx(2.0) and gc.age_text(server.age_hours) == "2h"


def test_audit_prices_servers_on_aws_and_gcp_only(ctx):
    cloud = InventoryCloud(resolve("sim-aws"), [tagged("server", "labctl-a-b-node-1", "labctl-a-b",
                                                       node_type="t3.small"),
                                                tagged("floating_ip", "labctl-a-b-node-1-fip", "labctl-a-b")])
    found = run_audit(ctx, cloud)
    assert {x.kind: x.cost_per_hour for x in found.leaks} == {"server": 0.0208, "floating_ip": None}
    assert found.cost_per_hour == pytest.approx(0.0208)
    kvm = InventoryCloud(resolve(SITE), [tagged("server", "labctl-a-b-node-1", "labctl-a-b", node_type="t3.small")])
    assert run_audit(ctx, kvm).leaks[0].cost_per_hour is None


def test_a_site_whose_adapter_cannot_list_is_reported_not_audited(ctx):
    class NoInventory:
        site = resolve(SITE)

    found = gc.audit(ctx, [SITE], prices=PRICES, now=NOW, connect=lambda c, s, cl: NoInventory())
    assert found.sites == [] and found.leaks == [] and "cannot list" in found.skipped[0]


@pytest.mark.parametrize("sites", [[""], [" "], ["sim:kvm@tacc,"], [",sim:chi@uc"]])
def test_an_empty_site_selects_nothing(ctx, sites):
    with pytest.raises(UserError, match="--site is empty"):
        gc.audit(ctx, sites, prices=PRICES)


def test_an_unknown_site_is_refused_before_any_cloud_call(ctx):
    calls = []
    with pytest.raises(UserError, match="unknown site"):
        gc.audit(ctx, ["chi@nowhere"], prices=PRICES, connect=lambda *a: calls.append(a))
    assert calls == []


def test_sim_stands_for_every_emulated_chameleon_site():
    assert gc.site_names(["sim", "sim-gcp,sim:kvm@tacc"]) == [*gc.SIM_CHAMELEON, "sim-gcp"]


# -- delete ---------------------------------------------------------------------------------------
def test_delete_removes_exactly_what_was_listed_in_teardown_order(ctx):
    live = tagged("server", "labctl-alice-live-node-1", "labctl-alice-live")
    untagged = Found("floating_ip", "id-x", "labctl-bob-lost-node-1-fip")
    cloud = InventoryCloud(resolve(SITE), [
        tagged("keypair", "labctl-bob-lost", "labctl-bob-lost"),
        tagged("server", "labctl-bob-lost-node-1", "labctl-bob-lost"),
        tagged("floating_ip", "labctl-bob-lost-node-1-fip", "labctl-bob-lost"),
        tagged("secgroup", "labctl-bob-lost", "labctl-bob-lost"),
        live, untagged,
    ])
    record(ctx, "labctl-alice-live")
    result = gc.delete(ctx, run_audit(ctx, cloud), now=NOW)
    assert [k for k, _, _ in cloud.deleted] == ["floating_ip", "server", "secgroup", "keypair"]
    assert {d for _, _, d in cloud.deleted} == {"labctl-bob-lost"}
    assert cloud.items == [live, untagged]
    assert len(result.deleted) == 4 and result.left == [] and result.skipped == []
    assert run_audit(ctx, cloud).leaks == []


def test_delete_skips_a_deployment_recorded_since_the_audit(ctx):
    cloud = InventoryCloud(resolve(SITE), [tagged("server", "labctl-bob-new-node-1", "labctl-bob-new")])
    found = run_audit(ctx, cloud)
    record(ctx, "labctl-bob-new", owner="bob")  # a `labctl up` began meanwhile
    result = gc.delete(ctx, found, now=NOW)
    assert cloud.deleted == [] and result.deleted == [] and "accounts for it now" in result.skipped[0]


def test_delete_skips_a_deployment_another_labctl_is_working_on(ctx, monkeypatch):
    monkeypatch.setattr(service, "LOCK_WAIT", 0.1)
    cloud = InventoryCloud(resolve(SITE), [tagged("server", "labctl-bob-x-node-1", "labctl-bob-x")])
    found = run_audit(ctx, cloud)
    with ctx.store.lock("env:labctl-bob-x") as held:
        assert held
        import threading

        box: list[gc.Deleted] = []
        worker = threading.Thread(target=lambda: box.append(gc.delete(ctx, found, now=NOW)))
        worker.start()
        worker.join(30)
    assert cloud.deleted == [] and "busy" in box[0].skipped[0]


def test_a_refused_delete_is_reported_and_the_rest_still_deleted(ctx):
    cloud = InventoryCloud(resolve(SITE), [tagged("server", "labctl-a-x-node-1", "labctl-a-x"),
                                           tagged("server", "labctl-b-y-node-1", "labctl-b-y")],
                           fail_delete={"labctl-a-x-node-1"})
    result = gc.delete(ctx, run_audit(ctx, cloud), now=NOW)
    assert [x.name for x in result.deleted] == ["labctl-b-y-node-1"]
    assert [x.name for x in result.left] == ["labctl-a-x-node-1"]
    assert result.skipped == ["labctl-a-x: labctl-a-x-node-1: the cloud refused"]


def test_only_one_deployment(ctx):
    cloud = InventoryCloud(resolve(SITE), [tagged("server", "labctl-a-x-node-1", "labctl-a-x"),
                                           tagged("server", "labctl-b-y-node-1", "labctl-b-y")])
    assert [x.name for x in run_audit(ctx, cloud, deployment="labctl-b-y").leaks] == ["labctl-b-y-node-1"]
    with pytest.raises(UserError, match="--deployment is empty"):
        run_audit(ctx, cloud, deployment=" ")


def test_an_ended_lease_whose_cloud_reports_a_later_end_is_still_live(ctx):
    """The state's end passed, but the lease was extended outside labctl: the cloud's end rules, nothing listed."""
    ended = (NOW - timedelta(hours=1)).isoformat()
    record(ctx, "labctl-alice-hello", lease_end=ended)
    later = (NOW + timedelta(hours=2)).isoformat()
    cloud = InventoryCloud(resolve(SITE), [tagged("reservation", "labctl-alice-hello-node", "labctl-alice-hello",
                                                  end=later),
                                           tagged("floating_ip", "labctl-alice-hello-node-1-fip",
                                                  "labctl-alice-hello")])
    assert run_audit(ctx, cloud).leaks == []
    cloud.items[0].attrs["end"] = ended  # the lease really ended: its leftovers are listed
    assert [(x.kind, x.reason) for x in run_audit(ctx, cloud).leaks] == [
        ("floating_ip", f"{gc.ENDED} {ended}"), ("reservation", f"{gc.ENDED} {ended}")]


def test_delete_off_a_terminal_needs_yes_and_asks_no_cloud(labctl_env):
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "labctl", "gc", "--site", "sim", "--delete"], env=labctl_env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: gc --delete asks before deleting")
    assert "Traceback" not in proc.stderr and not Path(labctl_env["LABCTL_TESTBED_DIR"]).exists()
    empty = subprocess.run([sys.executable, "-m", "labctl", "gc", "--site", ""], env=labctl_env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "--site is empty" in empty.stderr


def test_delete_with_a_state_that_holds_no_deployment_is_refused_before_any_cloud(labctl_env, tmp_path):
    """A mistyped --state is a new, empty state: every labctl resource at the site, anyone's, looks orphaned there.
    `gc --delete --yes` refuses it (one line, exit 2, no cloud reached) unless --lost-state says the state is lost
    or --deployment names one deployment."""
    import subprocess
    import sys
    from pathlib import Path

    typo = tmp_path / "sate.db"
    proc = subprocess.run([sys.executable, "-m", "labctl", "--state", str(typo), "gc", "--site", "sim", "--delete",
                           "--yes"], env=labctl_env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: gc --delete: the state sqlite://{typo} holds no deployment, so everything labctl made at these sites "
        "looks orphaned, other people's labs too (a mistyped --state?); pass --deployment ID for one deployment's "
        "leftovers, or --lost-state if the state that made them is lost"]
    assert not Path(labctl_env["LABCTL_TESTBED_DIR"]).exists()  # no emulated cloud was even started


@given(values=st.lists(st.text(max_size=30), min_size=1, max_size=4))
def test_site_selections_from_users_are_names_or_a_one_line_refusal(values):
    """Whatever `--site` values a user types, gc gets non-empty trimmed names (sim expanded) or a UserError."""
    try:
        names = gc.site_names(values)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert names and all(n and n == n.strip() and "," not in n for n in names)
    assert len(names) == len(set(names))


@given(value=st.one_of(st.none(), st.text(max_size=40)))
def test_up_site_lists_are_names_auto_or_a_one_line_refusal(value):
    try:
        names = service.site_list(value)
    except UserError as exc:
        assert "\n" not in str(exc) and "\r" not in str(exc)
        return
    if names is None:
        assert value is None or value.strip().lower() == "auto"
    else:
        assert names and all(n and n == n.strip() and "," not in n for n in names)
