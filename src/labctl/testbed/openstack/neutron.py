"""Neutron v2.0: networks, subnets, routers, ports, floating IPs, security groups and rules, tags, quotas."""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Collection
from urllib.parse import urlencode

from labctl.testbed.http import HTTPError, Request, Response, Router
from labctl.testbed.openstack import catalog as cat
from labctl.testbed.openstack import model
from labctl.testbed.openstack.catalog import PROJECT_ID, Site

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


# ============================================================================ generic listing

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


def _fields(req: Request, item: dict) -> dict:
    fields = [f for v in req.query.get("fields", []) for f in v.split(",") if f]
    return {k: v for k, v in item.items() if k in fields} if fields else item


def _rows(db, req: Request, kind: str, *fields: str) -> list[dict]:
    """Stored objects of `kind`, narrowed in SQLite by the query's single, non-empty values of `fields` (fields
    stored as the view shows them), so a filtered list does not build a view of every object; `listing` still
    applies every filter to the views."""
    equal = {}
    for field in fields:
        values = req.query.get(field) or []
        if len(values) == 1 and values[0]:
            equal[field] = values[0]
    return db.find(kind, req.site.name, **equal)


def _std(obj: dict, project: str = PROJECT_ID) -> dict:
    return {
        "tenant_id": project,
        "project_id": project,
        "description": obj.get("description", ""),
        "tags": list(obj.get("tags", [])),
        "created_at": model.iso_z(obj.get("created", 0)),
        "updated_at": model.iso_z(obj.get("updated", obj.get("created", 0))),
        "revision_number": obj.get("revision", 0),
    }


# ============================================================================ networks, subnets, routers

_EPOCH = 1_700_000_000.0


def networks(site: Site) -> list[dict]:
    out = []
    for name, net_id, subnet_id, external in (
        ("public", cat.public_net_id(site), cat.public_subnet_id(site), True),
        ("sharednet1", cat.shared_net_id(site), cat.shared_subnet_id(site), False),
    ):
        out.append(
            {
                "id": net_id,
                "name": name,
                "admin_state_up": True,
                "status": "ACTIVE",
                "subnets": [subnet_id],
                "shared": not external,
                "router:external": external,
                "mtu": 1500,
                "availability_zones": ["nova"],
                "availability_zone_hints": [],
                "ipv4_address_scope": None,
                "ipv6_address_scope": None,
                "port_security_enabled": True,
                "is_default": external,
                "l2_adjacency": True,
                "qos_policy_id": None,
                "dns_domain": "",
                **_std({"created": _EPOCH, "revision": 1}, ADMIN_PROJECT),
            }
        )
    return out


def subnets(site: Site) -> list[dict]:
    out = []
    for name, sid, net_id, cidr, dhcp in (
        ("public-subnet", cat.public_subnet_id(site), cat.public_net_id(site), cat.public_cidr(site), False),
        (
            "sharednet1-subnet",
            cat.shared_subnet_id(site),
            cat.shared_net_id(site),
            cat.shared_cidr(site),
            True,
        ),
    ):
        net = ipaddress.ip_network(cidr)
        hosts = list(net.hosts()) if net.prefixlen >= 24 else None
        first = str(net.network_address + 2)
        last = str(hosts[-1]) if hosts else str(net.broadcast_address - 1)
        out.append(
            {
                "id": sid,
                "name": name,
                "network_id": net_id,
                "cidr": cidr,
                "ip_version": 4,
                "gateway_ip": str(net.network_address + 1),
                "enable_dhcp": dhcp,
                "allocation_pools": [{"start": first, "end": last}],
                "dns_nameservers": ["8.8.8.8"] if dhcp else [],
                "host_routes": [],
                "ipv6_ra_mode": None,
                "ipv6_address_mode": None,
                "subnetpool_id": None,
                "service_types": [],
                "segment_id": None,
                **_std({"created": _EPOCH}, ADMIN_PROJECT),
            }
        )
    return out


def routers(site: Site) -> list[dict]:
    return [
        {
            "id": cat.router_id(site),
            "name": "sharednet1-router",
            "admin_state_up": True,
            "status": "ACTIVE",
            "external_gateway_info": {
                "network_id": cat.public_net_id(site),
                "enable_snat": True,
                "external_fixed_ips": [
                    {"subnet_id": cat.public_subnet_id(site), "ip_address": cat.floating_ip(site, 2)}
                ],
            },
            "routes": [],
            "distributed": False,
            "ha": False,
            "availability_zones": ["nova"],
            "availability_zone_hints": [],
            "flavor_id": None,
            **_std({"created": _EPOCH}, ADMIN_PROJECT),
        }
    ]


# ---------------------------------------------------------------------------- the project's own


def _body(req: Request, key: str) -> dict:
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


def _not_found(kind: str, ref: str) -> HTTPError:
    message, error = _NOT_FOUND[kind]
    return HTTPError(404, message.format(ref), error)


