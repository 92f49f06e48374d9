"""Nova v2.1 flavors and extra specs, keypairs, limits and quota sets, availability zones, extensions."""

from __future__ import annotations

import re
import time

from labctl.testbed.http import HTTPError, Request, Response
from labctl.testbed.openstack import model
from labctl.testbed.openstack.catalog import USER_ID
from labctl.testbed.openstack.model.base import NOVA_QUOTAS
from labctl.testbed.openstack.nova.common import api, paginate, self_link


def flavor_view(req: Request, f: dict, mv, detail: bool = True) -> dict:
    view = {"id": f["id"], "name": f["name"], "links": self_link(req, "flavors", f["id"])}
    if mv >= (2, 55):
        view["description"] = None
    if not detail:
        return view
    view.update(
        {
            "ram": f["ram"],
            "disk": f["disk"],
            "vcpus": f["vcpus"],
            "OS-FLV-EXT-DATA:ephemeral": 0,
            "OS-FLV-DISABLED:disabled": False,
            "swap": 0 if mv >= (2, 75) else "",
            "rxtx_factor": 1.0,
            "os-flavor-access:is_public": f.get("is_public", True),
        }
    )
    if mv >= (2, 61):
        view["extra_specs"] = dict(f["extra_specs"])
    return view


def _flavors(req: Request) -> list[dict]:
    with req.world.read() as db:
        flavors = model.all_flavors(db, req.site)
    public = (req.q("is_public") or "true").lower()
    if public in ("false", "0", "no"):
        flavors = [f for f in flavors if not f.get("is_public", True)]
    if req.q("minRam"):
        flavors = [f for f in flavors if f["ram"] >= int(req.q("minRam"))]
    if req.q("minDisk"):
        flavors = [f for f in flavors if f["disk"] >= int(req.q("minDisk"))]
    return sorted(flavors, key=lambda f: f["id"])


@api("GET", "/flavors")
def list_flavors(req: Request, mv) -> Response:
    flavors, links = paginate(req, _flavors(req), "flavors", "/flavors")
    body = {"flavors": [flavor_view(req, f, mv, detail=False) for f in flavors]}
    if links:
        body["flavors_links"] = links
    return Response(200, body)


@api("GET", "/flavors/detail")
def list_flavors_detail(req: Request, mv) -> Response:
    flavors, links = paginate(req, _flavors(req), "flavors", "/flavors/detail")
    body = {"flavors": [flavor_view(req, f, mv) for f in flavors]}
    if links:
        body["flavors_links"] = links
    return Response(200, body)


def _get_flavor(req: Request) -> dict:
    with req.world.read() as db:
        f = model.get_flavor(db, req.site, req.params["id"])
    if not f:
        raise HTTPError(404, f"Flavor {req.params['id']} could not be found.", "FlavorNotFound")
    return f


@api("GET", "/flavors/{id}")
def get_flavor(req: Request, mv) -> Response:
    return Response(200, {"flavor": flavor_view(req, _get_flavor(req), mv)})


@api("GET", "/flavors/{id}/os-extra_specs")
def get_extra_specs(req: Request, mv) -> Response:
    return Response(200, {"extra_specs": dict(_get_flavor(req)["extra_specs"])})


@api("GET", "/flavors/{id}/os-extra_specs/{key}")
def get_extra_spec(req: Request, mv) -> Response:
    specs = _get_flavor(req)["extra_specs"]
    if req.params["key"] not in specs:
        raise HTTPError(
            404,
            f"Flavor {req.params['id']} has no extra specs with key {req.params['key']}.",
            "FlavorExtraSpecsNotFound",
        )
    return Response(200, {req.params["key"]: specs[req.params["key"]]})


_KEYPAIR_NAME = re.compile(r"^[A-Za-z0-9 _.@-]{1,255}$")


def keypair_view(kp: dict, mv, full: bool = False) -> dict:
    view = {"name": kp["name"], "public_key": kp["public_key"], "fingerprint": kp["fingerprint"]}
    if mv >= (2, 2):
        view["type"] = kp.get("type", "ssh")
    if full:
        view.update(
            {
                "user_id": USER_ID,
                "created_at": model.iso_us(kp["created"]),
                "updated_at": None,
                "deleted_at": None,
                "deleted": False,
                "id": kp["seq"],
            }
        )
    return view


def _keypair_not_found(name: str) -> HTTPError:
    return HTTPError(404, f"Keypair {name} not found for user {USER_ID}", "KeypairNotFound")


@api("GET", "/os-keypairs")
def list_keypairs(req: Request, mv) -> Response:
    with req.world.read() as db:
        kps = db.find("keypair", req.site.name)
    kps = sorted(({**k, "id": k["name"]} for k in kps), key=lambda k: k["name"])
    links = None
    if mv >= (2, 35):
        kps, links = paginate(req, kps, "keypairs", "/os-keypairs")
    body = {"keypairs": [{"keypair": keypair_view(k, mv)} for k in kps]}
    if links:
        body["keypairs_links"] = links
    return Response(200, body)


