"""EBS volumes (gp3, in their server's zone, kept across `down` by tag) and their attachments; S3 buckets."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

from labctl import naming
from labctl.errors import CloudError
from labctl.providers.aws import session
from labctl.providers.aws.session import TABLE, AwsSession, Ec2Kind, Item, tag_spec, tagged, tags_of
from labctl.providers.base import Found

if TYPE_CHECKING:
    from labctl.plan import BucketSpec, Plan, Resource, VolumeAttachmentSpec, VolumeSpec

log = logging.getLogger(__name__)

KEEP_TAG = "labctl:keep"  # "true" when `down` keeps the volume / bucket (Chameleon's VOLUME_KEEP metadata)
VOLUME_TAG = "labctl:volume"  # the profile's name of a data volume (root volumes do not have it)
BUCKET_TAG = "labctl:bucket"  # the profile's name of an object store
VOLUME_DEVICES = "fghijklmnop"  # /dev/sdf, /dev/sdg...: a node's data volumes, in plan order
NVME_BY_ID = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_"
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def bucket_name(name: str) -> str | None:
    """The S3 bucket name for a resource name (lower case, '_' -> '-'), or None if it cannot be a valid one
    (3-63 characters of a-z 0-9 . -, starting and ending with a letter or digit, not an IP address...)."""
    out = name.lower().replace("_", "-")
    bad = (not _BUCKET_NAME.match(out) or any(s in out for s in ("..", ".-", "-.")) or out.endswith(
        ("-s3alias", "--ol-s3", "--x-s3")) or re.match(r"^\d+\.\d+\.\d+\.\d+$", out) or out.startswith(
        ("xn--", "sthree-")))
    return None if bad else out


def bad_bucket(p: AwsSession, res: Resource) -> str:
    return (f"{p.site.name}: object store '{res.spec.get('bucket', res.name)}' would be the S3 bucket "
            f"'{res.name.lower()}', which is not a valid bucket name (3-63 characters of a-z, 0-9, '.' and '-'); "
            "use a shorter lab, owner or store name, or `labctl up --name`")


# -- volumes -----------------------------------------------------------------------------------------------------
def volume_found(vol: Item) -> Found:
    tags, state = tags_of(vol.get("Tags")), vol["State"]
    status = {"available": "ready", "in-use": "ready", "error": "error"}.get(state, "pending")
    name = tags.get(VOLUME_TAG)
    return Found("volume", vol["VolumeId"], tags.get("Name", vol["VolumeId"]), status=status,
                 error="volume went to error" if status == "error" else None, attrs={
                     "zone": vol["AvailabilityZone"], "size_gb": vol["Size"], "keep": tags.get(KEEP_TAG) == "true",
                     "volume_status": state, **({"key": f"volume:{name}"} if name else {}),
                     "attachments": [{"instance_id": a.get("InstanceId"), "device": a.get("Device"),
                                      "state": a.get("State")} for a in vol.get("Attachments") or []]})


# Data volumes only (tagged labctl:volume; root volumes go with their instance), but those going away.
VOLUMES = Ec2Kind("volume", "volume", "describe_volumes", "Volumes", "VolumeId", volume_found, created="CreateTime",
                  owned=({"Name": "tag-key", "Values": [VOLUME_TAG]},
                         {"Name": "status", "Values": ["creating", "available", "in-use", "error"]}))
session.KINDS.append(VOLUMES)


def get_volume(p: AwsSession, volume_id: str) -> Item | None:
    out = p.call("get volume", lambda: p.ec2.describe_volumes(VolumeIds=[volume_id]), missing_ok=True)
    return next(iter((out or {}).get("Volumes") or []), None)


def detach(p: AwsSession, volume_id: str, instance_ids: Sequence[str]) -> None:
    """Detach the volume from these instances (detached already is fine) and wait until none of them holds it."""
    for iid in instance_ids:
        try:
            p.call("detach volume", lambda iid=iid: p.ec2.detach_volume(VolumeId=volume_id, InstanceId=iid),
                   missing_ok=True)
        except CloudError as exc:
            if "IncorrectState" not in str(exc):
                raise
    if instance_ids:
        p.until(f"volume {volume_id}", lambda: get_volume(p, volume_id), lambda v: "error" if v["State"] == "error"
                else "pending" if set(instance_ids) & {a.get("InstanceId") for a in v.get("Attachments") or []}
                else "done", 600)


def holders(vol: Item | None, but: str | None = None) -> list[str]:
    return [a["InstanceId"] for a in (vol or {}).get("Attachments") or [] if a.get("InstanceId") != but]


def find_volume(p: AwsSession, res: Resource, plan: Plan) -> Found | None:
    vols = VOLUMES.list(p, tagged(plan, name=res.name), owned=True)
    key = lambda v: (v["State"] == "error", str(v.get("CreateTime") or ""), v["VolumeId"])  # noqa: E731
    return volume_found(min(vols, key=key)) if vols else None


def create_volume(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    spec = cast("VolumeSpec", res.spec)
    keep = "true" if spec.get("keep") else "false"
    if (existing := find_volume(p, res, plan)) is not None and existing.status != "error":
        if existing.attrs["keep"] != bool(spec.get("keep")):  # the profile changed its mind
            p.call("tag volume", lambda: p.ec2.create_tags(Resources=[existing.cloud_id],
                                                          Tags=[{"Key": KEEP_TAG, "Value": keep}]))
            existing.attrs["keep"] = bool(spec.get("keep"))
        log.info("%s: reusing volume %s (%s)", p.site.name, existing.cloud_id, existing.attrs.get("zone"))
        return existing
    server = deps[spec["server"]]
    if not (zone := server.attrs.get("zone")):
        raise CloudError(f"{p.site.name}: no zone known for the server of volume {res.name}")
    # A data volume is made by itself and attached (never DeleteOnTermination): the end of its instance (the lease
    # timer's power-off) leaves it, as `down` does.
    found = volume_found(p.call(f"create volume {res.name}", lambda: p.ec2.create_volume(
        AvailabilityZone=zone, Size=int(spec["size_gb"]), VolumeType="gp3",
        ClientToken=session.token(plan.deployment, spec["volume"], server.cloud_id),
        TagSpecifications=tag_spec(plan, "volume", node=spec["node"], name=res.name,
                                   **{KEEP_TAG: keep, VOLUME_TAG: spec["volume"]}))))
    log.info("%s: made volume %s (%d GiB, %s)", p.site.name, found.cloud_id, int(spec["size_gb"]), zone)
    return found


def delete_volumes(p: AwsSession, found: Sequence[Found], plan: Plan) -> None:
    ids = [f.cloud_id for f in found]
    for volume_id in ids:  # still attached (an instance not terminated): detach first
        detach(p, volume_id, holders(get_volume(p, volume_id)))
    for volume_id in ids:
        p.in_use_retry("delete volume", lambda v=volume_id: p.ec2.delete_volume(VolumeId=v), codes=("VolumeInUse",))
    for volume_id in ids:
        p.until(f"volume {volume_id}", lambda v=volume_id: get_volume(p, v),
                lambda v: "done" if v["State"] == "deleted" else "pending", 600)
    log.info("%s: deleted %s", p.site.name, ", ".join(ids))


# -- attachments ---------------------------------------------------------------------------------------------------
def attachment_found(res: Resource, plan: Plan, server_id: str, volume_id: str, state: str) -> Found:
    """As the guest finds it: /dev/sdf for a node's first volume, /dev/sdg for its second... (plan order), by its
    NVMe by-id link (Nitro), then the Xen names."""
    mine = [r.key for r in plan.by_kind("volume_attachment") if r.spec.get("node") == res.spec.get("node")]
    device = f"/dev/sd{VOLUME_DEVICES[min(mine.index(res.key) if res.key in mine else 0, len(VOLUME_DEVICES) - 1)]}"
    return Found("volume_attachment", f"{server_id}/{volume_id}", res.name,
                 status="ready" if state == "attached" else "pending", attrs={
                     "server_id": server_id, "volume_id": volume_id, "device": device,
                     "device_paths": [f"{NVME_BY_ID}{volume_id.replace('-', '')}", f"/dev/xvd{device[-1]}", device]})


def find_attachment(p: AwsSession, res: Resource, plan: Plan) -> Found | None:
    if "volume" not in res.spec or "server" not in res.spec:
        return None  # a teardown look-up: attachments are found through list_owned
    vol = find_volume(p, plan.get(res.spec["volume"]), plan)
    server = p.find(plan.get(res.spec["server"]), plan) if vol is not None else None
    if vol is None or server is None:
        return None
    return next((attachment_found(res, plan, server.cloud_id, vol.cloud_id, a["state"]) for a in vol.attrs[
        "attachments"] if a["instance_id"] == server.cloud_id and a["state"] in ("attaching", "attached")), None)


def create_attachment(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    spec = cast("VolumeAttachmentSpec", res.spec)
    volume_id, server_id = deps[spec["volume"]].cloud_id, deps[spec["server"]].cloud_id
    if (vol := get_volume(p, volume_id)) is None:
        raise CloudError(f"{p.site.name}: volume {volume_id} is gone")
    for a in vol.get("Attachments") or []:
        if a.get("InstanceId") == server_id and a.get("State") in ("attaching", "attached"):
            return attachment_found(res, plan, server_id, volume_id, a["State"])
    if others := holders(vol, server_id):  # the instance of an earlier `up` that is still going away
        log.info("%s: detaching volume %s from %s first", p.site.name, volume_id, ", ".join(others))
        detach(p, volume_id, others)
    try:
        out = p.call(f"attach volume {volume_id} to {spec['node']}", lambda: p.ec2.attach_volume(
            VolumeId=volume_id, InstanceId=server_id, Device=attachment_found(res, plan, "", "", "").attrs["device"]))
        state = out.get("State") or "attaching"
    except CloudError as exc:
        if "VolumeInUse" not in str(exc):
            raise
        vol = get_volume(p, volume_id) or {}  # a retry after a lost answer: attached here already?
        if not (mine := [a for a in vol.get("Attachments") or [] if a.get("InstanceId") == server_id]):
            raise
        state = mine[0].get("State") or "attaching"
    return attachment_found(res, plan, server_id, volume_id, state)


def delete_attachments(p: AwsSession, found: Sequence[Found], plan: Plan) -> None:
    pairs = [(f.attrs.get("server_id") or f.cloud_id.partition("/")[0],
              f.attrs.get("volume_id") or f.cloud_id.partition("/")[2]) for f in found]
    for instance_id, volume_id in pairs:
        detach(p, volume_id, [instance_id])
    log.info("%s: detached %s", p.site.name, ", ".join(v for _, v in pairs))


def attachments_of(vol: Found) -> list[Found]:
    return [Found("volume_attachment", f"{a['instance_id']}/{vol.cloud_id}", f"{vol.name}-attachment",
                  attrs={"server_id": a["instance_id"], "volume_id": vol.cloud_id, "device": a["device"]})
            for a in vol.attrs["attachments"]]


def poll(p: AwsSession, storage: Sequence[tuple[Resource, Found]], results: dict[str, Found], missing: bool,
         on_progress: Callable[[str, str, str], None]) -> None:
    """One DescribeVolumes for every pending volume and attachment; `missing`: absent ones are errors now."""
    ids = sorted({f.attrs.get("volume_id") or f.cloud_id for _, f in storage})
    vols = {v["VolumeId"]: v for v in VOLUMES.list(p, [{"Name": "volume-id", "Values": ids}])}
    for r, f in storage:
        vol = vols.get(f.attrs.get("volume_id") or f.cloud_id)
        if r.kind == "volume":
            if vol is not None:
                results[r.key] = volume_found(vol)
            elif missing:
                f.status, f.error = "error", "volume disappeared"
            on_progress(r.key, results[r.key].attrs.get("volume_status") or results[r.key].status,
                        results[r.key].error or "")
            continue
        mine = [a for a in (vol or {}).get("Attachments") or [] if a.get("InstanceId") == f.attrs.get("server_id")]
        state = mine[0].get("State") if mine else None
        if state == "attached":
            f.status = "ready"
        elif state in ("detaching", "detached") or (state is None and missing):
            f.status, f.error = "error", f"volume {f.attrs.get('volume_id')} did not attach ({state})"
        on_progress(r.key, state or "attaching", f.error or "")


# -- buckets ---------------------------------------------------------------------------------------------------------
def bucket_tags(p: AwsSession, name: str) -> dict[str, str] | None:
    """A bucket's tags ({} if none), or None if there is no such bucket of this account."""
    from botocore.exceptions import ClientError

    def get() -> dict[str, str] | None:
        try:
            return tags_of(p.s3.get_bucket_tagging(Bucket=name)["TagSet"])
        except ClientError as exc:
            code = exc.response["Error"].get("Code")
            if code == "NoSuchTagSet":
                return {}
            if code in session.S3_MISSING or code in ("403", "AccessDenied"):  # 403: another account's bucket
                return None
            raise

    return p.call(f"get tags of bucket {name}", get)