def _get(db, req: Request, kind: str, ref: str | None = None, builtin: Collection[str] = ()) -> dict:
    """The project's `kind` object `ref` (default: the id in the path); 403 if it is one of the site's built-in
    objects, which the project sees but may not change, else 404."""
    ref = ref or req.params["id"]
    obj = db.get(kind, req.site.name, ref)
    if obj:
        return obj
    if ref in builtin:
        raise _forbidden(kind, ref)
    raise _not_found(kind, ref)


def network_view(db, site: Site, n: dict) -> dict:
    return {
        "id": n["id"],
        "name": n["name"],
        "admin_state_up": n.get("admin_state_up", True),
        "status": "ACTIVE",
        "subnets": [x["id"] for x in model.network_subnets(db, site, n["id"])],
        "shared": False,
        "router:external": False,
        "mtu": n.get("mtu", 1500),
        "availability_zones": ["nova"],
        "availability_zone_hints": [],
        "ipv4_address_scope": None,
        "ipv6_address_scope": None,
        "port_security_enabled": n.get("port_security_enabled", True),
        "is_default": False,
        "l2_adjacency": True,
        "qos_policy_id": None,
        "dns_domain": "",
        **_std(n),
    }


def subnet_view(x: dict) -> dict:
    return {
        "id": x["id"],
        "name": x["name"],
        "network_id": x["network_id"],
        "cidr": x["cidr"],
        "ip_version": 4,
        "gateway_ip": x.get("gateway_ip"),
        "enable_dhcp": x.get("enable_dhcp", True),
        "allocation_pools": list(x.get("allocation_pools") or []),
        "dns_nameservers": list(x.get("dns_nameservers") or []),
        "host_routes": [],
        "ipv6_ra_mode": None,
        "ipv6_address_mode": None,
        "subnetpool_id": None,
        "service_types": [],
        "segment_id": None,
        **_std(x),
    }


def router_view(db, site: Site, r: dict) -> dict:
    return {
        "id": r["id"],
        "name": r["name"],
        "admin_state_up": r.get("admin_state_up", True),
        "status": "ACTIVE",
        "external_gateway_info": r.get("gateway"),
        "routes": [],
        "distributed": False,
        "ha": False,
        "availability_zones": ["nova"],
        "availability_zone_hints": [],
        "flavor_id": None,
        **_std(r),
    }


def _all_networks(db, site: Site) -> list[dict]:
    return networks(site) + [network_view(db, site, n) for n in db.find("network", site.name)]


def _all_subnets(db, site: Site) -> list[dict]:
    return subnets(site) + [subnet_view(x) for x in db.find("subnet", site.name)]


def _all_routers(db, site: Site) -> list[dict]:
    return routers(site) + [router_view(db, site, r) for r in db.find("router", site.name)]


def _collection(collection: str, all_fn, kind: str):
    singular = collection.rstrip("s")

    @router.route("GET", f"/v2.0/{collection}")
    def _list(req: Request) -> Response:
        with req.world.read() as db:
            items = all_fn(db, req.site)
        return listing(req, items, collection)

    @router.route("GET", f"/v2.0/{collection}/{{id}}")
    def _get(req: Request) -> Response:
        with req.world.read() as db:
            items = all_fn(db, req.site)
        for item in items:
            if item["id"] == req.params["id"]:
                return Response(200, {singular: _fields(req, item)})
        raise _not_found(kind, req.params["id"])


_collection("networks", _all_networks, "network")
_collection("subnets", _all_subnets, "subnet")
_collection("routers", _all_routers, "router")


@router.route("POST", "/v2.0/networks")
def create_network(req: Request) -> Response:
    spec = _body(req, "network")
    with req.world.tx() as db:
        n = model.create_network(db, req.site, spec)
        return Response(201, {"network": network_view(db, req.site, n)})


@router.route("PUT", "/v2.0/networks/{id}")
def update_network(req: Request) -> Response:
    spec = _body(req, "network")
    with req.world.tx() as db:
        n = _get(db, req, "network", builtin={cat.public_net_id(req.site), cat.shared_net_id(req.site)})
        for key in ("name", "description", "port_security_enabled", "admin_state_up"):
            if key in spec:
                n[key] = spec[key]
        db.put("network", req.site.name, model.stamp(n))
        return Response(200, {"network": network_view(db, req.site, n)})


@router.route("DELETE", "/v2.0/networks/{id}")
def delete_network(req: Request) -> Response:
    with req.world.tx() as db:
        n = _get(db, req, "network", builtin={cat.public_net_id(req.site), cat.shared_net_id(req.site)})
        if model.network_ports(db, req.site, n["id"]):
            raise HTTPError(
                409,
                f"Unable to complete operation on network {n['id']}. There are one or more ports still in use "
                "on the network.",
                "NetworkInUse",
            )
        for x in model.network_subnets(db, req.site, n["id"]):  # Neutron deletes a network's subnets with it
            db.delete("subnet", req.site.name, x["id"])
        db.delete("network", req.site.name, n["id"])
    return Response(204)


