"""A tiny HTTP toolkit for the testbed: request/response objects, an error type and a path router.

Services (Keystone, Nova, ...) register handlers on a `Router` with path templates such as
"/servers/{id}"; the server (`labctl.testbed.server`) matches the service-relative path, calls the handler
and renders `HTTPError`s in each service's own error format.

`EmulatorHandler` is the stdlib request handler that every emulator's endpoint (OpenStack, Compute Engine,
EC2's front layer) builds on.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from labctl.testbed.openstack.catalog import Site
    from labctl.testbed.world import World


class HTTPError(Exception):
    """An API error. `kind` is the service's error name (Neutron type, Nova key, Blazar name...)."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str | None = None,
        headers: dict | None = None,
        body: Any = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers or {}
        self.body = body  # when set, sent as is instead of the service's error format


@dataclass
class Response:
    status: int = 200
    body: Any = None  # dict/list → JSON, str/bytes → as is, None → empty
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def encode(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()


@dataclass
class Request:
    method: str
    path: str  # relative to the service's versioned endpoint, e.g. "/servers/abc"
    query: dict[str, list[str]]
    headers: Any  # case-insensitive mapping (email.message.Message)
    body: bytes
    world: World
    site: Site | None
    base_url: str  # http://127.0.0.1:PORT
    service: str = ""
    params: dict[str, str] = field(default_factory=dict)
    token: dict | None = None
    fault: tuple[str, str | None] | None = None  # a "server_error_state" fault for this request
    now: float = 0.0

    @property
    def site_url(self) -> str:
        return f"{self.base_url}/{self.site.slug}" if self.site else self.base_url

    def q(self, key: str, default: str | None = None) -> str | None:
        values = self.query.get(key)
        return values[0] if values else default

    def json(self, required: bool = True) -> Any:
        if not self.body:
            if required:
                raise HTTPError(400, "The request body is empty or missing.", "BadRequest")
            return {}
        try:
            return json.loads(self.body)
        except ValueError:
            raise HTTPError(
                400, "Malformed request body: the body is not valid JSON.", "BadRequest"
            ) from None


Handler = Callable[[Request], Response]


@dataclass
class Route:
    method: str
    template: str
    regex: re.Pattern
    handler: Handler
    auth: bool


class Router:
    def __init__(self) -> None:
        self.routes: list[Route] = []

    def route(self, method: str, template: str, *, auth: bool = True) -> Callable[[Handler], Handler]:
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template.rstrip("/") or "/"))

        def deco(fn: Handler) -> Handler:
            for m in method.split("|"):
                self.routes.append(Route(m, template, re.compile(f"^{pattern}$"), fn, auth))
            return fn

        return deco

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        """The route for this request; raises 405 when the path exists under another method."""
        path = path.rstrip("/") or "/"
        allowed = False
        for r in self.routes:
            m = r.regex.match(path)
            if not m:
                continue
            if r.method == method or (method == "HEAD" and r.method == "GET"):
                return r, m.groupdict()
            allowed = True
        if allowed:
            raise HTTPError(405, "The method is not allowed for the requested URL.", "HTTPMethodNotAllowed")
        return None


class EmulatorHandler(BaseHTTPRequestHandler):
    """What the emulators' request handlers share: HTTP/1.1 keep-alive, no access log, whole request bodies,
    the two ways an injected fault leaves a request unanswered, and the answer's framing.

    The server must have a `world` with `release()`: the server runs a thread per HTTP connection, and that
    thread's SQLite connection is closed when the HTTP connection ends.
    """

    protocol_version = "HTTP/1.1"
    server: Any

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle + delayed ACK add 40 ms a request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.world.release()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def read_body(self) -> bytes:
        """The request body, whether sent with Content-Length or chunked."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def hang(self, until: threading.Event, seconds: float | None = None) -> None:
        """Leave the request unanswered until `until` is set (the server stops) or `seconds` have passed."""
        until.wait(seconds)
        self.close_connection = True

    def drop(self) -> None:
        """Close the connection without an answer."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def answer(self, status: int, payload: bytes, content_type: str | None, headers: Iterable[tuple[str, str]],
               content_length: str | None = None) -> None:
        """Send the status line, Content-Type (unless None), Content-Length (the payload's unless given: a HEAD
        answer gives the GET's), then `headers` in order, and the payload unless the request is a HEAD."""
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)) if content_length is None else content_length)
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and payload:
            self.wfile.write(payload)
