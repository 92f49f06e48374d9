"""The unmodified `openstack` CLI (python-openstackclient, with python-blazarclient's `reservation` plugin) against
`labctl testbed serve`, configured only by the openrc lines serve prints.

One `labctl testbed serve` per module (a subprocess, as a user runs it); each command is a subprocess with the
printed `export` lines in its environment, a HOME without clouds.yaml, and the tests' loopback guard. The commands
are the ones Chameleon's docs and the course's CLI notebooks run (cloud-chi's `2_provision_cli`; the bare-metal
`openstack reservation lease create --reservation min=1,max=1,resource_type=physical:host,...` recipe), and the
refusals the real cloud gives come back as the CLI's own exit code and message.

Seen on the way (python-blazarclient's own): every command prints "Could not load 'reservation_host_unset'" on
stderr (its entry point names a class the package does not have); `lease create -f json` prints "Created a new
lease:" before the JSON; a lease's `reservations` and `events` columns are JSON objects concatenated in a string.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from labctl.testbed import serve
from labctl.testbed.world import World

GUARD_DIR = Path(__file__).parents[1] / "loopback_guard"  # the tests' loopback guard (tests/conftest.py)
REPO = Path(__file__).resolve().parents[2]
SCALE = "0.002"
BLAZAR_NOISE = "Could not load 'reservation_host_unset'"
NODE_TYPE = "compute_cascadelake"  # 24 hosts at CHI@TACC


def _openstack() -> str:
    """The `openstack` entry point of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "openstack"
    if beside.exists():
        return str(beside)
    found = shutil.which("openstack")
    if found:
        return found
    pytest.skip("python-openstackclient is not installed (part of the test extra)")


