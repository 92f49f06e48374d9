"""The end an AWS node enforces itself (terminate on power-off, its end tag read from instance metadata by a timer in
its user data) and `inventory()`, with real boto3 over HTTP against the emulated EC2 and S3; the emulator ends an
instance only when it carries the whole mechanism."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from tests.fixtures.standin import StandInTestbed

from labctl import sites
from labctl.engine import Engine
from labctl.errors import UserError
from labctl.plan import build_plan
from labctl.profile import load_profile
from labctl.providers import aws as aws_provider
from labctl.providers.base import Found
from labctl.state import StateStore

REGION = "us-east-1"
END_TAG = "labctl-ends-at"


@pytest.fixture(scope="module")
def public_key(tmp_path_factory: pytest.TempPathFactory) -> str:
    from labctl.keys import ensure_keypair

    return ensure_keypair(tmp_path_factory.mktemp("keys")).public_key


@pytest.fixture
def scale(emu):
    """Lease ends at 3/1000 for this test only: an hour lasts 10.8 s, time enough for the checks before the end."""
    before = emu.world.lease_scale
    emu.world.set_lease_scale(0.003)
    yield 0.003
    emu.world.set_lease_scale(before)


def connect(emu):
    provider = aws_provider.connect(sites.resolve("sim-aws"), testbed=lambda: StandInTestbed(aws=emu))
    provider.poll_interval = 0.01
    return provider


def lab_plan(tmp_path: Path, public_key: str, owner: str, *, network: bool = False, storage: bool = False,
             extra_keys: tuple[str, ...] = ()):
    lines = ["name: awsend", "description: a lab for the AWS lease end tests", "sites: [aws]", "lease_hours: 1",
             "image: ubuntu-24.04"]
    if network:
        lines += ["networks:", "  cluster: {cidr: 192.168.7.0/24, gateway: false, port_security: false}"]
    lines += ["nodes:", "  node:", "    count: 1", "    floating_ip: true", "    types:", "      aws: [t3.micro]",
              *(["    networks: [{network: cluster, first_ip: 11}]"] if network else []), "ports: [22]"]
    if storage:
        lines += ["volumes:", "  block: {size_gb: 1, node: node-1, mount: /mnt/block, keep: true}",
                  "object_stores:", "  data: {keep: true}"]
    path = tmp_path / "awsend.yaml"
    path.write_text("\n".join(lines) + "\n")
    return build_plan(load_profile(path), sites.resolve("sim-aws"), owner, public_key, extra_keys=extra_keys)


def state_of(emu, instance_id: str) -> str:
    (r,) = emu.world.client(REGION).describe_instances(InstanceIds=[instance_id])["Reservations"]
    return r["Instances"][0]["State"]["Name"]


def until(condition, timeout: float) -> bool:
    """Poll `condition()` (the emulator's reaper runs every 0.25 s) until it holds or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def launch(emu, provider, plan) -> Found:
    deps = {"keypair": provider.create(plan.get("keypair"), plan, {}, None),
            "secgroup": provider.create(plan.get("secgroup"), plan, {}, None)}
    return provider.create(plan.get("server:node-1"), plan, deps, "t3.micro")


def test_a_node_carries_its_end_and_ends_itself_there(emu, tmp_path: Path, public_key: str, scale: float):
    extra = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExtraKeyForTheLeaseTest extra@example"
    plan = lab_plan(tmp_path, public_key, "ender", extra_keys=(extra,))
    provider = connect(emu)
    before = datetime.now(UTC).replace(microsecond=0)
    server = launch(emu, provider, plan)
    cli = emu.world.client(REGION)
    (inst,) = cli.describe_instances(InstanceIds=[server.cloud_id])["Reservations"][0]["Instances"]
    end = {t["Key"]: t["Value"] for t in inst["Tags"]}[END_TAG]
    assert server.attrs["end"] == end
    assert before + timedelta(hours=1) <= datetime.fromisoformat(end) <= datetime.now(UTC) + timedelta(hours=1)
    assert inst["MetadataOptions"]["InstanceMetadataTags"] == "enabled"
    assert cli.describe_instance_attribute(InstanceId=server.cloud_id, Attribute="instanceInitiatedShutdownBehavior")[
        "InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    data = base64.b64decode(cli.describe_instance_attribute(
        InstanceId=server.cloud_id, Attribute="userData")["UserData"]["Value"]).decode()
    assert data.startswith("#cloud-config\n") and f"meta-data/tags/instance/{END_TAG}" in data
    assert "X-aws-ec2-metadata-token" in data and "labctl-lease.timer" in data
    doc = yaml.safe_load(data)  # what cloud-init parses: the extra key and the timer's files
    assert doc["ssh_authorized_keys"] == [extra] and "systemctl enable --now labctl-lease.timer" in doc["runcmd"][0]
    assert {f["path"] for f in doc["write_files"]} == {"/usr/local/sbin/labctl-lease-check",
                                                       "/etc/systemd/system/labctl-lease.service",
                                                       "/etc/systemd/system/labctl-lease.timer"}
    # The extra key still reaches the node (cloud-config's ssh_authorized_keys), beside the key pair's.
    (target,) = [t for t in emu.world.ssh_targets() if t["server_id"] == server.cloud_id]
    assert target["authorized_keys"] == [public_key, extra]
    # The root volume goes with the instance (DeleteOnTermination), nothing else is attached to it.
    launched = inst["LaunchTime"].timestamp()
    assert until(lambda: state_of(emu, server.cloud_id) in ("shutting-down", "terminated"), 3600 * scale + 10)
    assert time.time() >= launched + 3600 * scale
    assert provider.find(plan.get("server:node-1"), plan) is None
    assert Engine(provider, StateStore(tmp_path / "s.db")).destroy(plan) == []


