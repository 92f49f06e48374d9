"""The world-level views and lifecycle of the emulated Chameleon: the seed of a new world, what time has done
(`process_due`: leases starting and ending, `release_lease`, `delete_lease`), the inventory and the SSH targets."""

from __future__ import annotations

from labctl.testbed.errors import HTTPError
from labctl.testbed.openstack import catalog
from labctl.testbed.openstack.catalog import SITES, Site
from labctl.testbed.openstack.model.base import site_of
from labctl.testbed.openstack.model.leases import all_flavors, lease_status, lease_view
from labctl.testbed.openstack.model.network import (
    SiteAddresses,
    allocate_fip,
    attach_order,
    create_security_group,
    network_name,
    network_subnets,
    router_ports,
    sg_rules,
)
from labctl.testbed.openstack.model.servers import delete_server, server_status
from labctl.testbed.openstack.model.volumes import container_bytes, volume_status


def seed(db) -> None:
    """Objects every fresh world has: each site's `default` security group."""
    for site in SITES.values():
        if site.kind != "edge":
            create_security_group(db, site, "default", "Default security group", default=True)


def release_lease(db, site: Site, lease: dict) -> None:
    """What Blazar does at lease end (and on delete): servers, reserved FIPs and flavors go away."""
    rids = {r["id"] for r in lease["reservations"]}
    for server in db.find_any("server", site.name, reservation_id=rids, flavor_id=rids):
        delete_server(db, site, server["id"])
    for fip in db.find_any("fip", site.name, reservation_id=rids):
        db.delete("fip", site.name, fip["id"])
    for rid in rids:
        db.delete("flavor", site.name, rid)


def delete_lease(db, site: Site, lease: dict) -> None:
    release_lease(db, site, lease)
    db.delete("lease", site.name, lease["id"])


def process_due(db, now: float) -> None:
    for kind, site_name, obj in db.due(now):
        if kind == "volume" and obj.get("gone_at") is not None and now >= obj["gone_at"]:
            db.delete("volume", site_name, obj["id"])
            continue
        if kind != "lease":
            continue
        site = site_of(site_name)
        if obj["phase"] == "pending" and now >= obj["active_at"]:
            if not obj.get("error"):
                for r in obj["reservations"]:
                    if r["resource_type"] == "virtual:floatingip":
                        for _ in range(int(r["amount"])):
                            try:
                                allocate_fip(
                                    db,
                                    site,
                                    tags=["blazar", f"reservation:{r['id']}"],
                                    reservation_id=r["id"],
                                    counted=False,
                                )
                            except HTTPError:
                                break
            obj["phase"] = "started"
            obj["t_next"] = obj["end"]
        if obj["phase"] == "started" and now >= obj["end"]:
            release_lease(db, site, obj)
            obj["phase"] = "ended"
            obj["t_next"] = None
        db.put("lease", site_name, obj)