@api("POST", "/os-keypairs")
def create_keypair(req: Request, mv) -> Response:
    body = req.json()
    spec = body.get("keypair") if isinstance(body, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise HTTPError(
            400, "Invalid input for field/attribute keypair. 'name' is a required property", "ValidationError"
        )
    name = spec["name"]
    if not _KEYPAIR_NAME.match(name) or name.strip() != name:
        raise HTTPError(
            400, "Keypair data is invalid: Keypair name contains unsafe characters", "InvalidKeypair"
        )
    private_key = None
    public_key = spec.get("public_key")
    if not public_key:
        if mv >= (2, 92):
            raise HTTPError(
                400,
                "Invalid input for field/attribute keypair. 'public_key' is a required property",
                "ValidationError",
            )
        public_key, private_key = _generate_keypair(name)
    public_key = public_key.strip()
    ktype = spec.get("type", "ssh") if mv >= (2, 2) else "ssh"
    with req.world.tx() as db:
        # Nova's order (KeypairAPI): the quota, then the key's fingerprint, then the name (a unique key in its
        # database). So a resend of a create whose answer was lost can meet the quota, not the name.
        if db.count("keypair", req.site.name) >= model.quota(db, req.site, "key_pairs"):
            raise HTTPError(403, "Quota exceeded, too many key pairs.", "Forbidden")
        try:
            fp = model.fingerprint(public_key)
        except ValueError:
            raise HTTPError(
                400, "Keypair data is invalid: failed to generate fingerprint", "InvalidKeypair"
            ) from None
        if db.get("keypair", req.site.name, name):
            raise HTTPError(409, f"Key pair '{name}' already exists.", "KeyPairExists")
        kp = {
            "id": name,
            "name": name,
            "public_key": public_key,
            "fingerprint": fp,
            "type": ktype,
            "created": time.time(),
            "seq": db.counter(f"keypair:{req.site.name}", 1),
        }
        db.put("keypair", req.site.name, kp)
    view = keypair_view(kp, mv)
    view["user_id"] = USER_ID
    if private_key:
        view["private_key"] = private_key
    return Response(201 if mv >= (2, 2) else 200, {"keypair": view})


def _generate_keypair(name: str) -> tuple[str, str]:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - cryptography comes with openstacksdk/paramiko
        raise HTTPError(400, "Key generation is not available; send a public_key", "BadRequest") from None
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return f"{public} Generated-by-Nova", private


@api("GET", "/os-keypairs/{name}")
def get_keypair(req: Request, mv) -> Response:
    with req.world.read() as db:
        kp = db.get("keypair", req.site.name, req.params["name"])
    if not kp:
        raise _keypair_not_found(req.params["name"])
    return Response(200, {"keypair": keypair_view(kp, mv, full=True)})


@api("DELETE", "/os-keypairs/{name}")
def delete_keypair(req: Request, mv) -> Response:
    with req.world.tx() as db:
        if not db.delete("keypair", req.site.name, req.params["name"]):
            raise _keypair_not_found(req.params["name"])
    return Response(204 if mv >= (2, 2) else 202)


def _quotas_and_usage(req: Request, *, usage: bool = True) -> tuple[dict, dict]:
    """The project's Nova quotas, and (with `usage`) what its servers and key pairs use of them."""
    with req.world.read() as db:
        quotas = {k: model.quota(db, req.site, k) for k in NOVA_QUOTAS}
        return quotas, model.compute_usage(db, req.site) if usage else {}


@api("GET", "/limits")
def limits(req: Request, mv) -> Response:
    quotas, used = _quotas_and_usage(req)
    absolute = {
        "maxTotalInstances": quotas["instances"],
        "maxTotalCores": quotas["cores"],
        "maxTotalRAMSize": quotas["ram"],
        "maxTotalKeypairs": quotas["key_pairs"],
        "maxServerMeta": quotas["metadata_items"],
        "maxServerGroups": quotas["server_groups"],
        "maxServerGroupMembers": quotas["server_group_members"],
        "maxImageMeta": 128,
        "maxPersonality": 5,
        "maxPersonalitySize": 10240,
        "totalInstancesUsed": used["instances"],
        "totalCoresUsed": used["cores"],
        "totalRAMUsed": used["ram"],
        "totalServerGroupsUsed": 0,
    }
    if mv >= (2, 57):
        absolute.pop("maxPersonality")
        absolute.pop("maxPersonalitySize")
    return Response(200, {"limits": {"absolute": absolute, "rate": []}})


@api("GET", "/os-quota-sets/{project}")
def quota_set(req: Request, mv) -> Response:
    quotas, _ = _quotas_and_usage(req, usage=False)  # the limits alone: no server or flavor read
    return Response(200, {"quota_set": {"id": req.params["project"], **quotas}})


@api("GET", "/os-quota-sets/{project}/detail")
def quota_set_detail(req: Request, mv) -> Response:
    quotas, used = _quotas_and_usage(req)
    return Response(
        200,
        {
            "quota_set": {
                "id": req.params["project"],
                **{k: {"limit": v, "in_use": used.get(k, 0), "reserved": 0} for k, v in quotas.items()},
            }
        },
    )


@api("GET", "/os-availability-zone")
def availability_zones(req: Request, mv) -> Response:
    return Response(
        200, {"availabilityZoneInfo": [{"zoneName": "nova", "zoneState": {"available": True}, "hosts": None}]}
    )


@api("GET", "/extensions")
def extensions(req: Request, mv) -> Response:
    return Response(200, {"extensions": []})
