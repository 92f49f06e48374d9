"""SSH to the nodes: wait until they answer, pin their host keys, run the lab's setup steps.

Host keys are trusted on first use and pinned in labctl's state (`HostKeyStore`): the first contact fetches
the server's key and pins it; every connection after that (asyncssh here, the system `ssh` through
`known_hosts_file` + `ssh_argv`) accepts only the pinned key, and a different key is refused with
`HostKeyChanged`. Host key checking is never switched off.

asyncssh and tenacity are imported lazily, inside the functions that need them, so importing this module is
cheap. The public functions are synchronous: they run their own event loop (on a helper thread when called
from inside a running loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import shlex
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from labctl import inputs
from labctl import redact as _redact
from labctl.errors import SetupFailed

DEFAULT_USER = "cc"
LOG_TAIL_LINES = 20
# Inline scripts up to this size run as `bash -lc <script>`; bigger ones are uploaded first (ARG_MAX).
INLINE_SCRIPT_LIMIT = 64 * 1024
# Host key algorithms asked for when pinning, most preferred first (what OpenSSH clients prefer too).
PIN_HOST_KEY_ALGS = [
    "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "rsa-sha2-512", "rsa-sha2-256",
]
# Extra seconds the client waits after a step's timeout for the node's own `timeout` to report.
TIMEOUT_GRACE = 15.0
TIMEOUT_EXIT = 124  # coreutils timeout(1)

StageCallback = Callable[[str, str, str], Any]  # (node, stage, detail)
EventCallback = Callable[[str, str, str], Any]  # (node, step name, status)


# -- data -------------------------------------------------------------------------------------------------
@dataclass
class NodeTarget:
    """A node to SSH to; `via` is the jump host when the node has no public address (then `host` is its
    private address on a network the jump host shares, and `port` 22)."""

    name: str
    host: str
    port: int = 22
    user: str = DEFAULT_USER
    via: NodeTarget | None = None

    def where(self) -> str:
        """host:port, and the jump host it is reached through."""
        hop = f" via {self.via.user}@{self.via.host}:{self.via.port} ({self.via.name})" if self.via else ""
        return f"{self.host}:{self.port}{hop}"


@dataclass
class Upload:
    """A file or directory to copy to the node. `local`, and every file inside it when it is a directory, must
    lie under one of `roots` once symbolic links are resolved (checked again at upload time, so a file swapped
    after `labctl validate` is still caught); `roots` defaults to the directory `local` is in."""

    local: Path
    remote: str  # relative to the home directory, or absolute
    roots: tuple[Path, ...] = ()

    def allowed_roots(self) -> tuple[Path, ...]:
        roots = self.roots or (Path(os.path.abspath(self.local)).parent,)
        return tuple(Path(os.path.abspath(r)).resolve() for r in roots)


class UploadRefused(Exception):
    """An upload source (or a file inside an uploaded directory) is outside the lab's directories."""


@dataclass
class SetupStep:
    index: int
    name: str
    nodes: list[str]
    command: str
    uploads: list[Upload] = field(default_factory=list)
    timeout: float = 600.0
    skip_reason: str | None = None


class HostKeyStore(Protocol):
    def get_host_key(self, node: str) -> str | None: ...

    def pin_host_key(self, node: str, host: str, port: int, key: str) -> None: ...


class ProgressStore(Protocol):
    def steps_done(self, node: str) -> set[int]: ...

    def mark_step(self, node: str, index: int, name: str, status: str, detail: str = "") -> None: ...


@dataclass
class NodeResult:
    node: str
    ok: bool
    failed_step: str | None
    log_path: Path
    log_tail: str


class HostKeyChanged(SetupFailed):
    """A node presented a host key different from the pinned one."""

    def __init__(self, node: str, host: str, port: int) -> None:
        self.node, self.host, self.port = node, host, port
        super().__init__(
            f"the SSH host key of node {node} ({host}:{port}) has changed since labctl first connected "
            "to it: either someone is intercepting the connection (man-in-the-middle) or the node was "
            "rebuilt or reinstalled. labctl refuses to connect. If you know the node was rebuilt, run "
            f"'labctl ssh LAB {node} --forget-host-key' (the next 'labctl up' pins the new key); "
            "otherwise do not use it and report it to your instructor or to Chameleon support."
        )


