"""The emulated Chameleon's networking: security groups, networks, subnets and their address pools, ports,
routers and floating IPs (quota, reserved ones, association)."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

from labctl.testbed.errors import HTTPError
from labctl.testbed.openstack import catalog
from labctl.testbed.openstack.catalog import Site
from labctl.testbed.openstack.model.base import check_tags, new_id, quota, stamp


def _rule(sg_id: str, direction: str, ethertype: str, remote_group_id: str | None = None, **kw) -> dict:
    now = time.time()
    return {
        "id": new_id(),
        "security_group_id": sg_id,
        "direction": direction,
        "ethertype": ethertype,
        "protocol": kw.get("protocol"),
        "port_range_min": kw.get("port_range_min"),
        "port_range_max": kw.get("port_range_max"),
        "remote_ip_prefix": kw.get("remote_ip_prefix"),
        "remote_group_id": remote_group_id,
        "remote_address_group_id": None,
        "description": kw.get("description") or "",
        "created": now,
        "updated": now,
        "revision": 0,
        "tags": [],
    }


def create_security_group(
    db,
    site: Site,
    name: str,
    description: str = "",
    *,
    default: bool = False,
    tags: list | None = None,
    stateful: bool = True,
) -> dict:
    now = time.time()
    sg = {
        "id": new_id(),
        "name": name,
        "description": description,
        "tags": list(tags or []),
        "created": now,
        "updated": now,
        "revision": 1,
        "stateful": stateful,
        "default": default,
    }
    db.put("secgroup", site.name, sg)
    for ethertype in ("IPv4", "IPv6"):
        db.put("sgrule", site.name, _rule(sg["id"], "egress", ethertype))
        if default:
            db.put("sgrule", site.name, _rule(sg["id"], "ingress", ethertype, remote_group_id=sg["id"]))
    return sg


def add_rule(db, site: Site, sg: dict, body: dict) -> dict:
    extra = {k: v for k, v in body.items() if k not in ("direction", "ethertype", "remote_group_id")}
    return db.put(
        "sgrule",
        site.name,
        _rule(sg["id"], body["direction"], body["ethertype"], body.get("remote_group_id"), **extra),
    )


def sg_rules(db, site: Site, sg_id: str) -> list[dict]:
    return db.find("sgrule", site.name, security_group_id=sg_id)


def find_security_group(db, site: Site, ref: str) -> dict | None:
    """By id, else by unique name."""
    sg = db.get("secgroup", site.name, ref)
    if sg:
        return sg
    named = db.find("secgroup", site.name, name=ref) if isinstance(ref, str) else []
    return named[0] if len(named) == 1 else None


def security_group_in_use(db, site: Site, sg_id: str) -> bool:
    return db.any_listed("port", site.name, "security_groups", sg_id)


def create_port(
    db, site: Site, network_id: str, device_id: str, sg_ids: list[str], device_owner: str = "compute:nova"
) -> dict:
    now = time.time()
    k = db.counter(f"fixed_ip:{site.name}")
    port_id = new_id()
    port = {
        "id": port_id,
        "name": "",
        "network_id": network_id,
        "device_id": device_id,
        "device_owner": device_owner,
        "mac": catalog.mac_for(port_id),
        "subnet_id": catalog.shared_subnet_id(site),
        "fixed_ip": catalog.fixed_ip(site, k),
        "security_groups": sg_ids,
        "created": now,
        "updated": now,
        "revision": 1,
        "tags": [],
        "description": "",
    }
    return db.put("port", site.name, port)


def server_ports(db, site: Site, server_id: str) -> list[dict]:
    """The server's ports in the order they were attached (the order of the boot request's networks)."""
    return attach_order(db.find("port", site.name, device_id=server_id))


def attach_order(ports: list[dict]) -> list[dict]:
    return sorted(ports, key=lambda p: (p.get("bound_at") or p.get("created", 0)))


def network_name(site: Site, network_id: str, db=None) -> str:
    if network_id == catalog.public_net_id(site):
        return "public"
    if network_id == catalog.shared_net_id(site) or db is None:
        return "sharednet1"
    net = db.get("network", site.name, network_id)
    return net["name"] if net else network_id


def server_addresses(db, site: Site, server: dict) -> dict[str, list[dict]]:
    """One server's `addresses` (Nova's view): its ports, their floating IPs, by network name."""
    ports = server_ports(db, site, server["id"])
    fips = {port["id"]: db.find("fip", site.name, port_id=port["id"]) for port in ports}
    return _addresses(site, ports, fips, lambda network_id: network_name(site, network_id, db))


class SiteAddresses:
    """Every server's `addresses` at a site from one read of its ports, floating IPs and networks: a server
    list renders every server, and a few queries per server made it grow with the square of the class."""

    def __init__(self, db, site: Site) -> None:
        self.site = site
        self.ports_of: dict[str, list[dict]] = {}
        for port in db.find("port", site.name):
            self.ports_of.setdefault(port["device_id"], []).append(port)
        self.fips_of: dict[str, list[dict]] = {}
        for fip in db.find("fip", site.name):
            if fip.get("port_id"):
                self.fips_of.setdefault(fip["port_id"], []).append(fip)
        self.network_names = {n["id"]: n["name"] for n in db.find("network", site.name)}

    def network_name(self, network_id: str) -> str:
        if network_id in (catalog.public_net_id(self.site), catalog.shared_net_id(self.site)):
            return network_name(self.site, network_id)
        return self.network_names.get(network_id, network_id)

    def of(self, server: dict) -> dict[str, list[dict]]:
        ports = attach_order(self.ports_of.get(server["id"], []))
        return _addresses(self.site, ports, self.fips_of, self.network_name)


def _addresses(site: Site, ports: list[dict], fips_of: dict[str, list[dict]],
               name_of: Any) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for port in ports:
        fips = fips_of.get(port["id"], [])
        entries = out.setdefault(name_of(port["network_id"]) or port["network_id"], [])
        entries.append(
            {
                "version": 4,
                "addr": port["fixed_ip"],
                "OS-EXT-IPS:type": "fixed",
                "OS-EXT-IPS-MAC:mac_addr": port["mac"],
            }
        )
        for fip in fips:
            entries.append(
                {
                    "version": 4,
                    "addr": fip["address"],
                    "OS-EXT-IPS:type": "floating",
                    "OS-EXT-IPS-MAC:mac_addr": port["mac"],
                }
            )
    return out


def _check_mtu(mtu: Any) -> int:
    if mtu is None:
        return 1500
    if isinstance(mtu, bool) or not isinstance(mtu, int | str) or not str(mtu).isdigit() or not 68 <= int(mtu) <= 9216:
        raise HTTPError(400, f"Invalid input for mtu. Reason: '{mtu}' is not an integer between 68 and 9216.",
                        "HTTPBadRequest")
    return int(mtu)


def create_network(db, site: Site, spec: dict) -> dict:
    for key in ("name", "description"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise HTTPError(400, f"Invalid input for {key}. Reason: '{spec[key]}' is not a valid string.",
                            "HTTPBadRequest")
    net = stamp({
        "id": new_id(),
        "name": spec.get("name") or "",
        "description": spec.get("description") or "",
        "tags": check_tags(spec.get("tags")),
        "admin_state_up": spec.get("admin_state_up", True),
        "port_security_enabled": bool(spec.get("port_security_enabled", True)),
        "mtu": _check_mtu(spec.get("mtu")),
        "revision": 0,
    })
    return db.put("network", site.name, net)


def network_ports(db, site: Site, network_id: str) -> list[dict]:
    return db.find("port", site.name, network_id=network_id)


def network_subnets(db, site: Site, network_id: str) -> list[dict]:
    return db.find("subnet", site.name, network_id=network_id)


def subnet_ports(db, site: Site, subnet_id: str) -> list[dict]:
    return db.find("port", site.name, subnet_id=subnet_id)


def default_pools(net: ipaddress.IPv4Network, gateway: str | None) -> list[dict]:
    hosts = [h for h in net.hosts() if str(h) != gateway]
    if not hosts:
        return []
    # Split around the gateway when it sits inside the host range.
    pools, start, prev = [], hosts[0], hosts[0]
    for h in hosts[1:]:
        if int(h) != int(prev) + 1:
            pools.append({"start": str(start), "end": str(prev)})
            start = h
        prev = h
    pools.append({"start": str(start), "end": str(prev)})
    return pools


def in_pools(address: str, pools: list[dict]) -> bool:
    a = ipaddress.ip_address(address)
    return any(ipaddress.ip_address(p["start"]) <= a <= ipaddress.ip_address(p["end"]) for p in pools)


def allocate_ip(db, site: Site, subnet: dict, requested: str | None = None) -> str:
    """A fixed address on a project subnet: `requested` (anywhere in the cidr) or the next free pool address."""
    net = ipaddress.ip_network(subnet["cidr"])
    used = {p["fixed_ip"] for p in subnet_ports(db, site, subnet["id"])}
    if requested:
        try:
            addr = ipaddress.ip_address(requested)
        except ValueError:
            raise HTTPError(
                400, f"Invalid input for ip_address. Reason: '{requested}' is not a valid IP address.",
                "HTTPBadRequest") from None
        if addr not in net or addr in (net.network_address, net.broadcast_address):
            raise HTTPError(
                400, f"IP address {requested} is not a valid IP for the specified subnet.", "InvalidIpForSubnet")
        if requested in used or (requested == subnet.get("gateway_ip")):
            raise HTTPError(
                409, f"IP address {requested} already allocated in subnet {subnet['id']}",
                "IpAddressAlreadyAllocated")
        return requested
    for pool in subnet.get("allocation_pools") or []:
        a, b = int(ipaddress.ip_address(pool["start"])), int(ipaddress.ip_address(pool["end"]))
        for n in range(a, b + 1):
            text = str(ipaddress.ip_address(n))
            if text not in used and text != subnet.get("gateway_ip"):
                return text
    raise HTTPError(
        409, f"No more IP addresses available on network {subnet['network_id']}.", "IpAddressGenerationFailure")


def new_port(
    db,
    site: Site,
    *,
    network_id: str,
    subnet_id: str,
    fixed_ip: str,
    name: str = "",
    description: str = "",
    device_id: str = "",
    device_owner: str = "",
    sg_ids: list[str] | None = None,
    port_security: bool = True,
    preserve: bool = True,
    tags: list | None = None,
) -> dict:
    now = time.time()
    port_id = new_id()
    port = {
        "id": port_id,
        "name": name,
        "network_id": network_id,
        "device_id": device_id,
        "device_owner": device_owner,
        "mac": catalog.mac_for(port_id),
        "subnet_id": subnet_id,
        "fixed_ip": fixed_ip,
        "security_groups": list(sg_ids or []),
        "port_security": port_security,
        "preserve": preserve,  # made through POST /ports: Nova unbinds it on server delete, never deletes it
        "created": now,
        "updated": now,
        "bound_at": now if device_id else None,
        "revision": 1,
        "tags": list(tags or []),
        "description": description,
    }
    return db.put("port", site.name, port)


def unbind_port(db, site: Site, port: dict) -> None:
    for fip in db.find("fip", site.name, port_id=port["id"]):
        associate_fip(db, site, fip, None)
    port.update(device_id="", device_owner="", bound_at=None)
    db.put("port", site.name, stamp(port))


def delete_port(db, site: Site, port: dict) -> None:
    for fip in db.find("fip", site.name, port_id=port["id"]):
        associate_fip(db, site, fip, None)
    db.delete("port", site.name, port["id"])


def router_ports(db, site: Site, router_id: str) -> list[dict]:
    return [
        p for p in db.find("port", site.name, device_id=router_id)
        if p["device_owner"] == "network:router_interface"
    ]


# The table each quota counts (floating IPs: `fips_used`, reserved ones are not the project's).
QUOTA_TABLES = {"network": "network", "port": "port", "router": "router", "subnet": "subnet",
                "security_group": "secgroup", "security_group_rule": "sgrule"}


def quota_used(db, site: Site, resource: str) -> int:
    return fips_used(db, site) if resource == "floatingip" else db.count(QUOTA_TABLES[resource], site.name)


def check_quota(db, site: Site, resource: str) -> None:
    """Neutron's refusal of one more `resource` past the project's quota."""
    if quota_used(db, site, resource) >= quota(db, site, resource):
        raise HTTPError(409, f"Quota exceeded for resources: ['{resource}'].", "OverQuota")


def fips_used(db, site: Site) -> int:
    return sum(1 for f in db.find("fip", site.name) if not f.get("reservation_id"))


def public_subnets(db, site: Site) -> int:
    """How many /24 subnets the site's public network has (`World.set_public_subnets`; one by default)."""
    return int(db.setting(site.name, "public_subnets", "1"))


