"""Ingress rules of the emulated clouds, as the emulated SSH side (`labctl.testbed.sshd`) applies them.

Each world answers `ingress_allowed(target, port, peer)` for one of its SSH targets by calling the function of
its cloud here, with one read of its own state per connection:

- Chameleon (`openstack_allows`): at a site with security groups (KVM@TACC) the groups of the server's port
  decide -- the port holding the floating IP for a connection from outside, the port on the shared network for
  one from another node. The `default` group allows ingress only from its own members. A port with port
  security off is open. Bare-metal sites (CHI@TACC, CHI@UC) do not apply security groups: open.
- EC2 (`aws_allows`): the inbound rules of the instance's security groups (moto's `DescribeSecurityGroups`); a
  VPC's `default` group without rules allows its own members, as EC2's does (moto does not store that rule).
- Compute Engine (`gce_allows`): the ingress firewall rules of the instance's network whose `targetTags` match
  its tags (or that have none), by priority, deny winning a tie; nothing matching = the implied deny. The
  `default` network also has the pre-populated rules (default-allow-internal, -ssh, -rdp, -icmp).

`peer` is where the connection comes from: the client's address (127.0.0.1, outside the cloud), or a node of
the same cloud (a jump host forwarding to a fixed IP) with its fixed IP on the network both share.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    """The source of a connection: `ip`, and for node-to-node traffic the sending node's SSH target and the
    network (id or link, as in the targets' `fixed_ips`) both nodes are on."""

    ip: str
    target: dict | None = None
    network: str | None = None


def _in(ip: str, prefix: str | None) -> bool:
    if not prefix:
        return False
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(prefix, strict=False)
    except ValueError:
        return False


def _ports_match(port: int, spec: str) -> bool:
    lo, _, hi = str(spec).partition("-")
    try:
        return int(lo) <= port <= int(hi or lo)
    except ValueError:
        return False


# ------------------------------------------------------------------------------------ Chameleon
def openstack_allows(world, target: dict, port: int, peer: Peer) -> bool:
    from labctl.testbed.openstack.catalog import resolve_site

    try:
        site = resolve_site(str(target.get("site")))
    except KeyError:
        return True
    if site.kind != "kvm":
        return True  # bare metal (and CHI@Edge): security groups are not applied
    devices = [str(target["server_id"]), str((peer.target or {}).get("server_id", ""))]
    sql = (
        "SELECT kind, data FROM objects WHERE kind='port' AND site=:site "
        "  AND json_extract(data, '$.device_id') IN (:dst, :src) "
        "UNION ALL SELECT kind, data FROM objects WHERE kind='fip' AND site=:site "
        "  AND json_extract(data, '$.address')=:addr "
        "UNION ALL SELECT kind, data FROM objects WHERE kind='sgrule' AND site=:site "
        "  AND json_extract(data, '$.direction')='ingress'"
    )
    with world.read() as db:
        rows = db.conn.execute(sql, {"site": site.name, "dst": devices[0], "src": devices[1],
                                     "addr": str(target.get("address") or "")}).fetchall()
    ports, fips, rules = [], [], []
    for kind, data in rows:
        {"port": ports, "fip": fips, "sgrule": rules}[kind].append(json.loads(data))
    if peer.target is None:  # from outside: the port the floating IP is on
        port_ids = {f.get("port_id") for f in fips}
        dst = next((p for p in ports if p["id"] in port_ids and p.get("device_id") == devices[0]), None)
        src_groups: set[str] = set()
    else:
        dst = next((p for p in ports if p.get("device_id") == devices[0] and p.get("network_id") == peer.network),
                   None)
        src = next((p for p in ports if p.get("device_id") == devices[1] and p.get("network_id") == peer.network),
                   None)
        src_groups = set((src or {}).get("security_groups") or [])
    if dst is None:
        return False
    if not dst.get("port_security", True):
        return True
    groups = set(dst.get("security_groups") or [])
    for r in rules:
        if r.get("security_group_id") not in groups or r.get("ethertype", "IPv4") != "IPv4":
            continue
        if r.get("protocol") not in (None, "tcp"):
            continue
        lo, hi = r.get("port_range_min"), r.get("port_range_max")
        if lo is not None and not int(lo) <= port <= int(hi if hi is not None else lo):
            continue
        prefix, remote_group = r.get("remote_ip_prefix"), r.get("remote_group_id")
        if remote_group:
            if remote_group in src_groups:
                return True
        elif not prefix or _in(peer.ip, prefix):
            return True
    return False


# ------------------------------------------------------------------------------------ EC2
def aws_allows(world, target: dict, port: int, peer: Peer) -> bool:
    groups = list(target.get("security_groups") or [])
    if not groups:
        return False
    region = str(target.get("site", "")).removeprefix("aws:")
    described = world.client(region).describe_security_groups(GroupIds=groups)["SecurityGroups"]
    src_groups = set((peer.target or {}).get("security_groups") or [])
    for g in described:
        perms = list(g.get("IpPermissions") or [])
        if g.get("GroupName") == "default" and not perms:
            # A VPC's default group allows inbound traffic from its members; moto stores no such rule.
            perms = [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": g["GroupId"]}]}]
        for perm in perms:
            proto = str(perm.get("IpProtocol"))
            if proto not in ("-1", "tcp", "6"):
                continue
            if proto != "-1" and not int(perm.get("FromPort", 0)) <= port <= int(perm.get("ToPort", 65535)):
                continue
            if any(_in(peer.ip, r.get("CidrIp")) for r in perm.get("IpRanges") or []):
                return True
            if any(p.get("GroupId") in src_groups for p in perm.get("UserIdGroupPairs") or []):
                return True
    return False


# ------------------------------------------------------------------------------------ Compute Engine
# The default network's pre-populated rules (GCE VPC docs, "Pre-populated rules in the default network").
GCE_DEFAULT_RULES = (
    {"name": "default-allow-internal", "priority": 65534, "sourceRanges": ["10.128.0.0/9"],
     "allowed": [{"IPProtocol": "tcp", "ports": ["0-65535"]}, {"IPProtocol": "udp", "ports": ["0-65535"]},
                 {"IPProtocol": "icmp"}]},
    {"name": "default-allow-ssh", "priority": 65534, "sourceRanges": ["0.0.0.0/0"],
     "allowed": [{"IPProtocol": "tcp", "ports": ["22"]}]},
    {"name": "default-allow-rdp", "priority": 65534, "sourceRanges": ["0.0.0.0/0"],
     "allowed": [{"IPProtocol": "tcp", "ports": ["3389"]}]},
    {"name": "default-allow-icmp", "priority": 65534, "sourceRanges": ["0.0.0.0/0"],
     "allowed": [{"IPProtocol": "icmp"}]},
)


def _gce_tcp(entries: list[dict] | None, port: int) -> bool:
    for e in entries or []:
        if str(e.get("IPProtocol", "")).lower() in ("tcp", "6", "all") and (
                not e.get("ports") or any(_ports_match(port, p) for p in e["ports"])):
            return True
    return False


def gce_allows(world, target: dict, port: int, peer: Peer) -> bool:
    ids = [str(target["server_id"]), str((peer.target or {}).get("server_id", ""))]
    with world.read() as db:
        rows = db.conn.execute(
            "SELECT kind, data FROM resources WHERE project=? AND (gone_at IS NULL OR gone_at > ?) AND "
            "(kind='firewall' OR (kind='instance' AND id IN (?, ?)))",
            (world.project, db.now, *ids)).fetchall()
    instances, firewalls = {}, []
    for kind, data in rows:
        obj = json.loads(data)
        if kind == "instance":
            instances[obj["id"]] = obj
        else:
            firewalls.append(obj)
    dst = instances.get(ids[0])
    if dst is None:
        return False
    nics = dst.get("networkInterfaces") or []
    if peer.target is None:
        nic = next((n for n in nics if any(ac.get("natIP") == target.get("address")
                                           for ac in n.get("accessConfigs") or [])), None)
    else:
        nic = next((n for n in nics if n.get("network") == peer.network), None)
    if nic is None:
        return False
    network = str(nic["network"]).rsplit("/", 1)[-1]
    dst_tags = set((dst.get("tags") or {}).get("items") or [])
    src_tags = set(((instances.get(ids[1]) or {}).get("tags") or {}).get("items") or [])
    rules = [f for f in firewalls if str(f.get("network", "")).rsplit("/", 1)[-1] == network]
    if network == "default":
        stored = {f.get("name") for f in rules}
        rules += [r for r in GCE_DEFAULT_RULES if r["name"] not in stored]
    verdict: tuple[int, int] | None = None  # (priority, 0 = deny / 1 = allow): the lowest wins
    for f in rules:
        if f.get("disabled") or (f.get("direction") or "INGRESS") != "INGRESS":
            continue
        if f.get("targetTags") and not dst_tags & set(f["targetTags"]):
            continue
        if not (any(_in(peer.ip, r) for r in f.get("sourceRanges") or [])
                or (src_tags & set(f.get("sourceTags") or []))):
            continue
        for key, allow in (("denied", 0), ("allowed", 1)):
            if _gce_tcp(f.get(key), port):
                candidate = (int(f.get("priority", 1000)), allow)
                verdict = candidate if verdict is None else min(verdict, candidate)
    return verdict is not None and verdict[1] == 1
