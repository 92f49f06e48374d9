"""Compute Engine firewalls (global) and addresses (regional static external IPs)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from labctl.testbed.gce import catalog
from labctl.testbed.gce import world as w
from labctl.testbed.gce.common import (
    USER,
    ApiError,
    Call,
    check_labels,
    check_name,
    check_project,
    get_stored,
    global_scope,
    idempotent,
    in_use,
    invalid,
    not_found,
    parse_ref,
    region_param,
    region_scope,
    scaled,
    scheduled_delete,
    stored_handlers,
)
from labctl.testbed.gce.instances import quota_error
from labctl.testbed.gce.networks import live_network
from labctl.testbed.gce.world import Db

# ------------------------------------------------------------------------------------ firewalls
_PROTOCOLS = {"tcp", "udp", "icmp", "esp", "ah", "sctp", "ipip", "all"}


def _check_rules(rules: Any, field_name: str) -> list[dict]:
    out = []
    for i, rule in enumerate(rules or []):
        proto = str(rule.get("IPProtocol", "")).lower()
        if proto not in _PROTOCOLS and not proto.isdigit():
            raise invalid(f"{field_name}[{i}].IPProtocol", rule.get("IPProtocol"), "Unknown protocol.")
        ports = [str(p) for p in rule.get("ports") or []]
        for p in ports:
            if not re.fullmatch(r"\d{1,5}(-\d{1,5})?", p):
                raise invalid(f"{field_name}[{i}].ports", p, "Invalid port or port range.")
        item: dict[str, Any] = {"IPProtocol": proto}
        if ports:
            item["ports"] = ports
        out.append(item)
    return out


def _check_ranges(ranges: Any) -> list[str]:
    out = []
    for r in ranges or []:
        try:
            out.append(str(ipaddress.ip_network(str(r), strict=False)))
        except ValueError:
            raise invalid("resource.sourceRanges", r, "Must be a valid CIDR range.") from None
    return out


def firewalls_insert(call: Call) -> dict:
    check_project(call)
    body = call.json()
    name = check_name(body.get("name"))
    allowed = _check_rules(body.get("allowed"), "resource.allowed")
    denied = _check_rules(body.get("denied"), "resource.denied")
    if not allowed and not denied:
        raise ApiError(400, "Invalid value for field 'resource.allowed': ''. Exactly one of allowed or denied "
                       "must be specified.", "invalid")
    ranges = _check_ranges(body.get("sourceRanges"))
    for tag in body.get("targetTags") or []:
        check_name(tag, "resource.targetTags")

    def perform(db: Db) -> dict:
        link = f"projects/{call.project}/global/firewalls/{name}"
        if db.get("firewall", call.project, "global", name) is not None:
            raise ApiError(409, f"The resource '{link}' already exists", "alreadyExists")
        network = parse_ref(body.get("network") or "global/networks/default", "resource.network", ("networks",),
                            call.project, bare=True).rel
        if live_network(db, call, network) is None:
            raise not_found(network)
        fw_id = w.new_id()
        fw: dict[str, Any] = {
            "kind": "compute#firewall", "id": fw_id, "creationTimestamp": w.rfc3339(db.now), "name": name,
            "description": str(body.get("description", "")), "network": network,
            "priority": int(body.get("priority", 1000)), "direction": body.get("direction") or "INGRESS",
            "sourceRanges": ranges or ([] if body.get("sourceTags") else ["0.0.0.0/0"]),
            "targetTags": list(body.get("targetTags") or []), "selfLink": link,
            "disabled": bool(body.get("disabled", False)),
            "logConfig": {"enable": False},
            "_project": call.project, "_scope": "global",
        }
        if allowed:
            fw["allowed"] = allowed
        if denied:
            fw["denied"] = denied
        if body.get("sourceTags"):
            fw["sourceTags"] = list(body["sourceTags"])
        db.put("firewall", fw)
        return w.new_operation(db, call.project, "global", "insert", link, fw_id,
                               scaled(call, w.INSERT_OP["firewalls"]), user=USER)

    return idempotent(call, perform)


def _firewall(db: Db, call: Call) -> dict:
    return get_stored(db, call, "firewall", "global", "firewalls")


firewalls_get, firewalls_list = stored_handlers("firewall", "firewalls", global_scope, w.render_plain)


def firewalls_patch(call: Call) -> dict:
    check_project(call)
    body = call.json()

    def perform(db: Db) -> dict:
        fw = _firewall(db, call)
        if "allowed" in body:
            fw["allowed"] = _check_rules(body["allowed"], "resource.allowed")
        if "sourceRanges" in body:
            fw["sourceRanges"] = _check_ranges(body["sourceRanges"])
        if "targetTags" in body:
            fw["targetTags"] = list(body["targetTags"] or [])
        for key in ("description", "disabled", "priority"):
            if key in body:
                fw[key] = body[key]
        db.put("firewall", fw)
        return w.new_operation(db, call.project, "global", "patch", fw["selfLink"], fw["id"],
                               scaled(call, w.PATCH_OP), user=USER)

    return idempotent(call, perform)


def firewalls_delete(call: Call) -> dict:
    check_project(call)

    def perform(db: Db) -> dict:
        fw = _firewall(db, call)
        return scheduled_delete(db, call, "firewall", fw, "firewalls", scope="global")

    return idempotent(call, perform)


# ------------------------------------------------------------------------------------ addresses
def _address(db: Db, call: Call, region: str) -> dict:
    return get_stored(db, call, "address", f"regions/{region}", "addresses")


def addresses_insert(call: Call) -> dict:
    check_project(call)
    region = region_param(call)
    body = call.json()
    name = check_name(body.get("name"))
    labels = check_labels(body.get("labels"))
    if (body.get("addressType") or "EXTERNAL") != "EXTERNAL":
        raise invalid("resource.addressType", body.get("addressType"), "The emulator reserves external "
                      "addresses only.")

    def perform(db: Db) -> dict:
        scope = f"regions/{region}"
        link = f"projects/{call.project}/{scope}/addresses/{name}"
        if db.get("address", call.project, scope, name) is not None:
            raise ApiError(409, f"The resource '{link}' already exists", "alreadyExists")
        addr_id = w.new_id()
        usage = call.world.quota_usage(region, db)
        limit = call.world.quota(region, "STATIC_ADDRESSES", db)
        if usage["STATIC_ADDRESSES"] + 1 > limit:
            return w.new_operation(db, call.project, scope, "insert", link, addr_id, scaled(call, w.FAILED_OP),
                                   user=USER, error=quota_error("STATIC_ADDRESSES", limit, region),
                                   http_status=403, http_message="FORBIDDEN")
        users: list[str] = []
        if body.get("address"):  # promote an ephemeral address in use by an instance of this region
            ip = str(body["address"])
            for s in db.find("address", call.project, scope):
                if s["address"] == ip:
                    raise ApiError(400, f"The IP address '{ip}' is already reserved as '{s['name']}'.",
                                   "resourceInUseByAnotherResource")
            owner = next((i for i in db.find("instance", call.project)
                          if catalog.ZONES[i["_scope"].split("/")[1]] == region and ip in w.nat_ips(i)), None)
            if owner is None:
                raise invalid("resource.address", ip, "Specified IP address is not available.")
            users = [owner["selfLink"]]
        else:
            ip = w.external_ip(db.counter("external_ip"))
        addr = {
            "kind": "compute#address", "id": addr_id, "creationTimestamp": w.rfc3339(db.now), "name": name,
            "description": str(body.get("description", "")), "address": ip,
            "status": "IN_USE" if users else "RESERVED", "region": f"projects/{call.project}/{scope}",
            "selfLink": link, "users": users, "networkTier": body.get("networkTier") or "PREMIUM",
            "labels": labels, "labelFingerprint": w.fingerprint(), "addressType": "EXTERNAL",
            "_project": call.project, "_scope": scope,
        }
        db.put("address", addr)
        return w.new_operation(db, call.project, scope, "insert", link, addr_id,
                               scaled(call, w.INSERT_OP["addresses"]), user=USER)

    return idempotent(call, perform)


addresses_get, addresses_list = stored_handlers("address", "addresses", region_scope, w.render_address)


def addresses_delete(call: Call) -> dict:
    check_project(call)
    region = region_param(call)

    def perform(db: Db) -> dict:
        addr = _address(db, call, region)
        if addr.get("users"):
            raise in_use("address", addr["selfLink"], addr["users"][0])
        return scheduled_delete(db, call, "address", addr, "addresses")

    return idempotent(call, perform)
