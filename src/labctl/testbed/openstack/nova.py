"""Nova v2.1 (microversions 2.1-2.96): servers, actions, metadata, tags, flavors, keypairs, limits."""

from __future__ import annotations

import re
import secrets
import time
from functools import wraps
from urllib.parse import urlencode

from labctl.testbed.http import HTTPError, Request, Response, Router
from labctl.testbed.openstack import catalog as cat
from labctl.testbed.openstack import model
from labctl.testbed.openstack.catalog import PROJECT_ID, USER_ID

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


def _link(req: Request, kind: str, id: str) -> list[dict]:
    return [
        {"rel": "self", "href": f"{req.site_url}/compute/v2.1/{kind}/{id}"},
        {"rel": "bookmark", "href": f"{req.site_url}/compute/{kind}/{id}"},
    ]


def _not_found_server(sid: str) -> HTTPError:
    return HTTPError(404, f"Instance {sid} could not be found.", "InstanceNotFound")


# ============================================================================ servers


def server_view(db, req: Request, s: dict, mv, flavors: dict, addresses: dict | None = None) -> dict:
    site, now = req.site, req.now
    status = model.server_status(s, now)
    flavor = flavors.get(s["flavor_id"]) or {
        "id": s["flavor_id"],
        "name": s.get("flavor_name", ""),
        "vcpus": 0,
        "ram": 0,
        "disk": 0,
        "extra_specs": {},
    }
    if mv >= (2, 47):
        flavor_view = {
            "vcpus": flavor["vcpus"],
            "ram": flavor["ram"],
            "disk": flavor["disk"],
            "ephemeral": 0,
            "swap": 0,
            "original_name": flavor["name"],
            "extra_specs": dict(flavor["extra_specs"]),
        }
    else:
        flavor_view = {
            "id": flavor["id"],
            "links": [{"rel": "bookmark", "href": f"{req.site_url}/compute/flavors/{flavor['id']}"}],
        }
    task, vm, power = {
        "BUILD": ("spawning", "building", 0),
        "ACTIVE": (None, "active", 1),
        "ERROR": (None, "error", 0),
    }[status]
    if status == "BUILD" and s.get("fault"):
        task = "scheduling"
    view = {
        "id": s["id"],
        "name": s["name"],
        "status": status,
        "tenant_id": PROJECT_ID,
        "user_id": USER_ID,
        "metadata": dict(s.get("metadata", {})),
        "hostId": model.host_id_for(s) if status != "ERROR" else "",
        "image": {
            "id": s["image_id"],
            "links": [{"rel": "bookmark", "href": f"{req.site_url}/compute/images/{s['image_id']}"}],
        }
        if s.get("image_id")
        else "",
        "flavor": flavor_view,
        "created": model.iso_z(s["created"]),
        "updated": model.iso_z(
            max(s["updated"], min(now, s["error_at"] if s.get("fault") else s["ready_at"]))
        ),
        "addresses": addresses if addresses is not None else model.server_addresses(db, site, s),
        "accessIPv4": "",
        "accessIPv6": "",
        "links": _link(req, "servers", s["id"]),
        "OS-DCF:diskConfig": "MANUAL",
        "progress": 0 if status != "ACTIVE" else 100,
        "OS-EXT-AZ:availability_zone": "nova",
        "config_drive": "True" if s.get("config_drive") else "",
        "key_name": s.get("key_name"),
        "OS-SRV-USG:launched_at": model.iso_us(s["ready_at"]) if status == "ACTIVE" else None,
        "OS-SRV-USG:terminated_at": None,
        "OS-EXT-STS:task_state": task,
        "OS-EXT-STS:vm_state": vm,
        "OS-EXT-STS:power_state": power,
        "os-extended-volumes:volumes_attached": [],
    }
    if status != "ERROR" or not s.get("fault"):
        view["security_groups"] = [{"name": n} for n in s.get("security_groups", [])]
    if status == "ERROR":
        view["fault"] = {"code": 500, "created": model.iso_z(s["error_at"]), "message": s["fault"]}
    if mv >= (2, 9):
        view["locked"] = False
    if mv >= (2, 16):
        view["host_status"] = "UP" if status == "ACTIVE" else ""
    if mv >= (2, 19):
        view["description"] = s.get("description")
    if mv >= (2, 26):
        view["tags"] = list(s.get("tags", []))
    if mv >= (2, 63):
        view["trusted_image_certificates"] = None
    if mv >= (2, 71):
        view["server_groups"] = []
    if mv >= (2, 73):
        view["locked_reason"] = None
    if mv >= (2, 90):
        view["OS-EXT-SRV-ATTR:hostname"] = re.sub(r"[^a-z0-9-]", "-", s["name"].lower())[:63]
    if mv >= (2, 96):
        view["pinned_availability_zone"] = None
    return view


