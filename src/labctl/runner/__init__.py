"""SSH to the nodes: wait for SSH, pin host keys, run setup steps with per-node logs (see `runner.ssh`).

Importing this package does not import asyncssh; the functions do, when called.
"""

from labctl.runner.ssh import (
    HostKeyChanged,
    HostKeyStore,
    NodeResult,
    NodeTarget,
    ProgressStore,
    SetupStep,
    SSHBlocked,
    Upload,
    UploadRefused,
    known_hosts_file,
    run_setup,
    ssh_argv,
    wait_for_ssh,
)

__all__ = [
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
