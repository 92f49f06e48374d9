"""The moto daemon behind --site sim-aws goes by itself once idle (issue 13): no request for
LABCTL_MOTO_IDLE_SECONDS and nothing held that a deployment may need. While it holds something (a key pair, an
instance...) it stays, since the emulated EC2's state lives only in its process."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from labctl.testbed.access import world_credentials
from labctl.testbed.aws import ensure_moto, moto_info, pid_alive, stop_moto
from labctl.testbed.aws.common import MOTO_LOG, isolated_session, with_moto_key


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll `condition` (the daemon's own log or its pid) until it holds; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_moto_daemon_stays_while_it_holds_a_key_pair_and_exits_once_it_holds_nothing(tmp_path, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    monkeypatch.setenv("LABCTL_MOTO_IDLE_SECONDS", "4")
    state = Path(tmp_path / "aws")
    creds = world_credentials(state)
    session = isolated_session("us-east-1", creds.aws_access_key_id, creds.aws_secret_access_key)
    session.client("ec2", endpoint_url="http://127.0.0.1:9")  # loads botocore's EC2 model before the clock runs

    def ec2(info: dict):  # noqa: ANN202
        return with_moto_key(session.client("ec2", endpoint_url=f"http://127.0.0.1:{info['port']}"), creds.moto_key)

    # An empty daemon goes after 4 s without a request: on a loaded machine it may go before the first one
    # arrives, which is the behaviour under test; the next client then starts a fresh daemon, as labctl does.
    for _ in range(5):
        info = ensure_moto(state)
        try:
            client = ec2(info)
            client.create_key_pair(KeyName="labctl-student1-hello")  # what a sim-aws lab holds while it is up
            break
        except EndpointConnectionError:
            continue
    else:
        raise AssertionError("no moto daemon stayed up long enough for a first request, five times")
    log = state / MOTO_LOG
    try:
        wait_for(lambda: "staying: it holds key pairs in us-east-1" in log.read_text(), "the daemon to stay")
        assert pid_alive(info["pid"]) and moto_info(state) is not None
        client.delete_key_pair(KeyName="labctl-student1-hello")  # `labctl down`
        wait_for(lambda: not pid_alive(info["pid"]), "the idle daemon to exit")
        assert "nothing held: exiting" in log.read_text()
        assert moto_info(state) is None and not (state / "moto.json").exists()
    finally:
        stop_moto(state)


def test_a_request_keeps_an_empty_daemon_alive_and_the_next_client_starts_a_fresh_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LABCTL_MOTO_IDLE_SECONDS", "1")
    state = Path(tmp_path / "aws")
    first = ensure_moto(state)
    try:
        wait_for(lambda: not pid_alive(first["pid"]), "the empty daemon to exit")
        second = ensure_moto(state)  # what the next `labctl up --site sim-aws` does
        assert second["pid"] != first["pid"] and moto_info(state) == second
    finally:
        stop_moto(state)
