"""Careless and hostile use end to end on the emulated Chameleon (issue 9): two `up`s of one lab at once, class
teardown selectors, forgetting a pinned host key. The CLI runs as real processes on one state directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.e2e.helpers import labctl_leftovers, run, run_json, start
from tests.e2e.test_class_sim import make_keys, write_roster

pytestmark = pytest.mark.slow


def world(env):
    from labctl.testbed.world import World

    return World(Path(env["LABCTL_TESTBED_DIR"]))


def mine(inventory: dict, kind: str) -> list:
    return [x for x in inventory.get(kind, []) if "labctl" in str(x.get("name") or "") + str(x.get("description")
                                                                                               or "")]


def test_two_concurrent_ups_one_proceeds_the_other_is_busy(labctl_env):
    # Slow the emulated cloud down so that the winner holds the lock well past the loser's wait (5 s).
    env = {**labctl_env, "LABCTL_TESTBED_TIME_SCALE": "0.1"}
    procs = [start(env, "up", "hello", "--site", "sim") for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append((p.returncode, out, err))
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    (loser,) = [r for r in results if r[0] == 2]
    lines = loser[2].splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hello is busy: labctl "), loser[2]
    assert "Traceback" not in loser[2]

    st = run_json(env, "status", "hello")
    assert st["status"] == "up"
    inv = world(env).inventory(st["site"].split(":", 1)[1])  # sim:<the site it stands for>
    # One of everything: the loser created nothing (keypairs are shared by name, so one as well).
    assert len(mine(inv, "servers")) == 1
    assert len(inv["leases"]) == 1
    assert len(mine(inv, "security_groups")) == 1
    assert len(mine(inv, "keypairs")) == 1
    assert len(inv["floating_ips"]) == 1

    run(env, "down", "hello")
    assert labctl_leftovers(world(env)) == {}


def test_class_down_selectors_on_a_real_class(labctl_env, tmp_path):
    roster = tmp_path / "roster.csv"
    write_roster(roster, make_keys(tmp_path / "keys", 2))
    run(labctl_env, "class", "up", "hello", "--roster", str(roster), "--site", "sim", "--course", "mlsys",
        timeout=600)
    assert len(run_json(labctl_env, "class", "status", "hello", "--course", "mlsys")) == 2

    for args in (("--student", ""), ("--student", "  "), ()):  # empty student; the whole class, no --yes
        proc = run(labctl_env, "class", "down", "hello", "--course", "mlsys", *args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "pass --yes" in proc.stderr and "2 environment(s) of mlsys/hello" in proc.stderr
    assert [s["status"] for s in run_json(labctl_env, "class", "status", "hello", "--course", "mlsys")] == ["up"] * 2

    run(labctl_env, "class", "down", "hello", "--course", "mlsys", "--student", "s00", timeout=600)
    (left,) = run_json(labctl_env, "class", "status", "hello", "--course", "mlsys")
    assert left["student_id"] == "s01"
    run(labctl_env, "class", "down", "hello", "--course", "mlsys", "--yes", timeout=600)
    assert run_json(labctl_env, "class", "status", "hello", "--course", "mlsys") == []
    assert labctl_leftovers(world(labctl_env)) == {}


def test_forget_host_key_then_up_pins_again(labctl_env):
    from labctl.state import StateStore

    run(labctl_env, "up", "hello", "--site", "sim")
    with StateStore(Path(labctl_env["LABCTL_STATE_DIR"]) / "state.db") as store:
        (dep,) = store.deployments()
        before = store.get_host_key(dep.id, "node-1")
    assert before
    out = run(labctl_env, "ssh", "hello", "node-1", "--forget-host-key").stdout
    assert out.startswith("hello/node-1: forgot the pinned host key SHA256:")
    refused = run(labctl_env, "ssh", "hello", "--", "true", check=False)
    assert refused.returncode == 2 and "no pinned host key yet" in refused.stderr
    run(labctl_env, "up", "hello", "--site", "sim")
    with StateStore(Path(labctl_env["LABCTL_STATE_DIR"]) / "state.db") as store:
        assert store.get_host_key(dep.id, "node-1") == before  # the same node: the same key pinned again
    assert run(labctl_env, "ssh", "hello", "--", "echo", "ok").stdout.strip() == "ok"
    run(labctl_env, "down", "hello")
