"""End to end on the emulated AWS: a lab's node ends itself at the lease end (the emulator ends it only because it
carries labctl's timer, its tags in its metadata and terminate-on-shutdown), its kept volume survives, and
`labctl extend` moves the end. The real CLI runs; the checks read the cloud through boto3."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest
from tests.e2e.helpers import run, run_json

pytestmark = pytest.mark.slow
SITE = "sim-aws"
REGION = "us-east-1"
SCALE = 0.01  # the lab's hour lasts 36 s: `up` (no setup steps) and `extend` are done before, even on a busy machine


def lab(tmp_path: Path) -> str:
    path = tmp_path / "ending.yaml"
    path.write_text("\n".join([
        "name: ending", "description: one node with a kept volume, ended by its lease", "sites: [aws]",
        "lease_hours: 1", "image: ubuntu-24.04", "nodes:", "  node:", "    count: 1", "    floating_ip: true",
        "    types:", "      aws: [t3.micro]", "volumes:",
        "  block: {size_gb: 1, node: node-1, mount: /mnt/block, keep: true}", "ports: [22]"]) + "\n")
    return str(path)


def ec2(env: dict[str, str]):
    """boto3 EC2 against a front layer of the lab's emulated EC2 (whose reaper runs while the test watches)."""
    from labctl.testbed.aws import start_aws

    emu = start_aws(Path(env["LABCTL_TESTBED_DIR"]) / "aws", lease_scale=SCALE)
    return emu, emu.session(REGION).client("ec2", endpoint_url=emu.endpoint)


def instance(cli, deployment: str) -> dict:
    (r,) = cli.describe_instances(Filters=[{"Name": "tag:labctl:deployment", "Values": [deployment]}])["Reservations"]
    return r["Instances"][0]


def until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def scaled_end(inst: dict) -> float:
    end = datetime.fromisoformat(next(t["Value"] for t in inst["Tags"] if t["Key"] == "labctl-ends-at"))
    launched = inst["LaunchTime"].timestamp()
    return launched + (end.timestamp() - launched) * SCALE


@pytest.fixture
def env(labctl_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("LABCTL_TESTBED_LEASE_SCALE", str(SCALE))
    return {**labctl_env, "LABCTL_TESTBED_LEASE_SCALE": str(SCALE)}


def test_the_node_ends_itself_at_the_lease_end_and_the_kept_volume_survives(env, tmp_path):
    run(env, "up", lab(tmp_path), "--site", SITE, timeout=300)
    status = run_json(env, "status", "ending")
    deployment = status["deployment"]
    emu, cli = ec2(env)
    try:
        inst = instance(cli, deployment)
        assert inst["State"]["Name"] == "running"
        volumes = cli.describe_volumes(Filters=[{"Name": "tag:labctl:deployment", "Values": [deployment]},
                                                {"Name": "tag-key", "Values": ["labctl:volume"]}])["Volumes"]
        (vol,) = volumes
        assert [a["InstanceId"] for a in vol["Attachments"]] == [inst["InstanceId"]]
        assert until(lambda: instance(cli, deployment)["State"]["Name"] == "terminated", 3600 * SCALE + 20)
        assert time.time() >= scaled_end(inst)
        (after,) = cli.describe_volumes(VolumeIds=[vol["VolumeId"]])["Volumes"]
        assert after["State"] == "available"  # detached by the end, not deleted
    finally:
        emu.stop()
    run(env, "down", "ending", "--delete-volumes", timeout=300)


def test_extend_moves_the_end_and_the_node_outlives_the_old_one(env, tmp_path):
    run(env, "up", lab(tmp_path), "--site", SITE, timeout=300)
    deployment = run_json(env, "status", "ending")["deployment"]
    emu, cli = ec2(env)
    try:
        before = instance(cli, deployment)
        run(env, "extend", "ending", "--hours", "1")
        moved = instance(cli, deployment)
        old_end, new_end = scaled_end(before), scaled_end(moved)
        assert new_end - old_end == pytest.approx(3600 * SCALE, abs=0.01)
        assert until(lambda: time.time() > old_end + 1.5, 3600 * SCALE + 5)
        assert instance(cli, deployment)["State"]["Name"] == "running"
        assert until(lambda: instance(cli, deployment)["State"]["Name"] == "terminated", 3600 * SCALE * 2 + 20)
        assert time.time() >= new_end
    finally:
        emu.stop()
    run(env, "down", "ending", "--delete-volumes", timeout=300)
