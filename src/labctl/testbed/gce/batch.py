"""Compute Engine's batch endpoint (`POST /batch/compute/v1`, the discovery document's batchPath), which gcloud's
list commands and googleapiclient's `BatchHttpRequest` use.

The request is `multipart/mixed`; each part (`Content-Type: application/http`, an optional `Content-ID`) holds
one HTTP request: a request line with the path (a full URL is tolerated), headers, a blank line, a body. The
outer request's headers, less its `Content-*` ones, apply to every part; a part's own header wins. Each part
goes through the same pipeline as a direct request (authentication, routing, faults, error bodies), in order,
and the answer is `multipart/mixed` with one `application/http` part per request, in the same order, each
with `Content-ID: <response-ID>` for a request part's `<ID>` (`<response-item:N>`, N from 1, when the request
part had none) and a whole HTTP response (status line, headers, JSON body). At most 1000 parts.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import uuid
from collections.abc import Callable
from email.message import Message
from typing import Any
from urllib.parse import urlsplit

from labctl.testbed.gce.common import ApiError
from labctl.testbed.http import status_phrase

BATCH_PATHS = ("/batch/compute/v1", "/batch")
MAX_PARTS = 1000


def _bad(why: str) -> ApiError:
    return ApiError(400, f"Failed to parse batch request, error: {why}. Received batch body: (omitted)",
                    "badRequest", status_name="INVALID_ARGUMENT")  # Google's front end parses batches


def parse_batch(content_type: str | None, body: bytes) -> list[tuple[str | None, str, str, Message, bytes]]:
    """The embedded requests of a batch body: (Content-ID or None, method, target, headers, body) each."""
    if not content_type or not content_type.lower().strip().startswith("multipart/mixed"):
        raise _bad("the Content-Type of a batch request must be multipart/mixed")
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    outer = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(head + body)
    if not outer.get_boundary():
        raise _bad("no boundary in the Content-Type")
    parts = outer.get_payload()
    if not outer.is_multipart() or not isinstance(parts, list) or not parts:
        raise _bad("no parts in the batch body")
    if len(parts) > MAX_PARTS:
        raise _bad(f"at most {MAX_PARTS} requests in one batch")
    out = []
    for part in parts:
        if part.is_multipart():
            raise _bad("a part of a batch must be one application/http request")
        payload = part.get_payload(decode=True) or b""
        line, _, rest = payload.lstrip(b"\r\n").partition(b"\n")
        words = line.decode("latin-1").strip().split()
        if len(words) not in (2, 3) or not words[0].isalpha() or not words[1]:
            raise _bad(f"invalid request line {line[:80]!r}")
        method, target = words[0].upper(), words[1]
        if "://" in target:
            url = urlsplit(target)
            target = url.path + (f"?{url.query}" if url.query else "")
        if not target.startswith("/"):
            raise _bad(f"invalid request target {target[:80]!r}")
        inner = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(rest)
        inner_body = inner.get_payload(decode=True) if not inner.is_multipart() else None
        out.append((part.get("Content-ID"), method, target, inner, (inner_body or b"").strip(b"\r\n")))
    return out


def merged_headers(outer: Any, inner: Message) -> Message:
    """The outer request's headers (less Content-*) with the part's own on top."""
    merged = Message()
    own = {k.lower() for k in inner}
    for key, value in (outer.items() if outer is not None else []):
        if key.lower().startswith("content-") or key.lower() in own:
            continue
        merged[key] = value
    for key, value in inner.items():
        merged[key] = value
    return merged


def response_id(content_id: str | None, index: int) -> str:
    if content_id:
        inner = content_id.strip()
        if inner.startswith("<") and inner.endswith(">"):
            inner = inner[1:-1]
        return f"<response-{inner}>"
    return f"<response-item:{index}>"


def render_batch(answers: list[tuple[str | None, int, dict, dict]]) -> tuple[bytes, str]:
    """(body, Content-Type) of the batch answer: (request Content-ID, status, JSON body, headers) per part."""
    boundary = f"batch_{uuid.uuid4().hex[:24]}"
    chunks = []
    for index, (content_id, status, body, headers) in enumerate(answers, 1):
        payload = json.dumps(body).encode()
        lines = [f"HTTP/1.1 {status} {status_phrase(status)}".rstrip(), "Content-Type: application/json; charset=UTF-8",
                 "Vary: Origin, X-Origin, Referer", *(f"{k}: {v}" for k, v in headers.items()),
                 f"Content-Length: {len(payload)}"]
        chunks.append(f"--{boundary}\r\nContent-Type: application/http\r\n"
                      f"Content-ID: {response_id(content_id, index)}\r\n\r\n".encode()
                      + "\r\n".join(lines).encode() + b"\r\n\r\n" + payload + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/mixed; boundary={boundary}"


def run_batch(headers: Any, body: bytes, one: Callable[[str, str, bytes, Message], Any]) -> tuple[bytes, str, str]:
    """Serve a batch through `one(method, target, body, headers) -> Outcome`: (body, Content-Type, action), the
    action "hang" or "drop" when an embedded request's fault asks for it (after every part is done)."""
    requests = parse_batch(headers.get("Content-Type") if headers is not None else None, body)
    answers = []
    action = "respond"
    for content_id, method, target, inner, inner_body in requests:
        outcome = one(method, target, inner_body, merged_headers(headers, inner))
        if outcome.action != "respond":
            action = outcome.action
        answers.append((content_id, outcome.status, outcome.body, dict(outcome.headers)))
    payload, content_type = render_batch(answers)
    return payload, content_type, action
