"""The unmodified AWS CLI (`aws`, the awscli package of the test extra; awscli 1.46+ carries its own botocore, so
it does not touch the one boto3 pins) against the emulated EC2's front layer.

Each command runs as a subprocess with `--endpoint-url` of the front layer, the world's keys in
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, region us-east-1, and a HOME without ~/.aws (no config or
credentials file of the developer's is read). The subprocess runs under the tests' loopback guard.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.fixtures.aws import aws_dir, emu, fresh_controls  # noqa: F401

from labctl.testbed.aws import CANONICAL

GUARD_DIR = Path(__file__).parents[1] / "loopback_guard"  # the tests' loopback guard (tests/conftest.py)
REGION = "us-east-1"
UBUNTU = "ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-amd64-server-*"
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGbS0cmuHbC4qUrA5c6UDgFWXWTfd2o5v2r4x0p7yK0l compat@test"


def _aws_cli() -> list[str]:
    """The `aws` entry point of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "aws"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("aws")
    if found:
        return [found]
    pytest.skip("the AWS CLI is not installed (pip install awscli, part of the test extra)")


@pytest.fixture
def aws(emu, tmp_path: Path):  # noqa: F811
    """Run `aws ...` against the emulator: (exit code, parsed JSON stdout or None, stderr)."""
    cli = _aws_cli()
    home = tmp_path / "home"
    home.mkdir()
    creds = emu.world.credentials
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(home), AWS_ACCESS_KEY_ID=creds.aws_access_key_id,
               AWS_SECRET_ACCESS_KEY=creds.aws_secret_access_key, AWS_DEFAULT_REGION=REGION,
               AWS_CONFIG_FILE=str(home / "no-config"), AWS_SHARED_CREDENTIALS_FILE=str(home / "no-credentials"),
               AWS_EC2_METADATA_DISABLED="true", AWS_PAGER="", AWS_MAX_ATTEMPTS="1",
               PYTHONPATH=os.pathsep.join([str(GUARD_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))

    def run(*args: str, extra_env: dict | None = None) -> tuple[int, object, str]:
        proc = subprocess.run([*cli, "--endpoint-url", emu.endpoint, "--region", REGION, "--output", "json",
                               *args], env={**env, **(extra_env or {})}, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return proc.returncode, out, proc.stderr

    return run


def test_describe_regions_and_images(aws):
    rc, out, err = aws("ec2", "describe-regions")
    assert rc == 0, err
    assert REGION in {r["RegionName"] for r in out["Regions"]}
    rc, out, err = aws("ec2", "describe-images", "--owners", CANONICAL, "--filters", f"Name=name,Values={UBUNTU}")
    assert rc == 0, err
    assert out["Images"] and all(i["OwnerId"] == CANONICAL for i in out["Images"])


def test_key_pair_security_group_and_an_instance_from_launch_to_termination(aws):
    rc, out, err = aws("ec2", "import-key-pair", "--key-name", "compat-key", "--public-key-material",
                       PUBKEY)
    assert rc == 0, err
    assert out["KeyName"] == "compat-key" and out["KeyFingerprint"]

    rc, out, err = aws("ec2", "create-security-group", "--group-name", "compat-sg", "--description",
                       "AWS CLI compatibility")
    assert rc == 0, err
    group = out["GroupId"]
    rc, out, err = aws("ec2", "authorize-security-group-ingress", "--group-id", group, "--protocol", "tcp",
                       "--port", "22", "--cidr", "0.0.0.0/0")
    assert rc == 0, err
    assert out is None or out.get("Return") is True

    rc, out, err = aws("ec2", "describe-images", "--owners", CANONICAL, "--filters", f"Name=name,Values={UBUNTU}")
    assert rc == 0, err
    ami = max(out["Images"], key=lambda i: i["CreationDate"])["ImageId"]
    rc, out, err = aws("ec2", "run-instances", "--image-id", ami, "--instance-type", "t3.micro", "--count", "1",
                       "--key-name", "compat-key", "--security-group-ids", group)
    assert rc == 0, err
    instance = out["Instances"][0]
    assert instance["InstanceType"] == "t3.micro" and instance["ImageId"] == ami
    iid = instance["InstanceId"]

    rc, out, err = aws("ec2", "describe-instances", "--instance-ids", iid)
    assert rc == 0, err
    (described,) = [i for r in out["Reservations"] for i in r["Instances"]]
    assert described["InstanceId"] == iid and described["KeyName"] == "compat-key"
    assert group in {g["GroupId"] for g in described["SecurityGroups"]}

    rc, out, err = aws("ec2", "terminate-instances", "--instance-ids", iid)
    assert rc == 0, err
    assert out["TerminatingInstances"][0]["InstanceId"] == iid
    assert out["TerminatingInstances"][0]["CurrentState"]["Name"] in ("shutting-down", "terminated")


def test_wrong_keys_are_an_auth_failure(aws, emu):  # noqa: F811
    rc, out, err = aws("ec2", "describe-regions",
                       extra_env={"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1",
                                  "AWS_SECRET_ACCESS_KEY": "not-the-world-secret"})
    assert rc in (254, 255), (rc, err)
    assert "AuthFailure" in err
    assert out is None
