"""The AWS adapter's private networks (VPC, subnet, internet gateway), EBS volumes and S3 buckets, with real boto3
over HTTP against the emulated EC2 and S3 (moto + front layer on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.fixtures.aws import ec2_client
from tests.fixtures.standin import StandInTestbed

from labctl import sites
from labctl.engine import Engine
from labctl.errors import CloudError, Transient, UserError
from labctl.plan import build_plan
from labctl.profile import load_profile
from labctl.providers import aws as aws_provider
from labctl.providers.aws import session as aws_session
from labctl.providers.base import Found
from labctl.state import StateStore

REGION = "us-east-1"


@pytest.fixture(scope="module")
def public_key(tmp_path_factory: pytest.TempPathFactory) -> str:
    from labctl.keys import ensure_keypair

    return ensure_keypair(tmp_path_factory.mktemp("keys")).public_key


def connect(emu, site: str = "sim-aws"):
    provider = aws_provider.connect(sites.resolve(site), testbed=lambda: StandInTestbed(aws=emu))
    provider.poll_interval = 0.01
    return provider


def lab_plan(tmp_path: Path, public_key: str, owner: str, *, nodes: int = 3, network: bool = True,
             gateway: bool = False, first_ip: int = 11, volume: bool = False, bucket: bool = False,
             types: str = "[t3.micro]", site: str = "sim-aws"):
    lines = [
        "name: awsnet",
        "description: a lab for the AWS network and storage tests",
        "sites: [aws]",
        "lease_hours: 2",
        "image: ubuntu-24.04",
    ]
    if network:
        lines += ["networks:", f"  cluster: {{cidr: 192.168.1.0/24, gateway: {str(gateway).lower()}, "
                  "port_security: false}"]
    lines += [
        "nodes:",
        "  node:",
        f"    count: {nodes}",
        "    floating_ip: first",
        "    types:",
        f"      aws: {types}",
        *([f"    networks: [{{network: cluster, first_ip: {first_ip}}}]"] if network else []),
        "ports: [22, 8888]",
    ]
    if volume:
        lines += ["volumes:", "  block: {size_gb: 2, node: node-1, mount: /mnt/block, keep: true}"]
    if bucket:
        lines += ["object_stores:", "  data: {keep: true}"]
    path = tmp_path / "awsnet.yaml"
    path.write_text("\n".join(lines) + "\n")
    return build_plan(load_profile(path), sites.resolve(site), owner, public_key)


def mine(emu, deployment: str) -> dict[str, list]:
    """The emulator's inventory of `deployment` (by its tag), kinds with nothing left out."""
    inv = emu.world.inventory(REGION)
    out = {kind: [x for x in items if x["tags"].get("labctl:deployment") == deployment] for kind, items in inv.items()}
    return {kind: items for kind, items in out.items() if items}


def created(emu, deployment: str) -> list[str]:
    return [a for a, s in emu.world.request_log() if a.startswith(("Create", "RunInstances", "Allocate"))
            and deployment in s]


# -- networks --------------------------------------------------------------------------------------------