def bucket_found(name: str, tags: Mapping[str, str], key: str | None = None) -> Found:
    key = key or (f"bucket:{tags[BUCKET_TAG]}" if tags.get(BUCKET_TAG) else None)
    return Found("bucket", name, name, attrs={"keep": tags.get(KEEP_TAG) == "true", **({"key": key} if key else {})})


def buckets(p: AwsSession, deployment: str | None = None) -> list[Found]:
    """The buckets labctl made (of `deployment`, or of any), with what `inventory` reports. For a deployment, only
    the buckets whose name could be its are asked for their tags."""
    out = []
    for b in p.call("list buckets", lambda: p.s3.list_buckets()).get("Buckets") or []:
        if deployment and not b["Name"].startswith(f"{deployment.lower()}-"):
            continue
        owner = (tags := bucket_tags(p, b["Name"]) or {}).get(naming.TAG_DEPLOYMENT)
        if owner and owner == (deployment or owner):
            out.append(session.labelled(bucket_found(b["Name"], tags), tags, b.get("CreationDate")))
    return out


def find_bucket(p: AwsSession, res: Resource, plan: Plan) -> Found | None:
    name = bucket_name(res.name)
    if name is None or (tags := bucket_tags(p, name)) is None:
        return None  # no such bucket (or another account's)
    if (owner := tags.get(naming.TAG_DEPLOYMENT)) == plan.deployment:
        return bucket_found(name, tags, res.key)
    if owner is None:  # made by a run that crashed before tagging it: create() tags it
        return Found("bucket", name, name, status="incomplete", attrs={"key": res.key, "keep": False})
    return None