def _get_server(db, req: Request) -> dict:
    s = db.get("server", req.site.name, req.params["id"])
    if not s:
        raise _not_found_server(req.params["id"])
    return s


def _filter_servers(db, req: Request, servers: list[dict]) -> list[dict]:
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


def _paginate(req: Request, items: list[dict], key: str, path: str) -> tuple[list[dict], list[dict] | None]:
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


@api("GET", "/servers")
def list_servers(req: Request, mv) -> Response:
    with req.world.read() as db:
        servers = _filter_servers(db, req, db.find("server", req.site.name))
    servers, links = _paginate(req, servers, "servers", "/servers")
    body = {
        "servers": [
            {"id": s["id"], "name": s["name"], "links": _link(req, "servers", s["id"])} for s in servers
        ]
    }
    if links:
        body["servers_links"] = links
    return Response(200, body)


@api("GET", "/servers/detail")
def list_servers_detail(req: Request, mv) -> Response:
    with req.world.read() as db:
        servers = _filter_servers(db, req, db.find("server", req.site.name))
        servers, links = _paginate(req, servers, "servers", "/servers/detail")
        flavors = {f["id"]: f for f in model.all_flavors(db, req.site)}
        views = [server_view(db, req, s, mv, flavors) for s in servers]
    body = {"servers": views}
    if links:
        body["servers_links"] = links
    return Response(200, body)


def _ref_id(ref) -> str:
    return str(ref).rstrip("/").rsplit("/", 1)[-1] if ref else ""


