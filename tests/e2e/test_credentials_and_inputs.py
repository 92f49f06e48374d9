"""The non-sim path (credentials from OS_* variables, a user-defined site), and bad input.

The emulated cloud runs in this test process (its HTTP endpoints and SSH nodes on 127.0.0.1); labctl runs
as a subprocess that only knows the openrc-style variables and a sites.yaml, as a student's machine would.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from tests.e2e.helpers import labctl_leftovers, run, run_json

pytestmark = pytest.mark.slow


@pytest.fixture
def cloud(labctl_env, tmp_path):
    from labctl.testbed import Testbed

    tb = Testbed.start(state_dir=Path(tmp_path / "cloud"), time_scale=0.002)
    yield tb
    tb.stop()


def user_site(env: dict[str, str], tb, port: int) -> None:
    config = Path(env["LABCTL_CONFIG_DIR"])
    config.mkdir(parents=True, exist_ok=True)
    (config / "sites.yaml").write_text(
        "my-kvm:\n"
        "  base: kvm@tacc\n"
        f"  auth_url: {tb.auth_url('kvm@tacc')}\n"
        f"  ssh_port: {port}\n"
        "  poll_interval: 0.05\n"
    )


HARMLESS = """\
name: hello
description: hello without the host-changing step (a user site is not sim, so every step would run)
sites: [kvm@tacc]
lease_hours: 1
image: ubuntu-24.04
nodes:
  node: {count: 1, floating_ip: true, types: {kvm@tacc: [m1.small]}}
setup:
  - {name: hello, run: 'echo "hello from $LABCTL_NODE" > hello.txt'}
"""


def test_openrc_credentials_on_a_user_site_end_to_end(labctl_env, cloud, tmp_path):
    user_site(labctl_env, cloud, cloud.ssh_port)
    (tmp_path / "profiles").mkdir()
    profile = tmp_path / "profiles" / "hello.yaml"
    profile.write_text(HARMLESS)
    env = {**labctl_env, **cloud.os_env("kvm@tacc")}
    secret = env["OS_APPLICATION_CREDENTIAL_SECRET"]

    sites = run_json(env, "sites")
    (mine,) = [s for s in sites if s["site"] == "my-kvm"]
    assert mine["credentials"].startswith("found")
    assert secret not in str(sites)

    up = run(env, "up", str(profile), "--site", "my-kvm")
    st = run_json(env, "status", "hello")
    assert st["site"] == "my-kvm" and st["status"] == "up"
    out = run(env, "ssh", "hello", "--", "cat", "hello.txt")
    assert out.stdout.startswith("hello from")

    # Secrets never reach output, logs or state; state is private to the user.
    state = Path(env["LABCTL_STATE_DIR"])
    for path in state.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in up.stdout + up.stderr
    assert stat.S_IMODE(os.stat(state / "state.db").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    # Everything under it too: logs, known_hosts, keys (directories 0700, files 0600).
    loose = [f"{p.relative_to(state)} {stat.S_IMODE(p.stat().st_mode):o}" for p in state.rglob("*")
             if stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert loose == []

    run(env, "down", "hello")
    assert labctl_leftovers(cloud.world) == {}


def test_wrong_secret_is_one_line_exit_2_and_creates_nothing(labctl_env, cloud):
    user_site(labctl_env, cloud, cloud.ssh_port)
    env = {**labctl_env, **cloud.os_env("kvm@tacc"), "OS_APPLICATION_CREDENTIAL_SECRET": "wrong"}
    proc = run(env, "up", "hello", "--site", "my-kvm", check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "credentials rejected" in errors[0]
    assert "Traceback" not in proc.stderr and "wrong" not in proc.stderr
    assert labctl_leftovers(cloud.world) == {}
    assert not any(m == "POST" and "identity" not in p for _, m, p in cloud.world.request_log())


def test_missing_credentials_is_one_line_exit_2(labctl_env):
    proc = run(labctl_env, "up", "hello", "--site", "kvm@tacc", check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: no credentials for kvm@tacc")
    assert "OS_" in proc.stderr or "openrc" in proc.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["up", "tests/data/bad_profiles/unknown_key.yaml", "--site", "sim"], "unknown_key.yaml"),
        (["up", "tests/data/bad_profiles/yaml_syntax.yaml", "--site", "sim"], "yaml_syntax.yaml:"),
        (["up", "no-such-lab", "--site", "sim"], "no-such-lab"),
        (["up", "hello", "--site", "chi@tac"], "did you mean 'chi@tacc'"),
        (["up", "hello", "--site", "chi@tacc"], "hello"),
        (["plan", "gpu-a100", "--site", "kvm@tacc"], "gpu-a100"),
        (["validate", "tests/data/bad_profiles/unknown_node_type.yaml"], "unknown_node_type.yaml"),
        (["status", "nothing-here"], "no deployment named 'nothing-here'"),
    ],
)
def test_bad_input_is_one_line_exit_2_no_traceback(labctl_env, args, says):
    proc = run(labctl_env, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], proc.stderr
    testbed_dir = Path(labctl_env["LABCTL_TESTBED_DIR"])
    if testbed_dir.exists():
        from labctl.testbed.world import World

        assert labctl_leftovers(World(testbed_dir)) == {}


def test_testbed_serve_prints_an_openrc(labctl_env):
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "labctl", "testbed", "serve", "--site", "chi@uc"],
                            env=labctl_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("export CHI_RESOURCE_API_URL"):
                break
        text = "".join(lines)
        # The site's own loopback address with Keystone on port 5000, as Chameleon's openrc (or the shared
        # endpoint when no address block is free).
        assert re.search(r"^export OS_AUTH_URL=http://127\.\d+\.\d+\.\d+:\d+/", text, re.M), "no loopback OS_AUTH_URL"
        assert "OS_REGION_NAME=CHI@UC" in text
    finally:
        proc.terminate()
        proc.wait(10)


def test_plan_changes_nothing(labctl_env):
    out = run_json(labctl_env, "plan", "gpu-a100", "--site", "chi@uc")
    (node,) = out["nodes"]
    assert node["types"] == ["gpu_a100_pcie", "compute_gigaio"]
    assert node["image"] == "CC-Ubuntu24.04-CUDA"
    assert {r["kind"] for r in out["resources"]} == {"keypair", "reservation", "server", "floating_ip"}
    assert not Path(labctl_env["LABCTL_TESTBED_DIR"]).exists()
