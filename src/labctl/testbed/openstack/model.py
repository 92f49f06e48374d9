"""The emulated cloud's behaviour, shared by the API modules: lifecycles, capacity, addresses, cascades.

Functions here take an open world transaction (`Db`), a `Site` and the current time. Lifecycle states are
computed from timestamps stored at creation (already multiplied by the time scale), so every process agrees
on them whatever its own time scale.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from labctl.testbed.errors import HTTPError
from labctl.testbed.openstack import catalog
from labctl.testbed.openstack.catalog import PROJECT_ID, SITES, USER_ID, Site

LEASE_START_DELAY = 30.0  # seconds from a lease's start date to ACTIVE (× time scale)
BOOT_SECONDS = {"baremetal": 600.0, "kvm": 60.0}  # BUILD → ACTIVE (× time scale)
SCHEDULE_SECONDS = 5.0  # BUILD → ERROR when scheduling fails (× time scale)
BEFORE_END_MINUTES = 60
FIP_QUOTA = 50
VOLUME_CREATE_SECONDS = 5.0  # creating -> available (× time scale)
VOLUME_DELETE_SECONDS = 2.0  # deleting -> gone (× time scale)
VOLUME_QUOTA_GB = 1000
VOLUME_TYPE_ID = "7f3a1c2e-5b4d-4e6f-8a9b-0c1d2e3f4a5b"
NO_VALID_HOST = "No valid host was found. There are not enough hosts available."
BLAZAR_DT = "%Y-%m-%dT%H:%M:%S.%f"
BLAZAR_CREATED = "%Y-%m-%d %H:%M:%S"


def new_id() -> str:
    return str(uuid.uuid4())


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def iso_z(ts: float | None) -> str | None:
    return None if ts is None else _dt(ts).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_us(ts: float | None) -> str | None:
    return None if ts is None else _dt(ts).strftime("%Y-%m-%dT%H:%M:%S.%f")


def blazar_dt(ts: float | None) -> str | None:
    return None if ts is None else _dt(ts).strftime(BLAZAR_DT)


def blazar_created(ts: float | None) -> str | None:
    return None if ts is None else _dt(ts).strftime(BLAZAR_CREATED)


def site_of(name: str) -> Site:
    return SITES[name]


# ====================================================================== seeding


def seed(db) -> None:
    """Objects every fresh world has: each site's `default` security group."""
    for site in SITES.values():
        if site.kind != "edge":
            create_security_group(db, site, "default", "Default security group", default=True)


# ====================================================================== security groups


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
    named = [g for g in db.find("secgroup", site.name) if g["name"] == ref]
    return named[0] if len(named) == 1 else None


def security_group_in_use(db, site: Site, sg_id: str) -> bool:
    return any(sg_id in p.get("security_groups", []) for p in db.find("port", site.name))


# ====================================================================== keypairs


