"""Site failover for one lab (`labctl up LAB --site S1,S2`) on the emulated clouds: a site with no free hosts of
any of the lab's types is left with nothing, the run says so and the lab comes up at the next site."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.e2e.helpers import labctl_leftovers, run, run_json

pytestmark = pytest.mark.slow


def world(env):
    from labctl.testbed.world import World

    return World(Path(env["LABCTL_TESTBED_DIR"]))


def servers_at(w, site: str) -> list[dict]:
    return [s for s in w.inventory(site)["servers"] if s["name"].startswith("labctl-")]


def test_a_site_without_hosts_of_the_labs_types_moves_the_lab_to_the_next_and_leaves_nothing(labctl_env):
    w = world(labctl_env)
    w.set_hosts("chi@tacc", "compute_liqid", 0)  # gpu-a100's only type at CHI@TACC
    up = run(labctl_env, "up", "gpu-a100", "--site", "sim:chi@tacc,sim:chi@uc")
    said = up.stdout + up.stderr
    assert "sim:chi@tacc has no room for gpu-a100" in said and "trying sim:chi@uc" in said
    assert labctl_leftovers(w, "chi@tacc") == {}  # nothing at the first site: no lease, key pair, IP
    assert len(servers_at(w, "chi@uc")) == 1
    st = run_json(labctl_env, "status", "gpu-a100")
    assert st["site"] == "sim:chi@uc" and st["status"] == "up" and st["nodes"][0]["node_type"] == "gpu_a100_pcie"
    assert any("sim:chi@tacc has no room" in e for e in st["events"])

    again = run_json(labctl_env, "up", "gpu-a100", "--site", "sim:chi@tacc,sim:chi@uc")  # resumes where it is
    assert again["site"] == "sim:chi@uc" and len(servers_at(w, "chi@uc")) == 1
    run(labctl_env, "down", "gpu-a100")
    assert labctl_leftovers(w) == {}


def test_no_room_at_any_site_names_each_and_leaves_nothing(labctl_env):
    w = world(labctl_env)
    w.set_hosts("chi@tacc", "compute_liqid", 0)
    w.set_hosts("chi@uc", "gpu_a100_pcie", 0)
    w.set_hosts("chi@uc", "compute_gigaio", 0)
    up = run(labctl_env, "up", "gpu-a100", "--site", "sim:chi@tacc,sim:chi@uc", check=False)
    assert up.returncode == 1 and "Traceback" not in up.stderr
    errors = [line for line in up.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sim:chi@tacc:" in errors[0] and "sim:chi@uc:" in errors[0], up.stderr
    assert labctl_leftovers(w) == {}
    gone = run(labctl_env, "status", "gpu-a100", check=False)  # the state keeps no live deployment of it
    assert gone.returncode == 2 and "no deployment" in gone.stderr


def test_a_site_list_with_an_empty_entry_is_refused(labctl_env):
    up = run(labctl_env, "up", "gpu-a100", "--site", "sim:chi@tacc,,sim:chi@uc", check=False)
    assert up.returncode == 2 and up.stderr.startswith("error: --site") and "Traceback" not in up.stderr
    assert not Path(labctl_env["LABCTL_TESTBED_DIR"]).exists() or labctl_leftovers(world(labctl_env)) == {}


def test_failover_deletes_even_the_kept_container_it_made_at_the_first_site(labctl_env):
    """data-persist keeps its volume and container across `down`; moving on from a full site must still leave
    nothing there: what this run made is new and holds no data. The lab then comes up on the emulated AWS."""
    w = world(labctl_env)
    w.set_flavor_slots("kvm@tacc", "m1.large", 0)
    up = run(labctl_env, "up", "data-persist", "--site", "sim:kvm@tacc,sim-aws", timeout=300)
    assert "trying sim-aws" in up.stdout + up.stderr or "trying sim:aws" in up.stdout + up.stderr, up.stderr
    made_there = [(m, path) for _, m, path in w.request_log() if m in ("PUT", "DELETE") and "persist" in path]
    assert [m for m, _ in made_there][:1] == ["PUT"] and "DELETE" in [m for m, _ in made_there], made_there
    inv = w.inventory("kvm@tacc")
    assert labctl_leftovers(w, "kvm@tacc") == {}, {k: v for k, v in inv.items() if v}
    st = run_json(labctl_env, "status", "data-persist")
    assert st["site"] == "sim:aws:us-east-1" and st["status"] == "up" and st["lease_end"]
    run(labctl_env, "down", "data-persist", "--delete-volumes", timeout=300)