@dataclass
class Served:
    world: World
    settings: dict[str, str]  # the `export` lines labctl testbed serve printed
    env: dict[str, str]  # what each `openstack` subprocess runs with


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    cli = _openstack()
    assert cli
    home = tmp_path_factory.mktemp("home")
    state_dir = tmp_path_factory.mktemp("world")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "AWS_", "GOOGLE_", "CHI_"))}
    base.update(HOME=str(home), LABCTL_TESTBED_DIR=str(state_dir), LABCTL_TESTBED_TIME_SCALE=SCALE,
                LABCTL_STATE_DIR=str(home / "state"), LABCTL_CONFIG_DIR=str(home / "config"), NO_COLOR="1",
                PYTHONPATH=os.pathsep.join([str(GUARD_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.Popen([sys.executable, "-m", "labctl", "testbed", "serve"], env=base, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # the settings come at once, then serve runs until Ctrl-C
            lines.append(line)
            if line.startswith("# SSH:"):
                break
        settings = exports("".join(lines))
        assert "OS_AUTH_URL" in settings, f"labctl testbed serve printed no openrc:\n{''.join(lines)}"
        env = {**base, **{k: v for k, v in settings.items() if k.startswith("OS_")}}
        yield Served(World(state_dir, float(SCALE)), settings, env)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
        serve.stop(state_dir)  # its moto daemon


def openstack(served: Served, *args: str) -> subprocess.CompletedProcess:
    """`openstack ARGS` as a user runs it after sourcing the openrc (stderr without blazarclient's noise)."""
    proc = subprocess.run([_openstack(), *args], env=served.env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if BLAZAR_NOISE not in line)
    return proc


def ok(served: Served, *args: str) -> str:
    proc = openstack(served, *args)
    assert proc.returncode == 0, f"openstack {' '.join(args)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def ok_json(served: Served, *args: str):
    return json.loads(ok(served, *args, "-f", "json"))


def exports(text: str) -> dict[str, str]:
    """The variables the `export` lines of `text` set, as a shell would."""
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            for word in shlex.split(line)[1:]:
                key, _, value = word.partition("=")
                out[key] = value
    return out


def concatenated_json(text: str) -> list[dict]:
    """blazarclient's `reservations`/`events` columns: JSON objects one after another in one string."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
    return out


def inventory(served: Served) -> dict:
    return {k: v for k, v in served.world.inventory("chi@tacc").items() if v}


def test_openrc_points_at_keystone_on_port_5000_of_the_site(served: Served):
    block = serve.recorded(Path(served.env["LABCTL_TESTBED_DIR"]))["site_block"]
    assert served.settings["OS_AUTH_URL"] == f"http://127.40.{block}.1:5000/v3"
    assert served.settings["OS_REGION_NAME"] == "CHI@TACC"
    assert served.settings["OS_AUTH_TYPE"] == "v3applicationcredential"


def test_token_catalog_and_the_lists(served: Served):
    token = ok_json(served, "token", "issue")
    assert token["id"].startswith("gAAAAA") and token["project_id"] and token["expires"]
    catalog = {entry["Type"]: entry for entry in ok_json(served, "catalog", "list")}
    assert {"identity", "compute", "network", "image", "reservation", "object-store"} <= set(catalog)
    assert "block-storage" not in catalog  # the bare-metal sites have no Cinder
    assert {e["region"] for e in catalog["compute"]["Endpoints"]} == {"CHI@TACC"}

    assert [f["Name"] for f in ok_json(served, "flavor", "list")] == ["baremetal"]
    images = {i["Name"]: i["Status"] for i in ok_json(served, "image", "list")}
    assert images.get("CC-Ubuntu24.04") == "active"
    assert {"public", "sharednet1"} <= {n["Name"] for n in ok_json(served, "network", "list")}
    hosts = ok_json(served, "reservation", "host", "list")  # the reservable hosts Blazar knows
    assert len(hosts) == len({h["id"] for h in hosts}) > 0


def test_wrong_credentials_are_refused_as_keystone_does(served: Served):
    bad = dict(served.env, OS_APPLICATION_CREDENTIAL_SECRET="not-the-secret")
    proc = subprocess.run([_openstack(), "token", "issue"], env=bad, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert "The request you have made requires authentication. (HTTP 401)" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_bare_metal_lease_server_floating_ip_and_deletes(served: Served, tmp_path: Path):
    pubkey = tmp_path / "id_ed25519.pub"
    import asyncssh

    pubkey.write_text(asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode())
    assert ok(served, "keypair", "create", "--public-key", str(pubkey), "compat-key", "-f", "value", "-c",
              "name").strip() == "compat-key"

    created = ok(served, "reservation", "lease", "create", "--reservation",
                 f'min=1,max=1,resource_type=physical:host,resource_properties=["=", "$node_type", "{NODE_TYPE}"]',
                 "compat-lease", "-f", "json")
    assert created.startswith("Created a new lease:\n")
    lease = json.loads(created.split("\n", 1)[1])
    (reservation,) = concatenated_json(lease["reservations"])
    assert reservation["resource_type"] == "physical:host" and lease["status"] in ("PENDING", "STARTING", "ACTIVE")
    # Wait as the course's scripts do: `lease show -c status` until ACTIVE (each call is a CLI run; the
    # emulator's lease starts within milliseconds at this time scale, so a handful of runs at most).
    for _ in range(10):
        status = ok(served, "reservation", "lease", "show", "compat-lease", "-f", "value", "-c", "status").strip()
        if status == "ACTIVE":
            break
    assert status == "ACTIVE"

    server = ok_json(served, "server", "create", "--image", "CC-Ubuntu24.04", "--flavor", "baremetal",
                     "--network", "sharednet1", "--key-name", "compat-key", "--hint",
                     f"reservation={reservation['id']}", "--wait", "compat-node")
    assert server["status"] == "ACTIVE" and server["key_name"] == "compat-key"
    fip = ok(served, "floating", "ip", "create", "public", "-f", "value", "-c", "floating_ip_address").strip()
    assert fip.startswith("127.10.1.")
    ok(served, "server", "add", "floating", "ip", "compat-node", fip)
    shown = ok_json(served, "server", "show", "compat-node", "-c", "addresses", "-c", "status")
    assert shown["status"] == "ACTIVE" and fip in shown["addresses"]["sharednet1"]
    (node,) = inventory(served)["servers"]
    assert node["name"] == "compat-node" and node["reservation_id"] == reservation["id"]

    ok(served, "server", "remove", "floating", "ip", "compat-node", fip)
    ok(served, "floating", "ip", "delete", fip)
    ok(served, "server", "delete", "--wait", "compat-node")
    assert "Deleted lease: compat-lease" in ok(served, "reservation", "lease", "delete", "compat-lease")
    ok(served, "keypair", "delete", "compat-key")
    assert inventory(served) == {}


# ============================================================================ refusals, as Chameleon gives them


def test_a_server_on_a_reservation_that_does_not_exist_ends_in_error(served: Served):
    """Nova accepts the request; Blazar's filter finds no host: ERROR with the scheduler's fault, and the CLI's
    --wait says so with exit code 1."""
    proc = openstack(served, "server", "create", "--image", "CC-Ubuntu24.04", "--flavor", "baremetal",
                     "--network", "sharednet1", "--hint", f"reservation={uuid.uuid4()}", "--wait", "compat-nowhere")
    assert (proc.returncode, proc.stderr.strip()) == (1, "Error creating server: compat-nowhere")
    shown = ok_json(served, "server", "show", "compat-nowhere", "-c", "status", "-c", "fault")
    assert shown["status"] == "ERROR"
    assert shown["fault"]["code"] == 500
    assert shown["fault"]["message"] == "No valid host was found. There are not enough hosts available."
    ok(served, "server", "delete", "--wait", "compat-nowhere")
    assert inventory(served) == {}


def test_a_lease_for_more_hosts_than_the_site_has_is_refused(served: Served):
    proc = openstack(served, "reservation", "lease", "create", "--reservation",
                     'min=99,max=99,resource_type=physical:host,resource_properties=["=", "$node_type", '
                     '"compute_liqid"]', "compat-too-big")
    assert (proc.returncode, proc.stderr.strip()) == (1, "ERROR: Not enough hosts available")
    assert inventory(served) == {}


def test_a_server_that_does_not_exist(served: Served):
    proc = openstack(served, "server", "show", "compat-missing")
    assert (proc.returncode, proc.stderr.strip()) == (1, "No Server found for compat-missing")


@pytest.fixture(autouse=True)
def _nothing_left(served: Served) -> Iterator[None]:
    """Each test starts and ends with an empty CHI@TACC (a failed test's leftovers are removed, not inherited)."""
    yield
    left = served.world.inventory("chi@tacc")
    with contextlib.suppress(Exception):
        for server in left["servers"]:
            openstack(served, "server", "delete", "--wait", server["id"])
        for fip in left["floating_ips"]:
            openstack(served, "floating", "ip", "delete", fip["id"])
        for lease in left["leases"]:
            openstack(served, "reservation", "lease", "delete", lease["id"])
        for keypair in left["keypairs"]:
            openstack(served, "keypair", "delete", keypair["name"])
