"""End to end on the emulated AWS (boto3 against moto behind labctl's thin layer): the three-node k8s-cluster on a
VPC of its own (fixed private IPs, one Elastic IP, the others reached through it), and data-persist's EBS volume
and S3 bucket kept across down/up. The real CLI runs; the checks read moto's view through boto3."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from tests.e2e.helpers import REPO, run, run_json

pytestmark = pytest.mark.slow
SITE = "sim-aws"
REGION = "us-east-1"


def world(env: dict[str, str]):
    from labctl.testbed.aws import AwsWorld

    return AwsWorld(Path(env["LABCTL_TESTBED_DIR"]) / "aws")


def ec2(env: dict[str, str]):
    """boto3 EC2 straight to the emulator's moto (what exists, with moto's own addresses)."""
    return world(env).client(REGION)


def tagged(env: dict[str, str], deployment: str) -> dict[str, list]:
    """Everything labctl-tagged of `deployment` in moto: instances (not terminated), VPCs, subnets, internet
    gateways, security groups, Elastic IPs, key pairs, data volumes, buckets (kinds with nothing left out)."""
    w = world(env)
    flt = [{"Name": "tag:labctl:deployment", "Values": [deployment]}]
    cli = ec2(env)
    out = {
        "instances": [i for r in cli.describe_instances(Filters=[*flt, {"Name": "instance-state-name", "Values": [
            "pending", "running", "stopping", "stopped", "shutting-down"]}])["Reservations"] for i in r["Instances"]],
        "vpcs": cli.describe_vpcs(Filters=flt)["Vpcs"],
        "subnets": cli.describe_subnets(Filters=flt)["Subnets"],
        "internet_gateways": cli.describe_internet_gateways(Filters=flt)["InternetGateways"],
        "security_groups": cli.describe_security_groups(Filters=flt)["SecurityGroups"],
        "addresses": cli.describe_addresses(Filters=flt)["Addresses"],
        "key_pairs": cli.describe_key_pairs(Filters=flt)["KeyPairs"],
        "volumes": cli.describe_volumes(Filters=[*flt, {"Name": "tag-key", "Values": ["labctl:volume"]}])["Volumes"],
        "buckets": [b for b in w.inventory(REGION).get("buckets", []) if b["tags"].get("labctl:deployment")
                    == deployment],
    }
    return {kind: items for kind, items in out.items() if items}


def test_k8s_cluster_on_aws_vpc_fixed_ips_jump_and_down(labctl_env):
    run(labctl_env, "up", "k8s-cluster", "--site", SITE, timeout=300)
    status = run_json(labctl_env, "status", "k8s-cluster")
    deployment = status["deployment"]
    have = tagged(labctl_env, deployment)
    (vpc,) = have["vpcs"]
    (subnet,) = have["subnets"]
    assert subnet["CidrBlock"] == "192.168.1.0/24" and subnet["VpcId"] == vpc["VpcId"]
    (igw,) = have["internet_gateways"]
    assert [a["VpcId"] for a in igw["Attachments"]] == [vpc["VpcId"]]
    (sg,) = have["security_groups"]
    assert sg["VpcId"] == vpc["VpcId"]
    instances = {next(t["Value"] for t in i["Tags"] if t["Key"] == "labctl:node"): i for i in have["instances"]}
    assert sorted(instances) == ["node-1", "node-2", "node-3"]
    for k in (1, 2, 3):
        inst = instances[f"node-{k}"]
        assert inst["State"]["Name"] == "running" and inst["InstanceType"] == "t3.medium"
        assert inst["PrivateIpAddress"] == f"192.168.1.1{k}" and inst["SubnetId"] == subnet["SubnetId"]
        assert inst.get("PublicIpAddress")  # every node reaches out (Chameleon's shared network)
    (eip,) = have["addresses"]
    assert eip["InstanceId"] == instances["node-1"]["InstanceId"]

    nodes = {n["name"]: n for n in status["nodes"]}
    assert nodes["node-1"]["floating_ip"].startswith("127.20.")
    assert nodes["node-2"]["floating_ip"] is None and nodes["node-3"]["floating_ip"] is None
    assert [nodes[f"node-{k}"]["fixed_ip"] for k in (1, 2, 3)] == ["192.168.1.11", "192.168.1.12", "192.168.1.13"]
    assert all(n["setup"].startswith("done") for n in nodes.values()), nodes

    # Setup ran on every node in phase order; node-2 and node-3 are read through node-1 (the ProxyCommand hop).
    names = {f"node-{k}": next(t["Value"] for t in instances[f"node-{k}"]["Tags"] if t["Key"] == "Name")
             for k in (1, 2, 3)}
    for k in (1, 2, 3):
        order = run(labctl_env, "ssh", "k8s-cluster", f"node-{k}", "--", "cat", "setup-order.txt").stdout
        name = names[f"node-{k}"]
        expected = [f"prepare {name}", f"bootstrapped-before {name}"] + ([f"join {name}"] if k > 1 else [])
        assert [line for line in order.splitlines() if line] == expected
    (known,) = (Path(labctl_env["LABCTL_STATE_DIR"]) / "known_hosts").iterdir()
    lines = known.read_text().splitlines()
    assert lines[0].startswith(f"[{nodes['node-1']['floating_ip']}]:")
    assert any(line.startswith("192.168.1.13 ssh-ed25519 ") for line in lines)

    run(labctl_env, "down", "k8s-cluster", timeout=300)
    assert tagged(labctl_env, deployment) == {}


def _data_persist_on_aws(tmp_path: Path) -> Path:
    """data-persist with `aws` among its sites (t3.large), as a profile file of its own next to a copy of the
    lab's files (the shipped profile may list aws already: then it is used as it is)."""
    root = tmp_path / "work"
    (root / "profiles").mkdir(parents=True)
    shutil.copytree(REPO / "labs" / "data-persist", root / "labs" / "data-persist")
    text = (REPO / "profiles" / "data-persist.yaml").read_text()
    if not re.search(r"^sites: \[.*\baws\b", text, re.M):
        text = re.sub(r"^sites: \[(.*)\]", r"sites: [\1, aws]", text, count=1, flags=re.M)
    if not re.search(r"^      aws: ", text, re.M):
        text = text.replace("      kvm@tacc: [m1.large]", "      aws: [t3.large]\n      kvm@tacc: [m1.large]", 1)
    assert "aws: [t3.large]" in text and "object_stores:" in text
    path = root / "profiles" / "data-persist.yaml"
    path.write_text(text)
    return path


