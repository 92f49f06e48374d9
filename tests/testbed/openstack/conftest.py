"""The emulated Chameleon for the OpenStack API tests: one world per test, without SSH."""

from __future__ import annotations

import pytest

from labctl.testbed import Testbed

SCALE = 0.001  # the testbed's time scale: a lease starts and a server boots in a few milliseconds


@pytest.fixture
def tb(tmp_path):
    with Testbed.start(tmp_path / "world", time_scale=SCALE, ssh=False) as testbed:
        yield testbed
