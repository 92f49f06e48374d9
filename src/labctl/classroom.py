"""Class mode: the same lab for every student of a roster, concurrently, resumable, shared among staff.

Each student's environment is an ordinary deployment (same plan, engine and state as `labctl up`), named
and tagged with the course, lab and student. The instructor's key (labctl's) is the launch key, so staff
reach every node; each student's own key is added to their own nodes only, as the first setup step.

Concurrency is bounded per site; each environment is created under a lock in the state store, so two
operators running `class up` (or `class down`) at once never both work on the same student.
"""

from __future__ import annotations

import contextlib
import queue
import shlex
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labctl import naming, service
from labctl.collector_tuning import tune_gc
from labctl.errors import CloudError, Interrupted, LabctlError, NoCapacity, QuotaExceeded, UserError
from labctl.malloc_tuning import tune_for_threads
from labctl.node_setup import ExtraStep
from labctl.providers.kit import rank
from labctl.state import CLASS_SHARED, DeploymentRecord
from labctl.workers import ShortLivedWorkers

UP, FAILED, BUSY, ALREADY, INTERRUPTED = "up", "failed", "busy", "already up", "interrupted"

MAX_CONCURRENCY = 256  # environments in flight per site
MAX_RATE = 1000.0  # client-side API calls per second per site
COURSE_LEN = 16  # the course's part of resource names (naming.deployment_id)


def check_options(concurrency: int, rate: float | None = None) -> None:
    """--concurrency in 1..MAX_CONCURRENCY, --rate (if given) a finite number in (0, MAX_RATE]."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise UserError(f"--concurrency must be a whole number from 1 to {MAX_CONCURRENCY}, not {concurrency!r}")
    if rate is not None:
        service.check_number(rate, "--rate", high=MAX_RATE, unit=" calls per second")


def check_selector(value: str | None, option: str) -> None:
    """A lab, course or student that selects environments to delete or change: never empty (not "all")."""
    if value is not None and not value.strip():
        raise UserError(f"{option} is empty: it selects nothing (and never means 'all'); give a name")


@dataclass
class ClassOptions:
    lab: str
    course: str
    sites: list[str]
    roster: Path | None = None
    keys_dir: Path | None = None
    spread: bool = False
    skip_bad_rows: bool = False
    concurrency: int = 16  # environments in flight per site
    rate: float | None = None  # client-side API calls per second per site
    allow_host_changes: bool = False
    ssh_timeout: float = 900.0
    cloud: str | None = None
    only_failed: bool = False  # `class retry`


@dataclass
class StudentResult:
    student_id: str
    site: str | None
    status: str
    error: str | None = None
    deployment: str | None = None


@dataclass
class ClassEvents:
    """What the CLI shows while a class is provisioned (no-ops by default)."""

    start: Callable[[int], None] = lambda total: None
    student: Callable[[str, str, str], None] = lambda student_id, stage, detail: None
    finished: Callable[[StudentResult], None] = lambda result: None
    warn: Callable[[str], None] = lambda message: None


@dataclass
class _Site:
    name: str
    provider: Any
    prof: Any
    executor: ShortLivedWorkers
    exhausted: str | None = None  # why no new environment goes here any more
    shared: dict[str, Any] | None = None  # what the class's environments here use as given, once found or made
    shared_error: str | None = None  # why it could not be made in this run (each environment here fails with it)
    shared_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Run:
    opts: ClassOptions
    ctx: service.Context
    key: Any
    events: ClassEvents
    sites: list[_Site]
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    order: dict[str, int] = field(default_factory=dict)  # student slug -> place in the roster


def class_deployments(ctx: service.Context, course: str, lab: str, *, shared: bool = False
                      ) -> list[DeploymentRecord]:
    """The students' environments of course/lab; with `shared`, what they share instead (a deployment per site,
    `plan.class_shared_plan`). Destroyed ones are not listed."""
    return [d for d in ctx.store.deployments() if d.course == course and d.lab == lab and d.class_shared == shared]


def authorize_step(public_key: str) -> ExtraStep:
    line = shlex.quote(public_key.strip())
    command = (
        "mkdir -p ~/.ssh && chmod 700 ~/.ssh && touch ~/.ssh/authorized_keys && "
        f"chmod 600 ~/.ssh/authorized_keys && (grep -qxF {line} ~/.ssh/authorized_keys || "
        f"echo {line} >> ~/.ssh/authorized_keys)"
    )
    return ExtraStep("authorize-student-key", command)


def class_up(ctx: service.Context, opts: ClassOptions, events: ClassEvents | None = None) -> list[StudentResult]:
    """Provision (or resume) every student's environment; returns one result per student."""
    from labctl.keys import ensure_keypair
    from labctl.roster import load_roster

    events = events or ClassEvents()
    naming.require_canonical(opts.course, "--course", COURSE_LEN)
    check_selector(opts.lab, "the lab")
    check_options(opts.concurrency, opts.rate)
    service.check_number(opts.ssh_timeout, "--ssh-timeout", high=service.MAX_SSH_TIMEOUT, unit=" seconds")
    if opts.roster is None:
        raise UserError("class up needs --roster FILE")
    roster = load_roster(opts.roster, opts.keys_dir)
    students = roster.require_valid(opts.skip_bad_rows)
    for error in roster.errors:  # only reached with --skip-bad-rows
        events.warn(f"skipped {error}")
    if not students:
        raise UserError(f"{opts.roster}: no students to provision")
    existing = {d.owner: d for d in class_deployments(ctx, opts.course, _lab_name(opts.lab))}
    if opts.only_failed:
        students = [s for s in students if s.slug not in existing or existing[s.slug].status != "up"]
    key = ensure_keypair(ctx.store.keys_dir)
    tune_for_threads()
    tune_gc()
    run = _Run(opts, ctx, key, events, _open_sites(ctx, opts))
    events.start(len(students))
    futures: dict[Future, Any] = {}
    try:
        for i, student in enumerate(students):
            run.order[student.slug] = i
            site = _initial_site(run, i, existing.get(student.slug))
            futures[site.executor.submit(_provision_one, run, student, site)] = student
        results = _collect(run, futures)
    finally:
        for site in run.sites:
            site.executor.shutdown(wait=True, cancel_futures=True)
    return results


