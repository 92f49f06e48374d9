"""A minimal Swift (object storage): the account's container list, containers with metadata, small objects.

Endpoint: <site>/object-store/v1/AUTH_{project_id} (catalog type `object-store`). Errors are Swift's short HTML
pages; a container that still holds objects cannot be deleted (409).
"""

from __future__ import annotations

import base64
import hashlib
import time
from email.utils import formatdate

from labctl.testbed.http import HTTPError, Request, Response, Router
from labctl.testbed.openstack.catalog import PROJECT_ID

PREFIX = "/v1"
ERROR_CONTENT_TYPE = "text/html; charset=UTF-8"
ACCOUNT = f"AUTH_{PROJECT_ID}"
router = Router()

_TEXT = {
    400: ("Bad Request", "The server could not comply with the request since it is either malformed or otherwise "
                         "incorrect."),
    401: ("Unauthorized", "This server could not verify that you are authorized to access the document you "
                          "requested."),
    404: ("Not Found", "The resource could not be found."),
    405: ("Method Not Allowed", "The method is not allowed for this resource."),
    409: ("Conflict", "There was a conflict when trying to complete your request."),
    411: ("Length Required", "Length Required"),
    413: ("Request Entity Too Large", "The body of your request was too large for this server."),
    429: ("Too Many Requests", "The server is rate limiting the request."),
    500: ("Internal Error", "An error occurred."),
}


def error_body(status: int, message: str, kind: str | None) -> str:
    title, text = _TEXT.get(status, (kind or "Error", message))
    return f"<html><h1>{title}</h1><p>{text}</p></html>"


def root(req: Request) -> Response:
    raise HTTPError(404, "The resource could not be found.")


def _account(req: Request) -> None:
    if req.params.get("account") != ACCOUNT:
        raise HTTPError(404, "The resource could not be found.")


def _ts(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}"


def _meta_headers(req: Request, prefix: str) -> dict[str, str]:
    prefix = prefix.lower()
    return {k[len(prefix):].lower(): v for k, v in req.headers.items() if k.lower().startswith(prefix)}


def _meta_out(meta: dict[str, str], prefix: str) -> dict[str, str]:
    return {prefix + "-".join(p.capitalize() for p in k.split("-")): v for k, v in meta.items()}


def _wants_json(req: Request) -> bool:
    return req.q("format") == "json" or "application/json" in (req.headers.get("Accept") or "")


def _container(db, req: Request) -> dict:
    c = db.get("container", req.site.name, req.params["container"])
    if c is None:
        raise HTTPError(404, "The resource could not be found.")
    return c


def _bytes(c: dict) -> int:
    return sum(int(o["bytes"]) for o in c.get("objects", {}).values())


@router.route("GET", "/{account}")
def get_account(req: Request) -> Response:
    _account(req)
    with req.world.read() as db:
        containers = db.find("container", req.site.name)
    containers.sort(key=lambda c: c["name"])
    prefix = req.q("prefix")
    if prefix:
        containers = [c for c in containers if c["name"].startswith(prefix)]
    headers = {
        "X-Account-Container-Count": str(len(containers)),
        "X-Account-Object-Count": str(sum(len(c.get("objects", {})) for c in containers)),
        "X-Account-Bytes-Used": str(sum(_bytes(c) for c in containers)),
        "X-Timestamp": f"{time.time():.5f}",
    }
    if _wants_json(req):
        body = [{"name": c["name"], "count": len(c.get("objects", {})), "bytes": _bytes(c),
                 "last_modified": _ts(c["created"])} for c in containers]
        return Response(200, body, headers, "application/json; charset=utf-8")
    if not containers:
        return Response(204, None, headers, "text/plain; charset=utf-8")
    return Response(200, "".join(c["name"] + "\n" for c in containers), headers, "text/plain; charset=utf-8")


