"""Compute Engine VPC networks and subnetworks, and where an instance's interface lands in them (its networkIP)."""

from __future__ import annotations

import ipaddress
import re

from labctl.testbed.gce import world as w
from labctl.testbed.gce.common import (
    EPOCH,
    USER,
    ApiError,
    Call,
    check_name,
    check_project,
    get_stored,
    idempotent,
    in_use,
    in_use_message,
    invalid,
    links,
    list_page,
    not_found,
    parse_ref,
    region_param,
    region_scope,
    scaled,
    scheduled_delete,
    stored_handlers,
)
from labctl.testbed.gce.world import Db


# ------------------------------------------------------------------------------------ networks
def _default_network(project: str) -> dict:
    return {"kind": "compute#network", "id": "5523217431089034818", "creationTimestamp": EPOCH,
            "name": "default", "description": "Default network for the project",
            "selfLink": f"projects/{project}/global/networks/default", "autoCreateSubnetworks": True,
            "routingConfig": {"routingMode": "REGIONAL"}, "networkFirewallPolicyEnforcementOrder":
            "AFTER_CLASSIC_FIREWALL", "mtu": 1460, "_project": project, "_scope": "global"}


def live_network(db: Db, call: Call, link: str) -> dict | None:
    """The network a (relative) link names, if it exists in this project and is not being deleted."""
    m = re.match(r"^projects/([^/]+)/global/networks/([^/]+)$", link)
    if not m or m.group(1) != call.project:
        return None
    if m.group(2) == w.DEFAULT_NETWORK:
        return _default_network(call.project)
    net = db.get("network", call.project, "global", m.group(2))
    return net if net is not None and net.get("_gone_at") is None else None


def _render_network(db: Db, net: dict) -> dict:
    out = w.render_plain(net, db.now)
    subnets = [s["selfLink"] for s in db.find("subnetwork", net["_project"]) if s["network"] == net["selfLink"]]
    if subnets:
        out["subnetworks"] = subnets
    return out


def _network(db: Db, call: Call) -> dict:
    name = call.params["name"]
    if name == w.DEFAULT_NETWORK:
        return _default_network(call.project)
    net = db.get("network", call.project, "global", name)
    if net is None:
        raise not_found(f"projects/{call.project}/global/networks/{name}")
    return net


def networks_insert(call: Call) -> dict:
    check_project(call)
    body = call.json()
    name = check_name(body.get("name"))
    if body.get("IPv4Range"):
        raise invalid("resource.IPv4Range", body["IPv4Range"], "Legacy networks are not supported; create a VPC "
                      "network (autoCreateSubnetworks true or false).")
    if "autoCreateSubnetworks" not in body:
        raise invalid("resource.autoCreateSubnetworks", "", "Must be set to create a VPC network (legacy networks "
                      "are not supported).")
    mode = ((body.get("routingConfig") or {}).get("routingMode") or "REGIONAL")
    if mode not in ("REGIONAL", "GLOBAL"):
        raise invalid("resource.routingConfig.routingMode", mode, "Must be REGIONAL or GLOBAL.")
    mtu = int(body.get("mtu") or 1460)
    if not 1300 <= mtu <= 8896:
        raise invalid("resource.mtu", mtu, "The MTU must be between 1300 and 8896.")

    def perform(db: Db) -> dict:
        link = f"projects/{call.project}/global/networks/{name}"
        if name == w.DEFAULT_NETWORK or db.get("network", call.project, "global", name) is not None:
            raise ApiError(409, f"The resource '{link}' already exists", "alreadyExists")
        net_id = w.new_id()
        db.put("network", {
            "kind": "compute#network", "id": net_id, "creationTimestamp": w.rfc3339(db.now), "name": name,
            "description": str(body.get("description", "")), "selfLink": link,
            "selfLinkWithId": f"projects/{call.project}/global/networks/{net_id}",
            "autoCreateSubnetworks": bool(body["autoCreateSubnetworks"]), "routingConfig": {"routingMode": mode},
            "networkFirewallPolicyEnforcementOrder": "AFTER_CLASSIC_FIREWALL", "mtu": mtu,
            "_project": call.project, "_scope": "global",
        })
        return w.new_operation(db, call.project, "global", "insert", link, net_id,
                               scaled(call, w.INSERT_OP["networks"]), user=USER)

    return idempotent(call, perform)


def networks_get(call: Call) -> dict:
    check_project(call)
    with call.world.read() as db:
        return links(_render_network(db, _network(db, call)), call.base)


def networks_list(call: Call) -> dict:
    check_project(call)
    with call.world.read() as db:
        items = [_render_network(db, n) for n in [_default_network(call.project),
                                                   *db.find("network", call.project, "global")]]
    return list_page(call, "compute#networkList", items, f"projects/{call.project}/global/networks")


