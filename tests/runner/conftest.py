"""Fixtures for the SSH runner tests: a stand-in testbed world served by real SSH on loopback."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from labctl.keys import KeyPair, ensure_keypair
from labctl.runner.ssh import NodeTarget
from labctl.testbed.sshd import SSHNodes


class FakeWorld:
    """Stand-in for testbed.World: only `ssh_targets()`."""

    def __init__(self) -> None:
        self.targets: list[dict] = []

    def ssh_targets(self) -> list[dict]:
        return list(self.targets)


class MemStore:
    """In-memory HostKeyStore + ProgressStore."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.status: dict[tuple[str, int], tuple[str, str]] = {}
        self.marks: list[tuple[str, int, str, str]] = []

    def get_host_key(self, node: str) -> str | None:
        return self.keys.get(node)

    def pin_host_key(self, node: str, host: str, port: int, key: str) -> None:
        self.keys[node] = key

    def steps_done(self, node: str) -> set[int]:
        return {i for (n, i), (s, _) in self.status.items() if n == node and s == "done"}

    def mark_step(self, node: str, index: int, name: str, status: str, detail: str = "") -> None:
        self.status[(node, index)] = (status, detail)
        self.marks.append((node, index, name, status))


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    tmp: Path
    key: KeyPair
    world: FakeWorld
    store: MemStore
    port: int
    targets: list[NodeTarget]
    sshd: SSHNodes | None = None
    extra: list[SSHNodes] = field(default_factory=list)

    def node_dir(self, name: str) -> Path:
        return self.tmp / "world" / name

    def start(self) -> SSHNodes:
        self.sshd = SSHNodes(self.world, poll_interval=0.02, machines=False).start()
        for t in self.targets:
            self.sshd.wait_listening(t.host, t.port, 5)
        return self.sshd

    def stop(self) -> None:
        if self.sshd is not None:
            self.sshd.stop()
            self.sshd = None


@pytest.fixture
def lab(tmp_path: Path):
    key = ensure_keypair(tmp_path / "keys")
    port = free_port("127.10.9.11")
    world = FakeWorld()
    targets = []
    for i, name in enumerate(["n1", "n2"], 11):
        address = f"127.10.9.{i}"
        world.targets.append({
            "server_id": f"srv-{name}", "site": "chi@tacc", "name": name, "address": address, "port": port,
            "authorized_keys": [key.public_key], "node_dir": tmp_path / "world" / name,
        })
        targets.append(NodeTarget(name=name, host=address, port=port, user="cc"))
    lab = Lab(tmp=tmp_path, key=key, world=world, store=MemStore(), port=port, targets=targets)
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture
def mem_store():
    """The MemStore class (HostKeyStore + ProgressStore in memory)."""
    return MemStore


@pytest.fixture
def port_for():
    """free_port(address): a TCP port free on that loopback address."""
    return free_port
