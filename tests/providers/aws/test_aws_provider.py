"""The AWS adapter with real boto3 over HTTP against the emulated EC2 (moto + front layer on 127.0.0.1)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.fixtures.standin import StandInTestbed

from labctl import sites
from labctl.engine import Engine
from labctl.errors import CloudError, CredentialsError, NoCapacity, QuotaExceeded, RateLimited, Transient
from labctl.plan import build_plan
from labctl.profile import find_profile, load_profile
from labctl.providers import aws as aws_provider
from labctl.providers.aws import instances
from labctl.state import StateStore

ZONES = ("us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d", "us-east-1e", "us-east-1f")


@pytest.fixture(scope="module")
def public_key(tmp_path_factory: pytest.TempPathFactory) -> str:
    from labctl.keys import ensure_keypair

    return ensure_keypair(tmp_path_factory.mktemp("keys")).public_key


def connect(emu, site: str = "sim-aws"):
    return aws_provider.connect(sites.resolve(site), testbed=lambda: StandInTestbed(aws=emu))


def lab_plan(tmp_path: Path, public_key: str, owner: str, *, count: int = 1, types: str = "[t3.micro]",
             gpu: bool = False, floating_ip: bool = True, site: str = "sim-aws"):
    lines = [
        "name: awslab",
        "description: a lab for the AWS adapter tests",
        "sites: [aws]",
        "lease_hours: 2",
        f"image: {'ubuntu-24.04-cuda' if gpu else 'ubuntu-24.04'}",
        "nodes:",
        "  node:",
        f"    count: {count}",
        *(["    gpu: {model: A10G, count: 1}"] if gpu else []),
        f"    floating_ip: {'true' if floating_ip else 'false'}",
        "    types:",
        f"      aws: {types}",
        "ports: [22, 8888]",
    ]
    path = tmp_path / "awslab.yaml"
    path.write_text("\n".join(lines) + "\n")
    return build_plan(load_profile(path), sites.resolve(site), owner, public_key)


def owned_in_inventory(emu, deployment: str) -> dict[str, list]:
    inv = emu.world.inventory("us-east-1")
    return {kind: [x for x in items if x["tags"].get("labctl:deployment") == deployment]
            for kind, items in inv.items()}


# -- import and credentials ------------------------------------------------------------------------------


def test_import_loads_no_sdk():
    code = ("import sys, labctl.providers.aws; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_credentials_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    site = sites.resolve("aws:us-east-1")
    with pytest.raises(CredentialsError) as err:
        aws_provider.connect(site)
    assert "no AWS credentials" in str(err.value) and "AWS_PROFILE" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(CredentialsError) as err:
        aws_provider.connect(site, cloud="course-account")
    assert "'course-account'" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("AWS_PROFILE", "gone")
    with pytest.raises(CredentialsError) as err:
        aws_provider.connect(site)
    assert "gone" in str(err.value) and "AWS_PROFILE" in str(err.value)
    monkeypatch.delenv("AWS_PROFILE")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    provider = aws_provider.connect(site)  # no call is made yet
    assert provider.credential_source == "env" and provider.site is site


def test_sim_site_uses_the_emulator(emu, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_PROFILE", "does-not-exist")  # the emulated site ignores the user's AWS settings
    provider = connect(emu)
    assert provider.site.ssh_port == emu.world.ssh_port and provider.site.emulated
    assert provider.ec2.meta.endpoint_url == emu.endpoint
    assert provider.ec2.describe_availability_zones()["AvailabilityZones"]


# -- the whole plan through the engine -------------------------------------------------------------------


def test_engine_applies_and_destroys_hello(emu, tmp_path: Path, public_key: str):
    plan = build_plan(load_profile(find_profile("hello")), sites.resolve("sim-aws"), "student1", public_key)
    provider = connect(emu)
    provider.preflight(plan)
    store = StateStore(tmp_path / "state.db")
    found = Engine(provider, store).apply(plan)
    servers = [f for key, f in found.items() if key.startswith("server:")]
    assert servers and all(f.status == "ready" and f.attrs["server_status"] == "running" for f in servers)
    assert all(f.attrs["node_type"] == "t3.small" and f.attrs["zone"].startswith("us-east-1") for f in servers)
    assert all(f.attrs["floating_ip"].startswith("127.20.") for f in servers)
    fips = [f for key, f in found.items() if key.startswith("floating_ip:")]
    assert fips and all(f.attrs["floating_ip"].startswith("127.20.") for f in fips)
    inv = owned_in_inventory(emu, plan.deployment)
    assert len(inv["instances"]) == len(servers)
    assert {i["public_ip"] for i in inv["instances"]} == {f.attrs["floating_ip"] for f in fips}
    assert all(i["tags"]["labctl:owner"] == "student1" and i["tags"]["labctl:lab"] == "hello"
               and i["tags"]["Name"].startswith(plan.deployment) for i in inv["instances"])
    [sg] = inv["security_groups"]
    assert ("tcp", 22, 22, ["0.0.0.0/0"]) in sg["ingress"]
    assert [k["name"] for k in inv["key_pairs"]] == [plan.deployment]
    targets = {t["server_id"]: t for t in emu.world.ssh_targets()}
    for f in servers:
        assert targets[f.cloud_id]["authorized_keys"] == [public_key]
    # Applying again changes nothing.
    before = len(emu.world.request_log())
    again = Engine(provider, store).apply(plan)
    assert {k: f.cloud_id for k, f in again.items()} == {k: f.cloud_id for k, f in found.items()}
    assert not [a for a, _ in emu.world.request_log()[before:] if a in ("RunInstances", "AllocateAddress")]

    left = Engine(provider, store).destroy(plan)
    assert left == []
    assert owned_in_inventory(emu, plan.deployment) == {
        "instances": [], "addresses": [], "security_groups": [], "key_pairs": []}


# -- capacity, quota, errors ------------------------------------------------------------------------------


def test_full_zone_moves_to_the_next_zone_then_no_capacity(emu, tmp_path: Path, public_key: str,
                                                           caplog: pytest.LogCaptureFixture):
    plan = lab_plan(tmp_path, public_key, "capa", types="[g5.xlarge]", gpu=True)
    provider = connect(emu)
    provider.preflight(plan)
    keypair = provider.create(plan.get("keypair"), plan, {}, None)
    sg = provider.create(plan.get("secgroup"), plan, {}, None)
    deps = {"keypair": keypair, "secgroup": sg}
    emu.world.set_capacity("us-east-1a", "g5.xlarge", 0)
    with caplog.at_level(logging.INFO, logger="labctl.providers.aws"):
        server = provider.create(plan.get("server:node-1"), plan, deps, "g5.xlarge")
    assert server.attrs["zone"] == "us-east-1b" and server.attrs["node_type"] == "g5.xlarge"
    assert "no g5.xlarge capacity for node-1 in us-east-1a; trying us-east-1b" in caplog.text
    assert "launched node-1 as g5.xlarge in us-east-1b (us-east-1a had no capacity)" in caplog.text
    provider.delete("server", [server], plan)

    for zone in ZONES:
        emu.world.set_capacity(zone, "g5.xlarge", 0)
    with pytest.raises(NoCapacity) as err:
        provider.create(plan.get("server:node-1"), plan, deps, "g5.xlarge")
    assert "no g5.xlarge capacity" in str(err.value) and "\n" not in str(err.value)
    provider.delete("secgroup", [sg], plan)
    provider.delete("keypair", [keypair], plan)


def test_engine_falls_back_to_the_next_type(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "fallback", types="[g5.xlarge, g6.xlarge]", gpu=True,
                    floating_ip=False)
    for zone in ZONES:
        emu.world.set_capacity(zone, "g5.xlarge", 0)
    provider = connect(emu)
    store = StateStore(tmp_path / "state.db")
    found = Engine(provider, store).apply(plan)
    assert found["server:node-1"].attrs["node_type"] == "g6.xlarge"
    assert any("g5.xlarge" in msg and "g6.xlarge" in msg for *_, msg in store.events(plan.deployment))
    assert Engine(provider, store).destroy(plan) == []


def test_zone_site_does_not_leave_its_zone(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "pinned", types="[g5.xlarge]", gpu=True, site="sim:aws:us-east-1c")
    provider = connect(emu, "sim:aws:us-east-1c")
    provider.preflight(plan)
    emu.world.set_capacity("us-east-1c", "g5.xlarge", 0)
    deps = {"keypair": provider.create(plan.get("keypair"), plan, {}, None),
            "secgroup": provider.create(plan.get("secgroup"), plan, {}, None)}
    with pytest.raises(NoCapacity):
        provider.create(plan.get("server:node-1"), plan, deps, "g5.xlarge")
    launches = [s for a, s in emu.world.request_log() if a == "RunInstances" and "pinned" in s]
    assert len(set(launches)) == 1  # one zone only (botocore may have sent it twice: HTTP 500)
    emu.world.set_capacity("us-east-1c", "g5.xlarge", None)
    server = provider.create(plan.get("server:node-1"), plan, deps, "g5.xlarge")
    assert server.attrs["zone"] == "us-east-1c"
    assert Engine(provider, StateStore(tmp_path / "s.db")).destroy(plan) == []


def test_vcpu_limit_is_quota_exceeded(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "quota", types="[g5.xlarge]", gpu=True)
    provider = connect(emu)
    deps = {"keypair": provider.create(plan.get("keypair"), plan, {}, None),
            "secgroup": provider.create(plan.get("secgroup"), plan, {}, None)}
    emu.world.set_vcpu_limit(0)
    with pytest.raises(QuotaExceeded) as err:
        provider.create(plan.get("server:node-1"), plan, deps, "g5.xlarge")
    assert "VcpuLimitExceeded" in str(err.value) and "\n" not in str(err.value)
    assert Engine(provider, StateStore(tmp_path / "s.db")).destroy(plan) == []


def test_unknown_image_and_unoffered_types_fail_preflight(emu, tmp_path: Path, public_key: str):
    from labctl.errors import UserError

    plan = lab_plan(tmp_path, public_key, "pre", types="[t3.micro]")
    object.__setattr__(plan.nodes[0], "image", "ubuntu-24.04-rocm")
    with pytest.raises(UserError, match="no image for 'ubuntu-24.04-rocm'"):
        connect(emu).preflight(plan)
    plan = lab_plan(tmp_path, public_key, "pre", types="[p3.2xlarge]")
    with pytest.raises(UserError, match="none of p3.2xlarge"):
        connect(emu).preflight(plan)


def test_errors_are_translated(emu, tmp_path: Path, public_key: str):
    provider = connect(emu)
    provider.poll_interval, provider.call_retries = 0.001, 2  # each call: 2 tries here x 2 by botocore
    emu.world.inject_fault("DescribeVpcs", "RequestLimitExceeded", 100)
    with pytest.raises(RateLimited):
        instances.default_vpc(provider)
    emu.world.reset_controls()
    emu.world.inject_fault("DescribeVpcs", "error503", 100)
    with pytest.raises(Transient):
        instances.default_vpc(provider)
    emu.world.reset_controls()
    emu.world.inject_fault("DescribeVpcs", "error503", 3)  # fewer than the retries: it gets through
    assert instances.default_vpc(provider).startswith("vpc-")
    with pytest.raises(CloudError) as err:  # an SDK exception never escapes
        provider.call("bad call", lambda: provider.ec2.describe_instances(InstanceIds=["i-nope"]))
    assert type(err.value).__module__.startswith("labctl")


def test_kinds_aws_does_not_have(tmp_path: Path, public_key: str):
    """A reservation (Chameleon's) is found as nothing and deleted as nothing; creating one is a CloudError."""
    from labctl.plan import Resource
    from labctl.providers.base import Found

    provider = aws_provider.AwsProvider(sites.resolve("aws"), session=None)
    plan = lab_plan(tmp_path, public_key, "kinds")
    lease = Resource("reservation:node", "reservation", "lease", {})
    assert provider.find(lease, plan) is None
    provider.delete("reservation", [Found("reservation", "lease-1", "lease")], plan)
    with pytest.raises(CloudError, match="AWS has no 'reservation' resources"):
        provider.create(lease, plan, {}, None)


def test_rate_limit_applies_to_every_request(emu):
    """Class mode's --rate: at most that many HTTP requests per second from the adapter (a burst of 5 first)."""
    import time

    provider = connect(emu)
    provider.set_rate_limit(20)
    started = time.monotonic()
    for _ in range(15):
        provider.describe("list zones", "describe_availability_zones", "AvailabilityZones")
    assert time.monotonic() - started >= (15 - 5) / 20 * 0.9
    provider.set_rate_limit(None)


# -- idempotent launch and polling ------------------------------------------------------------------------


def test_launch_that_times_out_is_not_made_twice(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "token", floating_ip=False)
    provider = connect(emu)
    provider.poll_interval = 0.001
    deps = {"keypair": provider.create(plan.get("keypair"), plan, {}, None),
            "secgroup": provider.create(plan.get("secgroup"), plan, {}, None)}
    emu.world.inject_fault("RunInstances", "timeout_after", 2)  # the client's first try and its retry
    server = provider.create(plan.get("server:node-1"), plan, deps, "t3.micro")
    runs = [s for a, s in emu.world.request_log() if a == "RunInstances" and plan.deployment in s]
    assert len(runs) == 3 and len({s for s in runs}) == 1  # the same request, token and all, three times
    [inst] = owned_in_inventory(emu, plan.deployment)["instances"]
    assert inst["id"] == server.cloud_id
    # A rerun after a crash finds it by its tags instead of launching.
    assert provider.find(plan.get("server:node-1"), plan).cloud_id == server.cloud_id
    assert Engine(provider, StateStore(tmp_path / "s.db")).destroy(plan) == []


def test_relaunch_after_a_failed_instance_uses_a_new_token(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "relaunch", floating_ip=False)
    provider = connect(emu)
    deps = {"keypair": provider.create(plan.get("keypair"), plan, {}, None),
            "secgroup": provider.create(plan.get("secgroup"), plan, {}, None)}
    res = plan.get("server:node-1")
    first = provider.create(res, plan, deps, "t3.micro")
    provider.delete("server", [first], plan)  # as the engine does with an instance that failed
    assert provider.find(res, plan) is None
    second = provider.create(res, plan, deps, "t3.micro")
    assert second.cloud_id != first.cloud_id
    assert Engine(provider, StateStore(tmp_path / "s.db")).destroy(plan) == []


def test_wait_makes_one_describe_per_round_for_four_nodes(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "poll", count=4, floating_ip=False)
    provider = connect(emu)
    provider.poll_interval = 0.05
    deps = {"keypair": provider.create(plan.get("keypair"), plan, {}, None),
            "secgroup": provider.create(plan.get("secgroup"), plan, {}, None)}
    emu.world.set_boot_seconds(2.0)  # longer than four launches take on a loaded machine: a few rounds are left
    servers = [r for r in plan.resources if r.kind == "server"]
    items = [(r, provider.create(r, plan, deps, "t3.micro")) for r in servers]
    assert all(f.status == "pending" for _, f in items)
    pauses = []
    real_sleep = aws_provider.time.sleep
    provider_sleep = provider.poll_interval

    def counting_sleep(seconds: float) -> None:
        if seconds == provider_sleep:
            pauses.append(seconds)
        real_sleep(seconds)

    progress: list[tuple[str, str]] = []
    emu.world.clear_request_log()
    aws_provider.time.sleep = counting_sleep
    try:
        done = provider.wait(items, plan, 30, lambda node, stage, detail: progress.append((node, stage)))
    finally:
        aws_provider.time.sleep = real_sleep
    assert [f.status for f in done] == ["ready"] * 4
    describes = [a for a, _ in emu.world.request_log() if a == "DescribeInstances"]
    rounds = len(pauses) + 1
    assert rounds >= 3  # the nodes took a few rounds to boot
    assert len(describes) == rounds
    assert {n for n, s in progress if s == "booted"} == {f"node-{i}" for i in range(1, 5)}
    assert Engine(provider, StateStore(tmp_path / "s.db")).destroy(plan) == []


def test_list_owned_sees_everything_tagged(emu, tmp_path: Path, public_key: str):
    plan = lab_plan(tmp_path, public_key, "owned")
    provider = connect(emu)
    store = StateStore(tmp_path / "s.db")
    Engine(provider, store).apply(plan)
    kinds = sorted(f.kind for f in provider.list_owned(plan))
    assert kinds == ["floating_ip", "keypair", "secgroup", "server"]
    # A crash lost the state store: destroy still finds everything by tag.
    assert Engine(provider, StateStore(tmp_path / "empty.db")).destroy(plan) == []
    assert not any(owned_in_inventory(emu, plan.deployment).values())


def test_lost_answers_do_not_duplicate_anything(emu, tmp_path: Path, public_key: str):
    """Key pair, security group and Elastic IP calls carry no idempotency token: a lost answer is followed by
    a look-up, never by a second resource."""
    plan = lab_plan(tmp_path, public_key, "lost")
    provider = connect(emu)
    provider.poll_interval = 0.001
    for action in ("ImportKeyPair", "CreateSecurityGroup", "AllocateAddress"):
        emu.world.inject_fault(action, "timeout_after", 1)
    found = Engine(provider, StateStore(tmp_path / "s.db")).apply(plan)
    assert found["floating_ip:node-1"].attrs["floating_ip"].startswith("127.20.")
    inv = owned_in_inventory(emu, plan.deployment)
    assert (len(inv["key_pairs"]), len(inv["security_groups"]), len(inv["addresses"])) == (1, 1, 1)
    assert [a for a, s in emu.world.request_log() if plan.deployment in s].count("AllocateAddress") == 1
    assert Engine(provider, StateStore(tmp_path / "s.db")).destroy(plan) == []
