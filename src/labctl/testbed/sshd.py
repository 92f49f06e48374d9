"""Real SSH for the emulated nodes.

`SSHNodes(world).start()` runs an asyncio loop in a daemon thread that polls `world.ssh_targets()` and, for
every ACTIVE server with a floating IP, serves SSH on `(address, port)` with asyncssh. A target that also has
an `internal_address` (a loopback address of its own) and `fixed_ips` ({network id: fixed IP}) is served
there too: that listener is what a node sharing one of its networks reaches when a client asks it to forward
to `<fixed IP>:22` (`ssh -J`), as on a real cloud a node without a floating IP is reached through one with.
Several labctl processes may serve the same world at once: listeners use SO_REUSEPORT and every node's host
key lives in its directory (`<node_dir>/ssh_host_ed25519_key`, created once, race-safe), so whichever process
the kernel hands a connection to presents the same key.

The cloud's firewall comes first: a connection to a node's public address is accepted, then the world's
`ingress_allowed(target, 22, Peer(client address))` decides (`labctl.testbed.firewall`); a refused one is
closed before the SSH version exchange. A jump host's forward to `<fixed IP>:22` asks the same with the jump
node as the source. A world without `ingress_allowed` (the tests' stand-ins) is open.

What a node offers, as a real Chameleon node would:

- public-key auth only, user `cc` only; the keys accepted are the target's `authorized_keys` plus the
  lines of `<node_dir>/home/.ssh/authorized_keys` (re-read on every attempt);
- exec requests run `bash -c <command>`, shells run `bash -i` (on a PTY when the client asks for one),
  with cwd and HOME `<node_dir>/home`, USER=cc, LABCTL_NODE=<name>, LABCTL_SERVER_ID=<server id>; the
  environment is otherwise minimal (PATH, LANG...), so the host's secrets do not leak into nodes;
- SFTP (and scp) confined to `<node_dir>/home`;
- local port forwarding (`ssh -L 8888:localhost:8888`) to the host's 127.0.0.1 only (the node's own localhost,
  not filtered), and to port 22 of a node on a network this node shares (its fixed IP there, e.g.
  192.168.1.12:22), if that node's firewall rules let this one in: the jump-host hop.

When the client goes away while a command is still running, the command's process group is killed.
Processes a command leaves running in the background (e.g. `nohup jupyter ... &`) survive the session, as
on a real node; they also survive the server's deletion (they carry LABCTL_SERVER_ID in their environment
so the world can find them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labctl.testbed.node_session import machine_session_class, node_home, run_session
from labctl.testbed.ssh_forwarding import FORWARD_HOSTS, forward_private, forward_tcp, private_destination

log = logging.getLogger(__name__)

HOST_KEY_NAME = "ssh_host_ed25519_key"
USER = "cc"
WORKERS = 32  # threads for blocking work (machine starts, firewall checks): mostly waiting, not computing
_ENV_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


def load_host_key(node_dir: Path):
    """The node's ed25519 host key, created on first use (race-safe across processes, mode 0600)."""
    import asyncssh

    from labctl.keys import write_private_file

    node_dir = Path(node_dir)
    node_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = node_dir / HOST_KEY_NAME
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"host key of {node_dir.name}")
        write_private_file(path, key.export_private_key("openssh"))
    return asyncssh.read_private_key(str(path))


def _parse_authorized(lines: list[str]) -> set[bytes]:
    """Public key blobs of authorized_keys lines; options and comments are ignored, bad lines skipped."""
    import asyncssh

    blobs: set[bytes] = set()
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        # "[options] keytype base64 [comment]": find the key type followed by its base64 blob
        for i in range(len(parts) - 1):
            if parts[i].startswith(("ssh-", "ecdsa-", "sk-")) and parts[i + 1].startswith("AAAA"):
                with contextlib.suppress(asyncssh.KeyImportError, ValueError):
                    blobs.add(asyncssh.import_public_key(f"{parts[i]} {parts[i + 1]}").public_data)
                break
    return blobs


