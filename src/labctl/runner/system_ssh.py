"""The system OpenSSH client: a known_hosts file of labctl's pinned host keys and the `ssh` argv that trusts
only them (what `labctl ssh` execs)."""

from __future__ import annotations

import os
import shlex
import threading
from collections.abc import Sequence
from pathlib import Path

from labctl.errors import SetupFailed
from labctl.runner.reach import HostKeyStore, NodeTarget


def _write_private(path: Path, text: str) -> None:
    # The directory too: known_hosts/ under the state dir holds which hosts a user reaches (0700, not umask's 0755).
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)



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
