"""An emulated Compute Engine v1 REST API on 127.0.0.1, for google-cloud-compute's real clients.

    from labctl.testbed.gce import start_gce
    emu = start_gce(state_dir, time_scale=0.002)
    client = compute_v1.InstancesClient(credentials=emu.credentials(),   # the world's own bearer token
                                        client_options={"api_endpoint": emu.endpoint})
    ...
    emu.world.set_capacity("us-central1-a", "nvidia-tesla-t4", 0)   # the control API
    emu.stop()

State lives in `<state_dir>/gce.db` (see `labctl.testbed.gce.world`); every process may start its own
endpoint over the same directory and they all see one project (`sim-project`). Paths are the real ones,
`/compute/v1/projects/{project}/...` (see `labctl.testbed.gce.api.ROUTES`). Operations go PENDING ->
RUNNING -> DONE and instances PROVISIONING -> STAGING -> RUNNING in a few seconds × the time scale
(default: `LABCTL_TESTBED_TIME_SCALE`, else 0.01). External IPs are loopback addresses 127.30.x.y. Besides
instances, firewalls and addresses: VPC networks, subnetworks (an instance's networkIP comes from its subnetwork's
range), zonal persistent disks and instances.attachDisk / detachDisk, and instance time limits
(scheduling.terminationTime / maxRunDuration, enforced at the world's lease scale; instances.setScheduling only on
a stopped instance: `labctl.testbed.gce.scheduling`). Every RUNNING instance is also served over
SSH on an internal loopback address (127.13.x.y), reachable through a node on one of its networks (`ssh -J`).
Also projects.get, imageFamilyViews.get and the batch endpoint (`POST /batch/compute/v1`, which gcloud's list
commands use). Resource references are read in every form the API accepts (full and partial URLs, names where
implied, image families and gcloud's `zones/-/imageFamilyViews/F`): `labctl.testbed.gce.common.parse_ref`.

Trap (see docs): `ExtendedOperation.result()` polls through an operations client that the transport builds
for the real Google host; poll with your own `ZoneOperationsClient(client_options=...)` or use `.wait()`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labctl.testbed.http import EmulatorHandler

if TYPE_CHECKING:
    from labctl.testbed.gce.world import GceWorld

__all__ = ["GceEmulator", "GceWorld", "start_gce"]


def __getattr__(name: str):
    if name == "GceWorld":
        from labctl.testbed.gce.world import GceWorld

        return GceWorld
    raise AttributeError(name)


class _Handler(EmulatorHandler):
    server_version = "ESF"
    sys_version = ""
    server: _Server

    def refuse(self, status: int, message: str) -> None:
        from labctl.testbed.gce import api

        reason = "uploadTooLarge" if status == 413 else "badRequest"
        self._send(api.Outcome(status, api.ApiError(status, message, reason).body()))

    def serve(self, body: bytes) -> None:
        from labctl.testbed.gce import api

        srv = self.server
        try:
            outcome = api.handle(srv.world, srv.base_url, srv.stop_event, self.command, self.path, body,
                                 self.headers)
        except Exception as e:  # a bug in the emulator: answer 500 rather than dropping the connection
            import traceback

            traceback.print_exc(file=sys.stderr)
            err = api.ApiError(500, f"emulator bug: {e!r}", "backendError")
            outcome = api.Outcome(500, err.body())
        if outcome.action == "hang":
            self.hang(srv.stop_event)
            return
        if outcome.action == "drop":
            self.drop()
            return
        self._send(outcome)

    def _send(self, outcome: Any) -> None:
        import json

        headers = [("Vary", "Origin, X-Origin, Referer"), ("X-Request-Id", uuid.uuid4().hex)]
        raw = getattr(outcome, "raw", None)
        if raw is not None:  # the batch endpoint's multipart/mixed answer
            self.answer(outcome.status, raw, outcome.content_type, [*headers, *outcome.headers.items()])
            return
        self.answer(outcome.status, json.dumps(outcome.body).encode(), "application/json; charset=UTF-8",
                    [*headers, *outcome.headers.items()])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    world: GceWorld
    base_url: str
    stop_event: threading.Event


class GceEmulator:
    """A running endpoint over a `GceWorld`: `.endpoint`, `.world`, `.project`, `.stop()`."""

    def __init__(self, world: GceWorld, server: _Server, thread: threading.Thread):
        self.world = world
        self._server = server
        self._thread = thread
        self.port = server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.project = world.project

    @property
    def token(self) -> str:
        """The world's bearer token (`Authorization: Bearer ...`); without it every request gets a 401."""
        return self.world.credentials.gce_token

    def credentials(self) -> Any:
        """google-auth credentials that send the world's bearer token (for google-cloud-compute clients)."""
        from google.oauth2.credentials import Credentials

        return Credentials(token=self.token)

    def stop(self) -> None:
        self._server.stop_event.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self.world.close()

    def __enter__(self) -> GceEmulator:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<GceEmulator {self.endpoint} world={self.world.state_dir}>"


def start_gce(state_dir: str | os.PathLike, time_scale: float | None = None, port: int = 0) -> GceEmulator:
    """Serve the emulated Compute Engine over `<state_dir>/gce.db` on 127.0.0.1 (an ephemeral port)."""
    from labctl.testbed.gce.world import GceWorld

    world = GceWorld(Path(state_dir), time_scale)
    server = _Server(("127.0.0.1", port), _Handler)
    server.world = world
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    server.stop_event = threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"labctl-gce-{server.server_address[1]}", daemon=True)
    thread.start()
    return GceEmulator(world, server, thread)


def main(argv: list[str] | None = None) -> int:
    """`python -m labctl.testbed.gce [--state-dir D] [--port P]`: serve until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m labctl.testbed.gce",
                                     description="Serve the emulated Compute Engine until Ctrl-C.")
    parser.add_argument("--state-dir", help="world directory (default: $LABCTL_TESTBED_DIR or the user state dir)")
    parser.add_argument("--time-scale", type=float, help="multiply every emulated delay")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    state_dir = args.state_dir
    if state_dir is None:
        from labctl.testbed.world import default_state_dir

        state_dir = default_state_dir()
    emu = start_gce(state_dir, args.time_scale, args.port)
    print(f"# labctl emulated Compute Engine at {emu.endpoint} (project {emu.project}, world {state_dir})",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
    return 0