def fingerprint(public_key: str) -> str:
    import base64
    import binascii

    parts = public_key.strip().split()
    if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise ValueError("not an OpenSSH public key")
    try:
        blob = base64.b64decode(parts[1].encode(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("bad key data") from None
    digest = hashlib.md5(blob).hexdigest()  # noqa: S324 - Nova's keypair fingerprint is MD5
    return ":".join(digest[i : i + 2] for i in range(0, 32, 2))


# ====================================================================== ports and addresses


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
    return _attach_order(db.find("port", site.name, device_id=server_id))


def _attach_order(ports: list[dict]) -> list[dict]:
    return sorted(ports, key=lambda p: (p.get("bound_at") or p.get("created", 0)))


def network_name(site: Site, network_id: str, db=None) -> str:
    if network_id == catalog.public_net_id(site):
        return "public"
    if network_id == catalog.shared_net_id(site) or db is None:
        return "sharednet1"
    net = db.get("network", site.name, network_id)
    return net["name"] if net else network_id


def server_addresses(db, site: Site, server: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for port in server_ports(db, site, server["id"]):
        fips = db.find("fip", site.name, port_id=port["id"])  # in SQLite: a server list renders every server
        entries = out.setdefault(network_name(site, port["network_id"], db) or port["network_id"], [])
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


# ====================================================================== project networks, subnets, routers
# Objects made through the API (kinds "network", "subnet", "router"); the site's public and sharednet1
# networks, their subnets and router are built in (see neutron.py) and cannot be changed.


def stamp(obj: dict) -> dict:
    now = time.time()
    obj.setdefault("created", now)
    obj["updated"] = now
    obj["revision"] = obj.get("revision", 0) + 1
    return obj


def check_tags(tags: Any) -> list[str]:
    if tags is None:
        return []
    if not isinstance(tags, list) or not all(isinstance(t, str) and 0 < len(t) <= 255 for t in tags):
        raise HTTPError(400, f"Invalid input for tags. Reason: '{tags}' is not a list of strings of 1 to 255 "
                        "characters.", "HTTPBadRequest")
    return list(tags)


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
    return [p for p in db.find("port", site.name) if p["network_id"] == network_id]


def network_subnets(db, site: Site, network_id: str) -> list[dict]:
    return [s for s in db.find("subnet", site.name) if s["network_id"] == network_id]


def subnet_ports(db, site: Site, subnet_id: str) -> list[dict]:
    return [p for p in db.find("port", site.name) if p.get("subnet_id") == subnet_id]


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
    for fip in db.find("fip", site.name):
        if fip.get("port_id") == port["id"]:
            associate_fip(db, site, fip, None)
    port.update(device_id="", device_owner="", bound_at=None, updated=time.time())
    port["revision"] = port.get("revision", 0) + 1
    db.put("port", site.name, port)


def delete_port(db, site: Site, port: dict) -> None:
    for fip in db.find("fip", site.name):
        if fip.get("port_id") == port["id"]:
            associate_fip(db, site, fip, None)
    db.delete("port", site.name, port["id"])


def router_ports(db, site: Site, router_id: str) -> list[dict]:
    return [
        p for p in db.find("port", site.name)
        if p["device_id"] == router_id and p["device_owner"] == "network:router_interface"
    ]


# ====================================================================== floating IPs


def fip_quota(db, site: Site) -> int:
    return int(db.setting(site.name, "quota:floatingip", str(FIP_QUOTA)))


def fips_used(db, site: Site) -> int:
    return sum(1 for f in db.find("fip", site.name) if not f.get("reservation_id"))


def _free_fip_octets(db, site: Site) -> list[int]:
    used = {f["n"] for f in db.find("fip", site.name)}
    return [n for n in range(catalog.FIP_FIRST, catalog.FIP_LAST + 1) if n not in used]


def allocate_fip(
    db,
    site: Site,
    *,
    description: str = "",
    tags: list | None = None,
    reservation_id: str | None = None,
    address: str | None = None,
    quota: bool = True,
) -> dict:
    net_id = catalog.public_net_id(site)
    if quota and fips_used(db, site) >= fip_quota(db, site):
        raise HTTPError(409, "Quota exceeded for resources: ['floatingip'].", "OverQuota")
    free = _free_fip_octets(db, site)
    if address:
        prefix = f"127.10.{site.number}."
        n = (
            int(address[len(prefix) :])
            if address.startswith(prefix) and address[len(prefix) :].isdigit()
            else -1
        )
        if not catalog.FIP_FIRST <= n <= catalog.FIP_LAST:
            raise HTTPError(
                400,
                f"IP address {address} is not a valid IP for the specified subnet.",
                "InvalidIpForNetwork",
            )
        if n not in free:
            raise HTTPError(
                409,
                f"IP address {address} already allocated in subnet {catalog.public_subnet_id(site)}",
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
    fip["updated"] = time.time()
    fip["revision"] = fip.get("revision", 0) + 1
    return db.put("fip", site.name, fip)


# ====================================================================== flavors


def flavor_slots(db, site: Site, flavor_name: str) -> int:
    override = db.setting(site.name, f"slots:{flavor_name}")
    if override is not None:
        return int(override)
    spec = next((f for f in catalog.flavors(site) if f.name == flavor_name), None)
    return spec.slots if spec else 0


def all_flavors(db, site: Site) -> list[dict]:
    """Public flavors of the site plus the private `reservation:<id>` flavors Blazar made."""
    out = [
        {
            "id": f.id,
            "name": f.name,
            "vcpus": f.vcpus,
            "ram": f.ram,
            "disk": f.disk,
            "extra_specs": dict(f.extra_specs),
            "is_public": True,
            "created": 0.0,
        }
        for f in catalog.flavors(site)
    ]
    out += db.find("flavor", site.name)
    return out


def get_flavor(db, site: Site, ref: str) -> dict | None:
    for f in all_flavors(db, site):
        if f["id"] == ref:
            return f
    return None


# ====================================================================== hosts and capacity


def site_hosts(db, site: Site) -> list[catalog.Host]:
    overrides = {k: int(v) for k, v in db.settings(site.name, "hosts:").items()}
    return catalog.hosts(site, overrides)


def _overlaps(lease: dict, start: float, end: float) -> bool:
    return lease["start"] < end and start < lease["end"]


def busy_hosts(db, site: Site, start: float, end: float, exclude_lease: str | None = None) -> set[str]:
    busy: set[str] = set()
    for lease in db.find("lease", site.name):
        if lease["id"] == exclude_lease or not _overlaps(lease, start, end):
            continue
        for r in lease["reservations"]:
            busy.update(r.get("hosts", []))
    return busy


def used_flavor_slots(
    db, site: Site, flavor_name: str, start: float, end: float, exclude_lease: str | None = None
) -> int:
    used = 0
    for lease in db.find("lease", site.name):
        if lease["id"] == exclude_lease or not _overlaps(lease, start, end):
            continue
        for r in lease["reservations"]:
            if r["resource_type"] == "flavor:instance" and r.get("source_flavor_name") == flavor_name:
                used += int(r["amount"])
    return used


_OPS = ("==", "=", "!=", "<", "<=", ">", ">=")


def parse_requirements(text) -> list | None:
    """Blazar's resource_properties/hypervisor_properties: a JSON string (or list); '' means none."""
    if text in (None, "", [], "[]"):
        return None
    try:
        expr = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        raise HTTPError(400, f"Malformed requirements {text}", "MalformedRequirements") from None
    if not isinstance(expr, list):
        raise HTTPError(400, f"Malformed requirements {text}", "MalformedRequirements")
    _check_expr(expr, text)
    return expr or None


def _check_expr(expr: list, text) -> None:
    if not expr:
        return
    if expr[0] in ("and", "or"):
        for sub in expr[1:]:
            if not isinstance(sub, list):
                raise HTTPError(400, f"Malformed requirements {text}", "MalformedRequirements")
            _check_expr(sub, text)
        return
    if len(expr) != 3 or expr[0] not in _OPS or not isinstance(expr[1], str) or not expr[1].startswith("$"):
        raise HTTPError(400, f"Malformed requirements {text}", "MalformedRequirements")


def _compare(op: str, have, want) -> bool:
    if isinstance(have, bool) or isinstance(want, bool) or str(want).lower() in ("true", "false"):
        have, want = str(have).lower(), str(want).lower()
    else:
        try:
            have, want = float(have), float(want)
        except (TypeError, ValueError):
            have, want = str(have), str(want)
    try:
        return {
            "==": have == want,
            "=": have == want,
            "!=": have != want,
            "<": have < want,
            "<=": have <= want,
            ">": have > want,
            ">=": have >= want,
        }[op]
    except TypeError:
        return False


def host_matches(expr: list | None, props: dict) -> bool:
    if not expr:
        return True
    if expr[0] == "and":
        return all(host_matches(e, props) for e in expr[1:])
    if expr[0] == "or":
        return any(host_matches(e, props) for e in expr[1:])
    op, key, want = expr
    key = key[1:]
    if key not in props:
        return False
    return _compare(op, props[key], want)


def not_enough_hosts() -> HTTPError:
    # Blazar raises NotEnoughHostsAvailable in the manager; the API renders the RPC error with the
    # exception's code as both error_code and error_name (blazar/api/v1/utils.py).
    return HTTPError(500, "Not enough hosts available", "NotEnoughHostsAvailable")


# ====================================================================== leases


def parse_lease_date(value, now: float, field: str) -> float:
    if value in (None, "now"):
        return now
    if not isinstance(value, str):
        raise HTTPError(400, f"{value} is an invalid date. Required format: %Y-%m-%d %H:%M", "InvalidDate")
    for fmt in (
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M:%S.%f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ):
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    raise HTTPError(400, f"{value} is an invalid date. Required format: %Y-%m-%d %H:%M", "InvalidDate")


def lease_status(lease: dict, now: float) -> str:
    if now < lease["active_at"]:
        return "PENDING"
    if lease.get("error"):
        return "ERROR"
    if now >= lease["end"]:
        return "TERMINATED"
    return "ACTIVE"


def reservation_status(lease: dict, now: float) -> str:
    return {"PENDING": "pending", "ACTIVE": "active", "ERROR": "error", "TERMINATED": "deleted"}[
        lease_status(lease, now)
    ]


def find_reservation(db, site: Site, reservation_id: str) -> tuple[dict, dict] | None:
    for lease in db.find("lease", site.name):
        for r in lease["reservations"]:
            if r["id"] == reservation_id:
                return lease, r
    return None


def _before_end(start: float, end: float) -> float:
    return max(start, end - BEFORE_END_MINUTES * 60)


def create_lease(db, site: Site, body: dict, now: float, scale: float, *, error: bool = False) -> dict:
    if not isinstance(body, dict) or not body.get("name"):
        raise HTTPError(400, "Missing parameter name", "MissingParameter")
    name = body["name"]
    if any(lease["name"] == name for lease in db.find("lease", site.name)):
        raise HTTPError(409, f"The lease with name: {name} already exists", "LeaseNameAlreadyExists")
    start = parse_lease_date(body.get("start_date", "now"), now, "start_date")
    if "end_date" not in body:
        raise HTTPError(400, "Missing parameter end_date", "MissingParameter")
    end = parse_lease_date(body.get("end_date"), now, "end_date")
    if body.get("start_date", "now") != "now" and start < now - 60:
        raise HTTPError(400, "Start date must be later than current date", "InvalidInput")
    if end <= start:
        raise HTTPError(400, "End date must be later than start date.", "InvalidInput")
    before_end = (
        parse_lease_date(body["before_end_date"], now, "before_end_date")
        if body.get("before_end_date")
        else _before_end(start, end)
    )
    lease_id = new_id()
    reservations = []
    claimed: set[str] = set()
    requested = body.get("reservations") or []
    if not isinstance(requested, list) or not all(isinstance(r, dict) for r in requested):
        raise HTTPError(400, "Malformed parameter reservations", "MalformedParameter")
    for req in requested:
        reservations.append(_reserve(db, site, lease_id, req, start, end, claimed))
    active_at = max(start, now) + LEASE_START_DELAY * scale
    lease = {
        "id": lease_id,
        "name": name,
        "site": site.name,
        "project_id": PROJECT_ID,
        "user_id": USER_ID,
        "created": now,
        "updated": None,
        "start": start,
        "end": end,
        "active_at": active_at,
        "before_end": before_end,
        "error": bool(error),
        "reservations": reservations,
        "events": {e: new_id() for e in ("start_lease", "before_end_lease", "end_lease")},
        "trust_id": uuid.uuid4().hex,
        "phase": "pending",
        "t_next": active_at,
    }
    for r in reservations:
        if r["resource_type"] == "flavor:instance":
            _create_reserved_flavor(db, site, lease, r, now)
    return db.put("lease", site.name, lease)


def _reserve(db, site: Site, lease_id: str, req: dict, start: float, end: float, claimed: set[str]) -> dict:
    rtype = req.get("resource_type")
    base = {
        "id": new_id(),
        "lease_id": lease_id,
        "resource_id": new_id(),
        "resource_type": rtype,
        "created": time.time(),
    }
    if rtype == "physical:host" and site.kind == "baremetal":
        try:
            lo, hi = int(req.get("min", 1)), int(req.get("max", req.get("min", 1)))
        except (TypeError, ValueError):
            raise HTTPError(400, "Malformed parameter min/max", "MalformedParameter") from None
        if lo < 1 or hi < lo:
            raise HTTPError(
                400,
                "Invalid values for min/max of hosts. Max must be equal to or larger than min.",
                "InvalidRange",
            )
        props = req.get("resource_properties", "")
        expr = parse_requirements(props)
        parse_requirements(req.get("hypervisor_properties", ""))
        busy = busy_hosts(db, site, start, end) | claimed
        free = [h for h in site_hosts(db, site) if h.id not in busy and host_matches(expr, h.properties())]
        if len(free) < lo:
            raise not_enough_hosts()
        chosen = [h.id for h in free[:hi]]
        claimed.update(chosen)
        props_text = props if isinstance(props, str) else json.dumps(props)
        return {
            **base,
            "min": lo,
            "max": hi,
            "resource_properties": props_text,
            "hypervisor_properties": req.get("hypervisor_properties", "") or "",
            "before_end": req.get("before_end", "default"),
            "on_start": req.get("on_start", "default"),
            "on_end": req.get("on_end", "default"),
            "hosts": chosen,
        }
    if rtype == "flavor:instance" and site.kind == "kvm":
        try:
            amount = int(req.get("amount", 1))
        except (TypeError, ValueError):
            raise HTTPError(400, "Malformed parameter amount", "MalformedParameter") from None
        if amount < 1:
            raise HTTPError(400, "Malformed parameter amount", "MalformedParameter")
        if not req.get("flavor_id"):
            raise HTTPError(400, "Missing parameter flavor_id", "MissingParameter")
        source = next((f for f in catalog.flavors(site) if req["flavor_id"] in (f.id, f.name)), None)
        if source is None:
            raise HTTPError(404, f"Flavor {req['flavor_id']} could not be found.", "NotFound")
        slots = flavor_slots(db, site, source.name)
        if used_flavor_slots(db, site, source.name, start, end) + amount > slots:
            raise not_enough_hosts()
        return {
            **base,
            "amount": amount,
            "affinity": req.get("affinity"),
            "source_flavor_id": source.id,
            "source_flavor_name": source.name,
            "vcpus": source.vcpus,
            "memory_mb": source.ram,
            "disk_gb": source.disk,
            "flavor_id": base["id"],
            "resource_properties": json.dumps(
                {
                    "id": source.id,
                    "name": source.name,
                    "vcpus": source.vcpus,
                    "ram": source.ram,
                    "disk": source.disk,
                    "OS-FLV-EXT-DATA:ephemeral": 0,
                    "extra_specs": source.extra_specs,
                }
            ),
            "aggregate_id": db.counter(f"aggregate:{site.name}", 10),
        }
    if rtype == "virtual:floatingip" and site.kind in ("baremetal", "kvm"):
        try:
            amount = int(req.get("amount", 1))
        except (TypeError, ValueError):
            raise HTTPError(400, "Malformed parameter amount", "MalformedParameter") from None
        if req.get("network_id") != catalog.public_net_id(site):
            raise HTTPError(
                400,
                f"Network {req.get('network_id')} is not a public network with floating IPs",
                "InvalidInput",
            )
        pending = sum(
            int(r.get("amount", 0))
            for lease in db.find("lease", site.name)
            if lease["phase"] == "pending" and _overlaps(lease, start, end)
            for r in lease["reservations"]
            if r["resource_type"] == "virtual:floatingip"
        )
        if amount < 1 or amount + pending > len(_free_fip_octets(db, site)):
            raise HTTPError(400, "Not enough floating IPs available", "NotEnoughFloatingIPAvailable")
        return {
            **base,
            "network_id": req["network_id"],
            "amount": amount,
            "required_floatingips": req.get("required_floatingips", []),
        }
    raise HTTPError(500, f"The {rtype} resource type is not supported", "UnsupportedResourceType")


def _create_reserved_flavor(db, site: Site, lease: dict, r: dict, now: float) -> None:
    source = get_flavor(db, site, r["source_flavor_id"])
    rid = r["id"]
    specs = dict(source["extra_specs"])
    specs["aggregate_instance_extra_specs:reservation"] = rid
    specs["resources:CUSTOM_RESERVATION_" + rid.upper().replace("-", "_")] = "1"
    db.put(
        "flavor",
        site.name,
        {
            "id": rid,
            "name": f"reservation:{rid}",
            "vcpus": source["vcpus"],
            "ram": source["ram"],
            "disk": source["disk"],
            "extra_specs": specs,
            "is_public": False,
            "lease_id": lease["id"],
            "reservation_id": rid,
            "source_flavor_name": r["source_flavor_name"],
            "created": now,
        },
    )


def update_lease(db, site: Site, lease: dict, body: dict, now: float) -> dict:
    status = lease_status(lease, now)
    if status == "TERMINATED":
        raise HTTPError(400, "Cannot update a lease that has already ended", "InvalidInput")
    start, end = lease["start"], lease["end"]
    if body.get("name"):
        if any(x["name"] == body["name"] and x["id"] != lease["id"] for x in db.find("lease", site.name)):
            raise HTTPError(
                409, f"The lease with name: {body['name']} already exists", "LeaseNameAlreadyExists"
            )
        lease["name"] = body["name"]
    if body.get("start_date"):
        new_start = parse_lease_date(body["start_date"], now, "start_date")
        if new_start != start:
            if status != "PENDING":
                raise HTTPError(400, "Cannot modify the start date of already started leases", "InvalidInput")
            if new_start < now - 60:
                raise HTTPError(400, "Start date must be later than current date", "InvalidInput")
            start = new_start
    for key, sign in (("defer_by", 1), ("advance_by", -1)):
        if body.get(key):
            if status != "PENDING":
                raise HTTPError(400, "Cannot modify the start date of already started leases", "InvalidInput")
            start += sign * _elapsed(body[key])
    if body.get("end_date"):
        end = parse_lease_date(body["end_date"], now, "end_date")
    if body.get("prolong_for"):
        end += _elapsed(body["prolong_for"])
    if body.get("reduce_by"):
        end -= _elapsed(body["reduce_by"])
    if end <= start or end <= now:
        raise HTTPError(400, "End date must be later than start date and current date.", "InvalidInput")
    # The hosts and slots the lease already holds must stay free over the new window.
    busy = busy_hosts(db, site, start, end, exclude_lease=lease["id"])
    for r in lease["reservations"]:
        if set(r.get("hosts", [])) & busy:
            raise not_enough_hosts()
        if r["resource_type"] == "flavor:instance":
            used = used_flavor_slots(db, site, r["source_flavor_name"], start, end, exclude_lease=lease["id"])
            if used + int(r["amount"]) > flavor_slots(db, site, r["source_flavor_name"]):
                raise not_enough_hosts()
    if start != lease["start"]:
        lease["active_at"] += start - lease["start"]
    lease.update(start=start, end=end, updated=now)
    if not body.get("before_end_date"):
        lease["before_end"] = _before_end(start, end)
    lease["t_next"] = lease["active_at"] if lease["phase"] == "pending" else end
    return db.put("lease", site.name, lease)


def _elapsed(text: str) -> float:
    """Blazar's "1h", "30m", "2d", "45s" (and "1w")."""
    text = str(text).strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        if text[-1].isdigit():
            return float(text) * 86400
        return float(text[:-1]) * units[text[-1].lower()]
    except (KeyError, ValueError, IndexError):
        raise HTTPError(400, f"Unsupported time format {text}", "InvalidInput") from None


def release_lease(db, site: Site, lease: dict) -> None:
    """What Blazar does at lease end (and on delete): servers, reserved FIPs and flavors go away."""
    rids = {r["id"] for r in lease["reservations"]}
    for server in db.find("server", site.name):
        if server.get("reservation_id") in rids or server.get("flavor_id") in rids:
            delete_server(db, site, server["id"])
    for fip in db.find("fip", site.name):
        if fip.get("reservation_id") in rids:
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
                                    quota=False,
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


def lease_view(lease: dict, now: float) -> dict:
    status = lease_status(lease, now)
    rstatus = reservation_status(lease, now)
    created = blazar_created(lease["created"])
    updated = blazar_created(lease["updated"]) if lease.get("updated") else None
    reservations = []
    for r in lease["reservations"]:
        view = {
            "id": r["id"],
            "lease_id": lease["id"],
            "resource_id": r["resource_id"],
            "resource_type": r["resource_type"],
            "status": rstatus,
            "missing_resources": False,
            "resources_changed": False,
            "created_at": created,
            "updated_at": updated,
        }
        if r["resource_type"] == "physical:host":
            view.update(
                min=r["min"],
                max=r["max"],
                resource_properties=r["resource_properties"],
                hypervisor_properties=r["hypervisor_properties"],
                before_end=r["before_end"],
                on_start=r["on_start"],
                on_end=r["on_end"],
            )
        elif r["resource_type"] == "flavor:instance":
            view.update(
                amount=r["amount"],
                affinity=r["affinity"],
                flavor_id=r["flavor_id"],
                vcpus=r["vcpus"],
                memory_mb=r["memory_mb"],
                disk_gb=r["disk_gb"],
                resource_properties=r["resource_properties"],
                aggregate_id=r["aggregate_id"],
                server_group_id=None,
            )
        elif r["resource_type"] == "virtual:floatingip":
            view.update(
                network_id=r["network_id"], amount=r["amount"], required_floatingips=r["required_floatingips"]
            )
        reservations.append(view)
    times = {
        "start_lease": lease["active_at"],
        "before_end_lease": lease["before_end"],
        "end_lease": lease["end"],
    }
    shown = {
        "start_lease": lease["start"],
        "before_end_lease": lease["before_end"],
        "end_lease": lease["end"],
    }
    events = []
    for etype, eid in lease["events"].items():
        done = now >= times[etype]
        estatus = "DONE" if done else "UNDONE"
        if etype == "start_lease" and done and lease.get("error"):
            estatus = "ERROR"
        if lease.get("error") and etype != "start_lease" and now >= lease["active_at"]:
            estatus = "UNDONE"
        events.append(
            {
                "id": eid,
                "lease_id": lease["id"],
                "event_type": etype,
                "time": blazar_dt(shown[etype]),
                "status": estatus,
                "created_at": created,
                "updated_at": updated,
            }
        )
    return {
        "id": lease["id"],
        "name": lease["name"],
        "start_date": blazar_dt(lease["start"]),
        "end_date": blazar_dt(lease["end"]),
        "status": status,
        "degraded": False,
        "user_id": lease["user_id"],
        "project_id": lease["project_id"],
        "trust_id": lease["trust_id"],
        "created_at": created,
        "updated_at": updated,
        "reservations": reservations,
        "events": events,
    }


# ====================================================================== servers


def server_status(server: dict, now: float) -> str:
    if server.get("fault"):
        return "BUILD" if now < server["error_at"] else "ERROR"
    return "BUILD" if now < server["ready_at"] else "ACTIVE"


def schedule(db, site: Site, server: dict, now: float) -> str | None:
    """Pick a host for a new server; returns None (host set on `server`) or the fault message."""
    servers = [s for s in db.find("server", site.name) if not s.get("fault")]
    if site.kind == "baremetal":
        rid = server.get("reservation_id")
        found = find_reservation(db, site, rid) if rid else None
        if not found:
            return NO_VALID_HOST
        lease, r = found
        if r["resource_type"] != "physical:host" or lease_status(lease, now) != "ACTIVE":
            return NO_VALID_HOST
        used = {s.get("host") for s in servers}
        free = [h for h in r["hosts"] if h not in used]
        if not free:
            return NO_VALID_HOST
        host = next((h for h in site_hosts(db, site) if h.id == free[0]), None)
        server["host"] = free[0]
        server["hypervisor_hostname"] = host.uid if host else free[0]
        return None
    if site.kind == "kvm":
        flavor = get_flavor(db, site, server["flavor_id"])
        if not flavor or not flavor.get("reservation_id"):
            return NO_VALID_HOST
        found = find_reservation(db, site, flavor["reservation_id"])
        if not found:
            return NO_VALID_HOST
        lease, r = found
        if lease_status(lease, now) != "ACTIVE":
            return NO_VALID_HOST
        if sum(1 for s in servers if s["flavor_id"] == flavor["id"]) >= int(r["amount"]):
            return NO_VALID_HOST
        k = db.counter(f"kvm_host:{site.name}")
        server["host"] = f"kvm-{k % 40 + 1:03d}"
        server["hypervisor_hostname"] = f"kvm-{k % 40 + 1:03d}.tacc.chameleoncloud.org"
        return None
    return NO_VALID_HOST


def delete_server(db, site: Site, server_id: str) -> bool:
    for vol in db.find("volume", site.name):  # Nova detaches the server's volumes, as on a real cloud
        if any(a["server_id"] == server_id for a in vol.get("attachments", [])):
            detach_volume(db, site, vol, server_id)
    for port in server_ports(db, site, server_id):
        if port.get("preserve"):
            unbind_port(db, site, port)  # a port passed in at boot outlives the server, as in Nova
        else:
            delete_port(db, site, port)
    return db.delete("server", site.name, server_id)


def host_id_for(server: dict) -> str:
    if not server.get("host"):
        return ""
    return hashlib.sha224(f"{PROJECT_ID}{server['host']}".encode()).hexdigest()


# ====================================================================== volumes (Cinder) and containers (Swift)


def volume_quota_gb(db, site: Site) -> int:
    return int(db.setting(site.name, "quota:gigabytes", str(VOLUME_QUOTA_GB)))


def volume_gb_used(db, site: Site) -> int:
    return sum(int(v["size"]) for v in db.find("volume", site.name) if v.get("gone_at") is None)


def volume_status(v: dict, now: float) -> str:
    if v.get("gone_at") is not None:
        return "deleting"
    if now < v["ready_at"]:
        return "creating"
    return "in-use" if v.get("attachments") else "available"


def create_volume(db, site: Site, name: str | None, size: int, metadata: dict, description: str | None,
                  now: float, scale: float) -> dict:
    return db.put("volume", site.name, {
        "id": new_id(), "name": name, "size": size, "metadata": dict(metadata), "description": description,
        "created": now, "updated": now, "ready_at": now + VOLUME_CREATE_SECONDS * scale, "attachments": [],
    })


def start_volume_delete(db, site: Site, v: dict, now: float, scale: float) -> None:
    v["gone_at"] = now + VOLUME_DELETE_SECONDS * scale
    v["t_next"] = v["gone_at"]
    v["updated"] = now
    db.put("volume", site.name, v)


def attachment_view(v: dict, a: dict) -> dict:
    """One entry of a Cinder volume's `attachments`."""
    return {"id": v["id"], "attachment_id": a["attachment_id"], "volume_id": v["id"], "server_id": a["server_id"],
            "host_name": None, "device": a["device"], "attached_at": iso_us(a["attached_at"])}


def next_device(db, site: Site, server_id: str) -> str:
    used = {a["device"] for v in db.find("volume", site.name) for a in v.get("attachments", [])
            if a["server_id"] == server_id}
    for letter in "bcdefghijklmnopqrstuvwxyz":
        if f"/dev/vd{letter}" not in used:
            return f"/dev/vd{letter}"
    raise HTTPError(400, f"No free disk device names for instance {server_id}", "BadRequest")


def attach_volume(db, site: Site, v: dict, server_id: str, now: float) -> dict:
    a = {"server_id": server_id, "device": next_device(db, site, server_id), "attachment_id": new_id(),
         "bdm_uuid": new_id(), "attached_at": now}
    v.setdefault("attachments", []).append(a)
    v["updated"] = now
    db.put("volume", site.name, v)
    return a


def detach_volume(db, site: Site, v: dict, server_id: str) -> None:
    v["attachments"] = [a for a in v.get("attachments", []) if a["server_id"] != server_id]
    v["updated"] = time.time()
    db.put("volume", site.name, v)


def container_bytes(c: dict) -> int:
    return sum(int(o["bytes"]) for o in c.get("objects", {}).values())


# ====================================================================== views for the control API


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
        for s in db.find("server", site.name):
            inv["servers"].append(
                {
                    "id": s["id"],
                    "name": s["name"],
                    "site": site.name,
                    "status": server_status(s, now),
                    "metadata": s.get("metadata", {}),
                    "key_name": s.get("key_name"),
                    "addresses": server_addresses(db, site, s),
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


def ssh_targets(db, now: float) -> list[dict]:
    out = []
    for site in SITES.values():
        # One read of each kind, grouped here: this runs every poll of the SSH side, for every server.
        fip_of_port: dict[str, str] = {}
        for f in db.find("fip", site.name):
            if f.get("port_id"):
                fip_of_port.setdefault(f["port_id"], f["address"])
        ports_of: dict[str, list[dict]] = {}
        for p in db.find("port", site.name):
            ports_of.setdefault(p["device_id"], []).append(p)
        for s in db.find("server", site.name):
            if server_status(s, now) != "ACTIVE":
                continue
            sports = _attach_order(ports_of.get(s["id"], []))
            # No floating IP: still listed (address None), reachable only from a node on one of its networks.
            addr = next((fip_of_port[p["id"]] for p in sports if p["id"] in fip_of_port), None)
            keys = [s["key_data"].strip()] if s.get("key_data") else []
            out.append(
                {
                    "server_id": s["id"],
                    "site": site.name,
                    "name": s["name"],
                    "address": addr,
                    "authorized_keys": keys,
                    "fixed_ips": {p["network_id"]: p["fixed_ip"] for p in sports if p.get("fixed_ip")},
                }
            )
    return out
