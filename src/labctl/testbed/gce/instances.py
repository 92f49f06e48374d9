"""Compute Engine instances: get, list, aggregatedList, insert (placement, capacity, quotas), delete, access
configs."""

from __future__ import annotations

from labctl.testbed.gce import catalog
from labctl.testbed.gce import world as w
from labctl.testbed.gce.common import (
    USER,
    ApiError,
    Call,
    aggregated_page,
    check_labels,
    check_name,
    check_project,
    idempotent,
    invalid,
    links,
    list_page,
    not_found,
    parse_ref,
    scaled,
    scheduled_delete,
    zone_param,
)
from labctl.testbed.gce.networks import pick_network_ip, place_nic
from labctl.testbed.gce.scheduling import check_scheduling, set_end
from labctl.testbed.gce.world import Db
from labctl.testbed.gce.zones import resolve_image


# ------------------------------------------------------------------------------------ instances
def get_instance(db: Db, call: Call, zone: str, name: str) -> dict:
    inst = db.get("instance", call.project, f"zones/{zone}", name)
    if inst is None:
        raise not_found(f"projects/{call.project}/zones/{zone}/instances/{name}")
    return inst


def instances_get(call: Call) -> dict:
    check_project(call)
    zone = zone_param(call)
    with call.world.read() as db:
        return links(w.render_instance(get_instance(db, call, zone, call.params["name"]), db.now), call.base)


def instances_list(call: Call) -> dict:
    check_project(call)
    zone = zone_param(call)
    with call.world.read() as db:
        items = [w.render_instance(i, db.now) for i in db.find("instance", call.project, f"zones/{zone}")]
    return list_page(call, "compute#instanceList", items, f"projects/{call.project}/zones/{zone}/instances")


def instances_aggregated(call: Call) -> dict:
    check_project(call)
    per: dict[str, list[dict]] = {f"zones/{z}": [] for z in catalog.ZONES}
    with call.world.read() as db:
        for inst in db.find("instance", call.project):
            per[inst["_scope"]].append(w.render_instance(inst, db.now))
    return aggregated_page(call, "compute#instanceAggregatedList", "instances", per,
                       f"projects/{call.project}/aggregated/instances")


def _static_for(db: Db, call: Call, region: str, ip: str, field_name: str) -> dict:
    for addr in db.find("address", call.project, f"regions/{region}"):
        if addr["address"] == ip:
            if addr["status"] != "RESERVED":
                raise ApiError(400, f"The IP address '{ip}' is already being used by another resource.",
                               "resourceInUseByAnotherResource")
            return addr
    raise invalid(field_name, ip, f"The specified external IP address '{ip}' was not found in region '{region}'.")


def _access_config(db: Db, call: Call, region: str, ac: dict, field_name: str, inst_link: str) -> dict:
    if ac.get("type", "ONE_TO_ONE_NAT") != "ONE_TO_ONE_NAT":
        raise invalid(f"{field_name}.type", ac.get("type"), "Only ONE_TO_ONE_NAT is supported.")
    out = {"kind": "compute#accessConfig", "type": "ONE_TO_ONE_NAT", "name": ac.get("name") or "External NAT",
           "networkTier": ac.get("networkTier") or "PREMIUM"}
    if ac.get("natIP"):
        addr = _static_for(db, call, region, ac["natIP"], f"{field_name}.natIP")
        addr["status"] = "IN_USE"
        addr["users"] = [inst_link]
        db.put("address", addr)
        out["natIP"] = addr["address"]
    else:
        out["natIP"] = w.external_ip(db.counter("external_ip"))
    return out


def quota_error(metric: str, limit: float, region: str) -> dict:
    return {"errors": [{
        "code": "QUOTA_EXCEEDED",
        "message": f"Quota '{metric}' exceeded.  Limit: {limit:.1f} in region {region}.",
        "errorDetails": [{"quotaInfo": {"metricName": f"compute.googleapis.com/{metric.lower()}",
                                        "limitName": f"{metric.replace('_', '-')}-per-project-region",
                                        "dimensions": {"region": region}, "limit": limit}}],
    }]}