def test_network_lab_vpc_subnet_gateway_fixed_ips_and_teardown(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "net")
    provider = connect(emu)
    provider.preflight(plan)
    store = StateStore(tmp_path / "s.db")
    found = Engine(provider, store).apply(plan)
    net_name = plan.get("network:cluster").name
    have = mine(emu, plan.deployment)
    (vpc,) = have["vpcs"]
    assert vpc["cidr"] == "192.168.1.0/24" and vpc["name"] == net_name
    assert found["network:cluster"].cloud_id == vpc["id"]
    assert vpc["tags"]["labctl:owner"] == "net" and vpc["tags"]["labctl:lab"] == "awsnet"
    (igw,) = have["internet_gateways"]
    assert igw["vpc_ids"] == [vpc["id"]]
    cli = ec2_client(emu)
    (table,) = cli.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc["id"]]}])["RouteTables"]
    assert {"DestinationCidrBlock": "0.0.0.0/0", "GatewayId": igw["id"]}.items() <= next(
        r for r in table["Routes"] if r.get("DestinationCidrBlock") == "0.0.0.0/0").items()
    (subnet,) = have["subnets"]
    assert subnet["cidr"] == "192.168.1.0/24" and subnet["vpc_id"] == vpc["id"] and subnet["zone"] == "us-east-1a"
    assert found["subnet:cluster"].attrs["zone"] == "us-east-1a"
    (sg,) = have["security_groups"]
    assert sg["vpc_id"] == vpc["id"]
    assert ("-1", None, None, ["192.168.1.0/24"]) in sg["ingress"] and ("tcp", 22, 22, ["0.0.0.0/0"]) in sg["ingress"]
    instances = sorted(have["instances"], key=lambda i: i["private_ip"])
    assert [i["private_ip"] for i in instances] == ["192.168.1.11", "192.168.1.12", "192.168.1.13"]
    raw = {i["InstanceId"]: i for r in cli.describe_instances(InstanceIds=[i["id"] for i in instances])["Reservations"]
           for i in r["Instances"]}
    assert all(raw[i["id"]]["SubnetId"] == subnet["id"] and raw[i["id"]]["VpcId"] == vpc["id"] for i in instances)
    assert all(i["public_ip"] and i["public_ip"].startswith("127.20.") for i in instances)  # outbound traffic
    (eip,) = have["addresses"]
    assert eip["instance_id"] == found["server:node-1"].cloud_id
    assert sorted(k for k in found if k.startswith("floating_ip:")) == ["floating_ip:node-1"]
    for k in (1, 2, 3):
        assert found[f"server:node-{k}"].attrs["private_ips"] == {net_name: f"192.168.1.1{k}"}
        assert found[f"server:node-{k}"].attrs["fixed_ip"] == f"192.168.1.1{k}"
    # The SSH side: every node on an internal loopback address, reachable through its VPC at its private IP.
    targets = {t["server_id"]: t for t in emu.world.ssh_targets()}
    for k in (1, 2, 3):
        t = targets[found[f"server:node-{k}"].cloud_id]
        assert t["fixed_ips"] == {vpc["id"]: f"192.168.1.1{k}"} and t["internal_address"].startswith("127.12.")
    assert len({t["internal_address"] for t in targets.values()}) == len(targets)
    kinds = sorted(f.kind for f in provider.list_owned(plan))
    assert kinds == ["floating_ip", "keypair", "network", "network", "secgroup", "server", "server", "server",
                     "subnet"]

    # Applying again changes nothing.
    before = len(emu.world.request_log())
    again = Engine(provider, store).apply(plan)
    assert {k: f.cloud_id for k, f in again.items()} == {k: f.cloud_id for k, f in found.items()}
    assert not [a for a, _ in emu.world.request_log()[before:] if a.startswith(("Create", "Run", "Allocate",
                                                                                 "Attach", "Authorize"))]

    assert Engine(provider, store).destroy(plan) == []
    assert mine(emu, plan.deployment) == {}


def test_lost_answers_make_one_vpc_gateway_and_subnet(emu, tmp_path: Path, public_key: str):
    """CreateVpc, CreateInternetGateway and CreateSubnet carry no idempotency token: a lost answer is followed by
    a look-up by tags, never by a second one."""
    plan = lab_plan(tmp_path, public_key, "lostnet", nodes=1)
    provider = connect(emu)
    for action in ("CreateVpc", "CreateInternetGateway", "CreateSubnet", "CreateSecurityGroup"):
        emu.world.inject_fault(action, "timeout_after", 1)
    found = Engine(provider, StateStore(tmp_path / "s.db")).apply(plan)
    have = mine(emu, plan.deployment)
    assert [len(have[k]) for k in ("vpcs", "internet_gateways", "subnets", "security_groups")] == [1, 1, 1, 1]
    assert found["network:cluster"].cloud_id == have["vpcs"][0]["id"]
    sent = created(emu, plan.deployment)
    assert (sent.count("CreateVpc"), sent.count("CreateInternetGateway"), sent.count("CreateSubnet")) == (1, 1, 1)
    assert Engine(provider, StateStore(tmp_path / "s.db")).destroy(plan) == []
    assert mine(emu, plan.deployment) == {}


