"""The one small interface every cloud adapter implements.

The engine hands adapters provider-neutral `plan.Resource`s. An adapter translates its SDK's errors into
`labctl.errors` kinds (NoCapacity, QuotaExceeded, RateLimited, Transient, CloudError) and never lets an
SDK exception escape. It imports its SDK lazily, so `labctl --help` loads none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource


@dataclass
class Found:
    """What the cloud says about one resource."""

    kind: str
    cloud_id: str
    name: str
    status: str = "ready"  # ready | pending | error | gone
    attrs: dict[str, Any] = field(default_factory=dict)  # e.g. floating_ip, fixed_ip, node_type, lease_end
    error: str | None = None


# on_progress(node_or_resource_key, stage, detail)
ProgressFn = Callable[[str, str, str], None]


class Provider(Protocol):
    """A cloud adapter. Every method is safe to call again after a crash."""

    def preflight(self, plan: Plan) -> None:
        """Check credentials, images and types before anything is created; raise UserError."""

    def find(self, res: Resource, plan: Plan) -> Found | None:
        """Look the resource up by its deterministic name and labctl's tags."""

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        """Create it (the engine called `find` first). `candidate` is the node type to try, if any."""

    def wait(self, items: Sequence[tuple[Resource, Found]], plan: Plan, timeout: float,
             on_progress: ProgressFn) -> list[Found]:
        """Wait until each is ready or failed, polling all of them in one call per round."""

    def delete(self, kind: str, found: Sequence[Found], plan: Plan) -> None:
        """Delete these (404 is success) and wait until they are gone."""

    def list_owned(self, plan: Plan) -> list[Found]:
        """Everything on the site tagged with this deployment (for `down` after a crash and leak audits)."""

    def extend(self, found: Found, hours: float, plan: Plan) -> Found:
        """Extend a reservation; return it with the new end time in attrs['end']."""


def provider_for(site_provider: str, site: Any, **options: Any) -> Provider:
    """Import only the adapter that this site needs."""
    if site_provider == "chameleon":
        from labctl.providers.chameleon import ChameleonProvider

        return ChameleonProvider(site, **options)
    from labctl.errors import UserError

    raise UserError(f"no provider adapter for '{site_provider}'")