def _exhausted_error(project: str, zone: str, what: str) -> dict:
    return {"errors": [{
        "code": "ZONE_RESOURCE_POOL_EXHAUSTED",
        "message": f"The zone 'projects/{project}/zones/{zone}' does not have enough resources available to "
                   "fulfill the request.  Try a different zone, or try again later.",
        "errorDetails": [{"errorInfo": {"reason": "resource_availability", "domain": "compute.googleapis.com",
                                        "metadatas": {"zone": zone, "vmType": what}}}],
    }]}


def instances_insert(call: Call) -> dict:
    check_project(call)
    zone = zone_param(call)
    region = catalog.ZONES[zone]
    body = call.json()
    name = check_name(body.get("name"))
    labels = check_labels(body.get("labels"))

    def perform(db: Db) -> dict:
        scope = f"zones/{zone}"
        link = f"projects/{call.project}/{scope}/instances/{name}"
        if db.get("instance", call.project, scope, name) is not None:
            raise ApiError(409, f"The resource '{link}' already exists", "alreadyExists")
        mt_ref = body.get("machineType")
        if not mt_ref:
            raise ApiError(400, "Invalid value for field 'resource.machineType': ''. Machine type is required.",
                           "invalid")
        mt_parsed = parse_ref(mt_ref, "resource.machineType", ("machineTypes",), call.project, zone=zone,
                              bare=True)
        if mt_parsed.project != call.project:
            raise not_found(mt_parsed.rel)
        mt_name = mt_parsed.name
        mt = catalog.machine_type_in_zone(mt_name, zone) if mt_parsed.where == zone else None
        if mt is None:
            # as on Compute Engine: a 400 that names the zone (labctl's adapter moves on to the next zone)
            raise invalid("resource.machineType", mt_ref,
                          f"Machine type with name '{mt_name}' does not exist in zone '{zone}'.")
        accelerators = []
        for i, acc in enumerate(body.get("guestAccelerators") or []):
            if not isinstance(acc, dict):
                raise invalid(f"resource.guestAccelerators[{i}]", acc, "Must be an object.")
            field_name = f"resource.guestAccelerators[{i}].acceleratorType"
            acc_ref = parse_ref(acc.get("acceleratorType"), field_name, ("acceleratorTypes",), call.project,
                                zone=zone, bare=True)
            acc_name = acc_ref.name
            a = catalog.accelerator_in_zone(acc_name, zone) if acc_ref.where == zone else None
            if acc_ref.project != call.project:
                raise not_found(acc_ref.rel)
            if a is None:
                raise invalid(field_name, acc.get("acceleratorType"),
                              f"Accelerator type '{acc_name}' does not exist in zone '{zone}'.")
            count = int(acc.get("acceleratorCount", 1))
            if not 1 <= count <= a.max_cards:
                raise invalid(f"resource.guestAccelerators[{i}].acceleratorCount", count,
                              f"At most {a.max_cards} cards of {acc_name} per instance.")
            if mt.family != "n1":
                raise ApiError(400, f"Invalid resource usage: 'Machine type {mt_name} does not support "
                               "attaching guest accelerators.'", "invalid")
            accelerators.append({"acceleratorType": f"projects/{call.project}/{scope}/acceleratorTypes/{acc_name}",
                                 "acceleratorCount": count})
        scheduling, time_limit = check_scheduling(body.get("scheduling"), "resource.scheduling", db.now)
        if (accelerators or mt.accelerator) and scheduling["onHostMaintenance"] != "TERMINATE":
            raise ApiError(400, "Invalid resource usage: 'Instances with guest accelerators do not support "
                           "live migration.'.", "invalid")
        disks = body.get("disks") or []
        boot = [d for d in disks if d.get("boot")] or disks[:1]
        if not boot:
            raise ApiError(400, "Invalid value for field 'resource.disks': ''. Boot disk must be specified.",
                           "invalid")
        params = boot[0].get("initializeParams") or {}
        if not params.get("sourceImage"):
            raise ApiError(400, "Invalid value for field 'resource.disks[0].initializeParams.sourceImage': ''. "
                           "Source image must be specified.", "invalid")
        img = resolve_image(call, params["sourceImage"])
        size = int(params.get("diskSizeGb") or img.disk_size_gb)
        if size < img.disk_size_gb:
            raise invalid("resource.disks[0].initializeParams.diskSizeGb", size,
                          f"Requested disk size cannot be smaller than the image size ({img.disk_size_gb} GB)")
        nics_in = body.get("networkInterfaces") or [{}]
        if len(nics_in) != 1:
            raise invalid("resource.networkInterfaces", len(nics_in), "The emulator supports one interface.")
        nic_in = nics_in[0]
        network, subnetwork, wanted_ip = place_nic(db, call, region, nic_in)
        acs_in = nic_in.get("accessConfigs") or []
        if len(acs_in) > 1:
            raise invalid("resource.networkInterfaces[0].accessConfigs", len(acs_in),
                          "At most one access config currently supported.")
        # quotas (per region), then capacity (per zone): failures show in the DONE operation
        want = w.instance_quota({"machineType": mt.name, "guestAccelerators": accelerators,
                                 "networkInterfaces": [{"accessConfigs": [{"natIP": "x"}] if acs_in else []}]})
        usage = call.world.quota_usage(region, db)
        error = http = None
        for metric, amount in want.items():
            limit = call.world.quota(region, metric, db)
            if usage.get(metric, 0.0) + amount > limit:
                error, http = quota_error(metric, limit, region), (403, "FORBIDDEN")
                break
        if error is None:
            live = db.find("instance", call.project, scope)
            if sum(1 for i in live if i["machineType"].rsplit("/", 1)[-1] == mt.name) + 1 > \
                    call.world.capacity(zone, mt.name, db):
                error = _exhausted_error(call.project, zone, mt.name)
            for acc in accelerators:
                acc_name = acc["acceleratorType"].rsplit("/", 1)[-1]
                used = sum(int(a["acceleratorCount"]) for i in live for a in i.get("guestAccelerators", [])
                           if a["acceleratorType"].rsplit("/", 1)[-1] == acc_name)
                if used + acc["acceleratorCount"] > call.world.capacity(zone, acc_name, db):
                    error = _exhausted_error(call.project, zone, f"{mt.name}+{acc_name}")
            if error is not None:
                http = (503, "SERVICE UNAVAILABLE")
        network_ip = None
        if error is None and subnetwork is not None:
            network_ip, error = pick_network_ip(db, call, subnetwork, wanted_ip)
            if error is not None:
                http = (400, "BAD REQUEST")
        inst_id = w.new_id()
        if error is not None:
            return w.new_operation(db, call.project, scope, "insert", link, inst_id, scaled(call, w.FAILED_OP),
                                   user=USER, error=error, http_status=http[0], http_message=http[1])
        k = db.counter(f"internal_ip:{region}")
        access_configs = [_access_config(db, call, region, ac, "resource.networkInterfaces[0].accessConfigs[0]",
                                         link) for ac in acs_in]
        metadata_items = [{"key": str(i.get("key")), "value": str(i.get("value", ""))}
                          for i in (body.get("metadata") or {}).get("items", [])]
        now = db.now
        inst = {
            "kind": "compute#instance", "id": inst_id, "creationTimestamp": w.rfc3339(now), "name": name,
            "description": str(body.get("description", "")),
            "tags": {"items": list((body.get("tags") or {}).get("items", [])), "fingerprint": w.fingerprint()},
            "machineType": f"projects/{call.project}/{scope}/machineTypes/{mt.name}",
            "zone": f"projects/{call.project}/{scope}",
            "canIpForward": bool(body.get("canIpForward", False)),
            "networkInterfaces": [{
                "kind": "compute#networkInterface", "network": network,
                "subnetwork": (subnetwork or {}).get("selfLink")
                or f"projects/{call.project}/regions/{region}/subnetworks/{network.rsplit('/', 1)[-1]}",
                "networkIP": network_ip or f"10.128.{k // 250}.{k % 250 + 2}", "name": "nic0",
                "fingerprint": w.fingerprint(),
                "stackType": "IPV4_ONLY", "accessConfigs": access_configs,
            }],
            "disks": [{
                "kind": "compute#attachedDisk", "type": "PERSISTENT", "mode": "READ_WRITE",
                "source": f"projects/{call.project}/{scope}/disks/{params.get('diskName') or name}",
                "deviceName": boot[0].get("deviceName") or name, "index": 0, "boot": True,
                "autoDelete": bool(boot[0].get("autoDelete", True)), "interface": "SCSI",
                "diskSizeGb": str(size), "architecture": img.architecture,
                "licenses": [f"projects/{img.project}/global/licenses/{img.family}"],
                "guestOsFeatures": [{"type": "VIRTIO_SCSI_MULTIQUEUE"}, {"type": "UEFI_COMPATIBLE"}],
            }],
            "metadata": {"kind": "compute#metadata", "fingerprint": w.fingerprint(), "items": metadata_items},
            "serviceAccounts": list(body.get("serviceAccounts") or []),
            "selfLink": link,
            "scheduling": scheduling,
            "cpuPlatform": "Intel Broadwell" if mt.family == "n1" else "Intel Cascade Lake",
            "labels": labels, "labelFingerprint": w.fingerprint(),
            "startRestricted": False, "deletionProtection": bool(body.get("deletionProtection", False)),
            "fingerprint": w.fingerprint(), "satisfiesPzi": True,
            "_project": call.project, "_scope": scope,
            "_staging_at": now + scaled(call, w.INSTANCE_STAGING_AT),
            "_running_at": now + scaled(call, w.INSTANCE_RUNNING_AT),
        }
        if accelerators:
            inst["guestAccelerators"] = accelerators
        set_end(call, inst, time_limit, now)
        db.put("instance", inst)
        return w.new_operation(db, call.project, scope, "insert", link, inst_id,
                               scaled(call, w.INSERT_OP["instances"]), user=USER)

    return idempotent(call, perform)


