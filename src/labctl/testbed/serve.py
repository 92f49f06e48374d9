"""The emulated clouds served from one process: `labctl testbed serve` (in the foreground, until Ctrl-C) and
`labctl testbed start|status|stop` (the same, detached, with a lifecycle).

One process serves, over one world directory, the emulated Chameleon (every site), Compute Engine and the EC2
front layer (with the world's moto daemon behind it), plus SSH for every emulated node on the world's SSH port.
Files in the world directory (all 0600):

    serve.json   {"pid", "ports": {"chameleon", "gce", "aws", "ssh"}, "site_block", "started", "site"}: the ports
                 and the block of the sites' own addresses (127.40.B.N, Keystone on port 5000 there, for
                 python-chi's use_site) are kept after the process ends, and the next one takes them again when free
    serve.lock   held (flock) by the serving process for its lifetime: one server per world
    serve.log    the background process's output (no secrets: the settings go to env.sh)
    env.sh       the settings for each cloud's usual client, to `source`
    gce-token    the Compute Engine bearer token (gcloud's CLOUDSDK_AUTH_ACCESS_TOKEN_FILE / --access-token-file)

While a testbed serves the world, every labctl command on a `sim*` site uses its SSH port
(`Testbed.attach`), so the `ssh` command labctl prints keeps working after labctl exits.

This module imports only the standard library at the top: `labctl testbed status` stays fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SERVE_FILE = "serve.json"
SERVE_LOCK = "serve.lock"
START_LOCK = ".serve-start.lock"
SERVE_LOG = "serve.log"
ENV_FILE = "env.sh"
TOKEN_FILE = "gce-token"
PORT_NAMES = ("chameleon", "gce", "aws", "ssh")
AWS_REGION = "us-east-1"


class AlreadyServing(RuntimeError):
    """Another process serves this world (it holds serve.lock)."""


# -- looking at a running testbed ----------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_private_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _write_private_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _ours(pid: int) -> bool:
    """`pid` is alive (not a zombie) and is a labctl testbed server (not a reused pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not ours
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    with contextlib.suppress(OSError):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"labctl" in cmdline and b"serve" in cmdline
    return True


def _answers(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, int(port))) == 0


def recorded(state_dir: Path) -> dict[str, Any]:
    """What serve.json says (pid and ports; {} if there is none)."""
    return _read_json(Path(state_dir) / SERVE_FILE) or {}


def running(state_dir: Path) -> dict[str, Any] | None:
    """The testbed serving `state_dir` (serve.json's content), if its process is alive and its three HTTP
    endpoints answer; else None. (The SSH port answers only on the nodes' addresses, once there are nodes.)"""
    info = recorded(state_dir)
    ports = info.get("ports")
    if not isinstance(ports, dict) or not _ours(int(info.get("pid") or 0)):
        return None
    if not all(isinstance(ports.get(k), int) for k in PORT_NAMES):
        return None
    if not all(_answers(ports[k]) for k in ("chameleon", "gce", "aws")):
        return None
    return info


def attach(ssh: bool = True) -> Any:
    """The `Testbed` of one labctl command over the default world: the HTTP endpoints in this process, and SSH
    from the world's background testbed (`labctl testbed start`) when one runs, so that the nodes keep
    answering SSH on the port labctl prints after the command exits; else SSH in this process as well."""
    from labctl.testbed.server import Testbed
    from labctl.testbed.world import default_state_dir

    info = running(default_state_dir()) if ssh else None
    if info is None:
        return Testbed.start(ssh=ssh)
    tb = Testbed.start(ssh=False)
    tb.ssh_port, tb.ssh_elsewhere = int(info["ports"]["ssh"]), True
    return tb


def _lock_held(state_dir: Path) -> bool:
    """A process holds serve.lock (it serves or is starting to serve this world)."""
    path = Path(state_dir) / SERVE_LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the lock if we took it
    return False


@contextlib.contextmanager
def _flock(path: Path, blocking: bool = True) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise AlreadyServing(f"another process serves the testbed world {path.parent}") from None
        yield fd
    finally:
        os.close(fd)


# -- serving ----------------------------------------------------------------------------------------
def _port_or_any(port: object) -> int:
    """`port` if it is free on 127.0.0.1 now (a restart keeps its ports), else 0 (any free one)."""
    if not isinstance(port, int) or not 0 < port < 65536:
        return 0
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


