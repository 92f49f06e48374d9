"""`GcpProvider`: the Provider protocol over the per-kind handlers of `HANDLERS`; `connect`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from labctl.errors import CredentialsError, UserError
from labctl.providers.base import Found, ProgressFn
from labctl.providers.gcp import instances, names, network, storage
from labctl.providers.gcp.session import HANDLERS, Session, google_credentials, log
from labctl.providers.kit import wait_each

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource
    from labctl.sites import Site


def connect(site: Site, *, cloud: str | None = None, testbed: Callable[[], Any] | None = None) -> GcpProvider:
    """Application Default Credentials and a project (`cloud`, GOOGLE_CLOUD_PROJECT, CLOUDSDK_CORE_PROJECT or
    ADC's), or the emulated Compute Engine of the testbed for `sim-gcp`."""
    if site.emulated:
        if testbed is None:
            raise UserError(f"{site.name} is emulated but no testbed was given")
        tb = testbed()
        emu = tb.gce()
        site = dataclasses.replace(site, ssh_port=getattr(tb, "ssh_port", None) or emu.world.ssh_port)
        # The emulated world's own bearer token (private to its owner; registered with labctl.redact).
        return GcpProvider(site, emu.project, credentials=emu.credentials(), endpoint=emu.endpoint)
    credentials, project = google_credentials(cloud)
    return GcpProvider(site, project, credentials=credentials)


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
        """Everything of the deployment: instances, firewalls, addresses and disks by label; networks and
        subnetworks (no labels) by description; attachments as the deployment's instances show them."""
        listed = self.list_instances(plan.deployment)
        owned = [self.server_found(i) for i in listed]
        owned += [Found("secgroup", f"global/firewalls/{fw.name}", fw.name, attrs={"firewalls": [fw.name]})
                  for fw in network.owned_firewalls(self, plan.deployment)]
        owned += [Found("floating_ip", f"regions/{self.region}/addresses/{a.name}", a.name, attrs={
            "floating_ip": a.address, "node": a.labels.get(names.NODE_LABEL)}) for a in self.listing(
            "list addresses", self.addresses, region=self.region, filter=names.label_filter(plan.deployment))]
        owned += [names.network_found(n, n.name) for n in self.listing("list networks", self.networks)
                  if names.deployment_of(n.description) == plan.deployment]
        owned += [names.subnet_found(sub, sub.name)
                  for sub in self.listing("list subnetworks", self.subnetworks, region=self.region)
                  if names.deployment_of(sub.description) == plan.deployment]
        disks = {d.cloud_id: d for d in storage.owned_disks(self, plan.deployment)}
        owned += disks.values()
        for inst in listed:
            for ad in inst.disks:
                if not ad.boot and (disk := names.disk_id(ad.source)) in disks:
                    owned.append(names.attachment_found(f"{disks[disk].name}-attachment", names.last(inst.zone),
                                                        inst.name, disk, ad.device_name))
        return owned

    def extend(self, found: Found, hours: float, plan: Plan) -> Found:
        log.info("%s: Compute Engine has no leases; nothing to extend (instances run until deleted)", self.site.name)
        found.attrs.setdefault("note", "no leases on GCP: instances run until deleted")
        return found