@dataclass
class _Node:
    """One served target; `target` is refreshed on every poll (authorized keys may change)."""

    ident: tuple
    target: dict[str, Any]
    sshd: Any = None  # the SSHNodes serving it (resolves jump-host destinations)
    server: Any = None  # asyncssh listener
    conns: set = field(default_factory=set)
    pgids: set[int] = field(default_factory=set)

    @property
    def name(self) -> str:
        return str(self.target["name"])

    @property
    def node_dir(self) -> Path:
        return Path(self.target["node_dir"])

    def authorized(self) -> set[bytes]:
        lines = list(self.target.get("authorized_keys") or [])
        extra = self.node_dir / "home" / ".ssh" / "authorized_keys"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            lines += extra.read_text().splitlines()
        return _parse_authorized(lines)

    @property
    def users(self) -> set[str]:
        """Login names this node accepts: `cc` on Chameleon; the cloud's user (ubuntu, labctl) elsewhere."""
        return set(self.target.get("users") or [self.target.get("user") or USER])

    async def machine(self) -> Any:
        """The node's running machine (`node_machine.Machine`), or None when nodes are not machines here."""
        return await self.sshd.enter_machine(self.target) if self.sshd is not None else None

    @property
    def user(self) -> str:
        return self.target.get("user") or USER

    def env(self, home: Path) -> dict[str, str]:
        env = {k: os.environ[k] for k in _ENV_PASSTHROUGH if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env.update(
            HOME=str(home), USER=self.user, LOGNAME=self.user, SHELL="/bin/bash",
            LABCTL_NODE=self.name, LABCTL_SERVER_ID=str(self.target.get("server_id", "")),
        )
        return env


def _make_server_class():
    import asyncssh

    class NodeServer(asyncssh.SSHServer):
        def __init__(self, node: _Node) -> None:
            self.node = node
            self.conn = None

        def connection_made(self, conn) -> None:
            self.conn = conn
            self.node.conns.add(conn)

        def connection_lost(self, exc) -> None:
            self.node.conns.discard(self.conn)

        def begin_auth(self, username: str) -> bool:
            return True

        def password_auth_supported(self) -> bool:
            return False

        def kbdint_auth_supported(self) -> bool:
            return False

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key) -> bool:
            if username not in self.node.users:
                return False
            try:
                return key.public_data in self.node.authorized()
            except Exception:  # never let a bad file crash the connection
                log.exception("reading authorized keys of %s", self.node.name)
                return False

        def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int):
            if dest_host in FORWARD_HOSTS:
                return forward_tcp("127.0.0.1", dest_port)
            sshd = self.node.sshd
            hop = sshd.private_destination(self.node.target, dest_host, dest_port) if sshd else None
            if hop is not None:
                return sshd.forward_private(self.node.target, *hop)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                "emulated nodes forward only to 127.0.0.1 (use -L PORT:localhost:PORT) and to port 22 of "
                "nodes on a network they share",
            )

        def session_requested(self):
            # Only on a machine (no process factory in the options): every session, SFTP included, is ours.
            sshd = self.node.sshd
            if sshd is None or sshd.machine_session is None:
                return False
            return sshd.machine_session(sshd.process_factory(self.node), None, 3, False)

        def server_requested(self, listen_host: str, listen_port: int):
            return False  # no remote (-R) forwarding

    return NodeServer


