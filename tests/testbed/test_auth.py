"""The emulators are private to their owner: each world's own random credentials, refused elsewhere with the real
API's 401, files only the owner can read, and a moto daemon that answers nobody else and does not linger."""

from __future__ import annotations

import http.client
import json
import os
import time
from pathlib import Path

import pytest

from labctl import redact
from labctl.testbed import Testbed
from labctl.testbed.access import world_credentials
from labctl.testbed.gce import start_gce


def send(port: int, method: str, path: str, headers: dict | None = None, body: bytes = b"") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def app_cred_auth(creds) -> bytes:
    return json.dumps({"auth": {"identity": {"methods": ["application_credential"], "application_credential": {
        "id": creds.app_cred_id, "secret": creds.app_cred_secret}}}}).encode()


@pytest.fixture
def tb(tmp_path):
    with Testbed.start(tmp_path / "mine", time_scale=0.001, ssh=False) as testbed:
        yield testbed


def test_each_world_has_its_own_credentials_private_and_masked(tmp_path, tb):
    mine = tb.world.credentials
    other = world_credentials(tmp_path / "other")
    assert mine != other and mine.app_cred_secret != other.app_cred_secret
    assert world_credentials(tb.world.state_dir) == mine  # read back, not made again
    assert oct(tb.world.state_dir.stat().st_mode & 0o777) == "0o700"
    for name in ("credentials.json", "world.db"):
        assert oct((tb.world.state_dir / name).stat().st_mode & 0o777) == "0o600"
    for secret in mine.secrets():
        assert redact.mask(f"x {secret} y") == "x *** y"
    assert "sim-secret" not in tb.openrc("chi@tacc") and mine.app_cred_secret in tb.openrc("chi@tacc")


def test_keystone_and_services_refuse_anything_but_this_worlds_credential(tmp_path, tb):
    status, body = send(tb.port, "POST", "/chi-tacc/identity/v3/auth/tokens", {"Content-Type": "application/json"},
                        app_cred_auth(world_credentials(tmp_path / "other")))
    assert status == 401
    assert json.loads(body) == {"error": {"code": 401, "title": "Unauthorized",
                                          "message": "The request you have made requires authentication."}}
    wrong = json.loads(app_cred_auth(tb.world.credentials))
    wrong["auth"]["identity"]["application_credential"]["secret"] = "sim-secret"
    status, _ = send(tb.port, "POST", "/chi-tacc/identity/v3/auth/tokens", {"Content-Type": "application/json"},
                     json.dumps(wrong).encode())
    assert status == 401
    for headers in ({}, {"X-Auth-Token": "gAAAAA" + "0" * 64}):
        status, body = send(tb.port, "GET", "/chi-tacc/compute/v2.1/servers", headers)
        assert status == 401 and json.loads(body)["error"]["title"] == "Unauthorized"


def test_a_token_of_another_world_is_refused(tmp_path, tb):
    with Testbed.start(tmp_path / "theirs", time_scale=0.001, ssh=False) as theirs:
        status, _ = send(theirs.port, "POST", "/chi-tacc/identity/v3/auth/tokens",
                         {"Content-Type": "application/json"}, app_cred_auth(theirs.world.credentials))
        assert status == 201
        conn = http.client.HTTPConnection("127.0.0.1", theirs.port, timeout=30)
        conn.request("POST", "/chi-tacc/identity/v3/auth/tokens", body=app_cred_auth(theirs.world.credentials),
                     headers={"Content-Type": "application/json"})
        token = conn.getresponse().getheader("X-Subject-Token")
        conn.close()
        assert send(theirs.port, "GET", "/chi-tacc/network/v2.0/networks", {"X-Auth-Token": token})[0] == 200
        status, body = send(tb.port, "GET", "/chi-tacc/network/v2.0/networks", {"X-Auth-Token": token})
        assert status == 401 and json.loads(body)["error"]["code"] == 401


