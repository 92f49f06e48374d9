"""`ChameleonProvider.inventory()` on the real SDKs against the emulated KVM@TACC: every kind labctl makes there,
of every deployment, with its deployment, owner and creation time, and never a look-alike (a resource with a
labctl name but without labctl's tags, made through openstacksdk / blazarclient as a user would)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.fixtures.chameleon import emulated_kvm

from labctl.engine import Engine
from labctl.plan import build_plan
from labctl.profile import load_profile
from labctl.providers.chameleon import ChameleonProvider
from labctl.state import StateStore

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv1PmUi5E4bqqkqRhHg0Ss6BJqkQ8Y6fD3Y9KQ5Xn3r labctl-test"
PROFILE = """\
name: inv
description: every kind labctl makes on KVM@TACC
sites: [kvm@tacc]
lease_hours: 2
image: ubuntu-24.04
networks:
  lan: {cidr: 192.168.5.0/24, gateway: true}
nodes:
  node:
    count: 1
    floating_ip: true
    types: {kvm@tacc: [m1.small]}
    networks: [{network: lan, first_ip: 11}]
volumes:
  data: {size_gb: 1, node: node-1, mount: /mnt/data}
object_stores:
  box: {keep: false}
ports: [22]
"""
KINDS = {"keypair", "network", "subnet", "router", "secgroup", "reservation", "port", "volume", "bucket", "server",
         "floating_ip"}


@pytest.fixture
def setup(tmp_path: Path):
    with emulated_kvm(tmp_path) as (_tb, provider):
        (tmp_path / "inv.yaml").write_text(PROFILE)
        yield provider, load_profile(tmp_path / "inv.yaml"), StateStore(tmp_path / "state")


def make_look_alikes(provider: ChameleonProvider, deployment: str) -> None:
    """What a user might make by hand with labctl's names for `deployment`, without labctl's tags."""
    conn = provider.conn
    conn.compute.create_keypair(name=deployment, public_key=KEY)
    net = conn.network.create_network(name=f"{deployment}-lan")
    conn.network.create_subnet(name=f"{deployment}-lan-subnet", network_id=net.id, ip_version=4, cidr="10.9.0.0/24")
    conn.network.create_router(name=f"{deployment}-lan-router")
    conn.network.create_port(name=f"{deployment}-node-1-lan", network_id=net.id)
    conn.network.create_security_group(name=deployment, description="made by hand")
    conn.network.create_ip(floating_network_id=provider.network(public=True).id, description="labctl by hand")
    conn.block_storage.create_volume(size=1, name=f"{deployment}-data", metadata={"labctl": "no"})
    # A user's tool runs in a process of its own: none of the metadata that an earlier create_container(metadata=)
    # in this process (another test's) left in openstacksdk's dict shared by every Container.
    from openstack.object_store.v1.container import Container

    Container.metadata.clear()
    conn.object_store.create_container(name=f"{deployment}-box")
    flavor = provider.flavor("m1.small")
    provider.blazar.lease.create(name=f"{deployment}-node", start="now", end="2099-01-01 00:00", events=[],
                                 reservations=[{"resource_type": "flavor:instance", "flavor_id": flavor.id,
                                                "amount": 1}])


def lease_by_hand(provider: ChameleonProvider, name: str) -> None:
    """A lease made through blazarclient as a user would: Blazar keeps no tags."""
    provider.blazar.lease.create(name=name, start="now", end="2099-01-01 00:00", events=[],
                                 reservations=[{"resource_type": "flavor:instance", "amount": 1,
                                                "flavor_id": provider.flavor("m1.small").id}])


def kinds_by_deployment(found) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    for f in found:
        kinds.setdefault(f.attrs["deployment"], set()).add(f.kind)
    return kinds


def test_inventory_lists_every_labctl_kind_of_every_deployment_and_no_look_alike(setup):
    provider, profile, store = setup
    alice = build_plan(profile, provider.site, "alice", KEY)
    bob = build_plan(profile, provider.site, "bob", KEY, course="cs101")
    make_look_alikes(provider, "labctl-carol-inv")  # deployments that labctl never made
    make_look_alikes(provider, "labctl-dave-inv")
    engine = Engine(provider, store)
    engine.apply(alice)
    engine.apply(bob)
    # A lease made by hand under a name of a live deployment's (Blazar keeps no tags: its key pair records its own).
    lease_by_hand(provider, f"{alice.deployment}-extra")

    found = provider.inventory()
    assert kinds_by_deployment(found) == {alice.deployment: KINDS, bob.deployment: KINDS}
    owners = {(f.attrs["deployment"], f.attrs["owner"]) for f in found}
    assert owners == {(alice.deployment, "alice"), (bob.deployment, "bob")}
    for f in found:
        if f.kind not in ("bucket", "keypair"):  # Swift's and Nova's lists say no creation time
            assert datetime.fromisoformat(f.attrs["created"]).utcoffset().total_seconds() == 0, f
    (lease,) = [f for f in found if f.kind == "reservation" and f.attrs["deployment"] == alice.deployment]
    assert lease.name == f"{alice.deployment}-node"
    assert datetime.fromisoformat(lease.attrs["end"]) > datetime.fromisoformat(lease.attrs["created"])
    (server,) = [f for f in found if f.kind == "server" and f.attrs["deployment"] == bob.deployment]
    assert server.attrs["node_type"] == "m1.small"
    # The same resources as each deployment's own list_owned (attachments aside: inventory lists the volume).
    for plan in (alice, bob):
        owned = {(f.kind, f.cloud_id) for f in provider.list_owned(plan) if f.kind != "volume_attachment"}
        assert owned == {(f.kind, f.cloud_id) for f in found if f.attrs["deployment"] == plan.deployment}

    assert engine.destroy(alice) == [] and engine.destroy(bob) == []
    assert provider.inventory() == []  # the look-alikes are still there, and still not labctl's


def test_a_class_key_pair_vouches_for_its_students_leases_by_pattern_and_no_other(setup):
    """A class at a site shares one key pair (`class_shared_plan`), which names its students' leases by pattern:
    inventory gives each lease its student's deployment and owner; a lease of another role, lab or course is
    not the class's."""
    from labctl.plan import class_shared_plan

    provider, profile, store = setup
    engine = Engine(provider, store)
    shared = class_shared_plan(profile, provider.site, "mlsys", "prof", KEY)
    given = engine.apply(shared)
    students = [build_plan(profile, provider.site, s, KEY, course="mlsys", given=given) for s in ("s01", "s-02")]
    for plan in students:
        engine.apply(plan)
    for name in ("labctl-mlsys-s03-inv-extra", "labctl-other-s01-inv-node", "labctl-mlsys-s01-inv2-node",
                 "labctl-mlsys--inv-node"):
        lease_by_hand(provider, name)

    found = provider.inventory()
    assert kinds_by_deployment(found) == {shared.deployment: {"keypair", "secgroup"},
                                          **{plan.deployment: KINDS - {"keypair", "secgroup"} for plan in students}}
    leases = {(f.name, f.attrs["deployment"], f.attrs["owner"]) for f in found if f.kind == "reservation"}
    assert leases == {("labctl-mlsys-s01-inv-node", "labctl-mlsys-s01-inv", "s01"),
                      ("labctl-mlsys-s-02-inv-node", "labctl-mlsys-s-02-inv", "s-02")}
    for plan in students:
        assert engine.destroy(plan) == []
    assert engine.destroy(shared) == []
    assert provider.inventory() == []