class SSHBlocked(SetupFailed):
    """Connections to port 22 time out on every node: the user's network probably drops outgoing SSH."""


# -- plumbing ---------------------------------------------------------------------------------------------
def _run_sync(factory: Callable[[], Any]) -> Any:
    """Run the coroutine made by `factory` to completion, from sync code or from inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(factory())
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="labctl-ssh", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _key_line(key) -> str:
    """'type base64' of an asyncssh public key (no comment)."""
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


def _write_private(path: Path, text: str) -> None:
    # The directory too: known_hosts/ under the state dir holds which hosts a user reaches (0700, not umask's 0755).
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


async def _fetch_host_key(target: NodeTarget, timeout: float, tunnel: Any = None):
    import asyncssh

    hop = {"tunnel": tunnel} if tunnel is not None else {}
    key = await asyncio.wait_for(
        asyncssh.get_server_host_key(
            target.host, target.port, config=[], server_host_key_algs=PIN_HOST_KEY_ALGS, **hop
        ),
        timeout,
    )
    if key is None:
        raise asyncssh.DisconnectError(asyncssh.DISC_KEY_EXCHANGE_FAILED, "server presented no host key")
    return key


async def _pinned_key(target: NodeTarget, hostkeys: HostKeyStore, timeout: float,
                      on_stage: StageCallback | None = None, tunnel: Any = None) -> str:
    """The node's pinned host key; on first contact fetch it from the node (through `tunnel`, the jump host's
    connection, for a node behind one) and pin it (TOFU)."""
    pinned = hostkeys.get_host_key(target.name)
    if pinned:
        return pinned
    key = await _fetch_host_key(target, timeout, tunnel)
    line = _key_line(key)
    hostkeys.pin_host_key(target.name, target.host, target.port, line)
    if on_stage:
        from labctl.keys import fingerprint

        on_stage(target.name, "host-key-pinned", fingerprint(line))
    return line


async def _connect(target: NodeTarget, key_path: Path, pinned: str, timeout: float, tunnel: Any = None):
    """An authenticated asyncssh connection that trusts only the pinned host key (opened over `tunnel`, the
    jump host's connection, when given)."""
    import asyncssh

    trusted = asyncssh.import_public_key(pinned)
    hop = {"tunnel": tunnel} if tunnel is not None else {}
    try:
        return await asyncssh.connect(
            target.host, target.port, **hop,
            username=target.user,
            known_hosts=([trusted], [], []),
            client_keys=[str(key_path)],
            agent_path=None,
            config=[],
            preferred_auth="publickey",
            connect_timeout=timeout,
            keepalive_interval=30,
            keepalive_count_max=4,
        )
    except asyncssh.HostKeyNotVerifiable:
        raise HostKeyChanged(target.name, target.host, target.port) from None


class _Jumps:
    """One authenticated connection per jump host, shared by every node reached through it."""

    def __init__(self, key_path: Path, hostkeys: HostKeyStore, on_stage: StageCallback | None = None) -> None:
        self.key_path, self.hostkeys, self.on_stage = key_path, hostkeys, on_stage
        self.conns: dict[str, Any] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def get(self, via: NodeTarget, timeout: float):
        async with self.locks.setdefault(via.name, asyncio.Lock()):
            conn = self.conns.get(via.name)
            if conn is not None and not conn.is_closed():
                return conn
            pinned = await _pinned_key(via, self.hostkeys, timeout, self.on_stage)
            conn = await _connect(via, self.key_path, pinned, timeout)
            self.conns[via.name] = conn
            return conn

    async def close(self) -> None:
        conns, self.conns = list(self.conns.values()), {}
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)


