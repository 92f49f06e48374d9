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