class Served:
    """The three clouds' endpoints and the SSH side, in this process, over one world."""

    def __init__(self, state_dir: Path, time_scale: float | None = None) -> None:
        from labctl.testbed.access import private_dir
        from labctl.testbed.server import Testbed

        self.state_dir = private_dir(Path(state_dir).expanduser())
        old = recorded(self.state_dir).get("ports") or {}
        block = recorded(self.state_dir).get("site_block")
        self.tb = Testbed.start(self.state_dir, time_scale, port=_port_or_any(old.get("chameleon")),
                                shared_ssh_port=True, site_addresses=True,
                                site_block=block if isinstance(block, int) else None)
        try:
            self.gce = self.tb.gce(port=_port_or_any(old.get("gce")))
            self.aws = self.tb.aws(port=_port_or_any(old.get("aws")))
        except BaseException:
            self.tb.stop()
            raise
        self.tb.slow_ssh_polls(0.25)  # a node answers SSH at most 0.25 s after it became reachable
        self.ports = {"chameleon": self.tb.port, "gce": self.gce.port,
                      "aws": int(self.aws.endpoint.rsplit(":", 1)[1]), "ssh": self._ssh_port()}

    def _ssh_port(self) -> int:
        """22 when this world's floating IPs answer there (`labctl.testbed.ssh_port22`), else the world's port."""
        from labctl.testbed import ssh_port22

        return ssh_port22.PORT if ssh_port22.held_by(self.state_dir) else int(self.tb.ssh_port or 0)

    def settings(self, site: str = "chi@tacc") -> str:
        """Shell lines for each cloud's usual client (secrets included: for the owner's terminal or env.sh)."""
        creds = self.aws.world.credentials  # the EC2 world (its own directory) has its own key pair
        token_file = self.state_dir / TOKEN_FILE
        q = shlex.quote
        gce_url = f"{self.gce.endpoint}/compute/v1/"
        lines = [f"# labctl testbed: world {self.state_dir}",
                 f"# Chameleon ({site}; the openstack CLI, openstacksdk, python-chi):",
                 self.tb.openrc(site).rstrip("\n"),
                 *self._python_chi_notes(),
                 f"# Compute Engine (gcloud; google-cloud-compute with client_options="
                 f"{{'api_endpoint': '{self.gce.endpoint}'}} and the token as a bearer token):",
                 f"#   gcloud config set api_endpoint_overrides/compute {gce_url}",
                 f"#   gcloud config set project {self.gce.project}",
                 f"#   gcloud compute zones list --access-token-file={q(str(token_file))}",
                 "# or, for this shell only:",
                 f"export CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE={gce_url}",
                 f"export CLOUDSDK_CORE_PROJECT={q(self.gce.project)}",
                 f"export CLOUDSDK_AUTH_ACCESS_TOKEN_FILE={q(str(token_file))}",
                 "# EC2 (the aws CLI, boto3), moto behind labctl's front layer:",
                 f"export AWS_ENDPOINT_URL={self.aws.endpoint} AWS_ACCESS_KEY_ID={q(creds.aws_access_key_id)} "
                 f"AWS_SECRET_ACCESS_KEY={q(creds.aws_secret_access_key)} AWS_DEFAULT_REGION={AWS_REGION}",
                 f"# SSH: emulated nodes answer on port {self.ports['ssh']} of their addresses "
                 "(`labctl ssh LAB` uses it)"]
        return "\n".join(lines) + "\n"

    def _python_chi_notes(self) -> list[str]:
        """How python-chi finds each site: sites.json (CHI_RESOURCE_API_URL, exported above) names each site's
        own address, and use_site() authenticates at port 5000 there."""
        if self.tb.site_block is None:
            return ["# python-chi: no loopback block had port 5000 free for the sites' own addresses, so",
                    "#   chi.use_site() cannot work here; chi.set('auth_url', $OS_AUTH_URL) after it instead"]
        return ["# python-chi: chi.use_site('CHI@TACC'), 'CHI@UC' or 'CHI@Edge' (sites.json at $CHI_RESOURCE_API_URL;",
                "#   Keystone on port 5000 of each site's own address). KVM@TACC's address is built into python-chi:",
                f"#   after chi.use_site('KVM@TACC'), chi.set('auth_url', '{self.tb.auth_url('kvm@tacc')}')"]

    def publish(self, site: str) -> None:
        """Write gce-token, env.sh and serve.json (0600), in that order: serve.json says the rest is there."""
        _write_private_text(self.state_dir / TOKEN_FILE, self.gce.token)
        _write_private_text(self.state_dir / ENV_FILE, self.settings(site))
        _write_private_json(self.state_dir / SERVE_FILE, {
            "pid": os.getpid(), "ports": self.ports, "site_block": self.tb.site_block, "started": time.time(),
            "site": site,
            "world": str(self.state_dir)})

    def stop(self) -> None:
        try:
            self.tb.stop()  # the other clouds' endpoints and SSH sides with it; the moto daemon stays
        finally:
            info = recorded(self.state_dir)
            if info.get("pid") == os.getpid():
                info.pop("pid", None)  # the ports stay, for the next start
                _write_private_json(self.state_dir / SERVE_FILE, info)


