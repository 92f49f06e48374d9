"""The emulated EC2 for the AWS tests: one moto daemon per test module (over a tmp dir), stopped at the end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def aws_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("aws-testbed")


@pytest.fixture(scope="module")
def emu(aws_dir: Path):
    from labctl.testbed.aws import start_aws, stop_moto

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    emulator = start_aws(aws_dir)
    try:
        yield emulator
    finally:
        emulator.stop()
        stop_moto(aws_dir)
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _fresh_controls(request: pytest.FixtureRequest):
    """Each test starts without limits, faults or boot time (the moto state itself is shared)."""
    yield
    if "emu" in request.fixturenames:
        request.getfixturevalue("emu").world.reset_controls()
