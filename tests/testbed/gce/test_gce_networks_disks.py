"""The emulated Compute Engine's VPC networks, subnetworks, networkIPs and persistent disks, driven by
google-cloud-compute's real REST clients (no mocks): JSON shapes, operations, requestIds and error bodies."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import requests
from google.api_core import exceptions as gexc
from google.cloud import compute_v1
from tests.testbed.gce.test_gce_emulator import DONE, REGION, ZONE, insert, instance_body, raw, wait_zone


def wait_global(clients, op):
    return clients.GlobalOperationsClient.wait(project=clients.project, operation=op.name)


def wait_region(clients, op, region: str = REGION):
    return clients.RegionOperationsClient.wait(project=clients.project, region=region, operation=op.name)


def make_network(clients, name: str = "lab-net", request_id: str | None = None, **kw):
    body = compute_v1.Network(name=name, auto_create_subnetworks=False, description="labctl:deployment=dep-a")
    op = clients.NetworksClient.insert_unary(request={"project": clients.project, "network_resource": body,
                                                      "request_id": request_id or ""}, **kw)
    return op


def make_subnetwork(clients, name: str = "lab-sub", cidr: str = "192.168.1.0/24", network: str = "lab-net",
                    request_id: str | None = None, region: str = REGION, **kw):
    body = compute_v1.Subnetwork(name=name, network=f"global/networks/{network}", ip_cidr_range=cidr,
                                 description="labctl:deployment=dep-a")
    return clients.SubnetworksClient.insert_unary(request={
        "project": clients.project, "region": region, "subnetwork_resource": body,
        "request_id": request_id or ""}, **kw)


def on_subnet(name: str, ip: str | None = None, external: bool = True, subnet: str = "lab-sub",
              network: str | None = "lab-net", zone: str = ZONE):
    body = instance_body(name, external=external, zone=zone)
    nic = body.network_interfaces[0]
    nic.network = f"global/networks/{network}" if network else ""
    nic.subnetwork = f"regions/{REGION}/subnetworks/{subnet}"
    if ip:
        nic.network_i_p = ip
    return body


def wait_running(clients, name: str, zone: str = ZONE):
    deadline = time.time() + 5
    while True:
        inst = clients.InstancesClient.get(project=clients.project, zone=zone, instance=name)
        if inst.status == "RUNNING" or time.time() > deadline:
            return inst
        time.sleep(0.01)


def http_error(emu, method: str, path: str) -> dict:
    import urllib.request

    req = urllib.request.Request(f"{emu.endpoint}/compute/v1/projects/{emu.project}/{path}", method=method,
                                 headers={"Authorization": f"Bearer {emu.token}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    return json.loads(err.value.read())


def test_network_and_subnetwork_shapes_and_operations(emu, clients):
    op = make_network(clients, request_id=str(uuid.uuid4()))
    assert op.operation_type == "insert" and "/global/operations/" in op.self_link and not op.zone and not op.region
    assert op.target_link == f"{emu.endpoint}/compute/v1/projects/{emu.project}/global/networks/lab-net"
    assert wait_global(clients, op).status == DONE
    net = clients.NetworksClient.get(project=clients.project, network="lab-net")
    assert net.auto_create_subnetworks is False and net.routing_config.routing_mode == "REGIONAL"
    assert net.description == "labctl:deployment=dep-a" and net.mtu == 1460
    body = raw(emu, "global/networks/lab-net")
    assert body["kind"] == "compute#network" and body["id"].isdigit() and body["autoCreateSubnetworks"] is False
    assert body["selfLink"] == f"{emu.endpoint}/compute/v1/projects/{emu.project}/global/networks/lab-net"
    assert "subnetworks" not in body
    assert sorted(n.name for n in clients.NetworksClient.list(project=clients.project)) == ["default", "lab-net"]

    op = make_subnetwork(clients)
    assert op.region.endswith(f"/regions/{REGION}") and "/regions/us-central1/operations/" in op.self_link
    assert wait_region(clients, op).status == DONE
    sub = clients.SubnetworksClient.get(project=clients.project, region=REGION, subnetwork="lab-sub")
    assert sub.ip_cidr_range == "192.168.1.0/24" and sub.gateway_address == "192.168.1.1"
    assert sub.network == net.self_link and sub.region.endswith(f"/regions/{REGION}")
    body = raw(emu, f"regions/{REGION}/subnetworks/lab-sub")
    assert body["kind"] == "compute#subnetwork" and body["id"].isdigit() and body["stackType"] == "IPV4_ONLY"
    assert clients.NetworksClient.get(project=clients.project, network="lab-net").subnetworks == [sub.self_link]
    listed = clients.SubnetworksClient.list(project=clients.project, region=REGION)
    assert [s.name for s in listed] == ["lab-sub"]
    inv = emu.world.inventory()
    assert inv["networks"] == [{"id": str(net.id), "name": "lab-net",
                                "description": "labctl:deployment=dep-a", "auto_create_subnetworks": False,
                                "subnetworks": ["lab-sub"]}]
    assert inv["subnetworks"][0]["ip_cidr_range"] == "192.168.1.0/24"


def test_network_and_subnetwork_errors(emu, clients):
    wait_global(clients, make_network(clients))
    with pytest.raises(gexc.Conflict) as conflict:
        make_network(clients)
    assert conflict.value.errors[0]["reason"] == "alreadyExists"
    legacy = compute_v1.Network(name="legacy")
    with pytest.raises(gexc.BadRequest, match="autoCreateSubnetworks"):
        clients.NetworksClient.insert_unary(project=clients.project, network_resource=legacy)
    with pytest.raises(gexc.NotFound, match="global/networks/nope"):
        clients.NetworksClient.get(project=clients.project, network="nope")

    wait_region(clients, make_subnetwork(clients))
    with pytest.raises(gexc.BadRequest) as overlap:
        make_subnetwork(clients, "other", "192.168.1.128/25")
    assert overlap.value.errors[0]["reason"] == "invalid"
    assert overlap.value.errors[0]["message"] == (
        "Invalid value for field 'resource.ipCidrRange': '192.168.1.128/25'. Invalid IPCidrRange: 192.168.1.128/25 "
        "conflicts with existing subnetwork 'lab-sub' in region 'us-central1'.")
    with pytest.raises(gexc.BadRequest, match="host bits set"):
        make_subnetwork(clients, "other", "192.168.2.5/24")
    with pytest.raises(gexc.NotFound, match="global/networks/nope"):
        make_subnetwork(clients, "other", "192.168.2.0/24", network="nope")
    # the same range on another network is fine (networks are isolated)
    wait_global(clients, make_network(clients, "net-b"))
    assert not wait_region(clients, make_subnetwork(clients, "sub-b", network="net-b")).error.errors
    # a firewall needs an existing network
    fw = compute_v1.Firewall(name="fw-x", network="global/networks/nope", source_ranges=["0.0.0.0/0"],
                             allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=["22"])])
    with pytest.raises(gexc.NotFound, match="global/networks/nope"):
        clients.FirewallsClient.insert_unary(project=clients.project, firewall_resource=fw)


def test_insert_request_id_replays_after_a_lost_answer(emu, clients):
    """The insert is done and committed, then the connection drops; the same requestId answers with the same
    operation and makes nothing more."""
    rid = str(uuid.uuid4())
    emu.world.inject_fault("networks.insert", "timeout_after", 1)
    with pytest.raises(requests.exceptions.ConnectionError):
        make_network(clients, request_id=rid)
    again = make_network(clients, request_id=rid)
    assert make_network(clients, request_id=rid).name == again.name
    wait_global(clients, again)
    assert [n["name"] for n in emu.world.inventory()["networks"]] == ["lab-net"]

    rid = str(uuid.uuid4())
    emu.world.inject_fault("subnetworks.insert", "hang_after", 1)
    with pytest.raises(requests.exceptions.ReadTimeout):
        make_subnetwork(clients, request_id=rid, timeout=0.5)
    op = make_subnetwork(clients, request_id=rid)
    assert wait_region(clients, op).status == DONE and not op.error.errors
    assert [s["name"] for s in emu.world.inventory()["subnetworks"]] == ["lab-sub"]


def test_instances_on_a_subnetwork_get_their_network_ip(emu, clients):
    wait_global(clients, make_network(clients))
    wait_region(clients, make_subnetwork(clients))
    wait_zone(clients, insert(clients, on_subnet("vm-11", "192.168.1.11")))
    wait_zone(clients, insert(clients, on_subnet("vm-auto", external=False, network=None)))  # network from subnet
    inst = wait_running(clients, "vm-11")
    nic = inst.network_interfaces[0]
    assert nic.network_i_p == "192.168.1.11" and nic.network.endswith("/global/networks/lab-net")
    assert nic.subnetwork.endswith(f"/regions/{REGION}/subnetworks/lab-sub")
    assert nic.access_configs[0].nat_i_p.startswith("127.30.")
    body = raw(emu, f"zones/{ZONE}/instances/vm-11")
    assert body["networkInterfaces"][0]["networkIP"] == "192.168.1.11"
    auto = wait_running(clients, "vm-auto").network_interfaces[0]
    assert auto.network_i_p == "192.168.1.2" and not auto.access_configs  # the lowest free address

    # a networkIP outside the range or reserved: 400 at once; in use: the operation fails
    with pytest.raises(gexc.BadRequest, match="outside the subnetwork CIDR range"):
        insert(clients, on_subnet("vm-x", "10.0.0.5"))
    with pytest.raises(gexc.BadRequest, match="reserved"):
        insert(clients, on_subnet("vm-x", "192.168.1.255"))
    taken = wait_zone(clients, insert(clients, on_subnet("vm-x", "192.168.1.11")))
    assert taken.status == DONE and taken.http_error_status_code == 400
    assert taken.error.errors[0].code == "IP_IN_USE_BY_ANOTHER_RESOURCE"
    assert taken.error.errors[0].message == "IP '192.168.1.11' is already being used by another resource."
    assert "vm-x" not in {i["name"] for i in emu.world.inventory()["instances"]}
    # a custom-mode network needs a subnetwork; a subnetwork of another network does not fit
    bare = instance_body("vm-y")
    bare.network_interfaces[0].network = "global/networks/lab-net"
    with pytest.raises(gexc.BadRequest, match="Subnetwork should be specified for custom subnetmode network"):
        insert(clients, bare)
    with pytest.raises(gexc.NotFound, match="subnetworks/nope"):
        insert(clients, on_subnet("vm-y", subnet="nope"))

    # the SSH side: every RUNNING instance, with its fixed IP per network and an internal loopback address
    targets = {t["name"]: t for t in emu.world.ssh_targets()}
    link = f"projects/{emu.project}/global/networks/lab-net"
    assert targets["vm-11"]["fixed_ips"] == {link: "192.168.1.11"}
    assert targets["vm-auto"]["fixed_ips"] == {link: "192.168.1.2"} and targets["vm-auto"]["address"] is None
    internal = [t["internal_address"] for t in targets.values()]
    assert len(set(internal)) == len(internal) and all(a.startswith("127.13.") for a in internal)
    assert len({t["site"] for t in targets.values()}) == 1  # one VPC space for the whole project
    inv = {i["name"]: i for i in emu.world.inventory()["instances"]}
    assert (inv["vm-11"]["network"], inv["vm-11"]["subnetwork"], inv["vm-11"]["internal_ip"]) == (
        "lab-net", "lab-sub", "192.168.1.11")

    # a freed address can be taken again once the instance is gone
    wait_zone(clients, clients.InstancesClient.delete_unary(project=clients.project, zone=ZONE, instance="vm-11"))
    again = wait_zone(clients, insert(clients, on_subnet("vm-11b", "192.168.1.11")))
    assert not again.error.errors


def test_deleting_networks_and_subnetworks_in_use(emu, clients):
    wait_global(clients, make_network(clients))
    wait_region(clients, make_subnetwork(clients))
    fw = compute_v1.Firewall(name="lab-fw", network="global/networks/lab-net", source_ranges=["192.168.1.0/24"],
                             target_tags=["dep-a"], allowed=[compute_v1.Allowed(I_p_protocol="all")])
    clients.GlobalOperationsClient.wait(project=clients.project, operation=clients.FirewallsClient.insert_unary(
        project=clients.project, firewall_resource=fw).name)
    assert clients.FirewallsClient.get(project=clients.project, firewall="lab-fw").network.endswith("/lab-net")
    wait_zone(clients, insert(clients, on_subnet("vm-1", "192.168.1.11")))
    vm_link = f"projects/{emu.project}/zones/{ZONE}/instances/vm-1"
    sub_link = f"projects/{emu.project}/regions/{REGION}/subnetworks/lab-sub"

    # a subnetwork in use: 400 at once, the real body
    body = http_error(emu, "DELETE", f"regions/{REGION}/subnetworks/lab-sub")
    message = f"The subnetwork resource '{sub_link}' is already being used by '{vm_link}'"
    assert body == {"error": {"code": 400, "message": message, "errors": [
        {"message": message, "domain": "global", "reason": "resourceInUseByAnotherResource"}]}}
    with pytest.raises(gexc.BadRequest) as err:
        clients.SubnetworksClient.delete_unary(project=clients.project, region=REGION, subnetwork="lab-sub")
    assert err.value.errors[0]["reason"] == "resourceInUseByAnotherResource"

    # a network in use: its operation fails (as on Compute Engine: "Error waiting for Deleting Network")
    op = wait_global(clients, clients.NetworksClient.delete_unary(project=clients.project, network="lab-net"))
    assert op.status == DONE and op.http_error_status_code == 400
    assert op.error.errors[0].code == "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE"
    assert op.error.errors[0].message.startswith(
        f"The network resource 'projects/{emu.project}/global/networks/lab-net' is already being used by ")
    assert clients.NetworksClient.get(project=clients.project, network="lab-net").name == "lab-net"

    wait_zone(clients, clients.InstancesClient.delete_unary(project=clients.project, zone=ZONE, instance="vm-1"))
    clients.GlobalOperationsClient.wait(project=clients.project, operation=clients.FirewallsClient.delete_unary(
        project=clients.project, firewall="lab-fw").name)
    op = wait_region(clients, clients.SubnetworksClient.delete_unary(project=clients.project, region=REGION,
                                                                     subnetwork="lab-sub"))
    assert op.status == DONE and not op.error.errors and op.operation_type == "delete"
    op = wait_global(clients, clients.NetworksClient.delete_unary(project=clients.project, network="lab-net"))
    assert not op.error.errors
    with pytest.raises(gexc.NotFound):
        clients.NetworksClient.get(project=clients.project, network="lab-net")
    assert emu.world.inventory() == {"instances": [], "firewalls": [], "addresses": []}


def make_disk(clients, name: str = "data-1", size: int = 10, zone: str = ZONE, labels: dict | None = None,
              request_id: str | None = None):
    body = compute_v1.Disk(name=name, size_gb=size, type_=f"zones/{zone}/diskTypes/pd-balanced",
                           labels=labels or {"labctl-deployment": "dep-a", "labctl-keep": "true"})
    return clients.DisksClient.insert_unary(request={"project": clients.project, "zone": zone, "disk_resource": body,
                                                     "request_id": request_id or ""})


def test_disk_lifecycle_and_shapes(emu, clients):
    wait_zone(clients, insert(clients, instance_body("vm-d")))
    emu.world.set_time_scale(0.05)  # the disk is CREATING for 0.25 s
    op = make_disk(clients, request_id=str(uuid.uuid4()))
    assert op.zone.endswith(f"/zones/{ZONE}") and op.operation_type == "insert"
    disk = clients.DisksClient.get(project=clients.project, zone=ZONE, disk="data-1")
    assert disk.status == "CREATING" and disk.users == []
    with pytest.raises(gexc.BadRequest, match="is not ready") as not_ready:
        clients.InstancesClient.attach_disk_unary(
            project=clients.project, zone=ZONE, instance="vm-d",
            attached_disk_resource=compute_v1.AttachedDisk(source=f"zones/{ZONE}/disks/data-1", device_name="data-1"))
    assert not_ready.value.errors[0]["reason"] == "resourceNotReady"
    assert wait_zone(clients, op).status == DONE
    deadline = time.time() + 5
    while disk.status != "READY" and time.time() < deadline:
        time.sleep(0.02)
        disk = clients.DisksClient.get(project=clients.project, zone=ZONE, disk="data-1")
    assert disk.status == "READY" and disk.size_gb == 10 and disk.type_.endswith(f"/zones/{ZONE}/diskTypes/pd-balanced")
    assert disk.labels["labctl-keep"] == "true"
    body = raw(emu, f"zones/{ZONE}/disks/data-1")
    assert body["kind"] == "compute#disk" and body["id"].isdigit() and body["sizeGb"] == "10"
    assert body["selfLink"] == f"{emu.endpoint}/compute/v1/projects/{emu.project}/zones/{ZONE}/disks/data-1"
    assert body["zone"] == f"{emu.endpoint}/compute/v1/projects/{emu.project}/zones/{ZONE}"

    # list, aggregated list with a label filter
    assert [d.name for d in clients.DisksClient.list(project=clients.project, zone=ZONE)] == ["data-1"]
    agg = clients.DisksClient.aggregated_list(request={"project": clients.project,
                                                       "filter": 'labels.labctl-deployment = "dep-a"'})
    assert {scope: [d.name for d in s.disks] for scope, s in agg if s.disks} == {f"zones/{ZONE}": ["data-1"]}
    # errors: a disk under the smallest size, an unknown type, a name taken
    with pytest.raises(gexc.BadRequest, match="smaller than 10 GB"):
        make_disk(clients, "tiny", size=2)
    bad = compute_v1.Disk(name="odd", size_gb=10, type_=f"zones/{ZONE}/diskTypes/pd-odd")
    with pytest.raises(gexc.NotFound, match="diskTypes/pd-odd"):
        clients.DisksClient.insert_unary(project=clients.project, zone=ZONE, disk_resource=bad)
    with pytest.raises(gexc.Conflict):
        make_disk(clients)
    # same requestId: same operation, one disk
    rid = str(uuid.uuid4())
    assert make_disk(clients, "data-2", request_id=rid).name == make_disk(clients, "data-2", request_id=rid).name
    assert sorted(d["name"] for d in emu.world.inventory()["disks"]) == ["data-1", "data-2"]

    op = clients.DisksClient.delete_unary(project=clients.project, zone=ZONE, disk="data-2")
    assert clients.DisksClient.get(project=clients.project, zone=ZONE, disk="data-2").status == "DELETING"
    assert wait_zone(clients, op).status == DONE
    with pytest.raises(gexc.NotFound):
        clients.DisksClient.get(project=clients.project, zone=ZONE, disk="data-2")


def test_attach_and_detach_disks(emu, clients):
    wait_zone(clients, make_disk(clients))
    wait_zone(clients, make_disk(clients, "data-b", zone="us-central1-b"), zone="us-central1-b")
    wait_zone(clients, insert(clients, instance_body("vm-1")))
    wait_zone(clients, insert(clients, instance_body("vm-2")))
    time.sleep(0.05)  # READY after 5 s x 0.002
    disk_link = f"projects/{emu.project}/zones/{ZONE}/disks/data-1"
    vm1 = f"projects/{emu.project}/zones/{ZONE}/instances/vm-1"
    attach = compute_v1.AttachedDisk(source=f"zones/{ZONE}/disks/data-1", device_name="data-1", mode="READ_WRITE")
    op = clients.InstancesClient.attach_disk_unary(request={
        "project": clients.project, "zone": ZONE, "instance": "vm-1", "attached_disk_resource": attach,
        "request_id": str(uuid.uuid4())})
    assert op.operation_type == "attachDisk" and op.target_link.endswith("/instances/vm-1")
    assert wait_zone(clients, op).status == DONE and not op.error.errors
    inst = clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="vm-1")
    data = [d for d in inst.disks if not d.boot]
    assert [(d.device_name, d.index, d.mode, d.auto_delete) for d in data] == [("data-1", 1, "READ_WRITE", False)]
    assert data[0].source == f"{emu.endpoint}/compute/v1/{disk_link}"
    disk = clients.DisksClient.get(project=clients.project, zone=ZONE, disk="data-1")
    assert disk.users == [f"{emu.endpoint}/compute/v1/{vm1}"] and disk.last_attach_timestamp
    assert emu.world.inventory()["instances"][0]["attached_disks"] == {"data-1": "data-1"}

    # in use: no delete, no second read-write attachment
    body = http_error(emu, "DELETE", f"zones/{ZONE}/disks/data-1")
    message = f"The disk resource '{disk_link}' is already being used by '{vm1}'"
    assert body["error"]["message"] == message
    assert body["error"]["errors"][0]["reason"] == "resourceInUseByAnotherResource"
    with pytest.raises(gexc.BadRequest, match="already being used by"):
        clients.InstancesClient.attach_disk_unary(project=clients.project, zone=ZONE, instance="vm-2",
                                                  attached_disk_resource=attach)
    # a disk of another zone
    other = compute_v1.AttachedDisk(source="zones/us-central1-b/disks/data-b", device_name="data-b")
    with pytest.raises(gexc.BadRequest, match="Disk must be in the same zone as the instance"):
        clients.InstancesClient.attach_disk_unary(project=clients.project, zone=ZONE, instance="vm-2",
                                                  attached_disk_resource=other)
    with pytest.raises(gexc.BadRequest, match="No attached disk found with device name 'nope'"):
        clients.InstancesClient.detach_disk_unary(project=clients.project, zone=ZONE, instance="vm-1",
                                                  device_name="nope")

    op = clients.InstancesClient.detach_disk_unary(project=clients.project, zone=ZONE, instance="vm-1",
                                                   device_name="data-1")
    assert op.operation_type == "detachDisk" and wait_zone(clients, op).status == DONE
    assert clients.DisksClient.get(project=clients.project, zone=ZONE, disk="data-1").users == []
    assert [d.boot for d in clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="vm-1").disks] \
        == [True]

    # an instance deleted with a disk attached lets go of it (the disk stays)
    wait_zone(clients, clients.InstancesClient.attach_disk_unary(project=clients.project, zone=ZONE, instance="vm-2",
                                                                 attached_disk_resource=attach))
    assert clients.DisksClient.get(project=clients.project, zone=ZONE, disk="data-1").users
    wait_zone(clients, clients.InstancesClient.delete_unary(project=clients.project, zone=ZONE, instance="vm-2"))
    disk = clients.DisksClient.get(project=clients.project, zone=ZONE, disk="data-1")
    assert disk.users == [] and disk.status == "READY"
    wait_zone(clients, clients.DisksClient.delete_unary(project=clients.project, zone=ZONE, disk="data-1"))
    assert [d["name"] for d in emu.world.inventory()["disks"]] == ["data-b"]


def test_a_node_without_an_external_ip_is_reached_through_one_with(emu, clients, tmp_path):
    """The SSH side over the emulated Compute Engine: node-b has no external address; a client reaches it through
    node-a (`ssh -J`), at its networkIP on the network they share, port 22."""
    from tests.runner.conftest import MemStore, free_port

    from labctl.keys import ensure_keypair
    from labctl.runner import NodeTarget, SetupStep, run_setup, wait_for_ssh
    from labctl.testbed.sshd import SSHNodes

    key = ensure_keypair(tmp_path / "keys")
    wait_global(clients, make_network(clients))
    wait_region(clients, make_subnetwork(clients))
    # A custom network denies ingress until a firewall rule allows it (here: tcp:22 from anywhere, every node).
    ssh_rule = compute_v1.Firewall(name="lab-ssh", network="global/networks/lab-net", source_ranges=["0.0.0.0/0"],
                                   allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=["22"])])
    wait_global(clients, clients.FirewallsClient.insert_unary(project=clients.project, firewall_resource=ssh_rule))
    for name, ip, external in (("node-a", "192.168.1.11", True), ("node-b", "192.168.1.12", False)):
        body = on_subnet(name, ip, external=external)
        body.metadata = compute_v1.Metadata(items=[compute_v1.Items(key="ssh-keys", value=f"labctl:{key.public_key}")])
        wait_zone(clients, insert(clients, body))
    inst_a = wait_running(clients, "node-a")
    wait_running(clients, "node-b")
    address = inst_a.network_interfaces[0].access_configs[0].nat_i_p
    targets = {t["name"]: t for t in emu.world.ssh_targets()}
    assert targets["node-b"]["address"] is None
    port = free_port("127.0.0.1")
    sshd = SSHNodes(emu.world, poll_interval=0.02, port=port).start()
    try:
        sshd.wait_listening(address, port, 5)
        sshd.wait_listening(targets["node-b"]["internal_address"], port, 5)
        assert not any(a == targets["node-b"].get("address") for a, _ in sshd.listening())
        jump = NodeTarget("node-a", address, port, "labctl")
        inner = NodeTarget("node-b", "192.168.1.12", 22, "labctl", via=jump)
        store = MemStore()
        wait_for_ssh([jump, inner], key.private_path, store, timeout=15)
        steps = [SetupStep(0, "who", ["node-a", "node-b"], 'echo "$LABCTL_NODE" > who.txt')]
        results = run_setup([jump, inner], steps, key.private_path, store, store, tmp_path / "logs")
        assert all(r.ok for r in results.values()), {n: r.log_tail for n, r in results.items()}
        node_dir = targets["node-b"]["node_dir"]
        assert (node_dir / "home" / "who.txt").read_text() == "node-b\n"
    finally:
        sshd.stop()
