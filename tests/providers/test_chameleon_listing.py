"""The lists a class polls keep only the fields labctl reads (`session.kept`): the rest of each item is dropped, and
reading a dropped field is an error, not a silent None. `read_kept` decodes a page straight into those fields."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labctl.providers.chameleon.leases import LEASE_FIELDS, lease_found
from labctl.providers.chameleon.network import SecurityGroups, has_rules
from labctl.providers.chameleon.servers import Keypairs, Servers, server_found
from labctl.providers.chameleon.session import KEEP_ALWAYS, ByDeployment, Item, kept, read_kept, tags_of

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


def whole_then_kept(content: bytes, key: str, keep) -> list:
    """What `raw_list` made of a page before `read_kept`: the whole JSON, then `kept` per item."""
    return [kept(keep)(x.get(key[:-1], x) if key == "keypairs" else x) for x in json.loads(content).get(key) or []]


def test_a_page_read_kept_is_the_whole_page_kept():
    group = {"id": "g", "name": "sg", "description": "labctl:deployment=d1", "tenant_id": "p",
             "security_group_rules": [{"id": "r1", "direction": "ingress", "protocol": "tcp", "port_range_min": 22,
                                       "port_range_max": 22, "remote_ip_prefix": "0.0.0.0/0", "ethertype": "IPv4"}]}
    for key, keep, items in (("servers", Servers.keep, [SERVER, {**SERVER, "id": "s2", "fault": None}]),
                             ("security_groups", SecurityGroups.keep, [group]),
                             ("keypairs", Keypairs.keep, [{"keypair": {"name": "k", "public_key": "ssh-ed25519 A c",
                                                                       "fingerprint": "f", "type": "ssh"}}])):
        content = json.dumps({key: items, f"{key}_links": [{"rel": "next", "href": "http://127.0.0.1/x"}]}).encode()
        body = read_kept(content, key, keep)
        assert body is not None and body[f"{key}_links"] == [{"rel": "next", "href": "http://127.0.0.1/x"}]
        assert [x.get("keypair", x) for x in body[key]] == whole_then_kept(content, key, keep)
    assert "hostId" not in read_kept(json.dumps({"servers": [SERVER]}).encode(), "servers", Servers.keep)["servers"][0]


@pytest.mark.parametrize("content", [
    b"not json", b"[]", b'{"servers": null}', b'{"servers": [1]}', b'{"servers": [{"id": NaN}]}',
    b'{"security_groups": [{"security_group_rules": "none"}]}', b'{"keypairs": [{"name": "k"}]}',
])
def test_a_page_of_another_shape_is_left_to_the_whole_json(content):
    key = next(k for k in ("servers", "security_groups", "keypairs") if k.encode() in content) \
        if b"{" in content else "servers"
    keep = {"servers": Servers.keep, "security_groups": SecurityGroups.keep, "keypairs": Keypairs.keep}[key]
    assert read_kept(content, key, keep) is None
    assert read_kept(b'{"servers": []}', "servers", None) is None  # nothing to keep: the whole JSON


@given(st.lists(st.dictionaries(st.text(max_size=8) | st.sampled_from(sorted({*KEEP_ALWAYS, *SecurityGroups.keep})),
                                json_values, max_size=8), max_size=4))
def test_read_kept_agrees_with_kept_or_declines(items):
    content = json.dumps({"security_groups": items}).encode()
    body = read_kept(content, "security_groups", SecurityGroups.keep)
    if body is not None:
        assert body["security_groups"] == whole_then_kept(content, "security_groups", SecurityGroups.keep)
    else:  # declined only for a kept list that is not a list of objects
        rules = [x.get("security_group_rules", []) for x in items]
        assert any(not isinstance(r, list) or not all(isinstance(rule, dict) for rule in r) for r in rules)


# -------------------------------------------------------------------------- a list's items by deployment


def _counted_tags() -> tuple[list[object], object]:
    seen: list[object] = []

    def tags(item: object) -> dict[str, str]:
        seen.append(item)
        return tags_of(item)

    return seen, tags


def _group(deployment: str, i: int, status: str = "ACTIVE") -> Item:
    return Item({"id": f"{deployment}-{i}", "name": f"n{i}", "status": status,
                 "description": f"labctl:deployment={deployment} labctl:owner=o"})


def test_a_list_is_grouped_by_deployment_once_however_many_deployments_read_it():
    seen, tags = _counted_tags()
    index = ByDeployment(tags, gone=("DELETED",))
    items = [_group(f"d{n}", i) for n in range(50) for i in range(2)] + [_group("d0", 9, "DELETED")]
    for n in range(50):
        assert [x.id for x in index(items, f"d{n}")] == [f"d{n}-0", f"d{n}-1"]  # the one on its way out left
    assert len(seen) == 100  # each live item's tags read once, not once per deployment (was 50 x 101)
    assert index(items, "nobody") == []
    index(items, "d0").clear()  # a caller's copy: the index is not changed through it
    assert len(index(items, "d0")) == 2


def test_a_new_fetch_is_grouped_again_and_the_last_few_lists_are_kept():
    seen, tags = _counted_tags()
    index = ByDeployment(tags)
    project, polled = [_group("d1", 0)], [_group("d1", 0), _group("d1", 1)]
    for _ in range(3):  # a kind's project list and its poll list, read in turn
        assert len(index(project, "d1")) == 1 and len(index(polled, "d1")) == 2
    assert len(seen) == 3
    fresh = [_group("d1", 0)]  # equal to `project`, but another fetch: what changed since must be seen
    index(fresh, "d1")
    assert len(seen) == 4
    for n in range(ByDeployment.KEPT):
        index([_group("d1", n)], "d1")
    index(project, "d1")  # pushed out by newer lists: grouped again
    assert len(seen) == 4 + ByDeployment.KEPT + 1


@given(st.lists(st.tuples(st.sampled_from(["d1", "d2", "d3", ""]), st.sampled_from(["ACTIVE", "DELETED", None])),
                max_size=30), st.sampled_from(["d1", "d2", "d3", ""]))
def test_the_index_finds_what_a_scan_of_the_list_finds(spec: list[tuple[str, str | None]], deployment: str):
    items = [Item({"id": str(i), "status": status, "description": f"labctl:deployment={d}" if d else "x"})
             for i, (d, status) in enumerate(spec)]
    scan = [x for x in items if tags_of(x).get("labctl:deployment") == deployment and x.status != "DELETED"]
    assert ByDeployment(tags_of, ("DELETED",))(items, deployment) == scan
