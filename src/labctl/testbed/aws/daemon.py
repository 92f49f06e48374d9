"""The moto daemon: one moto server process per state dir, started detached on first use (`ensure_moto`),
found again through `moto.json` (`moto_info`), stopped by `stop_moto`, exiting by itself when idle; and the
AMI catalogue it is given."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from labctl.testbed.access import private_dir, private_file, world_credentials
from labctl.testbed.aws.common import (
    AMAZON,
    AMIS_FILE,
    CANONICAL,
    MOTO_ENV,
    MOTO_FILE,
    MOTO_IDLE_SECONDS,
    MOTO_KEY_HEADER,
    MOTO_LOCK,
    MOTO_LOG,
    error_xml,
    isolated_session,
    log,
    with_moto_key,
)

# (name, owner, description, architecture, creation date) — real names; ids are derived from the names.
_IMAGES = (
    ("ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20240423", CANONICAL,
     "Canonical, Ubuntu, 24.04 LTS, amd64 noble image build on 2024-04-23", "x86_64", "2024-04-23T19:36:34.000Z"),
    ("ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20250610", CANONICAL,
     "Canonical, Ubuntu, 24.04, amd64 noble image", "x86_64", "2025-06-10T07:19:48.000Z"),
    ("ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-arm64-server-20250610", CANONICAL,
     "Canonical, Ubuntu, 24.04, arm64 noble image", "arm64", "2025-06-10T07:20:02.000Z"),
    ("ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-20250516", CANONICAL,
     "Canonical, Ubuntu, 22.04 LTS, amd64 jammy image build on 2025-05-16", "x86_64", "2025-05-16T06:44:11.000Z"),
    ("Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) 20250214", AMAZON,
     "Supported EC2 instances: G4dn, G5, G6, Gr6, G6e, P4, P4de, P5, P5e, P5en. PyTorch-2.5, TensorFlow-2.18.",
     "x86_64", "2025-02-14T23:10:51.000Z"),
    ("Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) 20250523", AMAZON,
     "Supported EC2 instances: G4dn, G5, G6, Gr6, G6e, P4, P4de, P5, P5e, P5en, P6-B200.",
     "x86_64", "2025-05-23T18:02:40.000Z"),
    ("Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) 20250523", AMAZON,
     "Supported EC2 instances: G4dn, G5, G6, Gr6, G6e, P4, P4de, P5, P5e, P5en, P6-B200.",
     "x86_64", "2025-05-23T17:58:12.000Z"),
)


def seed_images() -> list[dict[str, Any]]:
    """The AMI catalogue moto starts with (the format of moto's `MOTO_AMIS_PATH`)."""
    out = []
    for name, owner, description, arch, created in _IMAGES:
        ami_id = "ami-0" + hashlib.sha256(name.encode()).hexdigest()[:16]
        out.append({
            "ami_id": ami_id, "name": name, "description": description, "owner_id": owner, "public": True,
            "virtualization_type": "hvm", "architecture": arch, "state": "available", "platform": None,
            "image_type": "machine", "hypervisor": "xen", "root_device_name": "/dev/sda1",
            "root_device_type": "ebs", "sriov": "simple", "creation_date": created,
            "image_location": f"amazon/{name}" if owner == AMAZON else f"{owner}/{name}",
        })
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is not alive
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    with contextlib.suppress(OSError):  # pid reuse: it must be our daemon
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"labctl.testbed.aws" in cmdline
    return True


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", int(port))) == 0


def moto_info(state_dir: Path) -> dict[str, Any] | None:
    """The running moto daemon of `state_dir` ({"pid", "port", "started"}), or None."""
    try:
        info = json.loads((Path(state_dir) / MOTO_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not pid_alive(int(info.get("pid", 0))) or not _port_open(info["port"]):
        return None
    return info


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes *and* threads (each call opens its own file description)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


_children: dict[int, subprocess.Popen] = {}


def ensure_moto(state_dir: Path, timeout: float = 90.0) -> dict[str, Any]:
    """The moto daemon of `state_dir`, started (detached, on 127.0.0.1) if none is alive."""
    state_dir = private_dir(Path(state_dir))
    info = moto_info(state_dir)
    if info is not None:
        return info
    with file_lock(state_dir / MOTO_LOCK):
        try:
            old = json.loads((state_dir / MOTO_FILE).read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and pid_alive(int(old.get("pid", 0))):
            # Alive but not answering: give a busy daemon time before replacing it.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if _port_open(old["port"]):
                    return old
                time.sleep(0.2)
            log.warning("moto daemon %s does not answer on port %s; replacing it", old["pid"], old["port"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(old["pid"]), 9)
        with contextlib.suppress(FileNotFoundError):
            (state_dir / MOTO_FILE).unlink()
        amis = private_file(state_dir / AMIS_FILE)
        amis.write_text(json.dumps(seed_images(), indent=1))
        world_credentials(state_dir)  # the daemon's key, created before the daemon reads it
        env = dict(os.environ, **MOTO_ENV, MOTO_AMIS_PATH=str(amis))
        with open(private_file(state_dir / MOTO_LOG), "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "labctl.testbed.aws", "moto", str(state_dir)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env, start_new_session=True,
                close_fds=True, cwd=str(state_dir),
            )
        _children[proc.pid] = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (state_dir / MOTO_LOG).read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"the moto server exited with {proc.returncode}: {' | '.join(tail)}")
            info = moto_info(state_dir)
            if info is not None and info.get("pid") == proc.pid:
                log.debug("started moto (pid %s) on 127.0.0.1:%s", proc.pid, info["port"])
                return info
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"the moto server did not start within {timeout:.0f}s (see {state_dir / MOTO_LOG})")


def stop_moto(state_dir: Path, timeout: float = 10.0) -> bool:
    """Stop the moto daemon of `state_dir` (True if one was running). Its in-memory state is lost."""
    state_dir = Path(state_dir)
    path = state_dir / MOTO_FILE
    try:
        info = json.loads(path.read_text())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    if not pid_alive(pid):
        _reap(pid)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    proc = _children.pop(pid, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
        if proc.returncode is None:
            _children[pid] = proc


def _idle_seconds() -> float:
    try:
        return float(os.environ.get("LABCTL_MOTO_IDLE_SECONDS") or MOTO_IDLE_SECONDS)
    except ValueError:
        return MOTO_IDLE_SECONDS


def in_use() -> str | None:
    """What this moto process holds that a deployment may still need (an instance not terminated, a volume, a
    VPC or security group of its own, a key pair, an Elastic IP, a bucket), in a few words; None when nothing.
    Read in the daemon's own process, from moto's backends: no request, so asking does not count as use."""
    from moto.ec2.models import ec2_backends
    from moto.s3.models import s3_backends

    try:
        for by_region in list(dict.values(ec2_backends)):
            for region, ec2 in list(dict.items(by_region)):
                if any(i.state != "terminated" for r in list(ec2.reservations.values()) for i in r.instances):
                    return f"instances in {region}"
                for what, items in (("volumes", ec2.volumes), ("key pairs", ec2.key_pairs),
                                    ("Elastic IPs", ec2.addresses)):
                    if items:
                        return f"{what} in {region}"
                if any(not v.is_default for v in list(ec2.vpcs.values())):
                    return f"VPCs in {region}"
                if any(g.name != "default" for by_vpc in list(ec2.groups.values()) for g in list(by_vpc.values())):
                    return f"security groups in {region}"
        for by_partition in list(dict.values(s3_backends)):
            if any(s3.buckets for s3 in list(dict.values(by_partition))):
                return "S3 buckets"
    except RuntimeError:  # a request changed a dict while it was read: in use right now
        return "a request in flight"
    return None


def _guard(app: Any, key: str, seen: list[float]) -> Any:
    """moto's WSGI app, answering only requests that carry the world's moto key (the front layer's, after it
    checked the client's signature; the world's own clients'): another local user gets a 401 AuthFailure."""
    from labctl.testbed.access import same_secret

    def guarded(environ: dict, start_response: Any) -> Any:
        seen[0] = time.monotonic()
        if not same_secret(environ.get("HTTP_" + MOTO_KEY_HEADER.upper().replace("-", "_")), key):
            body = error_xml("AuthFailure", "AWS was not able to validate the provided access credentials")
            start_response("401 Unauthorized", [("Content-Type", "text/xml;charset=UTF-8"),
                                                ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    return guarded


def _say(line: str) -> None:
    """One line in moto.log (the daemon's stderr), with the time and pid."""
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} labctl moto daemon {os.getpid()}: {line}\n")
    sys.stderr.flush()


def moto_main(state_dir: Path) -> None:
    """The daemon: moto's threaded server on 127.0.0.1 behind the world's key, warmed up, published in moto.json.

    It exits when moto.json no longer names it (stop_moto, or the state dir was removed), or once it has had
    no request for `LABCTL_MOTO_IDLE_SECONDS` (default 15 min) and holds nothing a deployment could need
    (`in_use`): after `labctl down` of the last sim-aws lab it goes by itself; while one is up it stays.
    """
    os.umask(0o077)  # everything the daemon writes is its owner's alone
    for key, value in MOTO_ENV.items():  # must be set before moto is imported
        os.environ.setdefault(key, value)
    os.environ.setdefault("MOTO_AMIS_PATH", str(state_dir / AMIS_FILE))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    creds = world_credentials(state_dir)
    seen = [time.monotonic()]
    app = _guard(DomainDispatcherApplication(create_backend_app), creds.moto_key, seen)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, name="moto", daemon=True).start()
    host, port = server.server_address[:2]
    # The first EC2 call of a region initialises moto's backend (about 2 s): pay it here, once.
    warm = isolated_session("us-east-1", creds.aws_access_key_id, creds.aws_secret_access_key).client(
        "ec2", endpoint_url=f"http://{host}:{port}")
    with_moto_key(warm, creds.moto_key).describe_availability_zones()
    path = state_dir / MOTO_FILE
    info = {"pid": os.getpid(), "port": port, "started": time.time(), "generation": uuid.uuid4().hex}
    tmp = path.with_name(f".{MOTO_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)
    idle = _idle_seconds()
    said = None
    while True:
        time.sleep(min(2.0, idle / 4))
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            current = None
        idle_for = time.monotonic() - seen[0]
        # Idle, and holding nothing: the emulated EC2's state lives only in this process, so while a deployment's
        # resources are here it stays (a client that comes after the exit starts a fresh daemon).
        holding = in_use() if idle_for > idle else None
        if holding != said and holding is not None:
            _say(f"no request for {idle_for:.0f}s, staying: it holds {holding}")
        said = holding
        if not current or current.get("pid") != os.getpid() or (idle_for > idle and holding is None):
            if current and current.get("pid") == os.getpid():
                _say(f"no request for {idle_for:.0f}s and nothing held: exiting")
            with contextlib.suppress(OSError, ValueError):
                if current and current.get("pid") == os.getpid():
                    path.unlink()
            server.shutdown()
            os._exit(0)
