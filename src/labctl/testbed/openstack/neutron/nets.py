"""Neutron v2.0 networks, subnets and routers (the built-in public and shared ones, the project's own, router
interfaces and gateways)."""

from __future__ import annotations

import ipaddress
import time

from labctl.testbed.http import HTTPError, Request, Response
from labctl.testbed.openstack import catalog as cat
from labctl.testbed.openstack import model
from labctl.testbed.openstack.catalog import PROJECT_ID, Site
from labctl.testbed.openstack.neutron.common import (
    ADMIN_PROJECT,
    field_filter,
    get_owned,
    listing,
    not_found,
    resource_body,
    router,
    standard_fields,
)

_EPOCH = 1_700_000_000.0


# One view per resource kind, for the site's built-in ones (made by the operator's admin project) and the
# project's own alike: the same fields in the same shape, as Neutron answers.


def network_view(n: dict, subnet_ids: list[str], *, external: bool = False, shared: bool = False,
                 project: str = PROJECT_ID) -> dict:
    return {
        "id": n["id"],
        "name": n["name"],
        "admin_state_up": n.get("admin_state_up", True),
        "status": "ACTIVE",
        "subnets": subnet_ids,
        "shared": shared,
        "router:external": external,
        "mtu": n.get("mtu", 1500),
        "availability_zones": ["nova"],
        "availability_zone_hints": [],
        "ipv4_address_scope": None,
        "ipv6_address_scope": None,
        "port_security_enabled": n.get("port_security_enabled", True),
        "is_default": external,
        "l2_adjacency": True,
        "qos_policy_id": None,
        "dns_domain": "",
        **standard_fields(n, project),
    }


def subnet_view(x: dict, project: str = PROJECT_ID) -> dict:
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
        **standard_fields(x, project),
    }


def router_view(r: dict, project: str = PROJECT_ID) -> dict:
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
        **standard_fields(r, project),
    }


def _project_network_view(db, site: Site, n: dict) -> dict:
    return network_view(n, [x["id"] for x in model.network_subnets(db, site, n["id"])])


def networks(site: Site, public_subnets: int = 1) -> list[dict]:
    """The built-in networks: `public` (external, the floating IPs' network) and `sharednet1` (shared)."""
    return [
        network_view({"id": net_id, "name": name, "created": _EPOCH, "revision": 1}, subnet_ids,
                     external=external, shared=not external, project=ADMIN_PROJECT)
        for name, net_id, subnet_ids, external in (
            ("public", cat.public_net_id(site), [cat.public_subnet_id(site, k) for k in range(public_subnets)], True),
            ("sharednet1", cat.shared_net_id(site), [cat.shared_subnet_id(site)], False),
        )
    ]


def subnets(site: Site, public_subnets: int = 1) -> list[dict]:
    """The built-in networks' subnets (the public network's first, `public-subnet`, and any more the world
    has); only sharednet1's has DHCP (and a name server)."""
    out = []
    public = [(f"public-subnet{f'-{k + 1}' if k else ''}", cat.public_subnet_id(site, k), cat.public_net_id(site),
               cat.public_cidr(site, k), False) for k in range(public_subnets)]
    for name, sid, net_id, cidr, dhcp in (
        *public,
        ("sharednet1-subnet", cat.shared_subnet_id(site), cat.shared_net_id(site), cat.shared_cidr(site), True),
    ):
        net = ipaddress.ip_network(cidr)
        hosts = list(net.hosts()) if net.prefixlen >= 24 else None
        last = str(hosts[-1]) if hosts else str(net.broadcast_address - 1)
        record = {
            "id": sid, "name": name, "network_id": net_id, "cidr": cidr, "created": _EPOCH,
            "gateway_ip": str(net.network_address + 1), "enable_dhcp": dhcp,
            "allocation_pools": [{"start": str(net.network_address + 2), "end": last}],
            "dns_nameservers": ["8.8.8.8"] if dhcp else [],
        }
        out.append(subnet_view(record, ADMIN_PROJECT))
    return out


def routers(site: Site) -> list[dict]:
    """The built-in router from sharednet1 to the public network."""
    gateway = {
        "network_id": cat.public_net_id(site),
        "enable_snat": True,
        "external_fixed_ips": [{"subnet_id": cat.public_subnet_id(site), "ip_address": cat.floating_ip(site, 2)}],
    }
    record = {"id": cat.router_id(site), "name": "sharednet1-router", "gateway": gateway, "created": _EPOCH}
    return [router_view(record, ADMIN_PROJECT)]


def _all_networks(db, site: Site) -> list[dict]:
    return (networks(site, model.public_subnets(db, site))
            + [_project_network_view(db, site, n) for n in db.find("network", site.name)])


def _all_subnets(db, site: Site) -> list[dict]:
    return subnets(site, model.public_subnets(db, site)) + [subnet_view(x) for x in db.find("subnet", site.name)]


def _all_routers(db, site: Site) -> list[dict]:
    return routers(site) + [router_view(r) for r in db.find("router", site.name)]


