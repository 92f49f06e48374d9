"""Nova v2.1 servers: the server view, list, create (reservations, networks, ports), update, delete, actions,
security groups, interfaces, metadata and tags."""

from __future__ import annotations

import re
import secrets
import time

from labctl.testbed.http import HTTPError, Request, Response
from labctl.testbed.openstack import catalog as cat
from labctl.testbed.openstack import model
from labctl.testbed.openstack.catalog import PROJECT_ID, USER_ID
from labctl.testbed.openstack.nova.common import (
    api,
    filter_servers,
    paginate,
    self_link,
    server_not_found,
    server_or_404,
)


def server_view(db, req: Request, s: dict, mv, flavors: dict, addresses: dict | None = None) -> dict:
    site, now = req.site, req.now
    status = model.server_status(s, now)
    flavor = flavors.get(s["flavor_id"]) or {
        "id": s["flavor_id"],
        "name": s.get("flavor_name", ""),
        "vcpus": 0,
        "ram": 0,
        "disk": 0,
        "extra_specs": {},
    }
    if mv >= (2, 47):
        flavor_view = {
            "vcpus": flavor["vcpus"],
            "ram": flavor["ram"],
            "disk": flavor["disk"],
            "ephemeral": 0,
            "swap": 0,
            "original_name": flavor["name"],
            "extra_specs": dict(flavor["extra_specs"]),
        }
    else:
        flavor_view = {
            "id": flavor["id"],
            "links": [{"rel": "bookmark", "href": f"{req.site_url}/compute/flavors/{flavor['id']}"}],
        }
    task, vm, power = {
        "BUILD": ("spawning", "building", 0),
        "ACTIVE": (None, "active", 1),
        "ERROR": (None, "error", 0),
    }[status]
    if status == "BUILD" and s.get("fault"):
        task = "scheduling"
    view = {
        "id": s["id"],
        "name": s["name"],
        "status": status,
        "tenant_id": PROJECT_ID,
        "user_id": USER_ID,
        "metadata": dict(s.get("metadata", {})),
        "hostId": model.host_id_for(s) if status != "ERROR" else "",
        "image": {
            "id": s["image_id"],
            "links": [{"rel": "bookmark", "href": f"{req.site_url}/compute/images/{s['image_id']}"}],
        }
        if s.get("image_id")
        else "",
        "flavor": flavor_view,
        "created": model.iso_z(s["created"]),
        "updated": model.iso_z(
            max(s["updated"], min(now, s["error_at"] if s.get("fault") else s["ready_at"]))
        ),
        "addresses": addresses if addresses is not None else model.server_addresses(db, site, s),
        "accessIPv4": "",
        "accessIPv6": "",
        "links": self_link(req, "servers", s["id"]),
        "OS-DCF:diskConfig": "MANUAL",
        "progress": 0 if status != "ACTIVE" else 100,
        "OS-EXT-AZ:availability_zone": "nova",
        "config_drive": "True" if s.get("config_drive") else "",
        "key_name": s.get("key_name"),
        "OS-SRV-USG:launched_at": model.iso_us(s["ready_at"]) if status == "ACTIVE" else None,
        "OS-SRV-USG:terminated_at": None,
        "OS-EXT-STS:task_state": task,
        "OS-EXT-STS:vm_state": vm,
        "OS-EXT-STS:power_state": power,
        "os-extended-volumes:volumes_attached": [],
    }
    if status != "ERROR" or not s.get("fault"):
        view["security_groups"] = [{"name": n} for n in s.get("security_groups", [])]
    if status == "ERROR":
        view["fault"] = {"code": 500, "created": model.iso_z(s["error_at"]), "message": s["fault"]}
    if mv >= (2, 9):
        view["locked"] = False
    if mv >= (2, 16):
        view["host_status"] = "UP" if status == "ACTIVE" else ""
    if mv >= (2, 19):
        view["description"] = s.get("description")
    if mv >= (2, 26):
        view["tags"] = list(s.get("tags", []))
    if mv >= (2, 63):
        view["trusted_image_certificates"] = None
    if mv >= (2, 71):
        view["server_groups"] = []
    if mv >= (2, 73):
        view["locked_reason"] = None
    if mv >= (2, 90):
        view["OS-EXT-SRV-ATTR:hostname"] = re.sub(r"[^a-z0-9-]", "-", s["name"].lower())[:63]
    if mv >= (2, 96):
        view["pinned_availability_zone"] = None
    return view


