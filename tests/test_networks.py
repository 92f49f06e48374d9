"""Private networks: the profile model's checks and the plan's network/subnet/router resources."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests import profile_text

from labctl import sites
from labctl.errors import ProfileError
from labctl.plan import KIND_ORDER, build_plan
from labctl.profile import find_profile, load_profile
from labctl.site_fit import validate_for_site

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
    floating_ip: true
    types: {kvm@tacc: [m1.medium]}
    networks: [{network: cluster, first_ip: 11}]
"""


def _load(tmp_path: Path, text: str = PROFILE, **replace: str):
    return profile_text.load(tmp_path, text, "net", **replace)


def _error(tmp_path: Path, **replace: str) -> str:
    return profile_text.error(tmp_path, PROFILE, "net", **replace)


def test_fixed_addresses_count_up_from_first_ip(tmp_path):
    p = _load(tmp_path)
    assert p.fixed_ips() == {("node-1", "cluster"): "192.168.1.11", ("node-2", "cluster"): "192.168.1.12",
                             ("node-3", "cluster"): "192.168.1.13"}


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        ({"networks: [{network: cluster,": "networks: [{network: clustr,"},
         "nodes.node.networks[0].network: unknown network 'clustr' (networks: cluster) (did you mean 'cluster'?)"),
        ({"networks: [{network: cluster, first_ip: 11}]": "networks: [clustr]"},
         "nodes.node.networks[0]: unknown network 'clustr' (networks: cluster) (did you mean 'cluster'?)"),
        ({"first_ip: 11": "first_ip: 253"},
         "nodes.node.networks[0].first_ip: node-3 would get host 255, outside cluster (192.168.1.0/24, "
         "hosts 2..254)"),
        ({"first_ip: 11": "first_ip: 1"},
         "nodes.node.networks[0].first_ip: node-1 would get 192.168.1.1, the gateway address of cluster"),
        ({"first_ip: 11": "first_ip: 0"},
         "nodes.node.networks[0].first_ip: node-1 would get 192.168.1.0, the network address of cluster"),
        ({"cidr: 192.168.1.0/24": "cidr: 192.168.1.5/24"},
         "networks.cluster.cidr: '192.168.1.5/24' has host bits set (did you mean 192.168.1.0/24?)"),
        ({"cidr: 192.168.1.0/24": "cidr: 8.8.8.0/24"},
         "networks.cluster.cidr: '8.8.8.0/24' is not a private range (use 10.0.0.0/8, 172.16.0.0/12 or "
         "192.168.0.0/16)"),
        ({"port_security: false}": "port_security: false, mtu: 9000}"},
         "networks.cluster.mtu: unknown field (known fields: cidr, gateway, port_security)"),
        ({"  cluster: {": "  Cluster_Net: {"},
         "networks.Cluster_Net: network names are lower-case letters, digits and '-', start with a letter, at "
         "most 16 characters"),
    ],
)
def test_bad_networks_fail_with_one_line_naming_the_field(tmp_path, replace, expected):
    assert _error(tmp_path, **replace) == expected


def test_two_roles_on_the_same_address(tmp_path):
    text = PROFILE + """\
  extra:
    types: {kvm@tacc: [m1.small]}
    networks: [{network: cluster, first_ip: 13}]
"""
    with pytest.raises(ProfileError) as exc:
        _load(tmp_path, text)
    assert str(exc.value).endswith(
        "nodes.extra.networks[0].first_ip: extra-1 would get 192.168.1.13 on cluster, already node-3's")


def test_networks_on_aws_and_gcp_one_per_deployment(tmp_path):
    p = _load(tmp_path, PROFILE.replace("sites: [kvm@tacc]", "sites: [kvm@tacc, aws, gcp]").replace(
        "types: {kvm@tacc: [m1.medium]}", "types: {kvm@tacc: [m1.medium], aws: [t3.medium], gcp: [e2-medium]}"))
    for site in ("kvm@tacc", "aws", "aws:us-east-1a", "gcp", "gcp:us-central1"):
        assert validate_for_site(p, sites.resolve(site)) == [], site
    two = _load(tmp_path, PROFILE.replace("sites: [kvm@tacc]", "sites: [kvm@tacc, aws]").replace(
        "types: {kvm@tacc: [m1.medium]}", "types: {kvm@tacc: [m1.medium], aws: [t3.medium]}").replace(
        "networks:\n", "networks:\n  storage: {cidr: 10.9.0.0/24}\n", 1))
    assert validate_for_site(two, sites.resolve("kvm@tacc")) == []
    assert validate_for_site(two, sites.resolve("aws")) == [
        "networks: aws:us-east-1 gives a deployment one private network, but this profile declares 2 "
        "(storage, cluster)"]
    wide = _load(tmp_path, PROFILE.replace("sites: [kvm@tacc]", "sites: [aws]").replace(
        "types: {kvm@tacc: [m1.medium]}", "types: {aws: [t3.medium]}").replace("192.168.1.0/24", "10.0.0.0/12"))
    assert validate_for_site(wide, sites.resolve("aws")) == ["networks.cluster.cidr: an AWS subnet is /16 to /28, "
                                                             "not /12"]


