"""The same end-to-end path on AWS (boto3 against moto behind labctl's thin layer) and GCP
(google-cloud-compute against the emulated Compute Engine), through the real CLI and real SSH."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.e2e.helpers import run, run_json

pytestmark = pytest.mark.slow


def cloud_inventory(env: dict[str, str], site: str) -> dict[str, list]:
    testbed = Path(env["LABCTL_TESTBED_DIR"])
    if site == "sim-aws":
        from labctl.testbed.aws import AwsWorld

        return AwsWorld(testbed / "aws").inventory("us-east-1")
    from labctl.testbed.gce.world import GceWorld

    return GceWorld(testbed).inventory()


def owned(inventory: dict[str, list], deployment: str) -> dict[str, list]:
    def mine(item: dict) -> bool:
        return deployment in str(item)

    return {kind: [i for i in items if mine(i)] for kind, items in inventory.items() if any(mine(i) for i in items)}


@pytest.mark.parametrize("site", ["sim-aws", "sim-gcp"])
@pytest.mark.parametrize(("lab", "node", "node_type"), [("hello", "node-1", None), ("gpu-a100", "gpu-1", None)])
def test_up_status_ssh_down_on_commercial_clouds(labctl_env, site, lab, node, node_type):
    run(labctl_env, "up", lab, "--site", site, timeout=300)
    st = run_json(labctl_env, "status", lab)
    assert st["status"] == "up" and st["site"].startswith(f"sim:{site[4:]}:")
    (n,) = [x for x in st["nodes"] if x["name"] == node]
    expected = {("sim-aws", "hello"): "t3.small", ("sim-aws", "gpu-a100"): "p4d.24xlarge",
                ("sim-gcp", "hello"): "e2-small", ("sim-gcp", "gpu-a100"): "a2-highgpu-1g"}[(site, lab)]
    assert n["node_type"] == expected
    assert n["floating_ip"].startswith("127.") and n["setup"].startswith("done")

    inv = owned(cloud_inventory(labctl_env, site), st["deployment"])
    servers = inv.get("instances", [])
    assert len(servers) == 1

    out = run(labctl_env, "ssh", lab, node, "--", "echo", "$LABCTL_NODE", "$USER")
    assert out.stdout.split()[1] == ("ubuntu" if site == "sim-aws" else "labctl")

    run(labctl_env, "down", lab, timeout=300)
    assert owned(cloud_inventory(labctl_env, site), st["deployment"]) == {}


def fill(env: dict[str, str], cloud: str, zones: list[str], instance_type: str) -> None:
    testbed = Path(env["LABCTL_TESTBED_DIR"])
    if cloud == "aws":
        from labctl.testbed.aws import AwsWorld

        w = AwsWorld(testbed / "aws")
    else:
        from labctl.testbed.gce.world import GceWorld

        w = GceWorld(testbed)
    for zone in zones:
        w.set_capacity(zone, instance_type, 0)


@pytest.mark.parametrize(
    ("site", "cloud", "gpu_type", "zones"),
    [
        ("sim:aws:us-east-1", "aws", "p4d.24xlarge",
         ["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d", "us-east-1e", "us-east-1f"]),
        ("sim:gcp:us-central1", "gcp", "a2-highgpu-1g",
         ["us-central1-a", "us-central1-b", "us-central1-c", "us-central1-f"]),
    ],
)
def test_full_zone_moves_on_and_none_left_is_one_line(labctl_env, site, cloud, gpu_type, zones):
    fill(labctl_env, cloud, zones[:1], gpu_type)
    up = run(labctl_env, "up", "gpu-a100", "--site", site, timeout=300)
    st = run_json(labctl_env, "status", "gpu-a100")
    assert st["status"] == "up"
    said = up.stdout + up.stderr
    assert zones[0] in said  # it says which zone was full
    run(labctl_env, "down", "gpu-a100", timeout=300)

    fill(labctl_env, cloud, zones, gpu_type)
    fallback = {"aws": "g5.xlarge", "gcp": "g2-standard-4"}[cloud]  # the profile's A10G/L4 fallback type
    moved = run(labctl_env, "up", "gpu-a100", "--site", site, timeout=300)
    assert run_json(labctl_env, "status", "gpu-a100")["nodes"][0]["node_type"] == fallback
    assert gpu_type in moved.stdout + moved.stderr and fallback in moved.stdout + moved.stderr
    run(labctl_env, "down", "gpu-a100", timeout=300)

    fill(labctl_env, cloud, zones, fallback)
    failed = run(labctl_env, "up", "gpu-a100", "--site", site, check=False, timeout=300)
    assert failed.returncode == 1
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "capacity" in errors[0].lower(), failed.stderr
    assert "Traceback" not in failed.stderr
    assert owned(cloud_inventory(labctl_env, "sim-aws" if cloud == "aws" else "sim-gcp"), st["deployment"]) == {}