# -- known_hosts / system ssh -------------------------------------------------------------------------------
def _known_hosts_pattern(host: str, port: int) -> str:
    return host if int(port) == 22 else f"[{host}]:{port}"


def known_hosts_file(targets: list[NodeTarget], hostkeys: HostKeyStore, path: Path) -> Path:
    """Write an OpenSSH known_hosts file (0600) with the pinned key of every target and of its jump host (a
    node behind one is listed under its private address, e.g. `192.168.1.12 ssh-ed25519 ...`)."""
    lines: list[str] = []
    missing: list[str] = []
    hops = [h for t in targets for h in ([t.via] if t.via else []) + [t]]
    for t in hops:
        key = hostkeys.get_host_key(t.name)
        if not key:
            if t.name not in missing:
                missing.append(t.name)
            continue
        line = f"{_known_hosts_pattern(t.host, t.port)} {' '.join(key.split()[:2])}\n"
        if line not in lines:
            lines.append(line)
    if missing:
        raise SetupFailed(
            f"no pinned SSH host key for {', '.join(missing)}: labctl has not reached "
            f"{'this node' if len(missing) == 1 else 'these nodes'} yet (run `labctl up` again)"
        )
    path = Path(path)
    _write_private(path, "".join(lines))
    return path


def ssh_argv(target: NodeTarget, key_path: Path, known_hosts: Path, command: list[str] | None = None,
             forwards: Sequence[tuple[int, int]] = (), ssh: str = "ssh") -> list[str]:
    """argv for the system OpenSSH client, checking the host key against `known_hosts` only.

    `command` words are passed as ssh passes them: joined with spaces and run by the node's shell.
    `forwards` are (local port, port on the node's localhost) pairs; the local end listens on 127.0.0.1 only.
    A node behind a jump host is reached with a ProxyCommand running `ssh -W %h:%p` on the jump host with
    the same key and known_hosts file (options given to `ssh -J` would not apply to the jump hop).
    """
    argv = [ssh, "-i", str(key_path), "-p", str(target.port), *_check_options(known_hosts)]
    if target.via is not None:
        via = target.via
        hop = [ssh, "-i", str(key_path), "-p", str(via.port), *_check_options(known_hosts)]
        # ssh expands %-tokens in ProxyCommand: double the ones in paths; the shell gets quoted words.
        words = [shlex.quote(a.replace("%", "%%")) for a in hop]
        words += ["-W", "%h:%p", shlex.quote(f"{via.user}@{via.host}")]
        argv += ["-o", "ProxyCommand=" + " ".join(words)]
    for local, remote in forwards:
        argv += ["-L", f"127.0.0.1:{int(local)}:localhost:{int(remote)}"]
    if forwards:
        argv += ["-o", "ExitOnForwardFailure=yes"]
    argv.append(f"{target.user}@{target.host}")
    if command:
        argv += ["--", *command]
    return argv


def _check_options(known_hosts: Path) -> list[str]:
    return [
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "UpdateHostKeys=no",
        "-o", "IdentitiesOnly=yes",
        "-o", "PreferredAuthentications=publickey",
    ]


