"""Fixtures for the Compute Engine emulator and the GCP adapter: real google-cloud-compute clients over HTTP
to an emulator on 127.0.0.1, state under tmp_path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from labctl.testbed.gce import GceEmulator, start_gce

TIME_SCALE = 0.002


@pytest.fixture
def emu(tmp_path: Path):
    emulator = start_gce(tmp_path / "testbed", time_scale=TIME_SCALE)
    try:
        yield emulator
    finally:
        emulator.stop()


@dataclass
class Clients:
    emu: GceEmulator
    project: str
    _made: dict

    def __getattr__(self, name: str) -> Any:
        """clients.InstancesClient, clients.ZoneOperationsClient, ... (built once, on the emulator)."""
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._made:
            from google.cloud import compute_v1

            self._made[name] = getattr(compute_v1, name)(
                credentials=self.emu.credentials(), client_options={"api_endpoint": self.emu.endpoint})
        return self._made[name]


@pytest.fixture
def clients(emu: GceEmulator) -> Clients:
    return Clients(emu, emu.project, {})


class StandInTestbed:
    """What `labctl.testbed.Testbed` offers the GCP adapter: `.gce()` returns the running emulator."""

    def __init__(self, emulator: GceEmulator):
        self._emu = emulator
        self.calls = 0

    def gce(self) -> GceEmulator:
        self.calls += 1
        return self._emu


@pytest.fixture
def testbed(emu: GceEmulator) -> StandInTestbed:
    return StandInTestbed(emu)
