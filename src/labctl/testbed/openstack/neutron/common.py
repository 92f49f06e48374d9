"""What Neutron v2.0's resource families share: the router, the error shape, versions, resources and extensions,
listings (filters, sorting, pages, fields), request bodies and Neutron's 403/404s."""

from __future__ import annotations

import re
from collections.abc import Collection
from urllib.parse import urlencode

from labctl.testbed.http import HTTPError, Request, Response, Router
from labctl.testbed.openstack import model
from labctl.testbed.openstack.catalog import PROJECT_ID

PREFIX = ""


ADMIN_PROJECT = "f3e1b2c4d5a6477889900aabbccddeef"


router = Router()


def error_body(status: int, message: str, kind: str | None) -> dict:
    default = {
        400: "BadRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "HTTPNotFound",
        405: "HTTPMethodNotAllowed",
        409: "Conflict",
        429: "OverLimit",
        500: "InternalServerError",
    }.get(status, "NeutronError")
    return {"NeutronError": {"type": kind or default, "message": message, "detail": ""}}


@router.route("GET", "/", auth=False)
def versions(req: Request) -> Response:
    return Response(
        200,
        {
            "versions": [
                {
                    "id": "v2.0",
                    "status": "CURRENT",
                    "links": [{"rel": "self", "href": f"{req.site_url}/network/v2.0/"}],
                }
            ]
        },
    )


_RESOURCES = (
    "networks",
    "subnets",
    "ports",
    "routers",
    "floatingips",
    "security-groups",
    "security-group-rules",
    "quotas",
    "extensions",
)


@router.route("GET", "/v2.0")
def resources(req: Request) -> Response:
    return Response(
        200,
        {
            "resources": [
                {
                    "name": r.rstrip("s").replace("-", "_"),
                    "collection": r,
                    "links": [{"rel": "self", "href": f"{req.site_url}/network/v2.0/{r}"}],
                }
                for r in _RESOURCES
            ]
        },
    )


_EXTENSIONS = (
    "router",
    "external-net",
    "security-group",
    "standard-attr-tag",
    "standard-attr-description",
    "standard-attr-timestamp",
    "standard-attr-revisions",
    "quotas",
    "quota_details",
    "fip-port-details",
    "project-id",
    "port-security",
    "binding",
    "extra_dhcp_opt",
    "allowed-address-pairs",
    "filter-validation",
    "pagination",
    "sorting",
    "fields",
    "stateful-security-group",
)


@router.route("GET", "/v2.0/extensions")
def extensions(req: Request) -> Response:
    return Response(
        200,
        {
            "extensions": [
                {
                    "alias": a,
                    "name": a,
                    "description": "",
                    "links": [],
                    "updated": "2013-01-01T00:00:00-00:00",
                }
                for a in _EXTENSIONS
            ]
        },
    )


_SPECIAL = {
    "fields",
    "limit",
    "marker",
    "sort_key",
    "sort_dir",
    "page_reverse",
    "tags",
    "tags-any",
    "not-tags",
    "not-tags-any",
}


def _same(have, want: str) -> bool:
    if isinstance(have, bool):
        return str(have).lower() == want.lower()
    if have is None:
        return want in ("", "None", "null")
    if isinstance(have, list):
        return want in [str(x) for x in have]
    return str(have) == want


def _tags(req: Request, key: str) -> set[str]:
    return {t for v in req.query.get(key, []) for t in v.split(",") if t}


def listing(req: Request, items: list[dict], collection: str) -> Response:
    out = []
    for item in items:
        if any(
            key in item and not any(_same(item[key], v) for v in values)
            for key, values in req.query.items()
            if key not in _SPECIAL
        ):
            continue
        tags = set(item.get("tags", []))
        if (all_ := _tags(req, "tags")) and not all_ <= tags:
            continue
        if (any_ := _tags(req, "tags-any")) and not any_ & tags:
            continue
        if (not_all := _tags(req, "not-tags")) and not_all <= tags:
            continue
        if (not_any := _tags(req, "not-tags-any")) and not_any & tags:
            continue
        out.append(item)
    if req.q("sort_key"):
        key = req.q("sort_key")
        out.sort(key=lambda i: str(i.get(key)), reverse=(req.q("sort_dir") == "desc"))
    body: dict = {}
    if req.q("marker"):
        ids = [i["id"] for i in out]
        out = out[ids.index(req.q("marker")) + 1 :] if req.q("marker") in ids else []
    if req.q("limit"):
        raw = req.q("limit")
        if not re.fullmatch(r"-?[0-9]{1,18}", raw) or int(raw) < 0:
            raise HTTPError(400, f"Bad limit request: Limit must be an integer 0 or greater and not '{raw}'",
                            "BadRequest")
        n = int(raw)
        if n and len(out) > n:
            out = out[:n]
            query = {k: v[0] for k, v in req.query.items() if k != "marker"}
            query["marker"] = out[-1]["id"]
            body[f"{collection}_links"] = [
                {
                    "rel": "next",
                    "href": f"{req.site_url}/network/v2.0/{collection.replace('_', '-')}?{urlencode(query)}",
                }
            ]
    fields = [f for v in req.query.get("fields", []) for f in v.split(",") if f]
    if fields:
        out = [{k: v for k, v in i.items() if k in fields} for i in out]
    body[collection] = out
    return Response(200, body)