@router.route("POST", "/v2.0/subnets")
def create_subnet(req: Request) -> Response:
    spec = _body(req, "subnet")
    net_id = spec.get("network_id")
    if not net_id:
        raise HTTPError(
            400, "Failed to parse request. Required attribute 'network_id' not specified", "BadRequest")
    if str(spec.get("ip_version", 4)) != "4":
        raise HTTPError(400, "Invalid input for ip_version. Reason: only 4 is supported here.", "HTTPBadRequest")
    try:
        net = ipaddress.ip_network(str(spec.get("cidr")), strict=True)
        if net.version != 4:
            raise ValueError
    except ValueError:
        raise HTTPError(
            400, f"Invalid input for cidr. Reason: '{spec.get('cidr')}' is not a valid IP subnet.",
            "HTTPBadRequest") from None
    if "gateway_ip" in spec:
        gateway = spec["gateway_ip"]
        if gateway is not None and ipaddress.ip_address(gateway) not in net:
            raise HTTPError(
                400, f"Invalid input for operation: Gateway is not valid on subnet {net}.", "InvalidInput")
    else:
        gateway = str(net.network_address + 1)
    pools = spec.get("allocation_pools") or model.default_pools(net, gateway)
    for pool in pools:
        try:
            start, end = ipaddress.ip_address(pool["start"]), ipaddress.ip_address(pool["end"])
        except (KeyError, TypeError, ValueError):
            raise HTTPError(400, f"Invalid input for allocation_pools: {pool}", "HTTPBadRequest") from None
        if start not in net or end not in net or start > end:
            raise HTTPError(
                400, f"The allocation pool {pool['start']}-{pool['end']} spans beyond the subnet cidr {net}.",
                "OutOfBoundsAllocationPool")
        if gateway and start <= ipaddress.ip_address(gateway) <= end:
            raise HTTPError(
                409, f"Gateway ip {gateway} conflicts with allocation pool {pool['start']}-{pool['end']}.",
                "GatewayConflictWithAllocationPools")
    with req.world.tx() as db:
        n = db.get("network", req.site.name, net_id)
        if not n:
            if net_id in (cat.public_net_id(req.site), cat.shared_net_id(req.site)):
                raise HTTPError(403, "(rule:create_subnet) is disallowed by policy", "PolicyNotAuthorized")
            raise _not_found("network", net_id)
        for other in model.network_subnets(db, req.site, net_id):
            if ipaddress.ip_network(other["cidr"]).overlaps(net):
                raise HTTPError(
                    400,
                    f"Invalid input for operation: Requested subnet with cidr: {net} for network: {net_id} "
                    "overlaps with another subnet.",
                    "InvalidInput",
                )
        x = model.stamp({
            "id": model.new_id(),
            "name": spec.get("name") or "",
            "description": spec.get("description") or "",
            "tags": list(spec.get("tags") or []),
            "network_id": net_id,
            "cidr": str(net),
            "gateway_ip": gateway,
            "enable_dhcp": spec.get("enable_dhcp", True),
            "allocation_pools": [{"start": p["start"], "end": p["end"]} for p in pools],
            "dns_nameservers": list(spec.get("dns_nameservers") or []),
            "revision": 0,
        })
        db.put("subnet", req.site.name, x)
        return Response(201, {"subnet": subnet_view(x)})


@router.route("DELETE", "/v2.0/subnets/{id}")
def delete_subnet(req: Request) -> Response:
    with req.world.tx() as db:
        x = _get(db, req, "subnet", builtin={cat.public_subnet_id(req.site), cat.shared_subnet_id(req.site)})
        if model.subnet_ports(db, req.site, x["id"]):
            raise HTTPError(
                409,
                f"Unable to complete operation on subnet {x['id']}: One or more ports have an IP allocation "
                "from this subnet.",
                "SubnetInUse",
            )
        db.delete("subnet", req.site.name, x["id"])
    return Response(204)


def _gateway_info(req: Request, info) -> dict | None:
    if not info:
        return None
    if not isinstance(info, dict):
        raise HTTPError(400, f"Invalid input for external_gateway_info. Reason: '{info}' is not a dictionary.",
                        "HTTPBadRequest")
    net_id = info.get("network_id")
    if net_id != cat.public_net_id(req.site):
        raise HTTPError(
            400, f"Bad router request: Network {net_id} is not a valid external network.", "BadRequest")
    with req.world.tx() as db:
        k = db.counter(f"router_gw:{req.site.name}")
    # Router gateways take addresses below the floating IP range (127.10.<site>.3 .. .9, then wrap).
    address = cat.floating_ip(req.site, 3 + k % (cat.FIP_FIRST - 3))
    return {
        "network_id": net_id,
        "enable_snat": bool(info.get("enable_snat", True)),
        "external_fixed_ips": [{"subnet_id": cat.public_subnet_id(req.site), "ip_address": address}],
    }


