"""Cinder volumes and their attachments, and Swift containers (the plan's "bucket" kind).

Volumes carry the deployment's tags and the profile's name for them in their metadata, containers in their
X-Container-Meta-Labctl-* headers; both may be kept across `down`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from labctl import naming
from labctl.errors import CloudError
from labctl.providers.base import Found
from labctl.providers.chameleon.session import DELETE_TIMEOUT, TABLE, Listed, Session
from labctl.providers.kit import Handler, poll_until

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource

VOLUME_GONE = ("deleting", "deleted", "error_deleting")
VOLUME_BUSY = ("creating", "attaching", "detaching", "in-use", "reserved", "extending", "downloading")
VOLUME_NAME = "labctl:volume"  # volume metadata: the profile's name for it (its key in the plan)
VOLUME_KEEP = "labctl:keep"  # "true" when `down` keeps it
# Swift container metadata (X-Container-Meta-Labctl-*; Swift allows no ':' in a header): labctl's tags, and keep.
CONTAINER_TAGS = {"labctl-deployment": naming.TAG_DEPLOYMENT, "labctl-owner": naming.TAG_OWNER}
CONTAINER_KEEP = "labctl-keep"


@TABLE.handler("volume")
class Volumes(Listed):
    service, sdk, filters, gone = "block_storage", "volume", {"details": True}, VOLUME_GONE

    def shared(self, plan: Plan | None, newer_than: float = -1e18) -> Sequence[Any]:
        # Only where the deployment has volumes: labs without storage cost no extra calls (and sites without
        # the service are never asked).
        if not self.ctx.site.block_storage or (plan is not None and not (
                plan.by_kind("volume") or plan.by_kind("volume_attachment"))):
            return []
        return super().shared(plan, newer_than)

    def found(self, item: Any) -> Found:
        return volume_found(item)

    def fields(self, res: Resource, plan: Plan, deps: Mapping[str, Found]) -> dict[str, Any]:
        metadata = {**plan.tags, VOLUME_NAME: res.spec["volume"], VOLUME_KEEP: "true" if res.spec["keep"] else "false"}
        return {"size": res.spec["size_gb"], "metadata": metadata}

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        for f in found:
            wait_volume(self.ctx, f.cloud_id, lambda v: v.status not in VOLUME_BUSY)
            self.api("delete", f.cloud_id, ignore_missing=True)
        for f in found:
            wait_volume(self.ctx, f.cloud_id, lambda v: False)

    def status(self, res: Resource, found: Found, plan: Plan) -> Found | None:
        vol = get_volume(self.ctx, found.cloud_id)
        return volume_found(vol) if vol is not None else None

    def progress(self, res: Resource, found: Found) -> tuple[str, str, str]:
        return (res.key, found.attrs.get("volume_status", "attaching"), "")

    def owned(self, plan: Plan) -> list[Found]:
        """The deployment's volumes and their attachments."""
        volumes = super().owned(plan)
        return volumes + [attachment_found(f"{v.name}-attachment", a["server_id"], v, a["device"])
                          for v in volumes for a in v.attrs["attachments"]]