@api("POST", "/servers")
def create_server(req: Request, mv) -> Response:
    body = req.json()
    spec = body.get("server") if isinstance(body, dict) else None
    if not isinstance(spec, dict):
        raise HTTPError(
            400,
            "Invalid input for field/attribute server. Value: None. None is not of type 'object'",
            "ValidationError",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 255:
        raise HTTPError(
            400,
            f"Invalid input for field/attribute name. Value: {name}. 'name' is a required property"
            if name is None
            else f"Invalid input for field/attribute name. Value: {name}.",
            "ValidationError",
        )
    hints = body.get("OS-SCH-HNT:scheduler_hints") or body.get("os:scheduler_hints") or {}
    metadata = spec.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) <= 255 for k, v in metadata.items()
    ):
        raise HTTPError(
            400,
            "Invalid input for field/attribute metadata. Value: "
            f"{metadata}. Metadata values must be strings of at most 255 characters",
            "ValidationError",
        )
    site, now = req.site, time.time()
    scale = req.world.time_scale
    with req.world.tx() as db:
        flavor = model.get_flavor(db, site, _ref_id(spec.get("flavorRef")))
        if not flavor:
            raise HTTPError(
                400, f"Flavor {_ref_id(spec.get('flavorRef'))} could not be found.", "FlavorNotFound"
            )
        image_id = _ref_id(spec.get("imageRef"))
        if image_id and image_id not in {i.id for i in cat.images(site)}:
            raise HTTPError(400, f"Image {image_id} could not be found.", "ImageNotFound")
        if not image_id and not spec.get("block_device_mapping_v2"):
            raise HTTPError(400, "Missing imageRef attribute", "ImageNotFound")
        key_data = None
        if spec.get("key_name"):
            kp = db.get("keypair", site.name, spec["key_name"])
            if not kp:
                raise HTTPError(400, "Invalid key_name provided.", "KeypairNotFound")
            key_data = kp["public_key"]
        networks = spec.get("networks")
        if networks is None and mv >= (2, 37):
            raise HTTPError(
                400,
                "Invalid input for field/attribute server. Value: ... 'networks' is a required property",
                "ValidationError",
            )
        # Each requested NIC in order: ("net", network id) for a port Nova makes, ("port", port) for a port
        # made beforehand through Neutron (bound to the server, and left behind unbound when it is deleted).
        nics: list[tuple[str, object]] = []
        if networks in (None, "auto"):
            nics = [("net", cat.shared_net_id(site))]
        elif networks == "none":
            nics = []
        elif isinstance(networks, list):
            for n in networks:
                n = n if isinstance(n, dict) else {}
                if n.get("port"):
                    port = db.get("port", site.name, str(n["port"]))
                    if not port:
                        raise HTTPError(400, f"Port {n['port']} could not be found.", "PortNotFound")
                    if port["device_id"]:
                        raise HTTPError(
                            409, f"Port {port['id']} is still in use.", "PortInUse")
                    if any(kind == "port" and other["id"] == port["id"] for kind, other in nics):
                        raise HTTPError(400, f"Port {port['id']} is requested twice.", "BadRequest")
                    nics.append(("port", port))
                    continue
                nid = n.get("uuid")
                if nid == cat.public_net_id(site):
                    raise HTTPError(
                        400,
                        "Creating an instance on the external network 'public' is not allowed.",
                        "ExternalNetworkAttachForbidden",
                    )
                if nid != cat.shared_net_id(site) and not db.get("network", site.name, str(nid)):
                    raise HTTPError(400, f"Network {nid} could not be found.", "NetworkNotFound")
                nics.append(("net", nid))
        else:
            raise HTTPError(
                400, f"Invalid input for field/attribute networks. Value: {networks}.", "ValidationError"
            )
        net_ids = [nic["network_id"] if kind == "port" else nic for kind, nic in nics]
        sg_names, sg_ids = [], []
        for ref in spec.get("security_groups") or [{"name": "default"}]:
            sg = model.find_security_group(db, site, str((ref or {}).get("name")))
            if not sg:
                raise HTTPError(
                    400, f"Security group {(ref or {}).get('name')} not found.", "SecurityGroupNotFound"
                )
            if sg["name"] not in sg_names:
                sg_names.append(sg["name"])
                sg_ids.append(sg["id"])
        boot = model.BOOT_SECONDS["baremetal" if site.kind == "baremetal" else "kvm"] * scale
        server = {
            "id": model.new_id(),
            "name": name,
            "image_id": image_id or None,
            "flavor_id": flavor["id"],
            "flavor_name": flavor["name"],
            "key_name": spec.get("key_name"),
            "key_data": key_data,
            "metadata": metadata,
            "tags": list(spec.get("tags") or []) if mv >= (2, 52) else [],
            "description": spec.get("description"),
            "security_groups": sg_names,
            "reservation_id": hints.get("reservation"),
            "created": now,
            "updated": now,
            "ready_at": now + boot,
            "error_at": now + model.SCHEDULE_SECONDS * scale,
            "fault": None,
            "user_data": spec.get("user_data"),
            "config_drive": bool(spec.get("config_drive")),
            "network_ids": net_ids,
        }
        if req.fault:
            server["fault"] = req.fault[1] or model.NO_VALID_HOST
        else:
            server["fault"] = model.schedule(db, site, server, now)
        db.put("server", site.name, server)
        if not server["fault"]:
            for i, (kind, nic) in enumerate(nics):
                bound_at = now + i * 1e-6
                if kind == "port":
                    nic.update(device_id=server["id"], device_owner="compute:nova", bound_at=bound_at)
                    db.put("port", site.name, nic)
                elif nic == cat.shared_net_id(site):
                    port = model.create_port(db, site, nic, server["id"], sg_ids)
                    port["bound_at"] = bound_at
                    db.put("port", site.name, port)
                else:
                    subnets = model.network_subnets(db, site, nic)
                    if not subnets:
                        raise HTTPError(
                            400, f"Network {nic} requires a subnet in order to boot instances on.",
                            "NetworkRequiresSubnet")
                    net = db.get("network", site.name, nic)
                    security = net.get("port_security_enabled", True)
                    port = model.new_port(
                        db, site, network_id=nic, subnet_id=subnets[0]["id"],
                        fixed_ip=model.allocate_ip(db, site, subnets[0]), device_id=server["id"],
                        device_owner="compute:nova", sg_ids=sg_ids if security else [], port_security=security,
                        preserve=False)
                    port["bound_at"] = bound_at
                    db.put("port", site.name, port)
    resp = {
        "id": server["id"],
        "links": _link(req, "servers", server["id"]),
        "OS-DCF:diskConfig": "MANUAL",
        "security_groups": [{"name": n} for n in sg_names],
        "adminPass": secrets.token_urlsafe(9),
    }
    return Response(202, {"server": resp})


@api("GET", "/servers/{id}")
def get_server(req: Request, mv) -> Response:
    with req.world.read() as db:
        s = _get_server(db, req)
        flavors = {f["id"]: f for f in model.all_flavors(db, req.site)}
        return Response(200, {"server": server_view(db, req, s, mv, flavors)})


