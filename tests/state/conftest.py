"""Fixtures for the state store: the same tests on SQLite and on a real PostgreSQL server.

The PostgreSQL server is started once per session in a temp dir (initdb + pg_ctl, trust auth, listening on
127.0.0.1 only, on a free port) and stopped at the end; every test gets a fresh database on it. Without
PostgreSQL binaries the PostgreSQL cases are skipped -- except on CI (CI=true), where they must run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.pgserver import PgServer  # noqa: E402,F401  (the server fixture lives in tests/conftest.py)


@pytest.fixture
def state_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private local state dir (keys, logs) and no inherited LABCTL_STATE_URL."""
    local = tmp_path / "local-state"
    monkeypatch.setenv("LABCTL_STATE_DIR", str(local))
    monkeypatch.delenv("LABCTL_STATE_URL", raising=False)
    return local


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, state_env: Path) -> str:
    """The URL of a fresh, empty state database on each backend."""
    if request.param == "sqlite":
        return f"sqlite://{state_env / 'state.db'}"
    server: PgServer = request.getfixturevalue("pg_server")
    return server.new_database()


@pytest.fixture
def store(state_url: str):
    from labctl.state import StateStore

    s = StateStore.open(state_url)
    yield s
    s.close()
