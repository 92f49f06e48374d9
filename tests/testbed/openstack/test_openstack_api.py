"""The emulated Chameleon's OpenStack side, driven by the real SDKs over HTTP on 127.0.0.1.

openstacksdk, python-blazarclient (and python-chi in one test) talk to `Testbed` exactly as they would to
Chameleon; the assertions check both what the clients see and the world's own view (`World.inventory`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from tests.testbed.openstack.conftest import SCALE

from labctl.testbed import Testbed
from labctl.testbed.world import World

PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHkKvZ0Qz2Zl7uF6yN1dYx3dQ3bVQ3bVQ3bVQ3bVQ3bV labctl-test"

GUARD_DIR = Path(__file__).resolve().parents[2] / "loopback_guard"


def connect(tb: Testbed, site: str = "chi@tacc"):
    import openstack

    env = tb.os_env(site)
    return openstack.connection.Connection(
        auth_url=env["OS_AUTH_URL"],
        auth_type=env["OS_AUTH_TYPE"],
        application_credential_id=env["OS_APPLICATION_CREDENTIAL_ID"],
        application_credential_secret=env["OS_APPLICATION_CREDENTIAL_SECRET"],
        region_name=env["OS_REGION_NAME"],
        interface="public",
        identity_api_version="3",
    )


def blazar(conn, region: str):
    from blazarclient.client import Client

    return Client("1", session=conn.session, service_type="reservation", region_name=region)


def in_an_hour() -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(time.time() + 3600))


def host_reservation(node_type: str, n: int = 1) -> dict:
    return {
        "resource_type": "physical:host",
        "resource_properties": json.dumps(["==", "$node_type", node_type]),
        "hypervisor_properties": "",
        "min": n,
        "max": n,
    }


def wait_for(fn, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def active_lease(bz, name: str, reservations: list[dict]) -> dict:
    lease = bz.lease.create(name=name, start="now", end=in_an_hour(), reservations=reservations, events=[])
    assert lease["status"] == "PENDING"
    return wait_for(lambda: (x := bz.lease.get(lease["id"]))["status"] == "ACTIVE" and x)


def boot(conn, name: str, rid: str | None, flavor: str = "baremetal", **kw):
    image = next(conn.image.images(name="CC-Ubuntu24.04"))
    flavor_id = conn.compute.find_flavor(flavor, ignore_missing=False).id
    net = conn.network.find_network("sharednet1", ignore_missing=False)
    hints = {"reservation": rid} if rid else {}
    return conn.compute.create_server(
        name=name,
        image_id=image.id,
        flavor_id=flavor_id,
        networks=[{"uuid": net.id}],
        scheduler_hints=hints,
        **kw,
    )


# ============================================================================ the whole flow, bare metal


def test_openstacksdk_and_blazarclient_full_flow_on_chi_tacc(tb):
    conn = connect(tb)
    assert [i.name for i in conn.image.images(name="CC-Ubuntu24.04-CUDA")] == ["CC-Ubuntu24.04-CUDA"]
    assert [f.name for f in conn.compute.flavors()] == ["baremetal"]

    kp = conn.compute.create_keypair(name="labctl-key", public_key=PUBKEY)
    assert conn.compute.get_keypair("labctl-key").fingerprint == kp.fingerprint
    sg = conn.network.create_security_group(name="labctl-sg", description="labctl test")
    rule = conn.network.create_security_group_rule(
        security_group_id=sg.id,
        direction="ingress",
        protocol="tcp",
        port_range_min=22,
        port_range_max=22,
        remote_ip_prefix="0.0.0.0/0",
    )
    assert rule.port_range_min == 22
    assert conn.network.find_security_group("labctl-sg").id == sg.id

    bz = blazar(conn, "CHI@TACC")
    lease = active_lease(bz, "labctl-lease", [host_reservation("compute_liqid")])
    assert lease["end_date"].endswith(".000000") and "T" in lease["start_date"]
    time.strptime(lease["created_at"], "%Y-%m-%d %H:%M:%S")
    (res,) = lease["reservations"]
    assert res["status"] == "active" and res["resource_properties"] == '["==", "$node_type", "compute_liqid"]'
    assert {e["event_type"] for e in lease["events"]} == {"start_lease", "before_end_lease", "end_lease"}

    server = boot(
        conn,
        "labctl-node-1",
        res["id"],
        key_name="labctl-key",
        metadata={"labctl:deployment": "d1"},
        security_groups=[{"name": "labctl-sg"}],
    )
    assert conn.compute.get_server(server.id).status == "BUILD"
    server = conn.compute.wait_for_server(
        conn.compute.get_server(server.id), status="ACTIVE", interval=0.05, wait=10
    )
    assert server.metadata == {"labctl:deployment": "d1"} and server.key_name == "labctl-key"
    assert [s.name for s in conn.compute.servers(name="^labctl-node")] == ["labctl-node-1"]
    assert list(conn.compute.servers(name="^other")) == []

    public = conn.network.find_network("public", ignore_missing=False)
    assert public.is_router_external
    fip = conn.network.create_ip(floating_network_id=public.id, description="labctl test fip")
    assert fip.floating_ip_address.startswith("127.10.1.") and fip.status == "DOWN" and fip.port_id is None
    (port,) = conn.network.ports(device_id=server.id)
    fip = conn.network.update_ip(fip, port_id=port.id)
    assert fip.status == "ACTIVE" and fip.fixed_ip_address == port.fixed_ips[0]["ip_address"]
    addresses = conn.compute.get_server(server.id).addresses["sharednet1"]
    assert {"addr": fip.floating_ip_address, "OS-EXT-IPS:type": "floating"}.items() <= addresses[1].items()
    assert [f.id for f in conn.network.ips(floating_ip_address=fip.floating_ip_address)] == [fip.id]
    assert [f.id for f in conn.network.ips(port_id=port.id)] == [fip.id]

    (target,) = tb.world.ssh_targets()
    assert target["address"] == fip.floating_ip_address and target["port"] == tb.world.ssh_port
    assert target["authorized_keys"] == [PUBKEY] and target["node_dir"].name == server.id

    inv = tb.world.inventory("chi@tacc")
    assert [s["status"] for s in inv["servers"]] == ["ACTIVE"]
    assert [x["name"] for x in inv["leases"]] == ["labctl-lease"]
    assert [x["description"] for x in inv["floating_ips"]] == ["labctl test fip"]
    assert [x["name"] for x in inv["security_groups"]] == ["labctl-sg"]
    assert [x["name"] for x in inv["keypairs"]] == ["labctl-key"]

    conn.compute.delete_server(server.id)
    assert conn.compute.find_server(server.id) is None
    conn.network.delete_ip(fip)
    bz.lease.delete(lease["id"])
    conn.network.delete_security_group(sg)
    conn.compute.delete_keypair("labctl-key")
    assert tb.world.inventory() == {
        "servers": [],
        "leases": [],
        "floating_ips": [],
        "security_groups": [],
        "keypairs": [],
    }


def test_password_auth_token_validation_and_401s(tb):
    import openstack
    from openstack import exceptions as sdk_exc

    ok = openstack.connect(
        auth_url=tb.auth_url("chi@uc"),
        auth_type="password",
        username="student",
        password=tb.world.credentials.password,
        project_name="sim-project",
        user_domain_name="Default",
        project_domain_name="Default",
        region_name="CHI@UC",
    )
    assert ok.session.get_project_id() and list(ok.compute.flavors())

    bad = requests.post(
        f"{tb.auth_url('chi@uc')}/auth/tokens",
        json={
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {"name": "student", "password": "nope", "domain": {"name": "Default"}}
                    },
                }
            }
        },
    )
    assert bad.status_code == 401 and bad.json()["error"]["title"] == "Unauthorized"
    with pytest.raises(sdk_exc.SDKException, match="requires authentication"):
        openstack.connect(
            auth_url=tb.auth_url("chi@tacc"),
            auth_type="v3applicationcredential",
            application_credential_id=tb.world.credentials.app_cred_id,
            application_credential_secret="wrong",
            region_name="CHI@TACC",
        ).authorize()

    token = ok.session.get_token()
    check = requests.get(
        f"{tb.auth_url('chi@uc')}/auth/tokens", headers={"X-Auth-Token": token, "X-Subject-Token": token}
    )
    assert check.status_code == 200 and check.headers["X-Subject-Token"] == token
    catalog = check.json()["token"]["catalog"]
    assert {c["type"] for c in catalog} == {"identity", "compute", "network", "image", "reservation", "object-store"}
    assert all(
        e["url"].startswith(tb.endpoint) and e["region_id"] == "CHI@UC" and e["interface"] == "public"
        for c in catalog
        for e in c["endpoints"]
    )

    base = tb.site_url("chi@uc")
    assert requests.get(f"{base}/compute/v2.1/servers").status_code == 401
    assert requests.get(f"{base}/compute/v2.1/servers", headers={"X-Auth-Token": "bogus"}).status_code == 401
    # A token from one site's Keystone is not valid at another site.
    other = requests.get(
        f"{tb.site_url('chi@tacc')}/network/v2.0/floatingips", headers={"X-Auth-Token": token}
    )
    assert other.status_code == 401 and other.json()["error"]["code"] == 401


# ============================================================================ KVM flavor reservations


def test_kvm_flavor_lease_creates_reservation_flavor_and_server_boots_with_it(tb):
    conn = connect(tb, "kvm@tacc")
    bz = blazar(conn, "KVM@TACC")
    small = conn.compute.find_flavor("m1.small", ignore_missing=False)
    lease = active_lease(
        bz,
        "labctl-kvm",
        [{"resource_type": "flavor:instance", "flavor_id": small.id, "amount": 1, "affinity": None}],
    )
    (res,) = lease["reservations"]
    assert res["flavor_id"] == res["id"] and res["amount"] == 1
    flavor = conn.compute.get_flavor(res["flavor_id"])
    assert flavor.name == f"reservation:{res['id']}" and not flavor.is_public
    assert flavor.extra_specs["aggregate_instance_extra_specs:reservation"] == res["id"]
    assert (flavor.vcpus, flavor.ram) == (small.vcpus, small.ram)

    server = boot(conn, "labctl-vm-1", None, flavor=res["flavor_id"], key_name=None)
    server = conn.compute.wait_for_server(server, status="ACTIVE", interval=0.02, wait=10)
    assert server.flavor.original_name == f"reservation:{res['id']}"
    # The reservation holds one instance: a second one, or one on an unreserved flavor, fails to schedule.
    for name, flavor_name in (("labctl-vm-2", res["flavor_id"]), ("labctl-vm-3", "m1.small")):
        extra = boot(conn, name, None, flavor=flavor_name)
        extra = conn.compute.wait_for_server(extra, status="ERROR", failures=[], interval=0.02, wait=10)
        assert "No valid host was found" in extra.fault["message"]

    bz.lease.delete(lease["id"])
    assert conn.compute.find_flavor(res["flavor_id"]) is None
    # Deleting the lease took its servers along; the one on an unreserved flavor stays, in ERROR.
    assert [(s["name"], s["status"]) for s in tb.world.inventory("kvm@tacc")["servers"]] == [
        ("labctl-vm-3", "ERROR")
    ]


def test_kvm_flavor_slots_run_out(tb):
    tb.world.set_flavor_slots("kvm@tacc", "m1.large", 2)
    conn = connect(tb, "kvm@tacc")
    bz = blazar(conn, "KVM@TACC")
    large = conn.compute.find_flavor("m1.large", ignore_missing=False)
    bz.lease.create(
        name="a",
        start="now",
        end=in_an_hour(),
        events=[],
        reservations=[{"resource_type": "flavor:instance", "flavor_id": large.id, "amount": 2}],
    )
    from blazarclient.exception import BlazarClientException

    with pytest.raises(BlazarClientException, match="Not enough hosts available"):
        bz.lease.create(
            name="b",
            start="now",
            end=in_an_hour(),
            events=[],
            reservations=[{"resource_type": "flavor:instance", "flavor_id": large.id, "amount": 1}],
        )


# ============================================================================ capacity and scheduling


def test_not_enough_hosts_raises_and_creates_no_lease(tb):
    from blazarclient.exception import BlazarClientException

    tb.world.set_hosts("chi@uc", "gpu_a100_pcie", 1)
    conn = connect(tb, "chi@uc")
    bz = blazar(conn, "CHI@UC")
    bz.lease.create(
        name="first",
        start="now",
        end=in_an_hour(),
        events=[],
        reservations=[host_reservation("gpu_a100_pcie")],
    )
    with pytest.raises(BlazarClientException) as err:
        bz.lease.create(
            name="second",
            start="now",
            end=in_an_hour(),
            events=[],
            reservations=[host_reservation("gpu_a100_pcie")],
        )
    assert err.value.kwargs["code"] == 500
    assert "not enough hosts available" in str(err.value).lower()
    assert [x["name"] for x in tb.world.inventory("chi@uc")["leases"]] == ["first"]

    # The raw body is Blazar's: {"error_code", "error_message", "error_name"}.
    raw = conn.session.post(
        f"{tb.site_url('chi@uc')}/reservation/v1/leases",
        raise_exc=False,
        json={
            "name": "third",
            "start_date": "now",
            "end_date": in_an_hour(),
            "events": [],
            "reservations": [host_reservation("gpu_a100_pcie")],
        },
    )
    assert raw.status_code == 500
    assert raw.json() == {"error_code": 500, "error_message": "Not enough hosts available", "error_name": 500}

    tb.world.set_hosts("chi@uc", "gpu_a100_pcie", 0)
    with pytest.raises(BlazarClientException, match="Not enough hosts available"):
        bz.lease.create(
            name="fourth",
            start="now",
            end=in_an_hour(),
            events=[],
            reservations=[host_reservation("gpu_a100_pcie")],
        )
    # `=` is accepted like `==`; a reservation at another time does not overlap.
    later = time.strftime("%Y-%m-%d %H:%M", time.gmtime(time.time() + 7200))
    tb.world.set_hosts("chi@uc", "gpu_a100_pcie", 1)
    bz.lease.create(
        name="later",
        start=later,
        end=time.strftime("%Y-%m-%d %H:%M", time.gmtime(time.time() + 9000)),
        events=[],
        reservations=[
            {
                **host_reservation("gpu_a100_pcie"),
                "resource_properties": '["=", "$node_type", "gpu_a100_pcie"]',
            }
        ],
    )


def test_server_without_active_host_reservation_goes_to_error(tb):
    conn = connect(tb)
    bz = blazar(conn, "CHI@TACC")
    later = time.strftime("%Y-%m-%d %H:%M", time.gmtime(time.time() + 7200))
    end = time.strftime("%Y-%m-%d %H:%M", time.gmtime(time.time() + 9000))
    pending = bz.lease.create(
        name="pending", start=later, end=end, events=[], reservations=[host_reservation("compute_skylake")]
    )
    assert pending["status"] == "PENDING"
    for rid in (pending["reservations"][0]["id"], None, "not-a-reservation"):
        server = boot(conn, f"labctl-bad-{rid}", rid)
        server = conn.compute.wait_for_server(server, status="ERROR", failures=[], interval=0.02, wait=10)
        assert server.fault["message"].startswith("No valid host was found")
        assert not list(conn.network.ports(device_id=server.id))

    # Two hosts reserved: two servers fit, the third does not.
    lease = active_lease(bz, "two", [host_reservation("compute_skylake", 2)])
    rid = lease["reservations"][0]["id"]
    servers = [boot(conn, f"labctl-ok-{i}", rid) for i in range(3)]
    statuses = [
        conn.compute.wait_for_server(
            s, status="ACTIVE" if i < 2 else "ERROR", failures=[], interval=0.02, wait=10
        ).status
        for i, s in enumerate(servers)
    ]
    assert statuses == ["ACTIVE", "ACTIVE", "ERROR"]


def test_lease_update_404_by_name_and_os_hosts(tb):
    conn = connect(tb)
    bz = blazar(conn, "CHI@TACC")
    lease = active_lease(bz, "labctl-extend", [host_reservation("gpu_p100")])
    longer = bz.lease.update(lease["id"], prolong_for="2h")
    assert longer["end_date"] > lease["end_date"]
    end = time.strftime("%Y-%m-%d %H:%M", time.gmtime(time.time() + 5 * 3600))
    assert bz.lease.update(lease["id"], end_date=end)["end_date"].startswith(end.replace(" ", "T"))

    raw = conn.session.get(f"{tb.site_url('chi@tacc')}/reservation/v1/leases/labctl-extend", raise_exc=False)
    assert raw.status_code == 404 and raw.json()["error_code"] == 404
    assert [x["id"] for x in bz.lease.list()] == [lease["id"]]

    hosts = bz.host.list()
    assert len([h for h in hosts if h["node_type"] == "gpu_p100"]) == 15
    # Upstream python-blazarclient 4.6 has no allocation calls (Chameleon's fork does): raw REST.
    listing = conn.session.get(f"{tb.site_url('chi@tacc')}/reservation/v1/os-hosts/allocations").json()
    allocations = {a["resource_id"]: a["reservations"] for a in listing["allocations"]}
    held = [h for h, rs in allocations.items() if rs]
    assert len(held) == 1 and allocations[held[0]][0]["lease_id"] == lease["id"]
    one = conn.session.get(f"{tb.site_url('chi@tacc')}/reservation/v1/os-hosts/{held[0]}/allocation").json()
    assert one["allocation"]["reservations"][0]["id"] == lease["reservations"][0]["id"]


def test_floating_ip_reservation_tags_quota_and_lease_end(tb):
    conn = connect(tb)
    bz = blazar(conn, "CHI@TACC")
    public = conn.network.find_network("public", ignore_missing=False)
    lease = active_lease(
        bz,
        "labctl-fips",
        [
            host_reservation("compute_zen3"),
            {"resource_type": "virtual:floatingip", "network_id": public.id, "amount": 2},
        ],
    )
    fip_rid = next(r["id"] for r in lease["reservations"] if r["resource_type"] == "virtual:floatingip")
    reserved = wait_for(lambda: list(conn.network.ips(tags=["blazar", f"reservation:{fip_rid}"])))
    assert len(reserved) == 2

    # Quota (reserved FIPs do not count): two more are fine, the third is Neutron's OverQuota.
    tb.world.set_fip_quota("chi@tacc", 2)
    made = [
        conn.network.create_ip(floating_network_id=public.id, description=f"labctl {i}") for i in range(2)
    ]
    raw = conn.session.post(
        f"{tb.site_url('chi@tacc')}/network/v2.0/floatingips",
        raise_exc=False,
        json={"floatingip": {"floating_network_id": public.id}},
    )
    assert raw.status_code == 409
    assert raw.json() == {
        "NeutronError": {
            "type": "OverQuota",
            "detail": "",
            "message": "Quota exceeded for resources: ['floatingip'].",
        }
    }
    conn.network.set_tags(made[0], ["labctl", "x"])
    assert [f.id for f in conn.network.ips(tags=["labctl"])] == [made[0].id]
    assert [f.id for f in conn.network.ips(description="labctl 1")] == [made[1].id]

    # At lease end (time moved on), Blazar removes its servers and its floating IPs.
    server = boot(conn, "labctl-end", lease["reservations"][0]["id"])
    conn.compute.wait_for_server(server, interval=0.02, wait=10)
    tb.world.tick(now=time.time() + 2 * 3600)
    assert conn.compute.find_server(server.id) is None
    assert not list(conn.network.ips(tags=["blazar"]))
    assert len(list(conn.network.ips())) == 2


def test_security_group_in_use_keypair_conflict_and_actions(tb):
    from openstack import exceptions as sdk_exc

    conn = connect(tb)
    conn.compute.create_keypair(name="dup", public_key=PUBKEY)
    with pytest.raises(sdk_exc.ConflictException, match="already exists"):
        conn.compute.create_keypair(name="dup", public_key=PUBKEY)
    assert conn.compute.find_keypair("missing") is None

    sg = conn.network.create_security_group(name="labctl-web")
    lease = active_lease(blazar(conn, "CHI@TACC"), "sg", [host_reservation("compute_cascadelake")])
    server = boot(conn, "labctl-sg-node", lease["reservations"][0]["id"])
    conn.compute.add_security_group_to_server(server, sg)
    assert {"name": "labctl-web"} in conn.compute.get_server(server.id).security_groups
    raw = conn.session.delete(
        f"{tb.site_url('chi@tacc')}/network/v2.0/security-groups/{sg.id}", raise_exc=False
    )
    assert raw.status_code == 409 and raw.json()["NeutronError"]["type"] == "SecurityGroupInUse"
    conn.compute.remove_security_group_from_server(server, sg)
    conn.network.delete_security_group(sg)
    missing = conn.session.get(f"{tb.site_url('chi@tacc')}/compute/v2.1/servers/nope", raise_exc=False)
    assert missing.status_code == 404 and missing.json() == {
        "itemNotFound": {"code": 404, "message": "Instance nope could not be found."}
    }


# ============================================================================ faults, latency, request log


def test_fault_error429_then_success_and_error500_has_no_effect(tb):
    from blazarclient.exception import BlazarClientException

    conn = connect(tb)
    bz = blazar(conn, "CHI@TACC")
    tb.world.inject_fault("chi@tacc", "POST /leases", "error429")
    tb.world.inject_fault("chi@tacc", "POST /leases", "error500")
    with pytest.raises(BlazarClientException) as err:
        bz.lease.create(
            name="l", start="now", end=in_an_hour(), reservations=[host_reservation("storage")], events=[]
        )
    assert err.value.kwargs["code"] == 429
    with pytest.raises(BlazarClientException) as err:
        bz.lease.create(
            name="l", start="now", end=in_an_hour(), reservations=[host_reservation("storage")], events=[]
        )
    assert err.value.kwargs["code"] == 500
    assert tb.world.inventory()["leases"] == []
    assert (
        bz.lease.create(
            name="l", start="now", end=in_an_hour(), reservations=[host_reservation("storage")], events=[]
        )["status"]
        == "PENDING"
    )

    tb.world.inject_fault(None, "GET /v2.0/networks", "error429", count=1)
    raw = conn.session.get(f"{tb.site_url('chi@tacc')}/network/v2.0/networks", raise_exc=False)
    assert raw.status_code == 429 and raw.headers["Retry-After"] == "1"
    assert conn.session.get(f"{tb.site_url('chi@tacc')}/network/v2.0/networks").status_code == 200

    log = tb.world.request_log()
    assert sum(1 for s, m, p in log if (s, m, p) == ("chi@tacc", "POST", "/reservation/v1/leases")) == 3
    assert all(s in ("chi@tacc", "refapi") for s, _, _ in log)


def test_hang_after_and_timeout_after_commit_the_effect(tb):
    conn = connect(tb)
    token = conn.session.get_token()
    net = conn.network.find_network("public", ignore_missing=False)
    url = f"{tb.site_url('chi@tacc')}/network/v2.0/floatingips"
    body = {"floatingip": {"floating_network_id": net.id, "description": "labctl hang"}}

    tb.world.inject_fault("chi@tacc", "POST /v2.0/floatingips", "hang_after")
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(url, json=body, headers={"X-Auth-Token": token}, timeout=(2, 0.3))
    assert time.monotonic() - started < 2
    assert [f["description"] for f in tb.world.inventory()["floating_ips"]] == ["labctl hang"]

    tb.world.inject_fault("chi@tacc", "POST /v2.0/floatingips", "timeout_after")
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(
            url,
            json={"floatingip": {**body["floatingip"], "description": "labctl drop"}},
            headers={"X-Auth-Token": token},
            timeout=5,
        )
    assert sorted(f["description"] for f in tb.world.inventory()["floating_ips"]) == [
        "labctl drop",
        "labctl hang",
    ]

    tb.world.inject_fault("chi@tacc", "POST /servers", "server_error_state", message="Injected build failure")
    lease = active_lease(blazar(conn, "CHI@TACC"), "f", [host_reservation("compute_arm64")])
    server = boot(conn, "labctl-fail", lease["reservations"][0]["id"])
    server = conn.compute.wait_for_server(server, status="ERROR", failures=[], interval=0.02, wait=10)
    assert server.fault["message"] == "Injected build failure"
    assert tb.world.faults() == []


def test_lease_error_by_fault_injection(tb):
    conn = connect(tb, "chi@uc")
    bz = blazar(conn, "CHI@UC")
    tb.world.inject_fault("chi@uc", "POST /leases", "server_error_state")
    lease = bz.lease.create(
        name="labctl-doomed",
        start="now",
        end=in_an_hour(),
        events=[],
        reservations=[host_reservation("compute_skylake")],
    )
    assert lease["status"] == "PENDING"
    failed = wait_for(lambda: (x := bz.lease.get(lease["id"]))["status"] == "ERROR" and x)
    assert failed["reservations"][0]["status"] == "error"
    assert {e["event_type"]: e["status"] for e in failed["events"]}["start_lease"] == "ERROR"
    assert [x["status"] for x in tb.world.inventory("chi@uc")["leases"]] == ["ERROR"]
    bz.lease.delete(lease["id"])
    assert tb.world.inventory("chi@uc")["leases"] == []


def test_latency_is_scaled(tb):
    conn = connect(tb)
    list(conn.compute.flavors())
    tb.world.set_latency("GET /flavors/detail", 200)  # 200 s × 0.001
    started = time.monotonic()
    list(conn.compute.flavors())
    assert 0.2 <= time.monotonic() - started < 2
    tb.world.set_latency("GET /flavors/detail", 0)


# ============================================================================ other APIs and processes


def test_refapi_glance_and_neutron_shapes(tb):
    sites = requests.get(f"{tb.refapi_url}/sites.json").json()["items"]
    assert {s["name"] for s in sites} >= {"CHI@TACC", "CHI@UC", "CHI@Edge"}
    nodes = requests.get(f"{tb.refapi_url}/sites/tacc/clusters/chameleon/nodes.json").json()["items"]
    liqid = [n for n in nodes if n["node_type"] == "compute_liqid"]
    assert len(liqid) == 8 and liqid[0]["gpu"]["gpu"] is True

    conn = connect(tb, "chi@uc")
    images = conn.session.get(f"{tb.site_url('chi@uc')}/image/v2/images?limit=2").json()
    assert len(images["images"]) == 2 and images["next"].startswith("/v2/images?")
    assert len(list(conn.image.images())) == 5
    schema = conn.session.get(f"{tb.site_url('chi@uc')}/image/v2/schemas/image").json()
    assert schema["name"] == "image" and "name" in schema["properties"]
    versions = requests.get(f"{tb.site_url('chi@uc')}/compute/v2.1").json()["version"]
    assert (versions["min_version"], versions["version"]) == ("2.1", "2.96")
    assert (
        requests.get(f"{tb.site_url('chi@uc')}/image/versions").json()["versions"][0]["status"] == "CURRENT"
    )
    nets = {n.name: n for n in conn.network.networks()}
    assert nets["public"].is_router_external and nets["sharednet1"].is_shared
    edge = requests.get(f"{tb.site_url('chi@edge')}/identity/v3").json()
    assert edge["version"]["id"].startswith("v3")


def test_os_env_openrc_and_only_loopback(tb):
    import socket

    env = tb.os_env("kvm@tacc")
    assert env["OS_AUTH_URL"] == f"{tb.endpoint}/kvm-tacc/identity/v3" and env["OS_REGION_NAME"] == "KVM@TACC"
    secret = tb.world.credentials.app_cred_secret
    assert f"export OS_APPLICATION_CREDENTIAL_SECRET={secret}" in tb.openrc("kvm@tacc")
    assert tb.endpoint.startswith("http://127.0.0.1:")
    # tests/conftest.py installs the loopback guard in this process: anything else would have failed loudly.
    with pytest.raises(OSError, match="loopback guard"), socket.socket() as s:
        s.connect(("192.0.2.1", 80))


def test_world_is_shared_across_processes(tb):
    conn = connect(tb)
    conn.compute.create_keypair(name="labctl-shared", public_key=PUBKEY)
    code = (
        "import json, sys\n"
        "from labctl.testbed import Testbed\n"
        "import openstack\n"
        "with Testbed.start(sys.argv[1], ssh=False) as tb:\n"
        "    env = tb.os_env('chi@tacc')\n"
        "    conn = openstack.connection.Connection(\n"
        "        auth_url=env['OS_AUTH_URL'], auth_type=env['OS_AUTH_TYPE'], region_name='CHI@TACC',\n"
        "        application_credential_id=env['OS_APPLICATION_CREDENTIAL_ID'],\n"
        "        application_credential_secret=env['OS_APPLICATION_CREDENTIAL_SECRET'])\n"
        "    names = [k.name for k in conn.compute.keypairs()]\n"
        "    conn.network.create_security_group(name='labctl-from-child')\n"
        "    print(json.dumps({'keypairs': names, 'scale': tb.world.time_scale,\n"
        "                      'inventory': tb.world.inventory('chi@tacc')}))\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("LABCTL_TESTBED_DIR", "LABCTL_TESTBED_TIME_SCALE")
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GUARD_DIR), env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tb.world.state_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["keypairs"] == ["labctl-shared"] and seen["scale"] == SCALE
    assert [k["name"] for k in seen["inventory"]["keypairs"]] == ["labctl-shared"]
    assert [g["name"] for g in tb.world.inventory()["security_groups"]] == ["labctl-from-child"]
    assert World(tb.world.state_dir).ssh_port == tb.world.ssh_port


# ============================================================================ python-chi, unmodified


def test_python_chi_lease_and_server(tb, monkeypatch):
    monkeypatch.setenv("CHI_RESOURCE_API_URL", tb.refapi_url)  # read when chi is first imported
    pytest.importorskip("chi.lease")
    import chi
    import chi.lease
    import chi.server
    import chi.util

    class FastTime:  # python-chi polls every 5 s; the testbed is 1000× faster
        @staticmethod
        def sleep(seconds):
            time.sleep(min(seconds, 0.02))

        time = staticmethod(time.time)

    monkeypatch.setattr(chi.util, "time", FastTime)
    chi.reset()
    chi.set("auth_type", "v3applicationcredential")
    chi.set("auth_url", tb.auth_url("chi@tacc"))
    chi.set("region_name", "CHI@TACC")
    chi.set("application_credential_id", tb.world.credentials.app_cred_id)
    chi.set("application_credential_secret", tb.world.credentials.app_cred_secret)

    lease = chi.lease.Lease("labctl-chi", duration=timedelta(hours=2))
    lease.add_node_reservation(amount=1, node_type="compute_liqid")
    lease.add_fip_reservation(amount=1)
    lease.submit(idempotent=True, wait_for_active=True)
    assert lease.status == "ACTIVE"
    again = chi.lease.get_lease("labctl-chi")
    assert again.id == lease.id and again.node_reservations[0]["id"] == lease.node_reservations[0]["id"]
    (fip,) = lease.get_reserved_floating_ips()

    chi.server.update_keypair("labctl-chi-key", public_key=PUBKEY)
    server = chi.server.Server(
        "labctl-chi-node",
        reservation_id=lease.node_reservations[0]["id"],
        image_name="CC-Ubuntu24.04",
        key_name="labctl-chi-key",
    )
    server.submit(show=None, idempotent=True, wait_for_active=True)
    assert server.status == "ACTIVE"
    server.associate_floating_ip(fip)
    assert server.get_all_floating_ips() == [fip]
    server.delete()
    lease.delete()
    chi.server.nova().keypairs.delete("labctl-chi-key")
    assert tb.world.inventory() == {
        "servers": [],
        "leases": [],
        "floating_ips": [],
        "security_groups": [],
        "keypairs": [],
    }
    chi.reset()


def test_neutron_refuses_groups_rules_networks_subnets_and_routers_past_the_quota_it_reports(tb):
    """Each quota GET /v2.0/quotas reports is the one a create meets: one more is Neutron's 409 OverQuota."""
    from openstack import exceptions as sdk_exc

    conn = connect(tb)
    quotas = conn.network.get(f"/quotas/{conn.current_project_id}").json()["quota"]
    assert quotas["security_group"] == 100 and quotas["router"] == 10  # Neutron's report, as before

    for resource, n in (("security_group", 2), ("security_group_rule", 5), ("network", 1), ("subnet", 1),
                        ("router", 1)):
        tb.world.set_quota("chi@tacc", resource, n)
    details = conn.network.get(f"/quotas/{conn.current_project_id}/details").json()["quota"]
    groups_before = details["security_group"]["used"]  # the project's default group counts
    tb.world.set_quota("chi@tacc", "security_group", groups_before + 1)

    def refused(resource: str, path: str, body: dict) -> None:
        raw = conn.session.post(f"{tb.site_url('chi@tacc')}/network/v2.0/{path}", raise_exc=False, json=body)
        assert raw.status_code == 409, raw.text
        assert raw.json() == {"NeutronError": {"type": "OverQuota", "detail": "",
                                               "message": f"Quota exceeded for resources: ['{resource}']."}}

    group = conn.network.create_security_group(name="labctl-q")  # its two egress rules are Neutron's own
    refused("security_group", "security-groups", {"security_group": {"name": "labctl-q2"}})
    rules_used = conn.network.get(f"/quotas/{conn.current_project_id}/details").json()["quota"][
        "security_group_rule"]["used"]
    tb.world.set_quota("chi@tacc", "security_group_rule", rules_used + 3)
    for port in (22, 8888, 9090):
        conn.network.create_security_group_rule(security_group_id=group.id, direction="ingress", protocol="tcp",
                                                port_range_min=port, port_range_max=port)
    with pytest.raises(sdk_exc.ConflictException, match=r"Quota exceeded for resources: \['security_group_rule'\]"):
        conn.network.create_security_group_rule(security_group_id=group.id, direction="ingress", protocol="tcp",
                                                port_range_min=80, port_range_max=80)
    # Neutron's quota hook runs before its plugin finds the rule taken: a rule that exists meets the quota first.
    with pytest.raises(sdk_exc.ConflictException, match=r"Quota exceeded for resources: \['security_group_rule'\]"):
        conn.network.create_security_group_rule(security_group_id=group.id, direction="ingress", protocol="tcp",
                                                port_range_min=22, port_range_max=22)
    net = conn.network.create_network(name="labctl-q")
    refused("network", "networks", {"network": {"name": "labctl-q2"}})
    conn.network.create_subnet(network_id=net.id, cidr="192.168.50.0/24", ip_version=4)
    refused("subnet", "subnets", {"subnet": {"network_id": net.id, "cidr": "192.168.51.0/24", "ip_version": 4}})
    conn.network.create_router(name="labctl-q")
    refused("router", "routers", {"router": {"name": "labctl-q2"}})

    # Deleting makes room again, and the report counts what is there.
    conn.network.delete_security_group(group.id)
    assert conn.network.create_security_group(name="labctl-q3").name == "labctl-q3"
    details = conn.network.get(f"/quotas/{conn.current_project_id}/details").json()["quota"]
    assert details["router"] == {"limit": 1, "used": 1, "reserved": 0}
    assert details["security_group"]["used"] == details["security_group"]["limit"] == groups_before + 1
    with pytest.raises(ValueError, match="no quota named 'volumes'"):
        tb.world.set_quota("chi@tacc", "volumes", 1)