def free_fip_numbers(db, site: Site) -> list[int]:
    used = {f["n"] for f in db.find("fip", site.name)}
    return [n for n in catalog.fip_numbers(public_subnets(db, site)) if n not in used]


def allocate_fip(
    db,
    site: Site,
    *,
    description: str = "",
    tags: list | None = None,
    reservation_id: str | None = None,
    address: str | None = None,
    counted: bool = True,
) -> dict:
    """A floating IP of the public network; `counted` False for one Blazar reserved (not in the project's quota)."""
    net_id = catalog.public_net_id(site)
    if counted:
        check_quota(db, site, "floatingip")
    free = free_fip_numbers(db, site)
    if address:
        n = catalog.floating_ip_number(site, address)
        if n is None or (subnet := catalog.fip_subnet(n)) >= public_subnets(db, site):
            raise HTTPError(
                400,
                f"IP address {address} is not a valid IP for the specified subnet.",
                "InvalidIpForNetwork",
            )
        if n not in free:
            raise HTTPError(
                409,
                f"IP address {address} already allocated in subnet {catalog.public_subnet_id(site, subnet)}",
                "IpAddressAlreadyAllocated",
            )
    else:
        if not free:
            raise HTTPError(
                409, f"No more IP addresses available on network {net_id}.", "IpAddressGenerationFailure"
            )
        # Hand out addresses round-robin, so a freed address is not reused at once (host keys!).
        start = int(db.meta(f"fip_next:{site.name}", str(catalog.FIP_FIRST)))
        n = next((x for x in free if x >= start), free[0])
        db.set_meta(f"fip_next:{site.name}", n + 1)
    now = time.time()
    fip = {
        "id": new_id(),
        "name": catalog.floating_ip(site, n),
        "address": catalog.floating_ip(site, n),
        "n": n,
        "network_id": net_id,
        "port_id": None,
        "fixed_ip": None,
        "router_id": None,
        "status": "DOWN",
        "description": description or "",
        "tags": list(tags or []),
        "reservation_id": reservation_id,
        "created": now,
        "updated": now,
        "revision": 0,
    }
    return db.put("fip", site.name, fip)


def associate_fip(db, site: Site, fip: dict, port_id: str | None, fixed_ip: str | None = None) -> dict:
    if port_id is None:
        fip.update(port_id=None, fixed_ip=None, router_id=None, status="DOWN")
    else:
        port = db.get("port", site.name, port_id)
        if not port:
            raise HTTPError(404, f"Port {port_id} could not be found.", "PortNotFound")
        if fixed_ip and fixed_ip != port["fixed_ip"]:
            raise HTTPError(400, f"Port {port_id} does not have fixed ip {fixed_ip}.", "BadRequest")
        for other in db.find("fip", site.name):
            if other["id"] != fip["id"] and other.get("port_id") == port_id:
                raise HTTPError(
                    409,
                    f"Cannot associate floating IP {fip['address']} ({fip['id']}) with port {port_id} using "
                    f"fixed IP {port['fixed_ip']}, as that fixed IP already has a floating IP on external "
                    f"network {fip['network_id']}.",
                    "FloatingIPPortAlreadyAssociated",
                )
        fip.update(
            port_id=port_id, fixed_ip=port["fixed_ip"], router_id=catalog.router_id(site), status="ACTIVE"
        )
    return db.put("fip", site.name, stamp(fip))