@api("GET", "/servers")
def list_servers(req: Request, mv) -> Response:
    with req.world.read() as db:
        servers = filter_servers(db, req, db.find("server", req.site.name))
    servers, links = paginate(req, servers, "servers", "/servers")
    body = {
        "servers": [
            {"id": s["id"], "name": s["name"], "links": self_link(req, "servers", s["id"])} for s in servers
        ]
    }
    if links:
        body["servers_links"] = links
    return Response(200, body)


@api("GET", "/servers/detail")
def list_servers_detail(req: Request, mv) -> Response:
    with req.world.read() as db:
        servers = filter_servers(db, req, db.find("server", req.site.name))
        servers, links = paginate(req, servers, "servers", "/servers/detail")
        flavors = model.flavors_by_id(db, req.site, {s["flavor_id"] for s in servers})
        addresses = model.SiteAddresses(db, req.site)  # every server's, in three queries
        views = [server_view(db, req, s, mv, flavors, addresses.of(s)) for s in servers]
    body = {"servers": views}
    if links:
        body["servers_links"] = links
    return Response(200, body)


def _ref_id(ref) -> str:
    return str(ref).rstrip("/").rsplit("/", 1)[-1] if ref else ""


@api("POST", "/servers")
def create_server(req: Request, mv) -> Response:
    body = req.json()
    spec = body.get("server") if isinstance(body, dict) else None
    if not isinstance(spec, dict):
        raise HTTPError(
            400,
            "Invalid input for field/attribute server. Value: None. None is not of type 'object'",
            "ValidationError",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 255:
        raise HTTPError(
            400,
            f"Invalid input for field/attribute name. Value: {name}. 'name' is a required property"
            if name is None
            else f"Invalid input for field/attribute name. Value: {name}.",
            "ValidationError",
        )
    hints = body.get("OS-SCH-HNT:scheduler_hints") or body.get("os:scheduler_hints") or {}
    metadata = spec.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) <= 255 for k, v in metadata.items()
    ):
        raise HTTPError(
            400,
            "Invalid input for field/attribute metadata. Value: "
            f"{metadata}. Metadata values must be strings of at most 255 characters",
            "ValidationError",
        )
    site, now = req.site, time.time()
    scale = req.world.time_scale
    with req.world.tx() as db:
        flavor = model.get_flavor(db, site, _ref_id(spec.get("flavorRef")))
        if not flavor:
            raise HTTPError(
                400, f"Flavor {_ref_id(spec.get('flavorRef'))} could not be found.", "FlavorNotFound"
            )
        image_id = _ref_id(spec.get("imageRef"))
        if image_id and image_id not in {i.id for i in cat.images(site)}:
            raise HTTPError(400, f"Image {image_id} could not be found.", "ImageNotFound")
        if not image_id and not spec.get("block_device_mapping_v2"):
            raise HTTPError(400, "Missing imageRef attribute", "ImageNotFound")
        key_data = None
        if spec.get("key_name"):
            kp = db.get("keypair", site.name, spec["key_name"])
            if not kp:
                raise HTTPError(400, "Invalid key_name provided.", "KeypairNotFound")
            key_data = kp["public_key"]
        networks = spec.get("networks")
        if networks is None and mv >= (2, 37):
            raise HTTPError(
                400,
                "Invalid input for field/attribute server. Value: ... 'networks' is a required property",
                "ValidationError",
            )
        # Each requested NIC in order: ("net", network id) for a port Nova makes, ("port", port) for a port
        # made beforehand through Neutron (bound to the server, and left behind unbound when it is deleted).
        nics: list[tuple[str, object]] = []
        if networks in (None, "auto"):
            nics = [("net", cat.shared_net_id(site))]
        elif networks == "none":
            nics = []
        elif isinstance(networks, list):
            for n in networks:
                n = n if isinstance(n, dict) else {}
                if n.get("port"):
                    port = db.get("port", site.name, str(n["port"]))
                    if not port:
                        raise HTTPError(400, f"Port {n['port']} could not be found.", "PortNotFound")
                    if port["device_id"]:
                        raise HTTPError(
                            409, f"Port {port['id']} is still in use.", "PortInUse")
                    if any(kind == "port" and other["id"] == port["id"] for kind, other in nics):
                        raise HTTPError(400, f"Port {port['id']} is requested twice.", "BadRequest")
                    nics.append(("port", port))
                    continue
                nid = n.get("uuid")
                if nid == cat.public_net_id(site):
                    raise HTTPError(
                        400,
                        "Creating an instance on the external network 'public' is not allowed.",
                        "ExternalNetworkAttachForbidden",
                    )
                if nid != cat.shared_net_id(site) and not db.get("network", site.name, str(nid)):
                    raise HTTPError(400, f"Network {nid} could not be found.", "NetworkNotFound")
                nics.append(("net", nid))
        else:
            raise HTTPError(
                400, f"Invalid input for field/attribute networks. Value: {networks}.", "ValidationError"
            )
        net_ids = [nic["network_id"] if kind == "port" else nic for kind, nic in nics]
        sg_names, sg_ids = [], []
        for ref in spec.get("security_groups") or [{"name": "default"}]:
            sg = model.find_security_group(db, site, str((ref or {}).get("name")))
            if not sg:
                raise HTTPError(
                    400, f"Security group {(ref or {}).get('name')} not found.", "SecurityGroupNotFound"
                )
            if sg["name"] not in sg_names:
                sg_names.append(sg["name"])
                sg_ids.append(sg["id"])
        model.check_server_quota(db, site)
        boot = model.BOOT_SECONDS["baremetal" if site.kind == "baremetal" else "kvm"] * scale
        server = {
            "id": model.new_id(),
            "name": name,
            "image_id": image_id or None,
            "flavor_id": flavor["id"],
            "flavor_name": flavor["name"],
            "key_name": spec.get("key_name"),
            "key_data": key_data,
            "metadata": metadata,
            "tags": list(spec.get("tags") or []) if mv >= (2, 52) else [],
            "description": spec.get("description"),
            "security_groups": sg_names,
            "reservation_id": hints.get("reservation"),
            "created": now,
            "updated": now,
            "ready_at": now + boot,
            "error_at": now + model.SCHEDULE_SECONDS * scale,
            "fault": None,
            "user_data": spec.get("user_data"),
            "config_drive": bool(spec.get("config_drive")),
            "network_ids": net_ids,
        }
        if req.fault:
            server["fault"] = req.fault[1] or model.NO_VALID_HOST
        else:
            server["fault"] = model.schedule(db, site, server, now)
        db.put("server", site.name, server)
        if not server["fault"]:
            for i, (kind, nic) in enumerate(nics):
                bound_at = now + i * 1e-6
                if kind == "port":
                    nic.update(device_id=server["id"], device_owner="compute:nova", bound_at=bound_at)
                    db.put("port", site.name, nic)
                elif nic == cat.shared_net_id(site):
                    port = model.create_port(db, site, nic, server["id"], sg_ids)
                    port["bound_at"] = bound_at
                    db.put("port", site.name, port)
                else:
                    subnets = model.network_subnets(db, site, nic)
                    if not subnets:
                        raise HTTPError(
                            400, f"Network {nic} requires a subnet in order to boot instances on.",
                            "NetworkRequiresSubnet")
                    net = db.get("network", site.name, nic)
                    security = net.get("port_security_enabled", True)
                    port = model.new_port(
                        db, site, network_id=nic, subnet_id=subnets[0]["id"],
                        fixed_ip=model.allocate_ip(db, site, subnets[0]), device_id=server["id"],
                        device_owner="compute:nova", sg_ids=sg_ids if security else [], port_security=security,
                        preserve=False)
                    port["bound_at"] = bound_at
                    db.put("port", site.name, port)
    resp = {
        "id": server["id"],
        "links": self_link(req, "servers", server["id"]),
        "OS-DCF:diskConfig": "MANUAL",
        "security_groups": [{"name": n} for n in sg_names],
        "adminPass": secrets.token_urlsafe(9),
    }
    return Response(202, {"server": resp})


