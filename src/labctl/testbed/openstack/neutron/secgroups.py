"""Neutron v2.0 security groups and their rules."""

from __future__ import annotations

import functools
import ipaddress

from labctl.testbed.http import HTTPError, Request, Response
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


@functools.lru_cache(maxsize=4096)  # a group list renders every rule: the same few prefixes each time
def _normalized_cidr(prefix: str) -> str:
    return str(ipaddress.ip_network(prefix, strict=False))


def rule_view(r: dict, default_sg: bool) -> dict:
    prefix = r.get("remote_ip_prefix")
    normalized = _normalized_cidr(prefix) if prefix else None
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
        **standard_fields(r),
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
        **standard_fields(g),
    }


@router.route("GET", "/v2.0/security-groups")
def list_sgs(req: Request) -> Response:
    with req.world.read() as db:
        # Narrow by name in SQLite first (labctl and python-chi look groups up by name), then build the views.
        rows = listed_rows(db, req, "secgroup", "name")
        rules_of: dict[str, list[dict]] = {}
        for r in db.find("sgrule", req.site.name) if len(rows) > 1 else []:
            rules_of.setdefault(r["security_group_id"], []).append(r)
        groups = [sg_view(db, req.site, g, rules_of if len(rows) > 1 else None) for g in rows]
    return listing(req, groups, "security_groups")


@router.route("POST", "/v2.0/security-groups")
def create_sg(req: Request) -> Response:
    spec = resource_body(req, "security_group")
    name = spec.get("name", "")
    if name == "default":
        raise HTTPError(409, "Default security group already exists.", "SecurityGroupDefaultAlreadyExists")
    with req.world.tx() as db:
        model.check_quota(db, req.site, "security_group")
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
        group = sg_view(db, req.site, get_owned(db, req, "secgroup"))
        return Response(200, {"security_group": field_filter(req, group)})


@router.route("PUT", "/v2.0/security-groups/{id}")
def update_sg(req: Request) -> Response:
    spec = (req.json() or {}).get("security_group") or {}
    with req.world.tx() as db:
        g = get_owned(db, req, "secgroup")
        for key in ("name", "description"):
            if key in spec:
                g[key] = spec[key]
        db.put("secgroup", req.site.name, model.stamp(g))
        return Response(200, {"security_group": sg_view(db, req.site, g)})


@router.route("DELETE", "/v2.0/security-groups/{id}")
def delete_sg(req: Request) -> Response:
    with req.world.tx() as db:
        g = get_owned(db, req, "secgroup")
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
        r = get_owned(db, req, "sgrule")
        g = db.get("secgroup", req.site.name, r["security_group_id"]) or {}
    return Response(200, {"security_group_rule": field_filter(req, rule_view(r, g.get("default", False)))})


@router.route("POST", "/v2.0/security-group-rules")
def create_rule(req: Request) -> Response:
    spec = resource_body(req, "security_group_rule")
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
        g = get_owned(db, req, "secgroup", spec.get("security_group_id"))
        if spec.get("remote_group_id"):
            get_owned(db, req, "secgroup", spec["remote_group_id"])
        # Neutron's quota is enforced before its plugin looks for a duplicate (a hook ahead of the create): the
        # resend of a rule create whose answer was lost, and which took the last room, is refused for quota.
        model.check_quota(db, req.site, "security_group_rule")
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
            raise not_found("sgrule", req.params["id"])
    return Response(204)
