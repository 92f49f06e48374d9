"""Glance v2 (read-only): version documents, the Chameleon images of each site, and the image schema."""

from __future__ import annotations

import hashlib
from urllib.parse import urlencode

from labctl.testbed.http import HTTPError, Request, Response, Router, status_phrase
from labctl.testbed.openstack import catalog as cat
from labctl.testbed.openstack import model

PREFIX = ""
ADMIN_PROJECT = "f3e1b2c4d5a6477889900aabbccddeef"
router = Router()


def error_body(status: int, message: str, kind: str | None) -> str:
    # Glance errors come from webob: an HTML page, not JSON.
    title = f"{status} {status_phrase(status, 'Error')}"
    return (
        f"<html>\n <head>\n  <title>{title}</title>\n </head>\n <body>\n  <h1>{title}</h1>\n"
        f"  {message}<br /><br />\n\n\n\n </body>\n</html>"
    )


ERROR_CONTENT_TYPE = "text/html; charset=UTF-8"


def _versions(req: Request) -> dict:
    href = f"{req.site_url}/image/v2/"
    ids = (
        "v2.16",
        "v2.15",
        "v2.14",
        "v2.13",
        "v2.12",
        "v2.11",
        "v2.10",
        "v2.9",
        "v2.8",
        "v2.7",
        "v2.6",
        "v2.5",
        "v2.4",
        "v2.3",
        "v2.2",
        "v2.1",
        "v2.0",
    )
    return {
        "versions": [
            {
                "id": v,
                "status": "CURRENT" if i == 0 else "SUPPORTED",
                "links": [{"rel": "self", "href": href}],
            }
            for i, v in enumerate(ids)
        ]
    }


@router.route("GET", "/", auth=False)
def versions_root(req: Request) -> Response:
    return Response(300, _versions(req))


@router.route("GET", "/versions", auth=False)
def versions(req: Request) -> Response:
    return Response(200, _versions(req))


def image_view(req: Request, img: cat.Image) -> dict:
    digest = hashlib.sha512(img.id.encode()).hexdigest()
    return {
        "id": img.id,
        "name": img.name,
        "status": "active",
        "visibility": "public",
        "protected": False,
        "os_hidden": False,
        "owner": ADMIN_PROJECT,
        "checksum": hashlib.md5(img.id.encode()).hexdigest(),  # noqa: S324
        "os_hash_algo": "sha512",
        "os_hash_value": digest,
        "size": img.size,
        "virtual_size": None,
        "min_disk": 0,
        "min_ram": 0,
        "disk_format": "qcow2",
        "container_format": "bare",
        "created_at": model.iso_z(1_750_000_000),
        "updated_at": model.iso_z(1_750_000_000),
        "tags": [],
        "self": f"/v2/images/{img.id}",
        "file": f"/v2/images/{img.id}/file",
        "schema": "/v2/schemas/image",
        "build-distro": "ubuntu",
        "build-release": img.release,
        "build-variant": img.variant,
        "build-repo": "https://github.com/ChameleonCloud/cc-images",
        "os_distro": "ubuntu",
        "os_version": "24.04" if img.release == "noble" else "22.04",
        "architecture": "x86_64",
    }


@router.route("GET", "/v2/images")
def list_images(req: Request) -> Response:
    images = [image_view(req, i) for i in cat.images(req.site)]
    for key in ("name", "status", "visibility", "os_hidden", "owner", "id"):
        value = req.q(key)
        if value is None:
            continue
        if value.startswith("in:"):
            wanted = value[3:].split(",")
            images = [i for i in images if str(i.get(key)) in wanted]
        else:
            images = [i for i in images if str(i.get(key)).lower() == value.lower()]
    if req.q("tag"):
        images = [i for i in images if req.q("tag") in i["tags"]]
    images.sort(key=lambda i: i["name"])
    if req.q("marker"):
        ids = [i["id"] for i in images]
        if req.q("marker") not in ids:
            raise HTTPError(400, f"marker {req.q('marker')} could not be found.", "BadRequest")
        images = images[ids.index(req.q("marker")) + 1 :]
    query = {k: v[0] for k, v in req.query.items() if k != "marker"}
    body = {
        "images": images,
        "schema": "/v2/schemas/images",
        "first": "/v2/images" + (f"?{urlencode(query)}" if query else ""),
    }
    raw = req.q("limit")
    if raw and not (raw.isascii() and raw.isdigit()):
        raise HTTPError(400, "limit param must be an integer" if not raw.lstrip("-").isdigit()
                        else "limit param must be positive", "BadRequest")
    limit = int(raw) if raw else 25
    if limit and len(images) > limit:
        body["images"] = images[:limit]
        query["marker"] = images[limit - 1]["id"]
        body["next"] = f"/v2/images?{urlencode(query)}"
    return Response(200, body)


