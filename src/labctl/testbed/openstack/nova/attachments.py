"""Nova v2.1 volume attachments (os-volume_attachments)."""

from __future__ import annotations

from labctl.testbed.http import HTTPError, Request, Response
from labctl.testbed.openstack import model
from labctl.testbed.openstack.nova.common import api, server_or_404


def _attachment_view(v: dict, a: dict, mv) -> dict:
    """`volumeAttachment` as Nova renders it at microversion `mv` (2.70 adds tag, 2.79 delete_on_termination,
    2.89 attachment_id and bdm_uuid and drops id)."""
    out = {"device": a["device"], "serverId": a["server_id"], "volumeId": v["id"]}
    if mv < (2, 89):
        out["id"] = v["id"]
    if mv >= (2, 70):
        out["tag"] = None
    if mv >= (2, 79):
        out["delete_on_termination"] = False
    if mv >= (2, 89):
        out["attachment_id"] = a["attachment_id"]
        out["bdm_uuid"] = a["bdm_uuid"]
    return out


def _server_attachments(db, req: Request, server_id: str) -> list[tuple[dict, dict]]:
    return [(v, a) for v in db.find("volume", req.site.name) for a in v.get("attachments", [])
            if a["server_id"] == server_id]


@api("POST", "/servers/{id}/os-volume_attachments")
def attach_volume(req: Request, mv) -> Response:
    body = req.json()
    spec = body.get("volumeAttachment") if isinstance(body, dict) else None
    if not isinstance(spec, dict) or not spec.get("volumeId"):
        raise HTTPError(400, "Invalid input for field/attribute volumeAttachment. Value: None. "
                             "'volumeId' is a required property", "ValidationError")
    with req.world.tx() as db:
        s = server_or_404(db, req)
        state = model.server_status(s, req.now)
        if state != "ACTIVE":
            raise HTTPError(409, f"Cannot 'attach_volume' instance {s['id']} while it is in vm_state "
                                 f"{'error' if state == 'ERROR' else 'building'}", "InstanceInvalidState")
        v = db.get("volume", req.site.name, str(spec["volumeId"]))
        if v is None:
            raise HTTPError(404, f"Volume {spec['volumeId']} could not be found.", "VolumeNotFound")
        status = model.volume_status(v, req.now)
        if status != "available":
            raise HTTPError(400, f"Invalid input received: Invalid volume: Volume {v['id']} status must be "
                                 f"available or downloading to reserve, but the current status is {status}.",
                            "InvalidVolume")
        a = model.attach_volume(db, req.site, v, s["id"], req.now)
        return Response(200, {"volumeAttachment": _attachment_view(v, a, mv)})


@api("GET", "/servers/{id}/os-volume_attachments")
def list_volume_attachments(req: Request, mv) -> Response:
    with req.world.read() as db:
        s = server_or_404(db, req)
        items = [_attachment_view(v, a, mv) for v, a in _server_attachments(db, req, s["id"])]
    return Response(200, {"volumeAttachments": items})


def _one_attachment(db, req: Request) -> tuple[dict, dict, dict]:
    s = server_or_404(db, req)
    vid = req.params["volume_id"]
    for v, a in _server_attachments(db, req, s["id"]):
        if v["id"] == vid:
            return s, v, a
    raise HTTPError(404, f"Volume {vid} is not attached to {s['id']}", "VolumeBDMNotFound")


@api("GET", "/servers/{id}/os-volume_attachments/{volume_id}")
def get_volume_attachment(req: Request, mv) -> Response:
    with req.world.read() as db:
        _s, v, a = _one_attachment(db, req)
        return Response(200, {"volumeAttachment": _attachment_view(v, a, mv)})


@api("DELETE", "/servers/{id}/os-volume_attachments/{volume_id}")
def detach_volume(req: Request, mv) -> Response:
    with req.world.tx() as db:
        s, v, _a = _one_attachment(db, req)
        model.detach_volume(db, req.site, v, s["id"])
    return Response(202)
