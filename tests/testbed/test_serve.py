"""`labctl testbed serve|start|status|stop`: the three emulated clouds from one process, in the foreground or in
the background, with settings that the real clients use as printed, and SSH that outlives `labctl up`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labctl.testbed import serve

LABCTL = [sys.executable, "-m", "labctl"]
REPO = Path(__file__).resolve().parents[2]


def run(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run([*LABCTL, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"labctl {' '.join(args)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def exports(text: str) -> dict[str, str]:
    """The variables the `export` lines of `text` set (as a shell would: several per line, quoted values)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            for word in shlex.split(line)[1:]:
                key, _, value = word.partition("=")
                out[key] = value
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def world(labctl_env: dict[str, str], request: pytest.FixtureRequest) -> Path:
    """The test's world dir; whatever testbed or moto daemon the test leaves there is stopped, even on failure."""
    state_dir = Path(labctl_env["LABCTL_TESTBED_DIR"])

    def cleanup() -> None:
        pids = [int(serve.recorded(state_dir).get("pid") or 0)]
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(json.loads((state_dir / "aws" / "moto.json").read_text())["pid"]))
        serve.stop(state_dir)
        for pid in pids:
            if pid and alive(pid):
                _kill(pid)

    request.addfinalizer(cleanup)
    return state_dir


def test_status_and_stop_when_nothing_runs(labctl_env: dict[str, str], world: Path) -> None:
    st = json.loads(run(labctl_env, "testbed", "status", "--json").stdout)
    assert st["running"] is False and st["pid"] is None and st["world"] == str(world)
    assert "testbed: stopped" in run(labctl_env, "testbed", "status").stdout
    assert "no testbed runs" in run(labctl_env, "testbed", "stop").stdout  # idempotent: exit 0


