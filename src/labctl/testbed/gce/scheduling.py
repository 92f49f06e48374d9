"""Instance scheduling: the fields Compute Engine checks ("Limit the run time of a VM": `terminationTime` or
`maxRunDuration` with `instanceTerminationAction` STOP or DELETE, 30 s to 120 days, not on legacy preemptible
VMs), the end it then enforces, and `instances.setScheduling`, which it accepts only on a stopped (TERMINATED)
instance.

The end runs out at the world's lease scale (`GceWorld.lease_scale`: real time unless set, as the emulated
Blazar leases; tests set it to end a lab in seconds): an instance whose end has come is STOPPING, then gone (DELETE,
its autoDelete disks with it) or TERMINATED (STOP)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from labctl.testbed.gce import world as w
from labctl.testbed.gce.common import (
    USER,
    ApiError,
    Call,
    check_project,
    get_stored,
    idempotent,
    invalid,
    scaled,
    zone_param,
)
from labctl.testbed.gce.world import Db

MIN_LIMIT = 30.0  # seconds
MAX_LIMIT = 120 * 86400.0
ACTIONS = ("STOP", "DELETE")
MODELS = ("STANDARD", "SPOT")
MAINTENANCE = ("MIGRATE", "TERMINATE")


def _seconds(value: Any, field: str) -> float:
    """A google.protobuf.Duration as JSON: {"seconds": "3600", "nanos": 0}."""
    if not isinstance(value, dict) or set(value) - {"seconds", "nanos"}:
        raise invalid(field, value, "Must be a Duration with seconds and nanos.")
    try:
        seconds, nanos = int(value.get("seconds", 0)), int(value.get("nanos", 0))
    except (TypeError, ValueError):
        raise invalid(field, value, "Must be a Duration with seconds and nanos.") from None
    if not 0 <= nanos < 10**9:
        raise invalid(f"{field}.nanos", nanos, "Must be from 0 to 999,999,999.")
    return seconds + nanos / 1e9


def check_scheduling(body: Any, field: str, now: float) -> tuple[dict, tuple[str, float] | None]:
    """The scheduling as stored (defaults filled in) and its time limit: ("time", epoch seconds) for a
    terminationTime, ("duration", seconds) for a maxRunDuration, None without one. A 400 for what Compute
    Engine refuses."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise invalid(field, body, "Must be an object.")
    out = {"onHostMaintenance": "MIGRATE", "automaticRestart": True, "preemptible": False,
           "provisioningModel": "STANDARD", **body}
    for key, allowed in (("onHostMaintenance", MAINTENANCE), ("provisioningModel", MODELS),
                         ("instanceTerminationAction", ACTIONS)):
        if key in out and out[key] not in allowed:
            raise invalid(f"{field}.{key}", out[key], f"Must be one of {', '.join(allowed)}.")
    for key in ("automaticRestart", "preemptible"):
        if not isinstance(out[key], bool):
            raise invalid(f"{field}.{key}", out[key], "Must be a boolean.")
    limit: tuple[str, float] | None = None
    if "terminationTime" in out and "maxRunDuration" in out:
        raise invalid(f"{field}.terminationTime", out["terminationTime"],
                      "Specify either a termination time or a max run duration, not both.")
    if "terminationTime" in out:
        text = out["terminationTime"]
        try:
            when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
        except ValueError:
            raise invalid(f"{field}.terminationTime", text, "Must be an RFC 3339 timestamp.") from None
        if when.tzinfo is None:
            raise invalid(f"{field}.terminationTime", text, "Must be an RFC 3339 timestamp with a time zone.")
        limit = ("time", when.timestamp())
        seconds = when.timestamp() - now
    elif "maxRunDuration" in out:
        seconds = _seconds(out["maxRunDuration"], f"{field}.maxRunDuration")
        limit = ("duration", seconds)
    if limit is not None:
        key = "terminationTime" if limit[0] == "time" else "maxRunDuration"
        if not MIN_LIMIT <= seconds <= MAX_LIMIT:
            raise invalid(f"{field}.{key}", out[key], "The time limit must be at least 30 seconds and at most "
                          "120 days from now.")
        if out["preemptible"]:
            raise invalid(f"{field}.{key}", out[key], "Time limits are not supported for preemptible instances; "
                          "use Spot VMs (provisioningModel: SPOT).")
        if "instanceTerminationAction" not in out:
            raise invalid(f"{field}.instanceTerminationAction", "", "An instance termination action (STOP or "
                          "DELETE) is required with a termination time or a max run duration.")
    elif "instanceTerminationAction" in out and out["provisioningModel"] != "SPOT":
        raise invalid(f"{field}.instanceTerminationAction", out["instanceTerminationAction"],
                      "An instance termination action needs a Spot VM or a time limit.")
    return out, limit


def set_end(call: Call, inst: dict, limit: tuple[str, float] | None, now: float) -> None:
    """When the instance's end comes in this world (`_end_at`, at the lease scale), from now or from when it
    runs (a max run duration counts running time), and how long its delete then takes (the time scale)."""
    inst.pop("_end_at", None)
    if limit is None:
        return
    scale = call.world.lease_scale
    start = max(now, inst["_running_at"]) if limit[0] == "duration" else now
    inst["_end_at"] = start + (limit[1] if limit[0] == "duration" else max(0.0, limit[1] - now)) * scale
    inst["_end_delete"] = scaled(call, w.DELETE_OP["instances"])


def instances_set_scheduling(call: Call) -> dict:
    check_project(call)
    zone = zone_param(call)
    body = call.json()

    def perform(db: Db) -> dict:
        inst = get_stored(db, call, "instance", f"zones/{zone}", "instances")
        scheduling, limit = check_scheduling(body, "resource", db.now)
        status = w.instance_status(inst, db.now)
        if status != "TERMINATED":
            raise ApiError(400, f"Invalid resource usage: 'The scheduling of instance '{inst['name']}' can be set "
                           f"only while it is stopped (TERMINATED); it is {status}.'.", "invalid")
        inst["scheduling"] = scheduling
        set_end(call, inst, limit, db.now)
        db.put("instance", inst)
        return w.new_operation(db, call.project, inst["_scope"], "setScheduling", inst["selfLink"], inst["id"],
                               scaled(call, w.ACCESS_CONFIG_OP), user=USER)

    return idempotent(call, perform)