class SSHNodes:
    """Serves SSH for every emulated node of `world` that is ACTIVE with a floating IP."""

    def __init__(self, world, poll_interval: float = 0.05, port: int | None = None,
                 machines: bool | None = None, port22: bool | None = None) -> None:
        self.world = world
        # Port 22 of the floating IPs too (`labctl.testbed.ssh_port22`): True = claim it for this world (`labctl
        # testbed serve`), None = share the claim this process holds for the same world, False = never.
        self.want_port22 = port22
        self._port22: Any = None
        # Nodes as machines (`labctl.testbed.node_machine`): None = wherever this host can, False = never.
        self.want_machines = machines
        # Each labctl process serves the nodes on a port of its own (`port`), so that a connection is never
        # served by another process that may exit while it runs; None = the ports the world gives.
        self.port = port
        self.poll_interval = poll_interval
        self._nodes: dict[tuple[str, int], _Node] = {}  # by (address, port); touched only in the loop
        self._listening: set[tuple[str, int]] = set()  # read from other threads
        self._retry_at: dict[tuple[str, int], tuple[float, float]] = {}  # (when, backoff) after a bind error
        self._targets: list[dict] = []  # the last poll's targets (for jump-host destinations)
        self._machine_dirs: set[str] = set()  # node dirs whose machine this process entered
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poll_pool: Any = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._server_class = None
        self.machine_session: Any = None  # the asyncssh session class of a machine (SFTP as a process)
        self.machines: Any = None  # NodeMachines when nodes are machines here (`labctl.testbed.node_machine`)

    # -- public API ---------------------------------------------------------------------------------
    def start(self) -> SSHNodes:
        if self._thread is not None:
            return self
        self._server_class = _make_server_class()
        from labctl.testbed import node_machine

        if self.machines is None and self.want_machines is not False and node_machine.nodes_are_machines():
            self.machines = node_machine.NodeMachines()
            self.machine_session = machine_session_class()
        if self.want_port22 is not False and self._port22 is None:
            from labctl.testbed import ssh_port22

            world_dir = getattr(self.world, "state_dir", None)
            if self.want_port22:
                self._port22 = ssh_port22.claim(str(world_dir)) if world_dir is not None else None
            else:
                self._port22 = ssh_port22.join(world_dir)
        self._started.clear()
        self._thread = threading.Thread(target=self._run, name="labctl-sshd", daemon=True)
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(self._stopping.set)
        thread.join(timeout)
        self._thread = None
        if self._port22 is not None:
            self._port22.release()
            self._port22 = None

    @property
    def port22(self) -> bool:
        """Whether the floating IPs answer SSH on port 22 too."""
        return self._port22 is not None

    def __enter__(self) -> SSHNodes:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def listening(self) -> set[tuple[str, int]]:
        """The (address, port) pairs served right now."""
        with self._lock:
            return set(self._listening)

    def wait_listening(self, address: str, port: int, timeout: float = 5.0) -> None:
        """Block until this instance serves (address, port); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (address, int(port)) in self.listening():
                return
            time.sleep(0.01)
        raise TimeoutError(f"no SSH listener on {address}:{port} after {timeout:g}s")

    def wait_stopped_listening(self, address: str, port: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (address, int(port)) not in self.listening():
                return
            time.sleep(0.01)
        raise TimeoutError(f"still listening on {address}:{port} after {timeout:g}s")

    # -- the loop -----------------------------------------------------------------------------------
    def _run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        loop = asyncio.new_event_loop()
        # Blocking work off the loop: starting a node's machine waits for its namespaces, and with the default
        # pool (6 threads on 2 cores) a class's machine starts queued the firewall checks and the openings of
        # new nodes' listeners behind them (nodes of a class refused SSH for seconds after they were ACTIVE).
        loop.set_default_executor(ThreadPoolExecutor(WORKERS, thread_name_prefix="labctl-sshd-work"))
        self._poll_pool = ThreadPoolExecutor(1, thread_name_prefix="labctl-sshd-poll")  # the world's poll, alone
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_default_executor())
            self._poll_pool.shutdown(wait=False, cancel_futures=True)
            loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self._started.set()
        try:
            while not self._stopping.is_set():
                try:
                    # Off the event loop: a world's query takes a while, and every SSH session waits on this loop.
                    targets = await asyncio.get_running_loop().run_in_executor(
                        self._poll_pool, lambda: list(self.world.ssh_targets()))
                    if self.port:
                        targets = [{**t, "port": self.port} for t in targets]
                except Exception as exc:
                    # The process is exiting: the executor refuses work ("cannot schedule new futures after
                    # [interpreter] shutdown") while the main thread still looks alive. Stop serving, quietly.
                    if isinstance(exc, RuntimeError) and "shutdown" in str(exc) or sys.is_finalizing():
                        return
                    log.exception("world.ssh_targets() failed; retrying")
                    targets = None
                if targets is not None:
                    await self._reconcile(targets)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.poll_interval)
        finally:
            for key in list(self._nodes):
                await self._close(key)
            if self.machines is not None:
                await _off_loop(self.machines.release_all)
            # let sessions whose connections were just closed kill their commands and finish
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if others:
                _, pending = await asyncio.wait(others, timeout=3)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    # -- firewalls ----------------------------------------------------------------------------------
    async def allowed(self, target: dict, port: int, peer) -> bool:
        """Whether the world's firewall rules let `peer` reach `port` of `target` (a world without
        `ingress_allowed` is open); asked once per connection, off the event loop."""
        check = getattr(self.world, "ingress_allowed", None)
        if check is None:
            return True
        try:
            return bool(await asyncio.get_running_loop().run_in_executor(None, check, target, port, peer))
        except Exception as exc:
            if not (isinstance(exc, RuntimeError) and "shutdown" in str(exc) or sys.is_finalizing()):
                log.exception("evaluating the firewall of %s for %s", target.get("name"), peer)
            return False

    @staticmethod
    def process_factory(node: _Node):
        async def serve(process) -> None:
            await run_session(node, process)

        return serve

    async def enter_machine(self, target: dict) -> Any:
        """`target`'s running machine (started on first use), or None when nodes are not machines here."""
        if self.machines is None:
            return None
        self._machine_dirs.add(str(target["node_dir"]))
        return await _off_loop(lambda: self.machines.enter(self._as_now(target)))

    def _as_now(self, target: dict) -> dict:
        """`target` as the world says now: a volume attached since the last poll is in the node at once, as it is
        on a real node once Cinder says it is attached (labctl's mount step may start before the next poll)."""
        server_id = target.get("server_id")
        if server_id is None:
            return target
        for current in self.world.ssh_targets():
            if current.get("server_id") == server_id:
                return current
        return target

    # -- jump-host hops (`labctl.testbed.ssh_forwarding`) ----------------------------------------------
    def private_destination(self, jump: dict, dest_host: str, dest_port: int) -> tuple[dict, str] | None:
        """(target, network) of the node at `dest_host:22` on a network `jump` is on, if any."""
        return private_destination(self._targets, jump, dest_host, dest_port)

    async def forward_private(self, jump: dict, dest: dict, network: str):
        """The jump host's connection to `<dest's fixed IP>:22`, through dest's firewall."""
        return await forward_private(self, jump, dest, network)

    async def _reconcile(self, targets: list[dict]) -> None:
        self._targets = targets
        wanted: dict[tuple[str, int], dict] = {}
        for t in targets:
            if t.get("address"):
                wanted[(str(t["address"]), int(t["port"]))] = t
                if self._port22 is not None:
                    wanted[(str(t["address"]), 22)] = t
            if t.get("internal_address"):
                wanted[(str(t["internal_address"]), int(t["port"]))] = t
        for key in list(self._nodes):
            t = wanted.get(key)
            if t is None or _ident(t, key) != self._nodes[key].ident:
                await self._close(key)
        if self.machines is not None:
            # A server deleted (or stopped): its machine ends once no process serves it.
            # The targets' own strings: a Path per node per poll was most of this loop's CPU at 200 nodes.
            served = {str(n.target["node_dir"]) for n in self._nodes.values()} | {
                str(t["node_dir"]) for t in wanted.values()}
            gone = [d for d in self._machine_dirs if d not in served]
            self._machine_dirs -= set(gone)
            for d in gone:
                await _off_loop(self.machines.release, Path(d))
        now = time.monotonic()
        new: list[tuple[tuple[str, int], dict]] = []
        for key, t in wanted.items():
            node = self._nodes.get(key)
            if node is not None:
                node.target = t
            elif now >= self._retry_at.get(key, (0.0, 0.0))[0]:
                new.append((key, t))
        # The nodes that became reachable since the last poll (a class's come in dozens) open together.
        await asyncio.gather(*(self._open_or_retry_later(key, t, now) for key, t in new))

    async def _open_or_retry_later(self, key: tuple[str, int], target: dict, now: float) -> None:
        try:
            await self._open(key, target)
            self._retry_at.pop(key, None)
        except Exception as exc:
            backoff = min(max(self._retry_at.get(key, (0.0, 0.0))[1] * 2, 0.5), 10.0)
            self._retry_at[key] = (now + backoff, backoff)
            log.warning("cannot serve SSH for %s on %s:%s: %s (retrying in %.1fs)",
                        target.get("name"), key[0], key[1], exc, backoff)

    async def _open(self, key: tuple[str, int], target: dict) -> None:
        import asyncssh

        node = _Node(ident=_ident(target, key), target=target, sshd=self)

        def prepare() -> Any:  # files, and a key made on first use: off the loop every session waits on
            node_home(node.node_dir)
            return load_host_key(node.node_dir)

        host_key = await _off_loop(prepare)
        if self.machines is not None:
            # Serving a node keeps its machine (started on the first session) alive in every process.
            self._machine_dirs.add(str(node.node_dir))
            await _off_loop(self.machines.use, node.node_dir)
        server_class = self._server_class

        home_sftp = _home_sftp_server_class()

        def sftp_factory(chan):
            return home_sftp(chan, chroot=os.fsencode(node_home(node.node_dir)))

        options = await asyncssh.SSHServerConnectionOptions.construct(
            server_factory=lambda: server_class(node),
            server_host_keys=[host_key],
            process_factory=None if self.machines else self.process_factory(node),
            # A machine runs OpenSSH's own sftp-server and scp inside the node (as its user); otherwise
            # asyncssh serves SFTP and scp, confined to the node's home directory.
            sftp_factory=None if self.machines else sftp_factory,
            allow_scp=not self.machines,
            encoding=None,
            line_editor=False,
            agent_forwarding=False,
            x11_forwarding=False,
            gss_host=None,
            login_timeout=30,
        )
        # The public address (floating / external IP) is behind the cloud's firewall; the internal one is
        # reached only through `forward_private`, which applies the rules itself.
        gated = key[0] == str(node.target.get("address") or "")
        node.server = _Listener(key, options, node, self if gated else None)
        self._nodes[key] = node
        with self._lock:
            self._listening.add(key)
        log.debug("serving SSH for %s on %s:%s", node.name, *key)

    async def _close(self, key: tuple[str, int]) -> None:
        node = self._nodes.pop(key, None)
        with self._lock:
            self._listening.discard(key)
        if node is None:
            return
        if node.server is not None:
            node.server.close()
        for conn in list(node.conns):
            conn.close()
        with contextlib.suppress(Exception):
            if node.server is not None:
                await asyncio.wait_for(node.server.wait_closed(), 2)
        for conn in list(node.conns):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 1)

