"""The Chameleon adapter's creates send no more requests than they need, on the real SDK against the emulator.

`find` is what the engine calls right before `create`: it reads lists a class shares (one list call for every
deployment), and create does not list again what find just listed; a key pair is not deleted unless a different
key holds its name, a floating IP is allocated onto its port in one request, and a flavor reservation's flavor is
used by its id (the reservation's) without a look-up.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.fixtures.chameleon import emulated_kvm

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
    with emulated_kvm(tmp_path) as (tb, provider):
        plan = build_plan(load_profile(find_profile("hello")), provider.site, "alice", KEY)
        yield tb, provider, plan, StateStore(tmp_path / "state")


def _sent(tb, since: int) -> list[tuple[str, str]]:
    return [(m, p) for s, m, p in tb.world.request_log()[since:] if s == "kvm@tacc"]


WRITES = [("POST", "/compute/v2.1/os-keypairs"), ("POST", "/network/v2.0/security-groups"),
          ("POST", "/network/v2.0/security-group-rules"), ("POST", "/reservation/v1/leases"),
          ("POST", "/compute/v2.1/servers"), ("POST", "/network/v2.0/floatingips")]
# What a class shares: one list per poll round or per find round for every deployment, not a GET each.
SHARED_LISTS = ["/compute/v2.1/os-keypairs", "/network/v2.0/security-groups", "/reservation/v1/leases",
                "/compute/v2.1/servers/detail", "/network/v2.0/floatingips", "/network/v2.0/ports"]


def test_up_sends_one_write_per_resource_and_finds_from_lists(setup):
    tb, provider, plan, store = setup
    provider.conn.authorize()
    engine = Engine(provider, store)
    before = len(tb.world.request_log())
    engine.apply(plan)
    sent = _sent(tb, before)
    # one write per resource: no DELETE, no PUT (a floating IP is allocated onto its port), no second create
    assert sorted(r for r in sent if r[0] != "GET") == sorted(WRITES)
    # no GET of one item by name (the key pair's GET /os-keypairs/NAME, a flavor's): lists and one-off look-ups
    assert not [p for m, p in sent if m == "GET" and plan.deployment in p]
    # the reservation's flavor is not looked up (its id is the reservation's): only the lease's source flavor
    assert sum(1 for _, p in sent if p.startswith("/compute/v2.1/flavors")) == 2
    inv = tb.world.inventory("kvm@tacc")
    (fip,) = inv["floating_ips"]
    (server,) = [s for s in inv["servers"] if s["name"].startswith("labctl-")]
    floating = [a["addr"] for a in server["addresses"]["sharednet1"] if a["OS-EXT-IPS:type"] == "floating"]
    assert fip["port_id"] and floating == [fip["floating_ip_address"]]
    assert engine.destroy(plan) == []


def test_a_class_finds_from_one_list_per_kind_and_sees_its_own_creates(setup):
    """The engine's finds for a class's environments (before their creates) share one list per kind instead of a
    GET each; a create makes the next find of that resource fetch again, so it is never missed."""
    tb, provider, plan, store = setup
    profile = load_profile(find_profile("hello"))
    plans = [build_plan(profile, provider.site, f"student{i}", KEY) for i in range(6)]
    provider.conn.authorize()
    before = len(tb.world.request_log())
    kinds = ("keypair", "secgroup", "reservation", "server", "floating_ip")
    assert all(provider.find(p.get(r.key), p) is None for p in plans for r in p.resources if r.kind in kinds)
    sent = [r for r in _sent(tb, before) if r[1] != "/compute/v2.1"]  # the SDK's version discovery, once
    assert sorted(sent) == sorted(("GET", p) for p in SHARED_LISTS if not p.endswith("/ports"))  # one each
    keypair = plans[0].get("keypair")
    provider.create(keypair, plans[0], {}, None)
    before = len(tb.world.request_log())
    assert provider.find(keypair, plans[0]).status == "ready"  # fetched again: its own create is seen
    assert provider.find(plans[1].get("keypair"), plans[1]) is None  # that fresh list serves the others too
    assert _sent(tb, before) == [("GET", "/compute/v2.1/os-keypairs")]


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


@pytest.mark.parametrize(("env", "trusted", "verify"), [
    ({}, False, True),
    ({"https_proxy": "http://127.0.0.1:9"}, True, True),
    ({"HTTPS_PROXY": "http://127.0.0.1:9", "REQUESTS_CA_BUNDLE": "/a.pem"}, True, True),
    ({"REQUESTS_CA_BUNDLE": "/a.pem"}, False, "/a.pem"),
    ({"CURL_CA_BUNDLE": "/b.pem"}, False, "/b.pem"),
    ({"REQUESTS_CA_BUNDLE": "/a.pem", "CURL_CA_BUNDLE": "/b.pem"}, False, "/a.pem"),
])
def test_environment_settings_are_read_once_unless_a_proxy_is_set(setup, monkeypatch, env, trusted, verify):
    """requests scans the whole environment for proxies on every request: with no proxy set, the CA bundle it
    would find there (REQUESTS_CA_BUNDLE, else CURL_CA_BUNDLE) is read once and the scan is off; with a proxy,
    requests keeps reading the environment (its per-host no_proxy rule)."""
    tb, _provider, _plan, _store = setup
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "requests_ca_bundle",
                            "curl_ca_bundle"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    site = sites.emulate(sites.resolve("kvm@tacc"))
    site = site.__class__(**{**site.__dict__, "auth_url": tb.auth_url("kvm@tacc")})
    provider = ChameleonProvider(site, find_openstack_credentials(site, env=tb.os_env("kvm@tacc")))
    assert provider.conn.session.session.trust_env is trusted
    assert provider.conn.session.verify == verify
    if not env:
        provider.conn.authorize()  # and the API answers as before
        assert provider.conn.compute.get("/flavors").status_code == 200


@pytest.mark.parametrize("operation, quota", [
    ("POST /v2.0/floatingips", "floatingip"),
    ("POST /v2.0/security-group-rules", "security_group_rule"),
    ("POST /os-keypairs", "key_pairs"),
])
def test_a_lost_create_that_took_the_last_room_under_the_quota_is_found_not_failed(setup, operation, quota):
    """The create was done but its answer lost, and it took the project's last room: the resend is refused for
    quota (Neutron and Nova check the quota before a name, a rule or a port is found taken), so labctl looks for its
    own before it gives the site up. Before, a class of 50 at a floating IP quota of 50 failed a student this way."""
    from labctl.testbed.openstack.model import compute_usage, quota_used
    from labctl.testbed.openstack.model.base import site_of

    tb, provider, plan, store = setup

    def used() -> int:
        with tb.world.read() as db:
            site = site_of("kvm@tacc")
            return compute_usage(db, site)[quota] if quota == "key_pairs" else quota_used(db, site, quota)

    engine = Engine(provider, store)
    before = used()
    engine.apply(plan)
    full = used()
    assert engine.destroy(plan) == [] and used() == before
    tb.world.set_quota("kvm@tacc", quota, full)  # room for this environment's, not one more
    tb.world.inject_fault("kvm@tacc", operation, "timeout_after", 1)
    engine.apply(plan)
    assert tb.world.faults() == []  # the fault met the create
    assert used() == full
    assert all(f.status == "ready" for f in (provider.find(r, plan) for r in plan.resources))
    assert engine.destroy(plan) == []
    assert used() == before


def test_each_services_endpoint_is_looked_up_once_per_token(setup, monkeypatch):
    """keystoneauth copies the whole catalog to find a service's endpoint, on every request sent by service
    type: labctl looks each one up once per token. Each service still gets its own endpoint, and a new token
    (the old one invalidated) is looked up again."""
    from keystoneauth1.access import service_catalog

    tb, provider, _plan, _store = setup
    copies = []
    normalize = service_catalog.ServiceCatalog.normalize_catalog
    monkeypatch.setattr(service_catalog.ServiceCatalog, "normalize_catalog",
                        lambda self, *a, **k: copies.append(1) or normalize(self, *a, **k))
    conn = provider.conn
    conn.authorize()

    def round_trip() -> None:
        assert conn.network.get("/networks").status_code == 200
        assert conn.compute.get("/flavors").status_code == 200
        assert isinstance(provider.blazar.lease.list(), list)

    round_trip()
    first = len(copies)
    for _ in range(5):
        round_trip()
    assert len(copies) == first  # nothing looked up again: every service's endpoint was remembered
    since = len(tb.world.request_log())
    round_trip()
    sent = [p for _m, p in _sent(tb, since)]
    assert any(p.startswith("/network/") for p in sent) and any(p.startswith("/compute/") for p in sent)
    assert any(p.startswith("/reservation/") for p in sent)  # each to its own service

    conn.session.auth.invalidate()  # a new token: its catalog is read again
    round_trip()
    assert len(copies) > first