def test_a_second_server_of_the_same_world_is_refused(world: Path) -> None:
    world.mkdir(parents=True, exist_ok=True)
    fd = os.open(world / serve.SERVE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(serve.AlreadyServing):
            serve.serve(world, "chi@tacc")  # refused before it serves anything
    finally:
        os.close(fd)
    assert not (world / serve.SERVE_FILE).exists()


def test_a_restart_keeps_its_ports_when_free() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        s.listen()
        assert serve._port_or_any(taken) == 0  # busy: any free port
    assert serve._port_or_any(taken) == taken
    assert serve._port_or_any(None) == 0


def test_each_site_keeps_its_own_address_unless_another_testbed_holds_it(tmp_path: Path) -> None:
    """The sites' own addresses (Keystone on port 5000): a block another testbed holds is skipped whole, and a
    restart takes its recorded block again once it is free (a notebook's cached sites.json stays right)."""
    import requests

    from labctl.testbed.server import Testbed

    # A block well above those other testbeds take first (from 1 up), so that "the recorded one" is not
    # also "the first free one"
    held = 100 + os.getpid() % 100
    first = Testbed.start(tmp_path / "a", 0.002, ssh=False, site_addresses=True, site_block=held)
    try:
        assert first.site_block == held and first.auth_url("chi@uc") == f"http://127.40.{held}.2:5000/v3"
        second = Testbed.start(tmp_path / "b", 0.002, ssh=False, site_addresses=True, site_block=held)
        try:
            assert second.site_block not in (None, held)
            # each answers for its own world: the first's credential is refused at the second's Keystone
            body = {"auth": {"identity": {"methods": ["application_credential"], "application_credential": {
                "id": first.world.credentials.app_cred_id, "secret": first.world.credentials.app_cred_secret}}}}
            assert requests.post(f"{first.auth_url('chi@tacc')}/auth/tokens", json=body, timeout=10).status_code == 201
            assert requests.post(f"{second.auth_url('chi@tacc')}/auth/tokens", json=body, timeout=10).status_code == 401
        finally:
            second.stop()
    finally:
        first.stop()
    again = Testbed.start(tmp_path / "a", 0.002, ssh=False, site_addresses=True, site_block=held)
    try:
        assert again.site_block == held
        sites = requests.get(f"{again.refapi_url}/sites.json", timeout=10).json()["items"]
        assert {s["name"]: s["web"] for s in sites}["CHI@TACC"] == f"http://127.40.{held}.1"
    finally:
        again.stop()


@pytest.mark.slow
def test_background_testbed_serves_ssh_after_up_returns(labctl_env: dict[str, str], world: Path) -> None:
    started = run(labctl_env, "testbed", "start")
    settings = exports(started.stdout)
    assert {"OS_AUTH_URL", "AWS_ENDPOINT_URL", "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE"} <= set(settings)
    st = json.loads(run(labctl_env, "testbed", "status", "--json").stdout)
    assert st["running"] is True and set(st["ports"]) == {"chameleon", "gce", "aws", "ssh"}
    pid = st["pid"]
    assert alive(pid) and st["world"] == str(world)
    # As Chameleon's openrc: Keystone on port 5000 of the site's own address (the block serve.json records)
    assert settings["OS_AUTH_URL"] == f"http://127.40.{serve.recorded(world)['site_block']}.1:5000/v3"
    assert settings["CHI_RESOURCE_API_URL"] == f"http://127.0.0.1:{st['ports']['chameleon']}/refapi"
    assert f"running (pid {pid})" in run(labctl_env, "testbed", "status").stdout
    for name in (serve.SERVE_FILE, serve.SERVE_LOG, serve.ENV_FILE, serve.TOKEN_FILE):
        assert stat.S_IMODE((world / name).stat().st_mode) == 0o600, name
    log = (world / serve.SERVE_LOG).read_text()
    assert settings["AWS_SECRET_ACCESS_KEY"] not in log and settings["OS_APPLICATION_CREDENTIAL_SECRET"] not in log

    again = run(labctl_env, "testbed", "start")  # one runs already: says so, starts no other
    assert "already runs" in again.stderr and json.loads(run(labctl_env, "testbed", "status", "--json").stdout
                                                         )["pid"] == pid

    run(labctl_env, "up", "hello", "--site", "sim", timeout=300)
    assert run(labctl_env, "ssh", "hello", "--", "echo", "ok").stdout.strip() == "ok"
    # The ssh command labctl runs, built here, then run after the labctl side has stopped: the background
    # testbed serves it, on its own SSH port.
    from labctl import service

    ctx = service.Context.create()
    try:
        argv = service.ssh_argv(ctx, "hello", None, ["echo", "still-here"], [])
    finally:
        if ctx._testbed is not None:
            ctx._testbed.stop()
    assert argv[argv.index("-p") + 1] == str(st["ports"]["ssh"])
    out = subprocess.run(argv, env=labctl_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "still-here", out.stderr
    run(labctl_env, "down", "hello", timeout=300)

    moto_pid = int(json.loads((world / "aws" / "moto.json").read_text())["pid"])
    assert alive(moto_pid)
    stopped = run(labctl_env, "testbed", "stop").stdout
    assert f"stopped the testbed (pid {pid})" in stopped and "moto" in stopped
    deadline = time.monotonic() + 10
    while (alive(pid) or alive(moto_pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid) and not alive(moto_pid)
    st = json.loads(run(labctl_env, "testbed", "status", "--json").stdout)
    assert st["running"] is False and st["ports"]  # the ports stay recorded, for the next start
    assert "no testbed runs" in run(labctl_env, "testbed", "stop").stdout


@pytest.mark.slow
def test_serve_prints_settings_the_real_sdks_use(labctl_env: dict[str, str], world: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    proc = subprocess.Popen([*LABCTL, "testbed", "serve"], env=labctl_env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)

    def finish() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()

    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:  # the settings come at once, then serve runs until Ctrl-C
            lines.append(line)
            if line.startswith("# SSH:"):
                break
        text = "".join(lines)
        settings = exports(text)
        assert "gcloud config set api_endpoint_overrides/compute http://127.0.0.1:" in text
        assert "gcloud config set project sim-project" in text
        st = serve.status(world)
        assert st["running"] and st["pid"] == proc.pid

        # Chameleon: openstacksdk from the OS_* variables alone
        import openstack

        monkeypatch.setenv("HOME", str(tmp_path))  # no clouds.yaml of the developer's
        for key, value in settings.items():
            if key.startswith(("OS_", "AWS_")):
                monkeypatch.setenv(key, value)
        conn = openstack.connect()
        assert list(conn.compute.servers()) == []

        # EC2: boto3 with AWS_ENDPOINT_URL and the printed keys (no config file of the developer's)
        import boto3

        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        regions = boto3.session.Session().client("ec2").describe_regions()["Regions"]
        assert "us-east-1" in {r["RegionName"] for r in regions}

        # Compute Engine: google-cloud-compute on the printed endpoint, project and token file
        from google.cloud import compute_v1
        from google.oauth2.credentials import Credentials

        endpoint = settings["CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE"].removesuffix("/compute/v1/")
        token = Path(settings["CLOUDSDK_AUTH_ACCESS_TOKEN_FILE"]).read_text().strip()
        assert stat.S_IMODE(Path(settings["CLOUDSDK_AUTH_ACCESS_TOKEN_FILE"]).stat().st_mode) == 0o600
        zones = compute_v1.ZonesClient(credentials=Credentials(token=token),
                                       client_options={"api_endpoint": endpoint})
        names = {z.name for z in zones.list(project=settings["CLOUDSDK_CORE_PROJECT"])}
        assert "us-central1-a" in names

        # python-chi as the course runs it: the environment of `source env.sh`, then use_site (auth_url =
        # sites.json's web + ":5000/v3"), and for KVM@TACC (whose URL python-chi builds in) the printed chi.set
        kvm_fix = next(line for line in lines if "chi.set('auth_url'" in line).split("after ", 1)[1].split(", ", 1)[1]
        script = ("import chi, chi.server\n"
                  "chi.use_site('CHI@UC')\n"
                  "print('uc', chi.get('auth_url'), [f.name for f in chi.server.list_flavors()])\n"
                  "chi.use_site('KVM@TACC')\n"
                  f"{kvm_fix.strip()}\n"
                  "print('kvm', chi.get('auth_url'), 'm1.small' in [f.name for f in chi.server.list_flavors()])\n")
        env = {**labctl_env, **settings, "HOME": str(tmp_path)}
        chi_run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                 timeout=120, stdin=subprocess.DEVNULL)
        assert chi_run.returncode == 0, chi_run.stderr
        printed = dict(line.split(" ", 1) for line in chi_run.stdout.splitlines() if line.startswith(("uc ", "kvm ")))
        block = serve.recorded(world)["site_block"]
        assert printed["uc"] == f"http://127.40.{block}.2:5000/v3 ['baremetal']"
        assert printed["kvm"] == f"http://127.40.{block}.3:5000/v3 True"
    finally:
        finish()
    assert proc.returncode == 0
    assert serve.status(world)["running"] is False
