"""EC2's front layer: the HTTP server every labctl process runs in-process (`start_aws`), which checks a request's
signature, logs it, applies faults, and forwards it to moto through `AwsWorld` (see the package docstring)."""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
import uuid
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from labctl.testbed.aws.common import (
    HANG_SECONDS,
    MOTO_KEY_HEADER,
    REGION,
    SERVICE,
    ApiError,
    check_signature,
    error_xml,
    keep_instances,
    log,
    split_filter,
)
from labctl.testbed.aws.world import AwsWorld
from labctl.testbed.http import MAX_JSON_BODY, MAX_OBJECT_BODY, EmulatorHandler

_HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "accept-encoding",
                "expect", "proxy-connection", "te", "upgrade", MOTO_KEY_HEADER.lower()}


class _Front(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, world: AwsWorld, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.world = world
        self.stopping = threading.Event()


class _Handler(EmulatorHandler):
    server: _Front

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("aws front: " + format, *args)

    def _is_s3(self) -> bool:
        m = SERVICE.search(self.headers.get("Authorization", ""))
        return bool(m) and m.group(1) == "s3" and "x-www-form-urlencoded" not in self.headers.get("Content-Type", "")

    def body_limit(self) -> int:
        """S3 object uploads may be large; every other body is a form or JSON request."""
        return MAX_OBJECT_BODY if self.command == "PUT" and self._is_s3() else MAX_JSON_BODY

    def refuse(self, status: int, message: str) -> None:
        code = ("EntityTooLarge" if self._is_s3() else "RequestEntityTooLarge") if status == 413 else \
            "InvalidRequest" if self._is_s3() else "MalformedInput"
        self.answer(status, error_xml(code, message, self._is_s3()), "text/xml;charset=UTF-8",
                    [("x-amzn-RequestId", str(uuid.uuid4()))])

    def serve(self, body: bytes) -> None:
        self._reply_type = "text/xml;charset=UTF-8"
        self._reply_headers: dict[str, str] = {}
        world = self.server.world
        query = urlsplit(self.path).query
        params = dict(parse_qsl(query, keep_blank_values=True))
        ctype = self.headers.get("Content-Type", "")
        # EC2 speaks the query protocol (form-encoded POST); anything else (JSON or REST services) is passed
        # through unchanged, with the public addresses in the answer still mapped.
        query_protocol = "x-www-form-urlencoded" in ctype or (not body and "Action" in params)
        if body and query_protocol:
            params.update(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
        target = self.headers.get("X-Amz-Target", "")
        action = params.get("Action", "") if query_protocol else (target.rsplit(".", 1)[-1] or self.command)
        m = REGION.search(self.headers.get("Authorization", ""))
        region = m.group(1) if m else "us-east-1"
        m = SERVICE.search(self.headers.get("Authorization", ""))
        s3 = bool(m) and m.group(1) == "s3" and not query_protocol
        if s3:
            action = f"s3:{self.command}"  # S3 is REST: its requests are logged and faulted by HTTP method
        seq = None
        try:
            world.note_region(region)
            seq = world.log_request(region, action or "?", params)
            check_signature(self.command, self.path, self.headers, body, world.credentials, s3)
            delay = world.latency_of([action]) if action else 0.0
            if delay:
                time.sleep(delay)  # EC2's world has no time scale: seconds as they are
            fault = world.take_fault(action) if action else None
            if fault == "error503":
                raise ApiError(503, "Unavailable", "The service is unavailable. Please try again shortly.")
            if fault == "throttle":
                raise ApiError(503, "RequestLimitExceeded", "Request limit exceeded.")
            real_params = world.unmap_params(params)
            if s3:
                world.check_s3(self.command, urlsplit(self.path))

            def forward(p: dict[str, str]) -> tuple[int, bytes]:
                return self._forward(p)

            tokens = None
            if action == "DescribeInstances":  # moto crashes on the client-token filter: applied here
                real_params, tokens = split_filter(real_params, "client-token")
            if query_protocol and action:
                real_params = world.check_request(region, action, real_params)
            if not query_protocol:
                status, out = self._passthrough(body)
            elif action == "RunInstances":
                status, out = world.run_instances(region, real_params, forward)
            elif action and real_params.get("ClientToken"):
                status, out = world.idempotent(region, action, real_params, forward)
            else:
                status, out = forward(real_params)
            if status == 200 and action == "ImportKeyPair":
                world.record_key(region, params.get("KeyName", ""), params.get("PublicKeyMaterial", ""))
            if status == 200 and tokens is not None:
                out = keep_instances(out, lambda item, ns: item.findtext(f"{{{ns}}}clientToken") in tokens)
            if status == 200 and action in ("DescribeInstances", "RunInstances"):
                out = world.apply_boot(out)
            if not s3:  # object data is passed as it is
                out = world.map_response(out)
        except ApiError as exc:
            status, out, fault = exc.status, error_xml(exc.code, exc.message, s3), None
            self._reply_headers = {}
        except Exception as exc:  # noqa: BLE001 - an emulator bug must come back as an API error, not a hang
            log.exception("aws front: %s failed", action)
            status, out, fault = 500, error_xml("InternalError", f"emulator error: {exc}", s3), None
            self._reply_headers = {}
        if fault == "hang_after":
            self.hang(self.server.stopping, HANG_SECONDS)
            return
        if fault == "timeout_after":
            self.drop()
            return
        if seq is not None:
            with contextlib.suppress(Exception):
                world.set_request_status(seq, status)
        # A HEAD answer has no body but says how long the body would be (moto's Content-Length).
        length = self._reply_headers.pop("content-length", "0") if self.command == "HEAD" else None
        self._reply_headers.pop("content-length", None)
        headers = list(self._reply_headers.items())
        if "x-amzn-requestid" not in self._reply_headers:
            headers.append(("x-amzn-RequestId", str(uuid.uuid4())))
        self.answer(status, out, self._reply_type, headers, length)

    def _passthrough(self, body: bytes) -> tuple[int, bytes]:
        port = self.server.world.moto()["port"]
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        headers[MOTO_KEY_HEADER] = self.server.world.credentials.moto_key
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            self._reply_type = resp.getheader("Content-Type") or self._reply_type
            # The answer's own headers (S3: ETag, x-amz-version-id, x-amz-bucket-region, Location...).
            self._reply_headers = {k.lower(): v for k, v in resp.getheaders()
                                   if k.lower() not in _HOP_HEADERS - {"content-length"}
                                   and k.lower() not in ("content-type", "server", "date")}
            return resp.status, resp.read()
        finally:
            conn.close()

    def _forward(self, params: dict[str, str]) -> tuple[int, bytes]:
        port = self.server.world.moto()["port"]
        body = urlencode(params).encode()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        headers["Content-Type"] = "application/x-www-form-urlencoded; charset=utf-8"
        headers[MOTO_KEY_HEADER] = self.server.world.credentials.moto_key
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("POST", "/", body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


REAP_SECONDS = 0.25  # how often a front layer ends the instances whose lease timer would have powered them off


def _reaper(world: AwsWorld, stopping: threading.Event) -> None:
    """The nodes' own lease timers, for as long as this front layer runs (`AwsWorld.reap_expired`)."""
    while not stopping.wait(REAP_SECONDS):
        try:
            for iid in world.reap_expired():
                log.info("aws: %s powered itself off at its lease end", iid)
        except Exception:  # noqa: BLE001 - moto restarting, a state dir going away: the next round tries again
            log.debug("aws: lease reaper round failed", exc_info=True)


class AwsEmulator:
    """The front layer of this process over the shared moto daemon and `aws.db`, and its lease reaper."""

    def __init__(self, world: AwsWorld, front: _Front, thread: threading.Thread) -> None:
        self.world = world
        self._front = front
        self._thread = thread
        self._reaper = threading.Thread(target=_reaper, args=(world, front.stopping), name="labctl-aws-reaper",
                                        daemon=True)
        self._reaper.start()
        host, port = front.server_address[:2]
        self.endpoint = f"http://{host}:{port}"

    def __repr__(self) -> str:
        return f"AwsEmulator({self.endpoint}, {self.world!r})"

    def session(self, region: str) -> Any:
        """A boto3 session with the world's access key: the only key this front layer answers."""
        return self.world.session(region)

    def stop(self) -> None:
        """Stop this process's front layer (the moto daemon stays for other processes)."""
        self._front.stopping.set()
        self._front.shutdown()
        self._front.server_close()
        self._thread.join(5)
        self._reaper.join(30)  # before the caller may stop moto: a round in flight would start it again

    def __enter__(self) -> AwsEmulator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_aws(state_dir: Path, ssh_port: int | None = None, port: int = 0,
              lease_scale: float | None = None) -> AwsEmulator:
    """Start the emulated EC2 over `state_dir`: the moto daemon (if none is alive) and this process's front
    (on 127.0.0.1:`port`, default an ephemeral one).

    `ssh_port` is used only when the state dir is new (e.g. the testbed's SSH port, to share one port);
    `lease_scale` (else LABCTL_TESTBED_LEASE_SCALE, else the world's: real time) scales the lease ends the reaper
    enforces.
    """
    world = AwsWorld(Path(state_dir), ssh_port=ssh_port, lease_scale=lease_scale)
    world.moto()
    front = _Front(world, port)
    thread = threading.Thread(target=front.serve_forever, kwargs={"poll_interval": 0.1},
                              name="labctl-aws-front", daemon=True)
    thread.start()
    return AwsEmulator(world, front, thread)