def create_bucket(p: AwsSession, res: Resource, plan: Plan, deps: Mapping[str, Found], _c: str | None) -> Found:
    spec = cast("BucketSpec", res.spec)
    if (name := bucket_name(res.name)) is None:
        raise CloudError(bad_bucket(p, res))
    kwargs = {"Bucket": name, **({} if p.region == "us-east-1" else {
        "CreateBucketConfiguration": {"LocationConstraint": p.region}})}
    try:
        p.call(f"create bucket {name}", lambda: p.s3.create_bucket(**kwargs))
    except CloudError as exc:
        if "BucketAlreadyExists" in str(exc) and "BucketAlreadyOwnedByYou" not in str(exc):
            raise CloudError(f"{p.site.name}: the S3 bucket name '{name}' is taken by another AWS account "
                             "(bucket names are global); choose another deployment name with `labctl up --name`"
                             ) from None
        if "BucketAlreadyOwnedByYou" not in str(exc):
            raise
    if (tags := bucket_tags(p, name)) is None:
        raise CloudError(f"{p.site.name}: bucket {name} cannot be read after creating it")
    if (owner := tags.get(naming.TAG_DEPLOYMENT)) not in (None, plan.deployment):
        raise CloudError(f"{p.site.name}: S3 bucket '{name}' belongs to another deployment ({owner})")
    wanted = {**plan.tags, "Name": res.name, KEEP_TAG: "true" if spec.get("keep") else "false",
              BUCKET_TAG: spec.get("bucket") or res.name}
    if any(tags.get(k) != v for k, v in wanted.items()):
        tag_set = [{"Key": k, "Value": v} for k, v in {**tags, **wanted}.items()]
        p.call(f"tag bucket {name}", lambda: p.s3.put_bucket_tagging(Bucket=name, Tagging={"TagSet": tag_set}))
    log.info("%s: bucket %s is ready", p.site.name, name)
    return bucket_found(name, {**tags, **wanted}, res.key)