def _lab_name(ref: str) -> str:
    return Path(ref).stem if ref.endswith((".yaml", ".yml")) else ref


def _open_sites(ctx: service.Context, opts: ClassOptions) -> list[_Site]:
    from labctl.keys import ensure_keypair
    from labctl.plan import build_plan

    opened = []
    for name in opts.sites:
        prof, site = service.load(opts.lab, name)
        provider = service.connect(ctx, site, opts.cloud)
        if hasattr(provider, "set_rate_limit"):
            provider.set_rate_limit(opts.rate)
        sample = build_plan(prof, provider.site, "preflight", ensure_keypair(ctx.store.keys_dir).public_key,
                            course=opts.course)
        provider.preflight(sample)  # credentials and images, once per site, before anything is created
        opened.append(_Site(provider.site.name, provider, prof,
                            ShortLivedWorkers(max(1, opts.concurrency), thread_name_prefix=f"class-{name}")))
    return opened


def _initial_site(run: _Run, index: int, existing: DeploymentRecord | None) -> _Site:
    if existing is not None and existing.status != "destroyed":
        for site in run.sites:
            if site.name == existing.site:
                return site  # resume where this student's environment already is
    if run.opts.spread:
        return run.sites[index % len(run.sites)]
    return run.sites[0]


def _next_site(run: _Run, after: _Site) -> _Site | None:
    with run.lock:
        for site in run.sites:
            if site is not after and site.exhausted is None:
                return site
    return None