@api("PUT", "/servers/{id}")
def update_server(req: Request, mv) -> Response:
    spec = (req.json() or {}).get("server") or {}
    with req.world.tx() as db:
        s = _get_server(db, req)
        if "name" in spec:
            s["name"] = spec["name"]
        if "description" in spec and mv >= (2, 19):
            s["description"] = spec["description"]
        s["updated"] = time.time()
        db.put("server", req.site.name, s)
        flavors = {f["id"]: f for f in model.all_flavors(db, req.site)}
        return Response(200, {"server": server_view(db, req, s, mv, flavors)})


@api("DELETE", "/servers/{id}")
def delete_server(req: Request, mv) -> Response:
    with req.world.tx() as db:
        if not model.delete_server(db, req.site, req.params["id"]):
            raise _not_found_server(req.params["id"])
    return Response(204)


@api("POST", "/servers/{id}/action")
def server_action(req: Request, mv) -> Response:
    body = req.json()
    if not isinstance(body, dict) or len(body) != 1:
        raise HTTPError(400, "Malformed request body", "BadRequest")
    action, arg = next(iter(body.items()))
    with req.world.tx() as db:
        s = _get_server(db, req)
        if action in ("addSecurityGroup", "removeSecurityGroup"):
            ref = str((arg or {}).get("name"))
            sg = model.find_security_group(db, req.site, ref)
            if not sg:
                raise HTTPError(404, f"Security group {ref} not found.", "SecurityGroupNotFound")
            names = s.setdefault("security_groups", [])
            ports = model.server_ports(db, req.site, s["id"])
            if action == "addSecurityGroup":
                if sg["name"] in names:
                    raise HTTPError(
                        400,
                        f"Security group {sg['name']} is already associated with the instance {s['id']}",
                        "SecurityGroupExistsForInstance",
                    )
                names.append(sg["name"])
                for p in ports:
                    p["security_groups"] = [*p["security_groups"], sg["id"]]
                    db.put("port", req.site.name, p)
            else:
                if sg["name"] not in names:
                    raise HTTPError(
                        400,
                        f"Security group {sg['name']} is not associated with the instance {s['id']}",
                        "SecurityGroupNotExistsForInstance",
                    )
                names.remove(sg["name"])
                for p in ports:
                    p["security_groups"] = [g for g in p["security_groups"] if g != sg["id"]]
                    db.put("port", req.site.name, p)
        elif action in ("reboot", "os-start", "os-stop"):
            if model.server_status(s, req.now) != "ACTIVE":
                raise HTTPError(
                    409,
                    f"Cannot '{action}' instance {s['id']} while it is in vm_state building",
                    "InstanceInvalidState",
                )
        else:
            raise HTTPError(400, f"There is no such action: {action}", "BadRequest")
        s["updated"] = time.time()
        db.put("server", req.site.name, s)
    return Response(202)


@api("GET", "/servers/{id}/os-security-groups")
def server_security_groups(req: Request, mv) -> Response:
    with req.world.read() as db:
        s = _get_server(db, req)
        groups = [model.find_security_group(db, req.site, n) for n in s.get("security_groups", [])]
        out = [
            {
                "id": g["id"],
                "name": g["name"],
                "description": g["description"],
                "tenant_id": PROJECT_ID,
                "rules": [],
            }
            for g in groups
            if g
        ]
    return Response(200, {"security_groups": out})


@api("GET", "/servers/{id}/os-interface")
def server_interfaces(req: Request, mv) -> Response:
    with req.world.read() as db:
        s = _get_server(db, req)
        ports = model.server_ports(db, req.site, s["id"])
    return Response(
        200,
        {
            "interfaceAttachments": [
                {
                    "port_id": p["id"],
                    "net_id": p["network_id"],
                    "mac_addr": p["mac"],
                    "port_state": "ACTIVE",
                    "fixed_ips": [{"subnet_id": p["subnet_id"], "ip_address": p["fixed_ip"]}],
                }
                for p in ports
            ]
        },
    )


@api("GET", "/servers/{id}/metadata")
def get_metadata(req: Request, mv) -> Response:
    with req.world.read() as db:
        return Response(200, {"metadata": _get_server(db, req).get("metadata", {})})


def _set_metadata(req: Request, replace: bool) -> Response:
    meta = (req.json() or {}).get("metadata")
    if not isinstance(meta, dict):
        raise HTTPError(400, "Malformed request body. metadata must be object", "BadRequest")
    with req.world.tx() as db:
        s = _get_server(db, req)
        s["metadata"] = dict(meta) if replace else {**s.get("metadata", {}), **meta}
        s["updated"] = time.time()
        db.put("server", req.site.name, s)
    return Response(200, {"metadata": s["metadata"]})


