"""Secrets never reach output (issue 9): a cloud whose error answer echoes the credentials back.

On the emulated Chameleon the fault injection makes the lease request fail with a body that holds the world's
application credential secret and password; the real CLI runs, and neither its output nor any file of its state
directory (state.db, events, logs) holds them. On AWS a tiny HTTP server of the test's own on 127.0.0.1 answers
every EC2 request with an error that echoes the secret access key and session token: through the adapter (boto3
for real) and through the CLI (`--site aws` with AWS_ENDPOINT_URL pointing at it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tests.e2e.helpers import run

from labctl import redact, sites
from labctl.errors import CloudError, Transient
from labctl.plan import build_plan
from labctl.profile import find_profile, load_profile

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv1PmUi5E4bqqkqRhHg0Ss6BJqkQ8Y6fD3Y9KQ5Xn3r labctl-test"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzSECRETzKEY"
AWS_TOKEN = "IQoJb3JpZ2luX2VjEHMaCXVzLWVhc3QtMSJHMEUCIQDsessiontokenvalue"


def files_holding(directory: Path, *secrets: str) -> list[str]:
    """Files under `directory` (any kind: SQLite, logs, JSON) whose bytes contain one of `secrets`."""
    hits = []
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(s.encode() in data for s in secrets):
                hits.append(str(path))
    return hits


@pytest.mark.slow
def test_chameleon_error_body_echoing_the_credentials_is_masked_everywhere(labctl_env):
    from labctl.testbed.access import world_credentials
    from labctl.testbed.world import World

    creds = world_credentials(labctl_env["LABCTL_TESTBED_DIR"])
    secrets = (creds.app_cred_secret, creds.password)
    echo = (f'request was {{"auth": {{"application_credential": {{"secret": "{creds.app_cred_secret}"}}, '
            f'"password": "{creds.password}"}}}}\x1b[2J\r')
    World(Path(labctl_env["LABCTL_TESTBED_DIR"])).inject_fault("kvm@tacc", "POST /leases", "error500", 50,
                                                               message=echo)
    proc = run(labctl_env, "up", "hello", "--site", "sim", check=False, timeout=300)
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout + proc.stderr
    assert "request was" in out and redact.MASK in out  # the cloud's words arrived, masked
    assert not any(s in out for s in secrets), out
    assert "\x1b[2J" not in out
    assert files_holding(Path(labctl_env["LABCTL_STATE_DIR"]), *secrets) == []


class _EchoingEc2(BaseHTTPRequestHandler):
    """An EC2 endpoint that answers every request with an error echoing the credentials (a broken proxy)."""

    status = 400

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>InvalidParameterValue</Code>'
                f"<Message>cannot parse request signed with {AWS_SECRET} and token {AWS_TOKEN}</Message></Error>"
                "</Errors><RequestID>1</RequestID></Response>").encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echoing_ec2() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingEc2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [400, 500])
def test_aws_adapter_masks_the_secret_key_and_token_a_cloud_echoes(echoing_ec2, monkeypatch, status):
    from labctl.providers import aws
    from labctl.providers.aws.session import load_session

    monkeypatch.setattr(_EchoingEc2, "status", status)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_TOKEN)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    site = sites.resolve("aws")
    session, source = load_session(site, None)  # the standard chain: loads (and registers) the keys
    provider = aws.AwsProvider(site, session, endpoint_url=echoing_ec2, poll_interval=0.01, call_retries=2,
                               credential_source=source)
    plan = build_plan(load_profile(find_profile("hello")), site, "alice", KEY)
    kind = Transient if status == 500 else CloudError
    with pytest.raises(kind) as caught:
        provider.preflight(plan)
    text = str(caught.value)
    assert "cannot parse request signed with" in text and redact.MASK in text
    assert AWS_SECRET not in text and AWS_TOKEN not in text


@pytest.mark.slow
def test_aws_cli_output_and_state_never_hold_the_secret(labctl_env, echoing_ec2):
    env = {**labctl_env, "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
           "AWS_SESSION_TOKEN": AWS_TOKEN, "AWS_ENDPOINT_URL": echoing_ec2, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": "/nonexistent/config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials"}
    proc = run(env, "up", "hello", "--site", "aws", check=False)
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout + proc.stderr
    assert "cannot parse request signed with" in out and redact.MASK in out
    assert AWS_SECRET not in out and AWS_TOKEN not in out
    assert files_holding(Path(env["LABCTL_STATE_DIR"]), AWS_SECRET, AWS_TOKEN) == []


def test_openstack_secrets_are_registered_when_loaded(tmp_path):
    from labctl.credentials import find_openstack_credentials

    site = sites.resolve("kvm@tacc")
    env = {"OS_AUTH_URL": site.auth_url, "OS_REGION_NAME": site.region or "",
           "OS_APPLICATION_CREDENTIAL_ID": "0123456789abcdef",
           "OS_APPLICATION_CREDENTIAL_SECRET": "app-cred-secret-value-42", "HOME": str(tmp_path)}
    find_openstack_credentials(site, env=env)
    assert redact.mask("body: app-cred-secret-value-42") == f"body: {redact.MASK}"
    assert "0123456789abcdef" in redact.mask("id 0123456789abcdef")  # an id is not a secret
