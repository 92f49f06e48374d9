"""Keypairs and servers: a server's status, scheduling on reserved hosts or flavor slots, deletion."""

from __future__ import annotations

import hashlib

from labctl.testbed.errors import HTTPError
from labctl.testbed.openstack.catalog import PROJECT_ID, Site
from labctl.testbed.openstack.model.base import NO_VALID_HOST, quota
from labctl.testbed.openstack.model.leases import (
    find_reservation,
    flavors_by_id,
    get_flavor,
    lease_status,
    site_hosts,
)
from labctl.testbed.openstack.model.network import delete_port, server_ports, unbind_port
from labctl.testbed.openstack.model.volumes import detach_volume


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


def server_status(server: dict, now: float) -> str:
    if server.get("fault"):
        return "BUILD" if now < server["error_at"] else "ERROR"
    return "BUILD" if now < server["ready_at"] else "ACTIVE"


def schedule(db, site: Site, server: dict, now: float) -> str | None:
    """Pick a host for a new server; returns None (host set on `server`) or the fault message."""
    if site.kind == "baremetal":
        servers = [s for s in db.find("server", site.name) if not s.get("fault")]
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
        on_flavor = db.find("server", site.name, flavor_id=flavor["id"])  # the reservation's own flavor
        if sum(1 for s in on_flavor if not s.get("fault")) >= int(r["amount"]):
            return NO_VALID_HOST
        k = db.counter(f"kvm_host:{site.name}")
        server["host"] = f"kvm-{k % 40 + 1:03d}"
        server["hypervisor_hostname"] = f"kvm-{k % 40 + 1:03d}.tacc.chameleoncloud.org"
        return None
    return NO_VALID_HOST


def compute_usage(db, site: Site) -> dict[str, int]:
    """What the project's servers and key pairs use of Nova's quotas at `site`."""
    servers = db.find("server", site.name)
    flavors = flavors_by_id(db, site, {s["flavor_id"] for s in servers})
    return {"instances": len(servers), "cores": sum(flavors.get(s["flavor_id"], {}).get("vcpus", 0) for s in servers),
            "ram": sum(flavors.get(s["flavor_id"], {}).get("ram", 0) for s in servers),
            "key_pairs": db.count("keypair", site.name)}


def check_server_quota(db, site: Site) -> None:
    """Nova's refusal of one more server past the project's instances (403). Cores and RAM are reported, not
    refused: their figures here are not a real site's, and a bare-metal node's flavor counts 48 cores and
    192 GiB."""
    used, allowed = db.count("server", site.name), quota(db, site, "instances")
    if used + 1 > allowed:
        raise HTTPError(403, f"Quota exceeded for instances: Requested 1, but already used {used} of {allowed} "
                             "instances", "Forbidden")


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
