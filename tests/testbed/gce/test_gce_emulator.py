"""The emulated Compute Engine, driven by google-cloud-compute's real REST clients (no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import requests
from google.api_core import exceptions as gexc
from google.cloud import compute_v1

from labctl.testbed.gce import start_gce
from labctl.testbed.gce.world import GceWorld

ZONE = "us-central1-a"
REGION = "us-central1"
DONE = compute_v1.Operation.Status.DONE
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTheEmulatorTestsOnly student@laptop"


def instance_body(name: str, machine: str = "e2-small", *, labels: dict | None = None, gpu: str | None = None,
                  zone: str = ZONE, nat_ip: str | None = None, external: bool = True,
                  image: str = "projects/ubuntu-os-cloud/global/images/family/ubuntu-2404-lts-amd64"):
    access = [compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")] if external else []
    if nat_ip and access:
        access[0].nat_i_p = nat_ip
    body = compute_v1.Instance(
        name=name,
        machine_type=f"zones/{zone}/machineTypes/{machine}",
        labels=labels or {"labctl-deployment": "dep-a"},
        disks=[compute_v1.AttachedDisk(boot=True, auto_delete=True,
                                       initialize_params=compute_v1.AttachedDiskInitializeParams(
                                           source_image=image, disk_size_gb=60))],
        network_interfaces=[compute_v1.NetworkInterface(network="global/networks/default", access_configs=access)],
        metadata=compute_v1.Metadata(items=[compute_v1.Items(key="ssh-keys", value=f"labctl:{SSH_KEY}")]),
        tags=compute_v1.Tags(items=["dep-a"]),
    )
    if gpu:
        body.guest_accelerators = [compute_v1.AcceleratorConfig(
            accelerator_type=f"zones/{zone}/acceleratorTypes/{gpu}", accelerator_count=1)]
    if gpu or machine.startswith(("g2-", "a2-", "a3-")):
        body.scheduling = compute_v1.Scheduling(on_host_maintenance="TERMINATE")
    return body


def insert(clients, body, zone: str = ZONE, request_id: str | None = None, **kw):
    return clients.InstancesClient.insert_unary(request=compute_v1.InsertInstanceRequest(
        project=clients.project, zone=zone, instance_resource=body, request_id=request_id or ""), **kw)


def wait_zone(clients, op, zone: str = ZONE):
    return clients.ZoneOperationsClient.wait(project=clients.project, zone=zone, operation=op.name)


def raw(emu, path: str) -> dict:
    req = urllib.request.Request(f"{emu.endpoint}/compute/v1/projects/{emu.project}/{path}",
                                 headers={"Authorization": f"Bearer {emu.token}"})
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read())


def test_instance_lifecycle_operations_and_json_shapes(emu, clients):
    op = insert(clients, instance_body("vm-1"), request_id=str(uuid.uuid4()))
    assert op.status != DONE and op.operation_type == "insert"
    assert op.id and op.target_link.endswith(f"/zones/{ZONE}/instances/vm-1")
    first = clients.ZoneOperationsClient.get(project=clients.project, zone=ZONE, operation=op.name)
    assert first.name == op.name
    done = wait_zone(clients, op)
    assert done.status == DONE and not done.error.errors and done.end_time
    inst = clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="vm-1")
    assert inst.status in ("PROVISIONING", "STAGING", "RUNNING")
    assert inst.labels["labctl-deployment"] == "dep-a" and inst.tags.items == ["dep-a"]
    assert inst.id == done.target_id
    deadline = time.time() + 5
    while inst.status != "RUNNING" and time.time() < deadline:
        time.sleep(0.01)
        inst = clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="vm-1")
    assert inst.status == "RUNNING"
    nat = inst.network_interfaces[0].access_configs[0].nat_i_p
    assert nat.startswith("127.30.") and inst.network_interfaces[0].network_i_p.startswith("10.128.")

    # the wire format: camelCase, kind, numeric-string ids, int64 as strings, self links on this endpoint
    body = raw(emu, f"zones/{ZONE}/instances/vm-1")
    assert body["kind"] == "compute#instance" and body["id"].isdigit()
    assert body["disks"][0]["diskSizeGb"] == "60"
    assert body["selfLink"] == f"{emu.endpoint}/compute/v1/projects/{emu.project}/zones/{ZONE}/instances/vm-1"
    assert body["networkInterfaces"][0]["accessConfigs"][0]["natIP"] == nat
    assert body["scheduling"]["onHostMaintenance"] == "MIGRATE"
    op_body = raw(emu, f"zones/{ZONE}/operations/{op.name}")
    assert op_body["kind"] == "compute#operation" and op_body["status"] == "DONE"
    assert op_body["id"].isdigit() and op_body["targetId"].isdigit() and op_body["progress"] == 100

    # list with label filters (both spellings), aggregated list
    for flt in ('labels.labctl-deployment = "dep-a"', "labels.labctl-deployment=dep-a",
                '(labels.labctl-deployment = "dep-a") (status = "RUNNING")'):
        listed = list(clients.InstancesClient.list(request={"project": clients.project, "zone": ZONE,
                                                            "filter": flt}))
        assert [i.name for i in listed] == ["vm-1"], flt
    assert not list(clients.InstancesClient.list(request={"project": clients.project, "zone": ZONE,
                                                          "filter": 'labels.labctl-deployment = "other"'}))
    agg = clients.InstancesClient.aggregated_list(request={"project": clients.project,
                                                           "filter": 'labels.labctl-deployment = "dep-a"'})
    assert {scope: [i.name for i in s.instances] for scope, s in agg if s.instances} == {f"zones/{ZONE}": ["vm-1"]}

    # delete: STOPPING until the operation is DONE, then gone (404)
    started = time.time()
    del_op = clients.InstancesClient.delete_unary(project=clients.project, zone=ZONE, instance="vm-1")
    try:
        assert clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="vm-1").status == "STOPPING"
    except gexc.NotFound:
        assert time.time() - started > 30 * emu.world.time_scale  # only if the delete already finished
    assert wait_zone(clients, del_op).status == DONE
    with pytest.raises(gexc.NotFound) as err:
        clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="vm-1")
    assert err.value.errors[0]["reason"] == "notFound"
    assert emu.world.inventory()["instances"] == []


def test_operation_goes_pending_running_done(emu, clients):
    op = insert(clients, instance_body("vm-2"))
    seen = []
    deadline = time.time() + 5
    while not seen or seen[-1] != DONE:
        seen.append(clients.ZoneOperationsClient.get(project=clients.project, zone=ZONE, operation=op.name).status)
        assert time.time() < deadline
    order = [compute_v1.Operation.Status.PENDING, compute_v1.Operation.Status.RUNNING, DONE]
    assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen)
    assert seen[-1] == DONE


def test_error_bodies_conflict_and_validation(emu, clients):
    wait_zone(clients, insert(clients, instance_body("vm-3")))
    with pytest.raises(gexc.Conflict) as conflict:
        insert(clients, instance_body("vm-3"))
    assert conflict.value.errors[0]["reason"] == "alreadyExists"
    with pytest.raises(urllib.error.HTTPError) as missing:
        raw(emu, f"zones/{ZONE}/instances/nope")
    body = json.loads(missing.value.read())
    assert body == {"error": {"code": 404, "message": f"The resource 'projects/{emu.project}/zones/{ZONE}/"
                              "instances/nope' was not found", "errors": [{
                                  "message": f"The resource 'projects/{emu.project}/zones/{ZONE}/instances/nope' "
                                             "was not found", "domain": "global", "reason": "notFound"}]}}
    with pytest.raises(gexc.BadRequest, match="labels"):
        insert(clients, instance_body("vm-4", labels={"labctl:deployment": "x"}))
    with pytest.raises(gexc.BadRequest, match="does not exist in zone"):
        insert(clients, instance_body("vm-4", "a2-ultragpu-1g", zone="us-central1-b"), zone="us-central1-b")
    gpu = instance_body("vm-4", "n1-standard-4", gpu="nvidia-tesla-t4")
    gpu.scheduling = compute_v1.Scheduling(on_host_maintenance="MIGRATE")
    with pytest.raises(gexc.BadRequest, match="live migration"):
        insert(clients, gpu)
    with pytest.raises(gexc.NotFound, match="family/no-such-family"):
        insert(clients, instance_body("vm-4", image="projects/ubuntu-os-cloud/global/images/family/no-such-family"))
    with pytest.raises(gexc.NotFound):
        clients.InstancesClient.delete_unary(project=clients.project, zone=ZONE, instance="nope")
    with pytest.raises(gexc.NotFound):
        clients.InstancesClient.list(project="someone-elses-project", zone=ZONE)


def test_request_id_replays_the_operation_after_a_client_side_timeout(emu, clients):
    """The first insert is performed and committed, then the connection drops: the client sees an error.
    Sending the same insert with the same requestId returns the same operation and creates nothing new."""
    rid = str(uuid.uuid4())
    emu.world.inject_fault("instances.insert", "timeout_after", 1)
    with pytest.raises(requests.exceptions.ConnectionError):  # the SDK does not wrap it
        insert(clients, instance_body("vm-rid"), request_id=rid)
    again = insert(clients, instance_body("vm-rid"), request_id=rid)
    assert wait_zone(clients, again).status == DONE and not again.error.errors
    third = insert(clients, instance_body("vm-rid"), request_id=rid)
    assert third.name == again.name
    assert [i["name"] for i in emu.world.inventory()["instances"]] == ["vm-rid"]
    inserts = [r for r in emu.world.request_log() if r[0] == "POST" and r[1].endswith("/instances")]
    assert len(inserts) == 3

    # hang_after: performed, never answered; the client's own timeout fires; the retry finds the operation
    rid2 = str(uuid.uuid4())
    emu.world.inject_fault("instances.insert", "hang_after", 1)
    with pytest.raises(requests.exceptions.ReadTimeout):
        insert(clients, instance_body("vm-hang"), request_id=rid2, timeout=0.5)
    op = insert(clients, instance_body("vm-hang"), request_id=rid2)
    assert wait_zone(clients, op).status == DONE
    assert sorted(i["name"] for i in emu.world.inventory()["instances"]) == ["vm-hang", "vm-rid"]

    # deletes too: a repeated requestId answers with the first delete's operation
    rid3 = str(uuid.uuid4())
    d1 = clients.InstancesClient.delete_unary(request={"project": clients.project, "zone": ZONE,
                                                       "instance": "vm-rid", "request_id": rid3})
    d2 = clients.InstancesClient.delete_unary(request={"project": clients.project, "zone": ZONE,
                                                       "instance": "vm-rid", "request_id": rid3})
    assert d1.name == d2.name
    with pytest.raises(gexc.BadRequest, match="requestId"):
        insert(clients, instance_body("vm-x"), request_id="not-a-uuid")


def test_zone_capacity_exhaustion_and_quota(emu, clients):
    emu.world.set_capacity(ZONE, "nvidia-tesla-t4", 1)
    ok = wait_zone(clients, insert(clients, instance_body("gpu-1", "n1-standard-4", gpu="nvidia-tesla-t4")))
    assert not ok.error.errors
    full = wait_zone(clients, insert(clients, instance_body("gpu-2", "n1-standard-4", gpu="nvidia-tesla-t4")))
    assert full.status == DONE and full.http_error_status_code == 503
    assert full.error.errors[0].code == "ZONE_RESOURCE_POOL_EXHAUSTED"
    assert full.error.errors[0].error_details[0].error_info.reason == "resource_availability"
    assert [i["name"] for i in emu.world.inventory()["instances"]] == ["gpu-1"]
    # the other zones of the region still have room
    other = wait_zone(clients, insert(clients, instance_body("gpu-2", "n1-standard-4", gpu="nvidia-tesla-t4",
                                                             zone="us-central1-b"), zone="us-central1-b"),
                      zone="us-central1-b")
    assert not other.error.errors
    # machine types with built-in GPUs count per machine type
    emu.world.set_capacity(ZONE, "g2-standard-4", 0)
    g2 = wait_zone(clients, insert(clients, instance_body("l4-1", "g2-standard-4")))
    assert g2.error.errors[0].code == "ZONE_RESOURCE_POOL_EXHAUSTED"

    # regional quota: QUOTA_EXCEEDED with 403 and the metric in the details
    emu.world.set_quota(REGION, "NVIDIA_T4_GPUS", 2)
    quota = wait_zone(clients, insert(clients, instance_body("gpu-3", "n1-standard-4", gpu="nvidia-tesla-t4",
                                                             zone="us-central1-c"), zone="us-central1-c"),
                      zone="us-central1-c")
    assert quota.http_error_status_code == 403
    assert quota.error.errors[0].code == "QUOTA_EXCEEDED"
    assert quota.error.errors[0].error_details[0].quota_info.metric_name.endswith("nvidia_t4_gpus")
    region = clients.RegionsClient.get(project=clients.project, region=REGION)
    t4 = next(q for q in region.quotas if q.metric == "NVIDIA_T4_GPUS")
    assert (t4.limit, t4.usage) == (2.0, 2.0)


def test_extended_operation_result_raises_on_exhaustion(emu, clients):
    """`insert()` returns an ExtendedOperation; pointed at our endpoint, result() raises ServiceUnavailable."""
    emu.world.set_capacity(ZONE, "a2-highgpu-1g", 0)
    instances = clients.InstancesClient
    # the trap: the transport's operations client defaults to the Google host; give it ours
    instances._transport._extended_operations_services["zone_operations"] = clients.ZoneOperationsClient
    ext = instances.insert(project=clients.project, zone=ZONE, instance_resource=instance_body("a2-1", "a2-highgpu-1g"))
    with pytest.raises(gexc.ServiceUnavailable, match="ZONE_RESOURCE_POOL_EXHAUSTED"):
        ext.result(timeout=30)


def test_firewalls_and_global_operations(emu, clients):
    fw = compute_v1.Firewall(name="dep-a", description="labctl:deployment=dep-a", target_tags=["dep-a"],
                             source_ranges=["0.0.0.0/0"], network="global/networks/default",
                             allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=["22", "8888"])])
    op = clients.FirewallsClient.insert_unary(request={"project": clients.project, "firewall_resource": fw,
                                                       "request_id": str(uuid.uuid4())})
    assert "/global/operations/" in op.self_link and not op.zone and not op.region
    assert clients.GlobalOperationsClient.wait(project=clients.project, operation=op.name).status == DONE
    got = clients.FirewallsClient.get(project=clients.project, firewall="dep-a")
    assert got.allowed[0].I_p_protocol == "tcp" and list(got.allowed[0].ports) == ["22", "8888"]
    assert list(got.target_tags) == ["dep-a"] and got.direction == "INGRESS" and got.priority == 1000
    with pytest.raises(gexc.Conflict):
        clients.FirewallsClient.insert_unary(project=clients.project, firewall_resource=fw)
    patch = compute_v1.Firewall(source_ranges=["10.0.0.0/8"])
    op = clients.FirewallsClient.patch_unary(project=clients.project, firewall="dep-a", firewall_resource=patch)
    clients.GlobalOperationsClient.wait(project=clients.project, operation=op.name)
    assert list(clients.FirewallsClient.get(project=clients.project, firewall="dep-a").source_ranges) == ["10.0.0.0/8"]
    assert [f.name for f in clients.FirewallsClient.list(project=clients.project)] == ["dep-a"]
    inv = emu.world.inventory()["firewalls"]
    assert inv[0]["description"] == "labctl:deployment=dep-a" and inv[0]["target_tags"] == ["dep-a"]
    op = clients.FirewallsClient.delete_unary(project=clients.project, firewall="dep-a")
    clients.GlobalOperationsClient.wait(project=clients.project, operation=op.name)
    with pytest.raises(gexc.NotFound):
        clients.FirewallsClient.get(project=clients.project, firewall="dep-a")


def test_addresses_promote_attach_detach(emu, clients):
    addresses, ops = clients.AddressesClient, clients.RegionOperationsClient
    wait_zone(clients, insert(clients, instance_body("vm-ip")))
    inst = clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="vm-ip")
    ephemeral = inst.network_interfaces[0].access_configs[0].nat_i_p
    # promote the ephemeral address: same IP, now static and IN_USE by the instance
    body = compute_v1.Address(name="vm-ip-fip", address=ephemeral, labels={"labctl-deployment": "dep-a"})
    op = addresses.insert_unary(request={"project": clients.project, "region": REGION, "address_resource": body,
                                         "request_id": str(uuid.uuid4())})
    assert op.region.endswith(f"/regions/{REGION}")
    assert ops.wait(project=clients.project, region=REGION, operation=op.name).status == DONE
    addr = addresses.get(project=clients.project, region=REGION, address="vm-ip-fip")
    assert addr.address == ephemeral and addr.status == "IN_USE" and addr.users[0].endswith("/instances/vm-ip")
    with pytest.raises(gexc.BadRequest, match="already being used"):
        addresses.delete_unary(project=clients.project, region=REGION, address="vm-ip-fip")
    # a fresh reservation, swapped in through the access config
    spare_body = compute_v1.Address(name="spare", labels={"labctl-deployment": "dep-a"})
    op = addresses.insert_unary(project=clients.project, region=REGION, address_resource=spare_body)
    ops.wait(project=clients.project, region=REGION, operation=op.name)
    spare = addresses.get(project=clients.project, region=REGION, address="spare")
    assert spare.status == "RESERVED" and spare.address.startswith("127.30.") and spare.address != ephemeral
    op = clients.InstancesClient.delete_access_config_unary(project=clients.project, zone=ZONE, instance="vm-ip",
                                                            access_config="External NAT", network_interface="nic0")
    wait_zone(clients, op)
    assert addresses.get(project=clients.project, region=REGION, address="vm-ip-fip").status == "RESERVED"
    access = compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT", nat_i_p=spare.address)
    op = clients.InstancesClient.add_access_config_unary(project=clients.project, zone=ZONE, instance="vm-ip",
                                                         network_interface="nic0", access_config_resource=access)
    wait_zone(clients, op)
    inst = clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="vm-ip")
    assert inst.network_interfaces[0].access_configs[0].nat_i_p == spare.address
    listed = addresses.list(request={"project": clients.project, "region": REGION,
                                     "filter": 'labels.labctl-deployment = "dep-a"'})
    assert sorted(a.name for a in listed) == ["spare", "vm-ip-fip"]
    # deleting the instance frees its static address
    wait_zone(clients, clients.InstancesClient.delete_unary(project=clients.project, zone=ZONE, instance="vm-ip"))
    assert addresses.get(project=clients.project, region=REGION, address="spare").status == "RESERVED"
    for name in ("spare", "vm-ip-fip"):
        op = addresses.delete_unary(project=clients.project, region=REGION, address=name)
        ops.wait(project=clients.project, region=REGION, operation=op.name)
    assert emu.world.inventory() == {"instances": [], "firewalls": [], "addresses": []}


def test_catalog_zones_regions_types_images(emu, clients):
    zones = [z.name for z in clients.ZonesClient.list(project=clients.project)]
    assert {"us-central1-a", "us-central1-b", "us-central1-c", "us-central1-f"} <= set(zones)
    region = clients.RegionsClient.get(project=clients.project, region=REGION)
    assert sorted(z.rsplit("/", 1)[-1] for z in region.zones) == ["us-central1-a", "us-central1-b",
                                                                  "us-central1-c", "us-central1-f"]
    mt = clients.MachineTypesClient.get(project=clients.project, zone=ZONE, machine_type="g2-standard-4")
    assert mt.guest_cpus == 4 and mt.accelerators[0].guest_accelerator_type == "nvidia-l4"
    names = {m.name for m in clients.MachineTypesClient.list(project=clients.project, zone=ZONE)}
    assert {"e2-small", "n1-standard-4", "a2-highgpu-1g"} <= names
    accs = {a.name: a for a in clients.AcceleratorTypesClient.list(project=clients.project, zone=ZONE)}
    assert accs["nvidia-tesla-t4"].maximum_cards_per_instance == 4
    agg = clients.MachineTypesClient.aggregated_list(request={"project": clients.project,
                                                              "filter": 'name = "a2-ultragpu-1g"'})
    assert {s.split("/")[-1] for s, scoped in agg if scoped.machine_types} >= {"us-central1-a", "us-central1-c"}
    ubuntu = clients.ImagesClient.get_from_family(project="ubuntu-os-cloud", family="ubuntu-2404-lts-amd64")
    assert ubuntu.name == "ubuntu-2404-noble-amd64-v20251014" and ubuntu.status == "READY"
    dlvm = clients.ImagesClient.get_from_family(project="deeplearning-platform-release",
                                                family="common-cu129-ubuntu-2404-nvidia-580")
    assert dlvm.disk_size_gb == 50
    assert list(clients.ImagesClient.list(project=clients.project)) == []
    old = clients.ImagesClient.get(project="ubuntu-os-cloud", image="ubuntu-2404-noble-amd64-v20250828")
    assert old.deprecated.state == "DEPRECATED"


def test_faults_request_log_and_pagination(emu, clients):
    for i in range(3):
        wait_zone(clients, insert(clients, instance_body(f"page-{i}")))
    emu.world.clear_request_log()
    pager = clients.InstancesClient.list(request={"project": clients.project, "zone": ZONE, "max_results": 2})
    assert [i.name for i in pager] == ["page-0", "page-1", "page-2"]
    assert len(emu.world.request_log()) == 2  # two pages
    emu.world.inject_fault("instances.list", "error503", 1)
    with pytest.raises(gexc.ServiceUnavailable):
        clients.InstancesClient.list(project=clients.project, zone=ZONE, retry=None)
    emu.world.inject_fault("instances.*", "error429", 1)
    with pytest.raises(gexc.TooManyRequests):
        clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="page-0", retry=None)
    detail = emu.world.request_log(detail=True)
    assert [d["operation"] for d in detail[-2:]] == ["instances.list", "instances.get"]
    assert emu.world.faults() == []


def test_latency_delays_one_api_method(emu, clients):
    delay = 0.4 / emu.world.time_scale  # emulated seconds: 0.4 s of real time
    emu.world.set_latency("instances.list", delay)
    started = time.monotonic()
    list(clients.InstancesClient.list(project=clients.project, zone=ZONE))
    assert time.monotonic() - started >= 0.4
    started = time.monotonic()
    clients.ZonesClient.get(project=clients.project, zone=ZONE)  # another method: not delayed
    assert time.monotonic() - started < 0.4
    emu.world.set_latency("instances.list", 0)


def test_ssh_targets_inventory_and_ssh_port(emu, clients, tmp_path):
    wait_zone(clients, insert(clients, instance_body("ssh-1")))
    wait_zone(clients, insert(clients, instance_body("no-ip", external=False)))
    time.sleep(0.1)
    targets = {t["name"]: t for t in emu.world.ssh_targets()}
    assert sorted(targets) == ["no-ip", "ssh-1"]  # without an external IP too: reached through a jump host
    t = targets["ssh-1"]
    assert t["address"].startswith("127.30.") and t["port"] == emu.world.ssh_port
    assert t["authorized_keys"] == [SSH_KEY] and t["user"] == "labctl"
    assert t["node_dir"] == tmp_path / "testbed" / "nodes" / t["server_id"]
    assert targets["no-ip"]["address"] is None
    internal = {t["internal_address"] for t in targets.values()}
    assert len(internal) == 2 and all(a.startswith("127.13.") for a in internal)
    default = f"projects/{emu.project}/global/networks/default"
    assert all(list(t["fixed_ips"]) == [default] and t["fixed_ips"][default].startswith("10.128.")
               for t in targets.values())
    inv = emu.world.inventory()["instances"]
    assert {i["name"]: i["external_ip"] is not None for i in inv} == {"ssh-1": True, "no-ip": False}
    # the SSH port is chosen once, when the world is created
    assert GceWorld(tmp_path / "testbed").ssh_port == emu.world.ssh_port


def test_two_processes_share_one_world(emu, clients, tmp_path):
    """Another process serves the same state dir on its own port: both see one project."""
    code = ("import sys, time\n"
            "from labctl.testbed.gce import start_gce\n"
            f"e = start_gce({str(tmp_path / 'testbed')!r})\n"
            "print(e.endpoint, flush=True)\n"
            "sys.stdin.read()\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "loopback_guard")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:") and endpoint != emu.endpoint
        other = compute_v1.InstancesClient(credentials=emu.credentials(),  # the world's token, read by both
                                           client_options={"api_endpoint": endpoint})
        other.insert_unary(project=clients.project, zone=ZONE, instance_resource=instance_body("from-other"))
        mine = clients.InstancesClient.get(project=clients.project, zone=ZONE, instance="from-other")
        assert mine.self_link.startswith(emu.endpoint)  # links are rendered for the endpoint asked
        emu.world.set_capacity(ZONE, "e2-small", 1)
        op = other.insert_unary(project=clients.project, zone=ZONE, instance_resource=instance_body("second"))
        assert wait_zone(clients, op).error.errors[0].code == "ZONE_RESOURCE_POOL_EXHAUSTED"
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_default_time_scale_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LABCTL_TESTBED_TIME_SCALE", "0.005")
    emulator = start_gce(tmp_path / "env")
    try:
        assert emulator.world.time_scale == 0.005 and emulator.project == "sim-project"
    finally:
        emulator.stop()
    monkeypatch.delenv("LABCTL_TESTBED_TIME_SCALE")
    emulator = start_gce(tmp_path / "default")
    try:
        assert emulator.world.time_scale == 0.01
    finally:
        emulator.stop()
