"""Firewalls on every emulated cloud, applied by the emulated SSH side as each real cloud applies them: a node
with no rule for port 22 refuses SSH; the rule added through the cloud's own SDK lets it in; Chameleon bare metal
is open; a KVM node with only the `default` security group refuses SSH from outside (issue 11's reproduced bug)."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import asyncssh
import pytest

from labctl.keys import ensure_keypair

REFUSED = (asyncssh.ConnectionLost, asyncssh.DisconnectError, ConnectionError)


def ssh_echo(address: str, port: int, user: str, key_path: Path, via: tuple[str, str] | None = None) -> str:
    """`echo ok` on the node at address:port, or at `via` = (fixed IP, jump address) through the jump host."""

    async def go() -> str:
        kw = dict(username=user, client_keys=[str(key_path)], known_hosts=None, agent_path=None, config=[],
                  connect_timeout=5)
        if via is None:
            async with asyncssh.connect(address, port, **kw) as conn:
                return (await conn.run("echo ok", check=True)).stdout
        async with asyncssh.connect(via[1], port, **kw) as jump, \
                asyncssh.connect(via[0], 22, tunnel=jump, **kw) as conn:
            return (await conn.run("echo ok", check=True)).stdout

    return asyncio.run(go())


# ------------------------------------------------------------------------------------ Chameleon
@pytest.fixture
def chameleon(tmp_path):
    from labctl.testbed import Testbed

    with Testbed.start(tmp_path / "world", time_scale=0.001, ssh=True) as testbed:
        yield testbed


def _boot_with_fip(conn, region: str, name: str, key_name: str, reservation: dict):
    """A server on sharednet1 in a new lease's reservation, with a floating IP: (server, port, address, flavor)."""
    from tests.testbed.openstack.test_openstack_api import active_lease, blazar

    bz = blazar(conn, region)
    lease = active_lease(bz, f"lease-{name}", [reservation])
    res = lease["reservations"][0]
    image = next(conn.image.images(name="CC-Ubuntu24.04"))
    shared = conn.network.find_network("sharednet1", ignore_missing=False)
    if res["resource_type"] == "flavor:instance":
        flavor, hints = res["flavor_id"], {}
    else:
        flavor, hints = conn.compute.find_flavor("baremetal", ignore_missing=False).id, {"reservation": res["id"]}
    server = conn.compute.create_server(name=name, image_id=image.id, flavor_id=flavor, key_name=key_name,
                                        networks=[{"uuid": shared.id}], scheduler_hints=hints)
    server = conn.compute.wait_for_server(server, status="ACTIVE", interval=0.02, wait=10)
    (port,) = conn.network.ports(device_id=server.id)
    public = conn.network.find_network("public", ignore_missing=False)
    fip = conn.network.create_ip(floating_network_id=public.id, port_id=port.id)
    return server, port, fip.floating_ip_address, flavor


def _keypair(conn, tmp_path: Path):
    key = ensure_keypair(tmp_path / "keys")
    name = f"k-{uuid.uuid4().hex[:6]}"
    conn.compute.create_keypair(name=name, public_key=key.public_key)
    return key, name


