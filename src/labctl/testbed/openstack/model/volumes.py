"""Cinder volumes: quota, status, creation, deletion, attachments."""

from __future__ import annotations

import time

from labctl.testbed.errors import HTTPError
from labctl.testbed.openstack.catalog import Site
from labctl.testbed.openstack.model.base import (
    VOLUME_CREATE_SECONDS,
    VOLUME_DELETE_SECONDS,
    VOLUME_QUOTA_GB,
    iso_us,
    new_id,
)


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
