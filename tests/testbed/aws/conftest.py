"""The AWS fixtures, defined once in tests/fixtures/aws.py."""

from tests.fixtures.aws import aws_dir, emu, fresh_controls  # noqa: F401