def _collection(collection: str, all_fn, kind: str):
    singular = collection.rstrip("s")

    @router.route("GET", f"/v2.0/{collection}")
    def _list(req: Request) -> Response:
        with req.world.read() as db:
            items = all_fn(db, req.site)
        return listing(req, items, collection)

    @router.route("GET", f"/v2.0/{collection}/{{id}}")
    def _show(req: Request) -> Response:
        with req.world.read() as db:
            items = all_fn(db, req.site)
        for item in items:
            if item["id"] == req.params["id"]:
                return Response(200, {singular: field_filter(req, item)})
        raise not_found(kind, req.params["id"])


_collection("networks", _all_networks, "network")


_collection("subnets", _all_subnets, "subnet")


_collection("routers", _all_routers, "router")


@router.route("POST", "/v2.0/networks")
def create_network(req: Request) -> Response:
    spec = resource_body(req, "network")
    with req.world.tx() as db:
        model.check_quota(db, req.site, "network")
        n = model.create_network(db, req.site, spec)
        return Response(201, {"network": _project_network_view(db, req.site, n)})


@router.route("PUT", "/v2.0/networks/{id}")
def update_network(req: Request) -> Response:
    spec = resource_body(req, "network")
    with req.world.tx() as db:
        n = get_owned(db, req, "network", builtin={cat.public_net_id(req.site), cat.shared_net_id(req.site)})
        for key in ("name", "description", "port_security_enabled", "admin_state_up"):
            if key in spec:
                n[key] = spec[key]
        db.put("network", req.site.name, model.stamp(n))
        return Response(200, {"network": _project_network_view(db, req.site, n)})


def _delete_unused(db, req: Request, kind: str, builtin: set[str], ports_of, message: str, code: str) -> dict:
    """Delete the project's `kind` the request names, unless a port still uses it (Neutron's 409 `code`, its
    `message` with the id); the site's built-in ones are not the project's to delete. Returns what was deleted."""
    item = get_owned(db, req, kind, builtin=builtin)
    if ports_of(db, req.site, item["id"]):
        raise HTTPError(409, message.format(id=item["id"]), code)
    db.delete(kind, req.site.name, item["id"])
    return item


@router.route("DELETE", "/v2.0/networks/{id}")
def delete_network(req: Request) -> Response:
    with req.world.tx() as db:
        n = _delete_unused(db, req, "network", {cat.public_net_id(req.site), cat.shared_net_id(req.site)},
                           model.network_ports, "Unable to complete operation on network {id}. There are one or "
                           "more ports still in use on the network.", "NetworkInUse")
        for x in model.network_subnets(db, req.site, n["id"]):  # Neutron deletes a network's subnets with it
            db.delete("subnet", req.site.name, x["id"])
    return Response(204)


@router.route("POST", "/v2.0/subnets")
def create_subnet(req: Request) -> Response:
    spec = resource_body(req, "subnet")
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
            raise not_found("network", net_id)
        model.check_quota(db, req.site, "subnet")  # before the plugin's checks, as Neutron's quota hook
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
        built_in = {cat.shared_subnet_id(req.site), *(cat.public_subnet_id(req.site, k)
                                                      for k in range(len(cat.PUBLIC_PREFIXES)))}
        _delete_unused(db, req, "subnet", built_in,
                       model.subnet_ports, "Unable to complete operation on subnet {id}: One or more ports have an "
                       "IP allocation from this subnet.", "SubnetInUse")
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
    spec = resource_body(req, "router")
    gateway = _gateway_info(req, spec.get("external_gateway_info"))
    with req.world.tx() as db:
        model.check_quota(db, req.site, "router")
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
        return Response(201, {"router": router_view(r)})


def _get_router(db, req: Request) -> dict:
    return get_owned(db, req, "router", builtin={cat.router_id(req.site)})


@router.route("PUT", "/v2.0/routers/{id}")
def update_router(req: Request) -> Response:
    spec = resource_body(req, "router")
    gateway = _gateway_info(req, spec["external_gateway_info"]) if "external_gateway_info" in spec else None
    with req.world.tx() as db:
        r = _get_router(db, req)
        for key in ("name", "description", "admin_state_up"):
            if key in spec:
                r[key] = spec[key]
        if "external_gateway_info" in spec:
            r["gateway"] = gateway
        db.put("router", req.site.name, model.stamp(r))
        return Response(200, {"router": router_view(r)})


@router.route("DELETE", "/v2.0/routers/{id}")
def delete_router(req: Request) -> Response:
    with req.world.tx() as db:
        _delete_unused(db, req, "router", {cat.router_id(req.site)}, model.router_ports,
                       "Router {id} still has ports", "RouterInUse")
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
            port = get_owned(db, req, "port", port_id)
            if port["device_id"]:
                raise HTTPError(409, f"Port {port_id} is still in use.", "PortInUse")
            subnet_id = port["subnet_id"]
        x = db.get("subnet", req.site.name, subnet_id)
        if not x:
            raise not_found("subnet", subnet_id)
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
