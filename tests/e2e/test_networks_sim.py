"""End to end on the emulated Chameleon: private networks, subnets, routers and fixed-IP ports (k8s-cluster).

The real CLI runs against the emulator; the checks read the emulator's own inventory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.e2e.helpers import REPO, kill_when, labctl_leftovers, run, run_json, start

pytestmark = pytest.mark.slow
SITE = "kvm@tacc"


def world(env: dict[str, str]):
    from labctl.testbed.world import World

    return World(Path(env["LABCTL_TESTBED_DIR"]))


def network_kinds_empty(w) -> None:
    inv = w.inventory(SITE)
    assert {k: inv.get(k, []) for k in ("networks", "subnets", "routers", "ports")} == {
        "networks": [], "subnets": [], "routers": [], "ports": []}


def cluster_ports(w) -> dict[str, dict]:
    """Server name -> its port on the cluster network, from the emulator's view."""
    inv = w.inventory(SITE)
    (net,) = [n for n in inv["networks"] if n["name"].endswith("-cluster")]
    ports = [p for p in inv["ports"] if p["network_id"] == net["id"] and p["device_owner"] == "compute:nova"]
    names = {s["id"]: s["name"] for s in inv["servers"]}
    return {names[p["device_id"]]: p for p in ports}


def test_k8s_cluster_up_order_down(labctl_env):
    run(labctl_env, "up", "k8s-cluster", "--site", "sim", timeout=300)
    w = world(labctl_env)
    inv = w.inventory(SITE)
    servers = sorted((s for s in inv["servers"] if s["name"].startswith("labctl-")), key=lambda s: s["name"])
    assert [s["name"].rsplit("-", 2)[-2:] for s in servers] == [["node", "1"], ["node", "2"], ["node", "3"]]
    (net,) = inv["networks"]
    assert net["name"].endswith("-cluster") and net["port_security_enabled"] is False
    (subnet,) = inv["subnets"]
    assert subnet["cidr"] == "192.168.1.0/24" and subnet["network_id"] == net["id"]
    assert subnet["gateway_ip"] is None  # gateway: false, as in the course labs
    assert inv.get("routers", []) == []
    by_server = cluster_ports(w)
    for i, s in enumerate(servers, start=1):
        port = by_server[s["name"]]
        assert port["fixed_ip"] == f"192.168.1.{10 + i}"
        assert port["subnet_id"] == subnet["id"] and port["port_security_enabled"] is False
        # The shared network is the first NIC and carries the floating IP; the cluster net the second.
        assert list(s["addresses"]) == ["sharednet1", net["name"]]
        assert s["addresses"][net["name"]] == [
            {"version": 4, "addr": f"192.168.1.{10 + i}", "OS-EXT-IPS:type": "fixed",
             "OS-EXT-IPS-MAC:mac_addr": s["addresses"][net["name"]][0]["OS-EXT-IPS-MAC:mac_addr"]}]
        # Only node-1 has a floating IP (`floating_ip: first`), as in the course labs.
        floating = [a for a in s["addresses"]["sharednet1"] if a["OS-EXT-IPS:type"] == "floating"]
        assert len(floating) == (1 if i == 1 else 0), (s["name"], floating)
    assert len(inv["floating_ips"]) == 1
    status = run_json(labctl_env, "status", "k8s-cluster", "--json")
    nodes = {n["name"]: n for n in status["nodes"]}
    assert nodes["node-1"]["floating_ip"].startswith("127.10.")
    assert nodes["node-2"]["floating_ip"] is None and nodes["node-3"]["floating_ip"] is None
    assert all(n["setup"].startswith("done") for n in nodes.values()), nodes
    # node-1's listener is the only public one; the others answer only through it.
    fips = {t["address"] for t in w.ssh_targets() if t["address"]}
    assert fips == {nodes["node-1"]["floating_ip"]}

    # Setup ran on every node, in phase order; node-2 and node-3 are read through node-1 (ProxyCommand).
    for k in (1, 2, 3):
        order = run(labctl_env, "ssh", "k8s-cluster", f"node-{k}", "--", "cat", "setup-order.txt").stdout.split("\n")
        name = servers[k - 1]["name"]
        expected = [f"prepare {name}", f"bootstrapped-before {name}"] + ([f"join {name}"] if k > 1 else [])
        assert [line for line in order if line] == expected
    hosts = run(labctl_env, "ssh", "k8s-cluster", "node-3", "--", "cat", "cluster-hosts").stdout
    assert "192.168.1.13 node-3" in hosts
    # `labctl ssh` checked both hops against labctl's pinned keys: node-3 under its private address.
    (known,) = (Path(labctl_env["LABCTL_STATE_DIR"]) / "known_hosts").iterdir()
    lines = known.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"[{nodes['node-1']['floating_ip']}]:")
    assert lines[1].startswith("192.168.1.13 ssh-ed25519 ")

    run(labctl_env, "down", "k8s-cluster")
    assert labctl_leftovers(w) == {}
    network_kinds_empty(w)


def _gateway_copy(tmp_path: Path) -> Path:
    """k8s-cluster with `gateway: true` (a router to the public network), as a profile file of its own."""
    root = tmp_path / "work"
    (root / "profiles").mkdir(parents=True)
    shutil.copytree(REPO / "labs" / "k8s-cluster", root / "labs" / "k8s-cluster")
    text = (REPO / "profiles" / "k8s-cluster.yaml").read_text()
    assert "gateway: false" in text
    path = root / "profiles" / "k8s-cluster.yaml"
    path.write_text(text.replace("gateway: false", "gateway: true"))
    return path


def test_sigkill_after_port_create_then_resume_with_router(labctl_env, tmp_path):
    path = str(_gateway_copy(tmp_path))
    w = world(labctl_env)
    # Every node's port create commits, then hangs: no server can be launched on one before the kill.
    w.inject_fault(SITE, "POST /v2.0/ports", "hang_after", count=3)
    proc = start(labctl_env, "up", path, "--site", "sim")
    # Kill once a port exists (requests are logged before they are handled; `hang_after` commits, then hangs).
    kill_when(proc, lambda: any(p["device_owner"] != "network:router_interface"
                                for p in w.inventory(SITE).get("ports", [])))
    w.clear_faults()
    # The ports the killed run made (one per node whose launch got that far), none on a server yet.
    orphans = [p for p in w.inventory(SITE)["ports"] if p["device_owner"] != "network:router_interface"]
    assert orphans and all(p["device_id"] == "" for p in orphans)

    run(labctl_env, "up", path, "--site", "sim", timeout=300)
    inv = w.inventory(SITE)
    assert len([s for s in inv["servers"] if s["name"].startswith("labctl-")]) == 3
    by_server = cluster_ports(w)
    assert sorted(p["fixed_ip"] for p in by_server.values()) == ["192.168.1.11", "192.168.1.12", "192.168.1.13"]
    assert {p["id"] for p in orphans} <= {p["id"] for p in by_server.values()}  # reused, not made twice
    user_ports = [p for p in inv["ports"] if p["device_owner"] != "network:router_interface"]
    assert len(user_ports) == 3  # one port per node, none left over
    (router,) = inv["routers"]
    (subnet,) = inv["subnets"]
    assert subnet["gateway_ip"] == "192.168.1.1"
    assert router["external_network_id"] and router["interfaces"] == [
        {"port_id": router["interfaces"][0]["port_id"], "subnet_id": subnet["id"], "ip_address": "192.168.1.1"}]

    run(labctl_env, "down", "k8s-cluster")
    assert labctl_leftovers(w) == {}
    network_kinds_empty(w)
