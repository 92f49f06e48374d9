"""The GCP adapter's private networks, firewalls on them, and persistent disks, against the emulated Compute Engine
(real google-cloud-compute clients, real HTTP)."""

from __future__ import annotations

import logging

import pytest
from tests.providers.gcp.test_gcp_provider import provider_for, public_key

from labctl import sites
from labctl.engine import Engine
from labctl.errors import CloudError
from labctl.plan import Plan, Resource, build_plan
from labctl.profile import Profile
from labctl.providers.base import Found
from labctl.state import StateStore

ZONE = "us-central1-a"


@pytest.fixture
def sim_site():
    return sites.resolve("sim-gcp")


@pytest.fixture
def region_site():
    return sites.emulate(sites.resolve("gcp:us-central1"))


def cluster_profile(count: int = 3, gateway: bool = False, floating_ip: str | bool = "first",
                    volume: dict | None = None) -> Profile:
    data = {
        "name": "netlab", "description": "test", "sites": ["gcp"], "lease_hours": 1, "image": "ubuntu-24.04",
        "networks": {"cluster": {"cidr": "192.168.1.0/24", "gateway": gateway, "port_security": False}},
        "nodes": {"node": {"count": count, "floating_ip": floating_ip, "types": {"gcp": ["e2-small"]},
                           "networks": [{"network": "cluster", "first_ip": 11}]}},
        "ports": [22, 8080],
    }
    if volume is not None:
        data["volumes"] = {"block": {"size_gb": 2, "node": "node-1", "mount": "/mnt/block", **volume}}
    return Profile.model_validate(data)


def volume_profile(keep: bool = True) -> Profile:
    return Profile.model_validate({
        "name": "vollab", "description": "test", "sites": ["gcp"], "lease_hours": 1, "image": "ubuntu-24.04",
        "nodes": {"node": {"count": 1, "floating_ip": True, "types": {"gcp": ["e2-small"]}}},
        "volumes": {"block": {"size_gb": 2, "node": "node-1", "mount": "/mnt/block", "keep": keep}},
        "ports": [22],
    })


def mine(emu, deployment: str) -> dict[str, list]:
    inv = emu.world.inventory()
    return {kind: [i for i in items if deployment in str(i)] for kind, items in inv.items()
            if any(deployment in str(i) for i in items)}


def posts(emu, operation: str) -> list[dict]:
    return [r for r in emu.world.request_log(detail=True) if r["operation"] == operation]


def teardown_plan(plan: Plan, store: StateStore, provider) -> Plan:
    """What `labctl down` builds: resources from the state records only (no specs)."""
    bare = Plan(plan.deployment, plan.lab, plan.owner, None, provider.site, 0, plan.tags, [])
    for rec in store.resources(plan.deployment):
        bare.resources.append(Resource(rec.key, rec.kind, rec.name, {"node": rec.key.split(":")[-1]}))
    return bare


def test_network_and_subnetwork_survive_lost_answers_with_one_object_each(tmp_path, sim_site, testbed, emu):
    plan = build_plan(cluster_profile(), sim_site, "student1", public_key(tmp_path))
    provider = provider_for(sim_site, testbed)
    net_res, sub_res = plan.get("network:cluster"), plan.get("subnet:cluster")
    assert provider.find(net_res, plan) is None

    emu.world.inject_fault("networks.insert", "timeout_after", 1)  # done and committed, the answer lost
    net = provider.create(net_res, plan, {}, None)
    assert net.status == "ready" and net.cloud_id == f"global/networks/{net_res.name}"
    inserts = posts(emu, "networks.insert")
    assert len(inserts) == 2 and inserts[0]["query"] == inserts[1]["query"] and "requestId=" in inserts[0]["query"]

    emu.world.inject_fault("subnetworks.insert", "hang_after", 1)
    provider.call_timeout = 0.5  # the client gives up on the hung call and sends it again, same requestId
    sub = provider.create(sub_res, plan, {"network:cluster": net}, None)
    provider.call_timeout = 5.0
    assert sub.attrs == {"network": net_res.name, "region": "us-central1", "cidr": "192.168.1.0/24",
                         "gateway_ip": "192.168.1.1"}
    inserts = posts(emu, "subnetworks.insert")
    assert len(inserts) == 2 and inserts[0]["query"] == inserts[1]["query"]

    got = mine(emu, plan.deployment)
    assert [n["name"] for n in got["networks"]] == [net_res.name]
    assert got["networks"][0]["auto_create_subnetworks"] is False
    assert got["networks"][0]["description"] == f"labctl:deployment={plan.deployment} labctl:owner=student1"
    assert [s["name"] for s in got["subnetworks"]] == [sub_res.name]
    # found again by name and description: nothing more is sent
    emu.world.clear_request_log()
    assert provider.find(net_res, plan).cloud_id == net.cloud_id
    assert provider.create(sub_res, plan, {"network:cluster": net}, None).cloud_id == sub.cloud_id
    assert not [r for r in emu.world.request_log() if r[0] in ("POST", "DELETE", "PATCH")]

    # a network of the same name that is not this deployment's is not taken over
    other = build_plan(cluster_profile(), sim_site, "student2", public_key(tmp_path))
    clash = Resource(net_res.key, "network", net_res.name, net_res.spec)
    assert provider.find(clash, other) is None
    with pytest.raises(CloudError, match="not this deployment's"):
        provider.create(clash, other, {}, None)

    owned = {(f.kind, f.name) for f in provider.list_owned(plan)}
    assert owned == {("network", net_res.name), ("subnet", sub_res.name)}
    provider.delete("subnet", [sub], plan)
    provider.delete("network", [net], plan)
    assert "networks" not in emu.world.inventory() and "subnetworks" not in emu.world.inventory()


