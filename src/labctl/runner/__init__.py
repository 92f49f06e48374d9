"""SSH to the nodes: wait for SSH, pin host keys (`runner.reach`), run setup steps with per-node logs
(`runner.setup`), the system `ssh` argv and known_hosts (`runner.system_ssh`).

Importing this package does not import asyncssh; the functions do, when called.
"""

from labctl.runner.reach import HostKeyChanged, HostKeyStore, NodeTarget, SSHBlocked, wait_for_ssh
from labctl.runner.setup import NodeResult, ProgressStore, SetupStep, Upload, UploadRefused, WaitFirst, run_setup
from labctl.runner.system_ssh import known_hosts_file, ssh_argv

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
    "WaitFirst",
    "known_hosts_file",
    "run_setup",
    "ssh_argv",
    "wait_for_ssh",
]