def test_kvm_node_with_only_the_default_group_refuses_ssh_until_a_rule_opens_22(chameleon, tmp_path):
    from tests.testbed.openstack.test_openstack_api import connect

    conn = connect(chameleon, "kvm@tacc")
    key, key_name = _keypair(conn, tmp_path)
    medium = conn.compute.find_flavor("m1.medium", ignore_missing=False)
    flavor_res = {"resource_type": "flavor:instance", "flavor_id": medium.id, "amount": 3, "affinity": None}
    server, port, address, reserved = _boot_with_fip(conn, "KVM@TACC", "node-1", key_name, flavor_res)
    ssh_port = chameleon.ssh_port
    chameleon.wait_ssh(address, ssh_port)
    assert port.security_group_ids == [conn.network.find_security_group("default").id]
    with pytest.raises(REFUSED):
        ssh_echo(address, ssh_port, "cc", key.private_path)

    # A rule for another port, or from a prefix the client is not in, does not open 22.
    sg = conn.network.create_security_group(name="allow-ssh", description="ssh")
    conn.network.create_security_group_rule(security_group_id=sg.id, direction="ingress", ethertype="IPv4",
                                            protocol="tcp", port_range_min=8888, port_range_max=8888,
                                            remote_ip_prefix="0.0.0.0/0")
    conn.network.create_security_group_rule(security_group_id=sg.id, direction="ingress", ethertype="IPv4",
                                            protocol="tcp", port_range_min=22, port_range_max=22,
                                            remote_ip_prefix="192.5.87.0/24")
    conn.compute.add_security_group_to_server(server, sg)
    with pytest.raises(REFUSED):
        ssh_echo(address, ssh_port, "cc", key.private_path)
    rule = conn.network.create_security_group_rule(security_group_id=sg.id, direction="ingress", ethertype="IPv4",
                                                   protocol="tcp", port_range_min=22, port_range_max=22,
                                                   remote_ip_prefix="0.0.0.0/0")
    assert ssh_echo(address, ssh_port, "cc", key.private_path) == "ok\n"

    # Node to node over sharednet1: node-2 (only `default`) lets in node-1 (a member of `default`); node-3 in a
    # group without rules refuses it; port security off opens node-3.
    image = next(conn.image.images(name="CC-Ubuntu24.04"))
    shared = conn.network.find_network("sharednet1", ignore_missing=False)
    closed = conn.network.create_security_group(name="closed", description="no rules")
    inner = {}
    for name, groups in (("node-2", None), ("node-3", [{"name": closed.name}])):
        kw = {"security_groups": groups} if groups else {}
        s = conn.compute.create_server(name=name, image_id=image.id, flavor_id=reserved, key_name=key_name,
                                       networks=[{"uuid": shared.id}], **kw)
        s = conn.compute.wait_for_server(s, status="ACTIVE", interval=0.02, wait=10)
        inner[name] = s.addresses["sharednet1"][0]["addr"]
        inner[f"{name}-id"] = s.id
    assert ssh_echo(inner["node-2"], ssh_port, "cc", key.private_path, via=(inner["node-2"], address)) == "ok\n"
    with pytest.raises(asyncssh.ChannelOpenError, match="firewall"):
        ssh_echo(inner["node-3"], ssh_port, "cc", key.private_path, via=(inner["node-3"], address))
    (port3,) = conn.network.ports(device_id=inner["node-3-id"])
    conn.network.update_port(port3, port_security_enabled=False, security_groups=[])
    assert ssh_echo(inner["node-3"], ssh_port, "cc", key.private_path, via=(inner["node-3"], address)) == "ok\n"

    # Deleting the rule closes 22 again.
    conn.network.delete_security_group_rule(rule)
    with pytest.raises(REFUSED):
        ssh_echo(address, ssh_port, "cc", key.private_path)


def test_bare_metal_node_is_open_without_any_rule(chameleon, tmp_path):
    from tests.testbed.openstack.test_openstack_api import connect, host_reservation

    conn = connect(chameleon, "chi@tacc")
    key, key_name = _keypair(conn, tmp_path)
    _, port, address, _ = _boot_with_fip(conn, "CHI@TACC", "bm-1", key_name, host_reservation("compute_liqid"))
    chameleon.wait_ssh(address, chameleon.ssh_port)
    assert port.security_group_ids == [conn.network.find_security_group("default").id]
    assert ssh_echo(address, chameleon.ssh_port, "cc", key.private_path) == "ok\n"


# ------------------------------------------------------------------------------------ EC2
@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    from labctl.testbed.aws import start_aws, stop_moto

    aws_dir = tmp_path_factory.mktemp("aws-testbed")
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    emulator = start_aws(aws_dir)
    try:
        yield emulator
    finally:
        emulator.stop()
        stop_moto(aws_dir)
        os.environ.update(saved)