@TABLE.handler("volume_attachment")
class Attachments(Handler):
    noun = "volume attachment"
    ctx: Session

    def find(self, res: Resource, plan: Plan) -> Found | None:
        if "volume" not in res.spec or "server" not in res.spec:
            return None  # a teardown lookup: attachments are found through list_owned
        vol = self.ctx.handlers["volume"].find(plan.get(res.spec["volume"]), plan)
        server = self.ctx.handlers["server"].find(plan.get(res.spec["server"]), plan)
        if vol is None or server is None:
            return None
        for a in vol.attrs["attachments"]:
            if a.get("server_id") == server.cloud_id:
                return attachment_found(res.name, server.cloud_id, vol, a.get("device"))
        return None

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        s = self.ctx
        server_id = deps[res.spec["server"]].cloud_id
        vol = s.call("get volume", lambda: s.conn.block_storage.get_volume(deps[res.spec["volume"]].cloud_id))
        for a in vol.attachments or []:
            if a.get("server_id") == server_id:
                return attachment_found(res.name, server_id, volume_found(vol), a.get("device"))
        for a in vol.attachments or []:
            # Attached to a server of an earlier `up` that is still going away: detach it from that one first.
            s.call("detach volume from old server", lambda a=a: s.conn.compute.delete_volume_attachment(
                a["server_id"], vol.id, ignore_missing=True))
        if vol.attachments:
            wait_volume(s, vol.id, lambda v: not v.attachments and v.status == "available")
        att = s.call(f"attach volume {res.name}", lambda: s.conn.compute.create_volume_attachment(server_id, vol.id))
        found = attachment_found(res.name, server_id, volume_found(vol), att.device)
        found.status = "pending"  # until Cinder says in-use
        return found

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        s = self.ctx
        pairs = [f.cloud_id.partition("/")[::2] for f in found]
        for server_id, vol_id in pairs:  # 404: the server or the attachment is gone already
            s.call("detach volume", lambda s_id=server_id, v=vol_id: s.conn.compute.delete_volume_attachment(
                s_id, v, ignore_missing=True), missing_ok=True)
        for server_id, vol_id in pairs:
            wait_volume(s, vol_id, lambda v, s_id=server_id: not any(
                a.get("server_id") == s_id for a in v.attachments or []))

    def status(self, res: Resource, found: Found, plan: Plan) -> Found | None:
        vol = get_volume(self.ctx, found.attrs.get("volume_id") or found.cloud_id)
        if vol is None:
            return None
        attached = [a for a in vol.attachments or [] if a.get("server_id") == found.attrs["server_id"]]
        if vol.status == "in-use" and attached:
            found.status = "ready"
            found.attrs["device"] = attached[0].get("device") or found.attrs.get("device")
        elif vol.status in ("error", "error_attaching") or (vol.status == "available" and found.attrs.get("polled")):
            found.status, found.error = "error", f"volume {vol.id} did not attach (status {vol.status})"
        found.attrs["polled"] = True
        return found

    def progress(self, res: Resource, found: Found) -> tuple[str, str, str]:
        return (res.key, found.attrs.get("volume_status", "attaching"), "")


@TABLE.handler("bucket")
class Containers(Listed):
    """Items are (name, metadata) pairs: Swift lists containers without their metadata (one HEAD each)."""

    def meta(self, name: str) -> dict[str, str] | None:
        """A container's metadata ({} if none), or None if there is no such container."""
        c = self.ctx.call(f"get container {name}", lambda: self.ctx.conn.object_store.get_container_metadata(name),
                          missing_ok=True)
        return None if c is None else {str(k).lower(): str(v) for k, v in (c.metadata or {}).items()}

    def shared(self, plan: Plan | None, newer_than: float = -1e18) -> list[tuple[str, dict[str, str]]]:
        # Fetched anew every time (a HEAD per container): `newer_than` always holds.
        if not self.ctx.site.object_storage or (plan is not None and not plan.by_kind("bucket")):
            return []
        prefix = f"{plan.deployment if plan else naming.PREFIX}-"  # labctl's names: fewer HEADs, tags decide
        names = [c.name for c in self.ctx.call("list containers", lambda: list(
            self.ctx.conn.object_store.containers(prefix=prefix)))]
        return [(name, meta) for name in names if (meta := self.meta(name)) is not None]

    def tags(self, item: tuple[str, dict[str, str]]) -> dict[str, str]:
        return {tag: item[1][key] for key, tag in CONTAINER_TAGS.items() if key in item[1]}

    def found(self, item: tuple[str, dict[str, str]]) -> Found:
        return Found("bucket", item[0], item[0], attrs={"keep": item[1].get(CONTAINER_KEEP) == "true"})

    def find(self, res: Resource, plan: Plan) -> Found | None:
        meta = self.meta(res.name)
        if meta is None or self.tags((res.name, meta)).get(naming.TAG_DEPLOYMENT) != plan.deployment:
            return None
        return Found("bucket", res.name, res.name, attrs={"key": res.key, "keep": meta.get(CONTAINER_KEEP) == "true"})

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        meta = self.meta(res.name)
        if meta is not None and meta.get("labctl-deployment") not in (None, plan.deployment):
            raise CloudError(f"{self.ctx.site.name}: object-store container '{res.name}' belongs to another deployment")
        metadata = {key: plan.tags[tag] for key, tag in CONTAINER_TAGS.items()}
        metadata[CONTAINER_KEEP] = "true" if res.spec["keep"] else "false"
        self.ctx.call(f"create container {res.name}", lambda: put_container(self.ctx, res.name, metadata))
        return Found("bucket", res.name, res.name, attrs={"key": res.key, "keep": bool(res.spec["keep"])})

    def delete(self, found: Sequence[Found], plan: Plan) -> None:
        store = self.ctx.conn.object_store

        def empty_and_delete(name: str) -> None:
            for obj in list(store.objects(name)):
                store.delete_object(obj, container=name, ignore_missing=True)
            store.delete_container(name, ignore_missing=True)

        for f in found:
            self.ctx.call("delete container", lambda f=f: empty_and_delete(f.cloud_id), missing_ok=True)


