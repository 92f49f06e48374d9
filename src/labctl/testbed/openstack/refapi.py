"""Chameleon's resource discovery ("reference") API: sites.json and the nodes of each bare-metal site."""

from __future__ import annotations

from labctl.testbed.http import HTTPError, Request, Response, Router
from labctl.testbed.openstack import catalog as cat
from labctl.testbed.openstack import model

router = Router()


def error_body(status: int, message: str, kind: str | None) -> dict:
    return {"code": status, "message": message}


def _site_doc(req: Request, site: cat.Site) -> dict:
    return {
        "uid": site.uid if site.kind != "kvm" else "kvm",
        "name": site.region,
        "description": f"Emulated {site.region} (labctl testbed)",
        "location": site.location,
        # python-chi's use_site() authenticates at `<web>:5000/v3`: the site's own address when the testbed serves
        # Keystone there (`Testbed.start(site_addresses=True)`), else the site's prefix on the shared endpoint.
        "web": req.site_webs.get(site.name) or f"{req.base_url}/{site.slug}",
        "user_support_contact": "help@chameleoncloud.org",
        "email_contact": "help@chameleoncloud.org",
        "site_class": "core" if site.kind == "baremetal" else "kvm" if site.kind == "kvm" else "edge",
        "latitude": 30.39,
        "longitude": -97.73,
        "type": "site",
        "version": "testbed",
        "links": [{"rel": "self", "href": f"{req.base_url}/refapi/sites/{site.uid}"}],
    }


@router.route("GET", "/sites", auth=False)
def sites(req: Request) -> Response:
    items = [_site_doc(req, s) for s in cat.SITES.values() if s.kind != "kvm"]
    return Response(
        200,
        {
            "items": items,
            "total": len(items),
            "offset": 0,
            "version": "testbed",
            "links": [{"rel": "self", "href": f"{req.base_url}/refapi/sites"}],
        },
    )


def _bm_site(uid: str) -> cat.Site:
    for s in cat.SITES.values():
        if s.uid == uid and s.kind == "baremetal":
            return s
    raise HTTPError(404, f"Site {uid} not found", "NotFound")


@router.route("GET", "/sites/{site}", auth=False)
def site(req: Request) -> Response:
    for s in cat.SITES.values():
        if s.uid == req.params["site"] and s.kind != "kvm":
            return Response(200, _site_doc(req, s))
    raise HTTPError(404, f"Site {req.params['site']} not found", "NotFound")


def node_doc(req: Request, site: cat.Site, h: cat.Host) -> dict:
    gpu = {"gpu": h.gpus > 0}
    if h.gpus:
        gpu.update(gpu_count=h.gpus, gpu_model=h.gpu_model, gpu_vendor=h.gpu_vendor)
    return {
        "uid": h.uid,
        "node_name": h.node_name,
        "node_type": h.node_type,
        "type": "node",
        "architecture": {"platform_type": h.arch, "smp_size": 2, "smt_size": 48},
        "bios": {"vendor": "Dell Inc.", "version": "2.0", "release_date": "01/01/2024"},
        "processor": {
            "model": "Intel Xeon" if h.arch == "x86_64" else "Ampere Altra",
            "clock_speed": 2_400_000_000,
            "instruction_set": "x86-64" if h.arch == "x86_64" else "arm64",
            "vendor": "Intel",
        },
        "gpu": gpu,
        "main_memory": {"humanized_ram_size": "192 GiB", "ram_size": 206158430208},
        "network_adapters": [
            {
                "device": "eno1",
                "enabled": True,
                "mounted": True,
                "interface": "Ethernet",
                "rate": 10_000_000_000,
                "mac": cat.mac_for(h.uid),
            }
        ],
        "storage_devices": [
            {
                "device": "sda",
                "size": 240_057_409_536,
                "interface": "SATA",
                "driver": "ahci",
                "humanized_size": "240 GB",
                "model": "SSD",
                "media_type": "SSD",
            }
        ],
        "placement": {"node": h.node_name.rsplit("-", 1)[-1], "rack": "1"},
        "monitoring": {"wattmeter": False},
        "supported_job_types": {"virtual": "ivt", "deploy": True},
        "version": "testbed",
        "links": [
            {
                "rel": "self",
                "href": f"{req.base_url}/refapi/sites/{site.uid}/clusters/chameleon/nodes/{h.uid}",
            }
        ],
    }


def _nodes(req: Request) -> tuple[cat.Site, list[cat.Host]]:
    if req.params.get("cluster", "chameleon") != "chameleon":
        raise HTTPError(404, f"Cluster {req.params['cluster']} not found", "NotFound")
    site = _bm_site(req.params["site"])
    with req.world.read() as db:
        return site, model.site_hosts(db, site)


@router.route("GET", "/sites/{site}/clusters/{cluster}/nodes", auth=False)
def nodes(req: Request) -> Response:
    site, hosts = _nodes(req)
    items = [node_doc(req, site, h) for h in hosts]
    return Response(200, {"items": items, "total": len(items), "offset": 0, "version": "testbed"})


@router.route("GET", "/sites/{site}/clusters/{cluster}/nodes/{uid}", auth=False)
def node(req: Request) -> Response:
    site, hosts = _nodes(req)
    for h in hosts:
        if req.params["uid"] in (h.uid, h.node_name):
            return Response(200, node_doc(req, site, h))
    raise HTTPError(404, f"Node {req.params['uid']} not found", "NotFound")