@router.route("POST", "/v2.0/routers")
def create_router(req: Request) -> Response:
    spec = _body(req, "router")
    gateway = _gateway_info(req, spec.get("external_gateway_info"))
    with req.world.tx() as db:
        r = model.stamp({
            "id": model.new_id(),
            "name": spec.get("name") or "",
            "description": spec.get("description") or "",
            "tags": list(spec.get("tags") or []),
            "admin_state_up": spec.get("admin_state_up", True),
            "gateway": gateway,
            "revision": 0,
        })
        db.put("router", req.site.name, r)
        return Response(201, {"router": router_view(db, req.site, r)})


def _get_router(db, req: Request) -> dict:
    return _get(db, req, "router", builtin={cat.router_id(req.site)})


@router.route("PUT", "/v2.0/routers/{id}")
def update_router(req: Request) -> Response:
    spec = _body(req, "router")
    gateway = _gateway_info(req, spec["external_gateway_info"]) if "external_gateway_info" in spec else None
    with req.world.tx() as db:
        r = _get_router(db, req)
        for key in ("name", "description", "admin_state_up"):
            if key in spec:
                r[key] = spec[key]
        if "external_gateway_info" in spec:
            r["gateway"] = gateway
        db.put("router", req.site.name, model.stamp(r))
        return Response(200, {"router": router_view(db, req.site, r)})


@router.route("DELETE", "/v2.0/routers/{id}")
def delete_router(req: Request) -> Response:
    with req.world.tx() as db:
        r = _get_router(db, req)
        if model.router_ports(db, req.site, r["id"]):
            raise HTTPError(409, f"Router {r['id']} still has ports", "RouterInUse")
        db.delete("router", req.site.name, r["id"])
    return Response(204)


def _interface_info(r: dict, port: dict) -> dict:
    return {
        "id": r["id"],
        "subnet_id": port["subnet_id"],
        "subnet_ids": [port["subnet_id"]],
        "port_id": port["id"],
        "network_id": port["network_id"],
        "tenant_id": PROJECT_ID,
        "project_id": PROJECT_ID,
        "tags": [],
    }


def _interface_ref(req: Request) -> tuple[str | None, str | None]:
    body = req.json()
    if not isinstance(body, dict) or not (body.get("subnet_id") or body.get("port_id")):
        raise HTTPError(400, "Bad router request: Either subnet_id or port_id must be specified.", "BadRequest")
    return body.get("subnet_id"), body.get("port_id")


@router.route("PUT", "/v2.0/routers/{id}/add_router_interface")
def add_router_interface(req: Request) -> Response:
    subnet_id, port_id = _interface_ref(req)
    if subnet_id and port_id:
        raise HTTPError(400, "Bad router request: Cannot specify both subnet-id and port-id.", "BadRequest")
    with req.world.tx() as db:
        r = _get_router(db, req)
        if port_id:
            port = _get(db, req, "port", port_id)
            if port["device_id"]:
                raise HTTPError(409, f"Port {port_id} is still in use.", "PortInUse")
            subnet_id = port["subnet_id"]
        x = db.get("subnet", req.site.name, subnet_id)
        if not x:
            raise _not_found("subnet", subnet_id)
        for other in model.router_ports(db, req.site, r["id"]):
            if other["subnet_id"] == subnet_id:
                raise HTTPError(
                    400, f"Bad router request: Router already has a port on subnet {subnet_id}.", "BadRequest")
        if port_id:
            port.update(device_id=r["id"], device_owner="network:router_interface", bound_at=time.time())
            db.put("port", req.site.name, port)
        else:
            if not x.get("gateway_ip"):
                raise HTTPError(
                    400, f"Bad router request: Subnet {subnet_id} does not have a gateway IP.", "BadRequest")
            address = model.allocate_ip(db, req.site, {**x, "gateway_ip": None}, x["gateway_ip"])
            port = model.new_port(
                db, req.site, network_id=x["network_id"], subnet_id=subnet_id, fixed_ip=address,
                device_id=r["id"], device_owner="network:router_interface", preserve=False)
        return Response(200, _interface_info(r, port))


@router.route("PUT", "/v2.0/routers/{id}/remove_router_interface")
def remove_router_interface(req: Request) -> Response:
    subnet_id, port_id = _interface_ref(req)
    with req.world.tx() as db:
        r = _get_router(db, req)
        ports = model.router_ports(db, req.site, r["id"])
        if port_id:
            port = next((p for p in ports if p["id"] == port_id), None)
            if port is None:
                raise HTTPError(
                    404, f"Router {r['id']} does not have an interface with id {port_id}",
                    "RouterInterfaceNotFound")
            if subnet_id and port["subnet_id"] != subnet_id:
                raise HTTPError(
                    409, f"Subnet {subnet_id} is not the subnet of port {port_id}", "SubnetMismatchForPort")
        else:
            port = next((p for p in ports if p["subnet_id"] == subnet_id), None)
            if port is None:
                raise HTTPError(
                    404, f"Router {r['id']} has no interface on subnet {subnet_id}",
                    "RouterInterfaceNotFoundForSubnet")
        model.delete_port(db, req.site, port)
        return Response(200, _interface_info(r, port))


