"""End to end on the emulated Chameleon: the real CLI, openstacksdk and blazarclient over HTTP, real SSH.

Each test runs `labctl` as a subprocess in a private home (see the `labctl_env` fixture) and checks the
emulator's own view of the world, not labctl's word for it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from tests.e2e.helpers import kill_when, labctl_leftovers, run, run_json, start

pytestmark = pytest.mark.slow


def world(env: dict[str, str]):
    from labctl.testbed.world import World

    return World(Path(env["LABCTL_TESTBED_DIR"]))


def servers_of(w, site: str) -> list[dict]:
    return [s for s in w.inventory(site)["servers"] if s["name"].startswith("labctl-")]


@pytest.mark.parametrize(
    ("lab", "site", "real_site", "node", "node_type"),
    [
        ("hello", "sim", "kvm@tacc", "node-1", "m1.small"),
        ("gpu-a100", "sim", "chi@tacc", "gpu-1", "compute_liqid"),
    ],
)
def test_up_status_ssh_down(labctl_env, lab, site, real_site, node, node_type):
    up = run(labctl_env, "up", lab, "--site", site)
    assert "skipped" in up.stdout + up.stderr  # both labs have host-changing steps, skipped on sim

    st = run_json(labctl_env, "status", lab)
    assert st["site"] == f"sim:{real_site}"
    assert st["status"] == "up"
    (n,) = [x for x in st["nodes"] if x["name"] == node]
    assert n["node_type"] == node_type
    assert n["floating_ip"].startswith("127.")
    assert n["setup"].startswith("done")

    w = world(labctl_env)
    (server,) = servers_of(w, real_site)
    assert server["status"] == "ACTIVE"
    assert any(a.get("addr") == n["floating_ip"] and a.get("OS-EXT-IPS:type") == "floating"
               for addrs in server["addresses"].values() for a in addrs)
    assert len(w.inventory(real_site)["leases"]) == 1

    # A real SSH session through the system ssh client, with the pinned host key.
    out = run(labctl_env, "ssh", lab, node, "--", "echo", "hi-from", "$LABCTL_NODE")
    assert out.stdout.strip() == f"hi-from {server['name']}"

    down = run(labctl_env, "down", lab)
    assert "Deleted" in down.stdout
    assert labctl_leftovers(w) == {}
    assert run_json(labctl_env, "status") == {"labs": [], "classes": []}  # the overview


def test_setup_ran_safe_steps_and_skipped_host_changing_ones(labctl_env):
    run(labctl_env, "up", "hello", "--site", "sim")
    st = run_json(labctl_env, "status", "hello")
    assert "skipped" in st["nodes"][0]["setup"]
    out = run(labctl_env, "ssh", "hello", "--", "cat", "hello.txt")
    assert out.stdout.strip()
    logs = list(Path(labctl_env["LABCTL_STATE_DIR"], "logs").rglob("node-1.log"))
    assert logs and "skipped" in logs[0].read_text()

    from datetime import datetime

    before = datetime.fromisoformat(st["lease_end"])
    extended = run_json(labctl_env, "extend", "hello", "--hours", "2")
    after = datetime.fromisoformat(extended["lease_end"])
    assert 7140 <= (after - before).total_seconds() <= 7260
    (lease,) = world(labctl_env).inventory("kvm@tacc")["leases"]
    assert lease["end_date"].startswith(after.strftime("%Y-%m-%dT%H:%M"))
    run(labctl_env, "down", "hello")


def test_fallback_to_next_node_type(labctl_env):
    w = world(labctl_env)
    w.set_hosts("chi@uc", "gpu_a100_pcie", 0)
    up = run(labctl_env, "up", "gpu-a100", "--site", "sim:chi@uc")
    said = up.stdout + up.stderr
    assert "gpu_a100_pcie" in said and "compute_gigaio" in said
    st = run_json(labctl_env, "status", "gpu-a100")
    assert st["nodes"][0]["node_type"] == "compute_gigaio"
    assert any("compute_gigaio" in e for e in st["events"])
    run(labctl_env, "down", "gpu-a100")
    assert labctl_leftovers(w) == {}


def test_no_capacity_anywhere_leaves_nothing(labctl_env):
    w = world(labctl_env)
    w.set_hosts("chi@uc", "gpu_a100_pcie", 0)
    w.set_hosts("chi@uc", "compute_gigaio", 0)
    up = run(labctl_env, "up", "gpu-a100", "--site", "sim:chi@uc", check=False)
    assert up.returncode == 1
    errors = [line for line in up.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no capacity" in errors[0]
    assert "Traceback" not in up.stderr
    assert labctl_leftovers(w) == {}


@pytest.mark.parametrize("operation", ["POST /leases", "POST /servers"])
def test_sigkill_after_create_sent_then_resume(labctl_env, operation):
    w = world(labctl_env)
    w.inject_fault("chi@tacc", operation, "hang_after")
    proc = start(labctl_env, "up", "gpu-a100", "--site", "sim")
    method, path = operation.split(" ")
    kill_when(proc, lambda: any(m == method and p.endswith(path) for _, m, p in w.request_log()))
    w.clear_faults()

    run(labctl_env, "up", "gpu-a100", "--site", "sim")
    assert len(servers_of(w, "chi@tacc")) == 1
    assert len(w.inventory("chi@tacc")["leases"]) == 1
    run(labctl_env, "down", "gpu-a100")
    assert labctl_leftovers(w) == {}


def test_sigkill_during_setup_then_resume(labctl_env, tmp_path):
    # A profile whose second step blocks until a flag file exists, so the kill lands mid-setup.
    profiles = tmp_path / "work" / "profiles"
    profiles.mkdir(parents=True)
    # The flag is in each node's home (a node that is a machine sees only its own files, as a real one).
    homes = Path(labctl_env["LABCTL_TESTBED_DIR"]) / "nodes"
    (profiles / "slowsetup.yaml").write_text(
        "name: slowsetup\n"
        "description: setup that waits\n"
        "sites: [kvm@tacc]\n"
        "lease_hours: 1\n"
        "image: ubuntu-24.04\n"
        "nodes:\n"
        "  node:\n"
        "    count: 2\n"
        "    floating_ip: true\n"
        "    types: {kvm@tacc: [m1.small]}\n"
        "setup:\n"
        "  - {name: first, run: 'echo one >> steps.txt', safe_on_sim: true}\n"
        "  - {name: wait, run: 'while [ ! -e release ]; do sleep 0.05; done; echo two >> steps.txt',"
        " safe_on_sim: true, timeout: 120}\n"
        "  - {name: last, run: 'echo three >> steps.txt', safe_on_sim: true}\n"
    )
    path = str(profiles / "slowsetup.yaml")
    state_db = Path(labctl_env["LABCTL_STATE_DIR"]) / "state.db"
    proc = start(labctl_env, "up", path, "--site", "sim")

    def waiting_step_running() -> bool:
        import sqlite3

        if not state_db.exists():
            return False
        try:
            with contextlib.closing(sqlite3.connect(state_db, timeout=1)) as db:
                rows = db.execute("SELECT count(*) FROM setup_steps WHERE step_name='wait' AND status='running'")
                return rows.fetchone()[0] >= 2
        except sqlite3.OperationalError:
            return False

    kill_when(proc, waiting_step_running)
    for home in homes.glob("*/home"):
        (home / "release").write_text("go")
    run(labctl_env, "up", path, "--site", "sim")
    w = world(labctl_env)
    assert len(servers_of(w, "kvm@tacc")) == 2
    for node in ("node-1", "node-2"):
        out = run(labctl_env, "ssh", "slowsetup", node, "--", "cat", "steps.txt").stdout.split()
        assert out[0] == "one" and out.count("one") == 1  # the done step did not run again
        assert out[-2:] == ["two", "three"]
    run(labctl_env, "down", "slowsetup")
    assert labctl_leftovers(w) == {}


def test_status_json_is_plain_json(labctl_env):
    proc = run(labctl_env, "status", "--json")
    assert json.loads(proc.stdout) == {"labs": [], "classes": []}  # the overview (issue 12 item 3)


def test_ssh_forward_carries_a_port_to_the_node(labctl_env):
    """`labctl ssh LAB --forward LOCAL:REMOTE` forwards through the real SSH session to the node's localhost
    (an emulated node's localhost is this host's loopback, where a stand-in for the lab's web UI listens)."""
    import http.server
    import socket
    import threading
    import time
    import urllib.request

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            body = b"the node's web UI"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    remote = server.server_address[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    run(labctl_env, "up", "hello", "--site", "sim")
    bad = run(labctl_env, "ssh", "hello", "--forward", "88x", check=False)
    assert bad.returncode == 2 and "--forward 88x: expected PORT or LOCAL:REMOTE" in bad.stderr
    assert "Traceback" not in bad.stderr
    proc = start(labctl_env, "ssh", "hello", "--forward", f"{local}:{remote}", "--", "sleep", "60")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{local}/", timeout=5) as answer:
                    assert answer.read() == b"the node's web UI"
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the forward never came up"
                time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
        server.shutdown()
    run(labctl_env, "down", "hello")