@api("GET", "/servers/{id}")
def get_server(req: Request, mv) -> Response:
    with req.world.read() as db:
        s = server_or_404(db, req)
        flavors = model.flavors_by_id(db, req.site, [s["flavor_id"]])
        return Response(200, {"server": server_view(db, req, s, mv, flavors)})


@api("PUT", "/servers/{id}")
def update_server(req: Request, mv) -> Response:
    spec = (req.json() or {}).get("server") or {}
    with req.world.tx() as db:
        s = server_or_404(db, req)
        if "name" in spec:
            s["name"] = spec["name"]
        if "description" in spec and mv >= (2, 19):
            s["description"] = spec["description"]
        s["updated"] = time.time()
        db.put("server", req.site.name, s)
        flavors = model.flavors_by_id(db, req.site, [s["flavor_id"]])
        return Response(200, {"server": server_view(db, req, s, mv, flavors)})


@api("DELETE", "/servers/{id}")
def delete_server(req: Request, mv) -> Response:
    with req.world.tx() as db:
        if not model.delete_server(db, req.site, req.params["id"]):
            raise server_not_found(req.params["id"])
    return Response(204)


@api("POST", "/servers/{id}/action")
def server_action(req: Request, mv) -> Response:
    body = req.json()
    if not isinstance(body, dict) or len(body) != 1:
        raise HTTPError(400, "Malformed request body", "BadRequest")
    action, arg = next(iter(body.items()))
    with req.world.tx() as db:
        s = server_or_404(db, req)
        if action in ("addSecurityGroup", "removeSecurityGroup"):
            ref = str((arg or {}).get("name"))
            sg = model.find_security_group(db, req.site, ref)
            if not sg:
                raise HTTPError(404, f"Security group {ref} not found.", "SecurityGroupNotFound")
            names = s.setdefault("security_groups", [])
            ports = model.server_ports(db, req.site, s["id"])
            if action == "addSecurityGroup":
                if sg["name"] in names:
                    raise HTTPError(
                        400,
                        f"Security group {sg['name']} is already associated with the instance {s['id']}",
                        "SecurityGroupExistsForInstance",
                    )
                names.append(sg["name"])
                for p in ports:
                    p["security_groups"] = [*p["security_groups"], sg["id"]]
                    db.put("port", req.site.name, p)
            else:
                if sg["name"] not in names:
                    raise HTTPError(
                        400,
                        f"Security group {sg['name']} is not associated with the instance {s['id']}",
                        "SecurityGroupNotExistsForInstance",
                    )
                names.remove(sg["name"])
                for p in ports:
                    p["security_groups"] = [g for g in p["security_groups"] if g != sg["id"]]
                    db.put("port", req.site.name, p)
        elif action in ("reboot", "os-start", "os-stop"):
            if model.server_status(s, req.now) != "ACTIVE":
                raise HTTPError(
                    409,
                    f"Cannot '{action}' instance {s['id']} while it is in vm_state building",
                    "InstanceInvalidState",
                )
        else:
            raise HTTPError(400, f"There is no such action: {action}", "BadRequest")
        s["updated"] = time.time()
        db.put("server", req.site.name, s)
    return Response(202)


