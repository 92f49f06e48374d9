"""The commands of one SSH session on an emulated node: exec requests (`bash -c`), shells (`bash -i`, on a PTY
when the client asks for one), their exit status or signal, and what happens when the client goes away (the
command's process group gets SIGHUP, then SIGKILL, as sshd does).

`node` is the sshd's view of one node: `name`, `node_dir`, `env(home)`, and `pgids` (the running sessions'
process groups).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import pty
import signal
import struct
import sys
import termios
from pathlib import Path
from typing import Any

log = logging.getLogger("labctl.testbed.sshd")

# Child of a PTY session: become a session leader, take the PTY as controlling terminal, exec the shell.
_PTY_CHILD = (
    "import fcntl, os, sys, termios\n"
    "os.setsid()\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)



def node_home(node_dir: Path) -> Path:
    home = Path(node_dir) / "home"
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


def machine_session_class():
    """asyncssh's server process, except that the `sftp` subsystem, too, goes to our process factory (which runs
    OpenSSH's sftp-server inside the node, as the node's user): asyncssh would serve it itself."""
    import inspect

    import asyncssh
    from asyncssh.constants import EXTENDED_DATA_STDERR

    class MachineSession(asyncssh.SSHServerProcess):
        def subsystem_requested(self, subsystem: str) -> bool:
            return subsystem == "sftp"

        def session_started(self) -> None:
            if self.channel.get_subsystem() != "sftp":
                super().session_started()
                return
            chan = self.channel
            handler = self._start_process(asyncssh.SSHReader(self, chan), asyncssh.SSHWriter(self, chan),
                                          asyncssh.SSHWriter(self, chan, EXTENDED_DATA_STDERR))
            if inspect.isawaitable(handler):
                chan.get_connection().create_task(handler)

    return MachineSession


async def run_session(node: Any, process) -> None:
    """Serve one session: on the node's machine when it has one (`node.machine()`), else on this host."""
    try:
        machine = await node.machine()
        sftp = machine is not None and process.subsystem == "sftp"
        if process.subsystem and not sftp:
            process.stderr.write(f"subsystem {process.subsystem!r} is not supported\n".encode())
            process.exit(1)
            return
        home = node_home(node.node_dir) if machine is None else Path(machine.home)
        env = node.env(home)
        term = process.term_type
        shell = ["bash", "-i"] if term else ["bash"]
        argv = shell if process.command is None else ["bash", "-c", process.command]
        cwd = home
        if machine is not None:
            from labctl.testbed.node_machine import PATH, sftp_server

            env["PATH"] = PATH
            argv = machine.wrap([str(sftp_server())] if sftp else argv)
            cwd = node.node_dir  # nsenter's own directory on this host; the command starts in the node's home
        if term and not sftp:
            env["TERM"] = term
            status = await _run_pty(node, process, argv, cwd, env)
        else:
            status = await _run_pipes(node, process, argv, cwd, env)
        if status is None:
            return  # the client went away
        if status >= 0:
            process.exit(status)
        else:
            process.exit_with_signal(signal.Signals(-status).name.removeprefix("SIG"))
    except Exception:
        log.exception("SSH session on %s failed", node.name)
        with contextlib.suppress(Exception):
            process.exit(255)


