"""The one small interface every cloud adapter implements.

The engine hands adapters provider-neutral `plan.Resource`s. An adapter translates its SDK's errors into
`labctl.errors` kinds (NoCapacity, QuotaExceeded, RateLimited, Transient, CloudError) and never lets an
SDK exception escape. It imports its SDK lazily, so `labctl --help` loads none of them. What adapters share
beyond this protocol (calls, waits, fallbacks, memos, rate limits, per-kind handlers) is in `providers.kit`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from labctl.plan import Plan, Resource

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


@dataclass
class Found:
    """What the cloud says about one resource.

    `status`: `ready`; `pending` (the engine waits for it); `error` (the engine deletes it and tries the next
    candidate or once more); `gone`; `incomplete`: it exists but a crash cut its creation short (a security group
    without all its rules, a VPC without its gateway, an address not yet associated): the engine calls `create`
    again with it, which finishes the missing steps instead of making another."""

    kind: str
    cloud_id: str
    name: str
    status: str = "ready"  # ready | pending | error | gone | incomplete
    attrs: dict[str, Any] = field(default_factory=dict)  # e.g. floating_ip, fixed_ip, node_type, lease_end
    error: str | None = None
    no_capacity: bool = False  # the error means "no room for this type here": the engine tries the next type


# on_progress(node_or_resource_key, stage, detail)
ProgressFn = Callable[[str, str, str], None]


class Provider(Protocol):
    """A cloud adapter. Every method is safe to call again after a crash."""

    site: Any  # the site as used (an emulated site carries the testbed's endpoints and SSH port)

    def preflight(self, plan: Plan) -> None:
        """Check credentials, images and types before anything is created; raise UserError."""

    def find(self, res: Resource, plan: Plan) -> Found | None:
        """Look the resource up by its deterministic name and labctl's tags."""

    def create(self, res: Resource, plan: Plan, deps: Mapping[str, Found], candidate: str | None) -> Found:
        """Create it (the engine called `find` first, and calls this again for an "incomplete" one).

        `candidate` is the node type / instance type / flavor to try: set for reservations, and for servers
        that are not launched on a reservation. Raise NoCapacity to make the engine try the next one.
        """

    def wait(self, items: Sequence[tuple[Resource, Found]], plan: Plan, timeout: float,
             on_progress: ProgressFn) -> list[Found]:
        """Wait until each is ready or failed, polling all of them in one call per round."""

    def delete(self, kind: str, found: Sequence[Found], plan: Plan) -> None:
        """Delete these (404 is success) and wait until they are gone."""

    def list_owned(self, plan: Plan) -> list[Found]:
        """Everything on the site tagged with this deployment (for `down` after a crash and leak audits)."""

    def extend(self, found: Found, hours: float, plan: Plan) -> Found:
        """Move the end the cloud enforces by `hours`; return it with the new end (ISO 8601, UTC) in attrs['end'].

        `found` is a `reservation` (Chameleon: the Blazar lease) or, where the cloud has no leases (AWS, GCP), a
        `server` whose end the cloud itself enforces (set at create from `plan.lease_hours`, shown in the server's
        attrs['end']). Raise UserError saying why where the cloud cannot move it."""

    def inventory(self) -> list[Found]:
        """Everything on the site that carries labctl's tags, of any deployment and owner (for `labctl gc`).

        attrs: `deployment` (id), `owner`, `created` (ISO 8601, UTC, where the cloud says), `node_type` (servers),
        `end` (where an end is set). Never lists a resource without labctl's tags, whatever its name."""


def connect(site: Any, *, cloud: str | None = None, testbed: Callable[[], Any] | None = None) -> Provider:
    """The adapter for `site`, with credentials from that provider's standard sources.

    Each adapter module `labctl.providers.<site.provider>` has a `connect(site, cloud=, testbed=)`; for an
    emulated site, `testbed()` starts the emulated clouds in this process and the adapter takes its
    endpoints and credentials from it. Only the adapter this site needs is imported.
    """
    import importlib

    try:
        module = importlib.import_module(f"labctl.providers.{site.provider}")
    except ModuleNotFoundError as exc:
        from labctl.errors import UserError

        raise UserError(f"{site.name}: no provider adapter for '{site.provider}'") from exc
    return module.connect(site, cloud=cloud, testbed=testbed)


# -- races between runs that do not share state -----------------------------------------------------------------
# Two `labctl up` of one deployment from two machines (separate state, no common lock) both find nothing and both
# create. Where the cloud keeps names unique (Nova key pairs, Blazar leases, EC2 security groups, every Compute
# Engine resource) the second create fails with a conflict: `create_or_adopt` looks the thing up and adopts it.
# Where it does not (Neutron security groups, Elastic IPs, VPCs), each racer lists again after its create and
# `converge_created` makes both keep the same one, deleting only the extra that it made itself.

