"""The class benchmark's lower bound (benchmarks/class_up.py): the creates' path of a site's last environment."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

SPEC = importlib.util.spec_from_file_location("class_up", Path(__file__).parents[1] / "benchmarks" / "class_up.py")
class_up = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(class_up)

HELLO = {"levels": [["keypair", "reservation", "secgroup"], ["server"], ["floating_ip"]],
         "per_kind": {"keypair": 1, "reservation": 1, "secgroup": 1, "server": 1, "floating_ip": 1},
         "delays": {"reservation": 3.0, "server": 60.0}}


def test_the_last_server_create_waits_behind_every_environments_creates():
    seconds, kind = class_up.creates_path(HELLO, envs=250, latency_s=0.03, rate_s=100, burst=5)
    # 250 x (3 creates of the first level + 1 server) - 5 in the bucket, at 100 a second; then the server's answer,
    # its boot, and the floating IP's create.
    assert kind == "server"
    assert seconds == pytest.approx((250 * 4 - 5) / 100 + 0.03 + 60 + 0.03)


shapes = st.builds(
    lambda levels, delays, per: {"levels": levels, "delays": delays, "per_kind": per},
    st.just(HELLO["levels"]),
    st.fixed_dictionaries({"reservation": st.floats(0, 100), "server": st.floats(0, 700)}),
    st.fixed_dictionaries({k: st.integers(1, 3) for k in HELLO["per_kind"]}),
)


@given(shapes, st.integers(1, 600), st.floats(0.001, 0.5), st.floats(1, 1000))
def test_one_environment_with_room_in_the_bucket_is_its_own_path(shape, envs, latency, rate):
    alone = sum(latency + max(shape["delays"].get(k, 0.0) for k in level) for level in shape["levels"])
    assert class_up.creates_path(shape, 1, latency, rate, burst=100)[0] == pytest.approx(alone)
    # More environments behind one limiter never finish sooner; fewer tokens in the bucket neither.
    more = class_up.creates_path(shape, envs + 1, latency, rate, burst=5)[0]
    assert more >= class_up.creates_path(shape, envs, latency, rate, burst=5)[0] >= alone - 1e-9


def test_the_bound_takes_the_creates_path_only_where_environments_ran():
    shape = {**HELLO, "site": "sim:chi@uc", "real_site": "chi@uc"}
    calls = {"keypair": 250, "reservation": 250, "secgroup": 250, "server": 250, "floating_ip": 250}
    with_envs = class_up.lower_bound([shape], calls, 250, 1250, 0.03, 100, envs_by_site={"sim:chi@uc": 250}, burst=5)
    without = class_up.lower_bound([shape], calls, 250, 1250, 0.03, 100)
    assert with_envs["creates_path"] == pytest.approx(70.01) and with_envs["bound"] == with_envs["creates_path"]
    assert without["creates_path"] == 0.0 and without["bound"] == max(without["path"], without["rate_term"])


def test_the_nodes_floor_starts_after_the_api_path_and_spreads_their_work_over_the_cores():
    # 200 nodes' own work (20 s of CPU) on 2 cores, after a 9.1 s API path: no client finishes before 19.1 s here.
    lab = {"machine_cpu": 40.0, "cores": 2, "cpu": 8.0, "wall": 28.65}
    figures = class_up.machine_figures(lab, first_path=9.1, nodes_cpu=20.0)
    assert figures["nodes_floor_s"] == pytest.approx(9.1 + 20.0 / 2)
    assert figures["wall_over_nodes_floor"] == pytest.approx(28.65 / 19.1)
    assert figures["others_floor_s"] == pytest.approx((40.0 - 8.0) / 2)
    assert class_up.machine_figures({**lab, "machine_cpu": None}, 9.1, 20.0) is None  # no /proc/stat


def test_the_first_path_is_the_quickest_sites():
    # A class on a VM site and a bare-metal one: its first nodes are up after the VM site's path, not the other's.
    vm = {**HELLO, "site": "sim:kvm@tacc", "real_site": "kvm@tacc", "delays": {"reservation": 3.0, "server": 6.0}}
    metal = {**HELLO, "site": "sim:chi@uc", "real_site": "chi@uc", "delays": {"reservation": 3.0, "server": 60.0}}
    calls = {kind: 500 for kind in HELLO["per_kind"]}
    bound = class_up.lower_bound([metal, vm], calls, 500, 1000, latency_s=0.03, rate_s=100)
    assert bound["first_path"] == pytest.approx(3 * 0.03 + 3.0 + 6.0)
    assert bound["path"] == pytest.approx(3 * 0.03 + 3.0 + 60.0)
