"""Shared fixtures: an isolated labctl home per test, and the loopback guard for every process."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from tests.pgserver import pg_server  # noqa: F401  (a real PostgreSQL server, session-wide)

GUARD_DIR = Path(__file__).parent / "loopback_guard"

# Guard this process too: nothing in the tests may reach an address outside 127.0.0.0/8.
os.environ["NO_GCE_CHECK"] = "True"
_spec = importlib.util.spec_from_file_location("_loopback_guard", GUARD_DIR / "sitecustomize.py")
assert _spec and _spec.loader
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the developer's own labctl config (user sites.yaml): an empty config dir each."""
    monkeypatch.setenv("LABCTL_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))


@pytest.fixture
def labctl_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> dict[str, str]:
    """Environment for running labctl in a private home: state, testbed world, config, no real creds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "AWS_", "GOOGLE_"))}
    env.update(
        LABCTL_STATE_DIR=str(tmp_path / "state"),
        LABCTL_TESTBED_DIR=str(tmp_path / "testbed"),
        LABCTL_CONFIG_DIR=str(tmp_path / "config"),
        LABCTL_TESTBED_TIME_SCALE=os.environ.get("LABCTL_TEST_TIME_SCALE", "0.002"),
        LABCTL_OWNER="student1",
        PYTHONPATH=os.pathsep.join([str(GUARD_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        NO_COLOR="1",
        NO_GCE_CHECK="True",  # google-auth must not probe the GCE metadata server (169.254.169.254)
        COLUMNS="200",
        HOME=str(tmp_path / "home"),
    )
    (tmp_path / "home").mkdir()
    for key in list(os.environ):
        if key.startswith(("OS_", "AWS_", "GOOGLE_")):
            monkeypatch.delenv(key)
    request.addfinalizer(lambda: _stop_moto(tmp_path / "testbed" / "aws"))
    for key in ("LABCTL_STATE_DIR", "LABCTL_TESTBED_DIR", "LABCTL_CONFIG_DIR", "LABCTL_TESTBED_TIME_SCALE",
                "LABCTL_OWNER"):
        monkeypatch.setenv(key, env[key])
    return env


LABCTL = [sys.executable, "-m", "labctl"]


def _stop_moto(state_dir: Path) -> None:
    """A test that used --site sim-aws left a moto daemon for its testbed: stop it."""
    if (state_dir / "moto.json").exists():
        from labctl.testbed.aws import stop_moto

        stop_moto(state_dir)


# Hypothesis: "ci" (the default) keeps property tests quick; HYPOTHESIS_PROFILE=long runs many more examples.
try:
    from hypothesis import HealthCheck
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", max_examples=100, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
    _hyp_settings.register_profile("long", max_examples=2000, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is in the test extra; without it only the property tests are skipped
    pass
