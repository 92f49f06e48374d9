"""End to end on the emulated Compute Engine (sim-gcp): the three-node k8s-cluster lab on a private VPC network,
and a data lab whose persistent disk is kept across down/up. The real CLI runs against the emulator (in its own
processes); the checks read the emulator's own inventory."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from tests.e2e.helpers import REPO, labctl_leftovers, run, run_json

pytestmark = pytest.mark.slow
SITE = "sim-gcp"


def world(env: dict[str, str]):
    from labctl.testbed.gce.world import GceWorld

    return GceWorld(Path(env["LABCTL_TESTBED_DIR"]))


def owned(inv: dict[str, list], deployment: str) -> dict[str, list]:
    """The deployment's items by kind (instances, firewalls, addresses, networks, subnetworks, disks)."""
    def mine(item: dict) -> bool:
        return deployment in str(item)

    return {kind: [i for i in items if mine(i)] for kind, items in inv.items() if any(mine(i) for i in items)}


def test_k8s_cluster_on_a_private_vpc_network(labctl_env):
    run(labctl_env, "up", "k8s-cluster", "--site", SITE, timeout=300)
    status = run_json(labctl_env, "status", "k8s-cluster")
    deployment = status["deployment"]
    w = world(labctl_env)
    mine = owned(w.inventory(), deployment)

    (net,) = mine["networks"]
    assert net["name"].endswith("-cluster") and net["auto_create_subnetworks"] is False
    (sub,) = mine["subnetworks"]
    assert net["subnetworks"] == [sub["name"]] and sub["network"] == net["name"]
    assert sub["ip_cidr_range"] == "192.168.1.0/24" and sub["gateway_address"] == "192.168.1.1"
    instances = sorted(mine["instances"], key=lambda i: i["name"])
    assert [i["name"].rsplit("-", 2)[-2:] for i in instances] == [["node", "1"], ["node", "2"], ["node", "3"]]
    assert [i["status"] for i in instances] == ["RUNNING"] * 3
    assert [i["internal_ip"] for i in instances] == ["192.168.1.11", "192.168.1.12", "192.168.1.13"]
    assert {(i["network"], i["subnetwork"]) for i in instances} == {(net["name"], sub["name"])}
    # Firewalls on the deployment's network: the profile's ports, and the cluster network open inside itself.
    assert {f["network"] for f in mine["firewalls"]} == {net["name"]}
    assert any(f["allowed"] == [{"IPProtocol": "all"}] and f["source_ranges"] == ["192.168.1.0/24"]
               for f in mine["firewalls"])
    (addr,) = mine["addresses"]  # one static address: node-1's (floating_ip: first)
    assert addr["status"] == "IN_USE" and [u.rsplit("/", 1)[-1] for u in addr["users"]] == [instances[0]["name"]]
    assert addr["address"] == instances[0]["external_ip"]

    nodes = {n["name"]: n for n in status["nodes"]}
    assert nodes["node-1"]["floating_ip"] == addr["address"]
    assert nodes["node-2"]["floating_ip"] is None and nodes["node-3"]["floating_ip"] is None
    assert all(n["setup"].startswith("done") for n in nodes.values()), nodes
    assert [nodes[f"node-{k}"]["fixed_ip"] for k in (1, 2, 3)] == ["192.168.1.11", "192.168.1.12", "192.168.1.13"]

    # Setup ran on every node in phase order; node-2 and node-3 are read through node-1 (ProxyCommand hop).
    for k in (1, 2, 3):
        lines = run(labctl_env, "ssh", "k8s-cluster", f"node-{k}", "--", "cat", "setup-order.txt").stdout
        name = instances[k - 1]["name"]
        expected = [f"prepare {name}", f"bootstrapped-before {name}"] + ([f"join {name}"] if k > 1 else [])
        assert [line for line in lines.splitlines() if line] == expected
    assert "192.168.1.13 node-3" in run(labctl_env, "ssh", "k8s-cluster", "node-3", "--", "cat",
                                        "cluster-hosts").stdout
    (known,) = (Path(labctl_env["LABCTL_STATE_DIR"]) / "known_hosts").iterdir()
    lines = known.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"[{addr['address']}]:")
    assert lines[1].startswith("192.168.1.13 ssh-ed25519 ")

    run(labctl_env, "down", "k8s-cluster", timeout=300)
    assert owned(w.inventory(), deployment) == {}
    assert labctl_leftovers(w) == {}


def _data_lab_copy(tmp_path: Path) -> Path:
    """data-persist for GCP: `sites: [gcp]`, an e2-standard-2 node, no object store (labctl makes no Cloud Storage
    buckets), as a profile file of its own next to a copy of the lab's files."""
    root = tmp_path / "work"
    (root / "profiles").mkdir(parents=True)
    shutil.copytree(REPO / "labs" / "data-persist", root / "labs" / "data-persist")
    text = (REPO / "profiles" / "data-persist.yaml").read_text()
    assert "object_stores:" in text
    text = re.sub(r"(?m)^sites: \[[^\]]*\].*$", "sites: [gcp]", text)
    text = text.replace("kvm@tacc: [m1.large]   # flavor reservation", "gcp: [e2-standard-2]")
    text = re.sub(r"\nobject_stores:\n(?:  .*\n)+", "\n", text)
    assert "object_stores" not in text and "gcp: [e2-standard-2]" in text
    path = root / "profiles" / "data-persist.yaml"
    path.write_text(text)
    return path


def test_data_lab_disk_kept_across_down_and_up(labctl_env, tmp_path):
    path = str(_data_lab_copy(tmp_path))
    run(labctl_env, "up", path, "--site", SITE, timeout=300)
    deployment = run_json(labctl_env, "status", "data-persist")["deployment"]
    w = world(labctl_env)
    mine = owned(w.inventory(), deployment)
    (inst,) = mine["instances"]
    (disk,) = mine["disks"]
    assert disk["name"].endswith("-data-persist-block") and disk["status"] == "READY"
    assert disk["size_gb"] == 10 and disk["type"] == "pd-balanced"  # 2 GB asked; 10 GB is the smallest PD
    assert disk["labels"]["labctl-keep"] == "true" and disk["labels"]["labctl-deployment"] == deployment
    assert disk["users"] == [inst["name"]] and inst["attached_disks"] == {disk["name"]: disk["name"]}
    assert "data-persist ready" in run(labctl_env, "ssh", "data-persist", "--", "cat",
                                       "data-persist-ready.txt").stdout

    down = run(labctl_env, "down", "data-persist", timeout=300)
    assert "kept volume" in down.stdout and "--delete-volumes" in down.stdout
    left = owned(w.inventory(), deployment)
    assert list(left) == ["disks"]  # nothing else: no instance, firewall, address
    (kept,) = left["disks"]
    assert kept["id"] == disk["id"] and kept["status"] == "READY" and kept["users"] == []

    run(labctl_env, "up", path, "--site", SITE, timeout=300)
    mine = owned(w.inventory(), deployment)
    (inst2,) = mine["instances"]
    (disk2,) = mine["disks"]  # the same disk, reattached; never a second one
    assert inst2["id"] != inst["id"]
    assert disk2["id"] == disk["id"] and disk2["users"] == [inst2["name"]]
    assert inst2["attached_disks"] == {disk["name"]: disk["name"]}

    down = run(labctl_env, "down", "data-persist", "--delete-volumes", timeout=300)
    assert "kept" not in down.stdout
    assert owned(w.inventory(), deployment) == {}
    assert labctl_leftovers(w) == {}
    assert "data-persist" not in run(labctl_env, "status").stdout
