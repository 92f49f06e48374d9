"""Emulated AWS EC2 for `--site sim-aws` and the tests: moto's server, plus a thin HTTP layer of our own.

moto keeps its state in memory, but labctl runs as many short processes (`up`, `status`, `ssh`, `down`), so
there is **one moto server process per testbed state dir**, started detached on first use on 127.0.0.1
(`<state_dir>/moto.json` records its pid and port; `<state_dir>/moto.lock` makes two racing processes start
only one; `stop_moto(state_dir)` ends it). moto runs with its validation switched on (instance types, AMIs,
key pairs) and with a small AMI catalogue of our own (`MOTO_AMIS_PATH`): Canonical's Ubuntu images and AWS
Deep Learning AMIs under their real names and owner ids, which moto does not ship.

Every labctl process that needs EC2 runs, in-process on an ephemeral 127.0.0.1 port, a front layer
(`start_aws(state_dir)`) that forwards each request to moto and adds what moto lacks. Its state is the SQLite
file `<state_dir>/aws.db` (WAL, short transactions), shared by all processes:

- ``ClientToken`` idempotency: moto ignores the token, so the first successful response per (region, action,
  token) is stored and replayed for a repeat; a repeat with other parameters gets
  ``IdempotentParameterMismatch``. If the process that made an instance died before storing the answer, the
  instance is found in moto by its client token and the answer is rebuilt from it.
- capacity: a limit of running instances per (availability zone, instance type) → ``InsufficientInstanceCapacity``
  (HTTP 500, as EC2 sends it); a vCPU limit per region → ``VcpuLimitExceeded``; a type that the zone does not
  offer (moto's offering data) → ``Unsupported``. A launch without zone goes to the first zone that has room.
- reachability: moto's public IPs (instances' ``ipAddress``, Elastic IPs) are not on this machine and are never
  connected to. Every one is mapped to a loopback address ``127.20.<n>.<m>`` in responses (DNS names too) and
  back in requests, so labctl only ever sees loopback addresses; the SSH side (`labctl.testbed.sshd.SSHNodes`)
  serves each running instance on its loopback address (`AwsWorld.ssh_targets`), and on an internal one
  (``127.12.x.y``) that instances of the same VPC reach by forwarding to its private IP (the `ssh -J` hop).
- the ``client-token`` filter of DescribeInstances (moto crashes on it) is applied here;
- refusals moto lacks (`AwsWorld.check_request`): attaching a volume that is attached already or in another zone,
  deleting a VPC with a gateway or security groups left, a subnet with interfaces in it; DetachVolume without
  InstanceId (moto crashes on it);
- boot time: with `set_boot_seconds(s)` new instances say ``pending`` for s seconds (moto: ``running`` at once);
- the lease end a node enforces itself (`AwsWorld.reap_expired`, run by every front layer's reaper thread): a
  running instance whose user data installs labctl's timer, whose tags are in its instance metadata and whose
  ``labctl-ends-at`` tag (read each round, so a moved end counts) has passed in scaled time (``lease_scale``:
  LABCTL_TESTBED_LEASE_SCALE, else the world's: real time unless set, from launch) powers off: terminated when it
  was launched with shutdown behaviour ``terminate``, stopped otherwise. An instance without any of these runs on;
- a request log and fault injection (``error503``, ``throttle`` = RequestLimitExceeded, ``hang_after``,
  ``timeout_after``) for tests.

Other protocols (JSON/REST services such as SSM or STS, and S3: path-style requests, HEAD included, with moto's
answer headers) are passed through to moto unchanged; `claim_bucket(name)` makes an S3 bucket name another
account's.

The package: `common` (names, sessions, errors, parameters, the signature check), `daemon` (the moto process),
`world` (`AwsWorld`, with `checks`: the refusals moto lacks) and `front` (the HTTP front layer, `start_aws`);
`python -m labctl.testbed.aws moto <state_dir>` runs the daemon.
"""

from labctl.testbed.aws.common import CANONICAL, MOTO_KEY_HEADER, isolated_session
from labctl.testbed.aws.daemon import ensure_moto, moto_info, pid_alive, stop_moto
from labctl.testbed.aws.front import AwsEmulator, start_aws
from labctl.testbed.aws.world import AwsWorld

__all__ = [
    "AwsEmulator", "AwsWorld", "CANONICAL", "MOTO_KEY_HEADER", "ensure_moto", "isolated_session", "moto_info",
    "pid_alive", "start_aws", "stop_moto",
]
