"""The lists a class polls keep only the fields labctl reads (`session.kept`): the rest of each item is dropped, and
reading a dropped field is an error, not a silent None."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labctl.providers.chameleon.leases import LEASE_FIELDS, lease_found
from labctl.providers.chameleon.network import SecurityGroups, has_rules
from labctl.providers.chameleon.servers import Servers, server_found
from labctl.providers.chameleon.session import KEEP_ALWAYS, Item, kept, tags_of

SERVER = {
    "id": "s1", "name": "labctl-d1-node-1", "status": "ERROR", "created": "2026-12-05T06:00:00Z",
    "metadata": {"labctl:deployment": "d1", "labctl:node": "node-1", "labctl:node_type": "m1.small"},
    "addresses": {"sharednet1": [{"addr": "10.53.0.12", "OS-EXT-IPS:type": "fixed", "version": 4},
                                 {"addr": "127.10.3.11", "OS-EXT-IPS:type": "floating", "version": 4}]},
    "fault": {"code": 500, "message": "No valid host was found"},
    "links": [{"rel": "self", "href": "http://127.0.0.1/servers/s1"}], "flavor": {"id": "f"}, "hostId": "h",
    "OS-EXT-STS:vm_state": "error", "security_groups": [{"name": "default"}], "tenant_id": "p",
}

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=8)


def test_a_kept_server_reads_as_the_whole_one_and_drops_the_rest():
    item = kept(Servers.keep)(SERVER)
    assert server_found("sharednet1", item) == server_found("sharednet1", Item(SERVER))
    assert server_found("sharednet1", item).error == "No valid host was found"
    assert set(item) == {"id", "name", "status", "created", "metadata", "addresses", "fault"}
    assert item.created_at == "2026-12-05T06:00:00Z" and tags_of(item)["labctl:deployment"] == "d1"


def test_reading_a_field_the_listing_does_not_keep_raises():
    item = kept(Servers.keep)(SERVER)
    with pytest.raises(AttributeError, match="'hostId' is not kept"):
        _ = item.hostId
    assert getattr(item, "public_key", None) is None  # getattr with a default still works (tags_of relies on it)
    assert Item(SERVER).hostId == "h"  # a whole item reads every field


def test_a_group_keeps_the_rule_fields_has_rules_reads():
    group = {"id": "g", "name": "sg", "description": "labctl:deployment=d1", "tenant_id": "p", "security_group_rules": [
        {"id": "r1", "direction": "ingress", "protocol": "tcp", "port_range_min": 22, "port_range_max": 22,
         "remote_ip_prefix": "0.0.0.0/0", "ethertype": "IPv4", "security_group_id": "g"},
        {"id": "r2", "direction": "egress", "protocol": None, "ethertype": "IPv4"}]}
    item = kept(SecurityGroups.keep)(group)
    assert item.security_group_rules[0] == {"direction": "ingress", "protocol": "tcp", "port_range_min": 22,
                                            "remote_ip_prefix": "0.0.0.0/0"}

    class Res:
        spec = {"rules": [{"port": 22, "protocol": "tcp", "cidr": "0.0.0.0/0"}]}

    assert has_rules(item, Res()) and not has_rules(kept(SecurityGroups.keep)({**group, "security_group_rules": []}),
                                                    Res())


@given(st.dictionaries(st.text(max_size=8) | st.sampled_from(sorted({*KEEP_ALWAYS, *SecurityGroups.keep})),
                       json_values, max_size=8))
def test_kept_holds_a_subset_of_the_item_and_the_kept_fields_whole(item):
    projected = kept(SecurityGroups.keep)(item)
    assert set(projected) <= set(item) & {*KEEP_ALWAYS, *SecurityGroups.keep}
    for name, value in projected.items():
        if name != "security_group_rules" or not isinstance(value, list):
            assert value == item[name]
        else:
            assert len(value) == len(item[name])
    assert kept(None)(item) == item


def test_a_kept_lease_reads_as_the_whole_one():
    lease = {"id": "l1", "name": "labctl-d1-node", "status": "ERROR", "degraded": False, "user_id": "u",
             "start_date": "2026-12-05T06:00:00.000000", "end_date": "2026-12-05T12:00:00.000000",
             "created_at": "2026-12-05 06:00:00", "trust_id": "t", "project_id": "p",
             "reservations": [{"id": "r1", "lease_id": "l1", "resource_type": "physical:host", "min": 1, "max": 1,
                               "resource_properties": '["==", "$node_type", "compute_cascadelake"]',
                               "hypervisor_properties": "", "status": "error", "missing_resources": False}],
             "events": [{"id": "e1", "event_type": "start_lease", "status": "ERROR", "time": "2026-12-05T06:00"}]}
    item = LEASE_FIELDS(lease)
    assert lease_found(item) == lease_found(lease)
    assert lease_found(item).attrs["node_type"] == "compute_cascadelake" and lease_found(item).status == "error"
    assert "events" not in item and set(item["reservations"][0]) == {"id", "resource_properties"}
