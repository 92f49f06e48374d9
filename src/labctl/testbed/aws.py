"""Emulated AWS EC2 for `--site sim-aws` and the tests: moto's server, plus a thin HTTP layer of our own.

moto keeps its state in memory, but labctl runs as many short processes (`up`, `status`, `ssh`, `down`), so
there is **one moto server process per testbed state dir**, started detached on first use on 127.0.0.1
(`<state_dir>/moto.json` records its pid and port; `<state_dir>/moto.lock` makes two racing processes start
only one; `stop_moto(state_dir)` ends it). moto runs with its validation switched on (instance types, AMIs,
key pairs) and with a small AMI catalogue of our own (`MOTO_AMIS_PATH`): Canonical's Ubuntu images and AWS
Deep Learning AMIs under their real names and owner ids, which moto does not ship.

Every labctl process that needs EC2 runs, in-process on an ephemeral 127.0.0.1 port, a front layer
(`start_aws(state_dir)`) that forwards each request to moto and adds what moto lacks. Its state is the SQLite
file `<state_dir>/aws.db` (WAL, short transactions), shared by all processes:

- ``ClientToken`` idempotency: moto ignores the token, so the first successful response per (region, action,
  token) is stored and replayed for a repeat; a repeat with other parameters gets
  ``IdempotentParameterMismatch``. If the process that made an instance died before storing the answer, the
  instance is found in moto by its client token and the answer is rebuilt from it.
- capacity: a limit of running instances per (availability zone, instance type) → ``InsufficientInstanceCapacity``
  (HTTP 500, as EC2 sends it); a vCPU limit per region → ``VcpuLimitExceeded``; a type that the zone does not
  offer (moto's offering data) → ``Unsupported``. A launch without zone goes to the first zone that has room.
- reachability: moto's public IPs (instances' ``ipAddress``, Elastic IPs) are not on this machine and are never
  connected to. Every one is mapped to a loopback address ``127.20.<n>.<m>`` in responses (DNS names too) and
  back in requests, so labctl only ever sees loopback addresses; the SSH side (`labctl.testbed.sshd.SSHNodes`)
  serves each running instance on its loopback address (`AwsWorld.ssh_targets`), and on an internal one
  (``127.12.x.y``) that instances of the same VPC reach by forwarding to its private IP (the `ssh -J` hop).
- the ``client-token`` filter of DescribeInstances (moto crashes on it) is applied here;
- refusals moto lacks (`AwsWorld.check_request`): attaching a volume that is attached already or in another zone,
  deleting a VPC with a gateway or security groups left, a subnet with interfaces in it; DetachVolume without
  InstanceId (moto crashes on it);
- boot time: with `set_boot_seconds(s)` new instances say ``pending`` for s seconds (moto: ``running`` at once);
- a request log and fault injection (``error503``, ``throttle`` = RequestLimitExceeded, ``hang_after``,
  ``timeout_after``) for tests.

Other protocols (JSON/REST services such as SSM or STS, and S3: path-style requests, HEAD included, with moto's
answer headers) are passed through to moto unchanged; `claim_bucket(name)` makes an S3 bucket name another
account's.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from labctl.testbed.access import private_dir, private_file, world_credentials
from labctl.testbed.http import MAX_JSON_BODY, MAX_OBJECT_BODY, EmulatorHandler
from labctl.testbed.sqlite_world import SqliteWorld, free_port, internal_addresses

log = logging.getLogger(__name__)

MOTO_FILE = "moto.json"
MOTO_LOCK = "moto.lock"
MOTO_LOG = "moto.log"
AMIS_FILE = "moto-amis.json"
DB_FILE = "aws.db"
LOOPBACK_PREFIX = "127.20"
INTERNAL_PREFIX = "127.12"  # each running instance's own address, reached only through a jump host
FAULT_KINDS = ("error503", "throttle", "hang_after", "timeout_after")
_FAULT_ALIASES = {"RequestLimitExceeded": "throttle", "error500": "error503"}
MOTO_ENV = {
    "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true",
    "MOTO_ENABLE_AMI_VALIDATION": "true",
    "MOTO_ENABLE_KEYPAIR_VALIDATION": "true",
}
EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
LIVE_STATES = ("pending", "running")
NOT_TERMINATED = ("pending", "running", "stopping", "stopped", "shutting-down")
HANG_SECONDS = 600.0
MOTO_KEY_HEADER = "X-Labctl-Moto-Key"  # what the front layer (and the world's own clients) show the moto daemon
MOTO_IDLE_SECONDS = 12 * 3600.0  # the daemon exits after this long without a request (LABCTL_MOTO_IDLE_SECONDS)

CANONICAL = "099720109477"
AMAZON = "898082745236"  # the account that publishes the AWS Deep Learning AMIs (alias "amazon")

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


def isolated_session(region: str, access_key_id: str, secret_access_key: str) -> Any:
    """A boto3 session with these keys (an emulated world's: `AwsWorld.session`) that reads none of the user's
    AWS settings (AWS_PROFILE, ~/.aws/config and credentials), so a stray profile cannot break or redirect it."""
    import boto3
    import botocore.session

    unset = (None, None, None, None)
    core = botocore.session.Session(session_vars={
        "profile": unset,
        "config_file": (None, None, "/nonexistent/labctl-aws-config", None),
        "credentials_file": (None, None, "/nonexistent/labctl-aws-credentials", None),
    })
    return boto3.session.Session(botocore_session=core, region_name=region, aws_access_key_id=access_key_id,
                                 aws_secret_access_key=secret_access_key)


def with_moto_key(client: Any, key: str) -> Any:
    """`client` (boto3, straight to the moto daemon) sending the daemon's key with every request."""
    def add_key(request: Any, **_: Any) -> None:
        request.headers[MOTO_KEY_HEADER] = key

    client.meta.events.register("before-send", add_key)
    return client


# ------------------------------------------------------------------------------------------ moto daemon


def _pid_alive(pid: int) -> bool:
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
    if not isinstance(info, dict) or not _pid_alive(int(info.get("pid", 0))) or not _port_open(info["port"]):
        return None
    return info


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
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
    with _file_lock(state_dir / MOTO_LOCK):
        try:
            old = json.loads((state_dir / MOTO_FILE).read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and _pid_alive(int(old.get("pid", 0))):
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
    if not _pid_alive(pid):
        _reap(pid)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not _pid_alive(pid):
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


def _moto_main(state_dir: Path) -> None:
    """The daemon: moto's threaded server on 127.0.0.1 behind the world's key, warmed up, published in moto.json.

    It exits when moto.json no longer names it (stop_moto, or the state dir was removed), or after
    `LABCTL_MOTO_IDLE_SECONDS` (default 12 h) without a request: it does not outlive its use indefinitely.
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
    while True:
        time.sleep(min(2.0, idle / 4))
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            current = None
        if not current or current.get("pid") != os.getpid() or time.monotonic() - seen[0] > idle:
            with contextlib.suppress(OSError, ValueError):
                if current and current.get("pid") == os.getpid():
                    path.unlink()
            server.shutdown()
            os._exit(0)


# ------------------------------------------------------------------------------------------ the world

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ips (real TEXT PRIMARY KEY, loop TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS tokens (generation TEXT NOT NULL, region TEXT NOT NULL, action TEXT NOT NULL,
    token TEXT NOT NULL, params_hash TEXT NOT NULL, status INTEGER NOT NULL, body BLOB NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (generation, region, action, token));
CREATE TABLE IF NOT EXISTS capacity (zone TEXT NOT NULL, itype TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (zone, itype));
CREATE TABLE IF NOT EXISTS keys (region TEXT NOT NULL, name TEXT NOT NULL, public_key TEXT NOT NULL,
    PRIMARY KEY (region, name));
CREATE TABLE IF NOT EXISTS launches (instance_id TEXT PRIMARY KEY, region TEXT NOT NULL, launched REAL NOT NULL,
    keys TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS regions (region TEXT PRIMARY KEY);
"""

# Parameters left out of the request log summary (long or secret) and of the idempotency hash.
_NOT_LOGGED = {"Action", "Version", "PublicKeyMaterial", "UserData"}
_IPV4 = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])")
_IPV4_DASHED = re.compile(r"(?:(?<=ec2-)|(?<=ip-))(\d{1,3}(?:-\d{1,3}){3})(?![\d-])")  # DNS names
_PUBLIC_IP_TAGS = re.compile(r"<(ipAddress|publicIp|carrierIp)>([\d.]+)</\1>")
_LOOP = re.compile(rf"^{re.escape(LOOPBACK_PREFIX)}\.\d{{1,3}}\.\d{{1,3}}$")
_REGION = re.compile(r"Credential=[^/,\s]+/\d{8}/([a-z0-9-]+)/")
_SERVICE = re.compile(r"Credential=[^/,\s]+/\d{8}/[a-z0-9-]+/([a-z0-9-]+)/")


