"""The Chameleon adapter's creates send no more requests than they need, on the real SDK against the emulator.

`find` is what the engine calls right before `create`; create does not list again what find just listed, a key
pair is not deleted unless a different key holds its name, and a floating IP is allocated onto its port in one
request.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from labctl import sites
from labctl.credentials import find_openstack_credentials
from labctl.engine import Engine
from labctl.plan import build_plan
from labctl.profile import find_profile, load_profile
from labctl.providers.chameleon import ChameleonProvider
from labctl.state import StateStore

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv1PmUi5E4bqqkqRhHg0Ss6BJqkQ8Y6fD3Y9KQ5Xn3r labctl-test"
OTHER = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPm5hxn1b6Uk3m0lDqVgTFnJ8F7ulBqJqU4x7xXgJf3F other"


@pytest.fixture
def setup(tmp_path: Path):
    from labctl.testbed import Testbed

    tb = Testbed.start(state_dir=tmp_path / "tb", time_scale=0.001, ssh=False)
    try:
        site = sites.emulate(sites.resolve("kvm@tacc"))
        site = site.__class__(**{**site.__dict__, "auth_url": tb.auth_url("kvm@tacc"), "poll_interval": 0.02})
        provider = ChameleonProvider(site, find_openstack_credentials(site, env=tb.os_env("kvm@tacc")))
        profile = load_profile(find_profile("hello"))
        plan = build_plan(profile, site, "alice", KEY)
        yield tb, provider, plan, StateStore(tmp_path / "state")
    finally:
        tb.stop()


def _sent(tb, since: int) -> list[tuple[str, str]]:
    return [(m, p) for s, m, p in tb.world.request_log()[since:] if s == "kvm@tacc"]


def test_up_sends_one_request_per_step_for_keypair_secgroup_and_floating_ip(setup):
    tb, provider, plan, store = setup
    provider.conn.authorize()
    engine = Engine(provider, store)
    before = len(tb.world.request_log())
    engine.apply(plan)
    sent = _sent(tb, before)
    keypair = [r for r in sent if "os-keypairs" in r[1]]
    assert keypair == [("GET", f"/compute/v2.1/os-keypairs/{plan.deployment}"),
                       ("POST", "/compute/v2.1/os-keypairs")]  # no DELETE, no list after the 404
    fips = [r for r in sent if "floatingips" in r[1]]
    assert [m for m, _ in fips] == ["GET", "POST"]  # find, then allocate onto the port: no second find, no PUT
    groups = [r for r in sent if r[1].endswith("/security-groups")]
    # find, then create, then one list after it: a concurrent run of the same deployment (other state, other
    # machine) may have made a twin, since Neutron does not keep names unique
    assert [m for m, _ in groups] == ["GET", "POST", "GET"]
    inv = tb.world.inventory("kvm@tacc")
    (fip,) = inv["floating_ips"]
    (server,) = [s for s in inv["servers"] if s["name"].startswith("labctl-")]
    floating = [a["addr"] for a in server["addresses"]["sharednet1"] if a["OS-EXT-IPS:type"] == "floating"]
    assert fip["port_id"] and floating == [fip["floating_ip_address"]]
    assert engine.destroy(plan) == []


def test_keypair_create_after_a_lost_answer_or_with_another_key(setup):
    tb, provider, plan, store = setup
    res = plan.get("keypair")
    # The keypair exists with this key but create is called without a find first (an answer lost mid-create).
    provider.conn.compute.create_keypair(name=res.name, public_key=KEY)
    assert provider.create(res, plan, {}, None).status == "ready"
    # Another key under the name (the user's key changed): an error, which the engine deletes and makes again.
    provider.conn.compute.delete_keypair(res.name)
    provider.conn.compute.create_keypair(name=res.name, public_key=OTHER)
    assert provider.find(res, plan).status == "error"
    plan.resources[:] = [res]
    Engine(provider, store).apply(plan)
    assert provider.conn.compute.get_keypair(res.name).public_key.split()[:2] == KEY.split()[:2]


def test_teardowns_share_project_lists_but_see_their_own_deletes(setup, tmp_path):
    tb, provider, plan, store = setup
    other = build_plan(load_profile(find_profile("hello")), provider.site, "bob", KEY)
    engine = Engine(provider, store)
    engine.apply(plan)
    engine.apply(other)

    def fip_lists(since: int) -> int:
        return sum(1 for m, p in _sent(tb, since) if m == "GET" and p.endswith("/floatingips"))

    before = len(tb.world.request_log())
    mine = {f.kind for f in provider.list_owned(plan)}
    theirs = {f.kind for f in provider.list_owned(other)}
    assert {"server", "floating_ip", "reservation", "secgroup", "keypair"} <= mine and theirs == mine
    assert fip_lists(before) == 1  # one list of the project's floating IPs served both deployments
    assert engine.destroy(plan) == []  # its check after the deletes fetched again: nothing of it is left
    assert {f.kind for f in provider.list_owned(other)} == mine  # the other deployment is untouched
    assert engine.destroy(other) == []
