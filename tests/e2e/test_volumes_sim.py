"""End to end on the emulated Chameleon: a block volume kept across down/up and an object-store container
(data-persist). The real CLI runs against the emulator; the checks read the emulator's own inventory."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.e2e.helpers import labctl_leftovers, run

pytestmark = pytest.mark.slow
SITE = "kvm@tacc"


def world(env: dict[str, str]):
    from labctl.testbed.world import World

    return World(Path(env["LABCTL_TESTBED_DIR"]))


def labctl_servers(inv: dict) -> list[dict]:
    return [s for s in inv["servers"] if s["name"].startswith("labctl-")]


def test_data_persist_volume_kept_across_down_and_up(labctl_env):
    up = run(labctl_env, "up", "data-persist", "--site", "sim", timeout=300)
    w = world(labctl_env)
    inv = w.inventory(SITE)
    (server,) = labctl_servers(inv)
    assert server["name"].endswith("-node-1")
    (vol,) = inv["volumes"]
    assert vol["name"].endswith("-data-persist-block") and vol["size"] == 2 and vol["status"] == "in-use"
    assert vol["attachments"] == [{"server_id": server["id"], "device": "/dev/vdb"}]
    assert vol["metadata"]["labctl:deployment"] == server["metadata"]["labctl:deployment"]
    (container,) = inv["containers"]
    assert container["name"].endswith("-data-persist-persist")
    # The mount step changes the host: skipped on sim (reported), the safe marker step ran.
    status = run(labctl_env, "status", "data-persist").stdout
    assert "skipped" in status or "skipped" in up.stdout + up.stderr
    assert "data-persist ready" in run(labctl_env, "ssh", "data-persist", "--", "cat",
                                       "data-persist-ready.txt").stdout

    down = run(labctl_env, "down", "data-persist")
    assert "kept volume" in down.stdout and "--delete-volumes" in down.stdout
    inv = w.inventory(SITE)
    assert labctl_servers(inv) == [] and inv["leases"] == [] and inv["floating_ips"] == []
    assert inv["security_groups"] == [] and inv["keypairs"] == []
    (kept,) = inv["volumes"]
    assert kept["id"] == vol["id"] and kept["status"] == "available" and kept["attachments"] == []
    assert [c["name"] for c in inv["containers"]] == [container["name"]]

    run(labctl_env, "up", "data-persist", "--site", "sim", timeout=300)
    inv = w.inventory(SITE)
    (server2,) = labctl_servers(inv)
    assert server2["id"] != server["id"]
    (vol2,) = inv["volumes"]  # the same volume, reattached; never a second one
    assert vol2["id"] == vol["id"] and vol2["attachments"] == [{"server_id": server2["id"], "device": "/dev/vdb"}]
    assert [c["name"] for c in inv["containers"]] == [container["name"]]

    down = run(labctl_env, "down", "data-persist", "--delete-volumes")
    assert "kept" not in down.stdout
    assert labctl_leftovers(w) == {}
    inv = w.inventory(SITE)
    assert "volumes" not in inv and "containers" not in inv
    assert "data-persist" not in run(labctl_env, "status").stdout


def test_sigkill_after_volume_create_and_attach_then_resume_makes_no_second_volume(labctl_env):
    from tests.e2e.helpers import kill_when, start

    w = world(labctl_env)
    w.inject_fault(SITE, "POST /{project_id}/volumes", "hang_after")
    proc = start(labctl_env, "up", "data-persist", "--site", "sim")
    # The request is logged before it is handled: kill once the volume exists (the create reached the cloud).
    kill_when(proc, lambda: bool(w.inventory(SITE).get("volumes")))
    w.clear_faults()
    (orphan,) = w.inventory(SITE)["volumes"]  # the killed run's create reached the cloud

    w.inject_fault(SITE, "POST /servers/{id}/os-volume_attachments", "hang_after")
    proc = start(labctl_env, "up", "data-persist", "--site", "sim")
    kill_when(proc, lambda: any(v["attachments"] for v in w.inventory(SITE).get("volumes", [])), timeout=240)
    w.clear_faults()

    run(labctl_env, "up", "data-persist", "--site", "sim", timeout=300)
    inv = w.inventory(SITE)
    (server,) = labctl_servers(inv)
    (vol,) = inv["volumes"]
    assert vol["id"] == orphan["id"]
    assert vol["attachments"] == [{"server_id": server["id"], "device": "/dev/vdb"}]

    run(labctl_env, "down", "data-persist", "--delete-volumes")
    assert labctl_leftovers(w) == {}