# -- waiting for SSH -------------------------------------------------------------------------------------
class _NotReady(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def _classify(exc: BaseException) -> tuple[str, str, bool]:
    """(kind, human detail, whether the peer spoke SSH) of a failed connection attempt."""
    import asyncssh

    if isinstance(exc, ConnectionRefusedError):
        return "refused", "connection refused (the node is probably still booting)", False
    if isinstance(exc, TimeoutError):
        return "timeout", "connection timed out", False
    if isinstance(exc, asyncssh.ChannelOpenError):
        return "refused", f"the jump host could not connect to it: {exc.reason}", False
    if isinstance(exc, asyncssh.PermissionDenied):
        return "auth", "SSH is up but refuses labctl's key (still being installed on the node?)", True
    if isinstance(exc, asyncssh.ConnectionLost):
        return "lost", "connection closed during the SSH handshake (sshd still starting?)", False
    if isinstance(exc, asyncssh.DisconnectError):
        return "ssh-error", f"SSH error: {exc.reason}", True
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable", f"{os.strerror(exc.errno)} (the node's network is not up yet?)", False
    if isinstance(exc, OSError):
        return "error", f"{exc.strerror or exc}", False
    return "error", f"{type(exc).__name__}: {exc}", False


@dataclass
class _NodeWait:
    target: NodeTarget
    started: float = 0.0
    attempts: int = 0
    only_timeouts: bool = True
    spoke_ssh: bool = False
    last: str = "not tried yet"


class _WaitState:
    def __init__(self, targets: list[NodeTarget], blocked_after: float) -> None:
        self.nodes = {t.name: _NodeWait(t) for t in targets}
        self.blocked_after = blocked_after

    def blocked(self) -> list[NodeTarget]:
        """Nodes whose every attempt timed out for a while, when no node has proven SSH gets through."""
        if any(n.spoke_ssh for n in self.nodes.values()):
            return []
        now = time.monotonic()
        return [
            n.target for n in self.nodes.values()
            if n.attempts >= 2 and n.only_timeouts and now - n.started >= self.blocked_after
        ]


def _blocked_message(blocked: list[NodeTarget]) -> str:
    where = ", ".join(f"port {t.port} on {t.host} ({t.name})" for t in blocked)
    return (
        f"{where} seems blocked (connections time out rather than being refused): your network may "
        "block outgoing SSH; try another network or a VPN"
    )


def wait_for_ssh(targets: list[NodeTarget], key_path: Path, hostkeys: HostKeyStore, timeout: float,
                 on_stage: StageCallback | None = None, connect_timeout: float = 10,
                 blocked_after: float | None = None) -> None:
    """Wait until every target accepts labctl's key over SSH, pinning host keys on first contact.

    Calls `on_stage(node, stage, detail)` with stage "ssh-wait" (detail: why not yet, when it changes),
    "host-key-pinned" (detail: fingerprint) and "ssh-ready". Raises `HostKeyChanged` at once on a host key
    mismatch, `SSHBlocked` as soon as connections have only timed out for `blocked_after` seconds (default
    3 x connect_timeout) while no node has spoken SSH, and `SetupFailed` naming each node's last error when
    `timeout` runs out.
    """
    if not targets:
        return
    state = _WaitState(targets, blocked_after if blocked_after is not None else 3 * connect_timeout)
    _run_sync(lambda: _wait_all(targets, Path(key_path), hostkeys, timeout, on_stage, connect_timeout, state))


async def _wait_all(targets, key_path, hostkeys, timeout, on_stage, connect_timeout, state) -> None:
    deadline = time.monotonic() + timeout
    jumps = _Jumps(key_path, hostkeys, on_stage)
    tasks = [
        asyncio.ensure_future(_wait_one(t, key_path, hostkeys, deadline, on_stage, connect_timeout, state, jumps))
        for t in targets
    ]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await jumps.close()
    errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
    for kind in (HostKeyChanged, SSHBlocked):
        for exc in errors:
            if isinstance(exc, kind):
                raise exc
    if errors:
        raise errors[0]
    failures = [t.result() for t in tasks if t.done() and not t.cancelled() and t.result()]
    if failures:
        raise SetupFailed(
            f"SSH did not come up within {timeout:g}s on {len(failures)} node(s): " + "; ".join(failures)
        )


async def _wait_one(target: NodeTarget, key_path: Path, hostkeys: HostKeyStore, deadline: float,
                    on_stage: StageCallback | None, connect_timeout: float, state: _WaitState,
                    jumps: _Jumps) -> str | None:
    """None once the node accepts us; a one-line failure when the deadline passes."""
    import asyncssh
    from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

    stat = state.nodes[target.name]
    stat.started = time.monotonic()
    if on_stage:
        on_stage(target.name, "ssh-wait", f"connecting to {target.where()}")
    last_detail = None
    backoff = wait_exponential(multiplier=0.2, max=5.0) + wait_random(0, 0.2)

    async def attempt() -> None:
        nonlocal last_detail
        per_try = max(0.2, min(connect_timeout, deadline - time.monotonic()))
        stat.attempts += 1
        tunnel = None
        try:
            if target.via is not None:
                tunnel = await jumps.get(target.via, per_try)
            pinned = hostkeys.get_host_key(target.name)
            if not pinned:
                pinned = await _pinned_key(target, hostkeys, per_try, on_stage, tunnel)
                stat.spoke_ssh = True  # the node completed a key exchange: SSH gets through
            conn = await _connect(target, key_path, pinned, per_try, tunnel)
        except HostKeyChanged:
            raise
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            kind, detail, spoke = _classify(exc)
            if target.via is not None and tunnel is None:
                detail = f"jump host {target.via.name} ({target.via.host}:{target.via.port}): {detail}"
            stat.spoke_ssh = stat.spoke_ssh or spoke
            stat.only_timeouts = stat.only_timeouts and kind == "timeout"
            stat.last = detail
            if on_stage and detail != last_detail:
                on_stage(target.name, "ssh-wait", detail)
            last_detail = detail
            if blocked := state.blocked():
                raise SSHBlocked(_blocked_message(blocked)) from None
            raise _NotReady(kind, detail) from None
        stat.spoke_ssh = True
        conn.close()
        with contextlib.suppress(Exception):
            await conn.wait_closed()

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(_NotReady),
        stop=lambda rs: time.monotonic() >= deadline,
        wait=lambda rs: max(0.0, min(backoff(rs), deadline - time.monotonic())),
        reraise=True,
    )
    try:
        async for try_ in retrying:
            with try_:
                await attempt()
    except _NotReady as exc:
        return f"{target.name} ({target.where()}): {exc.detail}"
    if on_stage:
        on_stage(target.name, "ssh-ready", f"{target.user}@{target.where()}")
    return None


# -- setup steps ------------------------------------------------------------------------------------------
def _private_log_dir(log_dir: Path) -> None:
    """Create `log_dir` (and missing parents) 0700; tighten it, and the state's `logs/` above it, to 0700."""
    log_dir = Path(log_dir)
    missing = []
    for d in [log_dir, *log_dir.parents]:
        if d.exists():
            break
        missing.append(d)
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
        os.chmod(d, 0o700)
    os.chmod(log_dir, 0o700)
    if log_dir.parent.name == "logs":
        with contextlib.suppress(OSError):  # someone else's directory: leave it
            os.chmod(log_dir.parent, 0o700)


class _NodeLog:
    """Appends a node's setup output to its log file (0600), line-buffered so that secrets are masked: the
    `redact` strings and every secret registered with `labctl.redact`."""

    def __init__(self, path: Path, redact: Sequence[str]) -> None:
        self.path = path
        self.redact = [s for s in redact if s]
        self._partial = b""

    def _mask(self, text: str) -> str:
        for secret in self.redact:
            text = text.replace(secret, "********")
        return _redact.mask(text)

    def _write(self, text: str) -> None:
        text = self._mask(text)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "a", encoding="utf-8", errors="replace") as f:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
            f.write(text)

    def line(self, text: str) -> None:
        self.flush()
        self._write(text.rstrip("\n") + "\n")

    def output(self, chunk: bytes) -> None:
        data = self._partial + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) > 16384:
            cut = len(data)
        self._partial = data[cut:]
        if cut:
            self._write(data[:cut].decode("utf-8", errors="replace"))

    def flush(self) -> None:
        if self._partial:
            data, self._partial = self._partial, b""
            self._write(data.decode("utf-8", errors="replace") + "\n")

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                data = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        # Masked again: a secret may have been registered after the line was written.
        return _redact.strip_control(self._mask("\n".join(data.splitlines()[-lines:])))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_setup(targets: list[NodeTarget], steps: list[SetupStep], key_path: Path, hostkeys: HostKeyStore,
              progress: ProgressStore, log_dir: Path, on_event: EventCallback | None = None,
              max_parallel: int = 16, redact: Iterable[str] = (),
              connect_timeout: float = 30) -> dict[str, NodeResult]:
    """Run `steps` in order; each on all of its nodes in parallel, the next once it finished everywhere.

    Per node: steps in `progress.steps_done(node)` are skipped ("already-done"), a step with `skip_reason`
    is marked "skipped", otherwise uploads go first (SFTP) and the command runs as `bash -lc <command>` with
    stdin at EOF. Output and a header/footer per step are appended to `<log_dir>/<node>.log` (strings in
    `redact` are masked). A non-zero exit, the step's timeout or an SSH error marks the step "failed" and
    stops that node (others go on); rerunning resumes at the failed step. `on_event(node, step, status)`
    reports running | done | failed | skipped | already-done. Raises `HostKeyChanged` (after marking the
    step failed) when a node's host key no longer matches.
    """
    by_name = {t.name: t for t in targets}
    unknown = sorted({n for s in steps for n in s.nodes} - by_name.keys())
    if unknown:
        raise ValueError(f"setup steps name nodes that are not SSH targets: {', '.join(unknown)}")
    log_dir = Path(log_dir)
    _private_log_dir(log_dir)
    logs = {t.name: _NodeLog(log_dir / f"{t.name}.log", list(redact)) for t in targets}
    failed: dict[str, str] = _run_sync(
        lambda: _setup_all(by_name, steps, Path(key_path), hostkeys, progress, logs, on_event,
                           max(1, max_parallel), connect_timeout)
    )
    return {
        name: NodeResult(node=name, ok=name not in failed, failed_step=failed.get(name),
                         log_path=logs[name].path, log_tail=logs[name].tail())
        for name in by_name
    }