def _loop_address(seq: int) -> str:
    hi, lo = divmod(seq, 245)
    if hi > 255:
        raise RuntimeError("the emulated AWS ran out of loopback addresses")
    return f"{LOOPBACK_PREFIX}.{hi}.{10 + lo}"


def error_xml(code: str, message: str, s3: bool = False) -> bytes:
    """EC2's error document (what botocore's EC2 parser reads), or S3's with `s3`."""
    if s3:
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{_esc(code)}</Code>'
                f"<Message>{_esc(message)}</Message><RequestId>{uuid.uuid4()}</RequestId></Error>").encode()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        f"<Code>{_esc(code)}</Code><Message>{_esc(message)}</Message></Error></Errors>"
        f"<RequestID>{uuid.uuid4()}</RequestID></Response>"
    ).encode()


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _tags(items: list[dict] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in items or []}


class AwsWorld(SqliteWorld):
    """The emulated EC2's shared state (`<state_dir>/aws.db`) and its control API for tests and SSH."""

    def __init__(self, state_dir: Path, ssh_port: int | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(self.state_dir / DB_FILE, _SCHEMA)
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()
        self._ip_cache: dict[str, str] = {}  # real -> loop
        self._loop_cache: dict[str, str] = {}  # loop -> real
        self._static: dict[tuple, Any] = {}  # offerings, vCPUs, subnet zones (never change)
        self._targets_cache: tuple[float, list[dict]] | None = None
        self._moto: dict[str, Any] | None = None
        self._init(ssh_port)

    def __repr__(self) -> str:
        return f"AwsWorld({str(self.state_dir)!r})"

    # -- storage (connections: `SqliteWorld`) --------------------------------------------------------
    def _tx(self, mode: str = "IMMEDIATE"):
        return self._transaction(mode)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._conn().execute(sql, args).fetchall()

    def _init(self, ssh_port: int | None) -> None:
        with self._tx() as db:
            if not db.execute("SELECT 1 FROM meta WHERE key='ssh_port'").fetchone():
                db.execute("INSERT INTO meta (key, value) VALUES ('ssh_port', ?)", (str(ssh_port or free_port()),))
                db.execute("INSERT INTO meta (key, value) VALUES ('created', ?)", (str(time.time()),))

    def _meta(self, key: str, default: str | None = None) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else default

    @property
    def ssh_port(self) -> int:
        return int(self._meta("ssh_port"))

    @property
    def credentials(self) -> Any:
        """This world's own credentials (`labctl.testbed.access`): only its access key opens the front layer,
        only its moto key the moto daemon."""
        return world_credentials(self.state_dir)

    def session(self, region: str) -> Any:
        """A boto3 session with this world's access key (none of the user's AWS settings)."""
        creds = self.credentials
        return isolated_session(region, creds.aws_access_key_id, creds.aws_secret_access_key)

    # -- moto --------------------------------------------------------------------------------------
    def moto(self) -> dict[str, Any]:
        """The moto daemon's {"pid", "port", "generation"}; (re)started if it is not alive."""
        info = self._moto
        if info is None or not _pid_alive(int(info["pid"])):
            info = ensure_moto(self.state_dir)
            if self._moto is not None and info.get("generation") != self._moto.get("generation"):
                with self._clients_lock:
                    self._clients.clear()
            self._moto = info
        return info

    @property
    def moto_url(self) -> str:
        return f"http://127.0.0.1:{self.moto()['port']}"

    def client(self, region: str) -> Any:
        """A boto3 EC2 client straight to moto (internal look-ups: not logged, no faults, real IPs)."""
        url = self.moto_url
        with self._clients_lock:
            cli = self._clients.get(region)
            if cli is None or cli.meta.endpoint_url != url:
                from botocore.config import Config

                cli = with_moto_key(self.session(region).client(
                    "ec2", endpoint_url=url,
                    config=Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=60)),
                    self.credentials.moto_key)
                self._clients[region] = cli
            return cli

    def s3_client(self, region: str) -> Any:
        """A boto3 S3 client straight to moto (path-style addressing: the endpoint is 127.0.0.1)."""
        url = self.moto_url
        key = f"s3:{region}"
        with self._clients_lock:
            cli = self._clients.get(key)
            if cli is None or cli.meta.endpoint_url != url:
                from botocore.config import Config

                cli = with_moto_key(self.session(region).client(
                    "s3", endpoint_url=url,
                    config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1, "mode": "standard"},
                                  read_timeout=60)), self.credentials.moto_key)
                self._clients[key] = cli
            return cli

    # -- control API -------------------------------------------------------------------------------
    def set_capacity(self, zone: str, instance_type: str, n: int | None) -> None:
        """At most `n` running instances of `instance_type` in `zone` (None: no limit, the default)."""
        with self._tx() as db:
            if n is None:
                db.execute("DELETE FROM capacity WHERE zone=? AND itype=?", (zone, instance_type))
            else:
                db.execute("INSERT OR REPLACE INTO capacity (zone, itype, n) VALUES (?,?,?)",
                           (zone, instance_type, int(n)))

    def capacity(self, zone: str, instance_type: str) -> int | None:
        rows = self._read("SELECT n FROM capacity WHERE zone=? AND itype=?", (zone, instance_type))
        return int(rows[0][0]) if rows else None

    def set_vcpu_limit(self, n: int | None, region: str | None = None) -> None:
        """The On-Demand vCPU limit of `region` (None: every region); n=None removes it."""
        key = f"vcpu_limit:{region or '*'}"
        with self._tx() as db:
            if n is None:
                db.execute("DELETE FROM meta WHERE key=?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?,?)", (key, str(int(n))))

    def vcpu_limit(self, region: str) -> int | None:
        value = self._meta(f"vcpu_limit:{region}") or self._meta("vcpu_limit:*")
        return int(value) if value is not None else None

    def reset_controls(self) -> None:
        """Back to defaults: no capacity or vCPU limits, no faults, no boot time, no other account's buckets."""
        with self._tx() as db:
            db.execute("DELETE FROM capacity")
            db.execute("DELETE FROM faults")
            db.execute("DELETE FROM meta WHERE key LIKE 'vcpu_limit:%' OR key = 'boot_seconds' "
                       "OR key LIKE 'foreign_bucket:%'")

    def inject_fault(self, action: str, kind: str, count: int = 1) -> None:
        """Make the next `count` requests of `action` ("RunInstances", "*" for any) misbehave.

        kind: error503 (HTTP 503 Unavailable) | throttle (alias RequestLimitExceeded: HTTP 503 throttling) |
        hang_after (forwarded and committed, then no answer ever) | timeout_after (forwarded and committed,
        then the connection is dropped).
        """
        kind = _FAULT_ALIASES.get(kind, kind)
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(FAULT_KINDS)})")
        self.queue_fault(None, action, kind, count)

    def claim_bucket(self, name: str) -> None:
        """Make S3 bucket `name` another account's (names are global): CreateBucket answers BucketAlreadyExists
        (409), every other request on it AccessDenied (403)."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, '1')", (f"foreign_bucket:{name}",))

    def check_s3(self, method: str, url: Any) -> None:
        """S3's answers for a bucket of another account (see `claim_bucket`)."""
        bucket = url.path.lstrip("/").split("/", 1)[0]
        if not bucket or self._meta(f"foreign_bucket:{bucket}") is None:
            return
        if method == "PUT" and url.path.strip("/") == bucket and not url.query:
            raise ApiError(409, "BucketAlreadyExists", "The requested bucket name is not available. The bucket "
                           "namespace is shared by all users of the system. Please select a different name and try "
                           "again.")
        raise ApiError(403, "AccessDenied", "Access Denied")

    def take_fault(self, action: str) -> str | None:
        fault = self.pop_fault(None, [action])
        return fault[0] if fault else None

    def log_request(self, region: str | None, action: str, params: dict[str, str]) -> int:
        summary = " ".join(f"{k}={v[:80]}" for k, v in sorted(params.items()) if k not in _NOT_LOGGED)
        return self.record_request(region, None, None, summary, action)

    def request_log(self, detail: bool = False) -> list:
        """Every request the front layers served, in order: (action, params summary). With detail=True,
        dicts with ts, region, action, summary and the HTTP status (None if no answer was sent)."""
        rows = self.logged_requests()
        if detail:
            return [{"ts": r["ts"], "region": r["scope"], "action": r["operation"], "summary": r["query"],
                     "status": r["status"]} for r in rows]
        return [(r["operation"], r["query"]) for r in rows]

    def regions(self) -> list[str]:
        return [r[0] for r in self._read("SELECT region FROM regions ORDER BY region")]

    def note_region(self, region: str) -> None:
        if region not in self._static.setdefault(("regions",), set()):
            with self._tx() as db:
                db.execute("INSERT OR IGNORE INTO regions (region) VALUES (?)", (region,))
            self._static[("regions",)].add(region)

    # -- public IP <-> loopback -----------------------------------------------------------------------
    def loopback_for(self, real: str) -> str:
        loop = self._ip_cache.get(real)
        if loop is not None:
            return loop
        rows = self._read("SELECT loop FROM ips WHERE real=?", (real,))
        if not rows:
            with self._tx() as db:
                row = db.execute("SELECT loop FROM ips WHERE real=?", (real,)).fetchone()
                if row is None:
                    seq = int(db.execute("SELECT COUNT(*) FROM ips").fetchone()[0])
                    loop = _loop_address(seq)
                    db.execute("INSERT INTO ips (real, loop) VALUES (?,?)", (real, loop))
                    rows = [(loop,)]
                else:
                    rows = [row]
        loop = rows[0][0]
        self._ip_cache[real] = loop
        self._loop_cache[loop] = real
        return loop

    def real_for(self, loop: str) -> str | None:
        real = self._loop_cache.get(loop)
        if real is None:
            rows = self._read("SELECT real FROM ips WHERE loop=?", (loop,))
            if rows:
                real = rows[0][0]
                self._loop_cache[loop] = real
                self._ip_cache[real] = loop
        return real

    def _known_reals(self, candidates: set[str]) -> dict[str, str]:
        out = {ip: self._ip_cache[ip] for ip in candidates if ip in self._ip_cache}
        missing = [ip for ip in candidates if ip not in out]
        if missing:
            marks = ",".join("?" * len(missing))
            for real, loop in self._read(f"SELECT real, loop FROM ips WHERE real IN ({marks})", tuple(missing)):
                out[real] = loop
                self._ip_cache[real] = loop
                self._loop_cache[loop] = real
        return out

    def map_response(self, body: bytes) -> bytes:
        """Replace every public IP moto handed out (and DNS names made of it) by its loopback address."""
        if not body:
            return body
        text = body.decode("utf-8", errors="surrogateescape")
        for _, ip in _PUBLIC_IP_TAGS.findall(text):
            if ip and not ip.startswith(("10.", "192.168.")):
                self.loopback_for(ip)
        quads = set(_IPV4.findall(text))
        dashed = {d.replace("-", ".") for d in _IPV4_DASHED.findall(text)}
        known = self._known_reals(quads | dashed)
        if not known:
            return body
        text = _IPV4.sub(lambda m: known.get(m.group(1), m.group(1)), text)
        text = _IPV4_DASHED.sub(
            lambda m: known[m.group(1).replace("-", ".")].replace(".", "-")
            if m.group(1).replace("-", ".") in known else m.group(1), text)
        return text.encode("utf-8", errors="surrogateescape")

    def map_public(self, ip: str | None) -> str | None:
        return self.loopback_for(ip) if ip else ip

    def unmap_params(self, params: dict[str, str]) -> dict[str, str]:
        out = {}
        for k, v in params.items():
            if _LOOP.match(v):
                v = self.real_for(v) or v
            out[k] = v
        return out

    # -- key pairs -------------------------------------------------------------------------------------
    def record_key(self, region: str, name: str, material_b64: str) -> None:
        try:
            line = base64.b64decode(material_b64).decode().strip()
        except (ValueError, UnicodeDecodeError):
            line = material_b64.strip()
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO keys (region, name, public_key) VALUES (?,?,?)", (region, name, line))

    def key_line(self, region: str, name: str) -> str | None:
        rows = self._read("SELECT public_key FROM keys WHERE region=? AND name=?", (region, name))
        return rows[0][0] if rows else None

    def record_launch(self, region: str, params: dict[str, str], body: bytes) -> None:
        """Remember when each new instance was launched and which keys it accepts (the key pair's line as
        imported, plus `ssh_authorized_keys` of cloud-config user data)."""
        keys = []
        if params.get("KeyName") and (line := self.key_line(region, params["KeyName"])):
            keys.append(line)
        keys += _cloud_config_keys(params.get("UserData"))
        ids = re.findall(r"<instanceId>(i-[0-9a-f]+)</instanceId>", body.decode(errors="replace"))
        now = time.time()
        with self._tx() as db:
            for iid in ids:
                db.execute("INSERT OR IGNORE INTO launches (instance_id, region, launched, keys) VALUES (?,?,?,?)",
                           (iid, region, now, json.dumps(keys)))

    def instance_keys(self, instance_id: str) -> list[str] | None:
        rows = self._read("SELECT keys FROM launches WHERE instance_id=?", (instance_id,))
        return json.loads(rows[0][0]) if rows else None

    # -- boot time ---------------------------------------------------------------------------------------
    def set_boot_seconds(self, seconds: float) -> None:
        """New instances say `pending` for this long after launch (moto says `running` at once; default 0)."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('boot_seconds', ?)", (str(float(seconds)),))

    def boot_seconds(self) -> float:
        return float(self._meta("boot_seconds", "0") or 0)

    def booting(self) -> set[str]:
        """Instances launched less than boot_seconds ago."""
        boot = self.boot_seconds()
        if boot <= 0:
            return set()
        rows = self._read("SELECT instance_id FROM launches WHERE launched > ?", (time.time() - boot,))
        return {r[0] for r in rows}

    def apply_boot(self, body: bytes) -> bytes:
        """Show instances that are still booting as `pending` (DescribeInstances, RunInstances answers)."""
        booting = self.booting()
        if not booting or not any(i.encode() in body for i in booting):
            return body
        import xml.etree.ElementTree as ET

        ns = EC2_NS.rstrip("/")
        ET.register_namespace("", ns)
        root = ET.fromstring(body)
        for item in root.iter(f"{{{ns}}}item"):
            iid = item.findtext(f"{{{ns}}}instanceId")
            state = item.find(f"{{{ns}}}instanceState")
            if iid in booting and state is not None and state.findtext(f"{{{ns}}}name") == "running":
                state.find(f"{{{ns}}}code").text = "0"
                state.find(f"{{{ns}}}name").text = "pending"
        return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)

    # -- EC2 facts (from moto's data) ------------------------------------------------------------------
    def offered_zones(self, region: str, itype: str) -> list[str]:
        key = ("offer", region, itype)
        if key not in self._static:
            res = self.client(region).describe_instance_type_offerings(
                LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": [itype]}])
            self._static[key] = sorted(o["Location"] for o in res["InstanceTypeOfferings"])
        return self._static[key]

    def zones(self, region: str) -> list[str]:
        key = ("zones", region)
        if key not in self._static:
            res = self.client(region).describe_availability_zones()
            self._static[key] = sorted(z["ZoneName"] for z in res["AvailabilityZones"])
        return self._static[key]

    def vcpus(self, region: str, itype: str) -> int:
        key = ("vcpus", itype)
        if key not in self._static:
            try:
                res = self.client(region).describe_instance_types(InstanceTypes=[itype])
                self._static[key] = int(res["InstanceTypes"][0]["VCpuInfo"]["DefaultVCpus"])
            except Exception:  # noqa: BLE001 - unknown type: moto itself will reject the launch
                return 0
        return self._static[key]

    def subnet_zone(self, region: str, subnet_id: str) -> str | None:
        key = ("subnet", region, subnet_id)
        if key not in self._static:
            try:
                res = self.client(region).describe_subnets(SubnetIds=[subnet_id])
            except Exception:  # noqa: BLE001 - moto answers the launch with the real error
                return None
            self._static[key] = res["Subnets"][0]["AvailabilityZone"]
        return self._static[key]

    def _instances(self, region: str, states: tuple[str, ...] | None = None) -> list[dict]:
        kwargs: dict[str, Any] = {}
        if states:
            kwargs["Filters"] = [{"Name": "instance-state-name", "Values": list(states)}]
        out = []
        for page in self.client(region).get_paginator("describe_instances").paginate(**kwargs):
            for r in page["Reservations"]:
                out.extend(r["Instances"])
        return out

    # -- RunInstances with capacity and idempotency ------------------------------------------------------
    def run_instances(self, region: str, params: dict[str, str], forward) -> tuple[int, bytes]:
        """Check token, offering, vCPU limit and capacity, then let `forward(params)` launch."""
        token = params.get("ClientToken")
        generation = self.moto()["generation"]
        digest = _params_hash(params)
        with _file_lock(self.state_dir / "run.lock"):
            if token:
                stored = self._stored(generation, region, "RunInstances", token)
                if stored is not None:
                    return self._replay(stored, digest, token)
                rebuilt = self._rebuild_from_moto(region, token)
                if rebuilt is not None:
                    self._store(generation, region, "RunInstances", token, digest, 200, rebuilt)
                    return 200, rebuilt
            params = self._place(region, params)
            status, body = forward(params)
            if status == 200:
                if token:
                    self._store(generation, region, "RunInstances", token, digest, status, body)
                self.record_launch(region, params, body)
            return status, body

    def idempotent(self, region: str, action: str, params: dict[str, str], forward) -> tuple[int, bytes]:
        """Any other action that carries a ClientToken: the first success is replayed."""
        token = params["ClientToken"]
        generation = self.moto()["generation"]
        digest = _params_hash(params)
        with _file_lock(self.state_dir / "token.lock"):
            stored = self._stored(generation, region, action, token)
            if stored is not None:
                return self._replay(stored, digest, token)
            status, body = forward(params)
            if status == 200:
                self._store(generation, region, action, token, digest, status, body)
            return status, body

    def _stored(self, generation: str, region: str, action: str, token: str) -> tuple | None:
        rows = self._read("SELECT params_hash, status, body FROM tokens WHERE generation=? AND region=? AND "
                          "action=? AND token=?", (generation, region, action, token))
        return rows[0] if rows else None

    def _store(self, generation: str, region: str, action: str, token: str, digest: str, status: int,
               body: bytes) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO tokens (generation, region, action, token, params_hash, status, "
                       "body, created) VALUES (?,?,?,?,?,?,?,?)",
                       (generation, region, action, token, digest, status, body, time.time()))

    @staticmethod
    def _replay(stored: tuple, digest: str, token: str) -> tuple[int, bytes]:
        if stored[0] != digest:
            raise ApiError(400, "IdempotentParameterMismatch",
                           f"Arguments on this idempotent request are inconsistent with arguments used in "
                           f"previous request(s) with the client token {token}.")
        return int(stored[1]), bytes(stored[2])

    def _rebuild_from_moto(self, region: str, token: str) -> bytes | None:
        """A RunInstances answer rebuilt from moto's reservation holding an instance with this client token
        (moto's own `client-token` filter crashes it, so the reservations are read and matched here)."""
        import xml.etree.ElementTree as ET

        conn = http.client.HTTPConnection("127.0.0.1", self.moto()["port"], timeout=60)
        try:
            body = urlencode({"Action": "DescribeInstances", "Version": "2016-11-15"}).encode()
            conn.request("POST", "/", body=body, headers=_internal_headers(region, self.credentials))
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200 or token.encode() not in data:
            return None
        ns = {"e": EC2_NS.rstrip("/")}
        root = ET.fromstring(data)
        for item in root.iterfind("e:reservationSet/e:item", ns):
            tokens = {t.text for t in item.iterfind("e:instancesSet/e:item/e:clientToken", ns)}
            if token not in tokens:
                continue
            ET.register_namespace("", ns["e"])
            out = ET.Element(f"{{{ns['e']}}}RunInstancesResponse")
            ET.SubElement(out, f"{{{ns['e']}}}requestId").text = str(uuid.uuid4())
            for child in item:
                out.append(child)
            return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(out)
        return None

    def _place(self, region: str, params: dict[str, str]) -> dict[str, str]:
        itype = params.get("InstanceType", "m1.small")
        want = max(1, int(params.get("MinCount", "1") or 1))
        zone = params.get("Placement.AvailabilityZone")
        subnet = params.get("SubnetId") or params.get("NetworkInterface.1.SubnetId")
        if not zone and subnet:
            zone = self.subnet_zone(region, subnet)
        offered = self.offered_zones(region, itype)
        if zone and offered and zone not in offered:
            raise ApiError(400, "Unsupported",
                           f"Your requested instance type ({itype}) is not supported in your requested "
                           f"Availability Zone ({zone}). Please retry your request by not specifying an "
                           f"Availability Zone or choosing {', '.join(offered)}.")
        live = self._instances(region, LIVE_STATES)
        limit = self.vcpu_limit(region)
        if limit is not None:
            used = sum(self.vcpus(region, i["InstanceType"]) for i in live)
            if used + want * self.vcpus(region, itype) > limit:
                raise ApiError(400, "VcpuLimitExceeded",
                               f"You have requested more vCPU capacity than your current vCPU limit of {limit} "
                               "allows for the instance bucket that the specified instance type belongs to. "
                               "Please visit http://aws.amazon.com/contact-us/ec2-request to request an "
                               "adjustment to this limit.")

        def room(z: str) -> int | None:
            cap = self.capacity(z, itype)
            if cap is None:
                return None
            used = sum(1 for i in live if i["InstanceType"] == itype and i["Placement"]["AvailabilityZone"] == z)
            return cap - used

        chosen = zone
        if not chosen:  # EC2 picks a zone: the first that has room
            for z in offered or self.zones(region):
                r = room(z)
                if r is None or r >= want:
                    chosen = z
                    break
            else:
                chosen = (offered or self.zones(region))[0]
            params = {**params, "Placement.AvailabilityZone": chosen}
        r = room(chosen)
        if r is not None and r < want:
            others = [z for z in offered if z != chosen and (room(z) is None or room(z) >= want)]
            hint = (f" You can currently get {itype} capacity by not specifying an Availability Zone in your "
                    f"request or choosing {', '.join(others)}.") if others else ""
            raise ApiError(500, "InsufficientInstanceCapacity",
                           f"We currently do not have sufficient {itype} capacity in the Availability Zone you "
                           f"requested ({chosen}). Our system will be working on provisioning additional "
                           f"capacity.{hint}")
        if r is not None and int(params.get("MaxCount", want) or want) > r:
            params = {**params, "MaxCount": str(r)}  # EC2 launches as many as it can, at least MinCount
        return params

    # -- what moto does not check (answered as EC2 answers) ---------------------------------------------
    def check_request(self, region: str, action: str, params: dict[str, str]) -> dict[str, str]:
        """EC2's refusals that moto lacks, raised as EC2's errors; returns the params to forward.

        - AttachVolume: a volume attached already (VolumeInUse), in another zone than the instance
          (InvalidVolume.ZoneMismatch), or an instance that is not running or stopped (IncorrectState);
        - DetachVolume without InstanceId (moto crashes): the volume's instance; of a detached volume:
          IncorrectState;
        - DeleteVpc while an internet gateway is attached or a security group other than `default` is left, and
          DeleteSubnet while a network interface is in it: DependencyViolation.
        """
        handler = {"AttachVolume": self._check_attach, "DetachVolume": self._check_detach,
                   "DeleteVpc": self._check_delete_vpc, "DeleteSubnet": self._check_delete_subnet}.get(action)
        return handler(self.client(region), params) if handler else params

    @staticmethod
    def _volume(cli: Any, volume_id: str) -> dict | None:
        try:
            vols = cli.describe_volumes(VolumeIds=[volume_id])["Volumes"]
        except Exception:  # noqa: BLE001 - moto answers the request itself with the real error
            return None
        return vols[0] if vols else None

    def _check_attach(self, cli: Any, params: dict[str, str]) -> dict[str, str]:
        vol = self._volume(cli, params.get("VolumeId", ""))
        if vol is None:
            return params
        if vol.get("Attachments"):
            raise ApiError(400, "VolumeInUse", f"{vol['VolumeId']} is already attached to an instance")
        try:
            out = cli.describe_instances(InstanceIds=[params.get("InstanceId", "")])
        except Exception:  # noqa: BLE001
            return params
        instances = [i for r in out["Reservations"] for i in r["Instances"]]
        if not instances:
            return params
        inst = instances[0]
        if inst["State"]["Name"] not in ("running", "stopped"):
            raise ApiError(400, "IncorrectState",
                           f"Instance '{inst['InstanceId']}' is not 'running' or 'stopped'.")
        if inst["Placement"]["AvailabilityZone"] != vol["AvailabilityZone"]:
            raise ApiError(400, "InvalidVolume.ZoneMismatch",
                           f"The volume '{vol['VolumeId']}' is not in the same availability zone as instance "
                           f"'{inst['InstanceId']}'")
        return params

    def _check_detach(self, cli: Any, params: dict[str, str]) -> dict[str, str]:
        vol = self._volume(cli, params.get("VolumeId", ""))
        if vol is None:
            return params
        attached = vol.get("Attachments") or []
        if not attached or (params.get("InstanceId") and params["InstanceId"] not in
                            {a.get("InstanceId") for a in attached}):
            raise ApiError(400, "IncorrectState", f"Volume '{vol['VolumeId']}' is in the '{vol['State']}' state.")
        if not params.get("InstanceId"):
            params = {**params, "InstanceId": attached[0]["InstanceId"]}
        return params

    def _check_delete_vpc(self, cli: Any, params: dict[str, str]) -> dict[str, str]:
        vpc = params.get("VpcId", "")
        gateways = cli.describe_internet_gateways(
            Filters=[{"Name": "attachment.vpc-id", "Values": [vpc]}])["InternetGateways"]
        groups = [g for g in cli.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]}])[
            "SecurityGroups"] if g["GroupName"] != "default"]
        if gateways or groups:
            raise ApiError(400, "DependencyViolation", f"The vpc '{vpc}' has dependencies and cannot be deleted.")
        return params

    def _check_delete_subnet(self, cli: Any, params: dict[str, str]) -> dict[str, str]:
        subnet = params.get("SubnetId", "")
        enis = cli.describe_network_interfaces(
            Filters=[{"Name": "subnet-id", "Values": [subnet]}])["NetworkInterfaces"]
        if enis:
            raise ApiError(400, "DependencyViolation",
                           f"The subnet '{subnet}' has dependencies and cannot be deleted.")
        return params

    # -- views -----------------------------------------------------------------------------------------
    def inventory(self, region: str = "us-east-1") -> dict[str, list[dict]]:
        """What exists in `region`, as labctl would see it (public IPs are loopback addresses):
        instances (not terminated), addresses, security_groups (not `default`), key_pairs; each with tags."""
        cli = self.client(region)
        instances = [{
            "id": i["InstanceId"], "name": _tags(i.get("Tags")).get("Name"), "state": i["State"]["Name"],
            "type": i["InstanceType"], "zone": i["Placement"]["AvailabilityZone"],
            "public_ip": self.map_public(i.get("PublicIpAddress")), "private_ip": i.get("PrivateIpAddress"),
            "key_name": i.get("KeyName"), "client_token": i.get("ClientToken"), "tags": _tags(i.get("Tags")),
        } for i in self._instances(region, NOT_TERMINATED)]
        addresses = [{
            "id": a.get("AllocationId"), "public_ip": self.map_public(a.get("PublicIp")),
            "instance_id": a.get("InstanceId") or None, "association_id": a.get("AssociationId"),
            "tags": _tags(a.get("Tags")),
        } for a in cli.describe_addresses()["Addresses"]]
        groups = [{
            "id": g["GroupId"], "name": g["GroupName"], "vpc_id": g.get("VpcId"), "tags": _tags(g.get("Tags")),
            "ingress": [(p.get("IpProtocol"), p.get("FromPort"), p.get("ToPort"),
                         [r["CidrIp"] for r in p.get("IpRanges", [])]) for p in g.get("IpPermissions", [])],
        } for g in cli.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"]
        keys = [{"id": k.get("KeyPairId"), "name": k["KeyName"], "tags": _tags(k.get("Tags"))}
                for k in cli.describe_key_pairs()["KeyPairs"]]
        out: dict[str, list[dict]] = {"instances": instances, "addresses": addresses, "security_groups": groups,
                                      "key_pairs": keys}
        # The deployment networks, data volumes and buckets: each key only when there is at least one.
        vpcs = [{"id": v["VpcId"], "name": _tags(v.get("Tags")).get("Name"), "cidr": v.get("CidrBlock"),
                 "tags": _tags(v.get("Tags"))} for v in cli.describe_vpcs()["Vpcs"] if not v.get("IsDefault")]
        subnets = [{"id": n["SubnetId"], "name": _tags(n.get("Tags")).get("Name"), "vpc_id": n["VpcId"],
                    "cidr": n["CidrBlock"], "zone": n["AvailabilityZone"], "tags": _tags(n.get("Tags"))}
                   for n in cli.describe_subnets()["Subnets"] if not n.get("DefaultForAz")]
        gateways = [{"id": g["InternetGatewayId"], "name": _tags(g.get("Tags")).get("Name"),
                     "vpc_ids": [a["VpcId"] for a in g.get("Attachments") or []], "tags": _tags(g.get("Tags"))}
                    for g in cli.describe_internet_gateways()["InternetGateways"]]
        roots = {(i["InstanceId"], i.get("RootDeviceName")) for i in self._instances(region)}
        volumes = [{"id": v["VolumeId"], "name": _tags(v.get("Tags")).get("Name"), "state": v["State"],
                    "size": v["Size"], "zone": v["AvailabilityZone"], "type": v.get("VolumeType"),
                    "attachments": [{"instance_id": a["InstanceId"], "device": a["Device"], "state": a["State"]}
                                    for a in v.get("Attachments") or []],
                    "tags": _tags(v.get("Tags"))}
                   for v in cli.describe_volumes()["Volumes"]
                   if not any((a["InstanceId"], a["Device"]) in roots for a in v.get("Attachments") or [])]
        buckets = []
        s3 = self.s3_client(region)
        for b in s3.list_buckets().get("Buckets", []):
            try:
                tags = _tags(s3.get_bucket_tagging(Bucket=b["Name"])["TagSet"])
            except Exception:  # noqa: BLE001 - NoSuchTagSet: an untagged bucket
                tags = {}
            objects = s3.list_object_versions(Bucket=b["Name"])
            buckets.append({"id": b["Name"], "name": b["Name"], "tags": tags,
                            "objects": len(objects.get("Versions") or []) + len(objects.get("DeleteMarkers") or [])})
        for key, items in (("vpcs", vpcs), ("subnets", subnets), ("internet_gateways", gateways),
                           ("volumes", volumes), ("buckets", buckets)):
            if items:
                out[key] = items
        return out

    def ssh_targets(self) -> list[dict[str, Any]]:
        """Every running instance, as `labctl.testbed.sshd.SSHNodes` serves it: `address` is its public IP's
        loopback address (None without a public IP), `fixed_ips` = {VPC id: private IP}, and `internal_address`
        a loopback address of its own (127.12.x.y, derived from the instance id), on which it is reachable only
        through an instance of the same VPC that forwards to `<private IP>:22` (the `ssh -J` hop)."""
        cached = self._targets_cache
        if cached is not None and time.monotonic() - cached[0] < 0.2:
            return [dict(t) for t in cached[1]]
        port = self.ssh_port
        booting = self.booting()
        targets = []
        for region in self.regions():
            for i in self._instances(region, ("running",)):
                public = i.get("PublicIpAddress")
                if i["InstanceId"] in booting:
                    continue
                keys = self.instance_keys(i["InstanceId"])
                if keys is None:
                    keys = [line] if i.get("KeyName") and (line := self.key_line(region, i["KeyName"])) else []
                tags = _tags(i.get("Tags"))
                targets.append({
                    "server_id": i["InstanceId"], "site": f"aws:{region}",
                    "name": tags.get("Name") or i["InstanceId"],
                    "address": self.loopback_for(public) if public else None,
                    "fixed_ips": {i["VpcId"]: i["PrivateIpAddress"]} if i.get("VpcId") and i.get(
                        "PrivateIpAddress") else {},
                    "port": port, "user": "ubuntu", "authorized_keys": keys,
                    "node_dir": self.state_dir / "nodes" / i["InstanceId"],
                })
        internal = internal_addresses((t["server_id"] for t in targets), INTERNAL_PREFIX)
        for t in targets:
            t["internal_address"] = internal[t["server_id"]]
        self._targets_cache = (time.monotonic(), targets)
        return [dict(t) for t in targets]

    def close(self) -> None:
        """Close this thread's connection only (the front layer's threads may still be serving)."""
        self.release()


def _cloud_config_keys(user_data: str | None) -> list[str]:
    """`ssh_authorized_keys` of base64 cloud-config user data (what cloud-init would add on a real node)."""
    if not user_data:
        return []
    try:
        text = base64.b64decode(user_data).decode()
    except (ValueError, UnicodeDecodeError):
        return []
    if not text.startswith("#cloud-config"):
        return []
    keys, inside = [], False
    for line in text.splitlines():
        if re.match(r"^ssh_authorized_keys:\s*$", line):
            inside = True
        elif inside and (m := re.match(r"^\s+-\s+(.+?)\s*$", line)):
            keys.append(m.group(1).strip("'\""))
        elif inside and line.strip():
            inside = False
    return keys


def split_filter(params: dict[str, str], name: str) -> tuple[dict[str, str], list[str] | None]:
    """Take filter `name` out of query parameters (renumbering the others): (params, its values or None)."""
    filters: dict[int, dict[str, Any]] = {}
    rest: dict[str, str] = {}
    for key, value in params.items():
        m = re.match(r"^Filter\.(\d+)\.(Name|Value\.(\d+))$", key)
        if not m:
            rest[key] = value
            continue
        f = filters.setdefault(int(m.group(1)), {"name": None, "values": {}})
        if m.group(2) == "Name":
            f["name"] = value
        else:
            f["values"][int(m.group(3))] = value
    wanted = [f for _, f in sorted(filters.items()) if f["name"] == name]
    if not wanted:
        return params, None
    kept = [f for _, f in sorted(filters.items()) if f["name"] != name]
    for i, f in enumerate(kept, 1):
        rest[f"Filter.{i}.Name"] = f["name"]
        for j, (_, v) in enumerate(sorted(f["values"].items()), 1):
            rest[f"Filter.{i}.Value.{j}"] = v
    return rest, [v for f in wanted for _, v in sorted(f["values"].items())]


def keep_instances(body: bytes, keep) -> bytes:
    """A DescribeInstances answer with only the instances for which keep(item) is true (and their reservations)."""
    import xml.etree.ElementTree as ET

    ns = EC2_NS.rstrip("/")
    ET.register_namespace("", ns)
    root = ET.fromstring(body)
    rset = root.find(f"{{{ns}}}reservationSet")
    if rset is None:
        return body
    for reservation in list(rset):
        iset = reservation.find(f"{{{ns}}}instancesSet")
        for item in list(iset if iset is not None else []):
            if not keep(item, ns):
                iset.remove(item)
        if iset is None or not len(iset):
            rset.remove(reservation)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)