def _collect(run: _Run, futures: dict[Future, Any]) -> list[StudentResult]:
    # Each future hands itself to `finished` when it ends: one step per environment. (`wait(FIRST_COMPLETED)` over
    # the ones still pending set up a waiter on every one of them for each that ended: O(students²).)
    results: list[StudentResult] = []
    finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
    for f in futures:
        f.add_done_callback(finished.put)
    left = len(futures)
    while left:
        try:
            f = finished.get(timeout=0.5)
        except queue.Empty:
            continue
        except KeyboardInterrupt:
            # Ctrl-C: start nothing new; calls in flight finish and record their state.
            run.stop.set()
            for pending in list(futures):
                pending.cancel()
            continue
        left -= 1
        student = futures[f]
        if f.cancelled():
            results.append(StudentResult(student.student_id, None, INTERRUPTED))
            continue
        outcome = f.result()
        if isinstance(outcome, _Site):  # moved: its site ran out of capacity or quota
            nf = outcome.executor.submit(_provision_one, run, student, outcome)
            futures[nf] = student
            left += 1
            nf.add_done_callback(finished.put)
            continue
        results.append(outcome)
        run.events.finished(outcome)
    if run.stop.is_set():
        raise Interrupted(f"stopped: {sum(r.status == UP for r in results)} environments up; "
                          "state is saved, rerun 'labctl class up' to resume")
    return results


def _provision_one(run: _Run, student: Any, site: _Site) -> StudentResult | _Site:
    from labctl.plan import build_plan

    sid = student.student_id
    if run.stop.is_set():
        return StudentResult(sid, site.name, INTERRUPTED)
    if site.exhausted and not _has_environment_at(run, student, site):
        # Out of room for new environments; one it already has resumes there (a rerun), as any would.
        nxt = _next_site(run, site)
        return nxt if nxt else StudentResult(sid, site.name, FAILED, site.exhausted)
    try:
        given = _shared_resources(run, site)
    except (NoCapacity, QuotaExceeded) as exc:
        return _site_exhausted(run, site, student, None, exc)
    except Interrupted:
        return StudentResult(sid, site.name, INTERRUPTED)
    except LabctlError as exc:
        return StudentResult(sid, site.name, FAILED, str(exc).splitlines()[0])
    the_plan = build_plan(site.prof, site.provider.site, student.slug, run.key.public_key, name=site.prof.name,
                          course=run.opts.course, given=given)
    store = run.ctx.store
    with store.lock(f"env:{the_plan.deployment}") as mine:
        if not mine:
            return StudentResult(sid, site.name, BUSY, "another operator is working on it", the_plan.deployment)
        current = store.get_deployment(the_plan.deployment)
        if (current and current.status != "destroyed"
                and ((current.owner, current.course) != (student.slug, run.opts.course)
                     or current.class_shared)):
            return StudentResult(sid, site.name, FAILED, f"deployment id {the_plan.deployment} already belongs to "
                                 f"{current.name} of {current.owner}", the_plan.deployment)
        if current and current.status == "up" and current.site == site.name:
            return StudentResult(sid, site.name, ALREADY, None, the_plan.deployment)
        if current and current.status != "destroyed" and current.site != site.name:
            # Made again here, its record would no longer name what it has there: nothing would delete that.
            return StudentResult(sid, site.name, FAILED, f"has an environment at {current.site} ({current.status}): "
                                 f"not made again at {site.name}; add {current.site} to --sites to resume it there, "
                                 f"or 'labctl class down {site.prof.name} --course {run.opts.course} --student {sid}' "
                                 "first", the_plan.deployment)
        run.events.student(sid, "starting", site.name)
        try:
            # The rate limit serves students in roster order: the first ones finish first, and their SSH and
            # setup run while the others' calls are still going out, not all at the end.
            with rank(run.order.get(student.slug, 0)):
                service.provision(
                    run.ctx, site.prof, the_plan, site.provider, run.key, name=site.prof.name,
                    allow_host_changes=run.opts.allow_host_changes, ssh_timeout=run.opts.ssh_timeout,
                    data={"student": {"id": sid, "name": student.name, "email": student.email,
                                      "public_key": student.ssh_public_key}},
                    extra_steps=(authorize_step(student.ssh_public_key),),
                    on_progress=lambda subject, stage, detail: run.events.student(sid, stage, f"{subject} {detail}"),
                    should_stop=run.stop.is_set,
                    # One thread per environment: the class already runs `concurrency` environments per site, and
                    # threads of their own for each one's keypair, group and lease were 1,200 threads at the start
                    # of a class of 500, its memory peak (148-151 MiB against 135 with one each), and no faster.
                    concurrency=1,
                )
        except (NoCapacity, QuotaExceeded) as exc:
            return _site_exhausted(run, site, student, the_plan, exc)
        except Interrupted:
            return StudentResult(sid, site.name, INTERRUPTED, None, the_plan.deployment)
        except LabctlError as exc:
            return StudentResult(sid, site.name, FAILED, str(exc).splitlines()[0], the_plan.deployment)
    return StudentResult(sid, site.name, UP, None, the_plan.deployment)


