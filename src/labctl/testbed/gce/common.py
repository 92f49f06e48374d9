"""What the Compute Engine API's resource families share: its errors (`ApiError`), a request (`Call`), links,
validation, requestId idempotency, list and aggregatedList pages."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from labctl.testbed.gce import catalog
from labctl.testbed.gce import world as w
from labctl.testbed.gce.world import Db, GceWorld
from labctl.testbed.http import JsonError, parse_json

API_PREFIX = "/compute/v1/"


USER = "labctl-student@sim-project.iam.gserviceaccount.com"


_NAME = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")


_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")


LINK_KEYS = frozenset({"selfLink", "zone", "region", "machineType", "targetLink", "network", "subnetwork",
                       "users", "acceleratorType", "source", "sourceImage", "diskType", "zones", "subnetworks",
                       "type", "licenses"})


EPOCH = "1969-12-31T16:00:00.000-08:00"


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str, headers: dict | None = None,
                 status_name: str | None = None, detail: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.headers = headers or {}
        self.status_name = status_name or _STATUS_NAMES.get(status)
        self.detail = detail or {}  # more of the errors[] item (location, locationType, its own message)

    def body(self) -> dict:
        item = {"message": self.message, "domain": "global", "reason": self.reason, **self.detail}
        error: dict[str, Any] = {"code": self.status, "message": self.message, "errors": [item]}
        if self.status_name:
            error["status"] = self.status_name
        return {"error": error}


# The google.rpc status that Google's front end adds to errors it raises itself (authentication, parsing); the
# errors Compute Engine's own backend returns carry code, message and errors[] only.
_STATUS_NAMES = {401: "UNAUTHENTICATED", 413: "INVALID_ARGUMENT"}


_AUTH_HELP = ("Expected OAuth 2 access token, login cookie or other valid authentication credential. "
              "See https://developers.google.com/identity/sign-in/web/devconsole-project.")


def unauthenticated(header: str | None) -> ApiError:
    """Google's 401 for a request without a bearer token, or with one it does not know."""
    where = {"location": "Authorization", "locationType": "header"}
    if not header:
        return ApiError(401, f"Request is missing required authentication credential. {_AUTH_HELP}", "required",
                        {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
                        detail={"message": "Login Required.", **where})
    return ApiError(401, f"Request had invalid authentication credentials. {_AUTH_HELP}", "authError",
                    {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", error="invalid_token"'},
                    detail={"message": "Invalid Credentials", **where})


def check_auth(world: GceWorld, headers: Any) -> None:
    """Only a bearer token of this world opens its API (see `labctl.testbed.access`)."""
    from labctl.testbed.access import same_secret

    header = headers.get("Authorization")
    scheme, _, token = (header or "").strip().partition(" ")
    if not header or scheme.lower() != "bearer" or not same_secret(token.strip(), world.credentials.gce_token):
        raise unauthenticated(header)


def not_found(resource: str) -> ApiError:
    return ApiError(404, f"The resource '{resource}' was not found", "notFound")


def invalid(field_name: str, value: Any, why: str) -> ApiError:
    return ApiError(400, f"Invalid value for field '{field_name}': '{value}'. {why}", "invalid")


@dataclass
class Call:
    world: GceWorld
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    base: str  # http://127.0.0.1:PORT/compute/v1/
    stop_event: threading.Event
    params: dict[str, str] = field(default_factory=dict)

    def q(self, key: str, default: str | None = None) -> str | None:
        values = self.query.get(key)
        return values[0] if values else default

    def json(self) -> dict:
        if not self.body:
            raise ApiError(400, "Required field 'resource' not specified", "required")
        try:
            data = parse_json(self.body)
        except JsonError as e:
            raise ApiError(400, f"Invalid JSON payload received. {str(e).capitalize()}.", "parseError",
                           status_name="INVALID_ARGUMENT") from None
        if not isinstance(data, dict):
            raise ApiError(400, "Invalid JSON payload received. Expected an object.", "parseError",
                           status_name="INVALID_ARGUMENT")
        return data

    @property
    def project(self) -> str:
        return self.params["project"]

    def link(self, rel: str) -> str:
        return self.base + rel


# ------------------------------------------------------------------------------------ rendering helpers
def links(obj: Any, base: str, key: str | None = None) -> Any:
    """Turn stored relative links ("projects/...") into URLs on the serving endpoint."""
    if isinstance(obj, dict):
        return {k: links(v, base, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [links(v, base, key) for v in obj]
    if isinstance(obj, str) and key in LINK_KEYS and obj.startswith("projects/"):
        return base + obj
    return obj


# ------------------------------------------------------------------------------------ resource references
# Where each collection lives: a reference names it as projects/P/global/C/N, projects/P/zones/Z/C/N or
# projects/P/regions/R/C/N (images also as .../global/images/family/F, and as a zonal image family view).
REF_SCOPES = {"machineTypes": "zones", "acceleratorTypes": "zones", "diskTypes": "zones", "disks": "zones",
              "instances": "zones", "imageFamilyViews": "zones", "images": "global", "networks": "global",
              "firewalls": "global", "subnetworks": "regions", "addresses": "regions"}


_REF_URL = re.compile(r"^https?://[^/?#\s]+/compute/(?:v1|beta|alpha)/(?P<rest>[^?#\s]+)$")


_REF_PROJECT = re.compile(r"^[a-z](?:[-a-z0-9.:]{0,61}[a-z0-9])?$")


_REF_SEGMENT = re.compile(r"^[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Ref:
    """A parsed resource reference: `scope` is "global", "zones/Z" or "regions/R" (Z may be "-" in an image
    family view); `family` when it names an image family (images/family/F, imageFamilyViews/F)."""

    project: str
    scope: str
    collection: str
    name: str
    family: bool = False

    @property
    def rel(self) -> str:
        """The canonical partial URL, "projects/P/<scope>/<collection>/[family/]NAME"."""
        family = "family/" if self.family and self.collection == "images" else ""
        return f"projects/{self.project}/{self.scope}/{self.collection}/{family}{self.name}"

    @property
    def where(self) -> str:
        """The zone or region of a zonal / regional reference ("" for a global one)."""
        return self.scope.split("/", 1)[1] if "/" in self.scope else ""


def parse_ref(value: Any, field_name: str, collections: tuple[str, ...], project: str, *,
              zone: str | None = None, region: str | None = None, bare: bool = False) -> Ref:
    """Every form Compute Engine accepts for a reference to a resource of one of `collections`: a full URL
    (https://compute.googleapis.com/compute/v1/..., https://www.googleapis.com/compute/v1/..., or this
    endpoint's own selfLinks), a partial URL (projects/P/..., or global/..., zones/Z/..., regions/R/... in the
    request's project), and with `bare` a plain name (in the request's `zone` / `region` / global scope).
    Images: projects/P/global/images/NAME, projects/P/global/images/family/FAMILY and the zonal family view
    projects/P/zones/Z/imageFamilyViews/FAMILY (Z may be "-", as gcloud sends it).

    A malformed reference (or one to another kind of resource) is a 400 `invalid`; whether it names something
    that exists is for the caller to say (404 `notFound`)."""
    def bad(why: str = "The URL is malformed.") -> ApiError:
        return invalid(field_name, value, why)

    if not isinstance(value, str) or not value.strip():
        raise bad()
    text = value.strip()
    if "://" in text:
        m = _REF_URL.match(text)
        if not m:
            raise bad()
        text = m.group("rest")
    parts = text.split("/")
    if parts[0] in ("global", "zones", "regions"):
        parts = ["projects", project, *parts]
    elif parts[0] != "projects":
        if not bare or len(parts) != 1:
            raise bad()
        kind = REF_SCOPES[collections[0]]
        where = {"zones": zone, "regions": region}.get(kind)
        if kind != "global" and where is None:
            raise bad()
        parts = ["projects", project, *([kind, where] if kind != "global" else ["global"]), collections[0],
                 parts[0]]
    if len(parts) < 5 or not _REF_PROJECT.match(parts[1]):
        raise bad()
    family = False
    if parts[2] == "global":
        rest = parts[3:]
        scope = "global"
        if len(rest) == 3 and rest[0] == "images" and rest[1] == "family":
            rest, family = [rest[0], rest[2]], True
    elif parts[2] in ("zones", "regions") and len(parts) >= 6:
        if not (_REF_SEGMENT.match(parts[3]) or (parts[3] == "-" and parts[4] == "imageFamilyViews")):
            raise bad()
        scope = f"{parts[2]}/{parts[3]}"
        rest = parts[4:]
    else:
        raise bad()
    if len(rest) != 2 or not _REF_SEGMENT.match(rest[1]):
        raise bad()
    collection, name = rest
    if collection not in collections or REF_SCOPES.get(collection) != scope.split("/", 1)[0]:
        wanted = " or ".join(collections)
        raise bad(f"The URL does not refer to a resource of type {wanted}.")
    if collection == "imageFamilyViews":
        family = True
    return Ref(parts[1], scope, collection, name, family)


def check_project(call: Call, read_only_image: bool = False) -> None:
    if call.project == call.world.project:
        return
    if read_only_image and call.project in catalog.IMAGE_PROJECTS:
        return
    raise not_found(f"projects/{call.project}")


def zone_param(call: Call) -> str:
    zone = call.params["zone"]
    if zone not in catalog.ZONES:
        raise invalid("zone", zone, "Unknown zone.")
    return zone


def region_param(call: Call) -> str:
    region = call.params["region"]
    if region not in catalog.REGIONS:
        raise invalid("region", region, "Unknown region.")
    return region


def get_stored(db: Db, call: Call, kind: str, scope: str, collection: str) -> dict:
    """A stored resource named by the call (`{name}`) in `scope` ("global", "regions/r", "zones/z"), or 404."""
    obj = db.get(kind, call.project, scope, call.params["name"])
    if obj is None:
        raise not_found(f"projects/{call.project}/{scope}/{collection}/{call.params['name']}")
    return obj


def stored_handlers(kind: str, collection: str, scope_of: Callable[[Call], str],
                     render: Callable[[dict, float], dict]) -> tuple[Callable[[Call], dict], Callable[[Call], dict]]:
    """The `get` and `list` handlers of a collection kept in the world (firewalls, addresses, subnetworks, disks)."""
    def get(call: Call) -> dict:
        check_project(call)
        scope = scope_of(call)
        with call.world.read() as db:
            return links(render(get_stored(db, call, kind, scope, collection), db.now), call.base)

    def list_(call: Call) -> dict:
        check_project(call)
        scope = scope_of(call)
        with call.world.read() as db:
            items = [render(obj, db.now) for obj in db.find(kind, call.project, scope)]
        return list_page(call, f"compute#{kind}List", items, f"projects/{call.project}/{scope}/{collection}")

    return get, list_


def global_scope(call: Call) -> str:
    return "global"


def region_scope(call: Call) -> str:
    return f"regions/{region_param(call)}"


def zone_scope(call: Call) -> str:
    return f"zones/{zone_param(call)}"


def check_name(name: Any, field_name: str = "resource.name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid(field_name, name, "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'")
    return name


def check_labels(labels: Any) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict) or len(labels) > 64:
        raise invalid("resource.labels", labels, "Labels must be a map of at most 64 entries.")
    for k, v in labels.items():
        if not _LABEL_KEY.match(str(k)):
            raise invalid(f"resource.labels.{k}", k, "Label keys must start with a lowercase letter and "
                          "contain only lowercase letters, digits, underscores and dashes (1-63 characters).")
        if not isinstance(v, str) or not _LABEL_VALUE.match(v):
            raise invalid(f"resource.labels.{k}", v, "Label values may contain only lowercase letters, "
                          "digits, underscores and dashes (0-63 characters).")
    return {str(k): str(v) for k, v in labels.items()}


def _request_id(call: Call) -> str | None:
    rid = call.q("requestId")
    if rid is None or rid == "":
        return None
    try:
        parsed = uuid.UUID(rid)
    except ValueError:
        raise invalid("requestId", rid, "The requestId must be a valid UUID.") from None
    if parsed.int == 0:
        raise invalid("requestId", rid, "The zero UUID is not supported.")
    return rid


def idempotent(call: Call, fn: Callable[[Db], dict]) -> dict:
    """Run a mutating call once per requestId: a repeated requestId answers with the same operation."""
    rid = _request_id(call)
    with call.world.tx() as db:
        if rid is not None:
            row = db.conn.execute("SELECT scope, operation FROM request_ids WHERE project=? AND request_id=?",
                                  (call.project, rid)).fetchone()
            if row:
                op = db.get("operation", call.project, row[0], row[1], include_gone=True)
                if op is not None:
                    return links(w.render_operation(op, db.now), call.base)
        w.purge(db)
        op = fn(db)
        if rid is not None:
            db.conn.execute("INSERT INTO request_ids (project, request_id, scope, operation, created) "
                            "VALUES (?,?,?,?,?)", (call.project, rid, op["_scope"], op["name"], db.now))
        return links(w.render_operation(op, db.now), call.base)


def scaled(call: Call, seconds: float) -> float:
    return seconds * call.world.time_scale


def in_use_message(what: str, link: str, user: str) -> str:
    return f"The {what} resource '{link}' is already being used by '{user}'"


def in_use(what: str, link: str, user: str) -> ApiError:
    """Compute Engine's refusal to delete or attach what another resource still uses."""
    return ApiError(400, in_use_message(what, link, user), "resourceInUseByAnotherResource")


def scheduled_delete(db: Db, call: Call, kind: str, obj: dict, op_key: str, scope: str | None = None,
                     **first_time: Any) -> dict:
    """Mark `obj` gone after Compute Engine's (scaled) delete time, once: a retried delete keeps the first
    deadline (and `first_time`'s fields); answer the delete's operation."""
    if obj.get("_gone_at") is None:
        obj.update(first_time)
        obj["_gone_at"] = db.now + scaled(call, w.DELETE_OP[op_key])
        db.put(kind, obj)
    return w.new_operation(db, call.project, scope or obj["_scope"], "delete", obj["selfLink"], obj["id"],
                           max(obj["_gone_at"] - db.now, 0.0), user=USER)


def list_page(call: Call, kind: str, items: list[dict], self_rel: str) -> dict:
    try:
        terms = w.parse_filter(call.q("filter"))
    except w.FilterError as e:
        raise ApiError(400, str(e), "invalid") from None
    items = [i for i in items if w.matches(i, terms)]
    if call.q("orderBy"):
        key = call.q("orderBy", "").split()[0]
        items.sort(key=lambda i: str(i.get(key, "")), reverse="desc" in call.q("orderBy", ""))
    try:
        size = max(1, min(500, int(call.q("maxResults") or 500)))
        start = int(call.q("pageToken") or 0)
    except ValueError:
        raise ApiError(400, "Invalid value for pageToken or maxResults.", "invalid") from None
    page = items[start:start + size]
    out: dict[str, Any] = {"kind": kind, "id": self_rel, "items": page, "selfLink": self_rel}
    if start + size < len(items):
        out["nextPageToken"] = str(start + size)
    return links(out, call.base)


def aggregated_page(call: Call, kind: str, key: str, per_scope: dict[str, list[dict]], self_rel: str) -> dict:
    try:
        terms = w.parse_filter(call.q("filter"))
    except w.FilterError as e:
        raise ApiError(400, str(e), "invalid") from None
    items: dict[str, Any] = {}
    for scope, objs in per_scope.items():
        kept = [o for o in objs if w.matches(o, terms)]
        if kept:
            items[scope] = {key: kept}
        else:
            items[scope] = {"warning": {"code": "NO_RESULTS_ON_PAGE",
                                        "message": f"There are no results for scope '{scope}' on this page.",
                                        "data": [{"key": "scope", "value": scope}]}}
    return links({"kind": kind, "id": self_rel, "items": items, "selfLink": self_rel}, call.base)
