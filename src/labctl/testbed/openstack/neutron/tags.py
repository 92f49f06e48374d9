"""Neutron v2.0 tags (on networks, subnets, ports, routers, floating IPs, security groups) and quotas."""

from __future__ import annotations

from labctl.testbed.http import HTTPError, Request, Response
from labctl.testbed.openstack import model
from labctl.testbed.openstack.catalog import Site
from labctl.testbed.openstack.model.base import NEUTRON_QUOTAS
from labctl.testbed.openstack.neutron.common import router

_TAGGABLE = {
    "floatingips": "fip",
    "security-groups": "secgroup",
    "ports": "port",
    "networks": "network",
    "subnets": "subnet",
    "routers": "router",
}


def _taggable(db, req: Request) -> tuple[str, dict]:
    kind = _TAGGABLE.get(req.params["resource"])
    if not kind:
        raise HTTPError(404, "The resource could not be found.", "HTTPNotFound")
    obj = db.get(kind, req.site.name, req.params["id"])
    if not obj:
        raise HTTPError(404, f"{req.params['resource']} {req.params['id']} could not be found.", "NotFound")
    return kind, obj


def _save_tags(db, req: Request, kind: str, obj: dict, tags: list[str]) -> None:
    obj["tags"] = sorted(set(tags))
    db.put(kind, req.site.name, model.stamp(obj))


@router.route("GET", "/v2.0/{resource}/{id}/tags")
def get_tags(req: Request) -> Response:
    with req.world.read() as db:
        _, obj = _taggable(db, req)
    return Response(200, {"tags": obj.get("tags", [])})


@router.route("PUT", "/v2.0/{resource}/{id}/tags")
def replace_tags(req: Request) -> Response:
    tags = (req.json() or {}).get("tags")
    if not isinstance(tags, list) or not all(isinstance(t, str) and 0 < len(t) <= 255 for t in tags):
        raise HTTPError(400, "Invalid tags body", "InvalidInput")
    with req.world.tx() as db:
        kind, obj = _taggable(db, req)
        _save_tags(db, req, kind, obj, tags)
    return Response(200, {"tags": obj["tags"]})


@router.route("DELETE", "/v2.0/{resource}/{id}/tags")
def delete_all_tags(req: Request) -> Response:
    with req.world.tx() as db:
        kind, obj = _taggable(db, req)
        _save_tags(db, req, kind, obj, [])
    return Response(204)


@router.route("GET", "/v2.0/{resource}/{id}/tags/{tag}")
def check_tag(req: Request) -> Response:
    with req.world.read() as db:
        _, obj = _taggable(db, req)
    if req.params["tag"] not in obj.get("tags", []):
        raise HTTPError(404, f"Tag {req.params['tag']} could not be found.", "TagNotFound")
    return Response(204)


@router.route("PUT", "/v2.0/{resource}/{id}/tags/{tag}")
def add_tag(req: Request) -> Response:
    with req.world.tx() as db:
        kind, obj = _taggable(db, req)
        _save_tags(db, req, kind, obj, [*obj.get("tags", []), req.params["tag"]])
    return Response(201)


@router.route("DELETE", "/v2.0/{resource}/{id}/tags/{tag}")
def delete_tag(req: Request) -> Response:
    with req.world.tx() as db:
        kind, obj = _taggable(db, req)
        if req.params["tag"] not in obj.get("tags", []):
            raise HTTPError(404, f"Tag {req.params['tag']} could not be found.", "TagNotFound")
        _save_tags(db, req, kind, obj, [t for t in obj["tags"] if t != req.params["tag"]])
    return Response(204)


def _quota(db, site: Site) -> dict:
    return {resource: model.quota(db, site, resource) for resource in NEUTRON_QUOTAS}


@router.route("GET", "/v2.0/quotas/{project}")
def get_quota(req: Request) -> Response:
    with req.world.read() as db:
        return Response(200, {"quota": _quota(db, req.site)})


@router.route("GET", "/v2.0/quotas/{project}/details")
def get_quota_details(req: Request) -> Response:
    with req.world.read() as db:
        quota = _quota(db, req.site)
        used = {resource: model.quota_used(db, req.site, resource) for resource in quota}
    return Response(
        200, {"quota": {k: {"limit": v, "used": used.get(k, 0), "reserved": 0} for k, v in quota.items()}}
    )
