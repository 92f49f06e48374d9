"""The dashboard's web server: werkzeug, threaded, on 127.0.0.1 only, every path behind a random token.

`/<token>/` is the page, `/<token>/api/status` the class as JSON (the page polls it); anything else, and any
request whose first path segment is not the token, is a 404 that says nothing more. The token comes from
`secrets.token_urlsafe` and is compared in constant time; the Host header must name the loopback address and port
this server listens on (so a web page that rebinds a DNS name to 127.0.0.1 cannot read the class even if it
guessed the path). Requests are not logged: their paths hold the token.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from labctl.dashboard import page
from labctl.dashboard.snapshot import Prices, snapshot
from labctl.errors import LabctlError
from labctl.redact import clean

HOST = "127.0.0.1"
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the token is in the URL: never send it on
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class _QuietHandler(WSGIRequestHandler):
    """No request log: a logged path would print the token."""

    def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002 - werkzeug's signature
        return None


@dataclass
class Dashboard:
    """The WSGI app for one class (course/lab) over one state store (`ctx.store`)."""

    ctx: Any  # labctl.service.Context
    lab: str
    course: str
    prices: Prices
    poll_seconds: float = 2.0
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    hosts: frozenset[str] = frozenset()  # Host headers accepted: set by `serve` once the port is known
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        return self.respond(Request(environ))(environ, start_response)

    def respond(self, request: Request) -> Response:
        if request.host not in self.hosts:
            return _plain(403, "forbidden")
        first, _, rest = request.path[1:].partition("/")
        if not hmac.compare_digest(first.encode(), self.token.encode()):
            return _plain(404, "not found")
        if request.method not in ("GET", "HEAD"):
            return _plain(405, "method not allowed")
        if request.path == f"/{self.token}":
            return _with_headers(Response(status=308, headers={"Location": f"/{self.token}/"}))
        if rest == "":
            body = page.render(self.lab, self.course, self.poll_seconds)
            response = Response(body, mimetype="text/html")
            response.headers["Content-Security-Policy"] = page.CSP
            return _with_headers(response)
        if rest == "api/status":
            return self.status()
        return _plain(404, "not found")

    def status(self) -> Response:
        try:
            # One read at a time: a slow store is not asked again by every poll that piles up behind it.
            with self._lock:
                data = snapshot(self.ctx, self.lab, self.course, self.prices)
        except LabctlError as exc:
            return _json(503, {"error": clean(str(exc), one_line=True)})
        except Exception as exc:  # noqa: BLE001 - a lost database connection must not end the server
            return _json(503, {"error": f"cannot read the state store ({type(exc).__name__})"})
        return _json(200, data)

    def url(self, port: int) -> str:
        return f"http://{HOST}:{port}/{self.token}/"

    def serve(self, port: int = 0) -> BaseWSGIServer:
        """A threaded server bound to 127.0.0.1:`port` (0: any free port); call `serve_forever` on it."""
        server = make_server(HOST, port, self, threaded=True, request_handler=_QuietHandler)
        bound = server.server_port
        self.hosts = frozenset({f"{HOST}:{bound}", f"localhost:{bound}"})
        return server


def _with_headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def _plain(status: int, text: str) -> Response:
    return _with_headers(Response(text + "\n", status=status, mimetype="text/plain"))


def _json(status: int, data: Any) -> Response:
    return _with_headers(Response(json.dumps(data, allow_nan=False), status=status, mimetype="application/json"))