def test_plan_kinds_dependencies_and_teardown_order():
    p = load_profile(find_profile("k8s-cluster"))
    plan = build_plan(p, sites.resolve("sim", p), "alice", "ssh-ed25519 AAAA x")
    dep = plan.deployment
    net, subnet = plan.get("network:cluster"), plan.get("subnet:cluster")
    assert (net.name, subnet.name) == (f"{dep}-cluster", f"{dep}-cluster-subnet")
    assert net.spec == {"network": "cluster", "port_security": False}
    assert subnet.depends_on == ("network:cluster",)
    assert subnet.spec["gateway_ip"] is None  # gateway: false
    assert subnet.spec["allocation_pools"] == [{"start": "192.168.1.2", "end": "192.168.1.10"},
                                               {"start": "192.168.1.14", "end": "192.168.1.254"}]
    assert plan.by_kind("router") == []
    for i in (1, 2, 3):
        server = plan.get(f"server:node-{i}")
        assert {"network:cluster", "subnet:cluster", "reservation:node", "keypair"} <= set(server.depends_on)
        assert server.spec["networks"] == [{
            "network": "network:cluster", "subnet": "subnet:cluster", "fixed_ip": f"192.168.1.1{i}",
            "port_security": False, "port_name": f"{dep}-node-{i}-cluster"}]
    levels = [[r.kind for r in level] for level in plan.levels()]
    first = {kind: min(i for i, lv in enumerate(levels) if kind in lv) for lv in levels for kind in lv}
    assert first["network"] < first["subnet"] < first["server"] < first["floating_ip"]
    teardown = list(reversed(KIND_ORDER))
    assert teardown.index("server") < teardown.index("port") < teardown.index("router") \
        < teardown.index("subnet") < teardown.index("network")


def test_plan_router_only_with_gateway(tmp_path):
    p = _load(tmp_path, PROFILE.replace("port_security: false}", "port_security: false, gateway: true}"))
    plan = build_plan(p, sites.resolve("sim", p), "alice", "ssh-ed25519 AAAA x")
    router = plan.get("router:cluster")
    assert router.depends_on == ("subnet:cluster",)
    assert router.spec == {"subnet": "subnet:cluster", "external_network": "public"}
    assert plan.get("subnet:cluster").spec["gateway_ip"] == "192.168.1.1"
    assert "router:cluster" not in plan.get("server:node-1").depends_on  # nodes need not wait for it


def test_fixed_addresses_the_cloud_keeps(tmp_path):
    text = PROFILE.replace("sites: [kvm@tacc]", "sites: [kvm@tacc, aws, gcp]").replace(
        "types: {kvm@tacc: [m1.medium]}", "types: {kvm@tacc: [m1.medium], aws: [t3.medium], gcp: [e2-medium]}")
    low = _load(tmp_path, text.replace("first_ip: 11", "first_ip: 2"))
    assert validate_for_site(low, sites.resolve("kvm@tacc")) == []
    assert validate_for_site(low, sites.resolve("aws")) == [
        "networks.cluster: node-1 would get 192.168.1.2, which AWS keeps for itself in 192.168.1.0/24 (its first 4 "
        "and last 1 addresses); start first_ip at 4 or more"]
    assert validate_for_site(low, sites.resolve("gcp")) == []  # .2-.4: GCP keeps .0 and .1
    high = _load(tmp_path, text.replace("first_ip: 11", "first_ip: 252"))  # .252-.254
    assert validate_for_site(high, sites.resolve("aws")) == []
    assert validate_for_site(high, sites.resolve("gcp"))[0].startswith(
        "networks.cluster: node-3 would get 192.168.1.254, which GCP keeps")