@api("GET", "/servers/{id}/os-security-groups")
def server_security_groups(req: Request, mv) -> Response:
    with req.world.read() as db:
        s = server_or_404(db, req)
        groups = [model.find_security_group(db, req.site, n) for n in s.get("security_groups", [])]
        out = [
            {
                "id": g["id"],
                "name": g["name"],
                "description": g["description"],
                "tenant_id": PROJECT_ID,
                "rules": [],
            }
            for g in groups
            if g
        ]
    return Response(200, {"security_groups": out})


@api("GET", "/servers/{id}/os-interface")
def server_interfaces(req: Request, mv) -> Response:
    with req.world.read() as db:
        s = server_or_404(db, req)
        ports = model.server_ports(db, req.site, s["id"])
    return Response(
        200,
        {
            "interfaceAttachments": [
                {
                    "port_id": p["id"],
                    "net_id": p["network_id"],
                    "mac_addr": p["mac"],
                    "port_state": "ACTIVE",
                    "fixed_ips": [{"subnet_id": p["subnet_id"], "ip_address": p["fixed_ip"]}],
                }
                for p in ports
            ]
        },
    )


@api("GET", "/servers/{id}/metadata")
def get_metadata(req: Request, mv) -> Response:
    with req.world.read() as db:
        return Response(200, {"metadata": server_or_404(db, req).get("metadata", {})})