@router.route("GET", "/v2/images/{id}")
def get_image(req: Request) -> Response:
    for img in cat.images(req.site):
        if img.id == req.params["id"]:
            return Response(200, image_view(req, img))
    raise HTTPError(404, f"No image found with ID {req.params['id']}", "NotFound")


def _schema() -> dict:
    nullable_str = {"type": ["null", "string"]}
    props = {
        "id": {
            "type": "string",
            "description": "An identifier for the image",
            "pattern": "^([0-9a-fA-F]){8}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}"
            "-([0-9a-fA-F]){12}$",
        },
        "name": {**nullable_str, "maxLength": 255, "description": "Descriptive name for the image"},
        "status": {
            "type": "string",
            "readOnly": True,
            "enum": [
                "queued",
                "saving",
                "active",
                "killed",
                "deleted",
                "uploading",
                "importing",
                "pending_delete",
                "deactivated",
            ],
        },
        "visibility": {"type": "string", "enum": ["community", "public", "private", "shared"]},
        "protected": {"type": "boolean"},
        "os_hidden": {"type": "boolean"},
        "checksum": {**nullable_str, "readOnly": True, "maxLength": 32},
        "os_hash_algo": {**nullable_str, "readOnly": True, "maxLength": 64},
        "os_hash_value": {**nullable_str, "readOnly": True, "maxLength": 128},
        "owner": {**nullable_str, "maxLength": 255},
        "size": {"type": ["null", "integer"], "readOnly": True},
        "virtual_size": {"type": ["null", "integer"], "readOnly": True},
        "container_format": {
            **nullable_str,
            "enum": [None, "ami", "ari", "aki", "bare", "ovf", "ova", "docker", "compressed"],
        },
        "disk_format": {
            **nullable_str,
            "enum": [None, "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop"],
        },
        "created_at": {"type": "string", "readOnly": True},
        "updated_at": {"type": "string", "readOnly": True},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 255}},
        "direct_url": {"type": "string", "readOnly": True},
        "min_ram": {"type": "integer"},
        "min_disk": {"type": "integer"},
        "self": {"type": "string", "readOnly": True},
        "file": {"type": "string", "readOnly": True},
        "stores": {"type": "string", "readOnly": True},
        "schema": {"type": "string", "readOnly": True},
        "locations": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"url": {"type": "string", "maxLength": 255}, "metadata": {"type": "object"}},
                "required": ["url", "metadata"],
            },
        },
        "os_distro": {"type": "string", "is_base": False},
        "os_version": {"type": "string", "is_base": False},
        "architecture": {"type": "string", "is_base": False},
    }
    return {
        "name": "image",
        "properties": props,
        "additionalProperties": {"type": "string"},
        "links": [
            {"rel": "self", "href": "{self}"},
            {"rel": "enclosure", "href": "{file}"},
            {"rel": "describedby", "href": "{schema}"},
        ],
    }


@router.route("GET", "/v2/schemas/image")
def image_schema(req: Request) -> Response:
    return Response(200, _schema())


@router.route("GET", "/v2/schemas/images")
def images_schema(req: Request) -> Response:
    return Response(
        200,
        {
            "name": "images",
            "properties": {
                "images": {"type": "array", "items": _schema()},
                "schema": {"type": "string"},
                "first": {"type": "string"},
                "next": {"type": "string"},
            },
            "links": [
                {"rel": "first", "href": "{first}"},
                {"rel": "next", "href": "{next}"},
                {"rel": "describedby", "href": "{schema}"},
            ],
        },
    )
