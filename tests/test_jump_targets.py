"""`floating_ip: first` and the SSH targets labctl builds: direct, through a jump host, or unreachable."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from tests import profile_text

from labctl import sites
from labctl.errors import ProfileError
from labctl.node_setup import node_targets
from labctl.plan import build_plan
from labctl.profile import find_profile, load_profile

PROFILE = """\
name: net
sites: [kvm@tacc]
lease_hours: 2
image: ubuntu-24.04
networks:
  cluster: {cidr: 192.168.1.0/24, port_security: false}
nodes:
  node:
    count: 3
    floating_ip: first
    types: {kvm@tacc: [m1.medium]}
    networks: [{network: cluster, first_ip: 11}]
outputs:
  - {name: web, value: "http://{node-1.floating_ip}:80"}
"""


def _load(tmp_path: Path, text: str):
    return profile_text.load(tmp_path, text, "net")


def test_floating_ip_first_only_the_roles_first_node(tmp_path):
    p = _load(tmp_path, PROFILE)
    plan = build_plan(p, sites.resolve("kvm@tacc"), "alice", "ssh-ed25519 AAAA x")
    assert [r.key for r in plan.resources if r.kind == "floating_ip"] == ["floating_ip:node-1"]
    assert [n.floating_ip for n in plan.nodes] == [True, False, False]
    for value, count in (("true", 3), ("false", 0)):
        p = _load(tmp_path, PROFILE.replace("floating_ip: first", f"floating_ip: {value}").replace(
            "outputs:\n  - {name: web, value: \"http://{node-1.floating_ip}:80\"}\n", ""))
        plan = build_plan(p, sites.resolve("kvm@tacc"), "alice", "ssh-ed25519 AAAA x")
        assert len([r for r in plan.resources if r.kind == "floating_ip"]) == count
    with pytest.raises(ProfileError, match="node-2 has no floating IP"):
        _load(tmp_path, PROFILE.replace("{node-1.floating_ip}", "{node-2.floating_ip}"))
    with pytest.raises(ProfileError, match="floating_ip"):
        _load(tmp_path, PROFILE.replace("floating_ip: first", "floating_ip: last"))


def test_shipped_k8s_cluster_gives_node_1_alone_a_floating_ip():
    p = load_profile(find_profile("k8s-cluster"))
    plan = build_plan(p, sites.resolve("kvm@tacc"), "alice", "ssh-ed25519 AAAA x")
    assert [r.key for r in plan.resources if r.kind == "floating_ip"] == ["floating_ip:node-1"]


SITE = SimpleNamespace(ssh_port=2222, ssh_user="cc")
NODES = [("node-1", "node"), ("node-2", "node"), ("node-3", "node"), ("db-1", "db")]


def test_targets_direct_via_jump_host_or_unreachable():
    resources = {
        "floating_ip:node-1": {"floating_ip": "127.10.1.5"},
        "server:node-1": {"fixed_ip": "10.0.0.1", "private_ips": {"lab-cluster": "192.168.1.11"}},
        "server:node-2": {"fixed_ip": "10.0.0.2", "private_ips": {"lab-cluster": "192.168.1.12"}},
        "server:node-3": {"fixed_ip": "10.0.0.3", "private_ips": {"lab-other": "192.168.2.13"}},
        "server:db-1": {"fixed_ip": "10.0.0.4"},
    }
    targets, unreachable = node_targets(SITE, NODES, resources)
    assert [(t.name, t.host, t.port, t.via.name if t.via else None) for t in targets] == [
        ("node-1", "127.10.1.5", 2222, None), ("node-2", "192.168.1.12", 22, "node-1")]
    assert targets[1].via is targets[0]
    assert set(unreachable) == {"node-3", "db-1"}
    assert "shares no private network" in unreachable["node-3"]
    # No node with a floating IP at all.
    del resources["floating_ip:node-1"]
    targets, unreachable = node_targets(SITE, NODES, resources)
    assert targets == [] and set(unreachable) == {n for n, _ in NODES}
