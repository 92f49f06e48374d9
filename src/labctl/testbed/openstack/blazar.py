"""Blazar v1: leases (physical:host, flavor:instance, virtual:floatingip) and the os-hosts API."""

from __future__ import annotations

import time

from labctl.testbed.http import HTTPError, Request, Response, Router
from labctl.testbed.openstack import model

PREFIX = "/v1"
router = Router()


def error_body(status: int, message: str, kind: str | None) -> dict:
    # blazar/api/v1/utils.py renders every Blazar exception with its HTTP code as error_name too.
    return {"error_code": status, "error_message": message, "error_name": status}


def _version(req: Request) -> dict:
    return {
        "id": "v1.0",
        "status": "CURRENT",
        "min_version": "1.0",
        "max_version": "1.0",
        "links": [{"rel": "self", "href": f"{req.site_url}/reservation/v1/"}],
    }


def root(req: Request) -> Response:
    return Response(300, {"versions": [_version(req)]})


@router.route("GET", "/", auth=False)
def version(req: Request) -> Response:
    return Response(200, {"version": _version(req)})


def _not_found(lease_id: str) -> HTTPError:
    return HTTPError(404, f"Object with {{'lease_id': '{lease_id}'}} not found", "NotFound")


def _get(db, req: Request) -> dict:
    lease = db.get("lease", req.site.name, req.params["id"])
    if not lease:
        raise _not_found(req.params["id"])
    return lease


@router.route("GET", "/leases")
def list_leases(req: Request) -> Response:
    with req.world.read() as db:
        leases = db.find("lease", req.site.name)
    return Response(200, {"leases": [model.lease_view(x, req.now) for x in leases]})


@router.route("POST", "/leases")
def create_lease(req: Request) -> Response:
    body = req.json()
    error = bool(req.fault and req.fault[0] == "server_error_state")
    scale = req.world.time_scale
    with req.world.tx() as db:
        now = time.time()
        lease = model.create_lease(db, req.site, body, now, scale, error=error)
    # As of the request's own time: Blazar answers a create with the lease as it made it (PENDING), however
    # long this process took to get here (a loaded machine at a small time scale).
    return Response(201, {"lease": model.lease_view(lease, now)})


@router.route("GET", "/leases/{id}")
def get_lease(req: Request) -> Response:
    with req.world.read() as db:
        return Response(200, {"lease": model.lease_view(_get(db, req), req.now)})


@router.route("PUT", "/leases/{id}")
def update_lease(req: Request) -> Response:
    body = req.json()
    if not isinstance(body, dict):
        raise HTTPError(400, "Malformed request body", "MalformedParameter")
    with req.world.tx() as db:
        lease = model.update_lease(db, req.site, _get(db, req), body, time.time())
    return Response(200, {"lease": model.lease_view(lease, time.time())})


@router.route("DELETE", "/leases/{id}")
def delete_lease(req: Request) -> Response:
    with req.world.tx() as db:
        model.delete_lease(db, req.site, _get(db, req))
    return Response(204)


# ============================================================================ hosts


def host_view(host) -> dict:
    view = {
        "id": host.id,
        "hypervisor_hostname": host.uid,
        "hypervisor_type": "ironic",
        "hypervisor_version": 1,
        "vcpus": 48,
        "cpu_info": "baremetal cpu",
        "memory_mb": 196608,
        "local_gb": 240,
        "service_name": host.uid,
        "reservable": True,
        "disabled": False,
        "status": None,
        "trust_id": "",
        "created_at": "2024-01-01 00:00:00",
        "updated_at": None,
    }
    view.update({k: (str(v) if isinstance(v, bool) else v) for k, v in host.properties().items()})
    return view


def _hosts(req: Request) -> list:
    if req.site.kind != "baremetal":
        return []
    with req.world.read() as db:
        return model.site_hosts(db, req.site)


@router.route("GET", "/os-hosts")
def list_hosts(req: Request) -> Response:
    return Response(200, {"hosts": [host_view(h) for h in _hosts(req)]})


@router.route("GET", "/os-hosts/properties")
def host_properties(req: Request) -> Response:
    hosts = _hosts(req)
    keys = sorted(hosts[0].properties()) if hosts else []
    if req.q("detail") in ("True", "true", "1"):
        values = {k: sorted({str(h.properties()[k]) for h in hosts}) for k in keys}
        return Response(
            200,
            {"resource_properties": [{"property": k, "private": False, "values": values[k]} for k in keys]},
        )
    return Response(200, {"resource_properties": [{"property": k} for k in keys]})


def _allocations(req: Request) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    with req.world.read() as db:
        leases = db.find("lease", req.site.name)
    for lease in leases:
        if model.lease_status(lease, req.now) == "TERMINATED":
            continue
        for r in lease["reservations"]:
            for host_id in r.get("hosts", []):
                out.setdefault(host_id, []).append(
                    {
                        "id": r["id"],
                        "lease_id": lease["id"],
                        "start_date": model.blazar_dt(lease["start"]),
                        "end_date": model.blazar_dt(lease["end"]),
                    }
                )
    return out


@router.route("GET", "/os-hosts/allocations")
def list_allocations(req: Request) -> Response:
    allocs = _allocations(req)
    return Response(
        200,
        {"allocations": [{"resource_id": h.id, "reservations": allocs.get(h.id, [])} for h in _hosts(req)]},
    )


def _host(req: Request):
    for h in _hosts(req):
        if h.id == req.params["id"] or h.uid == req.params["id"]:
            return h
    raise HTTPError(404, f"Host '{req.params['id']}' not found!", "HostNotFound")


@router.route("GET", "/os-hosts/{id}")
def get_host(req: Request) -> Response:
    return Response(200, {"host": host_view(_host(req))})


@router.route("GET", "/os-hosts/{id}/allocation")
def get_allocation(req: Request) -> Response:
    host = _host(req)
    return Response(
        200, {"allocation": {"resource_id": host.id, "reservations": _allocations(req).get(host.id, [])}}
    )
