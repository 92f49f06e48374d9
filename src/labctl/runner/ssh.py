"""SSH to the nodes, in three parts: `runner.reach` (wait until nodes answer, pin host keys, connect),
`runner.setup` (setup steps, uploads, per-node logs) and `runner.system_ssh` (known_hosts and argv for the
system `ssh`). This module keeps the names callers import from `labctl.runner.ssh`.
"""

from labctl.runner.reach import DEFAULT_USER, HostKeyChanged, HostKeyStore, NodeTarget, SSHBlocked, wait_for_ssh
from labctl.runner.setup import NodeResult, ProgressStore, SetupStep, Upload, UploadRefused, run_setup
from labctl.runner.system_ssh import known_hosts_file, ssh_argv

__all__ = [
    "DEFAULT_USER",
    "HostKeyChanged",
    "HostKeyStore",
    "NodeResult",
    "NodeTarget",
    "ProgressStore",
    "SSHBlocked",
    "SetupStep",
    "Upload",
    "UploadRefused",
    "known_hosts_file",
    "run_setup",
    "ssh_argv",
    "wait_for_ssh",
]