def _home_sftp_server_class():
    import asyncssh

    class HomeSFTPServer(asyncssh.SFTPServer):
        """asyncssh's SFTP server, which ends the session by closing the channel without an exit status: OpenSSH's
        scp (SFTP mode) then exits 1 after copying. Send status 0 first, as sshd's sftp-server does."""

        def exit(self) -> None:
            super().exit()
            with contextlib.suppress(Exception):
                self.channel.exit(0)

    return HomeSFTPServer


class _Listener:
    """A node's SSH listener: accepts TCP connections on `key` (SO_REUSEPORT, so several processes may serve
    one world), and when `firewall` (the SSHNodes) is given, first asks the world's firewall whether the
    client may reach port 22; a refused connection is closed before the SSH version exchange (a real firewall
    drops the SYN, so a real client would time out instead)."""

    def __init__(self, key: tuple[str, int], options, node: _Node, firewall: SSHNodes | None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(key)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock, self.options, self.node, self.firewall = sock, options, node, firewall
        self.handlers: set[asyncio.Task] = set()
        self.task = asyncio.ensure_future(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, peer = await loop.sock_accept(self.sock)
            except OSError as exc:
                if self.sock.fileno() < 0:
                    return
                log.warning("accepting on %s: %s", self.sock, exc)
                await asyncio.sleep(0.05)
                continue
            task = asyncio.ensure_future(self._serve(client, peer[0]))
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)

    async def _serve(self, client: socket.socket, peer_ip: str) -> None:
        import asyncssh

        from labctl.testbed.firewall import Peer

        if self.firewall is not None and not await self.firewall.allowed(self.node.target, 22, Peer(peer_ip)):
            log.debug("firewall of %s: connection from %s to port 22 dropped", self.node.name, peer_ip)
            client.close()
            return
        try:
            await asyncssh.run_server(client, options=self.options)
        except (OSError, asyncssh.Error):
            pass  # the client went away, failed to authenticate, ...
        except Exception:
            log.exception("SSH connection to %s failed", self.node.name)

    def close(self) -> None:
        self.task.cancel()
        self.sock.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        pending = [t for t in self.handlers if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def _off_loop(fn, *args):
    """`fn(*args)` on the default executor; in this thread when the interpreter is exiting (the executor
    refuses work then), so that a node's machine is still released."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    except RuntimeError as exc:
        if "shutdown" not in str(exc) and not sys.is_finalizing():
            raise
        return fn(*args)


def _ident(target: dict, key: tuple[str, int]) -> tuple:
    return (str(target.get("server_id")), key[0], key[1], str(target["node_dir"]))
