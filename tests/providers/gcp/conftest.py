"""The Compute Engine fixtures, defined once in tests/fixtures/gce.py."""

from tests.fixtures.gce import clients, emu, testbed  # noqa: F401