# ============================================================================ ports


def port_view(site: Site, p: dict) -> dict:
    return {
        "id": p["id"],
        "name": p.get("name", ""),
        "network_id": p["network_id"],
        "mac_address": p["mac"],
        "admin_state_up": True,
        "status": "ACTIVE",
        "device_id": p["device_id"],
        "device_owner": p["device_owner"],
        "fixed_ips": [{"subnet_id": p["subnet_id"], "ip_address": p["fixed_ip"]}],
        "security_groups": list(p.get("security_groups", [])),
        "allowed_address_pairs": [],
        "extra_dhcp_opts": [],
        "binding:vnic_type": "baremetal" if site.kind == "baremetal" else "normal",
        "port_security_enabled": p.get("port_security", True),
        "dns_name": "",
        "dns_assignment": [],
        "qos_policy_id": None,
        "propagate_uplink_status": False,
        "ip_allocation": "immediate",
        **_std(p),
    }


@router.route("GET", "/v2.0/ports")
def list_ports(req: Request) -> Response:
    with req.world.read() as db:
        ports = [port_view(req.site, p) for p in _rows(db, req, "port", "device_id", "network_id")]
    return listing(req, ports, "ports")


@router.route("GET", "/v2.0/ports/{id}")
def get_port(req: Request) -> Response:
    with req.world.read() as db:
        p = _get(db, req, "port")
    return Response(200, {"port": _fields(req, port_view(req.site, p))})


@router.route("POST", "/v2.0/ports")
def create_port(req: Request) -> Response:
    spec = _body(req, "port")
    net_id = spec.get("network_id")
    if not net_id:
        raise HTTPError(
            400, "Failed to parse request. Required attribute 'network_id' not specified", "BadRequest")
    fixed = spec.get("fixed_ips") or []
    if not isinstance(fixed, list) or len(fixed) > 1 or not all(isinstance(f, dict) for f in fixed):
        raise HTTPError(400, "Invalid input for fixed_ips: the testbed takes at most one entry.", "HTTPBadRequest")
    with req.world.tx() as db:
        site = req.site
        shared = net_id == cat.shared_net_id(site)
        n = db.get("network", site.name, net_id)
        if not n and not shared:
            if net_id == cat.public_net_id(site):
                raise HTTPError(403, "(rule:create_port) is disallowed by policy", "PolicyNotAuthorized")
            raise _not_found("network", net_id)
        security = spec.get("port_security_enabled")
        if security is None:
            security = True if shared else n.get("port_security_enabled", True)
        sg_refs = spec.get("security_groups")
        if not security and sg_refs:
            raise HTTPError(
                400,
                "Port security must be enabled and port must have an IP address in order to use security groups.",
                "PortSecurityAndIPRequiredForSecurityGroups",
            )
        sg_ids = []
        if security:
            for ref in sg_refs if sg_refs is not None else ["default"]:
                g = model.find_security_group(db, site, str(ref))
                if not g:
                    raise _not_found("secgroup", ref)
                sg_ids.append(g["id"])
        want = fixed[0] if fixed else {}
        if shared:
            subnet_id = cat.shared_subnet_id(site)
            if want.get("subnet_id") not in (None, subnet_id) or want.get("ip_address"):
                raise HTTPError(400, "The testbed assigns sharednet1 addresses itself.", "BadRequest")
            address = cat.fixed_ip(site, db.counter(f"fixed_ip:{site.name}"))
        else:
            subnets_ = model.network_subnets(db, site, net_id)
            if want.get("subnet_id"):
                x = next((s for s in subnets_ if s["id"] == want["subnet_id"]), None)
                if x is None:
                    if db.get("subnet", site.name, want["subnet_id"]):
                        raise HTTPError(
                            400,
                            f"Invalid input for operation: Failed to create port on network {net_id}, because "
                            f"fixed_ips included invalid subnet {want['subnet_id']}.",
                            "InvalidInput",
                        )
                    raise _not_found("subnet", want["subnet_id"])
            elif want.get("ip_address"):
                x = next((s for s in subnets_
                          if ipaddress.ip_address(want["ip_address"]) in ipaddress.ip_network(s["cidr"])), None)
                if x is None:
                    raise HTTPError(
                        400, f"IP address {want['ip_address']} is not a valid IP for the specified network.",
                        "InvalidIpForNetwork")
            else:
                x = subnets_[0] if subnets_ else None
                if x is None:
                    raise HTTPError(
                        400, f"Network {net_id} has no subnet to allocate an address from.", "BadRequest")
            subnet_id = x["id"]
            address = model.allocate_ip(db, site, x, want.get("ip_address"))
        p = model.new_port(
            db, site, network_id=net_id, subnet_id=subnet_id, fixed_ip=address, name=spec.get("name") or "",
            description=spec.get("description") or "", device_id=spec.get("device_id") or "",
            device_owner=spec.get("device_owner") or "", sg_ids=sg_ids, port_security=bool(security),
            tags=spec.get("tags"))
        return Response(201, {"port": port_view(site, p)})


