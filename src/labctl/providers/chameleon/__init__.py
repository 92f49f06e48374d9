"""Chameleon (OpenStack + Blazar) adapter: openstacksdk for Nova/Neutron/Glance/Cinder/Swift, python-blazarclient
for leases, both on one keystoneauth session (`session.py`); one handler per resource kind (`leases.py`,
`servers.py`, `network.py`, `storage.py`) in one table, which `ChameleonProvider` dispatches through.

python-chi's own helpers are deliberately not used on this path because of its traps (see
docs/architecture.md): it leaks floating IPs on delete, takes any unbound floating IP of the project, and
reports a lease in ERROR as success. Here:
- floating IPs are allocated per node, described with the deployment and node, and deleted explicitly;
- a lease in ERROR or a "not enough hosts" answer becomes `NoCapacity`, so the engine tries the next type;
- every lookup is by deterministic name *and* labctl's metadata/description, never "the first one".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from labctl.errors import UserError
from labctl.providers.base import Found, ProgressFn
from labctl.providers.chameleon import leases, network, servers, storage  # noqa: F401 - they fill TABLE
from labctl.providers.chameleon.session import Session
from labctl.providers.kit import wait_each

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource
    from labctl.sites import Site

# `list_owned` asks the kinds in this order (the engine deletes by KIND_ORDER, whatever the order here).
OWNED = ("server", "floating_ip", "reservation", "secgroup", "port", "router", "subnet", "network", "keypair",
         "volume", "bucket")
MISSED_POLLS = 5  # a list shared across threads may predate a create: a resource missing from it this many
#                   polls in a row has disappeared


def describe_credentials(site: Site, cloud: str | None = None) -> str:
    """One line for `labctl sites`: which OpenStack source was found for the site, or what is missing."""
    from labctl.credentials import describe

    return describe(site, cloud)


def connect(site: Site, *, cloud: str | None = None, testbed: Callable[[], Any] | None = None) -> ChameleonProvider:
    """Credentials from clouds.yaml / OS_* variables, or from the emulated testbed for `sim` sites."""
    import dataclasses

    from labctl.credentials import find_openstack_credentials
    from labctl.sites import emulated_poll_interval

    if site.emulated:
        if testbed is None:
            raise UserError(f"{site.name} is emulated but no testbed was given")
        tb = testbed()
        real = site.stands_for or site.name
        site = dataclasses.replace(site, auth_url=tb.auth_url(real), ssh_port=tb.ssh_port or tb.world.ssh_port,
                                   poll_interval=emulated_poll_interval(site, tb.world.time_scale))
        return ChameleonProvider(site, find_openstack_credentials(site, env=tb.os_env(real)))
    return ChameleonProvider(site, find_openstack_credentials(site, cloud=cloud))


class ChameleonProvider(Session):
    """The `Provider` protocol on a `Session`: each method dispatches to the resource kind's handler."""

    def preflight(self, plan: Plan) -> None:
        # Authenticates (a wrong secret fails here, before anything is created) and checks the images.
        self.call("authenticate", lambda: self.conn.authorize())
        for image in sorted({n.image for n in plan.nodes}):
            self.image(image)

    def find(self, res: Resource, plan: Plan) -> Found | None:
        found = self.handlers[res.kind].find(res, plan)
        self.just_found.put((plan.deployment, res.key), found)
        return found

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        try:
            return self.handlers[res.kind].create(res, plan, deps, candidate)
        finally:  # made, or perhaps made (a lost answer): the next find of it must not trust an older listing
            self.wrote(res.kind, res.name, plan.deployment)

    def wait(self, items: Sequence[tuple[Resource, Found]], plan: Plan, timeout: float,
             on_progress: ProgressFn) -> list[Found]:
        return wait_each(self.handlers, items, plan, timeout=timeout, interval=self.poll_interval,
                         on_progress=on_progress, not_found_checks=MISSED_POLLS)

    def delete(self, kind: str, found: Sequence[Found], plan: Plan) -> None:
        try:
            if found:
                self.handlers[kind].delete(found, plan)
        finally:
            self.mark_deleted(plan)

    def list_owned(self, plan: Plan) -> list[Found]:
        return [f for kind in OWNED for f in self.handlers[kind].owned(plan)]

    def extend(self, found: Found, hours: float, plan: Plan) -> Found:
        return leases.extend(self, found, hours)

    def inventory(self) -> list[Found]:
        """Every kind's tagged resources, then the leases the key pairs record (Blazar keeps no tags): a
        deployment's by name, a class's by pattern; an owner the resource does not record (Neutron descriptions
        carry the deployment only) is its deployment's."""
        found = [f for kind in OWNED if kind != "reservation" for f in self.handlers[kind].inventory()]
        marks = [(mark, f.attrs["deployment"]) for f in found if f.kind == "keypair"
                 for mark in f.attrs.get("leases", ())]
        found += self.handlers["reservation"].inventory(marks)
        owners = {f.attrs["deployment"]: f.attrs["owner"] for f in found if f.attrs.get("owner")}
        for f in found:
            f.attrs["owner"] = f.attrs.get("owner") or owners.get(f.attrs["deployment"])
        return found


__all__ = ["ChameleonProvider", "connect", "describe_credentials"]