def _has_environment_at(run: _Run, student: Any, site: _Site) -> bool:
    """Whether the student's environment of this class is at `site` (not destroyed)."""
    current = run.ctx.store.get_deployment(naming.deployment_id(site.prof.name, student.slug, run.opts.course))
    return current is not None and current.status != "destroyed" and current.site == site.name


def _site_exhausted(run: _Run, site: _Site, student: Any, the_plan: Any, exc: CloudError) -> StudentResult | _Site:
    """Stop creating at this site; clean this student's partial environment (if it was begun) and move them on if
    we can."""
    from labctl.engine import Engine

    with run.lock:
        if site.exhausted is None:
            site.exhausted = f"{site.name} is out of {'quota' if isinstance(exc, QuotaExceeded) else 'capacity'}"
            run.events.student(student.student_id, "site exhausted", str(exc).splitlines()[0])
    if the_plan is not None and run.ctx.store.get_deployment(the_plan.deployment) is not None:
        Engine(site.provider, run.ctx.store).destroy(the_plan)
        run.ctx.store.forget_deployment(the_plan.deployment)
    nxt = _next_site(run, site)
    if nxt is not None:
        return nxt
    return StudentResult(student.student_id, site.name, FAILED, str(exc).splitlines()[0],
                         the_plan.deployment if the_plan is not None else None)


def _shared_resources(run: _Run, site: _Site) -> dict[str, Any]:
    """What the class's environments at `site` share (`plan.class_shared_plan`), by key: found or made once per run,
    before the first environment there needs it. Nothing where they share nothing."""
    from labctl.plan import class_shared_plan

    with site.shared_lock:  # the site's other environments wait for the first one's look (or create)
        if site.shared is None and site.shared_error is None:
            the_plan = class_shared_plan(site.prof, site.provider.site, run.opts.course, run.ctx.owner,
                                         run.key.public_key)
            try:
                site.shared = {} if the_plan is None else _apply_shared(run, site, the_plan)
            except (NoCapacity, QuotaExceeded, Interrupted):
                raise  # the site is out of room (its students move on), or the run stops
            except LabctlError as exc:
                # Once per run: the calls were retried already, and every environment here would wait its turn
                # at the lock to fail the same way. `class retry` tries again.
                why = str(exc).splitlines()[0]
                site.shared_error = f"what the class shares at {site.name} could not be made: {why}"
        if site.shared_error is not None:
            raise CloudError(site.shared_error)
        return site.shared or {}


