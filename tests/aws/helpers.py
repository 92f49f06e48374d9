"""Helpers shared by the AWS tests."""

from __future__ import annotations


def ec2_client(emu, region: str = "us-east-1", attempts: int = 1, read_timeout: float = 30):
    """boto3 EC2 against the front layer, with botocore's retries as asked (1 = none)."""
    from botocore.config import Config

    return emu.session(region).client(
        "ec2", endpoint_url=emu.endpoint,
        config=Config(retries={"total_max_attempts": attempts, "mode": "standard"}, read_timeout=read_timeout,
                      connect_timeout=5))


class StandInTestbed:
    """What `labctl.testbed.Testbed` will offer the AWS adapter: `.aws()` → the emulator."""

    def __init__(self, emulator) -> None:
        self.emulator = emulator

    def aws(self):
        return self.emulator