def test_extend_moves_the_end_and_the_node_outlives_the_old_one(emu, tmp_path: Path, public_key: str, scale: float):
    plan = lab_plan(tmp_path, public_key, "extender")
    provider = connect(emu)
    server = launch(emu, provider, plan)
    moved = provider.extend(Found("server", server.cloud_id, server.name), 1, plan)
    old, new = (datetime.fromisoformat(e) for e in (server.attrs["end"], moved.attrs["end"]))
    assert new - old == timedelta(hours=1)
    assert provider.find(plan.get("server:node-1"), plan).attrs["end"] == moved.attrs["end"]
    (inst,) = emu.world.client(REGION).describe_instances(InstanceIds=[server.cloud_id])["Reservations"][0][
        "Instances"]
    launched = inst["LaunchTime"].timestamp()
    old_end = launched + (old.timestamp() - launched) * scale
    assert until(lambda: time.time() > old_end + 1, 3600 * scale + 5)  # a second past the old end (4 reaper rounds)
    assert state_of(emu, server.cloud_id) == "running"
    assert until(lambda: state_of(emu, server.cloud_id) in ("shutting-down", "terminated"), 3600 * scale + 10)
    assert Engine(provider, StateStore(tmp_path / "s.db")).destroy(plan) == []
    with pytest.raises(UserError, match="not running"):
        provider.extend(Found("server", server.cloud_id, server.name), 1, plan)
    with pytest.raises(UserError, match="only a server"):
        provider.extend(Found("reservation", "lease-1", "lease"), 1, plan)


def test_the_emulator_ends_only_instances_that_carry_the_whole_mechanism(emu, scale: float):
    """An instance past its end tag runs on without labctl's timer in its user data, or without its tags in its
    metadata; with both it powers off: terminated with shutdown behaviour terminate, stopped with stop."""
    cli = emu.world.client(REGION)
    image = cli.describe_images(Owners=["099720109477"])["Images"][0]["ImageId"]
    timer = _user_data()
    past = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def run(user_data: str, tags: str, behaviour: str) -> str:
        return cli.run_instances(
            ImageId=image, InstanceType="t3.micro", MinCount=1, MaxCount=1, UserData=user_data,
            InstanceInitiatedShutdownBehavior=behaviour, MetadataOptions={"InstanceMetadataTags": tags},
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": END_TAG, "Value": past}]}],
        )["Instances"][0]["InstanceId"]

    no_timer = run("#cloud-config\n", "enabled", "terminate")
    no_tags = run(timer, "disabled", "terminate")
    stops = run(timer, "enabled", "stop")
    ends = run(timer, "enabled", "terminate")
    assert until(lambda: state_of(emu, ends) in ("shutting-down", "terminated"), 10)
    assert until(lambda: state_of(emu, stops) in ("stopping", "stopped"), 10)
    assert state_of(emu, no_timer) == state_of(emu, no_tags) == "running"
    cli.terminate_instances(InstanceIds=[no_timer, no_tags, stops, ends])