@given(course=st.from_regex(r"[a-z0-9]{1,8}(-[a-z0-9]{1,4}){0,2}", fullmatch=True),
       student=st.from_regex(r"[a-z0-9]{1,8}(-[a-z0-9]{1,4}){0,2}", fullmatch=True),
       lab=st.from_regex(r"[a-z0-9]{1,8}(-[a-z0-9]{1,4}){0,2}", fullmatch=True),
       role=st.from_regex(r"[a-z0-9]{1,8}(-[a-z0-9]{1,4}){0,1}", fullmatch=True),
       other=st.text(alphabet="abcdefgh0123456789-:*", max_size=40))
def test_a_class_lease_mark_gives_back_each_students_deployment_and_nothing_else(course, student, lab, role, other):
    """Any student's lease of the class's lab and role maps back to that student's deployment and slug; a name the
    pattern does not fit maps to nothing."""
    from labctl import naming
    from labctl.providers.chameleon.leases import class_lease_owner

    mark = [naming.class_deployments_glob(lab, course), role]
    deployment = naming.deployment_id(lab, student, course)
    assert class_lease_owner(naming.resource_name(deployment, role), [mark]) == (deployment, student)
    dep, owner = class_lease_owner(other, [mark])
    if dep is not None:  # only a name of the pattern: its deployment and owner spelled out again give it back
        assert other == f"{dep}-{role}" and dep == f"labctl-{course}-{owner}-{lab}" and owner
    assert class_lease_owner(naming.resource_name(deployment, role + "x"), [mark]) == (None, None)


def test_containers_made_at_once_each_carry_their_own_deployments_tags(setup):
    """A class makes its students' containers in threads at once. openstacksdk's `create_container(metadata=)`
    writes the metadata into one dict shared by every Container of the process and reads it back when it sends
    the request, so a container could be sent with another thread's tags: then the other student's `down` deleted
    it (their data with it) and its own student's left it behind. Each must carry its own deployment, owner and
    keep flag, and each `find` must find its own."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    provider, profile, _store = setup
    plans = [build_plan(profile, provider.site, f"s{i:02d}", KEY, course="cs101") for i in range(24)]
    buckets = provider.handlers["bucket"]
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: the shared dict's window opens
    try:
        with ThreadPoolExecutor(len(plans)) as pool:
            made = list(pool.map(lambda p: buckets.create(p.by_kind("bucket")[0], p, {}, None), plans))
    finally:
        sys.setswitchinterval(old_interval)
    assert len(made) == len(plans)
    for plan in plans:
        meta = buckets.meta(plan.by_kind("bucket")[0].name)
        assert (meta["labctl-deployment"], meta["labctl-owner"], meta["labctl-keep"]) == (
            plan.deployment, plan.owner, "false"), plan.deployment
        assert buckets.find(plan.by_kind("bucket")[0], plan) is not None
