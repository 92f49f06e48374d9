"""What Nova v2.1's resource families share: the router, microversions (`api` registers a handler that gets the
request's microversion), the error shape, the version document, server look-up, filters and pages."""

from __future__ import annotations

import re
from functools import wraps
from urllib.parse import urlencode

from labctl.testbed.http import HTTPError, Request, Response, Router
from labctl.testbed.openstack import model

PREFIX = "/v2.1"


MIN_VERSION, MAX_VERSION = (2, 1), (2, 96)


router = Router()


_KEYS = {
    400: "badRequest",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    406: "notAcceptable",
    409: "conflictingRequest",
    413: "overLimit",
    429: "overLimit",
    500: "computeFault",
    501: "notImplemented",
    503: "serviceUnavailable",
}


def error_body(status: int, message: str, kind: str | None) -> dict:
    body = {"code": status, "message": message}
    if status == 429:
        body["retryAfter"] = "1"
    return {_KEYS.get(status, "computeFault"): body}


def _fmt(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def _version_doc(req: Request) -> dict:
    return {
        "id": "v2.1",
        "status": "CURRENT",
        "version": _fmt(MAX_VERSION),
        "min_version": _fmt(MIN_VERSION),
        "updated": "2013-07-23T11:33:21Z",
        "links": [
            {"rel": "self", "href": f"{req.site_url}/compute/v2.1/"},
            {"rel": "describedby", "type": "text/html", "href": "http://docs.openstack.org/"},
        ],
        "media-types": [
            {"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2.1"}
        ],
    }


def root(req: Request) -> Response:
    doc = _version_doc(req)
    doc.pop("media-types")
    return Response(200, {"versions": [doc]})


def microversion(req: Request) -> tuple[int, int]:
    raw = None
    header = req.headers.get("OpenStack-API-Version")
    if header:
        for part in header.split(","):
            service, _, value = part.strip().partition(" ")
            if service.lower() == "compute":
                raw = value.strip()
    if raw is None:
        raw = req.headers.get("X-OpenStack-Nova-API-Version")
    if not raw:
        return MIN_VERSION
    if raw.lower() == "latest":
        return MAX_VERSION
    m = re.fullmatch(r"(\d+)\.(\d+)", raw.strip())
    if not m:
        raise HTTPError(
            400,
            f"API Version String {raw} is of invalid format. Must be of format MajorNum.MinorNum.",
            "VersionNotFoundForAPIMethod",
        )
    v = (int(m.group(1)), int(m.group(2)))
    if not MIN_VERSION <= v <= MAX_VERSION:
        raise HTTPError(
            406,
            f"Version {raw} is not supported by the API. Minimum is {_fmt(MIN_VERSION)} and "
            f"maximum is {_fmt(MAX_VERSION)}.",
            "InvalidGlobalAPIVersion",
        )
    return v


def api(method: str, template: str, *, auth: bool = True):
    """Register a Nova handler: it receives (req, mv) and its response carries the microversion headers."""

    def deco(fn):
        @wraps(fn)
        def handler(req: Request) -> Response:
            mv = microversion(req)
            resp = fn(req, mv)
            resp.headers.update(
                {
                    "OpenStack-API-Version": f"compute {_fmt(mv)}",
                    "X-OpenStack-Nova-API-Version": _fmt(mv),
                    "Vary": "OpenStack-API-Version, X-OpenStack-Nova-API-Version",
                }
            )
            return resp

        router.route(method, template, auth=auth)(handler)
        return fn

    return deco


@api("GET", "/", auth=False)
def version(req: Request, mv) -> Response:
    return Response(200, {"version": _version_doc(req)})


def self_link(req: Request, kind: str, id: str) -> list[dict]:
    return [
        {"rel": "self", "href": f"{req.site_url}/compute/v2.1/{kind}/{id}"},
        {"rel": "bookmark", "href": f"{req.site_url}/compute/{kind}/{id}"},
    ]


def server_not_found(sid: str) -> HTTPError:
    return HTTPError(404, f"Instance {sid} could not be found.", "InstanceNotFound")


def server_or_404(db, req: Request) -> dict:
    s = db.get("server", req.site.name, req.params["id"])
    if not s:
        raise server_not_found(req.params["id"])
    return s


def filter_servers(db, req: Request, servers: list[dict]) -> list[dict]:
    q = req.q
    out = []
    for s in servers:
        if q("name"):
            try:
                if not re.search(q("name"), s["name"]):
                    continue
            except re.error:
                if q("name") not in s["name"]:
                    continue
        if q("status") and model.server_status(s, req.now) != q("status").upper():
            continue
        if q("image") and q("image") != s.get("image_id"):
            continue
        if q("flavor") and q("flavor") != s["flavor_id"]:
            continue
        if q("key_name") and q("key_name") != s.get("key_name"):
            continue
        if q("ip"):
            ips = [p["fixed_ip"] for p in model.server_ports(db, req.site, s["id"])]
            if not any(re.search(q("ip"), ip) for ip in ips):
                continue
        tags = set(s.get("tags", []))
        if q("tags") and not set(q("tags").split(",")) <= tags:
            continue
        if q("tags-any") and not set(q("tags-any").split(",")) & tags:
            continue
        if q("not-tags") and set(q("not-tags").split(",")) <= tags:
            continue
        if q("not-tags-any") and set(q("not-tags-any").split(",")) & tags:
            continue
        if q("changes-since"):
            since = model.parse_lease_date(
                q("changes-since").replace("Z", "").split("+")[0], req.now, "since"
            )
            if s["updated"] < since:
                continue
        out.append(s)
    out.sort(key=lambda s: (s["created"], s["id"]), reverse=True)
    return out


def paginate(req: Request, items: list[dict], key: str, path: str) -> tuple[list[dict], list[dict] | None]:
    marker, limit = req.q("marker"), req.q("limit")
    if marker:
        ids = [i["id"] for i in items]
        if marker not in ids:
            raise HTTPError(400, f"marker [{marker}] not found", "MarkerNotFound")
        items = items[ids.index(marker) + 1 :]
    if limit:
        try:
            n = int(limit)
        except ValueError:
            raise HTTPError(
                400, f"Invalid input for query parameters limit. Value: {limit}. '{limit}' does not match "
                "'^[0-9]*$'", "ValidationError"
            ) from None
        if n < 0:
            raise HTTPError(
                400, f"Invalid input for query parameters limit. Value: {limit}. {n} is less than the minimum of "
                "0", "ValidationError"
            )
        if n == 0:
            return [], None
        if len(items) > n:
            items = items[:n]
            query = {k: v[0] for k, v in req.query.items() if k != "marker"}
            query["marker"] = items[-1]["id"]
            return items, [{"rel": "next", "href": f"{req.site_url}/compute/v2.1{path}?{urlencode(query)}"}]
    return items, None
