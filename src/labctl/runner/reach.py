"""Reaching the nodes over SSH: wait until they answer, pin their host keys, open authenticated connections.

Host keys are trusted on first use and pinned in labctl's state (`HostKeyStore`): the first contact fetches
the server's key and pins it; every connection after that (asyncssh here, the system `ssh` through
`runner.system_ssh`) accepts only the pinned key, and a different key is refused with `HostKeyChanged`.
Host key checking is never switched off.

asyncssh and tenacity are imported lazily, inside the functions that need them, so importing this module is
cheap. The public functions are synchronous: they run their own event loop (on a helper thread when called
from inside a running loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from labctl.errors import SetupFailed

DEFAULT_USER = "cc"
# Host key algorithms asked for when pinning, most preferred first (what OpenSSH clients prefer too).
PIN_HOST_KEY_ALGS = [
    "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "rsa-sha2-512", "rsa-sha2-256",
]

StageCallback = Callable[[str, str, str], Any]  # (node, stage, detail)


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




class HostKeyStore(Protocol):
    def get_host_key(self, node: str) -> str | None: ...

    def pin_host_key(self, node: str, host: str, port: int, key: str) -> None: ...



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
T = TypeVar("T")
# Threads shared by every event loop here for blocking work: asyncssh's option set-up, the state store's calls.
BLOCKING_WORKERS = 8


class SharedExecutor(concurrent.futures.ThreadPoolExecutor):
    """Every loop's default executor: one small pool for all of them. asyncssh builds each connection's options in
    the loop's default executor (it reads the key file); a default executor per loop started a thread per
    connection, 160 more threads at once in the SSH phase of a class of 500. A loop's shutdown leaves the pool
    to the others (its threads end with the interpreter, as any ThreadPoolExecutor's)."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


_shared: list[SharedExecutor] = []
_shared_lock = threading.Lock()


def shared_executor() -> SharedExecutor:
    with _shared_lock:  # one pool, however many loops start at once
        if not _shared:
            _shared.append(SharedExecutor(BLOCKING_WORKERS, thread_name_prefix="labctl-ssh-io"))
        return _shared[0]


class _SharedPoolLoop(asyncio.SelectorEventLoop):
    """An event loop whose blocking work goes to the `SharedExecutor`. Closing one (`run_sync` from inside another
    loop runs on a loop of its own) leaves the pool alone: asyncio's shutdown would start a thread to shut it down."""

    def __init__(self) -> None:
        super().__init__()
        self.set_default_executor(shared_executor())

    async def shutdown_default_executor(self, *args: Any) -> None:
        return None


def _run_on_own_loop(factory: Callable[[], Any]) -> Any:
    with asyncio.Runner(loop_factory=_SharedPoolLoop) as runner:
        return runner.run(factory())


_ssh_loops: list[_SharedPoolLoop] = []
_ssh_loop_lock = threading.Lock()
os.register_at_fork(after_in_child=_ssh_loops.clear)  # a forked child has the loop but not its thread
CANCEL_GRACE = 10.0  # seconds an interrupted caller waits for its coroutine's own clean-up (step marks, closing)


def ssh_loop() -> asyncio.AbstractEventLoop:
    """The process's one event loop for SSH, in a thread of its own: every node's connections and sessions, however
    many environments set up at once. A loop (and a thread) per environment made their wake-ups fight over the GIL:
    a third of the SSH phase's CPU in a class of 200. What blocks runs in the shared pool
    (`asyncio.to_thread`: the loop's default executor is that pool)."""
    with _ssh_loop_lock:
        if not _ssh_loops:
            loop = _SharedPoolLoop()
            threading.Thread(target=loop.run_forever, name="labctl-ssh-loop", daemon=True).start()
            _ssh_loops.append(loop)
        return _ssh_loops[0]


def _run_on_ssh_loop(factory: Callable[[], Any]) -> Any:
    finished = threading.Event()

    async def run() -> Any:
        try:
            return await factory()
        finally:
            finished.set()

    future = asyncio.run_coroutine_threadsafe(run(), ssh_loop())
    try:
        return future.result()
    except BaseException:
        future.cancel()  # Ctrl-C here: the coroutine marks its steps and closes its connections before we go on
        finished.wait(CANCEL_GRACE)
        raise


def run_sync(factory: Callable[[], Any]) -> Any:
    """Run the coroutine made by `factory` to completion on the SSH loop, from sync code; from inside a running
    loop, on a loop of its own in another thread (blocking a running loop on the SSH loop could wait on itself)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_on_ssh_loop(factory)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = _run_on_own_loop(factory)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="labctl-ssh", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def key_line(key) -> str:
    """'type base64' of an asyncssh public key (no comment)."""
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


# AES-GCM first: asyncssh makes a new cipher context per packet for chacha20-poly1305, which was 1/10 of labctl's
# CPU in a class's setup; every OpenSSH server offers both.
ENCRYPTION_ALGS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                   "aes128-ctr", "aes256-ctr")


async def connect(target: NodeTarget, key_path: Path, pinned: str, timeout: float, tunnel: Any = None):
    """An authenticated asyncssh connection that trusts only the pinned host key (opened over `tunnel`, the
    jump host's connection, when given)."""
    import asyncssh

    trusted = asyncssh.import_public_key(pinned)
    try:
        return await _connect(target, key_path, timeout, tunnel, known_hosts=([trusted], [], []))
    except asyncssh.HostKeyNotVerifiable:
        raise HostKeyChanged(target.name, target.host, target.port) from None


async def connect_pinning(target: NodeTarget, key_path: Path, hostkeys: HostKeyStore, timeout: float,
                          on_stage: StageCallback | None = None, tunnel: Any = None):
    """`connect` with the node's pinned host key; on first contact, the key the node shows in this very handshake
    is pinned (trust on first use, as a separate look at it would be, one key exchange fewer), even if the node
    then refuses labctl's key."""
    import asyncssh

    pinned = await asyncio.to_thread(hostkeys.get_host_key, target.name)
    if pinned:
        return await connect(target, key_path, pinned, timeout, tunnel)
    shown: list[Any] = []

    class FirstContact(asyncssh.SSHClient):
        def validate_host_public_key(self, host: str, addr: str, port: int, key: Any) -> bool:
            shown.append(key)
            return True

    try:
        return await _connect(target, key_path, timeout, tunnel, known_hosts=([], [], []),
                              client_factory=FirstContact, server_host_key_algs=PIN_HOST_KEY_ALGS)
    finally:
        if shown:
            line = key_line(shown[0])
            await asyncio.to_thread(hostkeys.pin_host_key, target.name, target.host, target.port, line)
            if on_stage:
                from labctl.keys import fingerprint

                on_stage(target.name, "host-key-pinned", fingerprint(line))


async def _connect(target: NodeTarget, key_path: Path, timeout: float, tunnel: Any, **options: Any):
    import asyncssh

    hop = {"tunnel": tunnel} if tunnel is not None else {}
    return await asyncssh.connect(
        target.host, target.port, **hop, **options,
        username=target.user,
        client_keys=[str(key_path)],
        agent_path=None,
        config=[],
        preferred_auth="publickey",
        encryption_algs=ENCRYPTION_ALGS,
        connect_timeout=timeout,
        keepalive_interval=30,
        keepalive_count_max=4,
    )


class Jumps:
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
            conn = await connect_pinning(via, self.key_path, self.hostkeys, timeout, self.on_stage)
            self.conns[via.name] = conn
            return conn

    async def close(self) -> None:
        conns, self.conns = list(self.conns.values()), {}
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)


# -- waiting for SSH -------------------------------------------------------------------------------------
# A refused connection costs the node nothing (no handshake): retried every second at most, sshd is found within a
# second of starting (a 5 s backoff made 179 of 200 nodes of a class wait 7 s for an sshd up after 0.1 s).
REFUSED_RETRY = 1.0


class _NotReady(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def classify(exc: BaseException) -> tuple[str, str, bool]:
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
    if targets:
        run_sync(lambda: wait_all(targets, Path(key_path), hostkeys, timeout, on_stage, connect_timeout,
                                  blocked_after))


async def wait_all(targets: list[NodeTarget], key_path: Path, hostkeys: HostKeyStore, timeout: float,
                   on_stage: StageCallback | None = None, connect_timeout: float = 10,
                   blocked_after: float | None = None, jumps: Jumps | None = None,
                   keep: dict[str, Any] | None = None) -> None:
    """`wait_for_ssh` inside a running loop. With `keep`, each node's first authenticated connection is kept
    there by node name (for the setup steps: one handshake fewer per node), and `jumps` (then the caller's to
    close) carries the nodes behind a jump host; the caller closes what is kept, whatever happens."""
    if not targets:
        return
    state = _WaitState(targets, blocked_after if blocked_after is not None else 3 * connect_timeout)
    deadline = time.monotonic() + timeout
    own_jumps = jumps is None
    jumps = jumps or Jumps(key_path, hostkeys, on_stage)
    tasks = [
        asyncio.ensure_future(_wait_one(t, key_path, hostkeys, deadline, on_stage, connect_timeout, state, jumps,
                                        keep))
        for t in targets
    ]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if own_jumps:
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
                    jumps: Jumps, keep: dict[str, Any] | None) -> str | None:
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
            conn = await connect_pinning(target, key_path, hostkeys, per_try, on_stage, tunnel)
        except HostKeyChanged:
            raise
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            kind, detail, spoke = classify(exc)
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
        if keep is not None:
            keep[target.name] = conn
            return
        conn.close()
        with contextlib.suppress(Exception):
            await conn.wait_closed()

    def pause(rs: Any) -> float:
        failure = rs.outcome.exception() if rs.outcome is not None else None
        refused = isinstance(failure, _NotReady) and failure.kind == "refused"
        wait = min(backoff(rs), REFUSED_RETRY) if refused else backoff(rs)
        return max(0.0, min(wait, deadline - time.monotonic()))

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(_NotReady),
        stop=lambda rs: time.monotonic() >= deadline,
        wait=pause,
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