def test_firewalls_on_the_deployment_network_with_the_open_rule(tmp_path, sim_site, testbed, emu):
    plan = build_plan(cluster_profile(), sim_site, "student1", public_key(tmp_path))
    provider = provider_for(sim_site, testbed)
    net = provider.create(plan.get("network:cluster"), plan, {}, None)
    deps = {"network:cluster": net}
    res = plan.get("secgroup")
    assert res.spec["networks"] == [{"network": "network:cluster", "cidr": "192.168.1.0/24", "open": True}]
    found = provider.create(res, plan, deps, None)
    fws = {f["name"]: f for f in mine(emu, plan.deployment)["firewalls"]}
    assert len(fws) == 2 and {f["network"] for f in fws.values()} == {net.attrs["network"]}
    ports = fws[plan.deployment]
    assert ports["allowed"] == [{"IPProtocol": "tcp", "ports": ["22", "8080"]}]
    assert ports["source_ranges"] == ["0.0.0.0/0"] and ports["target_tags"] == [plan.deployment]
    (open_rule,) = [f for n, f in fws.items() if n != plan.deployment]
    assert open_rule["allowed"] == [{"IPProtocol": "all"}] and open_rule["source_ranges"] == ["192.168.1.0/24"]
    assert open_rule["target_tags"] == [plan.deployment]
    assert sorted(found.attrs["firewalls"]) == sorted(fws)
    assert provider.find(res, plan).status == "ready"

    # the open rule narrowed by hand: incomplete, and repaired
    from google.cloud import compute_v1

    narrowed = compute_v1.Firewall(allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=["22"])])
    op = provider.firewalls.patch_unary(project=provider.project, firewall=open_rule["name"],
                                        firewall_resource=narrowed)
    provider.wait_op(op, "patch")
    assert provider.find(res, plan).status == "incomplete"
    provider.create(res, plan, deps, None)
    assert provider.find(res, plan).status == "ready"

    # the network cannot go while its firewalls are there; teardown order (secgroup, then network) works
    teardown = Found("secgroup", found.cloud_id, res.name)  # as recorded: no attrs
    provider.delete("secgroup", [teardown], plan)
    assert [f["name"] for f in emu.world.inventory()["firewalls"]] == [open_rule["name"]]
    lookup = Resource("secgroup", "secgroup", res.name, {"node": "secgroup"})  # a teardown find (no spec)
    assert provider.find(lookup, plan).attrs["firewalls"] == [open_rule["name"]]
    provider.delete("secgroup", [provider.find(lookup, plan)], plan)
    provider.delete("network", [net], plan)
    assert emu.world.inventory() == {"instances": [], "firewalls": [], "addresses": []}