def _params_hash(params: dict[str, str]) -> str:
    items = sorted((k, v) for k, v in params.items() if k not in ("Action", "Version", "ClientToken"))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _internal_headers(region: str, creds: Any) -> dict[str, str]:
    # moto reads the region and service from the credential scope; it does not check signatures (the daemon
    # checks the moto key).
    return {
        "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
        "Authorization": f"AWS4-HMAC-SHA256 Credential={creds.aws_access_key_id}/20250101/{region}/ec2/"
                         "aws4_request, SignedHeaders=host, Signature=0",
        MOTO_KEY_HEADER: creds.moto_key,
    }


# ------------------------------------------------------------------------------------------ authentication

_AUTH = re.compile(r"^AWS4-HMAC-SHA256\s+Credential=([^/,\s]+)/(\d{8})/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request,"
                   r"\s*SignedHeaders=([a-z0-9;._-]+),\s*Signature=([0-9a-f]{64})$")


def check_signature(method: str, raw_path: str, headers: Any, body: bytes, creds: Any, s3: bool) -> None:
    """Refuse a request not signed (AWS Signature Version 4, checked with botocore's own signer) with this world's
    access key, the way EC2 (or S3) refuses it: no signature → MissingAuthenticationToken (S3: AccessDenied),
    another access key → AuthFailure (S3: InvalidAccessKeyId), a wrong signature → SignatureDoesNotMatch."""
    from botocore.auth import S3SigV4Auth, SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from labctl.testbed.access import same_secret

    header = " ".join((headers.get("Authorization") or "").split())
    if not header:
        if s3:
            raise ApiError(403, "AccessDenied", "Access Denied")
        raise ApiError(403, "MissingAuthenticationToken",
                       "The request must contain either a valid (registered) AWS access key ID or X.509 certificate.")
    m = _AUTH.match(header)
    if not m:
        if s3:
            raise ApiError(400, "AuthorizationHeaderMalformed", "The authorization header is malformed.")
        raise ApiError(400, "IncompleteSignature", "The request signature does not conform to AWS standards.")
    key_id, day, region, service, signed, signature = m.groups()
    if not same_secret(key_id, creds.aws_access_key_id):
        if s3:
            raise ApiError(403, "InvalidAccessKeyId",
                           "The AWS Access Key Id you provided does not exist in our records.")
        raise ApiError(401, "AuthFailure", "AWS was not able to validate the provided access credentials")
    names = signed.split(";")
    stamp = headers.get("X-Amz-Date") or ""
    if "host" not in names or not re.fullmatch(r"\d{8}T\d{6}Z", stamp) or stamp[:8] != day:
        raise ApiError(403, "SignatureDoesNotMatch", _MISMATCH)
    request = AWSRequest(method=method, url=f"http://{headers.get('Host', '')}{raw_path}", data=body)
    for name in names:
        for value in headers.get_all(name) or []:
            request.headers.add_header(name, value)
    request.context["timestamp"] = stamp
    signer_class = S3SigV4Auth if s3 else SigV4Auth
    signer = signer_class(Credentials(key_id, creds.aws_secret_access_key), service, region)
    signer.headers_to_sign = lambda req: _only(req, names)  # exactly the headers the client signed
    try:
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
    except (ValueError, TypeError, UnicodeError):
        raise ApiError(403, "SignatureDoesNotMatch", _MISMATCH) from None
    if not same_secret(signature, expected):
        raise ApiError(403, "SignatureDoesNotMatch", _MISMATCH)