async def _setup_all(by_name, steps, key_path, hostkeys, progress, logs, on_event, max_parallel,
                     connect_timeout) -> dict[str, str]:
    sem = asyncio.Semaphore(max_parallel)
    conns: dict[str, Any] = {}
    failed: dict[str, str] = {}
    total = len(steps)
    runner = _StepRunner(by_name, key_path, hostkeys, progress, logs, on_event, conns, connect_timeout)
    try:
        for position, step in enumerate(steps, 1):
            nodes = [n for n in dict.fromkeys(step.nodes) if n not in failed]

            async def one(node: str, step: SetupStep = step, position: int = position) -> None:
                async with sem:
                    if not await runner.run(node, step, position, total):
                        failed[node] = step.name

            tasks = [asyncio.ensure_future(one(n)) for n in nodes]
            if not tasks:
                continue
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()
    finally:
        for conn in conns.values():
            conn.close()
        for conn in conns.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)
        await runner.jumps.close()
    return failed


class _StepRunner:
    def __init__(self, by_name, key_path, hostkeys, progress, logs, on_event, conns, connect_timeout) -> None:
        self.by_name: dict[str, NodeTarget] = by_name
        self.key_path = key_path
        self.hostkeys = hostkeys
        self.progress = progress
        self.logs: dict[str, _NodeLog] = logs
        self.on_event = on_event
        self.conns = conns
        self.connect_timeout = connect_timeout
        self.jumps: _Jumps = _Jumps(key_path, hostkeys)

    def _event(self, node: str, step: str, status: str) -> None:
        if self.on_event:
            self.on_event(node, step, status)

    async def _conn(self, node: str):
        conn = self.conns.get(node)
        if conn is not None and not conn.is_closed():
            return conn
        import asyncssh

        target = self.by_name[node]
        pinned = self.hostkeys.get_host_key(target.name)
        # A node that answered before can drop one handshake (sshd restarting, a load balancer, a listener
        # going away): try a few times before failing the step. Nothing has run yet, so this is safe.
        for attempt in range(3):
            try:
                # A node behind a jump host: over the one shared connection to it (reopened if it died).
                tunnel = await self.jumps.get(target.via, self.connect_timeout) if target.via else None
                if not pinned:
                    pinned = await _pinned_key(target, self.hostkeys, self.connect_timeout, tunnel=tunnel)
                conn = await _connect(target, self.key_path, pinned, self.connect_timeout, tunnel)
                break
            except HostKeyChanged:
                raise
            except (TimeoutError, OSError, asyncssh.Error):
                if attempt == 2:
                    raise
                await asyncio.sleep(0.5 * (attempt + 1))
        self.conns[node] = conn
        return conn

    async def run(self, node: str, step: SetupStep, position: int, total: int) -> bool:
        """Run one step on one node; False if it failed."""
        import asyncssh

        log = self.logs[node]
        label = f"step {position}/{total} {step.name!r}"
        if step.index in self.progress.steps_done(node):
            log.line(f"==> {label} on {node}: already done ({_now()})")
            self._event(node, step.name, "already-done")
            return True
        if step.skip_reason:
            log.line(f"==> {label} on {node}: skipped: {step.skip_reason} ({_now()})")
            self.progress.mark_step(node, step.index, step.name, "skipped", step.skip_reason)
            self._event(node, step.name, "skipped")
            return True

        log.line(f"==> {label} on {node} ({_now()})")
        self.progress.mark_step(node, step.index, step.name, "running")
        self._event(node, step.name, "running")
        started = time.monotonic()
        status, detail = "failed", ""
        try:
            status, detail = await self._execute(node, step, log)
        except HostKeyChanged as exc:
            detail = str(exc)
            raise
        except asyncio.CancelledError:
            detail = "interrupted"
            raise
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            detail = f"SSH error: {_classify(exc)[1]}"
            self.conns.pop(node, None)
        finally:
            log.flush()
            elapsed = time.monotonic() - started
            why = f" ({detail})" if detail else ""
            log.line(f"<== {label} on {node}: {status}{why} after {elapsed:.1f}s")
            self.progress.mark_step(node, step.index, step.name, status, detail)
            self._event(node, step.name, status)
        return status == "done"

    async def _execute(self, node: str, step: SetupStep, log: _NodeLog) -> tuple[str, str]:
        import asyncssh

        deadline = time.monotonic() + step.timeout
        # A cached connection may have died since the last step (e.g. the node's sshd went away and came
        # back): if it fails before the command starts, reconnect once; uploads are idempotent.
        for attempt in range(2):
            try:
                started_or_failure = await self._start(node, step, log, deadline)
                break
            except (asyncssh.ConnectionLost, asyncssh.DisconnectError, BrokenPipeError, ConnectionResetError):
                self.conns.pop(node, None)
                if attempt == 1:
                    raise
        if isinstance(started_or_failure[0], str):
            return started_or_failure  # type: ignore[return-value]
        process, remaining, started = started_or_failure

        async def pump() -> None:
            while chunk := await process.stdout.read(65536):
                log.output(chunk)
            await process.wait_closed()

        try:
            await asyncio.wait_for(pump(), remaining + TIMEOUT_GRACE)
        except TimeoutError:
            with contextlib.suppress(Exception):
                process.send_signal("KILL")
            process.close()
            return "failed", f"timed out after {step.timeout:g}s"
        finally:
            log.flush()
        code = process.returncode
        if code == 0:
            return "done", ""
        if code == TIMEOUT_EXIT and time.monotonic() - started >= remaining - 0.5:
            return "failed", f"timed out after {step.timeout:g}s"
        if process.exit_signal:
            return "failed", f"killed by signal {process.exit_signal[0]}"
        if code is None:
            return "failed", "the connection closed before the command finished"
        return "failed", f"exit status {code}"

    async def _start(self, node: str, step: SetupStep, log: _NodeLog, deadline: float) -> tuple:
        """Upload the step's files and start its command: (process, remaining, started) or (status, detail)."""
        import asyncssh

        conn = await self._conn(node)
        script = step.command
        needs_file = len(script.encode()) > INLINE_SCRIPT_LIMIT
        remote_script = None
        if step.uploads or needs_file:
            try:
                uploaded = await asyncio.wait_for(
                    self._upload(conn, step, log, script if needs_file else None),
                    max(0.1, deadline - time.monotonic()),
                )
            except TimeoutError:
                return "failed", f"timed out after {step.timeout:g}s while uploading files"
            except FileNotFoundError as exc:
                return "failed", f"upload source missing: {exc.filename}"
            except UploadRefused as exc:
                return "failed", f"upload refused: {exc}"
            except asyncssh.SFTPError as exc:
                return "failed", f"upload failed: {exc.reason}"
            if needs_file:
                remote_script = uploaded
        remaining = max(1.0, deadline - time.monotonic())
        inner = f"bash -l {shlex.quote(remote_script)}" if remote_script else f"bash -lc {shlex.quote(script)}"
        # The node enforces the timeout itself too, so that a step does not outlive us on a real node.
        command = f"timeout -k 10 {remaining:.1f} {inner}"

        started = time.monotonic()
        process = await conn.create_process(command, stderr=asyncssh.STDOUT, encoding=None)
        process.stdin.write_eof()
        return process, remaining, started

    async def _upload(self, conn, step: SetupStep, log: _NodeLog, script: str | None) -> str:
        """SFTP the step's uploads (creating parent directories); returns the script's remote path."""
        remote_script = f".labctl/step-{step.index}.sh"
        async with conn.start_sftp_client() as sftp:
            for up in step.uploads:
                local = Path(up.local)
                roots = up.allowed_roots()
                # Every path resolved (symbolic links included) and checked against the lab's directories now,
                # not only when the profile was validated: a lab's shared scripts are links into labs/_common/
                # (the node gets the file), but a link to anything else is refused, never followed.
                try:
                    resolved = Path(os.path.abspath(local)).resolve(strict=True)
                except (OSError, RuntimeError):
                    raise FileNotFoundError(errno.ENOENT, "no such file", str(local)) from None
                if not inputs.under(resolved, roots):
                    raise UploadRefused(f"{local} leads outside the lab directory (to {resolved}) through a "
                                        "symbolic link; refusing to upload it")
                files: list[tuple[str, Path]] | None = None
                if resolved.is_dir():
                    try:
                        files = list(inputs.walk_confined(resolved, roots))
                    except ValueError as exc:
                        raise UploadRefused(f"{local}: {exc}; refusing to upload it") from None
                dest = up.remote
                parent = posixpath.dirname(dest.rstrip("/"))
                if parent not in ("", ".", "/"):
                    await sftp.makedirs(parent, exist_ok=True)
                if await sftp.isdir(dest):  # as `cp`/`sftp put`: into an existing directory
                    dest = posixpath.join(dest, local.name)
                if files is None:
                    await self._put_file(sftp, local, roots, dest)
                else:
                    await sftp.makedirs(dest, exist_ok=True)
                    for rel, _path in files:
                        sub = posixpath.dirname(rel)
                        if sub:
                            await sftp.makedirs(posixpath.join(dest, sub), exist_ok=True)
                        await self._put_file(sftp, resolved / rel, roots, posixpath.join(dest, rel))
                log.line(f"    uploaded {local.name} -> {up.remote}")
            if script is not None:
                await sftp.makedirs(".labctl", exist_ok=True)
                async with sftp.open(remote_script, "w") as f:
                    await f.write(script)
        return remote_script

    @staticmethod
    async def _put_file(sftp, local: Path, roots: tuple[Path, ...], remote: str) -> None:
        """Copy one local file to `remote` (mode and times kept), opened only if its real location is under
        `roots` (see `labctl.inputs.open_confined`)."""
        try:
            fd = inputs.open_confined(local, roots)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(local)) from None
        except ValueError as exc:
            raise UploadRefused(f"{exc}; refusing to upload it") from None
        with os.fdopen(fd, "rb") as src:
            info = os.fstat(fd)
            async with sftp.open(remote, "wb") as dst:
                while chunk := src.read(256 * 1024):
                    await dst.write(chunk)
        await sftp.chmod(remote, info.st_mode & 0o777)
        await sftp.utime(remote, (info.st_atime, info.st_mtime))