@router.route("PUT", "/{account}/{container}")
def put_container(req: Request) -> Response:
    _account(req)
    name = req.params["container"]
    if len(name) > 256:
        raise HTTPError(400, "Container name length of 257 longer than 256")
    with req.world.tx() as db:
        existing = db.get("container", req.site.name, name)
        meta = _meta_headers(req, "X-Container-Meta-")
        if existing is None:
            db.put("container", req.site.name, {"id": name, "name": name, "metadata": meta, "objects": {},
                                                "created": time.time()})
            return Response(201, None, {}, "text/html; charset=UTF-8")
        existing["metadata"] = {**existing.get("metadata", {}), **meta}
        db.put("container", req.site.name, existing)
    return Response(202, None, {}, "text/html; charset=UTF-8")


@router.route("POST", "/{account}/{container}")
def post_container(req: Request) -> Response:
    _account(req)
    with req.world.tx() as db:
        c = _container(db, req)
        c["metadata"] = {**c.get("metadata", {}), **_meta_headers(req, "X-Container-Meta-")}
        db.put("container", req.site.name, c)
    return Response(204)


@router.route("GET", "/{account}/{container}")
def get_container(req: Request) -> Response:
    _account(req)
    with req.world.read() as db:
        c = _container(db, req)
    objects = sorted(c.get("objects", {}).items())
    headers = {
        "X-Container-Object-Count": str(len(objects)),
        "X-Container-Bytes-Used": str(_bytes(c)),
        "X-Timestamp": f"{c['created']:.5f}",
        "X-Storage-Policy": "Policy-0",
        **_meta_out(c.get("metadata", {}), "X-Container-Meta-"),
    }
    if req.method == "HEAD":
        return Response(204, None, headers, "text/plain; charset=utf-8")
    if _wants_json(req):
        body = [{"name": n, "hash": o["etag"], "bytes": o["bytes"], "content_type": o["content_type"],
                 "last_modified": _ts(o["modified"])} for n, o in objects]
        return Response(200, body, headers, "application/json; charset=utf-8")
    if not objects:
        return Response(204, None, headers, "text/plain; charset=utf-8")
    return Response(200, "".join(n + "\n" for n, _ in objects), headers, "text/plain; charset=utf-8")


@router.route("DELETE", "/{account}/{container}")
def delete_container(req: Request) -> Response:
    _account(req)
    with req.world.tx() as db:
        c = _container(db, req)
        if c.get("objects"):
            raise HTTPError(409, "There was a conflict when trying to complete your request.")
        db.delete("container", req.site.name, c["id"])
    return Response(204)


@router.route("PUT", "/{account}/{container}/{object}")
def put_object(req: Request) -> Response:
    _account(req)
    data = req.body or b""
    etag = hashlib.md5(data).hexdigest()  # noqa: S324 - Swift's ETag is an MD5
    with req.world.tx() as db:
        c = _container(db, req)
        c.setdefault("objects", {})[req.params["object"]] = {
            "data": base64.b64encode(data).decode(), "bytes": len(data), "etag": etag, "modified": time.time(),
            "content_type": req.headers.get("Content-Type") or "application/octet-stream",
            "metadata": _meta_headers(req, "X-Object-Meta-"),
        }
        db.put("container", req.site.name, c)
    return Response(201, None, {"Etag": etag, "Last-Modified": formatdate(usegmt=True)}, "text/html; charset=UTF-8")


@router.route("GET", "/{account}/{container}/{object}")
def get_object(req: Request) -> Response:
    _account(req)
    with req.world.read() as db:
        c = _container(db, req)
    o = c.get("objects", {}).get(req.params["object"])
    if o is None:
        raise HTTPError(404, "The resource could not be found.")
    headers = {"Etag": o["etag"], "Last-Modified": formatdate(o["modified"], usegmt=True),
               "X-Timestamp": f"{o['modified']:.5f}", **_meta_out(o.get("metadata", {}), "X-Object-Meta-")}
    return Response(200, base64.b64decode(o["data"]), headers, o["content_type"])


@router.route("DELETE", "/{account}/{container}/{object}")
def delete_object(req: Request) -> Response:
    _account(req)
    with req.world.tx() as db:
        c = _container(db, req)
        if c.get("objects", {}).pop(req.params["object"], None) is None:
            raise HTTPError(404, "The resource could not be found.")
        db.put("container", req.site.name, c)
    return Response(204)

