"""The testbed's error types, shared by its HTTP layer and its models (this module imports nothing of the
testbed, so the models may raise API errors without depending on the HTTP layer)."""

from __future__ import annotations

from typing import Any


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


class BodyError(Exception):
    """A request whose body cannot be read: answered with `status` (400, 413) and the connection closed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class JsonError(ValueError):
    """A request body that is not JSON the emulators accept (malformed, not UTF-8, nested too deeply)."""