def _apply_shared(run: _Run, site: _Site, the_plan: Any) -> dict[str, Any]:
    """The class's shared deployment at `site`, as `provision` makes a student's: recorded first, then applied (a
    rerun finds what is there), under its lock (another operator's `class up` waits for it, then finds it)."""
    from labctl.engine import Engine

    store, dep_id = run.ctx.store, the_plan.deployment
    with service.deployment_lock(run.ctx, dep_id, f"the shared resources of {run.opts.course}/{site.prof.name}"):
        current = store.get_deployment(dep_id)
        if current is not None and current.status != "destroyed" and not current.class_shared:
            raise UserError(f"deployment id {dep_id} (what the class shares at {site.name}) already belongs to "
                            f"{current.name} of {current.owner}")
        made = current is not None and current.status == "up"
        if not made:
            store.save_deployment(DeploymentRecord(
                id=dep_id, name=dep_id, lab=site.prof.name, owner=the_plan.owner, course=run.opts.course,
                site=site.name, status="applying", profile_path=str(site.prof.path),
                data={CLASS_SHARED: True, "tags": the_plan.tags, "nodes": [], "lease_hours": site.prof.lease_hours}))
        engine = Engine(site.provider, store, concurrency=1, should_stop=run.stop.is_set)
        try:
            found = engine.apply(the_plan)
        except (NoCapacity, QuotaExceeded) as exc:
            # The site is out of room (its students move on): what was made of it goes, as a student's partial
            # environment does, unless an environment of the class here uses it (a rerun's). What cannot be
            # deleted now stays recorded, for `class down`.
            store.set_deployment_status(dep_id, "failed", error=str(exc))
            if not any(d.site == site.name for d in class_deployments(run.ctx, run.opts.course, site.prof.name)):
                with contextlib.suppress(LabctlError):
                    if not engine.destroy(the_plan):
                        store.forget_deployment(dep_id)
            raise
        except CloudError as exc:
            store.set_deployment_status(dep_id, "failed", error=str(exc))
            raise
        if not made:
            store.set_deployment_status(dep_id, "up", error=None)
    return found


# -- status / report ------------------------------------------------------------------------------
@dataclass
class StudentStatus:
    student_id: str
    name: str
    email: str
    site: str
    status: str
    nodes: list[dict[str, Any]]
    setup: str
    lease_end: str | None
    error: str | None
    ssh: str | None


def class_status(ctx: service.Context, lab: str, course: str) -> list[StudentStatus]:
    rows = []
    for dep in class_deployments(ctx, course, _lab_name(lab)):
        st = service.status(ctx, dep.id)
        student = dep.data.get("student", {})
        ip = next((n.floating_ip for n in st.nodes if n.floating_ip), None)
        setups = {n.setup for n in st.nodes} or {"-"}
        rows.append(StudentStatus(
            student.get("id", dep.owner), student.get("name", ""), student.get("email", ""), dep.site,
            dep.status, [{"name": n.name, "ip": n.floating_ip, "type": n.node_type} for n in st.nodes],
            ", ".join(sorted(setups)), st.lease_end, dep.data.get("error"), _ssh_command(dep, ip),
        ))
    return sorted(rows, key=lambda r: r.student_id)


def _ssh_command(dep: DeploymentRecord, ip: str | None) -> str | None:
    """What the student types (with their own key)."""
    from labctl.sites import resolve

    if not ip:
        return None
    try:
        site = resolve(dep.site)
    except UserError:
        return f"ssh cc@{ip}"
    if site.emulated:
        from labctl.testbed.world import World

        return f"ssh -p {World().ssh_port} {site.ssh_user}@{ip}"
    return f"ssh {site.ssh_user}@{ip}" + (f" -p {site.ssh_port}" if site.ssh_port != 22 else "")


# -- down / extend --------------------------------------------------------------------------------
def class_down_targets(ctx: service.Context, lab: str, course: str, student: str | None = None
                       ) -> list[DeploymentRecord]:
    """The environments `class down` would delete: every student's of course/lab, or one student's. An empty
    lab, course or student is refused (it never means "all")."""
    from labctl.redact import clean

    check_selector(lab, "the lab")
    check_selector(course, "--course")
    check_selector(student, "--student")
    deps = class_deployments(ctx, course, _lab_name(lab))
    if student is not None:
        deps = [d for d in deps if student in (d.owner, d.data.get("student", {}).get("id"))]
        if not deps:
            raise UserError(f"no environment of student '{clean(student, one_line=True)}' in "
                            f"{clean(course, one_line=True)}/{clean(lab, one_line=True)}")
    return deps


