"""The use cases behind the CLI: plan, up, status, ssh, extend, down.

Glue only: profile + site -> plan -> engine -> runner, with the state store recording everything. The CLI
calls these and renders what they return; nothing here prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labctl import naming
from labctl.errors import CloudError, NoCapacity, UserError
from labctl.state import DeploymentRecord, DeploymentView, StateStore

if TYPE_CHECKING:  # setup is imported by the commands that run it: `status` and `--help` need none of it
    from labctl.node_setup import ExtraStep

Progress = Callable[[str, str, str], None]

# Bounds of numbers the user gives (checked before anything is created or recorded).
MAX_EXTEND_HOURS = 168.0  # Chameleon's lease maximum: 7 days
MAX_SSH_TIMEOUT = 86400.0  # one day
# How long `up`, `down` and `extend` wait for another labctl working on the same deployment.
LOCK_WAIT = 5.0


class DeploymentBusy(UserError):
    """Another labctl process (here or, with a shared PostgreSQL state, elsewhere) holds the deployment's lock.
    Exit code 2, like any refusal before anything was created: nothing was changed."""


def check_number(value: float | int | None, option: str, *, high: float, low: float = 0.0,
                 low_inclusive: bool = False, unit: str = "", why: str = "") -> None:
    """A one-line UserError unless `value` is a finite number in (low, high] (or [low, high])."""
    import math

    try:
        ok = math.isfinite(value) and (value >= low if low_inclusive else value > low) and value <= high
    except TypeError:
        ok = False
    if not ok:
        bound = f"{'≥' if low_inclusive else '>'} {low:g} and ≤ {high:g}{unit}"
        raise UserError(f"{option} must be a number {bound}{why}, not {value!r}")


def _noop(subject: str, stage: str, detail: str) -> None:
    return None


@dataclass
class Context:
    """What every command needs: the state store and who the user is."""

    store: StateStore
    owner: str
    on_progress: Progress = _noop
    _testbed: Any = None

    @classmethod
    def create(cls, owner: str | None = None, on_progress: Progress | None = None, *,
               testbed: Any = None) -> Context:
        """`testbed`: the emulated clouds to use for sim sites instead of starting them in this process (a
        benchmark serves them from other processes, so that this one is measured alone)."""
        # The owner enters resource names: refuse a name `sanitise` would change (before the store is opened).
        who = naming.require_canonical(owner, "--owner") if owner is not None else naming.default_owner()
        return cls(StateStore(), who, on_progress or _noop, testbed)

    def testbed(self, ssh: bool = True) -> Any:
        """The emulated testbed, started in this process (its world lives on disk); SSH from the background
        testbed when `labctl testbed start` runs one, so the nodes answer after this command exits."""
        if self._testbed is None:
            from labctl.testbed.serve import attach

            self._testbed = attach(ssh=ssh)
        return self._testbed


@dataclass
class Node:
    name: str
    role: str
    node_type: str | None = None
    fixed_ip: str | None = None
    floating_ip: str | None = None
    server_status: str | None = None
    setup: str = "pending"


@dataclass
class Status:
    deployment: str
    name: str
    lab: str
    owner: str
    site: str
    status: str
    lease_end: str | None
    nodes: list[Node] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    warning: str | None = None  # e.g. less than an hour of the lease is left

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- loading --------------------------------------------------------------------------------------
def load(profile_ref: str, site_name: str) -> tuple[Any, Any]:
    """Load and validate a profile and resolve the site; raise a one-line UserError on any problem."""
    from labctl import profile as profile_mod
    from labctl import site_fit, sites

    prof = profile_mod.load_profile(profile_mod.find_profile(profile_ref))
    site = sites.resolve(site_name, prof)
    site_fit.require_valid_for_site(prof, site)
    return prof, site


def connect(ctx: Context, site: Any, cloud: str | None) -> Any:
    """The provider adapter for the site (sim sites get the in-process testbed)."""
    from labctl.providers.base import connect

    return connect(site, cloud=cloud, testbed=ctx.testbed if site.emulated else None)


def check_deployment_name(name: str | None) -> None:
    """--name enters the deployment id and every resource name: only names `sanitise` keeps as they are."""
    if name is not None:
        naming.require_canonical(name, "--name")


def plan(ctx: Context, profile_ref: str, site_name: str, name: str | None = None) -> Any:
    from labctl.keys import ensure_keypair
    from labctl.plan import build_plan

    check_deployment_name(name)
    prof, site = load(profile_ref, site_name)
    key = ensure_keypair(ctx.store.keys_dir)
    return build_plan(prof, site, ctx.owner, key.public_key, name=name)


# -- up -------------------------------------------------------------------------------------------
AUTO = "auto"  # --site auto (or none): the profile's sites, in its order


def site_list(site_name: str | None) -> list[str] | None:
    """--site as a list: one site, several in order (`chi@tacc,chi@uc`), or None for `auto` / no --site (the
    profile's `sites:`). An empty entry selects nothing and is refused."""
    if site_name is None or site_name.strip().lower() == AUTO:
        return None
    names = [n.strip() for n in site_name.split(",")]
    if not all(names):
        from labctl.redact import clean

        raise UserError(f"--site '{clean(site_name, one_line=True)}' has an empty site in it; give S1 or S1,S2 "
                        "(or auto: the profile's sites in order)")
    return list(dict.fromkeys(names))


def up(ctx: Context, profile_ref: str, site_name: str | None, *, name: str | None = None, cloud: str | None = None,
       allow_host_changes: bool = False, ssh_timeout: float = 900.0) -> Status:
    """Create (or resume) a lab at a site; with several sites (or `auto`: the profile's, in order), at the first
    that has capacity: a site without room for any of the lab's types is cleaned of what this run made there, said
    so, and the next one tried."""
    from labctl import profile as profile_mod

    check_deployment_name(name)
    check_number(ssh_timeout, "--ssh-timeout", high=MAX_SSH_TIMEOUT, unit=" seconds")
    names = site_list(site_name)
    if names is None:
        names = list(profile_mod.load_profile(profile_mod.find_profile(profile_ref)).sites)
    options = {"name": name, "cloud": cloud, "allow_host_changes": allow_host_changes, "ssh_timeout": ssh_timeout}
    choices = [load(profile_ref, n) for n in names]  # every site checked before anything is created
    if len(choices) == 1:
        return _up_at(ctx, *choices[0], **options)
    dep_id = naming.deployment_id(name or choices[0][0].name, ctx.owner)
    existing = ctx.store.get_deployment(dep_id)
    if existing is not None and existing.status != "destroyed":
        # Resume where it is (its kept volumes are there); a site outside the list is refused by _up_at.
        at = next((c for c in choices if c[1].name == existing.site), choices[0])
        return _up_at(ctx, *at, **options)
    return _up_with_failover(ctx, dep_id, choices, options)


def _up_with_failover(ctx: Context, dep_id: str, choices: list[tuple[Any, Any]], options: dict[str, Any]) -> Status:
    from labctl.errors import QuotaExceeded

    misses: list[str] = []
    for index, (prof, site) in enumerate(choices):
        try:
            return _up_at(ctx, prof, site, **options, clean_on_no_room=True)
        except (NoCapacity, QuotaExceeded) as exc:
            why = str(exc).splitlines()[0]
            misses.append(f"{site.name}: {why}")
            if index + 1 < len(choices):
                nxt = choices[index + 1][1].name
                message = f"{site.name} has no room for {prof.name} ({why}); nothing left there; trying {nxt}"
                ctx.on_progress("failover", "moving", message)
                ctx.store.event(dep_id, message, "warning")
        except UserError as exc:
            if not misses:
                raise
            raise UserError(f"{'; '.join(misses)}; then {site.name}: {str(exc).splitlines()[0]}") from exc
    raise NoCapacity(f"no room for {choices[0][0].name} at any of {', '.join(s.name for _, s in choices)}: "
                     + "; ".join(misses))


def _up_at(ctx: Context, prof: Any, site: Any, *, name: str | None, cloud: str | None, allow_host_changes: bool,
           ssh_timeout: float, clean_on_no_room: bool = False) -> Status:
    from labctl.errors import QuotaExceeded
    from labctl.keys import ensure_keypair
    from labctl.plan import build_plan

    key = ensure_keypair(ctx.store.keys_dir)
    the_plan = build_plan(prof, site, ctx.owner, key.public_key, name=name)
    with deployment_lock(ctx, the_plan.deployment, name or prof.name):
        existing = ctx.store.get_deployment(the_plan.deployment)
        if (existing and existing.status != "destroyed"
                and (existing.name, existing.owner, existing.course) != (name or prof.name, ctx.owner, None)):
            # Distinct canonical names can still meet in an id (owner 'a-b' + name 'c', owner 'a' + name 'b-c'),
            # and an older state may hold names made before they had to be canonical: never adopt another's.
            raise UserError(f"deployment id {the_plan.deployment} already belongs to '{existing.name}' of "
                            f"{existing.owner}" + (f" in course {existing.course}" if existing.course else "")
                            + "; pass another --name")
        if existing and existing.status != "destroyed" and existing.site != site.name:
            raise UserError(
                f"{existing.name} is already up at {existing.site}; run 'labctl down {existing.name}' first "
                "or pass --name to make another deployment"
            )
        provider = connect(ctx, site, cloud)
        the_plan.site = provider.site
        ctx.on_progress("preflight", "checking", f"credentials and images at {provider.site.name}")
        provider.preflight(the_plan)  # before anything is recorded or created
        try:
            provision(ctx, prof, the_plan, provider, key, name=name or prof.name,
                      allow_host_changes=allow_host_changes, ssh_timeout=ssh_timeout)
        except (NoCapacity, QuotaExceeded):
            if clean_on_no_room:
                _leave_nothing(ctx, the_plan, provider)
            raise
    return status(ctx, the_plan.deployment)


def _leave_nothing(ctx: Context, the_plan: Any, provider: Any) -> None:
    """Before moving a new lab to the next site: delete all it made at this one (recorded or tagged), the volumes
    and containers it would keep included (just made, they hold nothing yet), and forget it."""
    from labctl.engine import Engine

    left = Engine(provider, ctx.store, ctx.on_progress).destroy(the_plan, keep=False)
    if left:
        what = "; ".join(f"{f.kind} {f.name} ({f.cloud_id})" for f in left)
        raise CloudError(f"could not clean {provider.site.name} before moving on: {what}; run 'labctl down'")
    ctx.store.forget_deployment(the_plan.deployment)


@contextmanager
def deployment_lock(ctx: Context, dep_id: str, shown: str, wait: float | None = None) -> Iterator[None]:
    """Hold the deployment's lock (`env:<id>`, the one class mode takes per student) for a single-user command.

    Another labctl holding it (a second `up`, a `down`, a class operator) is waited for up to LOCK_WAIT seconds;
    then a one-line DeploymentBusy names the holder, and nothing was changed.
    """
    name = f"env:{dep_id}"
    with ctx.store.lock(name, wait=True, timeout=LOCK_WAIT if wait is None else wait) as held:
        if not held:
            holder = ctx.store.lock_holder(name) or "another labctl process"
            raise DeploymentBusy(f"{shown} is busy: {holder} is working on it (up, down, extend or class mode); "
                                 "try again when it has finished")
        yield


def provision(ctx: Context, prof: Any, the_plan: Any, provider: Any, key: Any, *, name: str,
              allow_host_changes: bool = False, ssh_timeout: float = 900.0, data: dict | None = None,
              extra_steps: tuple[ExtraStep, ...] = (), on_progress: Progress | None = None,
              should_stop: Callable[[], bool] | None = None, concurrency: int = 8) -> None:
    """Apply one deployment's plan, then run its setup. Idempotent: a rerun resumes where it stopped.
    `concurrency`: how many of one level's resources are made at once (threads of their own)."""
    from labctl.engine import Engine
    from labctl.node_setup import run_setup, volume_steps

    progress = on_progress or ctx.on_progress
    site = provider.site
    ctx.store.save_deployment(DeploymentRecord(
        id=the_plan.deployment, name=name, lab=prof.name, owner=the_plan.owner, course=the_plan.course,
        site=site.name, status="applying", profile_path=str(prof.path),
        data={"tags": the_plan.tags, "nodes": [[n.name, n.role] for n in the_plan.nodes],
              "lease_hours": prof.lease_hours, **(data or {})},
    ))
    engine = Engine(provider, ctx.store, progress, concurrency=concurrency, should_stop=should_stop)
    try:
        found = engine.apply(the_plan)
    except NoCapacity:
        # Nothing usable came up: leave nothing behind (but kept volumes and buckets), then say why in one line.
        progress("cleanup", "deleting", "what was created")
        engine.destroy(the_plan, keep=True)
        _forget_keeping(ctx, the_plan.deployment, engine.kept)
        raise
    except CloudError as exc:
        ctx.store.set_deployment_status(the_plan.deployment, "failed", error=str(exc))
        raise
    lease_end = earliest_end(f.attrs.get("end") for f in found.values() if f.kind in END_KINDS)
    # Outputs are rendered once here, so that `status` need not load the profile (it stays fast).
    addresses = {n.name: {"floating_ip": (found.get(f"floating_ip:{n.name}") or found[f"server:{n.name}"])
                          .attrs.get("floating_ip"), "fixed_ip": found[f"server:{n.name}"].attrs.get("fixed_ip")}
                 for n in the_plan.nodes}
    outputs = {o.name: o.render(addresses) for o in prof.outputs}
    ctx.store.set_deployment_status(the_plan.deployment, "setup", lease_end=lease_end, outputs=outputs)
    extra_steps = (*extra_steps, *volume_steps(the_plan, found))
    run_setup(ctx, prof, the_plan, site, key, found, allow_host_changes, ssh_timeout, extra_steps, progress)
    ctx.store.set_deployment_status(the_plan.deployment, "up", error=None)


# -- lease ends -----------------------------------------------------------------------------------
# What ends a deployment: a Chameleon lease (`reservation`), or on clouds without leases (AWS, GCP) the end the cloud
# enforces on each `server` (attrs['end'], set at create from the profile's lease_hours).
END_KINDS = ("reservation", "server")
WARN_BEFORE_END = 3600.0  # seconds: `status` warns when less than this is left


def parse_end(text: Any) -> Any:
    """An end as the adapters give it (ISO 8601, 'Z' or an offset; naive = UTC) as an aware datetime, or None."""
    from datetime import UTC, datetime

    if not isinstance(text, str) or not text.strip():
        return None
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def earliest_end(ends: Any) -> str | None:
    """The first of these ends (ISO 8601, UTC, seconds), None if none is readable: the lab ends with its first
    lease or server."""
    parsed = [e for e in (parse_end(x) for x in ends) if e is not None]
    return min(parsed).isoformat(timespec="seconds") if parsed else None


def planned_end(hours: float, now: Any = None) -> str:
    """The end a lab made now gets: `hours` (the profile's lease_hours) from now, ISO 8601 UTC."""
    from datetime import UTC, datetime, timedelta

    start = now or datetime.now(UTC)
    return (start + timedelta(hours=float(hours))).isoformat(timespec="seconds")


def end_warning(name: str, status: str, lease_end: str | None, now: Any = None) -> str | None:
    """One line when a live lab has less than WARN_BEFORE_END left (or has ended), else None."""
    from datetime import UTC, datetime

    end = parse_end(lease_end)
    if end is None or status in ("destroyed", "destroying", "kept"):
        return None
    left = (end - (now or datetime.now(UTC))).total_seconds()
    if left >= WARN_BEFORE_END:
        return None
    if left <= 0:
        return f"{name}: its lease ended at {lease_end}; the cloud deletes its servers ('labctl down {name}' " \
               "removes the rest)"
    return (f"{name}: its lease ends in {max(1, int(left // 60))} min (at {lease_end}); "
            f"'labctl extend {name} --hours N' moves it")


# -- status ---------------------------------------------------------------------------------------
def resolve_deployment(ctx: Context, name: str | None, *, action: str | None = None) -> DeploymentRecord:
    """The deployment of yours that `name` selects: its id or name, else the only one of that lab.

    An empty or blank name selects nothing (it is never "all" or "the first"), and a name that selects more
    than one deployment is refused with the candidates listed. `action` (e.g. "down") goes into the hint.
    """
    from labctl.redact import clean

    deps = ctx.store.deployments(owner=ctx.owner)
    if name is not None and not name.strip():
        known = ", ".join(d.name for d in deps) or "none"
        raise UserError(f"an empty deployment name selects nothing; name one (yours: {known})")
    if name:
        shown = clean(name, one_line=True)
        # An id or a name is one deployment; a lab name may be several (`up hello`, `up hello --name h2`).
        matches = ([d for d in deps if name == d.id] or [d for d in deps if name == d.name]
                   or [d for d in deps if name == d.lab])
        if not matches:
            known = ", ".join(d.name for d in deps) or "none"
            raise UserError(f"no deployment named '{shown}' (yours: {known})")
        if len(matches) > 1:
            which = ", ".join(f"{d.name} (id {d.id}, lab {d.lab}, at {d.site})" for d in matches)
            verb = f"labctl {action} " if action else ""
            raise UserError(f"'{shown}' matches {len(matches)} deployments: {which}; name exactly one "
                            f"(e.g. {verb}{matches[0].id})")
        return matches[0]
    if len(deps) == 1:
        return deps[0]
    if not deps:
        raise UserError("you have no deployments; start one with 'labctl up LAB --site SITE'")
    raise UserError(f"you have {len(deps)} deployments; name one: {', '.join(d.name for d in deps)}")


def status(ctx: Context, name: str) -> Status:
    dep = ctx.store.get_deployment(name) or resolve_deployment(ctx, name, action="status")
    resources = {r.key: r for r in ctx.store.resources(dep.id)}
    steps = ctx.store.steps(dep.id)
    nodes = []
    for node, role in dep.data.get("nodes", []):
        server = resources.get(f"server:{node}")
        fip = resources.get(f"floating_ip:{node}")
        lease = resources.get(f"reservation:{role}")
        node_steps = [s for s in steps if s[0] == node]
        if not node_steps:
            setup = "pending"
        elif any(s[3] == "failed" for s in node_steps):
            setup = "failed: " + next(s[2] for s in node_steps if s[3] == "failed")
        elif any(s[3] == "running" for s in node_steps):
            setup = "running: " + next(s[2] for s in node_steps if s[3] == "running")
        else:
            done = sum(1 for s in node_steps if s[3] == "done")
            skipped = sum(1 for s in node_steps if s[3] == "skipped")
            setup = f"done ({done} ran, {skipped} skipped)" if skipped else f"done ({done} steps)"
        nodes.append(Node(
            name=node, role=role,
            node_type=(lease.data.get("node_type") if lease else None) or (server.data.get("node_type")
                                                                            if server else None),
            fixed_ip=server.data.get("fixed_ip") if server else None,
            floating_ip=fip.data.get("floating_ip") if fip else None,
            server_status=server.data.get("server_status") if server else None,
            setup=setup,
        ))
    outputs = dep.data.get("outputs") or {}
    events = [f"{level}: {msg}" for _, level, msg in ctx.store.events(dep.id)[-10:]]
    lease_end = dep.data.get("lease_end")
    return Status(dep.id, dep.name, dep.lab, dep.owner, dep.site, dep.status, lease_end, nodes,
                  outputs, events, end_warning(dep.name, dep.status, lease_end))


def statuses(ctx: Context) -> list[Status]:
    return [status(ctx, d.id) for d in ctx.store.deployments(owner=ctx.owner)]


# -- ssh ------------------------------------------------------------------------------------------
def parse_forward(text: str) -> tuple[int, int]:
    """`8888` (the same port here and on the node) or `18888:8888` (local:remote), as `labctl ssh --forward`."""
    local, _, remote = text.partition(":")
    try:
        ports = (int(local), int(remote or local))
    except ValueError:
        ports = (0, 0)
    if not all(0 < p < 65536 for p in ports):
        raise UserError(f"--forward {text}: expected PORT or LOCAL:REMOTE, ports 1-65535 (e.g. 8888 or 18888:8888)")
    return ports


def ssh_argv(ctx: Context, name: str | None, node: str | None, command: list[str] | None,
             forwards: list[str]) -> list[str]:
    ports = [parse_forward(f) for f in forwards]  # bad input fails before any lookup
    from labctl.keys import ensure_keypair
    from labctl.node_setup import node_targets
    from labctl.runner.ssh import known_hosts_file
    from labctl.runner.ssh import ssh_argv as build_argv
    from labctl.sites import resolve

    dep = resolve_deployment(ctx, name, action="ssh")
    site = resolve(dep.site)
    if site.emulated:
        # The emulated nodes answer SSH only while a labctl process serves them; the adapter knows the port.
        site = connect(ctx, site, None).site
    resources = {r.key: r.data for r in ctx.store.resources(dep.id)}
    targets, unreachable = node_targets(site, dep.data.get("nodes", []), resources)
    if node in unreachable:
        raise UserError(f"{dep.name}/{node}: labctl cannot reach it over SSH: {unreachable[node]}")
    if not targets:
        raise UserError(f"{dep.name} has no node with a floating IP to SSH to")
    if node:
        chosen = [t for t in targets if t.name == node]
        if not chosen:
            raise UserError(f"{dep.name} has no node '{node}' (nodes: {', '.join(t.name for t in targets)})")
        target = chosen[0]
    else:
        target = next((t for t in targets if t.via is None), targets[0])
    view = DeploymentView(ctx.store, dep.id)
    for hop in ([target.via] if target.via else []) + [target]:
        if view.get_host_key(hop.name) is None:
            raise UserError(f"{dep.name}/{hop.name}: no pinned host key yet; run 'labctl up {dep.name}' first")
    if site.emulated:
        entry = target.via or target  # a node behind a jump host is served through the jump host's listener
        try:
            ctx.testbed().wait_ssh(entry.host, entry.port)
        except TimeoutError as exc:
            raise CloudError(f"{dep.name}/{target.name}: the emulated node does not answer SSH ({exc}); "
                             "was its server deleted or its lease ended? see 'labctl status'") from exc
    known = known_hosts_file([target], view, ctx.store.dir / "known_hosts" / f"{dep.id}")
    key = ensure_keypair(ctx.store.keys_dir)
    return build_argv(target, key.private_path, known, command or None, ports)


@dataclass
class ForgottenKey:
    node: str
    host: str
    port: int
    fingerprint: str


def forget_host_keys(ctx: Context, name: str | None, node: str | None = None
                     ) -> tuple[DeploymentRecord, list[ForgottenKey]]:
    """Forget the pinned SSH host key of one node (or of every node) of a deployment, so that the next
    `labctl up` pins the key the node presents then. Returns the deployment and what was forgotten (node,
    address, old fingerprint)."""
    from labctl.keys import fingerprint

    dep = resolve_deployment(ctx, name, action="ssh")
    nodes = [n for n, _role in dep.data.get("nodes", [])]
    if node is not None and node not in nodes:
        from labctl.redact import clean

        raise UserError(f"{dep.name} has no node '{clean(node, one_line=True)}' (nodes: {', '.join(nodes)})")
    forgotten = []
    for n in [node] if node else nodes:
        pinned = ctx.store.host_key_record(dep.id, n)
        if pinned is None:
            continue
        host, port, key = pinned
        try:
            fp = fingerprint(key)
        except ValueError:
            fp = "unreadable key"
        ctx.store.forget_host_key(dep.id, n)
        ctx.store.event(dep.id, f"{n}: forgot pinned SSH host key {fp} of {host}:{port}")
        forgotten.append(ForgottenKey(n, host, int(port), fp))
    return dep, forgotten


def up_command(dep: DeploymentRecord) -> str:
    """The `labctl up` command line that resumes this deployment."""
    return f"labctl up {dep.lab} --site {dep.site}" + (f" --name {dep.name}" if dep.name != dep.lab else "")


# -- extend / down --------------------------------------------------------------------------------
def _teardown_plan(dep: DeploymentRecord, site: Any) -> Any:
    from labctl.plan import Plan, Resource

    the_plan = Plan(dep.id, dep.lab, dep.owner, dep.course, site, 0, dep.data.get("tags", {}), [])
    return the_plan, Resource


def check_extend_hours(hours: float) -> None:
    check_number(hours, "--hours", high=MAX_EXTEND_HOURS, unit=" hours",
                 why=" (Chameleon leases last at most 7 days)")


def extend(ctx: Context, name: str | None, hours: float, cloud: str | None = None) -> Status:
    from labctl.sites import resolve

    check_extend_hours(hours)
    dep = resolve_deployment(ctx, name, action="extend")
    with deployment_lock(ctx, dep.id, dep.name):
        dep = _still_there(ctx, dep)
        return extend_deployment(ctx, dep, connect(ctx, resolve(dep.site), cloud), hours)


def _still_there(ctx: Context, dep: DeploymentRecord) -> DeploymentRecord:
    """The deployment as it is now that we hold its lock (whoever held it before may have deleted it)."""
    current = ctx.store.get_deployment(dep.id)
    if current is None or current.status == "destroyed":
        raise UserError(f"{dep.name} was deleted meanwhile (by another labctl); nothing to do")
    return current


def extend_deployment(ctx: Context, dep: DeploymentRecord, provider: Any, hours: float) -> Status:
    """Move the end the cloud enforces by `hours`: the Chameleon leases, or on clouds without leases each
    server's end. A one-line UserError where there is nothing to move or the cloud cannot move it."""
    from labctl.providers.base import Found

    check_extend_hours(hours)
    the_plan, _ = _teardown_plan(dep, provider.site)
    records = ctx.store.resources(dep.id)
    targets = ([r for r in records if r.kind == "reservation" and r.cloud_id]
               or [r for r in records if r.kind == "server" and r.cloud_id])
    if not targets:
        raise UserError(f"{dep.name} at {dep.site} has no lease and no server whose end could be extended")
    for rec in targets:
        f = provider.extend(Found(rec.kind, rec.cloud_id, rec.name), hours, the_plan)
        end = earliest_end([f.attrs.get("end")])
        if end is None:
            what = "lease" if rec.kind == "reservation" else "server"
            raise UserError(f"{dep.name}: {dep.site} cannot move the end of {what} {rec.name}: the cloud enforces "
                            "no end for it there")
        ctx.store.record_resource(dep.id, rec.key, rec.status, rec.cloud_id, {"end": end})
    lease_end = earliest_end(r.data.get("end") for r in ctx.store.resources(dep.id) if r.kind in END_KINDS)
    ctx.store.set_deployment_status(dep.id, dep.status, lease_end=lease_end)
    ctx.store.event(dep.id, f"lease extended by {hours:g} h to {lease_end}")
    return status(ctx, dep.id)


def down(ctx: Context, name: str | None, cloud: str | None = None, *, delete_volumes: bool = False,
         kept: list[str] | None = None) -> list[str]:
    """Delete everything of the deployment but kept volumes and buckets (all of it with `delete_volumes`);
    returns what is left (empty on success). `kept`, if given, receives one line per kept resource."""
    from labctl.sites import resolve

    dep = resolve_deployment(ctx, name, action="down")
    if dep.class_shared:
        raise UserError(f"{dep.name} is what the environments of {dep.course}/{dep.lab} at {dep.site} share; "
                        f"'labctl class down {dep.lab} --course {dep.course}' deletes it after the last of them")
    with deployment_lock(ctx, dep.id, dep.name):
        dep = _still_there(ctx, dep)
        return destroy_deployment(ctx, dep, connect(ctx, resolve(dep.site), cloud),
                                  delete_volumes=delete_volumes, kept=kept)


def destroy_deployment(ctx: Context, dep: DeploymentRecord, provider: Any,
                       on_progress: Progress | None = None, *, delete_volumes: bool = False,
                       kept: list[str] | None = None) -> list[str]:
    from labctl.engine import Engine

    the_plan, resource_cls = _teardown_plan(dep, provider.site)
    for rec in ctx.store.resources(dep.id):
        the_plan.resources.append(resource_cls(rec.key, rec.kind, rec.name, {"node": rec.key.split(":")[-1]}))
    ctx.store.set_deployment_status(dep.id, "destroying")
    engine = Engine(provider, ctx.store, on_progress or ctx.on_progress)
    left = engine.destroy(the_plan, keep=not delete_volumes)
    if left:
        ctx.store.set_deployment_status(dep.id, "failed")
        return [f"{f.kind} {f.name} ({f.cloud_id})" for f in left]
    _forget_keeping(ctx, dep.id, engine.kept)
    if kept is not None:
        kept += [_kept_line(f) for f in engine.kept]
    ctx.store.event(dep.id, "deployment destroyed" + (f", {len(engine.kept)} kept" if engine.kept else ""))
    return []


def _forget_keeping(ctx: Context, dep_id: str, kept: list[Any]) -> None:
    """Forget a deployment's state, but keep the rows of its kept volumes and buckets (status `kept`), so that
    `labctl down --delete-volumes` still finds them and the next `up` reattaches them."""
    ctx.store.forget_deployment(dep_id)
    if not kept:
        return
    for f in kept:
        key = f.attrs.get("key") or f"{f.kind}:{f.name.rsplit('-', 1)[-1]}"
        ctx.store.record_resource(dep_id, key, "ready", f.cloud_id, {**f.attrs, "keep": True}, kind=f.kind,
                                  name=f.name)
    ctx.store.set_deployment_status(dep_id, "kept")


def _kept_line(f: Any) -> str:
    if f.kind == "volume":
        size = f.attrs.get("size_gb")
        what = f"kept volume {f.name}" + (f" (size {size} GiB)" if size else "")
    else:
        what = f"kept object-store container (bucket) {f.name}"
    return what + "; `labctl down --delete-volumes` removes it"
