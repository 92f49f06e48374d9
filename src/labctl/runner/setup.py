"""The lab's setup steps over SSH: uploads (confined to the lab's directories), commands with timeouts, per-node
logs (secrets masked), progress kept in labctl's state so a rerun resumes at the failed step."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from labctl import inputs
from labctl import redact as _redact
from labctl.runner.reach import (
    HostKeyChanged,
    HostKeyStore,
    Jumps,
    NodeTarget,
    StageCallback,
    classify,
    connect_pinning,
    run_sync,
    wait_all,
)

LOG_TAIL_LINES = 20
# Inline scripts up to this size run as `bash -lc <script>`; bigger ones are uploaded first (ARG_MAX).
INLINE_SCRIPT_LIMIT = 64 * 1024
# Extra seconds the client waits after a step's timeout for the node's own `timeout` to report.
TIMEOUT_GRACE = 15.0
TIMEOUT_EXIT = 124  # coreutils timeout(1)

EventCallback = Callable[[str, str, str], Any]  # (node, step name, status)


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


@dataclass
class WaitFirst:
    """`run_setup` first waits for SSH on every target, as `wait_for_ssh` with these arguments does, and runs
    the steps over the connections that wait opened."""

    timeout: float
    on_stage: StageCallback | None = None
    blocked_after: float | None = None
    connect_timeout: float = 10


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


class NodeLog:
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
              connect_timeout: float = 30, wait_first: WaitFirst | None = None) -> dict[str, NodeResult]:
    """Run `steps` in order; each on all of its nodes in parallel, the next once it finished everywhere.

    Per node: steps in `progress.steps_done(node)` are skipped ("already-done"), a step with `skip_reason`
    is marked "skipped", otherwise uploads go first (SFTP) and the command runs as `bash -lc <command>` with
    stdin at EOF. Output and a header/footer per step are appended to `<log_dir>/<node>.log` (strings in
    `redact` are masked). A non-zero exit, the step's timeout or an SSH error marks the step "failed" and
    stops that node (others go on); rerunning resumes at the failed step. `on_event(node, step, status)`
    reports running | done | failed | skipped | already-done. Raises `HostKeyChanged` (after marking the
    step failed) when a node's host key no longer matches. With `wait_first`, waits for SSH first and raises
    what `wait_for_ssh` raises, before any step runs.
    """
    by_name = {t.name: t for t in targets}
    unknown = sorted({n for s in steps for n in s.nodes} - by_name.keys())
    if unknown:
        raise ValueError(f"setup steps name nodes that are not SSH targets: {', '.join(unknown)}")
    log_dir = Path(log_dir)
    _private_log_dir(log_dir)
    logs = {t.name: NodeLog(log_dir / f"{t.name}.log", list(redact)) for t in targets}
    failed: dict[str, str] = run_sync(
        lambda: _setup_all(by_name, steps, Path(key_path), hostkeys, progress, logs, on_event,
                           max(1, max_parallel), connect_timeout, wait_first)
    )
    return {
        name: NodeResult(node=name, ok=name not in failed, failed_step=failed.get(name),
                         log_path=logs[name].path, log_tail=logs[name].tail())
        for name in by_name
    }


async def _setup_all(by_name, steps, key_path, hostkeys, progress, logs, on_event, max_parallel,
                     connect_timeout, wait_first) -> dict[str, str]:
    sem = asyncio.Semaphore(max_parallel)
    conns: dict[str, Any] = {}
    failed: dict[str, str] = {}
    total = len(steps)
    jumps = Jumps(key_path, hostkeys, wait_first.on_stage if wait_first else None)
    runner = _StepRunner(by_name, key_path, hostkeys, progress, logs, on_event, conns, connect_timeout, jumps)
    try:
        if wait_first:
            await wait_all(list(by_name.values()), key_path, hostkeys, wait_first.timeout, wait_first.on_stage,
                           wait_first.connect_timeout, wait_first.blocked_after, jumps=jumps, keep=conns)
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
        await jumps.close()
    return failed


class _StepRunner:
    def __init__(self, by_name, key_path, hostkeys, progress, logs, on_event, conns, connect_timeout,
                 jumps: Jumps) -> None:
        self.by_name: dict[str, NodeTarget] = by_name
        self.key_path = key_path
        self.hostkeys = hostkeys
        self.progress = progress
        self.logs: dict[str, NodeLog] = logs
        self.on_event = on_event
        self.conns = conns
        self.connect_timeout = connect_timeout
        self.jumps = jumps
        self.done_before: dict[str, set[int]] = {}  # per node, the steps an earlier run finished: read once

    def _event(self, node: str, step: str, status: str) -> None:
        if self.on_event:
            self.on_event(node, step, status)

    async def _conn(self, node: str):
        conn = self.conns.get(node)
        if conn is not None and not conn.is_closed():
            return conn
        import asyncssh

        target = self.by_name[node]
        # A node that answered before can drop one handshake (sshd restarting, a load balancer, a listener
        # going away): try a few times before failing the step. Nothing has run yet, so this is safe.
        for attempt in range(3):
            try:
                # A node behind a jump host: over the one shared connection to it (reopened if it died).
                tunnel = await self.jumps.get(target.via, self.connect_timeout) if target.via else None
                conn = await connect_pinning(target, self.key_path, self.hostkeys, self.connect_timeout,
                                             tunnel=tunnel)
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
        done_before = self.done_before.get(node)
        if done_before is None:
            done_before = self.done_before[node] = set(await asyncio.to_thread(self.progress.steps_done, node))
        if step.index in done_before:
            log.line(f"==> {label} on {node}: already done ({_now()})")
            self._event(node, step.name, "already-done")
            return True
        if step.skip_reason:
            log.line(f"==> {label} on {node}: skipped: {step.skip_reason} ({_now()})")
            await asyncio.to_thread(self.progress.mark_step, node, step.index, step.name, "skipped", step.skip_reason)
            self._event(node, step.name, "skipped")
            return True

        log.line(f"==> {label} on {node} ({_now()})")
        await asyncio.to_thread(self.progress.mark_step, node, step.index, step.name, "running")
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
            detail = f"SSH error: {classify(exc)[1]}"
            self.conns.pop(node, None)
        finally:
            log.flush()
            elapsed = time.monotonic() - started
            why = f" ({detail})" if detail else ""
            log.line(f"<== {label} on {node}: {status}{why} after {elapsed:.1f}s")
            await asyncio.to_thread(self.progress.mark_step, node, step.index, step.name, status, detail)
            self._event(node, step.name, status)
        return status == "done"

    async def _execute(self, node: str, step: SetupStep, log: NodeLog) -> tuple[str, str]:
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

    async def _start(self, node: str, step: SetupStep, log: NodeLog, deadline: float) -> tuple:
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

    async def _upload(self, conn, step: SetupStep, log: NodeLog, script: str | None) -> str:
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
