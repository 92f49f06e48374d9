"""`GcpProvider`: the Provider protocol over the per-kind handlers of `HANDLERS`; `connect`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from labctl import naming
from labctl.errors import CredentialsError, UserError
from labctl.providers.base import Found, ProgressFn
from labctl.providers.gcp import instances, resources
from labctl.providers.gcp import session as gs
from labctl.providers.gcp.session import HANDLERS, Session, google_credentials, log
from labctl.providers.kit import wait_each

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource
    from labctl.sites import Site


def connect(site: Site, *, cloud: str | None = None, testbed: Callable[[], Any] | None = None) -> GcpProvider:
    """Application Default Credentials and a project (`cloud`, GOOGLE_CLOUD_PROJECT, CLOUDSDK_CORE_PROJECT or
    ADC's), or the emulated Compute Engine of the testbed for `sim-gcp`."""
    if not site.emulated:
        credentials, project = google_credentials(cloud)
        return GcpProvider(site, project, credentials=credentials)
    if testbed is None:
        raise UserError(f"{site.name} is emulated but no testbed was given")
    tb = testbed()
    emu = tb.gce()
    site = dataclasses.replace(site, ssh_port=getattr(tb, "ssh_port", None) or emu.world.ssh_port)
    # The emulated world's own bearer token (private to its owner; registered with labctl.redact).
    return GcpProvider(site, emu.project, credentials=emu.credentials(), endpoint=emu.endpoint)


def describe_credentials(site: Site, cloud: str | None = None) -> str:
    """One line for `labctl sites`: Application Default Credentials and project, or what is missing."""
    try:
        credentials, project = google_credentials(cloud)
    except CredentialsError as exc:
        return f"missing: {exc}"
    return f"found: Application Default Credentials ({type(credentials).__name__}), project {project}"


class GcpProvider(Session):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handlers = HANDLERS.bind(self)

    def preflight(self, plan: Plan) -> None:
        instances.preflight(self, plan)

    def find(self, res: Resource, plan: Plan) -> Found | None:
        return self.handlers[res.kind].find(res, plan) if res.kind in self.handlers else None

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        if res.kind not in self.handlers:
            raise UserError(f"{self.site.name}: labctl does not make '{res.kind}' resources on Compute Engine "
                            f"({res.key})")
        return self.handlers[res.kind].create(res, plan, deps, candidate)

    def delete(self, kind: str, found: Sequence[Found], plan: Plan) -> None:
        if kind not in self.handlers:
            log.warning("%s: nothing to delete for kind %s", self.site.name, kind)
        elif found:
            self.handlers[kind].delete(found, plan)

    def wait(self, items: Sequence[tuple[Resource, Found]], plan: Plan, timeout: float,
             on_progress: ProgressFn) -> list[Found]:
        """Instances from one list per poll round (see `Servers.status`), disks one get each; everything else is
        done when its operation is."""
        polled = {kind for kind, handler in self.handlers.items() if handler.waits}
        items = [(r, dataclasses.replace(f, status="ready") if f.status == "pending" and r.kind not in polled else f)
                 for r, f in items]
        self._waiting.since = time.monotonic()
        try:
            return wait_each(self.handlers, items, plan, timeout=timeout, interval=self.poll_interval,
                             on_progress=on_progress)
        finally:
            self._waiting.since = -1e18

    def list_owned(self, plan: Plan) -> list[Found]:
        """Everything of the deployment (instances, disks and addresses by their labels, the others by the marks
        in their descriptions), and the attachments its instances show."""
        return [f for f, _ in self.marked_founds(plan.deployment)]

    def extend(self, found: Found, hours: float, plan: Plan) -> Found:
        if found.kind != "server":
            raise UserError(f"{self.site.name}: Compute Engine has no leases; a lab's end is each instance's own")
        return instances.extend(self, found, hours)

    def inventory(self) -> list[Found]:
        """Everything in the project and the site's region that labctl marked, of any deployment (see
        `session.marked`): an object without labctl's marks is never listed, whatever its name."""
        found = [(f, obj) for f, obj in self.marked_founds(None) if obj is not None]  # (not attachments)
        for f, obj in found:
            labels = getattr(obj, "labels", None) or {}
            f.attrs.update(deployment=gs.deployment_of(obj), created=instances.iso_utc(obj.creation_timestamp),
                           owner=labels.get(gs.OWNER_LABEL) or gs.described(obj.description, naming.TAG_OWNER))
        return [f for f, _ in found]

    def marked_founds(self, deployment: str | None) -> list[tuple[Found, Any]]:
        """(Found, object) of everything labctl marked (of one deployment, or of all), attachments as their
        instances show them (object None). A deployment's instances: one list of the site's zone(s), as `wait`."""
        listed = (self.list_instances(deployment) if deployment else
                  self.aggregated("list instances", self.instances, "instances", gs.label_filter(None), True))
        out = [(instances.server_found(i, self.site_network), i) for i in listed]
        for kind in ("secgroup", "floating_ip", "network", "subnet", "volume"):
            out += [(resources.FOUND[kind](o, o.name), o) for o in gs.marked(self, kind, deployment)]
        disks = {f.cloud_id for f, _ in out if f.kind == "volume"}
        return out + [(resources.attachment_found(f"{gs.last(d.source)}-attachment", gs.last(i.zone), i.name, disk,
                                                  d.device_name), None)
                      for i in listed for d in i.disks if not d.boot
                      and (disk := gs.rel(d.source).split("/", 2)[-1]) in disks]
