"""The Compute Engine v1 REST API over `GceWorld`: its routes (`ROUTES`, one `labctl.testbed.http.Router`) and
the request pipeline (authentication, request log, faults, errors). The resource families' handlers are in
`common` (errors, `Call`, validation, pages), `zones` (zones, regions, types, images, operations),
`instances`, `networks` (networks, subnetworks), `firewalls` (firewalls, addresses) and `disks`; `batch` takes
a batch request (`POST /batch/compute/v1`) apart into requests served here one by one.

Shapes follow the compute v1 discovery document (camelCase, int64 as strings, numeric-string ids,
`selfLink`s, `kind`). Links are stored relative ("projects/p/zones/z/instances/i") and rendered against the
serving endpoint, so several processes on different ports can serve one world.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from labctl.testbed.gce import batch
from labctl.testbed.gce.common import API_PREFIX, ApiError, Call, check_auth
from labctl.testbed.gce.disks import (
    disks_aggregated,
    disks_delete,
    disks_get,
    disks_insert,
    disks_list,
    instances_attach_disk,
    instances_detach_disk,
)
from labctl.testbed.gce.firewalls import (
    addresses_delete,
    addresses_get,
    addresses_insert,
    addresses_list,
    firewalls_delete,
    firewalls_get,
    firewalls_insert,
    firewalls_list,
    firewalls_patch,
)
from labctl.testbed.gce.instances import (
    instances_add_access_config,
    instances_aggregated,
    instances_delete,
    instances_delete_access_config,
    instances_get,
    instances_insert,
    instances_list,
)
from labctl.testbed.gce.networks import (
    networks_delete,
    networks_get,
    networks_insert,
    networks_list,
    subnetworks_delete,
    subnetworks_get,
    subnetworks_insert,
    subnetworks_list,
)
from labctl.testbed.gce.scheduling import instances_set_scheduling
from labctl.testbed.gce.world import GceWorld
from labctl.testbed.gce.zones import (
    accelerator_types_aggregated,
    accelerator_types_get,
    accelerator_types_list,
    image_family_views_get,
    images_family,
    images_get,
    images_list,
    machine_types_aggregated,
    machine_types_get,
    machine_types_list,
    operations_get,
    operations_list,
    operations_wait,
    projects_get,
    regions_get,
    regions_list,
    zones_get,
    zones_list,
)
from labctl.testbed.http import Router

# ------------------------------------------------------------------------------------ routing
P = "projects/{project}"


ROUTES: list[tuple[str, str, str, Callable[[Call], dict]]] = [
    ("GET", P, "projects.get", projects_get),
    ("GET", f"{P}/zones", "zones.list", zones_list),
    ("GET", f"{P}/zones/{{zone}}", "zones.get", zones_get),
    ("GET", f"{P}/regions", "regions.list", regions_list),
    ("GET", f"{P}/regions/{{region}}", "regions.get", regions_get),
    ("GET", f"{P}/zones/{{zone}}/machineTypes", "machineTypes.list", machine_types_list),
    ("GET", f"{P}/zones/{{zone}}/machineTypes/{{name}}", "machineTypes.get", machine_types_get),
    ("GET", f"{P}/aggregated/machineTypes", "machineTypes.aggregatedList", machine_types_aggregated),
    ("GET", f"{P}/zones/{{zone}}/acceleratorTypes", "acceleratorTypes.list", accelerator_types_list),
    ("GET", f"{P}/zones/{{zone}}/acceleratorTypes/{{name}}", "acceleratorTypes.get", accelerator_types_get),
    ("GET", f"{P}/aggregated/acceleratorTypes", "acceleratorTypes.aggregatedList", accelerator_types_aggregated),
    ("GET", f"{P}/global/images", "images.list", images_list),
    ("GET", f"{P}/global/images/family/{{family}}", "images.getFromFamily", images_family),
    ("GET", f"{P}/global/images/{{name}}", "images.get", images_get),
    ("GET", f"{P}/zones/{{zone}}/imageFamilyViews/{{family}}", "imageFamilyViews.get", image_family_views_get),
    ("GET", f"{P}/global/networks", "networks.list", networks_list),
    ("POST", f"{P}/global/networks", "networks.insert", networks_insert),
    ("GET", f"{P}/global/networks/{{name}}", "networks.get", networks_get),
    ("DELETE", f"{P}/global/networks/{{name}}", "networks.delete", networks_delete),
    ("GET", f"{P}/regions/{{region}}/subnetworks", "subnetworks.list", subnetworks_list),
    ("POST", f"{P}/regions/{{region}}/subnetworks", "subnetworks.insert", subnetworks_insert),
    ("GET", f"{P}/regions/{{region}}/subnetworks/{{name}}", "subnetworks.get", subnetworks_get),
    ("DELETE", f"{P}/regions/{{region}}/subnetworks/{{name}}", "subnetworks.delete", subnetworks_delete),
    ("GET", f"{P}/zones/{{zone}}/disks", "disks.list", disks_list),
    ("POST", f"{P}/zones/{{zone}}/disks", "disks.insert", disks_insert),
    ("GET", f"{P}/aggregated/disks", "disks.aggregatedList", disks_aggregated),
    ("GET", f"{P}/zones/{{zone}}/disks/{{name}}", "disks.get", disks_get),
    ("DELETE", f"{P}/zones/{{zone}}/disks/{{name}}", "disks.delete", disks_delete),
    ("GET", f"{P}/zones/{{zone}}/operations", "zoneOperations.list", operations_list),
    ("GET", f"{P}/zones/{{zone}}/operations/{{operation}}", "zoneOperations.get", operations_get),
    ("POST", f"{P}/zones/{{zone}}/operations/{{operation}}/wait", "zoneOperations.wait", operations_wait),
    ("GET", f"{P}/regions/{{region}}/operations", "regionOperations.list", operations_list),
    ("GET", f"{P}/regions/{{region}}/operations/{{operation}}", "regionOperations.get", operations_get),
    ("POST", f"{P}/regions/{{region}}/operations/{{operation}}/wait", "regionOperations.wait", operations_wait),
    ("GET", f"{P}/global/operations", "globalOperations.list", operations_list),
    ("GET", f"{P}/global/operations/{{operation}}", "globalOperations.get", operations_get),
    ("POST", f"{P}/global/operations/{{operation}}/wait", "globalOperations.wait", operations_wait),
    ("GET", f"{P}/zones/{{zone}}/instances", "instances.list", instances_list),
    ("POST", f"{P}/zones/{{zone}}/instances", "instances.insert", instances_insert),
    ("GET", f"{P}/aggregated/instances", "instances.aggregatedList", instances_aggregated),
    ("GET", f"{P}/zones/{{zone}}/instances/{{name}}", "instances.get", instances_get),
    ("DELETE", f"{P}/zones/{{zone}}/instances/{{name}}", "instances.delete", instances_delete),
    ("POST", f"{P}/zones/{{zone}}/instances/{{name}}/addAccessConfig", "instances.addAccessConfig",
     instances_add_access_config),
    ("POST", f"{P}/zones/{{zone}}/instances/{{name}}/deleteAccessConfig", "instances.deleteAccessConfig",
     instances_delete_access_config),
    ("POST", f"{P}/zones/{{zone}}/instances/{{name}}/attachDisk", "instances.attachDisk", instances_attach_disk),
    ("POST", f"{P}/zones/{{zone}}/instances/{{name}}/detachDisk", "instances.detachDisk", instances_detach_disk),
    ("POST", f"{P}/zones/{{zone}}/instances/{{name}}/setScheduling", "instances.setScheduling",
     instances_set_scheduling),
    ("GET", f"{P}/global/firewalls", "firewalls.list", firewalls_list),
    ("POST", f"{P}/global/firewalls", "firewalls.insert", firewalls_insert),
    ("GET", f"{P}/global/firewalls/{{name}}", "firewalls.get", firewalls_get),
    ("PATCH", f"{P}/global/firewalls/{{name}}", "firewalls.patch", firewalls_patch),
    ("DELETE", f"{P}/global/firewalls/{{name}}", "firewalls.delete", firewalls_delete),
    ("GET", f"{P}/regions/{{region}}/addresses", "addresses.list", addresses_list),
    ("POST", f"{P}/regions/{{region}}/addresses", "addresses.insert", addresses_insert),
    ("GET", f"{P}/regions/{{region}}/addresses/{{name}}", "addresses.get", addresses_get),
    ("DELETE", f"{P}/regions/{{region}}/addresses/{{name}}", "addresses.delete", addresses_delete),
]


ROUTER = Router(lambda method: ApiError(405, f"Method {method} is not allowed for this resource.",
                                        "methodNotAllowed"), head_as_get=False)


for _method, _template, _op, _fn in ROUTES:
    ROUTER.add(_method, "/" + _template, _fn, name=_op)


def match(method: str, path: str) -> tuple[str, Callable[[Call], dict], dict[str, str]] | None:
    """(API method id, handler, path parameters) for a path below /compute/v1/; 405 for a wrong method."""
    if not path.startswith(API_PREFIX):
        return None
    found = ROUTER.match(method, path[len(API_PREFIX) - 1:])
    if found is None:
        return None
    route, params = found
    return route.name, route.handler, params


@dataclass
class Outcome:
    status: int
    body: dict
    headers: dict = field(default_factory=dict)
    action: str = "respond"  # respond | hang | drop
    raw: bytes | None = None  # a body that is not JSON (the batch endpoint's multipart/mixed), sent as it is
    content_type: str | None = None  # raw's Content-Type


UNVALIDATED: list[str] = []  # requests whose body a handler failed on without validating it


FAULT_ERRORS = {
    "error503": (503, "backendError", "The service is currently unavailable (injected by the emulator)."),
    "error500": (500, "backendError", "Internal error. Please try again or contact Google Support. "
                                      "(injected by the emulator)"),
    "error429": (429, "rateLimitExceeded", "Rate Limit Exceeded (injected by the emulator)"),
}


def handle(world: GceWorld, base_url: str, stop_event: threading.Event, method: str, raw_path: str,
           body: bytes, headers: Any) -> Outcome:
    """One request; its `headers` must carry this world's bearer token. A batch (`POST /batch/compute/v1`) is
    taken apart and each embedded request served as one of its own (`labctl.testbed.gce.batch`)."""
    url = urlsplit(raw_path)
    if unquote(url.path).rstrip("/") in batch.BATCH_PATHS:
        world.log_request(method, unquote(url.path), url.query, "batch")
        if method != "POST":
            e = ApiError(405, f"Method {method} is not allowed for this resource.", "methodNotAllowed")
            return Outcome(405, e.body())

        def one(inner_method: str, target: str, inner_body: bytes, inner_headers: Any) -> Outcome:
            if unquote(urlsplit(target).path).rstrip("/") in batch.BATCH_PATHS:  # no batch inside a batch
                e = ApiError(400, "A batch request cannot contain another batch request.", "badRequest")
                return Outcome(400, e.body())
            return _handle_one(world, base_url, stop_event, inner_method, target, inner_body, inner_headers)

        try:
            payload, content_type, action = batch.run_batch(headers, body, one)
        except ApiError as e:
            return Outcome(e.status, e.body(), dict(e.headers))
        return Outcome(200, {}, action=action, raw=payload, content_type=content_type)
    return _handle_one(world, base_url, stop_event, method, raw_path, body, headers)


def _handle_one(world: GceWorld, base_url: str, stop_event: threading.Event, method: str, raw_path: str,
                body: bytes, headers: Any) -> Outcome:
    url = urlsplit(raw_path)
    path = unquote(url.path)
    query = parse_qs(url.query, keep_blank_values=True)
    try:
        check_auth(world, headers)
        found = match(method, path)
    except ApiError as e:
        world.log_request(method, path, url.query)
        return Outcome(e.status, e.body())
    if found is None:
        world.log_request(method, path, url.query)
        e = ApiError(404, f"The requested URL {path} was not found on this server.", "notFound")
        return Outcome(404, e.body())
    op_id, fn, params = found
    world.log_request(method, path, url.query, op_id)
    call = Call(world, method, path, query, body, base_url + API_PREFIX, stop_event, params)
    fault = None
    try:
        world.tick()
        delay = world.latency_of([op_id])
        if delay:
            time.sleep(delay * world.time_scale)
        fault = world.take_fault(op_id)
        if fault and fault[0] in FAULT_ERRORS:
            status, reason, message = FAULT_ERRORS[fault[0]]
            raise ApiError(status, fault[1] or message, reason,
                           {"Retry-After": "1"} if status == 429 else None)
        try:
            result = Outcome(200, fn(call))
        except (TypeError, AttributeError, KeyError, ValueError, IndexError) as e:
            if not body:
                raise
            # A body field of the wrong type that the handler does not validate yet: Google's 400, counted (the
            # fuzz tests require none).
            import traceback

            traceback.print_exc()
            UNVALIDATED.append(f"{op_id}: {e!r}")
            raise ApiError(400, f"Invalid value in the request body ({type(e).__name__}).", "invalid",
                           status_name="INVALID_ARGUMENT") from None
    except ApiError as e:
        result = Outcome(e.status, e.body(), dict(e.headers))
    if fault and fault[0] == "hang_after":
        result.action = "hang"
    elif fault and fault[0] == "timeout_after":
        result.action = "drop"
    return result
