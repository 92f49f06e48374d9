"""A site's public network can have more than one /24 (`World.set_public_subnets`): floating IPs come from the next
subnet when one is full, and Neutron's refusals stay the real ones (a full network, an address outside every
subnet)."""

from __future__ import annotations

import pytest
from tests.testbed.openstack.test_openstack_api import connect

from labctl.testbed.openstack import catalog

SITE = "kvm@tacc"


def neutron_error(tb, body: dict) -> tuple[int, dict]:
    conn = connect(tb, SITE)
    resp = conn.session.post(f"{tb.site_url(SITE)}/network/v2.0/floatingips", raise_exc=False,
                             json={"floatingip": body})
    return resp.status_code, resp.json()


def test_floating_ips_fill_the_first_subnet_then_the_next(tb):
    conn = connect(tb, SITE)
    site = catalog.resolve_site(SITE)
    tb.world.set_fip_quota(SITE, 1000)
    public = conn.network.find_network("public", ignore_missing=False)
    assert len(public.subnet_ids) == 1

    tb.world.set_public_subnets(SITE, 2)
    public = conn.network.find_network("public", ignore_missing=False)
    subnets = {s.id: s for s in conn.network.subnets(network_id=public.id)}
    assert set(public.subnet_ids) == set(subnets) and len(subnets) == 2
    assert sorted(s.cidr for s in subnets.values()) == [f"127.10.{site.number}.0/24", f"127.14.{site.number}.0/24"]

    per_subnet = catalog.FIPS_PER_SUBNET
    addresses = [conn.network.create_ip(floating_network_id=public.id).floating_ip_address
                 for _ in range(per_subnet + 3)]
    assert len(set(addresses)) == per_subnet + 3
    assert sum(a.startswith(f"127.10.{site.number}.") for a in addresses) == per_subnet
    assert addresses[-3:] == [f"127.14.{site.number}.{h}" for h in range(catalog.FIP_FIRST, catalog.FIP_FIRST + 3)]

    # An address of the second subnet may be asked for; one of a subnet the network does not have may not.
    status, _ = neutron_error(tb, {"floating_network_id": public.id,
                                   "floating_ip_address": f"127.14.{site.number}.200"})
    assert status == 201
    status, body = neutron_error(tb, {"floating_network_id": public.id,
                                      "floating_ip_address": f"127.15.{site.number}.20"})
    assert (status, body["NeutronError"]["type"]) == (400, "InvalidIpForNetwork")


def test_a_full_public_network_is_refused_as_neutron_does(tb):
    conn = connect(tb, SITE)
    tb.world.set_fip_quota(SITE, 1000)
    public = conn.network.find_network("public", ignore_missing=False)
    for _ in range(catalog.FIPS_PER_SUBNET):
        conn.network.create_ip(floating_network_id=public.id)
    status, body = neutron_error(tb, {"floating_network_id": public.id})
    assert (status, body["NeutronError"]["type"]) == (409, "IpAddressGenerationFailure")


@pytest.mark.parametrize("count", [0, 7])
def test_the_number_of_public_subnets_is_bounded(tb, count):
    with pytest.raises(ValueError, match="public subnets: 1 to 6"):
        tb.world.set_public_subnets(SITE, count)