def test_data_persist_on_aws_volume_and_bucket_kept_across_down_and_up(labctl_env, tmp_path):
    path = str(_data_persist_on_aws(tmp_path))
    run(labctl_env, "up", path, "--site", SITE, timeout=300)
    status = run_json(labctl_env, "status", "data-persist")
    deployment = status["deployment"]
    assert status["nodes"][0]["node_type"] == "t3.large" and status["nodes"][0]["setup"].startswith("done")
    have = tagged(labctl_env, deployment)
    (inst,) = have["instances"]
    (vol,) = have["volumes"]
    assert vol["State"] == "in-use" and vol["Size"] == 2 and vol["VolumeType"] == "gp3"
    assert vol["AvailabilityZone"] == inst["Placement"]["AvailabilityZone"]
    assert [(a["InstanceId"], a["Device"]) for a in vol["Attachments"]] == [(inst["InstanceId"], "/dev/sdf")]
    (bucket,) = have["buckets"]
    assert bucket["name"].endswith("-data-persist-persist") and bucket["tags"]["labctl:keep"] == "true"
    assert "data-persist ready" in run(labctl_env, "ssh", "data-persist", "--", "cat",
                                       "data-persist-ready.txt").stdout

    down = run(labctl_env, "down", "data-persist", timeout=300)
    assert "kept volume" in down.stdout and "--delete-volumes" in down.stdout
    have = tagged(labctl_env, deployment)
    assert sorted(have) == ["buckets", "volumes"]  # nothing else is left
    (kept,) = have["volumes"]
    assert kept["VolumeId"] == vol["VolumeId"] and kept["State"] == "available" and not kept["Attachments"]
    assert [b["name"] for b in have["buckets"]] == [bucket["name"]]

    run(labctl_env, "up", path, "--site", SITE, timeout=300)
    have = tagged(labctl_env, deployment)
    (inst2,) = have["instances"]
    assert inst2["InstanceId"] != inst["InstanceId"]
    (vol2,) = have["volumes"]  # the same volume, reattached; never a second one
    assert vol2["VolumeId"] == vol["VolumeId"]
    assert [(a["InstanceId"], a["Device"]) for a in vol2["Attachments"]] == [(inst2["InstanceId"], "/dev/sdf")]
    assert [b["name"] for b in have["buckets"]] == [bucket["name"]]

    down = run(labctl_env, "down", "data-persist", "--delete-volumes", timeout=300)
    assert "kept" not in down.stdout
    assert tagged(labctl_env, deployment) == {}
    assert "data-persist" not in run(labctl_env, "status").stdout