def test_ec2_instance_needs_an_inbound_rule_for_22(aws, tmp_path):
    from tests.fixtures.aws import ec2_client

    from labctl.testbed.aws import CANONICAL
    from labctl.testbed.sshd import SSHNodes

    ec2 = ec2_client(aws)
    key = ensure_keypair(tmp_path / "keys")
    key_name = f"k-{uuid.uuid4().hex[:8]}"
    ec2.import_key_pair(KeyName=key_name, PublicKeyMaterial=key.public_key.encode())
    images = ec2.describe_images(Owners=[CANONICAL], Filters=[
        {"Name": "name", "Values": ["ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-amd64-server-*"]}])["Images"]
    image = max(images, key=lambda i: i["CreationDate"])["ImageId"]
    sg = ec2.create_security_group(GroupName=f"lab-{uuid.uuid4().hex[:6]}", Description="lab")["GroupId"]
    launched = ec2.run_instances(ImageId=image, InstanceType="t3.micro", MinCount=2, MaxCount=2, KeyName=key_name,
                                 SecurityGroupIds=[sg])["Instances"]
    ids = [i["InstanceId"] for i in launched]
    nodes = SSHNodes(aws.world, poll_interval=0.02).start()
    try:
        a, b = ec2.describe_instances(InstanceIds=ids)["Reservations"][0]["Instances"]
        address, port = a["PublicIpAddress"], aws.world.ssh_port
        nodes.wait_listening(address, port, timeout=10)
        with pytest.raises(REFUSED):  # a new group has no inbound rule
            ssh_echo(address, port, "ubuntu", key.private_path)
        ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[{
            "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
        assert ssh_echo(address, port, "ubuntu", key.private_path) == "ok\n"
        # b's private address from a: the same group's rule from 0.0.0.0/0 covers a's private IP too; a rule
        # only for the group itself would do as well.
        nodes.wait_listening(aws.world.ssh_targets()[0]["internal_address"], port, timeout=10)
        assert ssh_echo(b["PrivateIpAddress"], port, "ubuntu", key.private_path,
                        via=(b["PrivateIpAddress"], address)) == "ok\n"
        ec2.revoke_security_group_ingress(GroupId=sg, IpPermissions=[{
            "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
        with pytest.raises(REFUSED):
            ssh_echo(address, port, "ubuntu", key.private_path)
    finally:
        nodes.stop()
        ec2.terminate_instances(InstanceIds=ids)


# ------------------------------------------------------------------------------------ Compute Engine
@pytest.fixture
def gce(tmp_path):
    from tests.fixtures.gce import Clients

    from labctl.testbed.gce import start_gce

    emulator = start_gce(tmp_path / "gce", time_scale=0.002)
    try:
        yield Clients(emulator, emulator.project, {})
    finally:
        emulator.stop()


def test_gce_default_network_allows_ssh_a_custom_network_needs_a_firewall(gce, tmp_path):
    from google.cloud import compute_v1
    from tests.runner.conftest import free_port
    from tests.testbed.gce.test_gce_emulator import insert, instance_body, wait_zone
    from tests.testbed.gce.test_gce_networks_disks import (
        make_network,
        make_subnetwork,
        on_subnet,
        wait_global,
        wait_region,
        wait_running,
    )

    from labctl.testbed.sshd import SSHNodes

    key = ensure_keypair(tmp_path / "keys")
    metadata = compute_v1.Metadata(items=[compute_v1.Items(key="ssh-keys", value=f"labctl:{key.public_key}")])
    wait_global(gce, make_network(gce))
    wait_region(gce, make_subnetwork(gce))
    bodies = [instance_body("on-default"), on_subnet("node-a", "192.168.1.11"),
              on_subnet("node-b", "192.168.1.12", external=False)]
    for body, tag in zip(bodies, ("x", "lab", "inner"), strict=True):
        body.metadata = metadata
        body.tags = compute_v1.Tags(items=[tag])
        wait_zone(gce, insert(gce, body))
    nat = {n: wait_running(gce, n).network_interfaces[0].access_configs for n in ("on-default", "node-a")}
    default_ip, address = nat["on-default"][0].nat_i_p, nat["node-a"][0].nat_i_p
    port = free_port("127.0.0.1")
    sshd = SSHNodes(gce.emu.world, poll_interval=0.02, port=port).start()

    def firewall(name: str, **kw):
        body = compute_v1.Firewall(name=name, network="global/networks/lab-net", direction="INGRESS",
                                   allowed=[compute_v1.Allowed(I_p_protocol="tcp", ports=["22"])], **kw)
        wait_global(gce, gce.FirewallsClient.insert_unary(project=gce.project, firewall_resource=body))

    try:
        for a in (default_ip, address):
            sshd.wait_listening(a, port, 5)
        assert ssh_echo(default_ip, port, "labctl", key.private_path) == "ok\n"  # default-allow-ssh
        with pytest.raises(REFUSED):  # a custom network: the implied deny
            ssh_echo(address, port, "labctl", key.private_path)
        firewall("other-tag", source_ranges=["0.0.0.0/0"], target_tags=["other"])
        with pytest.raises(REFUSED):
            ssh_echo(address, port, "labctl", key.private_path)
        firewall("lab-ssh", source_ranges=["0.0.0.0/0"], target_tags=["lab"])
        assert ssh_echo(address, port, "labctl", key.private_path) == "ok\n"
        # node-b (tag inner) has no rule yet: node-a's hop to it is dropped; a sourceTags rule opens it.
        internal = next(t for t in gce.emu.world.ssh_targets() if t["name"] == "node-b")["internal_address"]
        sshd.wait_listening(internal, port, 5)
        with pytest.raises(asyncssh.ChannelOpenError, match="firewall"):
            ssh_echo("192.168.1.12", port, "labctl", key.private_path, via=("192.168.1.12", address))
        firewall("lab-internal", source_tags=["lab"], target_tags=["inner"])
        assert ssh_echo("192.168.1.12", port, "labctl", key.private_path, via=("192.168.1.12", address)) == "ok\n"
    finally:
        sshd.stop()