@router.route("PUT", "/v2.0/ports/{id}")
def update_port(req: Request) -> Response:
    spec = _body(req, "port")
    with req.world.tx() as db:
        p = _get(db, req, "port")
        for key in ("name", "description"):
            if key in spec:
                p[key] = spec[key] or ""
        if "port_security_enabled" in spec:
            p["port_security"] = bool(spec["port_security_enabled"])
            if not p["port_security"]:
                p["security_groups"] = []
        db.put("port", req.site.name, model.stamp(p))
        return Response(200, {"port": port_view(req.site, p)})


@router.route("DELETE", "/v2.0/ports/{id}")
def delete_port(req: Request) -> Response:
    with req.world.tx() as db:
        p = _get(db, req, "port")
        if p["device_owner"] == "network:router_interface":
            raise HTTPError(
                409,
                f"Port {p['id']} cannot be deleted directly via the port API: has device owner "
                "network:router_interface.",
                "L3PortInUse",
            )
        model.delete_port(db, req.site, p)
    return Response(204)


# ============================================================================ floating IPs


def fip_view(db, site: Site, f: dict) -> dict:
    details = None
    if f.get("port_id"):
        p = db.get("port", site.name, f["port_id"])
        if p:
            details = {
                "name": p.get("name", ""),
                "network_id": p["network_id"],
                "mac_address": p["mac"],
                "admin_state_up": True,
                "status": "ACTIVE",
                "device_id": p["device_id"],
                "device_owner": p["device_owner"],
            }
    return {
        "id": f["id"],
        "floating_ip_address": f["address"],
        "floating_network_id": f["network_id"],
        "router_id": f.get("router_id"),
        "port_id": f.get("port_id"),
        "fixed_ip_address": f.get("fixed_ip"),
        "status": f["status"],
        "port_details": details,
        "dns_domain": "",
        "dns_name": "",
        "qos_policy_id": None,
        "port_forwardings": [],
        **_std(f),
    }


@router.route("GET", "/v2.0/floatingips")
def list_fips(req: Request) -> Response:
    with req.world.read() as db:
        fips = [fip_view(db, req.site, f) for f in _rows(db, req, "fip", "description", "port_id")]
    return listing(req, fips, "floatingips")


@router.route("POST", "/v2.0/floatingips")
def create_fip(req: Request) -> Response:
    spec = _body(req, "floatingip")
    net_id = spec.get("floating_network_id")
    if not net_id:
        raise HTTPError(
            400,
            "Failed to parse request. Required attribute 'floating_network_id' not specified",
            "BadRequest",
        )
    if net_id != cat.public_net_id(req.site):
        if net_id == cat.shared_net_id(req.site):
            raise HTTPError(
                400,
                f"Bad floatingip request: Network {net_id} is not a valid external network.",
                "BadRequest",
            )
        raise _not_found("network", net_id)
    with req.world.tx() as db:
        fip = model.allocate_fip(
            db,
            req.site,
            description=spec.get("description", ""),
            tags=spec.get("tags"),
            address=spec.get("floating_ip_address"),
        )
        if spec.get("port_id"):
            fip = model.associate_fip(db, req.site, fip, spec["port_id"], spec.get("fixed_ip_address"))
        return Response(201, {"floatingip": fip_view(db, req.site, fip)})


@router.route("GET", "/v2.0/floatingips/{id}")
def get_fip(req: Request) -> Response:
    with req.world.read() as db:
        return Response(200, {"floatingip": _fields(req, fip_view(db, req.site, _get(db, req, "fip")))})


@router.route("PUT", "/v2.0/floatingips/{id}")
def update_fip(req: Request) -> Response:
    spec = _body(req, "floatingip")
    with req.world.tx() as db:
        fip = _get(db, req, "fip")
        if "description" in spec:
            fip["description"] = spec["description"] or ""
        if "port_id" in spec:
            fip = model.associate_fip(db, req.site, fip, spec["port_id"], spec.get("fixed_ip_address"))
        else:
            fip["updated"] = time.time()
            fip["revision"] = fip.get("revision", 0) + 1
            db.put("fip", req.site.name, fip)
        return Response(200, {"floatingip": fip_view(db, req.site, fip)})


@router.route("DELETE", "/v2.0/floatingips/{id}")
def delete_fip(req: Request) -> Response:
    with req.world.tx() as db:
        fip = _get(db, req, "fip")
        db.delete("fip", req.site.name, fip["id"])
    return Response(204)


# ============================================================================ security groups


def rule_view(r: dict, default_sg: bool) -> dict:
    prefix = r.get("remote_ip_prefix")
    normalized = str(ipaddress.ip_network(prefix, strict=False)) if prefix else None
    return {
        "id": r["id"],
        "security_group_id": r["security_group_id"],
        "direction": r["direction"],
        "ethertype": r["ethertype"],
        "protocol": r.get("protocol"),
        "port_range_min": r.get("port_range_min"),
        "port_range_max": r.get("port_range_max"),
        "remote_ip_prefix": prefix,
        "normalized_cidr": normalized,
        "remote_group_id": r.get("remote_group_id"),
        "remote_address_group_id": None,
        "belongs_to_default_sg": default_sg,
        **_std(r),
    }


