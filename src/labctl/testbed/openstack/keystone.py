"""Keystone v3: version documents, tokens (password, application credential, token), projects, catalog."""

from __future__ import annotations

import time
import uuid

from labctl.testbed.access import same_secret
from labctl.testbed.http import HTTPError, Request, Response, Router, status_phrase
from labctl.testbed.openstack import catalog as cat
from labctl.testbed.openstack.catalog import Site

PREFIX = ""
TOKEN_TTL = 24 * 3600
router = Router()

UNAUTHORIZED = "The request you have made requires authentication."
ROLES = [
    {"id": cat.stable_id("role", "member"), "name": "member"},
    {"id": cat.stable_id("role", "reader"), "name": "reader"},
]
SERVICE_ENDPOINTS = {  # service -> (type, name, path below the site prefix)
    "identity": ("identity", "keystone", "/identity"),
    "compute": ("compute", "nova", "/compute/v2.1"),
    "network": ("network", "neutron", "/network"),
    "image": ("image", "glance", "/image"),
    "reservation": ("reservation", "blazar", "/reservation/v1"),
    "volume": ("block-storage", "cinder", f"/volume/v3/{cat.PROJECT_ID}"),
    "object-store": ("object-store", "swift", f"/object-store/v1/AUTH_{cat.PROJECT_ID}"),
}
#: Extra catalog types for a service under another name (older clients look Cinder up as volumev3).
SERVICE_ALIASES = {"volume": ("volumev3", "cinderv3")}


def error_body(status: int, message: str, kind: str | None) -> dict:
    return {"error": {"code": status, "message": message, "title": status_phrase(status, kind or "Error")}}


def _ts(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


def _version(req: Request) -> dict:
    return {
        "id": "v3.14",
        "status": "stable",
        "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": f"{req.site_url}/identity/v3/"}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}],
    }


@router.route("GET", "/", auth=False)
def versions(req: Request) -> Response:
    return Response(300, {"versions": {"values": [_version(req)]}})


@router.route("GET", "/v3", auth=False)
def version(req: Request) -> Response:
    return Response(200, {"version": _version(req)})


def service_catalog(site: Site, site_url: str) -> list[dict]:
    out = []
    entries = []
    for svc in site.services:
        stype, name, path = SERVICE_ENDPOINTS[svc]
        entries.append((stype, name, path))
        if svc in SERVICE_ALIASES:
            entries.append((*SERVICE_ALIASES[svc], path))
    for stype, name, path in entries:
        out.append(
            {
                "id": cat.stable_id(site.name, "service", stype),
                "type": stype,
                "name": name,
                "endpoints": [
                    {
                        "id": cat.stable_id(site.name, "endpoint", stype),
                        "interface": "public",
                        "region": site.region,
                        "region_id": site.region,
                        "url": site_url + path,
                    }
                ],
            }
        )
    return out


def _project(req: Request) -> dict:
    return {
        "id": cat.PROJECT_ID,
        "name": cat.PROJECT_NAME,
        "domain_id": cat.DOMAIN["id"],
        "description": "",
        "enabled": True,
        "is_domain": False,
        "parent_id": cat.DOMAIN["id"],
        "tags": [],
        "options": {},
        "links": {"self": f"{req.site_url}/identity/v3/projects/{cat.PROJECT_ID}"},
    }


def token_body(req: Request, data: dict) -> dict:
    token = {
        "methods": data["methods"],
        "user": {
            "domain": dict(cat.DOMAIN),
            "id": cat.USER_ID,
            "name": cat.USER_NAME,
            "password_expires_at": None,
        },
        "audit_ids": [data["audit"]],
        "expires_at": _ts(data["expires"]),
        "issued_at": _ts(data["issued"]),
        "project": {"domain": dict(cat.DOMAIN), "id": cat.PROJECT_ID, "name": cat.PROJECT_NAME},
        "is_domain": False,
        "roles": ROLES,
        "catalog": service_catalog(req.site, req.site_url),
    }
    if data.get("app_cred"):
        token["application_credential"] = {
            "id": req.world.credentials.app_cred_id,
            "name": cat.APP_CRED_NAME,
            "restricted": False,
        }
    return {"token": token}


def _unauthorized(message: str = UNAUTHORIZED) -> HTTPError:
    return HTTPError(401, message, "Unauthorized")


def _check_identity(req: Request, identity: dict) -> tuple[list[str], bool]:
    creds = req.world.credentials
    methods = identity.get("methods")
    if not isinstance(methods, list) or not methods:
        raise HTTPError(
            400, "Invalid input for field 'identity': 'methods' is a required property", "ValidationError"
        )
    app_cred = False
    for method in methods:
        if not isinstance(method, str):
            raise HTTPError(400, f"Invalid input for field 'identity/methods': {method!r} is not of type 'string'",
                            "ValidationError")
        section = identity.get(method)
        if not isinstance(section, dict):
            raise HTTPError(
                400,
                f"Invalid input for field 'identity': '{method}' is a required property",
                "ValidationError",
            )
        if method == "password":
            user = section.get("user")
            if not isinstance(user, dict):
                raise HTTPError(400, "Invalid input for field 'identity/password/user': not an object",
                                "ValidationError")
            if not (
                (user.get("name") == cat.USER_NAME or user.get("id") == cat.USER_ID)
                and same_secret(user.get("password"), creds.password)
            ):
                raise _unauthorized()
        elif method == "application_credential":
            user = section.get("user") or {}
            if not isinstance(user, dict):
                raise HTTPError(400, "Invalid input for field 'identity/application_credential/user': not an "
                                "object", "ValidationError")
            ok_id = same_secret(section.get("id"), creds.app_cred_id)
            ok_name = section.get("name") == cat.APP_CRED_NAME and (
                user.get("name") == cat.USER_NAME or user.get("id") == cat.USER_ID
            )
            if not (ok_id or ok_name) or not same_secret(section.get("secret"), creds.app_cred_secret):
                raise _unauthorized()
            app_cred = True
        elif method == "token":
            with req.world.read() as db:
                old = db.token(str(section.get("id")))
            if not old or old["site"] != req.site.name:
                raise _unauthorized()
            app_cred = bool(old.get("app_cred"))
        else:
            raise _unauthorized("Attempted to authenticate with an unsupported method.")
    return methods, app_cred


