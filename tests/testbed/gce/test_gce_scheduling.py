"""The emulated Compute Engine's instance time limits ("Limit the run time of a VM"), through google-cloud-compute:
the fields it refuses as the real API does, the end it enforces (at the world's lease scale), disks attached with
and without autoDelete at that end, and instances.setScheduling, which it accepts only on a stopped instance."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from google.api_core import exceptions as gexc
from google.cloud import compute_v1
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.testbed.gce.test_gce_emulator import ZONE, insert, instance_body, wait_zone
from tests.testbed.gce.test_gce_networks_disks import make_disk


def limited(name: str, *, seconds: float | None = None, duration: int | None = None, action: str | None = "DELETE",
            **more) -> compute_v1.Instance:
    body = instance_body(name)
    body.scheduling = compute_v1.Scheduling(**more)
    if seconds is not None:
        body.scheduling.termination_time = (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()
    if duration is not None:
        body.scheduling.max_run_duration = compute_v1.Duration(seconds=duration)
    if action:
        body.scheduling.instance_termination_action = action
    return body


def gone(clients, name: str, timeout: float = 20) -> list[str]:
    """The statuses seen until the instance is gone (AssertionError if it is still there after `timeout`)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(clients.InstancesClient.get(project=clients.project, zone=ZONE, instance=name).status)
        except gexc.NotFound:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"{name} still there: {seen[-3:]}")


@pytest.mark.parametrize(("body", "why"), [
    (dict(seconds=10), "at least 30 seconds"),
    (dict(seconds=121 * 86400), "120 days"),
    (dict(duration=29), "at least 30 seconds"),
    (dict(seconds=3600, action=None), "termination action .* is required"),
    (dict(seconds=3600, action="SUSPEND"), "Must be one of STOP, DELETE"),
    (dict(seconds=3600, duration=3600), "either a termination time or a max run duration"),
    (dict(seconds=3600, preemptible=True, automatic_restart=False), "not supported for preemptible"),
    (dict(action="DELETE"), "needs a Spot VM or a time limit"),
    (dict(seconds=3600, provisioning_model="RESERVED"), "Must be one of STANDARD, SPOT"),
])
def test_time_limits_compute_engine_refuses(emu, clients, body, why):
    with pytest.raises(gexc.BadRequest, match=why) as err:
        insert(clients, limited("vm-bad", **body))
    assert err.value.errors[0]["reason"] == "invalid"
    assert emu.world.inventory()["instances"] == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seconds=st.integers(min_value=-86400, max_value=200 * 86400))
def test_termination_time_accepted_exactly_within_30_s_and_120_days(emu, clients, seconds):
    body = instance_body("vm-t")
    body.scheduling = compute_v1.Scheduling(instance_termination_action="DELETE", termination_time=(
        datetime.now(UTC) + timedelta(seconds=seconds)).isoformat())
    if 32 <= seconds <= 120 * 86400 - 2:  # (a second or two either side for the time the request takes)
        wait_zone(clients, insert(clients, body))
        clients.InstancesClient.delete_unary(project=clients.project, zone=ZONE, instance="vm-t")
        gone(clients, "vm-t")
    elif not 28 <= seconds <= 120 * 86400 + 2:
        with pytest.raises(gexc.BadRequest, match="terminationTime"):
            insert(clients, body)


def test_the_instance_is_deleted_at_its_end_with_its_auto_delete_disks_only(emu, clients):
    emu.world.set_lease_scale(2 / 3600)  # an hour's limit runs out in 2 s
    wait_zone(clients, make_disk(clients, "kept"))
    wait_zone(clients, make_disk(clients, "scratch"))
    wait_zone(clients, insert(clients, limited("vm-end", seconds=3600)))
    inst = clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="vm-end")
    assert inst.scheduling.instance_termination_action == "DELETE"
    for disk, auto in (("kept", False), ("scratch", True)):
        wait_zone(clients, clients.InstancesClient.attach_disk_unary(
            project=clients.project, zone=ZONE, instance="vm-end", attached_disk_resource=compute_v1.AttachedDisk(
                source=f"zones/{ZONE}/disks/{disk}", device_name=disk, auto_delete=auto)))
    started = time.monotonic()
    seen = gone(clients, "vm-end")
    assert time.monotonic() - started > 0.5 and "RUNNING" in seen
    assert [d["name"] for d in emu.world.inventory()["disks"]] == ["kept"]  # autoDelete went with it
    assert emu.world.inventory()["disks"][0]["users"] == []


def test_a_max_run_duration_shows_its_termination_timestamp_and_stop_leaves_it_terminated(emu, clients):
    emu.world.set_lease_scale(1 / 3600)
    wait_zone(clients, insert(clients, limited("vm-stop", duration=3600, action="STOP")))
    deadline = time.monotonic() + 20
    inst = clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="vm-stop")
    while inst.status != "TERMINATED" and time.monotonic() < deadline:
        if inst.status == "RUNNING":
            assert inst.resource_status.scheduling.termination_timestamp
        inst = clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="vm-stop")
        time.sleep(0.05)
    assert inst.status == "TERMINATED"
    # stopped: its scheduling may change now (a new end, counted when it runs again)
    later = compute_v1.Scheduling(instance_termination_action="DELETE", max_run_duration=compute_v1.Duration(
        seconds=7200))
    wait_zone(clients, clients.InstancesClient.set_scheduling_unary(
        project=clients.project, zone=ZONE, instance="vm-stop", scheduling_resource=later))
    inst = clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="vm-stop")
    assert inst.scheduling.max_run_duration.seconds == 7200 and inst.scheduling.instance_termination_action == "DELETE"


def test_set_scheduling_is_refused_on_a_running_instance(emu, clients):
    wait_zone(clients, insert(clients, limited("vm-run", seconds=3600)))
    before = clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="vm-run").scheduling
    later = compute_v1.Scheduling(instance_termination_action="DELETE", termination_time=(
        datetime.now(UTC) + timedelta(hours=3)).isoformat())
    with pytest.raises(gexc.BadRequest, match="only while it is stopped") as err:
        clients.InstancesClient.set_scheduling_unary(project=clients.project, zone=ZONE, instance="vm-run",
                                                     scheduling_resource=later)
    assert err.value.errors[0]["reason"] == "invalid"
    after = clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="vm-run").scheduling
    assert after.termination_time == before.termination_time