def _in_use(what: str, link: str, user: str) -> dict:
    """A DONE operation's error: the resource is still in use (deleting a network with firewalls, ...)."""
    return {"errors": [{"code": "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE",
                        "message": in_use_message(what, link, user)}]}


def networks_delete(call: Call) -> dict:
    check_project(call)

    def perform(db: Db) -> dict:
        net = _network(db, call)
        link = net["selfLink"]
        if net["name"] == w.DEFAULT_NETWORK:
            raise ApiError(400, "The emulator's default network cannot be deleted.", "invalid")
        # As on Compute Engine, a network in use fails in its (global) operation, not in the request.
        users = [f["selfLink"] for f in db.find("firewall", call.project, "global") if f.get("network") == link]
        users += [s["selfLink"] for s in db.find("subnetwork", call.project) if s["network"] == link]
        users += [i["selfLink"] for i in db.find("instance", call.project)
                  if any(nic.get("network") == link for nic in i.get("networkInterfaces", []))]
        if users and net.get("_gone_at") is None:
            return w.new_operation(db, call.project, "global", "delete", link, net["id"], scaled(call, w.FAILED_OP),
                                   user=USER, error=_in_use("network", link, users[0]), http_status=400,
                                   http_message="BAD REQUEST")
        return scheduled_delete(db, call, "network", net, "networks", scope="global")

    return idempotent(call, perform)


# ------------------------------------------------------------------------------------ subnetworks
def _subnetwork(db: Db, call: Call, region: str) -> dict:
    return get_stored(db, call, "subnetwork", f"regions/{region}", "subnetworks")


AUTO_MODE_RANGE = ipaddress.ip_network("10.128.0.0/9")


def subnetworks_insert(call: Call) -> dict:
    check_project(call)
    region = region_param(call)
    body = call.json()
    name = check_name(body.get("name"))
    raw_range = str(body.get("ipCidrRange") or "")
    try:
        cidr = ipaddress.ip_network(raw_range)
    except ValueError:
        why = "has host bits set" if "/" in raw_range else "is not a valid CIDR range"
        raise invalid("resource.ipCidrRange", raw_range, f"Invalid IPCidrRange: {raw_range} {why}.") from None
    if cidr.version != 4 or cidr.prefixlen > 29 or cidr.prefixlen < 8:
        raise invalid("resource.ipCidrRange", raw_range, f"Invalid IPCidrRange: {raw_range}; a subnetwork's "
                      "primary range is an IPv4 range from /8 to /29.")
    if not body.get("network"):
        raise invalid("resource.network", "", "The network must be specified.")

    def perform(db: Db) -> dict:
        scope = f"regions/{region}"
        link = f"projects/{call.project}/{scope}/subnetworks/{name}"
        if db.get("subnetwork", call.project, scope, name) is not None:
            raise ApiError(409, f"The resource '{link}' already exists", "alreadyExists")
        network = parse_ref(body["network"], "resource.network", ("networks",), call.project, bare=True).rel
        net = live_network(db, call, network)
        if net is None:
            raise not_found(network)
        if net.get("autoCreateSubnetworks") and cidr.overlaps(AUTO_MODE_RANGE):
            raise invalid("resource.ipCidrRange", raw_range, "Extended subnetworks in auto subnet mode networks "
                          f"cannot overlap with {AUTO_MODE_RANGE}.")
        for other in db.find("subnetwork", call.project):
            if other["network"] == network and cidr.overlaps(ipaddress.ip_network(other["ipCidrRange"])):
                raise invalid("resource.ipCidrRange", raw_range, f"Invalid IPCidrRange: {raw_range} conflicts with "
                              f"existing subnetwork '{other['name']}' in region '{other['_scope'].split('/')[1]}'.")
        sub_id = w.new_id()
        db.put("subnetwork", {
            "kind": "compute#subnetwork", "id": sub_id, "creationTimestamp": w.rfc3339(db.now), "name": name,
            "description": str(body.get("description", "")), "network": network, "ipCidrRange": str(cidr),
            "gatewayAddress": str(cidr.network_address + 1), "region": f"projects/{call.project}/{scope}",
            "selfLink": link, "privateIpGoogleAccess": bool(body.get("privateIpGoogleAccess", False)),
            "fingerprint": w.fingerprint(), "stackType": "IPV4_ONLY", "purpose": "PRIVATE",
            "_project": call.project, "_scope": scope,
        })
        return w.new_operation(db, call.project, scope, "insert", link, sub_id,
                               scaled(call, w.INSERT_OP["subnetworks"]), user=USER)

    return idempotent(call, perform)


subnetworks_get, subnetworks_list = stored_handlers("subnetwork", "subnetworks", region_scope, w.render_plain)