def test_engine_three_nodes_on_the_private_network(tmp_path, sim_site, testbed, emu):
    plan = build_plan(cluster_profile(gateway=True), sim_site, "student1", public_key(tmp_path))
    provider = provider_for(sim_site, testbed)
    store = StateStore(tmp_path / "state.db")
    engine = Engine(provider, store)
    provider.preflight(plan)
    found = engine.apply(plan)
    net_name = plan.get("network:cluster").name
    for i in (1, 2, 3):
        server = found[f"server:node-{i}"]
        assert server.status == "ready" and server.attrs["fixed_ip"] == f"192.168.1.1{i}"
        assert server.attrs["private_ips"] == {net_name: f"192.168.1.1{i}"}
        assert server.attrs["floating_ip"].startswith("127.30.")  # an ephemeral address for outbound traffic
    router = found["router:cluster"]
    assert router.status == "ready" and router.cloud_id.startswith("implicit/")
    got = mine(emu, plan.deployment)
    assert [i["internal_ip"] for i in sorted(got["instances"], key=lambda i: i["name"])] == [
        "192.168.1.11", "192.168.1.12", "192.168.1.13"]
    assert {i["network"] for i in got["instances"]} == {net_name}
    (addr,) = got["addresses"]
    assert addr["address"] == found["server:node-1"].attrs["floating_ip"] == found["floating_ip:node-1"].attrs[
        "floating_ip"]
    assert [s["gateway_address"] for s in got["subnetworks"]] == ["192.168.1.1"]

    # the service's jump-host logic: node-2 and node-3 through node-1, at their private address
    from labctl.node_setup import node_targets

    targets, unreachable = node_targets(provider.site, [(n.name, n.role) for n in plan.nodes],
                                        {k: f.attrs for k, f in found.items()})
    assert unreachable == {}
    hops = {t.name: (t.host, t.port, t.via.name if t.via else None) for t in targets}
    assert hops["node-2"] == ("192.168.1.12", 22, "node-1") and hops["node-3"] == ("192.168.1.13", 22, "node-1")
    # ... which the SSH side serves: a listener per node reachable through a node of the same network
    by_ip = {next(iter(t["fixed_ips"].values())): t for t in emu.world.ssh_targets()}
    assert set(by_ip) == {"192.168.1.11", "192.168.1.12", "192.168.1.13"}
    assert len({t["internal_address"] for t in by_ip.values()}) == 3

    emu.world.clear_request_log()
    again = engine.apply(plan)  # everything found: nothing sent
    assert again["server:node-3"].cloud_id == found["server:node-3"].cloud_id
    assert not [r for r in emu.world.request_log() if r[0] in ("POST", "DELETE", "PATCH")]

    owned = {f.kind for f in provider.list_owned(plan)}
    assert owned == {"server", "secgroup", "floating_ip", "network", "subnet"}
    assert engine.destroy(teardown_plan(plan, store, provider)) == []
    assert mine(emu, plan.deployment) == {}


def test_down_after_a_crash_finds_networks_by_description(tmp_path, sim_site, testbed, emu):
    """Nothing recorded (the state was lost): destroy removes what list_owned reports, in order."""
    plan = build_plan(cluster_profile(count=2), sim_site, "student1", public_key(tmp_path))
    provider = provider_for(sim_site, testbed)
    Engine(provider, StateStore(tmp_path / "one.db")).apply(plan)
    fresh = StateStore(tmp_path / "other.db")
    bare = Plan(plan.deployment, plan.lab, plan.owner, None, provider.site, 0, plan.tags, [])
    assert Engine(provider, fresh).destroy(bare) == []
    assert mine(emu, plan.deployment) == {}