@api("POST", "/servers/{id}/metadata")
def update_metadata(req: Request, mv) -> Response:
    return _set_metadata(req, replace=False)


@api("PUT", "/servers/{id}/metadata")
def replace_metadata(req: Request, mv) -> Response:
    return _set_metadata(req, replace=True)


@api("GET", "/servers/{id}/metadata/{key}")
def get_meta_item(req: Request, mv) -> Response:
    with req.world.read() as db:
        meta = _get_server(db, req).get("metadata", {})
    if req.params["key"] not in meta:
        raise HTTPError(404, "Metadata item was not found", "MetadataNotFound")
    return Response(200, {"meta": {req.params["key"]: meta[req.params["key"]]}})


@api("PUT", "/servers/{id}/metadata/{key}")
def set_meta_item(req: Request, mv) -> Response:
    meta = (req.json() or {}).get("meta")
    if not isinstance(meta, dict) or list(meta) != [req.params["key"]]:
        raise HTTPError(400, "Request body and URI mismatch", "BadRequest")
    with req.world.tx() as db:
        s = _get_server(db, req)
        s.setdefault("metadata", {}).update(meta)
        db.put("server", req.site.name, s)
    return Response(200, {"meta": meta})


@api("DELETE", "/servers/{id}/metadata/{key}")
def delete_meta_item(req: Request, mv) -> Response:
    with req.world.tx() as db:
        s = _get_server(db, req)
        if req.params["key"] not in s.get("metadata", {}):
            raise HTTPError(404, "Metadata item was not found", "MetadataNotFound")
        del s["metadata"][req.params["key"]]
        db.put("server", req.site.name, s)
    return Response(204)


@api("GET", "/servers/{id}/tags")
def get_tags(req: Request, mv) -> Response:
    with req.world.read() as db:
        return Response(200, {"tags": _get_server(db, req).get("tags", [])})


@api("PUT", "/servers/{id}/tags")
def replace_tags(req: Request, mv) -> Response:
    tags = (req.json() or {}).get("tags")
    if not isinstance(tags, list):
        raise HTTPError(400, "Invalid input for field/attribute tags.", "ValidationError")
    with req.world.tx() as db:
        s = _get_server(db, req)
        s["tags"] = list(dict.fromkeys(tags))
        db.put("server", req.site.name, s)
    return Response(200, {"tags": s["tags"]})


@api("DELETE", "/servers/{id}/tags")
def delete_tags(req: Request, mv) -> Response:
    with req.world.tx() as db:
        s = _get_server(db, req)
        s["tags"] = []
        db.put("server", req.site.name, s)
    return Response(204)


@api("PUT", "/servers/{id}/tags/{tag}")
def add_tag(req: Request, mv) -> Response:
    with req.world.tx() as db:
        s = _get_server(db, req)
        existed = req.params["tag"] in s.get("tags", [])
        if not existed:
            s.setdefault("tags", []).append(req.params["tag"])
            db.put("server", req.site.name, s)
    return Response(
        204 if existed else 201,
        headers={"Location": f"{req.site_url}/compute/v2.1/servers/{s['id']}/tags/{req.params['tag']}"},
    )


@api("GET", "/servers/{id}/tags/{tag}")
def check_tag(req: Request, mv) -> Response:
    with req.world.read() as db:
        if req.params["tag"] not in _get_server(db, req).get("tags", []):
            raise HTTPError(404, f"Tag {req.params['tag']} could not be found.", "TagNotFound")
    return Response(204)


@api("DELETE", "/servers/{id}/tags/{tag}")
def delete_tag(req: Request, mv) -> Response:
    with req.world.tx() as db:
        s = _get_server(db, req)
        if req.params["tag"] not in s.get("tags", []):
            raise HTTPError(404, f"Tag {req.params['tag']} could not be found.", "TagNotFound")
        s["tags"].remove(req.params["tag"])
        db.put("server", req.site.name, s)
    return Response(204)


# ============================================================================ flavors