def subnetworks_delete(call: Call) -> dict:
    check_project(call)
    region = region_param(call)

    def perform(db: Db) -> dict:
        sub = _subnetwork(db, call, region)
        link = sub["selfLink"]
        user = next((i["selfLink"] for i in db.find("instance", call.project)
                     if any(nic.get("subnetwork") == link for nic in i.get("networkInterfaces", []))), None)
        if user is not None:
            raise in_use("subnetwork", link, user)
        return scheduled_delete(db, call, "subnetwork", sub, "subnetworks")

    return idempotent(call, perform)


def _reserved(cidr: ipaddress.IPv4Network) -> set[ipaddress.IPv4Address]:
    """Compute Engine keeps four addresses of a subnetwork's primary range: network, gateway, the second-to-last
    and the broadcast address."""
    return {cidr.network_address, cidr.network_address + 1, cidr.broadcast_address - 1, cidr.broadcast_address}


def place_nic(db: Db, call: Call, region: str, nic_in: dict) -> tuple[str, dict | None, str | None]:
    """(network link, subnetwork or None on the default / an auto-mode network, requested networkIP) of an
    instance's interface; ApiError for a network or subnetwork that does not exist or does not fit."""
    field_name = "resource.networkInterfaces[0]"
    subnetwork = None
    if nic_in.get("subnetwork"):
        sub = parse_ref(nic_in["subnetwork"], f"{field_name}.subnetwork", ("subnetworks",), call.project,
                        region=region, bare=True)
        sub_link = sub.rel
        if sub.where != region:
            raise invalid(f"{field_name}.subnetwork", nic_in["subnetwork"], "Subnetwork must be in the same "
                          "region as the instance.")
        subnetwork = db.get("subnetwork", call.project, f"regions/{region}", sub.name) \
            if sub.project == call.project else None
        if subnetwork is None or subnetwork.get("_gone_at") is not None:
            if sub.name == w.DEFAULT_NETWORK and sub.project == call.project and not nic_in.get("network"):
                subnetwork = None  # the default network's subnetwork of this region
            else:
                raise not_found(sub_link)
    default_link = f"projects/{call.project}/global/networks/{w.DEFAULT_NETWORK}"
    if nic_in.get("network"):
        network = parse_ref(nic_in["network"], f"{field_name}.network", ("networks",), call.project,
                            bare=True).rel
    else:
        network = subnetwork["network"] if subnetwork else default_link
    net = live_network(db, call, network)
    if net is None:
        raise not_found(network)
    if subnetwork is not None and subnetwork["network"] != network:
        raise invalid(f"{field_name}.subnetwork", nic_in["subnetwork"], f"Subnetwork does not belong to network "
                      f"'{network}'.")
    if subnetwork is None and not net.get("autoCreateSubnetworks"):
        raise invalid(f"{field_name}", "", "Subnetwork should be specified for custom subnetmode network")
    wanted = nic_in.get("networkIP") or None
    if wanted is not None:
        try:
            ip = ipaddress.ip_address(str(wanted))
        except ValueError:
            raise invalid(f"{field_name}.networkIP", wanted, "Invalid IP address.") from None
        if subnetwork is not None:
            cidr = ipaddress.ip_network(subnetwork["ipCidrRange"])
            if ip not in cidr:
                raise invalid(f"{field_name}.networkIP", wanted, "Requested internal IP is outside the "
                              "subnetwork CIDR range.")
            if ip in _reserved(cidr):
                raise invalid(f"{field_name}.networkIP", wanted, "Requested internal IP is reserved in the "
                              "subnetwork.")
        wanted = str(ip)
    return network, subnetwork, wanted


def pick_network_ip(db: Db, call: Call, subnetwork: dict, wanted: str | None) -> tuple[str | None, dict | None]:
    """(the interface's address in the subnetwork, None) or (None, the operation's error): the requested address
    if it is free, else the lowest free one."""
    link = subnetwork["selfLink"]
    used = {nic.get("networkIP") for i in db.find("instance", call.project) for nic in i.get("networkInterfaces", [])
            if nic.get("subnetwork") == link}
    if wanted is not None:
        if wanted in used:
            return None, {"errors": [{"code": "IP_IN_USE_BY_ANOTHER_RESOURCE",
                                      "message": f"IP '{wanted}' is already being used by another resource."}]}
        return wanted, None
    cidr = ipaddress.ip_network(subnetwork["ipCidrRange"])
    reserved = _reserved(cidr)
    for ip in cidr.hosts():
        if ip not in reserved and str(ip) not in used:
            return str(ip), None
    return None, {"errors": [{"code": "IP_SPACE_EXHAUSTED",
                              "message": f"IP space of '{link}' is exhausted."}]}
