"""The CLI stays fast: commands load provider SDKs, SSH libraries and pydantic only when they need them."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("openstack", "keystoneauth1", "blazarclient", "chi", "asyncssh", "paramiko", "boto3", "google.cloud")

PROBE = """
import json, sys
from labctl.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules)))
"""


def loaded_modules(env: dict[str, str], *args: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True,
                          timeout=60)
    last = proc.stdout.strip().splitlines()[-1]
    return set(json.loads(last))


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in {h.split(".")[0] for h in HEAVY}
                  and any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_help_imports_no_sdk_ssh_or_pydantic(labctl_env):
    mods = loaded_modules(labctl_env, "--help")
    assert heavy_in(mods) == []
    assert "pydantic" not in mods


def test_status_and_validate_import_no_sdk(labctl_env):
    status = loaded_modules(labctl_env, "status")
    assert heavy_in(status) == []
    assert "pydantic" not in status  # (Typer 0.29 would import it for every command: see pyproject.toml)
    assert heavy_in(loaded_modules(labctl_env, "validate")) == []
    assert heavy_in(loaded_modules(labctl_env, "plan", "hello", "--site", "kvm@tacc")) == []