def flavor_view(req: Request, f: dict, mv, detail: bool = True) -> dict:
    view = {"id": f["id"], "name": f["name"], "links": _link(req, "flavors", f["id"])}
    if mv >= (2, 55):
        view["description"] = None
    if not detail:
        return view
    view.update(
        {
            "ram": f["ram"],
            "disk": f["disk"],
            "vcpus": f["vcpus"],
            "OS-FLV-EXT-DATA:ephemeral": 0,
            "OS-FLV-DISABLED:disabled": False,
            "swap": 0 if mv >= (2, 75) else "",
            "rxtx_factor": 1.0,
            "os-flavor-access:is_public": f.get("is_public", True),
        }
    )
    if mv >= (2, 61):
        view["extra_specs"] = dict(f["extra_specs"])
    return view


def _flavors(req: Request) -> list[dict]:
    with req.world.read() as db:
        flavors = model.all_flavors(db, req.site)
    public = (req.q("is_public") or "true").lower()
    if public in ("false", "0", "no"):
        flavors = [f for f in flavors if not f.get("is_public", True)]
    if req.q("minRam"):
        flavors = [f for f in flavors if f["ram"] >= int(req.q("minRam"))]
    if req.q("minDisk"):
        flavors = [f for f in flavors if f["disk"] >= int(req.q("minDisk"))]
    return sorted(flavors, key=lambda f: f["id"])


@api("GET", "/flavors")
def list_flavors(req: Request, mv) -> Response:
    flavors, links = _paginate(req, _flavors(req), "flavors", "/flavors")
    body = {"flavors": [flavor_view(req, f, mv, detail=False) for f in flavors]}
    if links:
        body["flavors_links"] = links
    return Response(200, body)


@api("GET", "/flavors/detail")
def list_flavors_detail(req: Request, mv) -> Response:
    flavors, links = _paginate(req, _flavors(req), "flavors", "/flavors/detail")
    body = {"flavors": [flavor_view(req, f, mv) for f in flavors]}
    if links:
        body["flavors_links"] = links
    return Response(200, body)


def _get_flavor(req: Request) -> dict:
    with req.world.read() as db:
        f = model.get_flavor(db, req.site, req.params["id"])
    if not f:
        raise HTTPError(404, f"Flavor {req.params['id']} could not be found.", "FlavorNotFound")
    return f


@api("GET", "/flavors/{id}")
def get_flavor(req: Request, mv) -> Response:
    return Response(200, {"flavor": flavor_view(req, _get_flavor(req), mv)})


@api("GET", "/flavors/{id}/os-extra_specs")
def get_extra_specs(req: Request, mv) -> Response:
    return Response(200, {"extra_specs": dict(_get_flavor(req)["extra_specs"])})


@api("GET", "/flavors/{id}/os-extra_specs/{key}")
def get_extra_spec(req: Request, mv) -> Response:
    specs = _get_flavor(req)["extra_specs"]
    if req.params["key"] not in specs:
        raise HTTPError(
            404,
            f"Flavor {req.params['id']} has no extra specs with key {req.params['key']}.",
            "FlavorExtraSpecsNotFound",
        )
    return Response(200, {req.params["key"]: specs[req.params["key"]]})


# ============================================================================ keypairs

_KEYPAIR_NAME = re.compile(r"^[A-Za-z0-9 _.@-]{1,255}$")


def keypair_view(kp: dict, mv, full: bool = False) -> dict:
    view = {"name": kp["name"], "public_key": kp["public_key"], "fingerprint": kp["fingerprint"]}
    if mv >= (2, 2):
        view["type"] = kp.get("type", "ssh")
    if full:
        view.update(
            {
                "user_id": USER_ID,
                "created_at": model.iso_us(kp["created"]),
                "updated_at": None,
                "deleted_at": None,
                "deleted": False,
                "id": kp["seq"],
            }
        )
    return view


def _keypair_not_found(name: str) -> HTTPError:
    return HTTPError(404, f"Keypair {name} not found for user {USER_ID}", "KeypairNotFound")


@api("GET", "/os-keypairs")
def list_keypairs(req: Request, mv) -> Response:
    with req.world.read() as db:
        kps = db.find("keypair", req.site.name)
    kps = sorted(({**k, "id": k["name"]} for k in kps), key=lambda k: k["name"])
    links = None
    if mv >= (2, 35):
        kps, links = _paginate(req, kps, "keypairs", "/os-keypairs")
    body = {"keypairs": [{"keypair": keypair_view(k, mv)} for k in kps]}
    if links:
        body["keypairs_links"] = links
    return Response(200, body)