def _user_data() -> str:
    """The user data labctl gives a node, as the adapter makes it."""
    from labctl.providers.aws import instances

    spec = {"node": "n", "role": "r", "candidates": ["t3.micro"], "image": "ubuntu-24.04", "reservation": None,
            "extra_keys": [], "networks": []}
    return instances.user_data(spec)


def test_inventory_lists_every_labctl_tagged_resource_and_no_look_alike(emu, tmp_path: Path, public_key: str):
    provider = connect(emu)
    store = StateStore(tmp_path / "s.db")
    first = lab_plan(tmp_path, public_key, "inv1", network=True, storage=True)
    second = lab_plan(tmp_path, public_key, "inv2")
    for plan in (first, second):
        Engine(provider, store).apply(plan)
    # Look-alikes made without labctl's tags, named as labctl names things.
    cli, s3 = emu.world.client(REGION), emu.world.s3_client(REGION)
    fake = f"{first.deployment}-fake"
    look_alikes = {
        cli.create_key_pair(KeyName=fake)["KeyName"],
        cli.create_security_group(GroupName=fake, Description="not labctl's")["GroupId"],
        vpc := cli.create_vpc(CidrBlock="10.42.0.0/24", TagSpecifications=[
            {"ResourceType": "vpc", "Tags": [{"Key": "Name", "Value": fake}]}])["Vpc"]["VpcId"],
        cli.create_volume(AvailabilityZone="us-east-1a", Size=1, TagSpecifications=[
            {"ResourceType": "volume", "Tags": [{"Key": "Name", "Value": fake}, {"Key": "labctl:volume",
                                                                                  "Value": "x"}]}])["VolumeId"],
        cli.allocate_address(Domain="vpc")["AllocationId"],
    }
    s3.create_bucket(Bucket=fake)
    look_alikes.add(fake)
    try:
        found = provider.inventory()
        ours = [f for f in found if f.attrs["deployment"] in (first.deployment, second.deployment)]
        assert not look_alikes & {f.cloud_id for f in found}, [f for f in found if f.cloud_id in look_alikes]
        assert all(f.attrs["deployment"] for f in found)  # nothing without the tag, of any deployment
        owned = {(f.kind, f.cloud_id) for plan in (first, second) for f in provider.list_owned(plan)
                 if f.kind != "volume_attachment"}
        assert {(f.kind, f.cloud_id) for f in ours} == owned
        assert {f.kind for f in ours} == {"server", "floating_ip", "keypair", "secgroup", "network", "subnet",
                                          "volume", "bucket"}
        assert {f.attrs["owner"] for f in ours} == {"inv1", "inv2"}
        servers = [f for f in ours if f.kind == "server"]
        assert len(servers) == 2 and all(f.attrs["node_type"] == "t3.micro" and f.attrs["end"] for f in servers)
        assert all(datetime.fromisoformat(f.attrs["created"]) <= datetime.now(UTC)
                   for f in ours if f.kind in ("server", "volume", "bucket"))
    finally:
        cli.delete_key_pair(KeyName=fake)
        cli.delete_security_group(GroupName=fake)
        cli.delete_vpc(VpcId=vpc)
        s3.delete_bucket(Bucket=fake)
        for v in cli.describe_volumes(Filters=[{"Name": "tag:Name", "Values": [fake]}])["Volumes"]:
            cli.delete_volume(VolumeId=v["VolumeId"])
        for a in cli.describe_addresses()["Addresses"]:
            if a["AllocationId"] in look_alikes:
                cli.release_address(AllocationId=a["AllocationId"])
        for plan in (first, second):
            assert Engine(provider, store).destroy(plan, keep=False) == []


def test_an_unknown_ami_id_is_a_user_error(emu):
    from labctl.providers.aws import instances

    with pytest.raises(UserError, match="image ami-0123456789abcdef0 not found"):
        instances.find_image(connect(emu), "ami-0123456789abcdef0")
