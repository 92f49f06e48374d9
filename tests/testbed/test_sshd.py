"""SSH for emulated nodes, exercised with asyncssh clients (the runner tests use the system ssh client)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import asyncssh
import pytest

from labctl.keys import ensure_keypair, fingerprint
from labctl.testbed.sshd import HOST_KEY_NAME, SSHNodes, load_host_key


class StandInWorld:
    """Stand-in for testbed.World: only `ssh_targets()`."""

    def __init__(self) -> None:
        self.targets: list[dict] = []

    def ssh_targets(self) -> list[dict]:
        return list(self.targets)


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@pytest.fixture
def node(tmp_path):
    key = ensure_keypair(tmp_path / "keys")
    address = "127.10.9.21"
    port = _free_port(address)
    world = StandInWorld()
    node_dir = tmp_path / "world" / "n1"
    world.targets.append({"server_id": "srv-1", "site": "chi@uc", "name": "n1", "address": address,
                          "port": port, "authorized_keys": [key.public_key], "node_dir": node_dir})
    nodes = SSHNodes(world, poll_interval=0.02, machines=False).start()
    nodes.wait_listening(address, port, 5)
    try:
        yield {"key": key, "address": address, "port": port, "world": world, "dir": node_dir, "nodes": nodes}
    finally:
        nodes.stop()


def _connect(node, username: str = "cc", key_path: Path | None = None):
    host_key = asyncssh.read_private_key(str(node["dir"] / HOST_KEY_NAME)).convert_to_public()
    return asyncssh.connect(
        node["address"], node["port"], username=username, known_hosts=([host_key], [], []),
        client_keys=[str(key_path or node["key"].private_path)], agent_path=None, config=[],
        connect_timeout=5,
    )


def test_keypair_created_once_with_private_permissions(tmp_path):
    kp = ensure_keypair(tmp_path / "k")
    assert kp.private_path == tmp_path / "k" / "id_ed25519"
    assert kp.public_key.startswith("ssh-ed25519 AAAA") and kp.public_key.endswith(" labctl")
    assert kp.private_path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o700
    assert kp.public_path.read_text().strip() == kp.public_key
    assert ensure_keypair(tmp_path / "k") == kp
    out = subprocess.run(["ssh-keygen", "-lf", str(kp.public_path)], capture_output=True, text=True)
    assert kp.fingerprint == fingerprint(kp.public_key) and kp.fingerprint in out.stdout


def test_host_key_is_stable_and_race_safe(tmp_path):
    node_dir = tmp_path / "n"
    keys = []
    threads = [threading.Thread(target=lambda: keys.append(load_host_key(node_dir))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({k.export_public_key() for k in keys}) == 1
    path = node_dir / HOST_KEY_NAME
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_host_key(node_dir).export_public_key() == keys[0].export_public_key()
    assert [p.name for p in node_dir.iterdir()] == [HOST_KEY_NAME]  # no temp files left


def test_exec_env_stdin_and_exit_status(node):
    async def main():
        async with _connect(node) as conn:
            r = await conn.run('echo "$HOME|$PWD|$USER|$LABCTL_NODE"; cat; echo err >&2; exit 5',
                               input="from stdin\n")
            assert r.exit_status == 5
            home = node["dir"] / "home"
            assert r.stdout == f"{home}|{home}|cc|n1\nfrom stdin\n"
            assert r.stderr == "err\n"
            r = await conn.run("kill -TERM $$")
            assert r.exit_signal[0] == "TERM"

    asyncio.run(main())


def test_only_cc_with_an_authorised_key(node, tmp_path):
    other = ensure_keypair(tmp_path / "other")

    async def main():
        with pytest.raises(asyncssh.PermissionDenied):
            async with _connect(node, username="root"):
                pass
        with pytest.raises(asyncssh.PermissionDenied):
            async with _connect(node, key_path=other.private_path):
                pass
        ssh_dir = node["dir"] / "home" / ".ssh"
        ssh_dir.mkdir(parents=True)
        (ssh_dir / "authorized_keys").write_text(f"# comment\nnot a key\n{other.public_key}\n")
        async with _connect(node, key_path=other.private_path) as conn:
            assert (await conn.run("echo ok")).stdout == "ok\n"
        # the world's list is re-read too: dropping the key there locks the labctl key out
        node["world"].targets[0] = {**node["world"].targets[0], "authorized_keys": []}
        await asyncio.sleep(0.1)
        with pytest.raises(asyncssh.PermissionDenied):
            async with _connect(node):
                pass

    asyncio.run(main())


def test_interactive_shell_on_a_pty(node):
    async def main():
        async with _connect(node) as conn:
            proc = await conn.create_process(term_type="xterm-256color", term_size=(100, 30))
            proc.stdin.write("echo TERM=$TERM; stty size; tty\n")
            out = ""
            while "/dev/pts/" not in out:
                out += await asyncio.wait_for(proc.stdout.read(1024), 10)
            proc.change_terminal_size(120, 40)
            await asyncio.sleep(0.1)
            proc.stdin.write("stty size; exit 4\n")
            result = await asyncio.wait_for(proc.wait(), 10)
            assert result.exit_status == 4
            assert "TERM=xterm-256color" in out and "30 100" in out
            assert "40 120" in result.stdout

    asyncio.run(main())


def test_sftp_is_confined_to_home(node, tmp_path):
    local = tmp_path / "f.txt"
    local.write_text("data")

    async def main():
        async with _connect(node) as conn, conn.start_sftp_client() as sftp:
            await sftp.makedirs("a/b", exist_ok=True)
            await sftp.put(str(local), "a/b/f.txt")
            await sftp.put(str(local), "/top.txt")
            assert await sftp.realpath("../../..") == "/"
            assert sorted(await sftp.listdir("/")) == [".", "..", "a", "top.txt"]

    asyncio.run(main())
    home = node["dir"] / "home"
    assert (home / "a" / "b" / "f.txt").read_text() == "data"
    assert (home / "top.txt").read_text() == "data"


def test_forwarding_only_to_localhost(node):
    async def main():
        async def echo(reader, writer):
            writer.write(await reader.read(100))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, _connect(node) as conn:
            for host in ("localhost", "127.0.0.1"):
                reader, writer = await conn.open_connection(host, port)
                writer.write(b"ping")
                assert await reader.read(100) == b"ping"
                writer.close()
            with pytest.raises(asyncssh.ChannelOpenError, match="only to 127.0.0.1"):
                await conn.open_connection(node["address"], port)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("example.com", 80)

    asyncio.run(main())


def test_disconnect_kills_the_running_command(node):
    pid_file = node["dir"] / "home" / "pid"

    async def main():
        async with _connect(node) as conn:
            proc = await conn.create_process("echo $$ > pid; exec sleep 60")
            for _ in range(200):
                if pid_file.exists() and pid_file.read_text().strip():
                    break
                await asyncio.sleep(0.01)
            proc.close()
        return int(pid_file.read_text())

    pid = asyncio.run(main())
    for _ in range(300):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the command survived its SSH session")


def test_deleted_target_stops_listening_and_shared_serving(node):
    address, port = node["address"], node["port"]
    # as if another labctl process served the same world
    second = SSHNodes(node["world"], poll_interval=0.02, machines=False).start()
    try:
        second.wait_listening(address, port, 5)

        async def run_some():
            for _ in range(4):
                async with _connect(node) as conn:
                    assert (await conn.run("echo up")).stdout == "up\n"

        asyncio.run(run_some())
        node["world"].targets.clear()
        node["nodes"].wait_stopped_listening(address, port, 5)
        second.wait_stopped_listening(address, port, 5)
        with pytest.raises(ConnectionRefusedError), socket.create_connection((address, port), timeout=2):
            pass
    finally:
        second.stop()