def serve(state_dir: Path, site: str, time_scale: float | None = None, *, out: Any = None,
          stop: threading.Event | None = None) -> None:
    """Serve the world until SIGTERM, Ctrl-C or `stop`; print the settings on `out` (None: only say where
    env.sh is, on stderr: a background server's output is a log). Raises AlreadyServing."""
    from labctl.testbed.access import private_dir

    state_dir = private_dir(Path(state_dir).expanduser())
    stop = stop or threading.Event()
    with _flock(state_dir / SERVE_LOCK, blocking=False):
        served = Served(state_dir, time_scale)
        old_term = None
        try:
            served.publish(site)
            if threading.current_thread() is threading.main_thread():
                old_term = signal.signal(signal.SIGTERM, lambda *_: stop.set())
            ports = " ".join(f"{k}={v}" for k, v in served.ports.items())
            note = f"# labctl testbed serving (pid {os.getpid()}; ports {ports}); settings: {state_dir / ENV_FILE}"
            if out is not None:
                out.write(served.settings(site))
                out.flush()
            print(note, file=sys.stderr, flush=True)
            while not stop.wait(1.0):
                pass
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            served.stop()


# -- the background lifecycle ------------------------------------------------------------------------
def start(state_dir: Path, site: str = "chi@tacc", timeout: float = 120.0) -> tuple[dict[str, Any], bool]:
    """Start a detached server for the world unless one runs; return (serve.json, whether it ran already)."""
    from labctl.testbed.access import private_dir, private_file

    state_dir = private_dir(Path(state_dir).expanduser())
    with _flock(state_dir / START_LOCK):
        info = running(state_dir)
        if info is not None:
            return info, True
        if _lock_held(state_dir):  # a foreground `serve` still starting up
            return _wait_running(state_dir, None, timeout), True
        log_path = private_file(state_dir / SERVE_LOG)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "labctl.testbed.serve", "--state-dir", str(state_dir), "--site", site],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
                cwd=str(state_dir))
        try:
            return _wait_running(state_dir, proc, timeout), False
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise
        finally:
            proc.returncode = proc.returncode if proc.returncode is not None else 0  # detached: not ours to wait


def _wait_running(state_dir: Path, proc: subprocess.Popen | None, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = running(state_dir)
        if info is not None and (proc is None or info.get("pid") == proc.pid):
            return info
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the testbed server exited with {proc.returncode}: {_log_tail(state_dir)}")
        time.sleep(0.1)
    raise RuntimeError(f"the testbed did not answer within {timeout:.0f}s (see {Path(state_dir) / SERVE_LOG})")


def _log_tail(state_dir: Path, n: int = 5) -> str:
    try:
        lines = (Path(state_dir) / SERVE_LOG).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:])


def stop(state_dir: Path, timeout: float = 20.0) -> tuple[int | None, bool]:
    """Stop the world's server (SIGTERM, then SIGKILL after `timeout`) and its moto daemon. Returns (the
    server's pid if one ran, whether a moto daemon ran). Idempotent."""
    state_dir = Path(state_dir).expanduser()
    info = recorded(state_dir)
    pid = int(info.get("pid") or 0)
    stopped = None
    if _ours(pid):
        stopped = pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _ours(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while _ours(pid) and time.monotonic() < deadline + 5:
                time.sleep(0.05)
    info = recorded(state_dir)
    if "pid" in info:
        info.pop("pid")
        _write_private_json(state_dir / SERVE_FILE, info)
    moto = False
    if (state_dir / "aws" / "moto.json").exists():
        from labctl.testbed.aws.daemon import stop_moto

        moto = stop_moto(state_dir / "aws")
    return stopped, moto


def status(state_dir: Path) -> dict[str, Any]:
    """{"running", "pid", "ports", "world", "env_file", "log"} for `labctl testbed status`."""
    state_dir = Path(state_dir).expanduser()
    info = running(state_dir)
    seen = info or recorded(state_dir)
    return {"running": info is not None, "pid": info.get("pid") if info else None,
            "ports": seen.get("ports") or {}, "world": str(state_dir),
            "env_file": str(state_dir / ENV_FILE) if info else None, "log": str(state_dir / SERVE_LOG)}


def main(argv: list[str] | None = None) -> int:
    """`python -m labctl.testbed.serve --state-dir D [--site S]`: what `labctl testbed start` runs detached."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m labctl.testbed.serve")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--site", default="chi@tacc")
    args = parser.parse_args(argv)
    os.umask(0o077)
    try:
        serve(Path(args.state_dir), args.site)
    except AlreadyServing as e:
        print(f"labctl testbed: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