@api("POST", "/os-keypairs")
def create_keypair(req: Request, mv) -> Response:
    body = req.json()
    spec = body.get("keypair") if isinstance(body, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise HTTPError(
            400, "Invalid input for field/attribute keypair. 'name' is a required property", "ValidationError"
        )
    name = spec["name"]
    if not _KEYPAIR_NAME.match(name) or name.strip() != name:
        raise HTTPError(
            400, "Keypair data is invalid: Keypair name contains unsafe characters", "InvalidKeypair"
        )
    private_key = None
    public_key = spec.get("public_key")
    if not public_key:
        if mv >= (2, 92):
            raise HTTPError(
                400,
                "Invalid input for field/attribute keypair. 'public_key' is a required property",
                "ValidationError",
            )
        public_key, private_key = _generate_keypair(name)
    public_key = public_key.strip()
    try:
        fp = model.fingerprint(public_key)
    except ValueError:
        raise HTTPError(
            400, "Keypair data is invalid: failed to generate fingerprint", "InvalidKeypair"
        ) from None
    ktype = spec.get("type", "ssh") if mv >= (2, 2) else "ssh"
    with req.world.tx() as db:
        if db.get("keypair", req.site.name, name):
            raise HTTPError(409, f"Key pair '{name}' already exists.", "KeyPairExists")
        kp = {
            "id": name,
            "name": name,
            "public_key": public_key,
            "fingerprint": fp,
            "type": ktype,
            "created": time.time(),
            "seq": db.counter(f"keypair:{req.site.name}", 1),
        }
        db.put("keypair", req.site.name, kp)
    view = keypair_view(kp, mv)
    view["user_id"] = USER_ID
    if private_key:
        view["private_key"] = private_key
    return Response(201 if mv >= (2, 2) else 200, {"keypair": view})


def _generate_keypair(name: str) -> tuple[str, str]:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - cryptography comes with openstacksdk/paramiko
        raise HTTPError(400, "Key generation is not available; send a public_key", "BadRequest") from None
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return f"{public} Generated-by-Nova", private


@api("GET", "/os-keypairs/{name}")
def get_keypair(req: Request, mv) -> Response:
    with req.world.read() as db:
        kp = db.get("keypair", req.site.name, req.params["name"])
    if not kp:
        raise _keypair_not_found(req.params["name"])
    return Response(200, {"keypair": keypair_view(kp, mv, full=True)})


@api("DELETE", "/os-keypairs/{name}")
def delete_keypair(req: Request, mv) -> Response:
    with req.world.tx() as db:
        if not db.delete("keypair", req.site.name, req.params["name"]):
            raise _keypair_not_found(req.params["name"])
    return Response(204 if mv >= (2, 2) else 202)


# ============================================================================ limits, quotas, misc

_QUOTAS = {
    "instances": 100,
    "cores": 2000,
    "ram": 5_120_000,
    "key_pairs": 100,
    "metadata_items": 128,
    "server_groups": 10,
    "server_group_members": 10,
}


def _usage(req: Request) -> dict:
    with req.world.read() as db:
        servers = db.find("server", req.site.name)
        flavors = {f["id"]: f for f in model.all_flavors(db, req.site)}
        keypairs = len(db.find("keypair", req.site.name))
    cores = sum(flavors.get(s["flavor_id"], {}).get("vcpus", 0) for s in servers)
    ram = sum(flavors.get(s["flavor_id"], {}).get("ram", 0) for s in servers)
    return {"instances": len(servers), "cores": cores, "ram": ram, "key_pairs": keypairs}


@api("GET", "/limits")
def limits(req: Request, mv) -> Response:
    used = _usage(req)
    absolute = {
        "maxTotalInstances": _QUOTAS["instances"],
        "maxTotalCores": _QUOTAS["cores"],
        "maxTotalRAMSize": _QUOTAS["ram"],
        "maxTotalKeypairs": _QUOTAS["key_pairs"],
        "maxServerMeta": _QUOTAS["metadata_items"],
        "maxServerGroups": _QUOTAS["server_groups"],
        "maxServerGroupMembers": _QUOTAS["server_group_members"],
        "maxImageMeta": 128,
        "maxPersonality": 5,
        "maxPersonalitySize": 10240,
        "totalInstancesUsed": used["instances"],
        "totalCoresUsed": used["cores"],
        "totalRAMUsed": used["ram"],
        "totalServerGroupsUsed": 0,
    }
    if mv >= (2, 57):
        absolute.pop("maxPersonality")
        absolute.pop("maxPersonalitySize")
    return Response(200, {"limits": {"absolute": absolute, "rate": []}})


@api("GET", "/os-quota-sets/{project}")
def quota_set(req: Request, mv) -> Response:
    return Response(200, {"quota_set": {"id": req.params["project"], **_QUOTAS}})


@api("GET", "/os-quota-sets/{project}/detail")
def quota_set_detail(req: Request, mv) -> Response:
    used = _usage(req)
    return Response(
        200,
        {
            "quota_set": {
                "id": req.params["project"],
                **{k: {"limit": v, "in_use": used.get(k, 0), "reserved": 0} for k, v in _QUOTAS.items()},
            }
        },
    )


@api("GET", "/os-availability-zone")
def availability_zones(req: Request, mv) -> Response:
    return Response(
        200, {"availabilityZoneInfo": [{"zoneName": "nova", "zoneState": {"available": True}, "hosts": None}]}
    )


@api("GET", "/extensions")
def extensions(req: Request, mv) -> Response:
    return Response(200, {"extensions": []})


# ============================================================================ volume attachments


def _attachment_view(v: dict, a: dict, mv) -> dict:
    """`volumeAttachment` as Nova renders it at microversion `mv` (2.70 adds tag, 2.79 delete_on_termination,
    2.89 attachment_id and bdm_uuid and drops id)."""
    out = {"device": a["device"], "serverId": a["server_id"], "volumeId": v["id"]}
    if mv < (2, 89):
        out["id"] = v["id"]
    if mv >= (2, 70):
        out["tag"] = None
    if mv >= (2, 79):
        out["delete_on_termination"] = False
    if mv >= (2, 89):
        out["attachment_id"] = a["attachment_id"]
        out["bdm_uuid"] = a["bdm_uuid"]
    return out


def _server_attachments(db, req: Request, server_id: str) -> list[tuple[dict, dict]]:
    return [(v, a) for v in db.find("volume", req.site.name) for a in v.get("attachments", [])
            if a["server_id"] == server_id]


@api("POST", "/servers/{id}/os-volume_attachments")
def attach_volume(req: Request, mv) -> Response:
    body = req.json()
    spec = body.get("volumeAttachment") if isinstance(body, dict) else None
    if not isinstance(spec, dict) or not spec.get("volumeId"):
        raise HTTPError(400, "Invalid input for field/attribute volumeAttachment. Value: None. "
                             "'volumeId' is a required property", "ValidationError")
    with req.world.tx() as db:
        s = _get_server(db, req)
        state = model.server_status(s, req.now)
        if state != "ACTIVE":
            raise HTTPError(409, f"Cannot 'attach_volume' instance {s['id']} while it is in vm_state "
                                 f"{'error' if state == 'ERROR' else 'building'}", "InstanceInvalidState")
        v = db.get("volume", req.site.name, str(spec["volumeId"]))
        if v is None:
            raise HTTPError(404, f"Volume {spec['volumeId']} could not be found.", "VolumeNotFound")
        status = model.volume_status(v, req.now)
        if status != "available":
            raise HTTPError(400, f"Invalid input received: Invalid volume: Volume {v['id']} status must be "
                                 f"available or downloading to reserve, but the current status is {status}.",
                            "InvalidVolume")
        a = model.attach_volume(db, req.site, v, s["id"], req.now)
        return Response(200, {"volumeAttachment": _attachment_view(v, a, mv)})


@api("GET", "/servers/{id}/os-volume_attachments")
def list_volume_attachments(req: Request, mv) -> Response:
    with req.world.read() as db:
        s = _get_server(db, req)
        items = [_attachment_view(v, a, mv) for v, a in _server_attachments(db, req, s["id"])]
    return Response(200, {"volumeAttachments": items})


def _one_attachment(db, req: Request) -> tuple[dict, dict, dict]:
    s = _get_server(db, req)
    vid = req.params["volume_id"]
    for v, a in _server_attachments(db, req, s["id"]):
        if v["id"] == vid:
            return s, v, a
    raise HTTPError(404, f"Volume {vid} is not attached to {s['id']}", "VolumeBDMNotFound")


@api("GET", "/servers/{id}/os-volume_attachments/{volume_id}")
def get_volume_attachment(req: Request, mv) -> Response:
    with req.world.read() as db:
        _s, v, a = _one_attachment(db, req)
        return Response(200, {"volumeAttachment": _attachment_view(v, a, mv)})


@api("DELETE", "/servers/{id}/os-volume_attachments/{volume_id}")
def detach_volume(req: Request, mv) -> Response:
    with req.world.tx() as db:
        s, v, _a = _one_attachment(db, req)
        model.detach_volume(db, req.site, v, s["id"])
    return Response(202)