def sg_view(db, site: Site, g: dict, rules_of: dict[str, list[dict]] | None = None) -> dict:
    """A group as Neutron shows it; `rules_of` (group id -> rules) when rendering many groups at once."""
    raw = rules_of.get(g["id"], []) if rules_of is not None else model.sg_rules(db, site, g["id"])
    rules = [rule_view(r, g.get("default", False)) for r in raw]
    return {
        "id": g["id"],
        "name": g["name"],
        "stateful": g.get("stateful", True),
        "shared": False,
        "security_group_rules": rules,
        **_std(g),
    }


@router.route("GET", "/v2.0/security-groups")
def list_sgs(req: Request) -> Response:
    with req.world.read() as db:
        # Narrow by name in SQLite first (labctl and python-chi look groups up by name), then build the views.
        rows = _rows(db, req, "secgroup", "name")
        rules_of: dict[str, list[dict]] = {}
        for r in db.find("sgrule", req.site.name) if len(rows) > 1 else []:
            rules_of.setdefault(r["security_group_id"], []).append(r)
        groups = [sg_view(db, req.site, g, rules_of if len(rows) > 1 else None) for g in rows]
    return listing(req, groups, "security_groups")


@router.route("POST", "/v2.0/security-groups")
def create_sg(req: Request) -> Response:
    spec = _body(req, "security_group")
    name = spec.get("name", "")
    if name == "default":
        raise HTTPError(409, "Default security group already exists.", "SecurityGroupDefaultAlreadyExists")
    with req.world.tx() as db:
        g = model.create_security_group(
            db,
            req.site,
            name,
            spec.get("description", ""),
            tags=spec.get("tags"),
            stateful=spec.get("stateful", True),
        )
        return Response(201, {"security_group": sg_view(db, req.site, g)})


@router.route("GET", "/v2.0/security-groups/{id}")
def get_sg(req: Request) -> Response:
    with req.world.read() as db:
        return Response(200, {"security_group": _fields(req, sg_view(db, req.site, _get(db, req, "secgroup")))})


@router.route("PUT", "/v2.0/security-groups/{id}")
def update_sg(req: Request) -> Response:
    spec = (req.json() or {}).get("security_group") or {}
    with req.world.tx() as db:
        g = _get(db, req, "secgroup")
        for key in ("name", "description"):
            if key in spec:
                g[key] = spec[key]
        g["updated"] = time.time()
        g["revision"] = g.get("revision", 0) + 1
        db.put("secgroup", req.site.name, g)
        return Response(200, {"security_group": sg_view(db, req.site, g)})


@router.route("DELETE", "/v2.0/security-groups/{id}")
def delete_sg(req: Request) -> Response:
    with req.world.tx() as db:
        g = _get(db, req, "secgroup")
        if g.get("default"):
            raise HTTPError(
                409,
                "Insufficient rights for removing default security group.",
                "SecurityGroupCannotRemoveDefault",
            )
        if model.security_group_in_use(db, req.site, g["id"]):
            raise HTTPError(409, f"Security Group {g['id']} in use.", "SecurityGroupInUse")
        for r in model.sg_rules(db, req.site, g["id"]):
            db.delete("sgrule", req.site.name, r["id"])
        db.delete("secgroup", req.site.name, g["id"])
    return Response(204)


_PROTOCOLS = {"tcp": "tcp", "6": "tcp", "udp": "udp", "17": "udp", "icmp": "icmp", "1": "icmp", "any": None}


@router.route("GET", "/v2.0/security-group-rules")
def list_rules(req: Request) -> Response:
    with req.world.read() as db:
        defaults = {g["id"] for g in db.find("secgroup", req.site.name) if g.get("default")}
        rules = [rule_view(r, r["security_group_id"] in defaults) for r in db.find("sgrule", req.site.name)]
    return listing(req, rules, "security_group_rules")


@router.route("GET", "/v2.0/security-group-rules/{id}")
def get_rule(req: Request) -> Response:
    with req.world.read() as db:
        r = _get(db, req, "sgrule")
        g = db.get("secgroup", req.site.name, r["security_group_id"]) or {}
    return Response(200, {"security_group_rule": _fields(req, rule_view(r, g.get("default", False)))})