def test_volume_create_attach_keep_reattach_delete(tmp_path, sim_site, testbed, emu, caplog):
    plan = build_plan(volume_profile(keep=True), sim_site, "student1", public_key(tmp_path))
    provider = provider_for(sim_site, testbed)
    store = StateStore(tmp_path / "state.db")
    engine = Engine(provider, store)
    emu.world.set_time_scale(0.01)  # a disk is CREATING for 50 ms: the engine waits for READY
    with caplog.at_level(logging.INFO, logger="labctl.providers.gcp"):
        found = engine.apply(plan)
    assert "10 GB" in caplog.text  # 2 GB asked; Compute Engine's smallest persistent disk
    vol, att, server = found["volume:block"], found["volume_attachment:block"], found["server:node-1"]
    disk_name = plan.get("volume:block").name
    assert vol.status == "ready" and vol.cloud_id == f"zones/{ZONE}/disks/{disk_name}"
    assert vol.attrs["keep"] is True and vol.attrs["zone"] == ZONE and vol.attrs["size_gb"] == 10
    assert att.attrs["volume_id"] == vol.cloud_id and att.attrs["device_paths"] == [
        f"/dev/disk/by-id/google-{disk_name}"]
    assert att.cloud_id == f"{server.cloud_id}/devices/{disk_name}"
    (disk,) = mine(emu, plan.deployment)["disks"]
    assert disk["status"] == "READY" and disk["type"] == "pd-balanced" and disk["users"] == [server.name]
    assert disk["labels"] == {"labctl-deployment": plan.deployment, "labctl-lab": "vollab", "labctl-owner": "student1",
                              "labctl-node": "node-1", "labctl-keep": "true", "labctl-volume": "block"}
    from labctl.node_setup import volume_steps

    (step,) = volume_steps(plan, found)
    assert f"/dev/disk/by-id/google-{disk_name}" in step.command and step.on == ("node-1",)
    owned = {(f.kind, f.cloud_id): f for f in provider.list_owned(plan)}
    assert owned[("volume", vol.cloud_id)].attrs["keep"] is True
    assert owned[("volume", vol.cloud_id)].attrs["key"] == "volume:block"
    assert ("volume_attachment", att.cloud_id) in owned
    # found again: nothing sent
    emu.world.clear_request_log()
    assert engine.apply(plan)["volume_attachment:block"].cloud_id == att.cloud_id
    assert not [r for r in emu.world.request_log() if r[0] in ("POST", "DELETE", "PATCH")]

    # `labctl down`: the disk is kept, detached; everything else goes
    assert engine.destroy(teardown_plan(plan, store, provider), keep=True) == []
    assert [f.cloud_id for f in engine.kept] == [vol.cloud_id]
    got = mine(emu, plan.deployment)
    assert list(got) == ["disks"] and got["disks"][0]["users"] == [] and got["disks"][0]["id"] == disk["id"]

    # `labctl up` again: the same disk, attached to the new instance
    again = Engine(provider, StateStore(tmp_path / "again.db")).apply(plan)
    assert again["volume:block"].cloud_id == vol.cloud_id
    assert again["server:node-1"].attrs["instance_id"] != server.attrs["instance_id"]
    (disk2,) = mine(emu, plan.deployment)["disks"]
    assert disk2["id"] == disk["id"] and disk2["users"] == [server.name]  # same name, new instance
    assert len(posts(emu, "disks.insert")) == 0

    # `down --delete-volumes` (from list_owned alone): the attachment, then the disk, go too
    bare = Plan(plan.deployment, plan.lab, plan.owner, None, provider.site, 0, plan.tags, [])
    assert Engine(provider, StateStore(tmp_path / "none.db")).destroy(bare, keep=False) == []
    assert mine(emu, plan.deployment) == {}


def test_deleting_an_attached_volume_detaches_it_first(tmp_path, sim_site, testbed, emu):
    plan = build_plan(volume_profile(keep=False), sim_site, "student1", public_key(tmp_path))
    provider = provider_for(sim_site, testbed)
    found = Engine(provider, StateStore(tmp_path / "state.db")).apply(plan)
    vol = found["volume:block"]
    assert vol.attrs["keep"] is False
    provider.delete("volume", [Found("volume", vol.cloud_id, vol.name)], plan)
    got = mine(emu, plan.deployment)
    assert "disks" not in got and got["instances"][0]["attached_disks"] == {}
    provider.delete("volume_attachment", [found["volume_attachment:block"]], plan)  # gone already: fine
    provider.delete("volume", [vol], plan)  # 404: success


def test_region_site_launches_the_node_in_its_kept_disk_zone(tmp_path, region_site, testbed, emu, caplog):
    plan = build_plan(volume_profile(keep=True), region_site, "student1", public_key(tmp_path))
    provider = provider_for(region_site, testbed)
    emu.world.set_capacity("us-central1-a", "e2-small", 0)
    store = StateStore(tmp_path / "state.db")
    engine = Engine(provider, store)
    first = engine.apply(plan)
    assert first["server:node-1"].attrs["zone"] == "us-central1-b"
    assert first["volume:block"].attrs["zone"] == "us-central1-b"
    assert engine.destroy(teardown_plan(plan, store, provider), keep=True) == []

    emu.world.set_capacity("us-central1-a", "e2-small", 10)  # zone a has room again, but the disk is in b
    with caplog.at_level(logging.INFO, logger="labctl.providers.gcp"):
        again = Engine(provider, StateStore(tmp_path / "again.db")).apply(plan)
    assert again["server:node-1"].attrs["zone"] == "us-central1-b"
    assert again["volume_attachment:block"].attrs["zone"] == "us-central1-b"
    assert "where its kept volume is" in caplog.text
    bare = Plan(plan.deployment, plan.lab, plan.owner, None, provider.site, 0, plan.tags, [])
    assert Engine(provider, StateStore(tmp_path / "none.db")).destroy(bare) == []
    assert mine(emu, plan.deployment) == {}