_MISMATCH = ("The request signature we calculated does not match the signature you provided. Check your AWS Secret "
             "Access Key and signing method. Consult the service documentation for details.")


def _only(request: Any, names: list[str]) -> Any:
    from botocore.awsrequest import HTTPHeaders

    out = HTTPHeaders()
    for name, value in request.headers.items():
        if name.lower() in names:
            out[name.lower()] = value
    return out


# ------------------------------------------------------------------------------------------ front layer

_HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "accept-encoding",
                "expect", "proxy-connection", "te", "upgrade", MOTO_KEY_HEADER.lower()}


class _Front(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, world: AwsWorld) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.world = world
        self.stopping = threading.Event()


class _Handler(EmulatorHandler):
    server: _Front

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("aws front: " + format, *args)

    def _is_s3(self) -> bool:
        m = _SERVICE.search(self.headers.get("Authorization", ""))
        return bool(m) and m.group(1) == "s3" and "x-www-form-urlencoded" not in self.headers.get("Content-Type", "")

    def body_limit(self) -> int:
        """S3 object uploads may be large; every other body is a form or JSON request."""
        return MAX_OBJECT_BODY if self.command == "PUT" and self._is_s3() else MAX_JSON_BODY

    def refuse(self, status: int, message: str) -> None:
        code = ("EntityTooLarge" if self._is_s3() else "RequestEntityTooLarge") if status == 413 else \
            "InvalidRequest" if self._is_s3() else "MalformedInput"
        self.answer(status, error_xml(code, message, self._is_s3()), "text/xml;charset=UTF-8",
                    [("x-amzn-RequestId", str(uuid.uuid4()))])

    def serve(self, body: bytes) -> None:
        self._reply_type = "text/xml;charset=UTF-8"
        self._reply_headers: dict[str, str] = {}
        world = self.server.world
        query = urlsplit(self.path).query
        params = dict(parse_qsl(query, keep_blank_values=True))
        ctype = self.headers.get("Content-Type", "")
        # EC2 speaks the query protocol (form-encoded POST); anything else (JSON or REST services) is passed
        # through unchanged, with the public addresses in the answer still mapped.
        query_protocol = "x-www-form-urlencoded" in ctype or (not body and "Action" in params)
        if body and query_protocol:
            params.update(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
        target = self.headers.get("X-Amz-Target", "")
        action = params.get("Action", "") if query_protocol else (target.rsplit(".", 1)[-1] or self.command)
        m = _REGION.search(self.headers.get("Authorization", ""))
        region = m.group(1) if m else "us-east-1"
        m = _SERVICE.search(self.headers.get("Authorization", ""))
        s3 = bool(m) and m.group(1) == "s3" and not query_protocol
        if s3:
            action = f"s3:{self.command}"  # S3 is REST: its requests are logged and faulted by HTTP method
        seq = None
        try:
            world.note_region(region)
            seq = world.log_request(region, action or "?", params)
            check_signature(self.command, self.path, self.headers, body, world.credentials, s3)
            fault = world.take_fault(action) if action else None
            if fault == "error503":
                raise ApiError(503, "Unavailable", "The service is unavailable. Please try again shortly.")
            if fault == "throttle":
                raise ApiError(503, "RequestLimitExceeded", "Request limit exceeded.")
            real_params = world.unmap_params(params)
            if s3:
                world.check_s3(self.command, urlsplit(self.path))

            def forward(p: dict[str, str]) -> tuple[int, bytes]:
                return self._forward(p)

            tokens = None
            if action == "DescribeInstances":  # moto crashes on the client-token filter: applied here
                real_params, tokens = split_filter(real_params, "client-token")
            if query_protocol and action:
                real_params = world.check_request(region, action, real_params)
            if not query_protocol:
                status, out = self._passthrough(body)
            elif action == "RunInstances":
                status, out = world.run_instances(region, real_params, forward)
            elif action and real_params.get("ClientToken"):
                status, out = world.idempotent(region, action, real_params, forward)
            else:
                status, out = forward(real_params)
            if status == 200 and action == "ImportKeyPair":
                world.record_key(region, params.get("KeyName", ""), params.get("PublicKeyMaterial", ""))
            if status == 200 and tokens is not None:
                out = keep_instances(out, lambda item, ns: item.findtext(f"{{{ns}}}clientToken") in tokens)
            if status == 200 and action in ("DescribeInstances", "RunInstances"):
                out = world.apply_boot(out)
            if not s3:  # object data is passed as it is
                out = world.map_response(out)
        except ApiError as exc:
            status, out, fault = exc.status, error_xml(exc.code, exc.message, s3), None
            self._reply_headers = {}
        except Exception as exc:  # noqa: BLE001 - an emulator bug must come back as an API error, not a hang
            log.exception("aws front: %s failed", action)
            status, out, fault = 500, error_xml("InternalError", f"emulator error: {exc}", s3), None
            self._reply_headers = {}
        if fault == "hang_after":
            self.hang(self.server.stopping, HANG_SECONDS)
            return
        if fault == "timeout_after":
            self.drop()
            return
        if seq is not None:
            with contextlib.suppress(Exception):
                world.set_request_status(seq, status)
        # A HEAD answer has no body but says how long the body would be (moto's Content-Length).
        length = self._reply_headers.pop("content-length", "0") if self.command == "HEAD" else None
        self._reply_headers.pop("content-length", None)
        headers = list(self._reply_headers.items())
        if "x-amzn-requestid" not in self._reply_headers:
            headers.append(("x-amzn-RequestId", str(uuid.uuid4())))
        self.answer(status, out, self._reply_type, headers, length)

    def _passthrough(self, body: bytes) -> tuple[int, bytes]:
        port = self.server.world.moto()["port"]
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        headers[MOTO_KEY_HEADER] = self.server.world.credentials.moto_key
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            self._reply_type = resp.getheader("Content-Type") or self._reply_type
            # The answer's own headers (S3: ETag, x-amz-version-id, x-amz-bucket-region, Location...).
            self._reply_headers = {k.lower(): v for k, v in resp.getheaders()
                                   if k.lower() not in _HOP_HEADERS - {"content-length"}
                                   and k.lower() not in ("content-type", "server", "date")}
            return resp.status, resp.read()
        finally:
            conn.close()

    def _forward(self, params: dict[str, str]) -> tuple[int, bytes]:
        port = self.server.world.moto()["port"]
        body = urlencode(params).encode()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        headers["Content-Type"] = "application/x-www-form-urlencoded; charset=utf-8"
        headers[MOTO_KEY_HEADER] = self.server.world.credentials.moto_key
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("POST", "/", body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()



class AwsEmulator:
    """The front layer of this process over the shared moto daemon and `aws.db`."""

    def __init__(self, world: AwsWorld, front: _Front, thread: threading.Thread) -> None:
        self.world = world
        self._front = front
        self._thread = thread
        host, port = front.server_address[:2]
        self.endpoint = f"http://{host}:{port}"

    def __repr__(self) -> str:
        return f"AwsEmulator({self.endpoint}, {self.world!r})"

    def session(self, region: str) -> Any:
        """A boto3 session with the world's access key: the only key this front layer answers."""
        return self.world.session(region)

    def stop(self) -> None:
        """Stop this process's front layer (the moto daemon stays for other processes)."""
        self._front.stopping.set()
        self._front.shutdown()
        self._front.server_close()
        self._thread.join(5)

    def __enter__(self) -> AwsEmulator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_aws(state_dir: Path, ssh_port: int | None = None) -> AwsEmulator:
    """Start the emulated EC2 over `state_dir`: the moto daemon (if none is alive) and this process's front.

    `ssh_port` is used only when the state dir is new (e.g. the testbed's SSH port, to share one port).
    """
    world = AwsWorld(Path(state_dir), ssh_port=ssh_port)
    world.moto()
    front = _Front(world)
    thread = threading.Thread(target=front.serve_forever, kwargs={"poll_interval": 0.1},
                              name="labctl-aws-front", daemon=True)
    thread.start()
    return AwsEmulator(world, front, thread)


if __name__ == "__main__":  # python -m labctl.testbed.aws moto <state_dir>
    if len(sys.argv) == 3 and sys.argv[1] == "moto":
        _moto_main(Path(sys.argv[2]))
    else:
        sys.exit("usage: python -m labctl.testbed.aws moto <state_dir>")
