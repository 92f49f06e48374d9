"""The testbed's HTTP toolkit: request/response objects and a path router (werkzeug's, behind `Router`).

Services (Keystone, Nova, ..., and Compute Engine's API) register handlers on a `Router` with path templates such as
"/servers/{id}"; the server (`labctl.testbed.server`) matches the service-relative path, calls the handler
and renders `HTTPError`s in each service's own error format.

``EmulatorHandler` is the stdlib request handler that every emulator's endpoint (OpenStack, Compute Engine,
EC2's front layer) builds on. It is the one place where request bodies are bounded and reads are timed out:
a body larger than the handler's `body_limit` is refused with 413 before it is read, a malformed or negative
Content-Length or chunk size with 400, and a client that stops sending is disconnected after `read_timeout`
seconds. `parse_json` is the one JSON parser of the emulators' request bodies (nesting capped at
`MAX_JSON_DEPTH`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule

from labctl.testbed.errors import BodyError, HTTPError, JsonError

if TYPE_CHECKING:
    from labctl.testbed.openstack.catalog import Site
    from labctl.testbed.world import World


MAX_JSON_BODY = 1 << 20  # bytes: a JSON API request body (real APIs allow far less than 1 MiB for these calls)
MAX_OBJECT_BODY = 64 << 20  # bytes: an object upload (Swift / S3 PUT, Glance image data)
MAX_JSON_DEPTH = 64  # nesting of arrays and objects in a JSON body
READ_TIMEOUT = 30.0  # seconds a connection may stay silent while a request (line, headers, body) is expected
_HEX = re.compile(rb"^[0-9A-Fa-f]{1,16}$")
_DIGITS = re.compile(r"^[0-9]{1,19}$")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_JSON_BRACKETS = re.compile(r"[\[\]{}]")


def parse_json(body: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`body` parsed as JSON, nesting checked before parsing (Python's parser would recurse without a bound)."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError:
        raise JsonError("the body is not UTF-8") from None
    depth = deepest = 0
    for bracket in _JSON_BRACKETS.findall(_JSON_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > max_depth:
                    raise JsonError(f"the body nests more than {max_depth} levels")
        else:
            depth -= 1
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise JsonError("the body is not valid JSON") from None


def status_phrase(status: int, default: str = "") -> str:
    """The standard reason phrase of an HTTP status ("Too Many Requests"), `default` for a code without one."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return default


def read_timeout() -> float:
    """The read timeout of the emulators' connections (`LABCTL_TESTBED_READ_TIMEOUT` overrides it)."""
    try:
        value = float(os.environ.get("LABCTL_TESTBED_READ_TIMEOUT") or READ_TIMEOUT)
    except ValueError:
        return READ_TIMEOUT
    return value if value > 0 else READ_TIMEOUT


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
    site_webs: dict[str, str] = field(default_factory=dict)  # site name -> its own address (sites.json `web`)
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

    def json(self, required: bool = True) -> dict:
        """The body as a JSON object (every OpenStack API this emulates takes an object: anything else is a 400)."""
        if not self.body:
            if required:
                raise HTTPError(400, "The request body is empty or missing.", "BadRequest")
            return {}
        try:
            data = parse_json(self.body)
        except JsonError as e:
            raise HTTPError(400, f"Malformed request body: {e}.", "BadRequest") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "Malformed request body: the body is not a JSON object.", "BadRequest")
        return data

    def int_q(self, key: str, default: int | None = None, minimum: int = 0) -> int | None:
        """An integer query parameter (`limit`...): a 400 when it is not an integer >= minimum."""
        value = self.q(key)
        if value is None or value == "":
            return default
        number = int(value) if re.fullmatch(r"-?[0-9]{1,18}", value) else None
        if number is None or number < minimum:
            raise HTTPError(400, f"Invalid value for '{key}': '{value}' is not an integer >= {minimum}.",
                            "BadRequest")
        return number


Handler = Callable[..., Any]  # (Request) -> Response for the OpenStack services, (Call) -> dict for GCE
_TEMPLATE_PARAM = re.compile(r"\{(\w+)\}")


def _method_not_allowed(method: str) -> Exception:
    return HTTPError(405, "The method is not allowed for the requested URL.", "HTTPMethodNotAllowed")


@dataclass
class Route:
    method: str
    template: str  # "/servers/{id}"
    handler: Handler
    auth: bool = True
    name: str = ""  # the API's own name for the call (Compute Engine's method id, "instances.insert")


