"""The emulated Chameleon's hot reads stay a fixed number of SQL statements as a class's rows grow (issue 14):
a server list renders every server's addresses from one read of ports and floating IPs, and the SSH side's
`ssh_targets` is answered from its cache until an object is written or a server finishes booting.

Counted with SQLite's statement trace on this thread's connection (the handler runs in this thread), not timed.
"""

from __future__ import annotations

import time

from tests.testbed.openstack.test_openstack_api import active_lease, blazar, boot, connect, wait_for

from labctl.testbed.http import Request
from labctl.testbed.openstack import catalog, nova

SITE = "kvm@tacc"


def statements_of(tb, fn):
    """`fn()`'s result and the SQL statements it ran on this thread's connection to the world."""
    seen: list[str] = []
    with tb.world.read() as db:
        conn = db.conn  # this thread's connection: the one `fn` uses when it runs here
    conn.set_trace_callback(seen.append)
    try:
        return fn(), seen
    finally:
        conn.set_trace_callback(None)


def list_servers_detail(tb) -> list[dict]:
    route, params = nova.router.match("GET", "/v2.1/servers/detail".removeprefix(nova.PREFIX))
    req = Request(method="GET", path="/servers/detail", query={}, headers={"OpenStack-API-Version": "compute 2.96"},
                  body=b"", world=tb.world, site=catalog.resolve_site(SITE), base_url=tb.endpoint,
                  service="compute", params=params, now=time.time())
    return route.handler(req).body["servers"]


def boot_with_fips(conn, flavor_id: str, names: list[str]) -> None:
    public = conn.network.find_network("public", ignore_missing=False)
    for name in names:
        server = conn.compute.wait_for_server(boot(conn, name, None, flavor=flavor_id), status="ACTIVE",
                                              interval=0.02, wait=10)
        (port,) = conn.network.ports(device_id=server.id)
        conn.network.create_ip(floating_network_id=public.id, port_id=port.id)


def test_server_list_reads_a_fixed_number_of_statements_however_many_servers(tb):
    tb.world.set_flavor_slots(SITE, "m1.small", 12)
    tb.world.set_fip_quota(SITE, 12)
    conn = connect(tb, SITE)
    small = conn.compute.find_flavor("m1.small", ignore_missing=False)
    lease = active_lease(blazar(conn, "KVM@TACC"), "class",
                         [{"resource_type": "flavor:instance", "flavor_id": small.id, "amount": 12, "affinity": None}])
    flavor_id = lease["reservations"][0]["flavor_id"]

    boot_with_fips(conn, flavor_id, ["vm-1", "vm-2"])
    few, few_sql = statements_of(tb, lambda: list_servers_detail(tb))
    boot_with_fips(conn, flavor_id, [f"vm-{i}" for i in range(3, 11)])
    many, many_sql = statements_of(tb, lambda: list_servers_detail(tb))

    assert len(few) == 2 and len(many) == 10
    assert len(many_sql) == len(few_sql), many_sql
    # Still every server's fixed and floating address, as the SDK reads them.
    for server in many:
        (entries,) = server["addresses"].values()
        assert sorted(e["OS-EXT-IPS:type"] for e in entries) == ["fixed", "floating"]
    sdk = {s.name: s.addresses for s in conn.compute.servers()}
    assert sdk == {s["name"]: s["addresses"] for s in many}


def test_ssh_targets_cached_until_a_write_or_a_boot_ends(tb):
    tb.world.set_flavor_slots(SITE, "m1.small", 4)
    conn = connect(tb, SITE)
    small = conn.compute.find_flavor("m1.small", ignore_missing=False)
    lease = active_lease(blazar(conn, "KVM@TACC"), "class",
                         [{"resource_type": "flavor:instance", "flavor_id": small.id, "amount": 4, "affinity": None}])
    flavor_id = lease["reservations"][0]["flavor_id"]
    boot_with_fips(conn, flavor_id, ["vm-1"])

    first, _ = statements_of(tb, tb.world.ssh_targets)
    again, sql = statements_of(tb, tb.world.ssh_targets)
    assert again == first and [t["name"] for t in first] == ["vm-1"] and first[0]["address"]
    assert not [s for s in sql if "json_extract" in s], sql  # answered from the cache

    # A write (the floating IP released) is seen at once.
    (fip,) = conn.network.ips()
    conn.network.update_ip(fip, port_id=None)
    assert [t["address"] for t in tb.world.ssh_targets()] == [None]
    # A server that finishes booting appears with no write in between.
    boot(conn, "vm-2", None, flavor=flavor_id)
    wait_for(lambda: [t["name"] for t in tb.world.ssh_targets()] == ["vm-1", "vm-2"])
    # A caller changing its copy does not change the next answer.
    mine = tb.world.ssh_targets()
    mine[0]["address"] = "127.0.0.99"
    assert tb.world.ssh_targets()[0]["address"] is None