def test_nova_refuses_key_pairs_and_servers_past_the_quotas_it_reports(tb):
    """Nova's 403s: 'Quota exceeded, too many key pairs.' and 'Quota exceeded for instances: ...', with the
    figures the limits report; labctl reads both as quota, not as a refusal of its credentials."""
    from openstack import exceptions as sdk_exc

    from labctl.providers.chameleon import ChameleonProvider
    from labctl.sites import resolve

    conn = connect(tb)
    limits = conn.compute.get("/limits").json()["limits"]["absolute"]
    assert limits["maxTotalKeypairs"] == 100 and limits["maxTotalInstances"] == 100  # the report, as before
    tb.world.set_quota("chi@tacc", "key_pairs", 1)
    tb.world.set_quota("chi@tacc", "instances", 1)
    assert conn.compute.get("/limits").json()["limits"]["absolute"]["maxTotalKeypairs"] == 1

    def post(path: str, body: dict):
        return conn.compute.post(path, json=body, raise_exc=False)

    assert post("/os-keypairs", {"keypair": {"name": "labctl-k1", "public_key": PUBKEY}}).status_code in (200, 201)
    refused = post("/os-keypairs", {"keypair": {"name": "labctl-k2", "public_key": PUBKEY}})
    assert refused.status_code == 403
    assert refused.json() == {"forbidden": {"code": 403, "message": "Quota exceeded, too many key pairs."}}
    # Nova checks the quota before the name (a unique key in its database): a taken name meets the quota first.
    assert post("/os-keypairs", {"keypair": {"name": "labctl-k1", "public_key": PUBKEY}}).status_code == 403

    lease = active_lease(blazar(conn, "CHI@TACC"), "labctl-q", [host_reservation("compute_zen3", 2)])
    first = boot(conn, "labctl-q1", lease["reservations"][0]["id"], key_name="labctl-k1")
    with pytest.raises(sdk_exc.HttpException) as second:
        boot(conn, "labctl-q2", lease["reservations"][0]["id"], key_name="labctl-k1")
    assert second.value.status_code == 403
    assert "Quota exceeded for instances: Requested 1, but already used 1 of 1 instances" in str(second.value)
    provider = ChameleonProvider(resolve("chi@tacc"), None)
    assert type(provider.translate("launch node", second.value)).__name__ == "QuotaExceeded"

    conn.compute.delete_server(first)
    conn.compute.wait_for_delete(first, interval=0.02, wait=10)
    assert boot(conn, "labctl-q3", lease["reservations"][0]["id"], key_name="labctl-k1").name == "labctl-q3"
