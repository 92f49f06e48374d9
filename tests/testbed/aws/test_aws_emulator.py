"""The emulated EC2 (moto + our front layer), driven with boto3 over HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError
from tests.fixtures.aws import ec2_client

from labctl.testbed.aws import CANONICAL, ensure_moto, moto_info, start_aws, stop_moto

UBUNTU = "ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-amd64-server-*"
DLAMI = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) *"


def _ubuntu(ec2) -> str:
    images = ec2.describe_images(Owners=[CANONICAL], Filters=[{"Name": "name", "Values": [UBUNTU]}])["Images"]
    return max(images, key=lambda i: i["CreationDate"])["ImageId"]


def _launch(ec2, **kwargs):
    args = dict(ImageId=_ubuntu(ec2), InstanceType="t3.micro", MinCount=1, MaxCount=1)
    args.update(kwargs)
    return ec2.run_instances(**args)["Instances"][0]


def _public_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    raw = Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                  serialization.PublicFormat.OpenSSH)
    return raw.decode() + " test@labctl"


def _with_token(emu, token: str) -> list[dict]:
    return [i for i in emu.world.inventory()["instances"] if i["client_token"] == token]


# -- images ---------------------------------------------------------------------------------------------


def test_images_have_real_names_and_owners(emu):
    ec2 = ec2_client(emu)
    ubuntu = ec2.describe_images(Owners=[CANONICAL], Filters=[
        {"Name": "name", "Values": [UBUNTU]}, {"Name": "architecture", "Values": ["x86_64"]}])["Images"]
    assert len(ubuntu) >= 2 and {i["OwnerId"] for i in ubuntu} == {CANONICAL}
    newest = max(ubuntu, key=lambda i: i["CreationDate"])
    assert newest["Name"].startswith("ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-2025")
    dl = ec2.describe_images(Owners=["amazon"], Filters=[{"Name": "name", "Values": [DLAMI]}])["Images"]
    assert dl and all(i["OwnerId"] == "898082745236" for i in dl)


# -- idempotency ----------------------------------------------------------------------------------------


def test_client_token_timeout_then_retry_makes_one_instance(emu):
    """The first RunInstances "times out" for the client after moto made the instance; the retry with the
    same ClientToken gets the same instance back."""
    ec2 = ec2_client(emu, attempts=1)
    token = f"tok-{uuid.uuid4().hex[:12]}"
    emu.world.inject_fault("RunInstances", "timeout_after", 1)
    with pytest.raises(ConnectionClosedError):
        _launch(ec2, ClientToken=token)
    assert len(_with_token(emu, token)) == 1  # the server did make it
    again = _launch(ec2, ClientToken=token)
    mine = _with_token(emu, token)
    assert [i["id"] for i in mine] == [again["InstanceId"]]
    runs = [s for a, s in emu.world.request_log() if a == "RunInstances" and token in s]
    assert len(runs) == 2


def test_client_token_hang_then_retry_makes_one_instance(emu):
    ec2 = ec2_client(emu, attempts=1, read_timeout=1)
    token = f"tok-{uuid.uuid4().hex[:12]}"
    emu.world.inject_fault("RunInstances", "hang_after", 1)
    with pytest.raises(ReadTimeoutError):
        _launch(ec2, ClientToken=token)
    first = _launch(ec2, ClientToken=token)
    second = _launch(ec2, ClientToken=token)
    assert first["InstanceId"] == second["InstanceId"]
    assert len(_with_token(emu, token)) == 1


def test_client_token_with_other_parameters_is_refused(emu):
    ec2 = ec2_client(emu)
    token = f"tok-{uuid.uuid4().hex[:12]}"
    _launch(ec2, ClientToken=token)
    with pytest.raises(ClientError) as err:
        _launch(ec2, ClientToken=token, InstanceType="t3.small")
    assert err.value.response["Error"]["Code"] == "IdempotentParameterMismatch"
    assert len(_with_token(emu, token)) == 1


def test_token_answer_is_rebuilt_when_the_record_was_lost(emu):
    """A process died after moto made the instance but before the answer was stored: found by its token."""
    ec2 = ec2_client(emu)
    token = f"tok-{uuid.uuid4().hex[:12]}"
    first = _launch(ec2, ClientToken=token)
    with emu.world._tx() as db:
        db.execute("DELETE FROM tokens WHERE token=?", (token,))
    again = _launch(ec2, ClientToken=token)
    assert again["InstanceId"] == first["InstanceId"]
    assert len(_with_token(emu, token)) == 1


# -- capacity and limits --------------------------------------------------------------------------------


def test_zone_capacity_gives_insufficient_capacity_http_500(emu):
    ec2 = ec2_client(emu)
    emu.world.set_capacity("us-east-1a", "g5.xlarge", 1)
    ok = _launch(ec2, InstanceType="g5.xlarge", Placement={"AvailabilityZone": "us-east-1a"})
    assert ok["Placement"]["AvailabilityZone"] == "us-east-1a"
    with pytest.raises(ClientError) as err:
        _launch(ec2, InstanceType="g5.xlarge", Placement={"AvailabilityZone": "us-east-1a"})
    assert err.value.response["Error"]["Code"] == "InsufficientInstanceCapacity"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert "us-east-1b" in err.value.response["Error"]["Message"]
    # Without a zone, EC2 picks one that has room.
    anywhere = _launch(ec2, InstanceType="g5.xlarge")
    assert anywhere["Placement"]["AvailabilityZone"] != "us-east-1a"
    # Terminating frees the slot.
    ec2.terminate_instances(InstanceIds=[ok["InstanceId"]])
    _launch(ec2, InstanceType="g5.xlarge", Placement={"AvailabilityZone": "us-east-1a"})


def test_type_not_offered_in_zone_is_unsupported(emu):
    ec2 = ec2_client(emu)
    with pytest.raises(ClientError) as err:
        _launch(ec2, InstanceType="p4d.24xlarge", Placement={"AvailabilityZone": "us-east-1e"})
    assert err.value.response["Error"]["Code"] == "Unsupported"


def test_vcpu_limit(emu):
    ec2 = ec2_client(emu)
    live = [i for i in emu.world.inventory()["instances"] if i["state"] in ("pending", "running")]
    used = sum(emu.world.vcpus("us-east-1", i["type"]) for i in live)
    emu.world.set_vcpu_limit(used + 2)
    _launch(ec2, InstanceType="t3.micro")  # 2 vCPUs: fits
    with pytest.raises(ClientError) as err:
        _launch(ec2, InstanceType="t3.micro")
    assert err.value.response["Error"]["Code"] == "VcpuLimitExceeded"


# -- faults ---------------------------------------------------------------------------------------------


def test_injected_errors(emu):
    ec2 = ec2_client(emu)
    emu.world.inject_fault("DescribeKeyPairs", "error503", 1)
    with pytest.raises(ClientError) as err:
        ec2.describe_key_pairs()
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    emu.world.inject_fault("*", "RequestLimitExceeded", 1)
    with pytest.raises(ClientError) as err:
        ec2.describe_vpcs()
    assert err.value.response["Error"]["Code"] == "RequestLimitExceeded"
    ec2.describe_vpcs()  # used up
    log = emu.world.request_log(detail=True)
    assert [(r["action"], r["status"]) for r in log[-3:]] == [
        ("DescribeKeyPairs", 503), ("DescribeVpcs", 503), ("DescribeVpcs", 200)]


def test_latency_delays_one_action(emu):
    ec2 = ec2_client(emu)
    emu.world.set_latency("DescribeVpcs", 0.4)  # seconds as they are: EC2's world has no time scale
    started = time.monotonic()
    ec2.describe_vpcs()
    assert time.monotonic() - started >= 0.4
    started = time.monotonic()
    ec2.describe_key_pairs()  # another action: not delayed
    assert time.monotonic() - started < 0.4
    emu.world.set_latency("DescribeVpcs", 0)


# -- reachability ---------------------------------------------------------------------------------------


def test_public_addresses_are_loopback_both_ways(emu):
    ec2 = ec2_client(emu)
    captured: list[bytes] = []
    ec2.meta.events.register("after-call.ec2", lambda http_response, **_: captured.append(http_response.content))
    inst = _launch(ec2)
    assert inst["PublicIpAddress"].startswith("127.20.")
    eip = ec2.allocate_address(Domain="vpc")
    assert eip["PublicIp"].startswith("127.20.")
    ec2.associate_address(AllocationId=eip["AllocationId"], InstanceId=inst["InstanceId"])
    # A filter by the loopback address reaches moto as its own address and finds the instance.
    found = ec2.describe_instances(Filters=[{"Name": "ip-address", "Values": [eip["PublicIp"]]}])
    [described] = [i for r in found["Reservations"] for i in r["Instances"]]
    assert described["InstanceId"] == inst["InstanceId"]
    assert described["PublicIpAddress"] == eip["PublicIp"]
    assert "127-20-" in described["PublicDnsName"]
    ec2.describe_addresses(AllocationIds=[eip["AllocationId"]])
    text = b"".join(captured).decode()
    for ip in re.findall(r"<(?:ipAddress|publicIp)>([\d.]+)<", text):
        assert ip.startswith("127.20."), ip
    assert "54.214." not in text and "54-214-" not in text
    ec2.disassociate_address(PublicIp=eip["PublicIp"])  # a loopback address in a request, mapped back
    ec2.release_address(AllocationId=eip["AllocationId"])


def test_ssh_targets_carry_the_imported_key(emu, aws_dir: Path):
    ec2 = ec2_client(emu)
    key = _public_key()
    name = f"k-{uuid.uuid4().hex[:8]}"
    ec2.import_key_pair(KeyName=name, PublicKeyMaterial=key.encode())
    extra = _public_key()
    user_data = f"#cloud-config\nssh_authorized_keys:\n  - {extra}\n"
    inst = _launch(ec2, KeyName=name, UserData=user_data,
                   TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "node-x"}]}])
    [target] = [t for t in emu.world.ssh_targets() if t["server_id"] == inst["InstanceId"]]
    assert target["address"] == inst["PublicIpAddress"] and target["address"].startswith("127.20.")
    assert target["port"] == emu.world.ssh_port
    assert target["authorized_keys"] == [key, extra]
    assert target["name"] == "node-x" and target["site"] == "aws:us-east-1"
    assert target["node_dir"] == aws_dir / "nodes" / inst["InstanceId"]
    ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])
    time.sleep(0.25)  # the targets are cached for 0.2 s
    assert inst["InstanceId"] not in {t["server_id"] for t in emu.world.ssh_targets()}


def test_boot_time_shows_pending_then_running(emu):
    ec2 = ec2_client(emu)
    emu.world.set_boot_seconds(0.5)
    inst = _launch(ec2)
    state = ec2.describe_instances(InstanceIds=[inst["InstanceId"]])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] == "pending"
    time.sleep(0.6)
    state = ec2.describe_instances(InstanceIds=[inst["InstanceId"]])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] == "running"


def test_inventory_lists_tagged_things(emu):
    ec2 = ec2_client(emu)
    tag = [{"Key": "labctl:deployment", "Value": "inv-test"}]
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    ec2.create_security_group(GroupName="inv-test", Description="x", VpcId=vpc,
                              TagSpecifications=[{"ResourceType": "security-group", "Tags": tag}])
    inv = emu.world.inventory("us-east-1")
    assert set(inv) == {"instances", "addresses", "security_groups", "key_pairs"}
    [sg] = [g for g in inv["security_groups"] if g["tags"].get("labctl:deployment") == "inv-test"]
    assert sg["name"] == "inv-test"
    assert all(g["name"] != "default" for g in inv["security_groups"])


# -- the moto daemon ------------------------------------------------------------------------------------


def test_second_front_layer_sees_the_same_world(emu, aws_dir: Path):
    other = start_aws(aws_dir)
    try:
        assert other.endpoint != emu.endpoint
        inst = _launch(ec2_client(emu))
        seen = ec2_client(other).describe_instances(InstanceIds=[inst["InstanceId"]])
        assert seen["Reservations"][0]["Instances"][0]["PublicIpAddress"] == inst["PublicIpAddress"]
        assert other.world.ssh_port == emu.world.ssh_port
        assert moto_info(aws_dir)["pid"] == emu.world.moto()["pid"]
    finally:
        other.stop()


def test_racing_processes_start_one_daemon(tmp_path: Path):
    code = ("import sys, json; from pathlib import Path; from labctl.testbed.aws import ensure_moto; "
            "print(json.dumps(ensure_moto(Path(sys.argv[1]))))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        infos = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        assert infos[0]["pid"] == infos[1]["pid"]
        assert ensure_moto(tmp_path)["pid"] == infos[0]["pid"]
    finally:
        assert stop_moto(tmp_path)
    assert moto_info(tmp_path) is None


def test_key_material_is_recorded_as_imported(emu):
    ec2 = ec2_client(emu)
    key = _public_key()
    name = f"k-{uuid.uuid4().hex[:8]}"
    ec2.import_key_pair(KeyName=name, PublicKeyMaterial=key.encode())
    assert emu.world.key_line("us-east-1", name) == key
    assert base64.b64encode(key.encode())  # botocore sent it base64-encoded; the record is the plain line


# -- SSH --------------------------------------------------------------------------------------------------


def _ssh_run(address: str, port: int, user: str, key_path: Path, command: str) -> str:
    import asyncio

    import asyncssh

    async def go() -> str:
        async with asyncssh.connect(address, port, username=user, client_keys=[str(key_path)],
                                    known_hosts=None) as conn:
            return (await conn.run(command, check=True)).stdout

    return asyncio.run(go())


@pytest.fixture
def ssh_node(emu, tmp_path: Path):
    from labctl.keys import ensure_keypair
    from labctl.testbed.sshd import SSHNodes

    key = ensure_keypair(tmp_path / "keys")
    ec2 = ec2_client(emu)
    name = f"k-{uuid.uuid4().hex[:8]}"
    ec2.import_key_pair(KeyName=name, PublicKeyMaterial=key.public_key.encode())
    # As on EC2, SSH needs an inbound rule for port 22 (the default VPC's default group admits its members only).
    sg = ec2.create_security_group(GroupName=f"ssh-{name}", Description="ssh")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    inst = _launch(ec2, KeyName=name, SecurityGroupIds=[sg])
    nodes = SSHNodes(emu.world).start()
    try:
        nodes.wait_listening(inst["PublicIpAddress"], emu.world.ssh_port, timeout=10)
        yield inst, key
    finally:
        nodes.stop()
        ec2.terminate_instances(InstanceIds=[inst["InstanceId"]])


def test_sshd_serves_running_instances_on_their_loopback_address(ssh_node):
    inst, _ = ssh_node
    assert inst["PublicIpAddress"].startswith("127.20.")


def test_ssh_login_as_ubuntu(emu, ssh_node):
    inst, key = ssh_node
    out = _ssh_run(inst["PublicIpAddress"], emu.world.ssh_port, "ubuntu", key.private_path,
                   "echo $LABCTL_SERVER_ID")
    assert out.strip() == inst["InstanceId"]


def test_client_token_filter_works(emu):
    """moto's own client-token filter crashes it; the front layer applies the filter itself."""
    ec2 = ec2_client(emu)
    token = f"tok-{uuid.uuid4().hex[:12]}"
    inst = _launch(ec2, ClientToken=token)
    _launch(ec2)
    found = ec2.describe_instances(Filters=[{"Name": "client-token", "Values": [token]},
                                            {"Name": "instance-state-name", "Values": ["pending", "running"]}])
    assert [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]] == [inst["InstanceId"]]
    none = ec2.describe_instances(Filters=[{"Name": "client-token", "Values": ["no-such-token"]}])
    assert none["Reservations"] == []