async def _supervise(node: Any, process, proc, pumps: list[asyncio.Task]) -> int | None:
    """Wait for the command, or for the channel to close first (then kill its process group)."""
    node.pgids.add(proc.pid)
    waiter = asyncio.ensure_future(proc.wait())
    closed = asyncio.ensure_future(process.wait_closed())
    try:
        await asyncio.wait({waiter, closed}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            await _kill_group(proc)
            for t in pumps:
                t.cancel()
            return None
        return proc.returncode
    finally:
        closed.cancel()
        node.pgids.discard(proc.pid)
        if not waiter.done():
            waiter.cancel()

async def _run_pipes(node: Any, process, argv, cwd, env) -> int | None:
    import asyncssh

    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, start_new_session=True,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )

    async def pump_out(reader, writer):
        while data := await reader.read(65536):
            try:
                writer.write(data)
                await writer.drain()
            except (BrokenPipeError, ConnectionError, asyncssh.Error):
                return

    async def pump_in():
        try:
            while True:
                try:
                    data = await process.stdin.read(65536)
                except asyncssh.SignalReceived as sig:
                    _signal_group(proc.pid, sig.signal)
                    continue
                except (asyncssh.TerminalSizeChanged, asyncssh.BreakReceived):
                    continue
                if not data:
                    break
                proc.stdin.write(data)
                await proc.stdin.drain()
        except (BrokenPipeError, ConnectionError, asyncssh.Error):
            pass
        finally:
            with contextlib.suppress(Exception):
                proc.stdin.close()

    outs = [asyncio.ensure_future(pump_out(proc.stdout, process.stdout)),
            asyncio.ensure_future(pump_out(proc.stderr, process.stderr))]
    feeder = asyncio.ensure_future(pump_in())
    try:
        status = await _supervise(node, process, proc, [*outs, feeder])
        if status is not None:
            # Output written before the exit must reach the client before the exit status. Like sshd,
            # wait for EOF on the pipes (a background child holding them keeps the session open) unless
            # the client closes the channel first.
            drained = asyncio.ensure_future(asyncio.gather(*outs, return_exceptions=True))
            closed = asyncio.ensure_future(process.wait_closed())
            await asyncio.wait({drained, closed}, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            if not drained.done():
                drained.cancel()
                return None
        return status
    finally:
        feeder.cancel()
        for t in outs:
            t.cancel()

async def _run_pty(node: Any, process, argv, cwd, env) -> int | None:
    import asyncssh

    loop = asyncio.get_running_loop()
    master, slave = pty.openpty()
    try:
        _set_winsize(slave, process.term_size)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-c", _PTY_CHILD, *argv,
            cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    eof = loop.create_future()

    def on_readable():
        try:
            data = os.read(master, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: every slave fd closed
            data = b""
        if not data:
            loop.remove_reader(master)
            if not eof.done():
                eof.set_result(None)
            return
        with contextlib.suppress(Exception):
            process.stdout.write(data)

    loop.add_reader(master, on_readable)

    async def pump_in():
        try:
            while True:
                try:
                    data = await process.stdin.read(65536)
                except asyncssh.TerminalSizeChanged as change:
                    _set_winsize(master, (change.width, change.height, change.pixwidth, change.pixheight))
                    continue
                except asyncssh.SignalReceived as sig:
                    _signal_group(proc.pid, sig.signal)
                    continue
                except asyncssh.BreakReceived:
                    continue
                if not data:
                    return
                while data:
                    try:
                        n = os.write(master, data)
                        data = data[n:]
                    except BlockingIOError:
                        await asyncio.sleep(0.01)
        except (OSError, asyncssh.Error):
            pass

    feeder = asyncio.ensure_future(pump_in())
    try:
        status = await _supervise(node, process, proc, [feeder])
        if status is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(eof), 1.0)
        return status
    finally:
        feeder.cancel()
        loop.remove_reader(master)
        os.close(master)



def _set_winsize(fd: int, size) -> None:
    width, height, pixwidth, pixheight = (tuple(size) + (0, 0, 0, 0))[:4]
    if width and height:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, pixwidth, pixheight))


def _signal_group(pgid: int, name: str) -> None:
    signum = getattr(signal, "SIG" + str(name).upper().removeprefix("SIG"), None)
    if signum is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)


async def _kill_group(proc) -> None:
    """SIGHUP then SIGKILL the session's process group, as sshd does when a client disconnects."""
    for sig, grace in ((signal.SIGHUP, 1.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        except OSError as exc:
            if exc.errno != errno.EPERM:
                raise
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), grace)
            return
