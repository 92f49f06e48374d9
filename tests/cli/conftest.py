"""Fixtures of the CLI tests: a private labctl home whose output is read as a user reads it."""

from __future__ import annotations

import pytest

from labctl.state import StateStore


@pytest.fixture
def home(labctl_env, monkeypatch, tmp_path):
    monkeypatch.delenv("LABCTL_STATE_URL", raising=False)
    monkeypatch.delenv("LABCTL_COURSE", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "80")  # off a terminal labctl must not cut to it
    return tmp_path


@pytest.fixture
def store(home):
    with StateStore() as s:
        yield s