def put_container(s: Session, name: str, metadata: Mapping[str, str]) -> None:
    """Create (or update: Swift's PUT is idempotent) a container with this metadata, in one request. Not
    `create_container(metadata=)`: openstacksdk writes that metadata into a dict shared by every Container of
    the process and reads it back to send it, so threads making containers at once sent each other's tags."""
    from urllib.parse import quote

    from openstack import exceptions as sdk_exc

    headers = {f"X-Container-Meta-{key}": value for key, value in metadata.items()}
    sdk_exc.raise_from_response(s.conn.object_store.put(f"/{quote(name, safe='')}", headers=headers))


def get_volume(s: Session, volume_id: str) -> Any:
    """The volume, or None when it is gone (404, or Cinder still shows it "deleted")."""
    vol = s.call("get volume", lambda: s.conn.block_storage.get_volume(volume_id), missing_ok=True)
    return None if vol is None or vol.status == "deleted" else vol


def wait_volume(s: Session, volume_id: str, done: Callable[[Any], bool], timeout: float = DELETE_TIMEOUT) -> None:
    """Until `done(volume)` or the volume is gone; a volume in error_deleting / error_detaching is an error."""
    def state(vol: Any) -> str:
        return "done" if done(vol) else vol.status if vol.status in ("error_deleting", "error_detaching") else "busy"

    poll_until(lambda: get_volume(s, volume_id), status=state, pending=("busy",), target=("done", "gone"),
               timeout=timeout, interval=s.poll_interval, not_found_checks=1, what=f"{s.site.name}: volume {volume_id}")


def volume_found(vol: Any) -> Found:
    meta = vol.metadata or {}
    status = {"available": "ready", "in-use": "ready", "error": "error"}.get(vol.status, "pending")
    name = meta.get(VOLUME_NAME)
    return Found("volume", vol.id, vol.name or "", status=status,
                 error=f"volume went to {vol.status}" if status == "error" else None,
                 attrs={"size_gb": vol.size, "volume_status": vol.status, "keep": meta.get(VOLUME_KEEP) == "true",
                        **({"key": f"volume:{name}"} if name else {}),
                        "attachments": [{"server_id": a.get("server_id"), "device": a.get("device")}
                                        for a in vol.attachments or []]})


def attachment_found(name: str, server_id: str, vol: Found, device: str | None) -> Found:
    return Found("volume_attachment", f"{server_id}/{vol.cloud_id}", name,
                 attrs={"server_id": server_id, "volume_id": vol.cloud_id, "device": device})
