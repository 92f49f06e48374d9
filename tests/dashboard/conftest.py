"""Fixtures for the dashboard: a class written into a real state store (SQLite and PostgreSQL) through the store's
own API, as `class up` writes it, and a dashboard served on loopback over it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

COURSE, LAB = "ml-sys", "hello"
HOSTILE_ID = '<img src=x onerror="document.title=\'pwned\'">&amp;<script>alert(1)</script>'
HOSTILE_ERROR = "<b>bold</b> quota exceeded <i>really</i>"


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty state database on each backend (PostgreSQL: the session's server, see tests/pgserver.py)."""
    local = tmp_path / "local-state"
    monkeypatch.setenv("LABCTL_STATE_DIR", str(local))
    monkeypatch.delenv("LABCTL_STATE_URL", raising=False)
    if request.param == "sqlite":
        return f"sqlite://{local / 'state.db'}"
    return request.getfixturevalue("pg_server").new_database()


@pytest.fixture
def ctx(state_url: str) -> Iterator[Any]:
    from labctl.service import Context
    from labctl.state import StateStore

    store = StateStore.open(state_url)
    yield Context(store, "staff")
    store.close()


def add_student(store: Any, student: str, site: str, status: str, *, node_types: tuple[str, ...] = (),
                lease_end: str | None = None, error: str | None = None, course: str = COURSE,
                lab: str = LAB, name: str = "") -> str:
    """One student's environment as class up records it: the deployment (student, nodes, lease end, error) and a
    server resource per node whose type is known. Returns the deployment id."""
    from labctl.state import DeploymentRecord

    dep_id = f"labctl-{course}-{lab}-{len(store.deployments()) + 1}"
    nodes = [[f"node-{i + 1}", "node"] for i in range(max(1, len(node_types)))]
    data: dict[str, Any] = {"student": {"id": student, "name": name or f"Name of {student}", "email": "s@uni.edu"},
                            "nodes": nodes}
    if lease_end:
        data["lease_end"] = lease_end
    if error:
        data["error"] = error
    store.save_deployment(DeploymentRecord(dep_id, lab, lab, f"owner{len(store.deployments())}", course, site,
                                           status, None, data))
    for (node, _), node_type in zip(nodes, node_types, strict=False):
        store.record_resource(dep_id, f"server:{node}", "ready", cloud_id=f"i-{node}",
                              data={"node_type": node_type, "server_status": "ACTIVE"}, kind="server")
    return dep_id


@dataclass
class Served:
    board: Any
    server: Any
    url: str

    @property
    def port(self) -> int:
        return self.server.server_port


@pytest.fixture
def served(ctx: Any) -> Iterator[Served]:
    """A dashboard of COURSE/LAB on 127.0.0.1, any free port, polling fast (0.2 s) for the browser test."""
    from labctl.dashboard import Dashboard, Prices
    from labctl.pricing import load_prices

    board = Dashboard(ctx, LAB, COURSE, Prices(load_prices()), poll_seconds=0.2)
    server = board.serve(0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Served(board, server, board.url(server.server_port))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