MIN_SETTLE = 0.5  # seconds a racer waits after its create before it lists again (at least)
MAX_SETTLE = 5.0


def create_or_adopt(create: Callable[[], T], find: Callable[[], T | None]) -> T:
    """`create()`; when the cloud answers that it exists already (`Conflict`: a retry after a lost answer, or a
    concurrent run), what `find()` returns instead. `find` returns None (the error is raised) or raises its own
    error when what holds the name is not this deployment's.

    A refusal for quota is looked into the same way: Nova and Neutron check the quota before the name or the port,
    so the resend of a create whose answer was lost, and which took the project's last room, is refused for quota."""
    from labctl.errors import Conflict, QuotaExceeded

    try:
        return create()
    except (Conflict, QuotaExceeded):
        found = find()
        if found is None:
            raise
        return found


CREATE_ATTEMPTS = 4  # sends of a create without a client token, each after a look that found nothing


def create_or_find(create: Callable[[], T], find: Callable[[], T | None]) -> T:
    """A create the cloud cannot make idempotent (no client token), sent once per attempt (`kit.call(...,
    resend=False)`): after a lost answer or a server error it may have happened all the same, so look for it
    before sending it again; sending it blindly made a twin (a server, a security group) that a SIGKILL then left
    behind. Up to `CREATE_ATTEMPTS` sends, as a call that may be resent gets its retries (one resend failed a
    class's student when two faults in a row met the same launch)."""
    from labctl.errors import Transient

    for attempt in range(1, CREATE_ATTEMPTS + 1):
        try:
            return create()
        except Transient:
            if attempt == CREATE_ATTEMPTS:
                raise
            found = find()
            if found is not None:
                return found
    raise AssertionError("unreachable")


def converge_duplicates(found: Sequence[T], created: T | None, delete: Callable[[T], None], *,
                        ident: Callable[[T], str], rank: Callable[[T], Any] = lambda item: 0) -> T:
    """The one to keep of several resources that should be one (same name and tags), the same for every racer
    that sees the same list: the first by (`rank`, id). `rank` puts first what a racer already took as its
    survivor and finished (a group with its rules, an address associated), then the oldest by creation time.

    If this run made one (`created`) and it is not the survivor, it is deleted: only that one, identified by the
    id the create answered. The others' extras are theirs to delete (or `down`'s). `created` counts as found even
    if the list does not show it yet.
    """
    items = list(found)
    if created is not None and ident(created) not in {ident(i) for i in items}:
        items.append(created)
    if not items:
        raise ValueError("converge_duplicates: nothing to choose from")
    survivor = min(items, key=lambda i: (rank(i), ident(i)))
    if created is not None and ident(created) != ident(survivor):
        delete(created)
    return survivor


def settle_time(latency: float) -> float:
    """How long to wait after a create before listing again: several times what the create took (another
    racer's create, sent at about the same time, has then landed, and a racer that chose its own before has
    finished it), at least MIN_SETTLE."""
    return min(MAX_SETTLE, max(MIN_SETTLE, 3 * latency))


def converge_created(created: T, latency: float, relist: Callable[[], Sequence[T]], delete: Callable[[T], None],
                     *, ident: Callable[[T], str], rank: Callable[[T], Any] = lambda item: 0) -> T:
    """After creating a resource whose name the cloud does not keep unique: wait `settle_time(latency)`, list
    the deployment's resources of that name again, and keep the survivor (see `converge_duplicates`)."""
    time.sleep(settle_time(latency))
    return converge_duplicates(relist(), created, delete, ident=ident, rank=rank)


def scrub(exc: E) -> E:
    """`exc` with its message made safe to show: registered secrets masked (a cloud's error body may echo the
    request, credentials included), on one line, no control characters. The same object (type and attributes
    kept), its `args` replaced."""
    from labctl.redact import clean

    if exc.args:
        text = " ".join(str(a) for a in exc.args) if len(exc.args) > 1 else str(exc.args[0])
        text = clean(" ".join(text.splitlines()), one_line=True)
        exc.args = (text,)
    return exc


def describe_credentials(site: Any, cloud: str | None = None) -> str:
    """`found: <source>` or `missing: <what>` for one site, from its adapter (never a secret)."""
    import importlib

    module = importlib.import_module(f"labctl.providers.{site.provider}")
    return module.describe_credentials(site, cloud)
