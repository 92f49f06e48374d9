"""Cinder v3 (block storage): volumes, with the attachments Nova makes (`os-volume_attachments`).

Endpoint: <site>/volume/v3/{project_id} (catalog types `block-storage` and `volumev3`). Lifecycle, scaled by the
world's time scale: creating -> available (VOLUME_CREATE_SECONDS) -> in-use while attached -> deleting -> gone
(VOLUME_DELETE_SECONDS). JSON shapes follow the Cinder API reference (volume-show / volumes-list-detailed).
"""

from __future__ import annotations

import time

from labctl.testbed.http import HTTPError, Request, Response, Router
from labctl.testbed.openstack import model
from labctl.testbed.openstack.catalog import PROJECT_ID, USER_ID

PREFIX = "/v3"
MIN_VERSION, MAX_VERSION = "3.0", "3.70"
router = Router()

_KEYS = {400: "badRequest", 403: "forbidden", 404: "itemNotFound", 405: "badMethod", 409: "conflictingRequest",
         413: "overLimit", 429: "overLimit", 500: "computeFault"}


def error_body(status: int, message: str, kind: str | None) -> dict:
    return {_KEYS.get(status, "computeFault"): {"message": message, "code": status}}


def _version_doc(req: Request) -> dict:
    return {
        "id": "v3.0",
        "status": "CURRENT",
        "version": MAX_VERSION,
        "min_version": MIN_VERSION,
        "updated": "2023-08-31T00:00:00Z",
        "links": [{"rel": "self", "href": f"{req.site_url}/volume/v3/"},
                  {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"}],
        "media-types": [{"base": "application/json",
                         "type": "application/vnd.openstack.volume+json;version=3"}],
    }


def root(req: Request) -> Response:
    return Response(300, {"versions": [_version_doc(req)]})


def _headers(resp: Response) -> Response:
    resp.headers.update({"OpenStack-API-Version": f"volume {MAX_VERSION}", "Vary": "OpenStack-API-Version"})
    return resp


@router.route("GET", "/", auth=False)
def version_root(req: Request) -> Response:
    return Response(200, {"versions": [_version_doc(req)]})


@router.route("GET", "/{project_id}")
def version_project(req: Request) -> Response:
    return Response(200, {"versions": [_version_doc(req)]})


def _check_project(req: Request) -> None:
    if req.params.get("project_id") != PROJECT_ID:
        raise HTTPError(404, "The resource could not be found.", "NotFound")


def not_found(volume_id: str) -> HTTPError:
    return HTTPError(404, f"Volume {volume_id} could not be found.", "VolumeNotFound")


def volume_view(req: Request, v: dict, detail: bool = True) -> dict:
    links = [{"rel": "self", "href": f"{req.site_url}/volume/v3/{PROJECT_ID}/volumes/{v['id']}"},
             {"rel": "bookmark", "href": f"{req.site_url}/volume/{PROJECT_ID}/volumes/{v['id']}"}]
    if not detail:
        return {"id": v["id"], "name": v.get("name"), "links": links}
    status = model.volume_status(v, req.now or time.time())
    return {
        "id": v["id"],
        "name": v.get("name"),
        "status": status,
        "size": v["size"],
        "availability_zone": "nova",
        "created_at": model.iso_us(v["created"]),
        "updated_at": model.iso_us(v.get("updated")),
        "attachments": [model.attachment_view(v, a) for a in v.get("attachments", [])],
        "description": v.get("description"),
        "volume_type": "__DEFAULT__",
        "snapshot_id": None,
        "source_volid": None,
        "metadata": dict(v.get("metadata") or {}),
        "links": links,
        "user_id": USER_ID,
        "bootable": "false",
        "encrypted": False,
        "replication_status": None,
        "consistencygroup_id": None,
        "multiattach": False,
        "group_id": None,
        "provider_id": None,
        "service_uuid": None,
        "shared_targets": True,
        "cluster_name": None,
        "volume_type_id": model.VOLUME_TYPE_ID,
        "consumes_quota": True,
        "os-vol-tenant-attr:tenant_id": PROJECT_ID,
        "os-vol-mig-status-attr:migstat": None,
        "os-vol-mig-status-attr:name_id": None,
    }


def _get(db, req: Request) -> dict:
    v = db.get("volume", req.site.name, req.params["id"])
    if v is None:
        raise not_found(req.params["id"])
    return v


@router.route("POST", "/{project_id}/volumes")
def create_volume(req: Request) -> Response:
    _check_project(req)
    body = req.json()
    spec = body.get("volume") if isinstance(body, dict) else None
    if not isinstance(spec, dict):
        raise HTTPError(400, "Missing required element 'volume' in request body.", "BadRequest")
    size = spec.get("size")
    try:
        size = int(size)
    except (TypeError, ValueError):
        raise HTTPError(400, f"Invalid input received: size must be an integer and greater than 0 (got {size!r})",
                        "InvalidInput") from None
    if size <= 0:
        raise HTTPError(400, "Invalid input received: size must be an integer and greater than 0", "InvalidInput")
    metadata = spec.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(x, str)
                                                 for k, x in metadata.items()):
        raise HTTPError(400, "Invalid input for field/attribute metadata.", "ValidationError")
    with req.world.tx() as db:
        if size > model.volume_quota_gb(db, req.site) - model.volume_gb_used(db, req.site):
            raise HTTPError(413, f"VolumeSizeExceedsAvailableQuota: Requested volume or snapshot exceeds allowed "
                                 f"gigabytes quota. Requested {size}G, quota is "
                                 f"{model.volume_quota_gb(db, req.site)}G and "
                                 f"{model.volume_gb_used(db, req.site)}G has been consumed.", "OverLimit")
        v = model.create_volume(db, req.site, spec.get("name"), size, metadata, spec.get("description"),
                                req.now, req.world.time_scale)
        return _headers(Response(202, {"volume": volume_view(req, v)}))


def _filtered(req: Request, db) -> list[dict]:
    items = db.find("volume", req.site.name)
    name = req.q("name")
    if name is not None:
        items = [v for v in items if v.get("name") == name]
    status = req.q("status")
    if status is not None:
        items = [v for v in items if model.volume_status(v, req.now).lower() == status.lower()]
    return items


@router.route("GET", "/{project_id}/volumes/detail")
def list_volumes_detail(req: Request) -> Response:
    _check_project(req)
    with req.world.read() as db:
        return _headers(Response(200, {"volumes": [volume_view(req, v) for v in _filtered(req, db)]}))


@router.route("GET", "/{project_id}/volumes")
def list_volumes(req: Request) -> Response:
    _check_project(req)
    with req.world.read() as db:
        return _headers(Response(200, {"volumes": [volume_view(req, v, False) for v in _filtered(req, db)]}))


@router.route("GET", "/{project_id}/volumes/{id}")
def get_volume(req: Request) -> Response:
    _check_project(req)
    with req.world.read() as db:
        return _headers(Response(200, {"volume": volume_view(req, _get(db, req))}))


@router.route("PUT", "/{project_id}/volumes/{id}")
def update_volume(req: Request) -> Response:
    _check_project(req)
    spec = (req.json() or {}).get("volume") or {}
    with req.world.tx() as db:
        v = _get(db, req)
        for field in ("name", "description"):
            if field in spec:
                v[field] = spec[field]
        if isinstance(spec.get("metadata"), dict):
            v["metadata"] = {**v.get("metadata", {}), **spec["metadata"]}
        v["updated"] = time.time()
        db.put("volume", req.site.name, v)
        return _headers(Response(200, {"volume": volume_view(req, v)}))


@router.route("DELETE", "/{project_id}/volumes/{id}")
def delete_volume(req: Request) -> Response:
    _check_project(req)
    with req.world.tx() as db:
        v = _get(db, req)
        status = model.volume_status(v, req.now)
        if status not in ("available", "error", "error_restoring", "error_extending", "error_managing"):
            raise HTTPError(400, "Invalid volume: Volume status must be available or error or error_restoring or "
                                 "error_extending or error_managing and must not be migrating, attached, belong "
                                 "to a group, have snapshots, awaiting a transfer, or be disassociated from "
                                 f"snapshots after volume transfer (current status: {status}).", "InvalidVolume")
        model.start_volume_delete(db, req.site, v, req.now, req.world.time_scale)
    return _headers(Response(202))
