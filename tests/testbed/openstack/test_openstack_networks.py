"""The emulated Neutron's private networks, subnets, routers and fixed-IP ports, and Nova booting with a port,
driven by openstacksdk over HTTP."""

from __future__ import annotations

import pytest
from tests.testbed.openstack.test_openstack_api import active_lease, blazar, connect

# ============================================================================ private networks


def test_private_network_subnet_router_and_fixed_ip_ports(tb):
    from openstack import exceptions as os_exc

    conn = connect(tb, "kvm@tacc")
    net = conn.network.create_network(name="lab-cluster", description="d", port_security_enabled=False)
    assert net.is_port_security_enabled is False and net.subnet_ids == []
    subnet = conn.network.create_subnet(network_id=net.id, ip_version=4, cidr="192.168.1.0/24", name="lab-sub")
    assert subnet.gateway_ip == "192.168.1.1"
    assert subnet.allocation_pools == [{"start": "192.168.1.2", "end": "192.168.1.254"}]
    assert conn.network.get_network(net.id).subnet_ids == [subnet.id]
    with pytest.raises(os_exc.BadRequestException, match="overlaps"):
        conn.network.create_subnet(network_id=net.id, ip_version=4, cidr="192.168.1.0/25")

    public = conn.network.find_network("public", ignore_missing=False)
    router = conn.network.create_router(name="lab-router", external_gateway_info={"network_id": public.id})
    assert router.external_gateway_info["network_id"] == public.id
    info = conn.network.add_interface_to_router(router, subnet=subnet.id)
    assert info["subnet_id"] == subnet.id and info["id"] == router.id and info["port_id"]
    (iface,) = conn.network.ports(device_id=router.id)
    assert iface.fixed_ips == [{"subnet_id": subnet.id, "ip_address": "192.168.1.1"}]
    assert iface.device_owner == "network:router_interface"

    port = conn.network.create_port(network_id=net.id, name="lab-node-1", port_security_enabled=False,
                                    fixed_ips=[{"subnet_id": subnet.id, "ip_address": "192.168.1.11"}])
    assert port.fixed_ips == [{"subnet_id": subnet.id, "ip_address": "192.168.1.11"}]
    assert port.is_port_security_enabled is False and port.security_group_ids == [] and port.device_id == ""
    with pytest.raises(os_exc.ConflictException, match="already allocated"):
        conn.network.create_port(network_id=net.id, fixed_ips=[{"subnet_id": subnet.id, "ip_address": "192.168.1.11"}])
    with pytest.raises(os_exc.BadRequestException, match="not a valid IP for the specified subnet"):
        conn.network.create_port(network_id=net.id, fixed_ips=[{"subnet_id": subnet.id, "ip_address": "192.168.2.5"}])
    dynamic = conn.network.create_port(network_id=net.id)
    assert dynamic.fixed_ips[0]["ip_address"] == "192.168.1.2" and dynamic.is_port_security_enabled is False
    conn.network.delete_port(dynamic)

    # Nova boots with the shared network first and the port made beforehand.
    bz = blazar(conn, "KVM@TACC")
    medium = conn.compute.find_flavor("m1.medium", ignore_missing=False)
    lease = active_lease(bz, "lab", [{"resource_type": "flavor:instance", "flavor_id": medium.id, "amount": 1,
                                      "affinity": None}])
    shared = conn.network.find_network("sharednet1", ignore_missing=False)
    image = next(conn.image.images(name="CC-Ubuntu24.04"))
    server = conn.compute.create_server(name="lab-node-1", image_id=image.id,
                                        flavor_id=lease["reservations"][0]["flavor_id"],
                                        networks=[{"uuid": shared.id}, {"port": port.id}])
    server = conn.compute.wait_for_server(server, status="ACTIVE", interval=0.02, wait=10)
    assert list(server.addresses) == ["sharednet1", "lab-cluster"]
    assert [a["addr"] for a in server.addresses["lab-cluster"]] == ["192.168.1.11"]
    assert conn.network.get_port(port.id).device_id == server.id
    assert {p.network_id for p in conn.network.ports(device_id=server.id)} == {shared.id, net.id}
    with pytest.raises(os_exc.ConflictException, match="still in use"):
        conn.compute.create_server(name="lab-node-2", image_id=image.id, flavor_id=medium.id,
                                   networks=[{"port": port.id}])

    # In-use errors, then teardown in order.
    with pytest.raises(os_exc.ConflictException, match="still has ports"):
        conn.network.delete_router(router)
    with pytest.raises(os_exc.ConflictException, match="one or more ports"):
        conn.network.delete_network(net)
    with pytest.raises(os_exc.ConflictException, match="One or more ports have an IP allocation"):
        conn.network.delete_subnet(subnet)
    conn.compute.delete_server(server)
    left = conn.network.get_port(port.id)  # a port passed in at boot outlives its server, unbound
    assert left.device_id == "" and left.fixed_ips[0]["ip_address"] == "192.168.1.11"
    inv = tb.world.inventory("kvm@tacc")
    assert [p["name"] for p in inv["ports"]] == ["", "lab-node-1"]  # router interface + the preserved port
    conn.network.delete_port(port)
    conn.network.remove_interface_from_router(router, subnet=subnet.id)
    assert list(conn.network.ports(device_id=router.id)) == []
    conn.network.delete_router(router)
    conn.network.delete_network(net)  # takes its subnet along
    with pytest.raises(os_exc.NotFoundException):
        conn.network.get_subnet(subnet.id)
    inv = tb.world.inventory("kvm@tacc")
    assert not {"networks", "subnets", "routers", "ports"} & set(inv)  # listed only when there are some
    # The built-in networks are still listed and cannot be deleted.
    assert {n.name for n in conn.network.networks()} == {"public", "sharednet1"}
    with pytest.raises(os_exc.ForbiddenException):
        conn.network.delete_network(shared)