def instances_delete(call: Call) -> dict:
    check_project(call)
    zone = zone_param(call)

    def perform(db: Db) -> dict:
        inst = get_instance(db, call, zone, call.params["name"])
        return scheduled_delete(db, call, "instance", inst, "instances", _stopping_at=db.now)

    return idempotent(call, perform)


def instances_add_access_config(call: Call) -> dict:
    check_project(call)
    zone = zone_param(call)
    body = call.json()

    def perform(db: Db) -> dict:
        inst = get_instance(db, call, zone, call.params["name"])
        nic_name = call.q("networkInterface") or "nic0"
        nic = next((n for n in inst["networkInterfaces"] if n["name"] == nic_name), None)
        if nic is None:
            raise invalid("networkInterface", nic_name, "No such network interface.")
        if nic.get("accessConfigs"):
            raise ApiError(400, "At most one access config currently supported.", "invalid")
        region = catalog.ZONES[zone]
        nic["accessConfigs"] = [_access_config(db, call, region, body, "resource", inst["selfLink"])]
        db.put("instance", inst)
        return w.new_operation(db, call.project, inst["_scope"], "addAccessConfig", inst["selfLink"], inst["id"],
                               scaled(call, w.ACCESS_CONFIG_OP), user=USER)

    return idempotent(call, perform)