class Router:
    """Path templates ("/servers/{id}", a parameter per whole segment) to handlers, matched by werkzeug's
    router (`werkzeug.routing.Map`): the one router of the Chameleon and Compute Engine emulators.

    A trailing slash is ignored. A path that exists under other methods only raises `method_not_allowed(method)`
    (the API's own 405); HEAD matches a GET route unless `head_as_get` is false.
    """

    def __init__(self, method_not_allowed: Callable[[str], Exception] = _method_not_allowed,
                 head_as_get: bool = True) -> None:
        self.routes: list[Route] = []
        self.method_not_allowed = method_not_allowed
        self.head_as_get = head_as_get
        self._map = Map(strict_slashes=False, merge_slashes=False, redirect_defaults=False)
        self._adapter = self._map.bind("emulator")

    def add(self, methods: str, template: str, handler: Handler, *, auth: bool = True, name: str = "") -> None:
        """Route `methods` ("GET", or several: "GET|HEAD") on `template` to `handler`."""
        rule = _TEMPLATE_PARAM.sub(r"<\1>", template.rstrip("/") or "/")
        for method in methods.split("|"):
            self._map.add(Rule(rule, methods=[method], endpoint=len(self.routes)))
            self.routes.append(Route(method, template, handler, auth, name))

    def route(self, method: str, template: str, *, auth: bool = True) -> Callable[[Handler], Handler]:
        """`add` as a decorator."""

        def deco(fn: Handler) -> Handler:
            self.add(method, template, fn, auth=auth)
            return fn

        return deco

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        """The route for this request and its path parameters; None when no route has this path."""
        path = path.rstrip("/") or "/"
        if not path.startswith("/") or path.startswith("//"):
            return None  # werkzeug would match "//x" as "/x"
        try:
            endpoint, params = self._adapter.match(path, method)
        except NotFound:
            return None
        except MethodNotAllowed:
            raise self.method_not_allowed(method) from None
        route = self.routes[endpoint]
        if method == "HEAD" and not self.head_as_get and route.method != "HEAD":
            raise self.method_not_allowed(method)
        return route, params


class EmulatorHandler(BaseHTTPRequestHandler):
    """What the emulators' request handlers share: HTTP/1.1 keep-alive, no access log, read timeouts, bounded
    request bodies, the two ways an injected fault leaves a request unanswered, and the answer's framing.

    A subclass implements `serve(body)` (the request, its body read) and `refuse(status, message)` (an error
    in its API's own shape, for a request whose body was not read); it may size `body_limit()` per request.

    The server must have a `world` with `release()`: the server runs a thread per HTTP connection, and that
    thread's SQLite connection is closed when the HTTP connection ends. A `read_timeout` attribute on the
    server overrides `read_timeout()`.
    """

    protocol_version = "HTTP/1.1"
    server: Any
    timeout = READ_TIMEOUT

    def setup(self) -> None:
        self.timeout = getattr(self.server, "read_timeout", None) or read_timeout()
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

    def body_limit(self) -> int:
        """The largest body this request may have (bytes)."""
        return MAX_JSON_BODY

    def serve(self, body: bytes) -> None:
        raise NotImplementedError

    def refuse(self, status: int, message: str) -> None:
        raise NotImplementedError

    def dispatch(self) -> None:
        """Every method's entry point: the body (bounded, timed out), then `serve`, or `refuse` and close."""
        try:
            body = self.read_body()
        except BodyError as e:
            self.close_connection = True  # the rest of the body is never read: the connection cannot go on
            self.refuse(e.status, e.message)
            self.linger()
            return
        except (TimeoutError, ConnectionError):
            self.close_connection = True  # a client that stopped sending (or went away) mid-body
            return
        self.serve(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = dispatch

    def read_body(self) -> bytes:
        """The request body, whether sent with Content-Length or chunked; `BodyError` for a body that is too
        large (413, nothing of it read) or malformed framing (400)."""
        limit = self.body_limit()
        encoding = self.headers.get("Transfer-Encoding")
        if encoding is not None:
            if encoding.strip().lower() != "chunked":
                raise BodyError(400, f"Unsupported Transfer-Encoding: {encoding[:40]!r}.")
            return self._read_chunked(limit)
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return b""
        if len(set(lengths)) > 1 or not _DIGITS.match(lengths[0].strip()):
            raise BodyError(400, f"Invalid Content-Length: {lengths[0][:40]!r}.")
        length = int(lengths[0])
        if length > limit:
            raise BodyError(413, f"Request body too large: {length} bytes (at most {limit}).")
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            raise ConnectionResetError("the client closed the connection in the middle of the body")
        return body

    def _read_chunked(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1025)
            if not line.endswith(b"\n"):
                if not line:
                    raise ConnectionResetError("the client closed the connection in the middle of the body")
                raise BodyError(400, "Invalid chunked body: a chunk-size line is too long.")
            size_text = line.split(b";", 1)[0].strip()
            if not _HEX.match(size_text):
                raise BodyError(400, f"Invalid chunked body: bad chunk size {size_text[:20]!r}.")
            size = int(size_text, 16)
            if size == 0:
                for _ in range(100):  # trailers, up to the empty line
                    if self.rfile.readline(8193) in (b"\r\n", b"\n", b""):
                        return b"".join(chunks)
                raise BodyError(400, "Invalid chunked body: too many trailer lines.")
            total += size
            if total > limit:
                raise BodyError(413, f"Request body too large: more than {limit} bytes.")
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                raise ConnectionResetError("the client closed the connection in the middle of the body")
            chunks.append(chunk)
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise BodyError(400, "Invalid chunked body: a chunk is not followed by CRLF.")

    def linger(self, seconds: float = 2.0, max_bytes: int = MAX_OBJECT_BODY) -> None:
        """After an answer sent before the body was read: stop sending, then read and discard what the client
        still sends (at most `max_bytes`, for at most `seconds`), as servers' lingering close does. Closing at
        once with unread data would reset the connection, and a client still sending its body would see a
        broken pipe instead of the answer."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + seconds
            total = 0
            while total < max_bytes and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                total += len(chunk)

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