def class_down(ctx: service.Context, lab: str, course: str, student: str | None = None,
               concurrency: int = 16, events: ClassEvents | None = None, cloud: str | None = None,
               delete_volumes: bool = False) -> list[StudentResult]:
    events = events or ClassEvents()
    deps = class_down_targets(ctx, lab, course, student)
    check_options(concurrency)
    events.start(len(deps))
    tune_for_threads()
    tune_gc()
    providers: dict[str, Any] = {}
    plock = threading.Lock()

    def provider_for(site_name: str) -> Any:
        from labctl.sites import resolve

        with plock:
            if site_name not in providers:
                providers[site_name] = service.connect(ctx, resolve(site_name), cloud)
            return providers[site_name]

    def one(dep: DeploymentRecord) -> StudentResult:
        sid = dep.data.get("student", {}).get("id", dep.owner)
        with ctx.store.lock(f"env:{dep.id}") as mine:
            if not mine:
                return StudentResult(sid, dep.site, BUSY, "another operator is working on it", dep.id)
            current = ctx.store.get_deployment(dep.id)
            if current is None or current.status == "destroyed":  # another operator finished it meanwhile
                return StudentResult(sid, dep.site, "deleted", None, dep.id)
            try:
                left = service.destroy_deployment(ctx, dep, provider_for(dep.site), on_progress=lambda *a: None,
                                                  delete_volumes=delete_volumes)
            except LabctlError as exc:
                return StudentResult(sid, dep.site, FAILED, str(exc).splitlines()[0], dep.id)
        result = StudentResult(sid, dep.site, "deleted" if not left else FAILED,
                               ("left: " + "; ".join(left)) if left else None, dep.id)
        events.finished(result)
        return result

    with ShortLivedWorkers(max(1, concurrency), thread_name_prefix="class-down") as pool:
        results = list(pool.map(one, deps))
    return results + _down_shared(ctx, course, _lab_name(lab), provider_for, events)


def _down_shared(ctx: service.Context, course: str, lab: str, provider_for: Callable[[str], Any],
                 events: ClassEvents) -> list[StudentResult]:
    """Delete what the class shares at each site where none of its environments is left; a row only for one that
    could not be deleted (its environments' rows say the rest)."""
    results = []
    in_use = {d.site for d in class_deployments(ctx, course, lab)}  # the sites where a student's is left
    for dep in class_deployments(ctx, course, lab, shared=True):
        if dep.site in in_use:
            continue
        with ctx.store.lock(f"env:{dep.id}", wait=True, timeout=service.LOCK_WAIT) as mine:
            current = ctx.store.get_deployment(dep.id)
            if not mine or current is None or current.status == "destroyed":
                continue  # another operator has it (and deletes it), or deleted it meanwhile
            try:
                left = service.destroy_deployment(ctx, current, provider_for(dep.site), on_progress=lambda *a: None)
                error = ("left: " + "; ".join(left)) if left else None
            except LabctlError as exc:
                error = str(exc).splitlines()[0]
        if error:
            result = StudentResult("(shared)", dep.site, FAILED, error, dep.id)
            events.finished(result)
            results.append(result)
    return results


def class_extend(ctx: service.Context, lab: str, course: str, hours: float, cloud: str | None = None) -> list[str]:
    """Move the end of every student's environment (Chameleon leases; on AWS and GCP each server's end the cloud
    enforces). One line per student: the new end, or why it was not moved."""
    from labctl.sites import resolve

    service.check_extend_hours(hours)
    check_selector(lab, "the lab")
    check_selector(course, "--course")
    ends = []
    providers: dict[str, Any] = {}
    for dep in class_deployments(ctx, course, _lab_name(lab)):
        sid = dep.data.get("student", {}).get("id", dep.owner)
        with ctx.store.lock(f"env:{dep.id}") as mine:
            if not mine:
                ends.append(f"{sid}: busy (another operator is working on it); not extended")
                continue
            try:
                if dep.site not in providers:
                    providers[dep.site] = service.connect(ctx, resolve(dep.site), cloud)
                st = service.extend_deployment(ctx, dep, providers[dep.site], hours)
            except LabctlError as exc:
                ends.append(f"{sid}: not extended: {str(exc).splitlines()[0]}")
                continue
        ends.append(f"{sid}: {st.lease_end}")
    return ends