def inventory(db, site_name: str | None, now: float) -> dict[str, list[dict]]:
    sites = [SITES[site_name]] if site_name else list(SITES.values())
    inv: dict[str, list[dict]] = {
        "servers": [],
        "leases": [],
        "floating_ips": [],
        "security_groups": [],
        "keypairs": [],
        "networks": [],
        "subnets": [],
        "routers": [],
        "ports": [],
        "volumes": [],
        "containers": [],
    }
    for site in sites:
        flavors = {f["id"]: f["name"] for f in all_flavors(db, site)}
        addresses = SiteAddresses(db, site)
        for s in db.find("server", site.name):
            inv["servers"].append(
                {
                    "id": s["id"],
                    "name": s["name"],
                    "site": site.name,
                    "status": server_status(s, now),
                    "metadata": s.get("metadata", {}),
                    "key_name": s.get("key_name"),
                    "addresses": addresses.of(s),
                    "flavor_id": s["flavor_id"],
                    "flavor_name": flavors.get(s["flavor_id"]),
                    "image_id": s.get("image_id"),
                    "reservation_id": s.get("reservation_id"),
                    "security_groups": s.get("security_groups", []),
                    "tags": s.get("tags", []),
                    "fault": s.get("fault"),
                    "created": s["created"],
                }
            )
        for lease in db.find("lease", site.name):
            status = lease_status(lease, now)
            if status == "TERMINATED":
                continue
            view = lease_view(lease, now)
            inv["leases"].append(
                {
                    "id": lease["id"],
                    "name": lease["name"],
                    "site": site.name,
                    "status": status,
                    "start_date": view["start_date"],
                    "end_date": view["end_date"],
                    "reservations": view["reservations"],
                }
            )
        for f in db.find("fip", site.name):
            inv["floating_ips"].append(
                {
                    "id": f["id"],
                    "name": f["address"],
                    "site": site.name,
                    "floating_ip_address": f["address"],
                    "port_id": f.get("port_id"),
                    "fixed_ip_address": f.get("fixed_ip"),
                    "description": f.get("description", ""),
                    "tags": f.get("tags", []),
                    "status": f["status"],
                    "reservation_id": f.get("reservation_id"),
                }
            )
        for g in db.find("secgroup", site.name):
            if g.get("default"):
                continue
            inv["security_groups"].append(
                {
                    "id": g["id"],
                    "name": g["name"],
                    "site": site.name,
                    "description": g.get("description", ""),
                    "tags": g.get("tags", []),
                    "rules": [
                        {
                            k: r[k]
                            for k in (
                                "id",
                                "direction",
                                "ethertype",
                                "protocol",
                                "port_range_min",
                                "port_range_max",
                                "remote_ip_prefix",
                            )
                        }
                        for r in sg_rules(db, site, g["id"])
                    ],
                }
            )
        # Project networks, subnets and routers (the built-in public/sharednet1 ones are not listed), and
        # every port except those Nova made for a server on sharednet1 (they go with their server).
        for n in db.find("network", site.name):
            inv["networks"].append({
                "id": n["id"], "name": n["name"], "site": site.name, "description": n.get("description", ""),
                "tags": n.get("tags", []), "port_security_enabled": n.get("port_security_enabled", True),
                "subnets": [x["id"] for x in network_subnets(db, site, n["id"])],
            })
        for x in db.find("subnet", site.name):
            inv["subnets"].append({
                "id": x["id"], "name": x["name"], "site": site.name, "description": x.get("description", ""),
                "tags": x.get("tags", []), "network_id": x["network_id"], "cidr": x["cidr"],
                "gateway_ip": x.get("gateway_ip"), "allocation_pools": x.get("allocation_pools", []),
            })
        for r in db.find("router", site.name):
            inv["routers"].append({
                "id": r["id"], "name": r["name"], "site": site.name, "description": r.get("description", ""),
                "tags": r.get("tags", []), "external_network_id": (r.get("gateway") or {}).get("network_id"),
                "interfaces": [{"port_id": p["id"], "subnet_id": p["subnet_id"], "ip_address": p["fixed_ip"]}
                               for p in router_ports(db, site, r["id"])],
            })
        shared = catalog.shared_net_id(site)
        for port in db.find("port", site.name):
            if port["network_id"] == shared and not port.get("preserve"):
                continue
            inv["ports"].append({
                "id": port["id"], "name": port.get("name", ""), "site": site.name,
                "description": port.get("description", ""), "tags": port.get("tags", []),
                "network_id": port["network_id"], "network_name": network_name(site, port["network_id"], db),
                "subnet_id": port.get("subnet_id"), "fixed_ip": port["fixed_ip"], "device_id": port["device_id"],
                "device_owner": port["device_owner"], "port_security_enabled": port.get("port_security", True),
            })
        for k in db.find("keypair", site.name):
            inv["keypairs"].append(
                {
                    "id": k["name"],
                    "name": k["name"],
                    "site": site.name,
                    "fingerprint": k["fingerprint"],
                    "public_key": k["public_key"],
                    "type": k.get("type", "ssh"),
                }
            )
        for v in db.find("volume", site.name):
            inv["volumes"].append({
                "id": v["id"], "name": v.get("name") or "", "site": site.name, "size": v["size"],
                "status": volume_status(v, now), "metadata": dict(v.get("metadata") or {}),
                "description": v.get("description") or "",
                "attachments": [{"server_id": a["server_id"], "device": a["device"]} for a in v.get("attachments", [])],
            })
        for c in db.find("container", site.name):
            inv["containers"].append({
                "id": c["name"], "name": c["name"], "site": site.name, "metadata": dict(c.get("metadata") or {}),
                "objects": sorted(c.get("objects", {})), "bytes": container_bytes(c),
            })
    for key in ("networks", "subnets", "routers", "ports", "volumes", "containers"):
        if not inv[key]:
            del inv[key]  # listed only when there are some (keeps the five-key shape of a world without them)
    return inv


def ssh_targets(db, now: float) -> tuple[list[dict], float]:
    """Every ACTIVE server with its floating IP, keys and fixed IPs; and the time when that list changes
    without a write (the next server to finish booting), for the caller's cache.

    It runs on every poll of the SSH side: each kind is read once per site, only the fields needed, by SQLite
    (json_extract) rather than parsing every stored object."""
    out = []
    changes_at = float("inf")
    for site in SITES.values():
        fip_of_port: dict[str, str] = {}
        for port_id, address in db.conn.execute(
                "SELECT json_extract(data, '$.port_id'), json_extract(data, '$.address') FROM objects "
                "WHERE kind='fip' AND site=? ORDER BY created, rowid", (site.name,)):
            if port_id:
                fip_of_port.setdefault(port_id, address)
        ports_of: dict[str, list[dict]] = {}
        for pid, device_id, network_id, fixed_ip, bound_at, created in db.conn.execute(
                "SELECT id, json_extract(data, '$.device_id'), json_extract(data, '$.network_id'), "
                "json_extract(data, '$.fixed_ip'), json_extract(data, '$.bound_at'), "
                "json_extract(data, '$.created') FROM objects WHERE kind='port' AND site=? "
                "ORDER BY created, rowid", (site.name,)):
            ports_of.setdefault(device_id, []).append({"id": pid, "network_id": network_id, "fixed_ip": fixed_ip,
                                                       "bound_at": bound_at, "created": created})
        for sid, name, ready_at, fault, error_at, key_data in db.conn.execute(
                "SELECT id, json_extract(data, '$.name'), json_extract(data, '$.ready_at'), "
                "json_extract(data, '$.fault'), json_extract(data, '$.error_at'), "
                "json_extract(data, '$.key_data') FROM objects WHERE kind='server' AND site=? "
                "ORDER BY created, rowid", (site.name,)):
            if server_status({"fault": fault, "error_at": error_at, "ready_at": ready_at}, now) != "ACTIVE":
                if not fault:
                    changes_at = min(changes_at, ready_at)  # it becomes ACTIVE then
                continue
            sports = attach_order(ports_of.get(sid, []))
            # No floating IP: still listed (address None), reachable only from a node on one of its networks.
            addr = next((fip_of_port[p["id"]] for p in sports if p["id"] in fip_of_port), None)
            keys = [key_data.strip()] if key_data else []
            out.append(
                {
                    "server_id": sid,
                    "site": site.name,
                    "name": name,
                    "address": addr,
                    "authorized_keys": keys,
                    "fixed_ips": {p["network_id"]: p["fixed_ip"] for p in sports if p.get("fixed_ip")},
                }
            )
    return out, changes_at
