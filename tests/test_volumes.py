"""Block volumes and object-store containers: the profile model's checks, the plan's resources and the engine's
keep-on-down policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests import profile_text
from tests.test_engine import FakeSite, MemoryCloud

from labctl import sites
from labctl.engine import Engine
from labctl.plan import KIND_ORDER, NodePlan, Plan, Resource, build_plan
from labctl.profile import find_profile, load_profile
from labctl.providers.base import Found
from labctl.site_fit import validate_for_site
from labctl.state import StateStore

PROFILE = """\
name: vol
sites: [kvm@tacc]
lease_hours: 2
image: ubuntu-24.04
nodes:
  node:
    count: 1
    floating_ip: true
    types: {kvm@tacc: [m1.large]}
volumes:
  block: {size_gb: 2, node: node-1}
object_stores:
  persist: {}
"""


def _load(tmp_path: Path, text: str = PROFILE, **replace: str):
    return profile_text.load(tmp_path, text, "vol", **replace)


def _error(tmp_path: Path, **replace: str) -> str:
    return profile_text.error(tmp_path, PROFILE, "vol", **replace)


def test_defaults(tmp_path):
    p = _load(tmp_path)
    vol = p.volumes["block"]
    assert (vol.size_gb, vol.filesystem, vol.keep, p.mount_of("block")) == (2, "ext4", True, "/mnt/block")
    assert p.object_stores["persist"].keep is True


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("node: node-1}", "node: node-9}", "volumes.block.node: unknown node 'node-9' (nodes: node-1)"),
    ("node: node-1}", "node: node-1, mount: data}", "volumes.block.mount: 'data' is not an absolute path"),
    ("node: node-1}", "node: node-1, mount: /etc}", "volumes.block.mount: '/etc' is a system directory"),
    ("size_gb: 2", "size_gb: 0", "volumes.block.size_gb: Input should be greater than or equal to 1"),
    ("size_gb: 2", "size_gb: 5000", "volumes.block.size_gb: Input should be less than or equal to 2000"),
    ("node: node-1}", "node: node-1, filesystem: ntfs}", "volumes.block.filesystem: Input should be 'ext4' or"),
    ("  block:", "  Block_1:", "volumes.Block_1: volume names are lower-case letters"),
    ("  persist: {}", "  Persist: {}", "object_stores.Persist: object store names are lower-case letters"),
    ("  persist: {}", "  persist: {size: 1}", "object_stores.persist.size: unknown field"),
])
def test_one_line_errors(tmp_path, old, new, expected):
    assert _error(tmp_path, **{old: new}).startswith(expected)


def test_two_volumes_on_one_mount_point(tmp_path):
    msg = _error(tmp_path, **{"  block: {size_gb: 2, node: node-1}":
                              "  a: {size_gb: 2, node: node-1, mount: /mnt/x}\n  b: {size_gb: 1, node: node-1, "
                              "mount: /mnt/x}"})
    assert msg == "volumes.b.mount: /mnt/x on node-1 is already volumes.a's mount point"


def test_sites_without_block_storage_or_object_store(tmp_path):
    p = _load(tmp_path, **{"sites: [kvm@tacc]": "sites: [kvm@tacc, chi@tacc, aws]",
                           "types: {kvm@tacc: [m1.large]}": "types: {kvm@tacc: [m1.large], chi: [compute_skylake], "
                                                            "aws: [t3.large]}"})
    assert validate_for_site(p, sites.resolve("kvm@tacc")) == []
    assert validate_for_site(p, sites.resolve("sim:kvm@tacc")) == []
    assert validate_for_site(p, sites.resolve("chi@tacc")) == [
        "volumes.block: chi@tacc has no block storage (volumes need a KVM site such as kvm@tacc, or AWS / GCP)"]
    assert validate_for_site(p, sites.resolve("aws")) == []  # EBS volume and S3 bucket
    gcp = _load(tmp_path, **{"sites: [kvm@tacc]": "sites: [gcp]", "types: {kvm@tacc: [m1.large]}":
                             "types: {gcp: [e2-standard-2]}"})
    assert validate_for_site(gcp, sites.resolve("gcp")) == [
        "object_stores.persist: labctl does not create Cloud Storage buckets (gcp:us-central1-a); object stores are "
        "Swift containers on chi@tacc, chi@uc, kvm@tacc and S3 buckets on AWS"]
    assert sites.resolve("chi@uc").object_storage == "swift" and not sites.resolve("chi@uc").block_storage
    assert sites.resolve("kvm@tacc").block_storage and sites.resolve("kvm@tacc").object_storage == "swift"
    assert sites.resolve("chi@edge").object_storage is None and not sites.resolve("chi@edge").block_storage


def test_plan_resources_and_teardown_order(tmp_path):
    p = _load(tmp_path)
    plan = build_plan(p, sites.resolve("kvm@tacc"), "alice", "ssh-ed25519 AAAA k")
    vol, att, bucket = plan.get("volume:block"), plan.get("volume_attachment:block"), plan.get("bucket:persist")
    assert (vol.name, vol.spec) == ("labctl-alice-vol-block", {"volume": "block", "size_gb": 2, "keep": True,
                                                                "node": "node-1", "server": "server:node-1"})
    assert vol.depends_on == ("server:node-1",)  # a zonal volume is made in its server's zone
    assert att.depends_on == ("volume:block", "server:node-1")
    assert att.spec == {"volume": "volume:block", "server": "server:node-1", "node": "node-1",
                        "mount": "/mnt/block", "filesystem": "ext4"}
    assert (bucket.name, bucket.spec) == ("labctl-alice-vol-persist", {"bucket": "persist", "keep": True})
    teardown = list(reversed(KIND_ORDER))
    assert teardown.index("volume_attachment") < teardown.index("server") < teardown.index("volume")
    assert teardown.index("server") < teardown.index("bucket")
    levels = [[r.key for r in level] for level in plan.levels()]
    level_of = {key: i for i, keys in enumerate(levels) for key in keys}
    assert level_of["server:node-1"] < level_of["volume:block"] < level_of["volume_attachment:block"]
    assert "volume_attachment:block" in levels[-1]


def test_shipped_data_persist_profile_validates():
    p = load_profile(find_profile("data-persist"))
    assert validate_for_site(p, sites.resolve("kvm@tacc")) == []
    assert p.volumes["block"].size_gb == 2 and p.mount_of("block") == "/mnt/block" and "persist" in p.object_stores


# ------------------------------------------------------------------------------------ engine: keep on down


def _storage_plan(keep: bool = True) -> Plan:
    plan = Plan("labctl-u-lab", "lab", "u", None, FakeSite(), 1, {}, [NodePlan("n-1", "n", ("t",), "img", True)])
    plan.resources += [
        Resource("keypair", "keypair", "labctl-u-lab", {"public_key": "k"}),
        Resource("server:n-1", "server", "labctl-u-lab-n-1", {"node": "n-1"}, ("keypair",)),
        Resource("volume:data", "volume", "labctl-u-lab-data", {"volume": "data", "size_gb": 2, "keep": keep}),
        Resource("volume_attachment:data", "volume_attachment", "labctl-u-lab-data-attachment",
                 {"volume": "volume:data", "server": "server:n-1", "node": "n-1"}, ("volume:data", "server:n-1")),
        Resource("bucket:b", "bucket", "labctl-u-lab-b", {"bucket": "b", "keep": keep}),
    ]
    return plan


@pytest.fixture
def store(tmp_path):
    return StateStore(tmp_path / "state.db")


def test_destroy_keeps_kept_volumes_and_buckets_and_their_rows(store):
    cloud = MemoryCloud()
    plan = _storage_plan()
    Engine(cloud, store).apply(plan)
    volume_id = cloud.items["labctl-u-lab-data"].cloud_id
    engine = Engine(cloud, store)
    assert engine.destroy(plan, keep=True) == []
    assert sorted(cloud.items) == ["labctl-u-lab-b", "labctl-u-lab-data"]
    assert sorted(f.kind for f in engine.kept) == ["bucket", "volume"]
    assert {r.key for r in store.resources(plan.deployment)} == {"volume:data", "bucket:b"}
    # The next apply finds the kept volume and makes no second one.
    Engine(cloud, store).apply(plan)
    assert cloud.items["labctl-u-lab-data"].cloud_id == volume_id
    assert cloud.creates.count("volume:data") == 1
    assert Engine(cloud, store).destroy(plan) == []  # --delete-volumes
    assert cloud.items == {} and store.resources(plan.deployment) == []


def test_destroy_deletes_volumes_without_keep_and_kept_strays_found_by_tag(store):
    cloud = MemoryCloud()
    plan = _storage_plan(keep=False)
    Engine(cloud, store).apply(plan)
    assert Engine(cloud, store).destroy(plan, keep=True) == []
    assert cloud.items == {}
    # A kept volume no state row knows about (e.g. after a lost state file) is still kept, by its tag.
    cloud.items["labctl-u-lab-data"] = Found("volume", "vol-1", "labctl-u-lab-data", attrs={"keep": True})
    engine = Engine(cloud, store)
    assert engine.destroy(plan, keep=True) == []
    assert [f.cloud_id for f in engine.kept] == ["vol-1"] and "labctl-u-lab-data" in cloud.items