def instances_delete_access_config(call: Call) -> dict:
    check_project(call)
    zone = zone_param(call)
    ac_name = call.q("accessConfig")
    nic_name = call.q("networkInterface")
    if not ac_name or not nic_name:
        raise ApiError(400, "Required parameters 'accessConfig' and 'networkInterface' not specified",
                       "required")

    def perform(db: Db) -> dict:
        inst = get_instance(db, call, zone, call.params["name"])
        nic = next((n for n in inst["networkInterfaces"] if n["name"] == nic_name), None)
        if nic is None:
            raise invalid("networkInterface", nic_name, "No such network interface.")
        kept, dropped = [], []
        for ac in nic.get("accessConfigs", []):
            (dropped if ac.get("name") == ac_name else kept).append(ac)
        if not dropped:
            raise invalid("accessConfig", ac_name, "No access config with that name.")
        nic["accessConfigs"] = kept
        for ac in dropped:
            if ac.get("natIP"):
                w.release_static(db, call.project, inst, only_ip=ac["natIP"])
        db.put("instance", inst)
        return w.new_operation(db, call.project, inst["_scope"], "deleteAccessConfig", inst["selfLink"],
                               inst["id"], scaled(call, w.ACCESS_CONFIG_OP), user=USER)

    return idempotent(call, perform)