def test_gce_wants_this_worlds_bearer_token(tmp_path):
    from google.auth.exceptions import RefreshError
    from google.cloud import compute_v1
    from google.oauth2.credentials import Credentials

    emu = start_gce(tmp_path / "mine", time_scale=0.001)
    try:
        path = f"/compute/v1/projects/{emu.project}/zones"
        status, body = send(emu.port, "GET", path)
        error = json.loads(body)["error"]
        assert status == 401 and error["status"] == "UNAUTHENTICATED" and error["code"] == 401
        assert error["errors"][0]["reason"] == "required" and error["errors"][0]["location"] == "Authorization"
        other = world_credentials(tmp_path / "other").gce_token
        status, body = send(emu.port, "GET", path, {"Authorization": f"Bearer {other}"})
        assert status == 401 and json.loads(body)["error"]["errors"][0]["reason"] == "authError"
        assert send(emu.port, "GET", path, {"Authorization": f"Bearer {emu.token}"})[0] == 200
        client = compute_v1.ZonesClient(credentials=Credentials(token=other),
                                        client_options={"api_endpoint": emu.endpoint})
        # On a 401 google-auth tries to refresh the token, which a bare token cannot: the client's error is that.
        with pytest.raises(RefreshError):
            list(client.list(project=emu.project))
        mine = compute_v1.ZonesClient(credentials=emu.credentials(), client_options={"api_endpoint": emu.endpoint})
        assert list(mine.list(project=emu.project))
        assert oct((tmp_path / "mine" / "gce.db").stat().st_mode & 0o777) == "0o600"
    finally:
        emu.stop()


@pytest.fixture
def aws(tmp_path, monkeypatch):
    from labctl.testbed.aws import start_aws, stop_moto

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    emulator = start_aws(tmp_path / "aws")
    yield emulator
    emulator.stop()
    stop_moto(tmp_path / "aws")


def test_ec2_front_checks_the_signature_and_moto_answers_only_the_front(tmp_path, aws):
    from botocore.config import Config
    from botocore.exceptions import ClientError

    from labctl.testbed.aws import MOTO_KEY_HEADER, isolated_session

    config = Config(retries={"total_max_attempts": 1})
    assert aws.session("us-east-1").client("ec2", endpoint_url=aws.endpoint, config=config).describe_regions()
    other = world_credentials(tmp_path / "other")
    cases = [
        ((other.aws_access_key_id, other.aws_secret_access_key), 401, "AuthFailure"),
        ((aws.world.credentials.aws_access_key_id, other.aws_secret_access_key), 403, "SignatureDoesNotMatch"),
    ]
    for keys, status, code in cases:
        ec2 = isolated_session("us-east-1", *keys).client("ec2", endpoint_url=aws.endpoint, config=config)
        with pytest.raises(ClientError) as err:
            ec2.describe_instances()
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
        assert err.value.response["Error"]["Code"] == code
        s3 = isolated_session("us-east-1", *keys).client("s3", endpoint_url=aws.endpoint, config=Config(
            s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}))
        with pytest.raises(ClientError) as err:
            s3.create_bucket(Bucket="labctl-theirs")
        assert err.value.response["Error"]["Code"] in ("InvalidAccessKeyId", "SignatureDoesNotMatch")
    status, body = send(int(aws.endpoint.rsplit(":", 1)[1]), "POST", "/",
                        {"Content-Type": "application/x-www-form-urlencoded"}, b"Action=DescribeRegions")
    assert status == 403 and b"<Code>MissingAuthenticationToken</Code>" in body
    # The moto daemon itself: only with the world's moto key.
    port = aws.world.moto()["port"]
    status, body = send(port, "POST", "/", {"Content-Type": "application/x-www-form-urlencoded"},
                        b"Action=DescribeRegions&Version=2016-11-15")
    assert status == 401 and b"<Code>AuthFailure</Code>" in body
    # moto routes a request by the service in its signature's scope (5.2.6 sends an unsigned one to S3).
    scope = f"AWS4-HMAC-SHA256 Credential={aws.world.credentials.aws_access_key_id}/20260101/us-east-1/ec2/aws4_request"
    status, _ = send(port, "POST", "/", {"Content-Type": "application/x-www-form-urlencoded",
                                          "Authorization": f"{scope}, SignedHeaders=host, Signature=0",
                                          MOTO_KEY_HEADER: aws.world.credentials.moto_key},
                     b"Action=DescribeRegions&Version=2016-11-15")
    assert status == 200
    for name in ("credentials.json", "aws.db", "moto.json", "moto.log", "moto-amis.json"):
        assert oct((tmp_path / "aws" / name).stat().st_mode & 0o777) == "0o600", name


def test_moto_daemon_exits_when_idle(tmp_path, monkeypatch):
    from labctl.testbed.aws import ensure_moto, moto_info, pid_alive, stop_moto

    monkeypatch.setenv("LABCTL_MOTO_IDLE_SECONDS", "2")
    state = Path(tmp_path / "idle")
    info = ensure_moto(state)
    try:
        deadline = time.monotonic() + 30
        while pid_alive(info["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(info["pid"])
        assert moto_info(state) is None
    finally:
        stop_moto(state)