@router.route("POST", "/v2.0/security-group-rules")
def create_rule(req: Request) -> Response:
    spec = _body(req, "security_group_rule")
    direction = spec.get("direction")
    if direction not in ("ingress", "egress"):
        raise HTTPError(
            400,
            f"Invalid input for direction. Reason: '{direction}' is not in ['ingress', 'egress'].",
            "HTTPBadRequest",
        )
    ethertype = spec.get("ethertype") or "IPv4"
    if ethertype not in ("IPv4", "IPv6"):
        raise HTTPError(
            400,
            f"Invalid input for ethertype. Reason: '{ethertype}' is not in ['IPv4', 'IPv6'].",
            "HTTPBadRequest",
        )
    proto_raw = spec.get("protocol")
    protocol = None if proto_raw is None else _PROTOCOLS.get(str(proto_raw).lower(), str(proto_raw).lower())
    lo, hi = spec.get("port_range_min"), spec.get("port_range_max")
    try:
        lo = None if lo is None else int(lo)
        hi = None if hi is None else int(hi)
    except (TypeError, ValueError):
        raise HTTPError(400, "Invalid value for port", "InvalidInput") from None
    if protocol in ("tcp", "udp") and lo is not None and hi is not None and lo > hi:
        raise HTTPError(
            400,
            "For TCP/UDP protocols, port_range_min must be <= port_range_max",
            "SecurityGroupInvalidPortRange",
        )
    if protocol in ("tcp", "udp") and (
        (lo is not None and not 0 <= lo <= 65535) or (hi is not None and not 0 <= hi <= 65535)
    ):
        raise HTTPError(
            400, f"Invalid value for port {lo if lo and lo > 65535 else hi}", "SecurityGroupInvalidPortValue"
        )
    if (lo is not None or hi is not None) and protocol is None:
        raise HTTPError(
            400,
            "Must also specify protocol if port range is given.",
            "SecurityGroupProtocolRequiredWithPorts",
        )
    prefix = spec.get("remote_ip_prefix")
    if prefix:
        try:
            prefix = str(ipaddress.ip_network(prefix, strict=False)) if "/" not in prefix else prefix
            ipaddress.ip_network(prefix, strict=False)
        except ValueError:
            raise HTTPError(
                400,
                f"Invalid input for remote_ip_prefix. Reason: '{prefix}' is not a valid IP prefix.",
                "HTTPBadRequest",
            ) from None
    if prefix and spec.get("remote_group_id"):
        raise HTTPError(
            400,
            "Only remote_ip_prefix or remote_group_id may be provided.",
            "SecurityGroupRemoteGroupAndRemoteIpPrefix",
        )
    with req.world.tx() as db:
        g = _get(db, req, "secgroup", spec.get("security_group_id"))
        if spec.get("remote_group_id"):
            _get(db, req, "secgroup", spec["remote_group_id"])
        key = (direction, ethertype, protocol, lo, hi, prefix, spec.get("remote_group_id"))
        for r in model.sg_rules(db, req.site, g["id"]):
            if (
                r["direction"],
                r["ethertype"],
                r.get("protocol"),
                r.get("port_range_min"),
                r.get("port_range_max"),
                r.get("remote_ip_prefix"),
                r.get("remote_group_id"),
            ) == key:
                raise HTTPError(
                    409,
                    f"Security group rule already exists. Rule id is {r['id']}.",
                    "SecurityGroupRuleExists",
                )
        rule = model.add_rule(
            db,
            req.site,
            g,
            {
                "direction": direction,
                "ethertype": ethertype,
                "protocol": protocol,
                "port_range_min": lo,
                "port_range_max": hi,
                "remote_ip_prefix": prefix,
                "remote_group_id": spec.get("remote_group_id"),
                "description": spec.get("description", ""),
            },
        )
        return Response(201, {"security_group_rule": rule_view(rule, g.get("default", False))})


@router.route("DELETE", "/v2.0/security-group-rules/{id}")
def delete_rule(req: Request) -> Response:
    with req.world.tx() as db:
        if not db.delete("sgrule", req.site.name, req.params["id"]):
            raise _not_found("sgrule", req.params["id"])
    return Response(204)


# ============================================================================ tags

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
    obj["revision"] = obj.get("revision", 0) + 1
    obj["updated"] = time.time()
    db.put(kind, req.site.name, obj)


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


# ============================================================================ quotas


def _quota(db, site: Site) -> dict:
    return {
        "floatingip": model.fip_quota(db, site),
        "network": 100,
        "port": 500,
        "router": 10,
        "subnet": 100,
        "security_group": 100,
        "security_group_rule": 1000,
    }


@router.route("GET", "/v2.0/quotas/{project}")
def get_quota(req: Request) -> Response:
    with req.world.read() as db:
        return Response(200, {"quota": _quota(db, req.site)})


@router.route("GET", "/v2.0/quotas/{project}/details")
def get_quota_details(req: Request) -> Response:
    with req.world.read() as db:
        quota = _quota(db, req.site)
        used = {
            "floatingip": model.fips_used(db, req.site),
            "port": len(db.find("port", req.site.name)),
            "network": len(db.find("network", req.site.name)),
            "subnet": len(db.find("subnet", req.site.name)),
            "router": len(db.find("router", req.site.name)),
            "security_group": len(db.find("secgroup", req.site.name)),
            "security_group_rule": len(db.find("sgrule", req.site.name)),
        }
    return Response(
        200, {"quota": {k: {"limit": v, "used": used.get(k, 0), "reserved": 0} for k, v in quota.items()}}
    )