def test_two_racing_runs_end_with_one_vpc_gateway_and_subnet(emu, tmp_path: Path, public_key: str):
    """Two `up`s of one deployment that share no state both find nothing and both create: CreateVpc, CreateSubnet
    and CreateInternetGateway have no idempotency token and no unique names, so each racer lists again after its
    create and both keep the same one (deleting only the extra it made itself)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    plan = lab_plan(tmp_path, public_key, "racenet", nodes=1)
    net, sub = plan.get("network:cluster"), plan.get("subnet:cluster")
    start = threading.Barrier(2)

    def up(provider):
        start.wait()
        network = provider.create(net, plan, {}, None)
        return network, provider.create(sub, plan, {"network:cluster": network}, None)

    with ThreadPoolExecutor(2) as pool:
        (net_a, sub_a), (net_b, sub_b) = pool.map(up, [connect(emu), connect(emu)])
    have = mine(emu, plan.deployment)
    assert [len(have[k]) for k in ("vpcs", "internet_gateways", "subnets")] == [1, 1, 1]
    assert net_a.cloud_id == net_b.cloud_id == have["vpcs"][0]["id"]
    assert sub_a.cloud_id == sub_b.cloud_id == have["subnets"][0]["id"]
    assert have["internet_gateways"][0]["vpc_ids"] == [net_a.cloud_id]
    assert connect(emu).find(net, plan).status == "ready"
    assert Engine(connect(emu), StateStore(tmp_path / "empty.db")).destroy(plan) == []
    assert mine(emu, plan.deployment) == {}


def test_crash_between_vpc_and_gateway_is_finished_by_a_rerun(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "halfnet", nodes=1)
    provider = connect(emu)
    provider.call_retries = 1
    net = plan.get("network:cluster")
    emu.world.inject_fault("AttachInternetGateway", "error503", 10)  # botocore's retry included
    with pytest.raises(CloudError):
        provider.create(net, plan, {}, None)
    emu.world.clear_faults()
    half = provider.find(net, plan)
    assert half is not None and half.status == "incomplete"
    done = provider.create(net, plan, {}, None)
    assert done.cloud_id == half.cloud_id and provider.find(net, plan).status == "ready"
    have = mine(emu, plan.deployment)
    assert len(have["vpcs"]) == 1 and [g["vpc_ids"] for g in have["internet_gateways"]] == [[done.cloud_id]]
    # The route is the last step: lose it, and find says incomplete again.
    table = done.attrs["route_table"]
    ec2_client(emu).delete_route(RouteTableId=table, DestinationCidrBlock="0.0.0.0/0")
    assert provider.find(net, plan).status == "incomplete"
    assert provider.create(net, plan, {}, None).cloud_id == done.cloud_id
    assert provider.find(net, plan).status == "ready"
    # `down` after the crash: the store knows nothing, the tags say everything.
    assert Engine(provider, StateStore(tmp_path / "empty.db")).destroy(plan) == []
    assert mine(emu, plan.deployment) == {}


def test_stray_gateway_of_a_crashed_run_is_removed_by_down(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "stray", nodes=1)
    provider = connect(emu)
    provider.call_retries = 1
    emu.world.inject_fault("AttachInternetGateway", "error503", 10)
    with pytest.raises(CloudError):
        provider.create(plan.get("network:cluster"), plan, {}, None)
    emu.world.clear_faults()
    ec2_client(emu).delete_vpc(VpcId=mine(emu, plan.deployment)["vpcs"][0]["id"])  # only the gateway is left
    assert [g["vpc_ids"] for g in mine(emu, plan.deployment)["internet_gateways"]] == [[]]
    assert [f.kind for f in provider.list_owned(plan)] == ["network"]
    assert Engine(provider, StateStore(tmp_path / "empty.db")).destroy(plan) == []
    assert mine(emu, plan.deployment) == {}


def test_subnet_and_vpc_delete_retry_while_something_is_in_them(emu, tmp_path: Path, public_key: str,
                                                                monkeypatch: pytest.MonkeyPatch):
    """DependencyViolation (an interface of a terminated instance lingers) is retried, for a bounded time."""
    plan = lab_plan(tmp_path, public_key, "linger", nodes=1)
    provider = connect(emu)
    net = provider.create(plan.get("network:cluster"), plan, {}, None)
    subnet = provider.create(plan.get("subnet:cluster"), plan, {"network:cluster": net}, None)
    cli = ec2_client(emu)
    eni = cli.create_network_interface(SubnetId=subnet.cloud_id)["NetworkInterface"]["NetworkInterfaceId"]
    monkeypatch.setattr(aws_session, "IN_USE_GRACE", 0.3)
    emu.world.clear_request_log()
    with pytest.raises(CloudError, match="DependencyViolation"):
        provider.delete("subnet", [subnet], plan)
    assert [a for a, _ in emu.world.request_log()].count("DeleteSubnet") > 2
    cli.delete_network_interface(NetworkInterfaceId=eni)
    assert Engine(provider, StateStore(tmp_path / "empty.db")).destroy(plan) == []
    assert mine(emu, plan.deployment) == {}


def test_router_is_the_networks_gateway(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "router", nodes=1, gateway=True)
    provider = connect(emu)
    store = StateStore(tmp_path / "s.db")
    found = Engine(provider, store).apply(plan)
    router = found["router:cluster"]
    assert router.status == "ready" and router.cloud_id == found["network:cluster"].attrs["internet_gateway"]
    assert provider.find(plan.get("router:cluster"), plan).cloud_id == router.cloud_id
    assert "router" not in {f.kind for f in provider.list_owned(plan)}
    provider.delete("router", [router], plan)  # nothing of its own: the gateway goes with the VPC
    assert len(mine(emu, plan.deployment)["internet_gateways"]) == 1
    assert Engine(provider, store).destroy(plan) == []
    assert mine(emu, plan.deployment) == {}


def test_reserved_fixed_ip_fails_preflight(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "reserved", nodes=1, first_ip=3)
    with pytest.raises(UserError, match="AWS keeps the first four"):
        connect(emu).preflight(plan)


# -- volumes and buckets ---------------------------------------------------------------------------------


def test_volume_and_bucket_kept_across_down_and_reused(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "vol", nodes=1, network=False, volume=True, bucket=True)
    provider = connect(emu)
    provider.preflight(plan)
    store = StateStore(tmp_path / "s.db")
    emu.world.set_capacity("us-east-1a", "t3.micro", 0)  # the first server lands in us-east-1b
    found = Engine(provider, store).apply(plan)
    emu.world.set_capacity("us-east-1a", "t3.micro", None)
    server, vol, att = found["server:node-1"], found["volume:block"], found["volume_attachment:block"]
    assert server.attrs["zone"] == "us-east-1b"
    assert vol.attrs["zone"] == "us-east-1b" and vol.attrs["size_gb"] == 2 and vol.attrs["keep"] is True
    assert vol.attrs["key"] == "volume:block"
    volume_id = vol.cloud_id
    assert att.status == "ready" and att.attrs["volume_id"] == volume_id and att.attrs["device"] == "/dev/sdf"
    assert att.attrs["device_paths"] == [
        f"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{volume_id.replace('-', '')}", "/dev/xvdf", "/dev/sdf"]
    (v,) = mine(emu, plan.deployment)["volumes"]
    assert v["state"] == "in-use" and v["type"] == "gp3" and v["attachments"] == [
        {"instance_id": server.cloud_id, "device": "/dev/sdf", "state": "attached"}]
    assert v["tags"]["labctl:keep"] == "true" and v["name"] == plan.get("volume:block").name
    bucket = found["bucket:data"]
    assert bucket.cloud_id == plan.get("bucket:data").name and bucket.attrs["keep"] is True
    (b,) = mine(emu, plan.deployment)["buckets"]
    assert b["name"] == bucket.cloud_id and b["tags"]["labctl:keep"] == "true"
    s3 = provider.s3
    s3.put_object(Bucket=bucket.cloud_id, Key="data/a.txt", Body=b"kept")
    kinds = sorted(f.kind for f in provider.list_owned(plan))
    assert kinds == ["bucket", "floating_ip", "keypair", "secgroup", "server", "volume", "volume_attachment"]
    # Attaching again is a no-op.
    assert provider.create(plan.get("volume_attachment:block"), plan, found, None).cloud_id == att.cloud_id

    engine = Engine(provider, store)
    assert engine.destroy(plan, keep=True) == []
    assert sorted(f.kind for f in engine.kept) == ["bucket", "volume"]
    have = mine(emu, plan.deployment)
    assert sorted(have) == ["buckets", "volumes"]
    assert have["volumes"][0]["state"] == "available" and have["volumes"][0]["attachments"] == []
    assert have["buckets"][0]["objects"] == 1

    # The next `up` reuses the kept volume and launches its server in the volume's zone (us-east-1a is free now).
    again = Engine(provider, store).apply(plan)
    assert again["server:node-1"].cloud_id != server.cloud_id and again["server:node-1"].attrs["zone"] == "us-east-1b"
    assert again["volume:block"].cloud_id == volume_id
    (v,) = mine(emu, plan.deployment)["volumes"]
    assert v["attachments"] == [{"instance_id": again["server:node-1"].cloud_id, "device": "/dev/sdf",
                                 "state": "attached"}]
    assert created(emu, plan.deployment).count("CreateVolume") == 1

    assert Engine(provider, store).destroy(plan, keep=False) == []  # the bucket is not empty: emptied first
    assert mine(emu, plan.deployment) == {}


def test_volume_attached_to_an_old_instance_is_moved(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "move", nodes=1, network=False, volume=True)
    provider = connect(emu)
    store = StateStore(tmp_path / "s.db")
    found = Engine(provider, store).apply(plan)
    old = found["server:node-1"]
    # Another instance in the same zone (the server of a newer run) takes the volume over.
    new = provider.create(plan.get("server:node-1"), plan, found, "t3.small")
    assert new.cloud_id != old.cloud_id and new.attrs["zone"] == old.attrs["zone"]
    deps = {**found, "server:node-1": new}
    att = provider.create(plan.get("volume_attachment:block"), plan, deps, None)
    assert att.cloud_id == f"{new.cloud_id}/{found['volume:block'].cloud_id}"
    (v,) = mine(emu, plan.deployment)["volumes"]
    assert [a["instance_id"] for a in v["attachments"]] == [new.cloud_id]
    # Deleting the attachment detaches; deleting an attached volume detaches it first.
    provider.delete("volume_attachment", [att], plan)
    assert mine(emu, plan.deployment)["volumes"][0]["state"] == "available"
    provider.create(plan.get("volume_attachment:block"), plan, deps, None)
    provider.delete("volume", [found["volume:block"]], plan)
    assert "volumes" not in mine(emu, plan.deployment)
    provider.delete("server", [old, new], plan)
    assert Engine(provider, store).destroy(plan) == []
    assert mine(emu, plan.deployment) == {}


def test_everything_is_found_by_tags_after_a_lost_state(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "lost", nodes=2, volume=True, bucket=True)
    provider = connect(emu)
    Engine(provider, StateStore(tmp_path / "s.db")).apply(plan)
    kinds = sorted(f.kind for f in provider.list_owned(plan))
    assert kinds == ["bucket", "floating_ip", "keypair", "network", "network", "secgroup", "server", "server",
                     "subnet", "volume", "volume_attachment"]
    # The kept volume and bucket survive a `down` that lost its state, and go with --delete-volumes.
    engine = Engine(provider, StateStore(tmp_path / "empty.db"))
    assert engine.destroy(plan, keep=True) == []
    assert sorted(mine(emu, plan.deployment)) == ["buckets", "volumes"]
    assert {f.attrs.get("key") for f in engine.kept} == {"volume:block", "bucket:data"}
    assert Engine(provider, StateStore(tmp_path / "empty.db")).destroy(plan) == []
    assert mine(emu, plan.deployment) == {}


def test_bucket_names_and_another_accounts_bucket(emu, tmp_path: Path, public_key: str):
    assert aws_provider.bucket_name("labctl-Alice-data_persist-x") == "labctl-alice-data-persist-x"
    assert aws_provider.bucket_name("ab") is None and aws_provider.bucket_name("a" * 64) is None
    assert aws_provider.bucket_name("labctl-a-b-") is None and aws_provider.bucket_name("192.168.1.10") is None
    plan = lab_plan(tmp_path, public_key, "foreign", nodes=1, network=False, bucket=True)
    provider = connect(emu)
    res = plan.get("bucket:data")
    emu.world.claim_bucket(res.name)
    assert provider.find(res, plan) is None
    with pytest.raises(CloudError, match="taken by another AWS account"):
        provider.create(res, plan, {}, None)
    emu.world.reset_controls()
    # A bucket made by a run that crashed before tagging it is finished (tagged) by the next create.
    provider.s3.create_bucket(Bucket=res.name)
    assert provider.find(res, plan).status == "incomplete"
    made = provider.create(res, plan, {}, None)
    assert made.attrs == {"keep": True, "key": "bucket:data"} and provider.find(res, plan).status == "ready"
    provider.delete("bucket", [made], plan)
    assert provider.find(res, plan) is None
    provider.delete("bucket", [made], plan)  # gone already: fine
    long = lab_plan(tmp_path, public_key, "a-very-long-owner-name-x", nodes=1, network=False, bucket=True)
    object.__setattr__(long.get("bucket:data"), "name", "x" * 70)
    with pytest.raises(UserError, match="not a valid bucket name"):
        provider.preflight(long)


# -- the emulator's EC2 checks ---------------------------------------------------------------------------


def test_emulator_refuses_what_ec2_refuses(emu):
    cli = ec2_client(emu)
    image = cli.describe_images(Owners=["099720109477"])["Images"][0]["ImageId"]
    vpc = cli.create_vpc(CidrBlock="10.9.0.0/24")["Vpc"]["VpcId"]
    subnet = cli.create_subnet(VpcId=vpc, CidrBlock="10.9.0.0/24", AvailabilityZone="us-east-1c")["Subnet"]["SubnetId"]
    igw = cli.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    cli.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    inst = cli.run_instances(ImageId=image, InstanceType="t3.micro", MinCount=1, MaxCount=1, NetworkInterfaces=[
        {"DeviceIndex": 0, "SubnetId": subnet, "PrivateIpAddress": "10.9.0.20", "AssociatePublicIpAddress": False,
         "DeleteOnTermination": True}])["Instances"][0]
    assert inst["PrivateIpAddress"] == "10.9.0.20" and not inst.get("PublicIpAddress")
    (target,) = [t for t in emu.world.ssh_targets() if t["server_id"] == inst["InstanceId"]]
    assert target["address"] is None and target["fixed_ips"] == {vpc: "10.9.0.20"}  # reachable only via a jump
    vol = cli.create_volume(AvailabilityZone="us-east-1c", Size=1)["VolumeId"]
    other = cli.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    cli.attach_volume(VolumeId=vol, InstanceId=inst["InstanceId"], Device="/dev/sdf")
    from botocore.exceptions import ClientError

    def code(fn) -> str:
        with pytest.raises(ClientError) as err:
            fn()
        return err.value.response["Error"]["Code"]

    assert code(lambda: cli.attach_volume(VolumeId=vol, InstanceId=inst["InstanceId"], Device="/dev/sdg")) == \
        "VolumeInUse"
    assert code(lambda: cli.attach_volume(VolumeId=other, InstanceId=inst["InstanceId"], Device="/dev/sdg")) == \
        "InvalidVolume.ZoneMismatch"
    assert code(lambda: cli.delete_subnet(SubnetId=subnet)) == "DependencyViolation"
    assert code(lambda: cli.delete_vpc(VpcId=vpc)) == "DependencyViolation"
    cli.detach_volume(VolumeId=vol)  # without InstanceId, as EC2 allows
    assert code(lambda: cli.detach_volume(VolumeId=vol)) == "IncorrectState"
    cli.terminate_instances(InstanceIds=[inst["InstanceId"]])
    cli.delete_subnet(SubnetId=subnet)
    assert code(lambda: cli.delete_vpc(VpcId=vpc)) == "DependencyViolation"  # the gateway is still attached
    cli.detach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    cli.delete_internet_gateway(InternetGatewayId=igw)
    cli.delete_vpc(VpcId=vpc)
    for v in (vol, other):
        cli.delete_volume(VolumeId=v)


def test_instance_without_public_ip_is_reached_through_one_with(emu, tmp_path: Path):
    """The SSH side: an instance without a public IP has no public listener, but answers at its private IP:22 when
    an instance of the same VPC forwards there (`ssh -J`); one of another VPC does not."""
    import asyncio
    import uuid

    import asyncssh

    from labctl.keys import ensure_keypair
    from labctl.testbed.sshd import SSHNodes

    key = ensure_keypair(tmp_path / "keys")
    cli = ec2_client(emu)
    name = f"jump-{uuid.uuid4().hex[:8]}"
    cli.import_key_pair(KeyName=name, PublicKeyMaterial=key.public_key.encode())
    image = cli.describe_images(Owners=["099720109477"])["Images"][0]["ImageId"]
    subnets = {}
    for cidr in ("10.7.0.0/24", "10.8.0.0/24"):
        vpc = cli.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
        subnet = cli.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone="us-east-1a")["Subnet"]
        subnets[cidr] = subnet["SubnetId"]
        # SSH from outside needs an inbound rule for 22; the VPC's default group already admits its members.
        default = cli.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]},
                                                        {"Name": "group-name", "Values": ["default"]}])
        cli.authorize_security_group_ingress(GroupId=default["SecurityGroups"][0]["GroupId"], IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    launched = [cli.run_instances(ImageId=image, InstanceType="t3.micro", MinCount=1, MaxCount=1, KeyName=name,
                                  NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": subnets[cidr],
                                                      "AssociatePublicIpAddress": public,
                                                      "DeleteOnTermination": True}])["Instances"][0]
                for cidr, public in (("10.7.0.0/24", True), ("10.7.0.0/24", False), ("10.8.0.0/24", False))]
    jump, inner, other = launched
    assert jump["PublicIpAddress"].startswith("127.20.") and not inner.get("PublicIpAddress")
    port = emu.world.ssh_port
    nodes = SSHNodes(emu.world, poll_interval=0.02).start()
    try:
        targets = {t["server_id"]: t for t in emu.world.ssh_targets()}
        nodes.wait_listening(jump["PublicIpAddress"], port, 10)
        nodes.wait_listening(targets[inner["InstanceId"]]["internal_address"], port, 10)
        assert not any(a == inner.get("PublicIpAddress") for a, _ in nodes.listening())

        async def through(dest: str) -> str:
            options = {"username": "ubuntu", "known_hosts": None, "client_keys": [str(key.private_path)]}
            async with asyncssh.connect(jump["PublicIpAddress"], port, **options) as hop, \
                    asyncssh.connect(dest, 22, tunnel=hop, **options) as conn:
                return (await conn.run("echo $LABCTL_SERVER_ID", check=True)).stdout.strip()

        assert asyncio.run(through(inner["PrivateIpAddress"])) == inner["InstanceId"]
        with pytest.raises((asyncssh.ChannelOpenError, OSError)):
            asyncio.run(through(other["PrivateIpAddress"]))  # another VPC: not reachable from the jump host
    finally:
        nodes.stop()
        cli.terminate_instances(InstanceIds=[i["InstanceId"] for i in launched])
        for subnet in subnets.values():
            cli.delete_subnet(SubnetId=subnet)
        for vpc in {i["VpcId"] for i in launched}:
            cli.delete_vpc(VpcId=vpc)
        cli.delete_key_pair(KeyName=name)


def test_wait_polls_volumes_and_attachments_in_one_call_per_round(emu, tmp_path: Path, public_key: str,
                                                                   monkeypatch: pytest.MonkeyPatch):
    plan = lab_plan(tmp_path, public_key, "pollvol", nodes=1, network=False, volume=True)
    provider = connect(emu)
    found = Engine(provider, StateStore(tmp_path / "s.db")).apply(plan)
    vol, att = found["volume:block"], found["volume_attachment:block"]
    # As EC2 answers while a volume is being made / attached ("creating", "attaching"): pending until polled.
    vol.status, att.status = "pending", "pending"
    emu.world.clear_request_log()
    progress: list[tuple[str, str]] = []
    done = provider.wait([(plan.get("volume:block"), vol), (plan.get("volume_attachment:block"), att)], plan, 30,
                         lambda key, stage, detail: progress.append((key, stage)))
    assert [f.status for f in done] == ["ready", "ready"]
    assert [a for a, _ in emu.world.request_log()] == ["DescribeVolumes"]
    assert ("volume:block", "in-use") in progress and ("volume_attachment:block", "attached") in progress
    # A volume that went away while waited for is an error, not a hang.
    monkeypatch.setattr(aws_provider, "MISSING_GRACE", 0.0)
    gone = Found("volume", "vol-0123456789abcdef0", "x", status="pending")
    (f,) = provider.wait([(plan.get("volume:block"), gone)], plan, 30, lambda *a: None)
    assert f.status == "error" and "disappeared" in f.error
    assert Engine(provider, StateStore(tmp_path / "s.db")).destroy(plan) == []


def test_transient_errors_on_volume_calls_are_retried(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "retry", nodes=1, network=False, volume=True)
    provider = connect(emu)
    emu.world.inject_fault("CreateVolume", "timeout_after", 1)  # the token makes the resend harmless
    emu.world.inject_fault("AttachVolume", "error503", 1)
    found = Engine(provider, StateStore(tmp_path / "s.db")).apply(plan)
    assert found["volume_attachment:block"].status == "ready"
    assert len(mine(emu, plan.deployment)["volumes"]) == 1
    emu.world.inject_fault("DescribeVolumes", "error503", 100)
    provider.call_retries = 1
    with pytest.raises(Transient):
        provider.list_owned(plan)
    emu.world.clear_faults()
    assert Engine(provider, StateStore(tmp_path / "s.db")).destroy(plan) == []
    assert mine(emu, plan.deployment) == {}


def test_a_region_without_a_default_vpc_serves_labs_on_their_own_network(emu, tmp_path: Path, public_key: str):
    """Many accounts delete the default VPC: a lab with its own network does not need it; one without says so."""
    import dataclasses

    region = "eu-west-1"
    ec2 = ec2_client(emu, region)
    (vpc,) = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    for subnet in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])["Subnets"]:
        ec2.delete_subnet(SubnetId=subnet["SubnetId"])
    for igw in ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id",
                                                        "Values": [vpc["VpcId"]]}])["InternetGateways"]:
        ec2.detach_internet_gateway(InternetGatewayId=igw["InternetGatewayId"], VpcId=vpc["VpcId"])
        ec2.delete_internet_gateway(InternetGatewayId=igw["InternetGatewayId"])
    ec2.delete_vpc(VpcId=vpc["VpcId"])
    base = sites.resolve("sim-aws")
    site = dataclasses.replace(base, name="sim-aws-eu", region=region)
    provider = aws_provider.connect(site, testbed=lambda: StandInTestbed(aws=emu))
    networked = lab_plan(tmp_path, public_key, "nodefault")
    networked.site = site
    provider.preflight(networked)  # no default VPC asked for
    plain = lab_plan(tmp_path, public_key, "nodefault2", network=False)
    plain.site = site
    with pytest.raises(UserError, match="has no default VPC"):
        provider.preflight(plain)
