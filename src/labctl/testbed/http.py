"""A tiny HTTP toolkit for the testbed: request/response objects, an error type and a path router.

Services (Keystone, Nova, ...) register handlers on a `Router` with path templates such as
"/servers/{id}"; the server (`labctl.testbed.server`) matches the service-relative path, calls the handler
and renders `HTTPError`s in each service's own error format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
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