def _set_metadata(req: Request, replace: bool) -> Response:
    meta = (req.json() or {}).get("metadata")
    if not isinstance(meta, dict):
        raise HTTPError(400, "Malformed request body. metadata must be object", "BadRequest")
    with req.world.tx() as db:
        s = server_or_404(db, req)
        s["metadata"] = dict(meta) if replace else {**s.get("metadata", {}), **meta}
        s["updated"] = time.time()
        db.put("server", req.site.name, s)
    return Response(200, {"metadata": s["metadata"]})


@api("POST", "/servers/{id}/metadata")
def update_metadata(req: Request, mv) -> Response:
    return _set_metadata(req, replace=False)


@api("PUT", "/servers/{id}/metadata")
def replace_metadata(req: Request, mv) -> Response:
    return _set_metadata(req, replace=True)


@api("GET", "/servers/{id}/metadata/{key}")
def get_meta_item(req: Request, mv) -> Response:
    with req.world.read() as db:
        meta = server_or_404(db, req).get("metadata", {})
    if req.params["key"] not in meta:
        raise HTTPError(404, "Metadata item was not found", "MetadataNotFound")
    return Response(200, {"meta": {req.params["key"]: meta[req.params["key"]]}})


@api("PUT", "/servers/{id}/metadata/{key}")
def set_meta_item(req: Request, mv) -> Response:
    meta = (req.json() or {}).get("meta")
    if not isinstance(meta, dict) or list(meta) != [req.params["key"]]:
        raise HTTPError(400, "Request body and URI mismatch", "BadRequest")
    with req.world.tx() as db:
        s = server_or_404(db, req)
        s.setdefault("metadata", {}).update(meta)
        db.put("server", req.site.name, s)
    return Response(200, {"meta": meta})


@api("DELETE", "/servers/{id}/metadata/{key}")
def delete_meta_item(req: Request, mv) -> Response:
    with req.world.tx() as db:
        s = server_or_404(db, req)
        if req.params["key"] not in s.get("metadata", {}):
            raise HTTPError(404, "Metadata item was not found", "MetadataNotFound")
        del s["metadata"][req.params["key"]]
        db.put("server", req.site.name, s)
    return Response(204)


@api("GET", "/servers/{id}/tags")
def get_tags(req: Request, mv) -> Response:
    with req.world.read() as db:
        return Response(200, {"tags": server_or_404(db, req).get("tags", [])})


@api("PUT", "/servers/{id}/tags")
def replace_tags(req: Request, mv) -> Response:
    tags = (req.json() or {}).get("tags")
    if not isinstance(tags, list):
        raise HTTPError(400, "Invalid input for field/attribute tags.", "ValidationError")
    with req.world.tx() as db:
        s = server_or_404(db, req)
        s["tags"] = list(dict.fromkeys(tags))
        db.put("server", req.site.name, s)
    return Response(200, {"tags": s["tags"]})


@api("DELETE", "/servers/{id}/tags")
def delete_tags(req: Request, mv) -> Response:
    with req.world.tx() as db:
        s = server_or_404(db, req)
        s["tags"] = []
        db.put("server", req.site.name, s)
    return Response(204)


@api("PUT", "/servers/{id}/tags/{tag}")
def add_tag(req: Request, mv) -> Response:
    with req.world.tx() as db:
        s = server_or_404(db, req)
        existed = req.params["tag"] in s.get("tags", [])
        if not existed:
            s.setdefault("tags", []).append(req.params["tag"])
            db.put("server", req.site.name, s)
    return Response(
        204 if existed else 201,
        headers={"Location": f"{req.site_url}/compute/v2.1/servers/{s['id']}/tags/{req.params['tag']}"},
    )


@api("GET", "/servers/{id}/tags/{tag}")
def check_tag(req: Request, mv) -> Response:
    with req.world.read() as db:
        if req.params["tag"] not in server_or_404(db, req).get("tags", []):
            raise HTTPError(404, f"Tag {req.params['tag']} could not be found.", "TagNotFound")
    return Response(204)


@api("DELETE", "/servers/{id}/tags/{tag}")
def delete_tag(req: Request, mv) -> Response:
    with req.world.tx() as db:
        s = server_or_404(db, req)
        if req.params["tag"] not in s.get("tags", []):
            raise HTTPError(404, f"Tag {req.params['tag']} could not be found.", "TagNotFound")
        s["tags"].remove(req.params["tag"])
        db.put("server", req.site.name, s)
    return Response(204)
