"""A lab's end that Compute Engine enforces itself, end to end on sim-gcp: `labctl up` gives each instance
scheduling.terminationTime = launch + lease_hours with instanceTerminationAction DELETE; the emulated Compute
Engine deletes it at that (lease-scaled) time, watched here through google-cloud-compute; the kept volume, a
separate disk attached with autoDelete false, survives it. `labctl extend` is refused in one line: Compute
Engine moves an instance's scheduling only while it is stopped."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tests.e2e.helpers import labctl_leftovers, run, run_json

pytestmark = pytest.mark.slow
LEASE_END_SECONDS = 60.0  # the profile's 1 h lease runs out in this many seconds (the world's lease scale)
PROFILE = """\
name: leaselab
description: One node with a kept volume, to see its end come.
sites: [gcp]
lease_hours: 1
image: ubuntu-24.04
nodes:
  node: {count: 1, floating_ip: true, types: {gcp: [e2-small]}}
volumes:
  block: {size_gb: 2, node: node-1, mount: /mnt/block, keep: true}
ports: [22]
"""


def test_compute_engine_deletes_the_instance_at_the_lab_end_and_keeps_the_volume(labctl_env, tmp_path):
    from google.api_core import exceptions as gexc
    from google.cloud import compute_v1

    from labctl.testbed.gce import start_gce

    env = {**labctl_env, "LABCTL_TESTBED_LEASE_SCALE": str(LEASE_END_SECONDS / 3600)}
    path = tmp_path / "work" / "profiles" / "leaselab.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(PROFILE)
    launched = datetime.now(UTC)
    run(env, "up", str(path), "--site", "sim-gcp", timeout=300)
    deployment = run_json(env, "status", "leaselab")["deployment"]

    emu = start_gce(Path(env["LABCTL_TESTBED_DIR"]))
    try:
        instances = compute_v1.InstancesClient(credentials=emu.credentials(),
                                               client_options={"api_endpoint": emu.endpoint})
        disks = compute_v1.DisksClient(credentials=emu.credentials(), client_options={"api_endpoint": emu.endpoint})
        (inst,) = instances.list(request={"project": emu.project, "zone": "us-central1-a",
                                          "filter": f'labels.labctl-deployment = "{deployment}"'})
        end = datetime.fromisoformat(inst.scheduling.termination_time.replace("Z", "+00:00"))
        assert timedelta(minutes=59) < end - launched < timedelta(minutes=61)
        assert inst.scheduling.instance_termination_action == "DELETE"
        assert inst.scheduling.provisioning_model == "STANDARD"
        (volume,) = [d for d in inst.disks if not d.boot]
        assert volume.auto_delete is False  # a separate disk: deleting the instance leaves it
        assert [d.auto_delete for d in inst.disks if d.boot] == [True]

        # extend: Compute Engine moves the end only on a stopped instance; labctl says so in one line
        refused = run(env, "extend", "leaselab", "--hours", "2", check=False)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert "only while the instance is stopped" in refused.stderr and "labctl down" in refused.stderr
        with pytest.raises(gexc.BadRequest, match="TERMINATED"):  # the rule itself, straight from the API
            instances.set_scheduling_unary(project=emu.project, zone="us-central1-a", instance=inst.name,
                                           scheduling_resource=compute_v1.Scheduling(
                                               termination_time=(end + timedelta(hours=2)).isoformat(),
                                               instance_termination_action="DELETE"))

        deadline = time.monotonic() + LEASE_END_SECONDS + 120
        seen = []
        while True:  # the emulator ends it on its own clock: watch it go
            try:
                seen.append(instances.get(project=emu.project, zone="us-central1-a", instance=inst.name).status)
            except gexc.NotFound:
                break
            assert time.monotonic() < deadline, f"instance still there after its end: {seen[-3:]}"
            time.sleep(0.5)
        assert seen[0] == "RUNNING"  # (STOPPING lasts the delete: 30 s at the time scale, too short to see here)
        assert datetime.now(UTC) - launched >= timedelta(seconds=LEASE_END_SECONDS * 0.95)

        disk = disks.get(project=emu.project, zone="us-central1-a", disk=volume.device_name)
        assert disk.status == "READY" and list(disk.users) == [] and disk.labels["labctl-keep"] == "true"
    finally:
        emu.stop()

    run(env, "down", "leaselab", "--delete-volumes", timeout=300)
    from labctl.testbed.gce.world import GceWorld

    assert labctl_leftovers(GceWorld(Path(env["LABCTL_TESTBED_DIR"]))) == {}