def delete_buckets(p: AwsSession, found: Sequence[Found], plan: Plan, timeout: float = 300) -> None:
    """Empty each bucket (every object version and delete marker) and delete it; a missing bucket is fine."""
    from botocore.exceptions import ClientError

    for name in (f.cloud_id or f.name for f in found):
        def empty_and_delete(name: str = name) -> None:
            try:
                for page in p.s3.get_paginator("list_object_versions").paginate(Bucket=name):
                    objects = [{"Key": o["Key"], "VersionId": o["VersionId"]}
                               for o in [*(page.get("Versions") or []), *(page.get("DeleteMarkers") or [])]]
                    for i in range(0, len(objects), 1000):
                        out = p.s3.delete_objects(Bucket=name, Delete={"Objects": objects[i:i + 1000], "Quiet": True})
                        if e := (out.get("Errors") or [None])[0]:
                            raise CloudError(f"{p.site.name}: cannot empty bucket {name}: {e.get('Key')}: "
                                             f"{e.get('Code')} {e.get('Message')}")
                p.s3.delete_bucket(Bucket=name)
            except ClientError as exc:
                if exc.response["Error"].get("Code") not in session.S3_MISSING:
                    raise

        # Objects written meanwhile make the delete fail with BucketNotEmpty: empty it again.
        p.in_use_retry(f"delete bucket {name}", empty_and_delete, codes=("BucketNotEmpty",), timeout=timeout)
        p.until(f"bucket {name} (deleted)", lambda name=name: bucket_tags(p, name), lambda _: "pending", timeout)
        log.info("%s: deleted bucket %s", p.site.name, name)


TABLE.register("volume", find=find_volume, create=create_volume, delete=delete_volumes)
TABLE.register("volume_attachment", find=find_attachment, create=create_attachment, delete=delete_attachments)
TABLE.register("bucket", find=find_bucket, create=create_bucket, delete=delete_buckets)
