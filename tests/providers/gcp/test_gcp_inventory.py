"""`GcpProvider.inventory()`: everything labctl marked in the project and region, of every deployment and owner,
and nothing it did not mark, however labctl-like its name (look-alikes made through google-cloud-compute)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.cloud import compute_v1
from tests.providers.gcp.test_gcp_networks_volumes import cluster_profile
from tests.providers.gcp.test_gcp_provider import profile, provider_for, public_key

from labctl import sites
from labctl.engine import Engine
from labctl.plan import build_plan
from labctl.state import StateStore

ZONE, REGION = "us-central1-a", "us-central1"


def make_look_alikes(clients, prefix: str) -> set[tuple[str, str]]:
    """One unmarked object of each kind labctl makes, named as labctl would name it, with labels or descriptions
    that only look like labctl's marks."""
    image = "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64"
    net = clients.NetworksClient.insert_unary(project=clients.project, network_resource=compute_v1.Network(
        name=f"{prefix}-cluster", auto_create_subnetworks=False, description="made by hand"))
    clients.GlobalOperationsClient.wait(project=clients.project, operation=net.name)
    clients.SubnetworksClient.insert_unary(project=clients.project, region=REGION, subnetwork_resource=(
        compute_v1.Subnetwork(name=f"{prefix}-cluster", ip_cidr_range="10.9.0.0/24", description="labctl-like",
                              network=f"global/networks/{prefix}-cluster")))
    clients.InstancesClient.insert_unary(project=clients.project, zone=ZONE, instance_resource=compute_v1.Instance(
        name=f"{prefix}-node-1", machine_type=f"zones/{ZONE}/machineTypes/e2-small",
        labels={"team": "labctl-deployment"}, description=f"labctl:deployment-{prefix}",
        disks=[compute_v1.AttachedDisk(boot=True, auto_delete=True, initialize_params=(
            compute_v1.AttachedDiskInitializeParams(source_image=image)))],
        network_interfaces=[compute_v1.NetworkInterface(network="global/networks/default")]))
    clients.DisksClient.insert_unary(project=clients.project, zone=ZONE, disk_resource=compute_v1.Disk(
        name=f"{prefix}-block", size_gb=10, type_=f"zones/{ZONE}/diskTypes/pd-balanced",
        description=f"labctl:deployment={prefix}"))  # a mark in the description does not count where labels do
    clients.AddressesClient.insert_unary(project=clients.project, region=REGION, address_resource=(
        compute_v1.Address(name=f"{prefix}-node-1", labels={"labctl-owner": "student1"})))
    clients.FirewallsClient.insert_unary(project=clients.project, firewall_resource=compute_v1.Firewall(
        name=prefix, network="global/networks/default", description=f"deployment={prefix} (not labctl's)",
        allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=["22"])], source_ranges=["0.0.0.0/0"]))
    return {("network", f"{prefix}-cluster"), ("subnet", f"{prefix}-cluster"), ("server", f"{prefix}-node-1"),
            ("volume", f"{prefix}-block"), ("floating_ip", f"{prefix}-node-1"), ("secgroup", prefix)}


def test_inventory_lists_every_marked_resource_of_every_deployment_and_no_look_alike(tmp_path, testbed, emu,
                                                                                    clients):
    site = sites.resolve("sim-gcp")
    provider = provider_for(site, testbed)
    store = StateStore(tmp_path / "state.db")
    one = build_plan(cluster_profile(count=1, volume={"keep": True}), site, "student1", public_key(tmp_path))
    two = build_plan(profile("other"), site, "student2", public_key(tmp_path))
    for plan in (one, two):
        Engine(provider, store).apply(plan)
    look_alikes = make_look_alikes(clients, "labctl-student1-fake")

    before = datetime.now(UTC)
    inventory = provider.inventory()
    listed = {(f.kind, f.name) for f in inventory}
    assert not listed & look_alikes
    owned = {(f.kind, f.name) for plan in (one, two) for f in provider.list_owned(plan)
             if f.kind != "volume_attachment"}
    assert listed == owned
    assert {f.kind for f in inventory} == {"server", "volume", "floating_ip", "secgroup", "network", "subnet"}
    for f in inventory:
        plan = one if f.attrs["deployment"] == one.deployment else two
        assert f.attrs["deployment"] == plan.deployment and f.attrs["owner"] == plan.owner, f
        created = datetime.fromisoformat(f.attrs["created"])
        assert before - timedelta(minutes=5) < created <= before + timedelta(seconds=5), f
    servers = {f.attrs["deployment"]: f for f in inventory if f.kind == "server"}
    assert set(servers) == {one.deployment, two.deployment}
    for f in servers.values():
        assert f.attrs["node_type"] == "e2-small"
        end = datetime.fromisoformat(f.attrs["end"])  # the profiles' 1 h lease, which Compute Engine enforces
        assert timedelta(minutes=55) < end - before < timedelta(minutes=61)

    # a site in another region sees the project's global objects (firewalls, networks) and none of the region's
    far = provider_for(sites.emulate(sites.resolve("gcp:europe-west4-a")), testbed)
    assert {(f.kind, f.name) for f in far.inventory()} == {(k, n) for k, n in owned if k in ("secgroup", "network")}