@router.route("POST", "/v3/auth/tokens", auth=False)
def issue(req: Request) -> Response:
    body = req.json()
    auth = body.get("auth")
    identity = auth.get("identity") if isinstance(auth, dict) else None
    if not isinstance(identity, dict):
        raise HTTPError(
            400, "Invalid input for field 'auth': 'identity' is a required property", "ValidationError"
        )
    methods, app_cred = _check_identity(req, identity)
    now = time.time()
    token_id = "gAAAAA" + uuid.uuid4().hex + uuid.uuid4().hex
    data = {
        "methods": methods,
        "app_cred": app_cred,
        "issued": now,
        "expires": now + TOKEN_TTL,
        "audit": uuid.uuid4().hex[:22],
    }
    with req.world.tx() as db:
        db.put_token(token_id, req.site.name, data["expires"], data)
    return Response(201, token_body(req, data), headers={"X-Subject-Token": token_id})


def _subject(req: Request) -> tuple[str, dict]:
    subject = req.headers.get("X-Subject-Token")
    with req.world.read() as db:
        data = db.token(subject) if subject else None
    if not data or data["site"] != req.site.name:
        raise HTTPError(404, f"Could not find token: {subject}.", "TokenNotFound")
    return subject, data


@router.route("GET", "/v3/auth/tokens")
def validate(req: Request) -> Response:
    subject, data = _subject(req)
    return Response(200, token_body(req, data), headers={"X-Subject-Token": subject})


@router.route("DELETE", "/v3/auth/tokens")
def revoke(req: Request) -> Response:
    subject, _ = _subject(req)
    with req.world.tx() as db:
        db.delete_token(subject)
    return Response(204)


@router.route("GET", "/v3/auth/catalog")
def auth_catalog(req: Request) -> Response:
    return Response(
        200,
        {
            "catalog": service_catalog(req.site, req.site_url),
            "links": {"self": f"{req.site_url}/identity/v3/auth/catalog"},
        },
    )


def _projects(req: Request) -> Response:
    name = req.q("name")
    projects = [_project(req)] if name in (None, cat.PROJECT_NAME) else []
    return Response(
        200,
        {
            "projects": projects,
            "links": {"self": req.site_url + "/identity" + req.path, "next": None, "previous": None},
        },
    )


@router.route("GET", "/v3/auth/projects")
def auth_projects(req: Request) -> Response:
    return _projects(req)


@router.route("GET", "/v3/users/{user_id}/projects")
def user_projects(req: Request) -> Response:
    if req.params["user_id"] != cat.USER_ID:
        raise HTTPError(
            403,
            "You are not authorized to perform the requested action: identity:list_user_projects.",
            "Forbidden",
        )
    return _projects(req)


@router.route("GET", "/v3/projects")
def projects(req: Request) -> Response:
    return _projects(req)


@router.route("GET", "/v3/projects/{project_id}")
def project(req: Request) -> Response:
    if req.params["project_id"] not in (cat.PROJECT_ID, cat.PROJECT_NAME):
        raise HTTPError(404, f"Could not find project: {req.params['project_id']}.", "ProjectNotFound")
    return Response(200, {"project": _project(req)})


@router.route("GET", "/v3/users/{user_id}")
def user(req: Request) -> Response:
    if req.params["user_id"] != cat.USER_ID:
        raise HTTPError(404, f"Could not find user: {req.params['user_id']}.", "UserNotFound")
    return Response(
        200,
        {
            "user": {
                "id": cat.USER_ID,
                "name": cat.USER_NAME,
                "domain_id": cat.DOMAIN["id"],
                "enabled": True,
                "default_project_id": cat.PROJECT_ID,
                "password_expires_at": None,
                "options": {},
                "links": {"self": f"{req.site_url}/identity/v3/users/{cat.USER_ID}"},
            }
        },
    )


@router.route("GET", "/v3/users/{user_id}/application_credentials")
def app_creds(req: Request) -> Response:
    return Response(
        200,
        {
            "application_credentials": [
                {
                    "id": req.world.credentials.app_cred_id,
                    "name": cat.APP_CRED_NAME,
                    "description": "labctl testbed",
                    "project_id": cat.PROJECT_ID,
                    "roles": ROLES,
                    "unrestricted": True,
                    "expires_at": None,
                    "access_rules": [],
                    "links": {
                        "self": f"{req.site_url}/identity/v3/users/{cat.USER_ID}/application_credentials/"
                        f"{req.world.credentials.app_cred_id}"
                    },
                }
            ],
            "links": {"self": req.site_url + "/identity" + req.path, "next": None, "previous": None},
        },
    )


@router.route("GET", "/v3/regions")
def regions(req: Request) -> Response:
    return Response(
        200,
        {
            "regions": [{"id": req.site.region, "description": "", "parent_region_id": None, "links": {}}],
            "links": {"self": None, "next": None, "previous": None},
        },
    )