def field_filter(req: Request, item: dict) -> dict:
    fields = [f for v in req.query.get("fields", []) for f in v.split(",") if f]
    return {k: v for k, v in item.items() if k in fields} if fields else item


def listed_rows(db, req: Request, kind: str, *fields: str) -> list[dict]:
    """Stored objects of `kind`, narrowed in SQLite by the query's single, non-empty values of `fields` (fields
    stored as the view shows them), so a filtered list does not build a view of every object; `listing` still
    applies every filter to the views."""
    equal = {}
    for field in fields:
        values = req.query.get(field) or []
        if len(values) == 1 and values[0]:
            equal[field] = values[0]
    return db.find(kind, req.site.name, **equal)


def standard_fields(obj: dict, project: str = PROJECT_ID) -> dict:
    return {
        "tenant_id": project,
        "project_id": project,
        "description": obj.get("description", ""),
        "tags": list(obj.get("tags", [])),
        "created_at": model.iso_z(obj.get("created", 0)),
        "updated_at": model.iso_z(obj.get("updated", obj.get("created", 0))),
        "revision_number": obj.get("revision", 0),
    }


def resource_body(req: Request, key: str) -> dict:
    body = req.json()
    spec = body.get(key) if isinstance(body, dict) else None
    if not isinstance(spec, dict):
        raise HTTPError(400, "Resource body required", "BadRequest")
    # The attributes every Neutron resource shares, checked as Neutron's attribute map does.
    for field in ("name", "description"):
        if spec.get(field) is not None and not isinstance(spec[field], str):
            raise HTTPError(400, f"Invalid input for {field}. Reason: '{spec[field]}' is not a valid string.",
                            "HTTPBadRequest")
    if "tags" in spec:
        spec["tags"] = model.check_tags(spec["tags"])
    for field in ("admin_state_up", "port_security_enabled", "enable_snat", "enable_dhcp", "stateful"):
        if field in spec and not isinstance(spec[field], bool):
            raise HTTPError(400, f"Invalid input for {field}. Reason: '{spec[field]}' is not a valid boolean value.",
                            "HTTPBadRequest")
    return spec


def _forbidden(what: str, id_: str) -> HTTPError:
    return HTTPError(403, f"(rule:delete_{what}) is disallowed by policy", "PolicyNotAuthorized")


# Neutron's 404 for each kind of object: message (around the id) and error type.
_NOT_FOUND = {
    "network": ("Network {} could not be found.", "NetworkNotFound"),
    "subnet": ("Subnet {} could not be found.", "SubnetNotFound"),
    "router": ("Router {} could not be found.", "RouterNotFound"),
    "port": ("Port {} could not be found.", "PortNotFound"),
    "fip": ("Floating IP {} could not be found", "FloatingIPNotFound"),
    "secgroup": ("Security group {} does not exist", "SecurityGroupNotFound"),
    "sgrule": ("Security group rule {} does not exist", "SecurityGroupRuleNotFound"),
}


def not_found(kind: str, ref: str) -> HTTPError:
    message, error = _NOT_FOUND[kind]
    return HTTPError(404, message.format(ref), error)


def get_owned(db, req: Request, kind: str, ref: str | None = None, builtin: Collection[str] = ()) -> dict:
    """The project's `kind` object `ref` (default: the id in the path); 403 if it is one of the site's built-in
    objects, which the project sees but may not change, else 404."""
    ref = ref or req.params["id"]
    obj = db.get(kind, req.site.name, ref)
    if obj:
        return obj
    if ref in builtin:
        raise _forbidden(kind, ref)
    raise not_found(kind, ref)
