"""What the emulated cloud's model shares: its timings and limits, ids, time formats, and the stamps and tags
every Neutron resource carries."""

from __future__ import annotations

import functools
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from labctl.testbed.errors import HTTPError
from labctl.testbed.openstack.catalog import SITES, Site

LEASE_START_DELAY = 30.0  # seconds from a lease's start date to ACTIVE (× time scale)


BOOT_SECONDS = {"baremetal": 600.0, "kvm": 60.0}  # BUILD → ACTIVE (× time scale)


SCHEDULE_SECONDS = 5.0  # BUILD → ERROR when scheduling fails (× time scale)


BEFORE_END_MINUTES = 60


FIP_QUOTA = 50


# The project's Neutron quotas (GET /v2.0/quotas reports them; a create past one is a 409 OverQuota). Ports are
# counted in the report but not refused: a port past the quota is Nova's error on a server create, another shape.
NEUTRON_QUOTAS = {"floatingip": FIP_QUOTA, "network": 100, "port": 500, "router": 10, "subnet": 100,
                  "security_group": 100, "security_group_rule": 1000}
# Nova's (GET /limits and os-quota-sets report them): instances are refused past theirs on a server create, key
# pairs (counted per user: all of a class's are the instructor's) on a key pair create, with a 403.
NOVA_QUOTAS = {"instances": 100, "cores": 2000, "ram": 5_120_000, "key_pairs": 100, "metadata_items": 128,
               "server_groups": 10, "server_group_members": 10}
QUOTA_DEFAULTS = {**NEUTRON_QUOTAS, **NOVA_QUOTAS}


def quota(db, site: Site, resource: str) -> int:
    """The project's quota for `resource` at `site` (`World.set_quota`; QUOTA_DEFAULTS otherwise)."""
    return int(db.setting(site.name, f"quota:{resource}", str(QUOTA_DEFAULTS[resource])))


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


@functools.lru_cache(maxsize=1 << 16)  # pure; a listing renders the same times on every poll
def iso_z(ts: float | None) -> str | None:
    return None if ts is None else _dt(ts).strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.lru_cache(maxsize=1 << 16)
def iso_us(ts: float | None) -> str | None:
    return None if ts is None else _dt(ts).strftime("%Y-%m-%dT%H:%M:%S.%f")


@functools.lru_cache(maxsize=1 << 16)
def blazar_dt(ts: float | None) -> str | None:
    return None if ts is None else _dt(ts).strftime(BLAZAR_DT)


@functools.lru_cache(maxsize=1 << 16)
def blazar_created(ts: float | None) -> str | None:
    return None if ts is None else _dt(ts).strftime(BLAZAR_CREATED)


def site_of(name: str) -> Site:
    return SITES[name]


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
