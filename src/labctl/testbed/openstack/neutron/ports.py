"""Neutron v2.0 ports and floating IPs."""

from __future__ import annotations

import ipaddress

from labctl.testbed.http import HTTPError, Request, Response
from labctl.testbed.openstack import catalog as cat
from labctl.testbed.openstack import model
from labctl.testbed.openstack.catalog import Site
from labctl.testbed.openstack.neutron.common import (
    field_filter,
    get_owned,
    listed_rows,
    listing,
    not_found,
    resource_body,
    router,
    standard_fields,
)


def port_details(p: dict) -> dict:
    """What Neutron shows of a port in a floating IP's `port_details`; a port's own view starts with it too."""
    return {
        "name": p.get("name", ""),
        "network_id": p["network_id"],
        "mac_address": p["mac"],
        "admin_state_up": True,
        "status": "ACTIVE",
        "device_id": p["device_id"],
        "device_owner": p["device_owner"],
    }


def port_view(site: Site, p: dict) -> dict:
    return {
        "id": p["id"],
        **port_details(p),
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
        **standard_fields(p),
    }


@router.route("GET", "/v2.0/ports")
def list_ports(req: Request) -> Response:
    with req.world.read() as db:
        ports = [port_view(req.site, p) for p in listed_rows(db, req, "port", "device_id", "network_id")]
    return listing(req, ports, "ports")


@router.route("GET", "/v2.0/ports/{id}")
def get_port(req: Request) -> Response:
    with req.world.read() as db:
        p = get_owned(db, req, "port")
    return Response(200, {"port": field_filter(req, port_view(req.site, p))})


@router.route("POST", "/v2.0/ports")
def create_port(req: Request) -> Response:
    spec = resource_body(req, "port")
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
            raise not_found("network", net_id)
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
                    raise not_found("secgroup", ref)
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
                    raise not_found("subnet", want["subnet_id"])
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
    spec = resource_body(req, "port")
    with req.world.tx() as db:
        p = get_owned(db, req, "port")
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
        p = get_owned(db, req, "port")
        if p["device_owner"] == "network:router_interface":
            raise HTTPError(
                409,
                f"Port {p['id']} cannot be deleted directly via the port API: has device owner "
                "network:router_interface.",
                "L3PortInUse",
            )
        model.delete_port(db, req.site, p)
    return Response(204)


def fip_view(db, site: Site, f: dict, ports: dict[str, dict] | None = None) -> dict:
    """A floating IP as Neutron shows it; `ports`: its port, if already read (a listing reads them at once)."""
    details = None
    if f.get("port_id"):
        p = ports.get(f["port_id"]) if ports is not None else db.get("port", site.name, f["port_id"])
        if p:
            details = port_details(p)
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
        **standard_fields(f),
    }


@router.route("GET", "/v2.0/floatingips")
def list_fips(req: Request) -> Response:
    with req.world.read() as db:
        rows = listed_rows(db, req, "fip", "description", "port_id")
        ports = {p["id"]: p for p in db.get_many("port", req.site.name, {f["port_id"] for f in rows
                                                                           if f.get("port_id")})}
        fips = [fip_view(db, req.site, f, ports) for f in rows]
    return listing(req, fips, "floatingips")


@router.route("POST", "/v2.0/floatingips")
def create_fip(req: Request) -> Response:
    spec = resource_body(req, "floatingip")
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
        raise not_found("network", net_id)
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
        return Response(200, {"floatingip": field_filter(req, fip_view(db, req.site, get_owned(db, req, "fip")))})


@router.route("PUT", "/v2.0/floatingips/{id}")
def update_fip(req: Request) -> Response:
    spec = resource_body(req, "floatingip")
    with req.world.tx() as db:
        fip = get_owned(db, req, "fip")
        if "description" in spec:
            fip["description"] = spec["description"] or ""
        if "port_id" in spec:
            fip = model.associate_fip(db, req.site, fip, spec["port_id"], spec.get("fixed_ip_address"))
        else:
            db.put("fip", req.site.name, model.stamp(fip))
        return Response(200, {"floatingip": fip_view(db, req.site, fip)})


@router.route("DELETE", "/v2.0/floatingips/{id}")
def delete_fip(req: Request) -> Response:
    with req.world.tx() as db:
        fip = get_owned(db, req, "fip")
        db.delete("fip", req.site.name, fip["id"])
    return Response(204)
