"""The labctl command line. Thin: parse, call labctl.service, render. Heavy modules load inside commands."""

# No `from __future__ import annotations`: Typer reads every command's annotations at each start, and
# evaluating ~400 postponed string annotations cost more than building them once here.

import sys
from pathlib import Path
from typing import Annotated

import typer

from labctl.cli.output import JsonOpt
from labctl.cli.output import echo as _echo
from labctl.cli.output import print_json as _print_json
from labctl.cli.testbed_commands import testbed_app
from labctl.errors import LabctlError
from labctl.sites import site_help

app = typer.Typer(
    help="Provision course lab environments on Chameleon, AWS and GCP (or emulated ones: `--site sim`).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"labctl {version('labctl')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("labctl (not installed: no version)")
        raise typer.Exit(0)


@app.callback()
def _global_options(
    state: Annotated[str | None, typer.Option(
        "--state", envvar="LABCTL_STATE_URL", show_envvar=True,
        help="State database: a SQLite path or postgresql://... (shared among course staff).")] = None,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print labctl's version and exit.")] = False,
) -> None:
    """Provision course lab environments on Chameleon, AWS, GCP (and emulated testbeds, `--site sim`)."""
    import os

    if state:
        os.environ["LABCTL_STATE_URL"] = state  # read by the state store when a command opens it


app.add_typer(testbed_app, name="testbed")
app.command("gc")(__import__("labctl.cli.gc_command", fromlist=["gc_command"]).gc_command)
class_app = typer.Typer(help="Provision a lab for a whole class roster, watch it, report, tear it down.",
                        no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(class_app, name="class")
class_app.command("dashboard")(__import__("labctl.cli.dashboard_command", fromlist=["x"]).dashboard_command)

SiteOpt = Annotated[str, typer.Option("--site", "-s", help=site_help())]
OwnerOpt = Annotated[str | None, typer.Option("--owner", envvar="LABCTL_OWNER", help="Owner name in resource names.")]
CloudOpt = Annotated[str | None, typer.Option("--cloud", envvar="OS_CLOUD", help="clouds.yaml entry to use.")]
NameOpt = Annotated[str | None, typer.Option("--name", help="Deployment name (default: the lab's name).")]
DeleteVolumesOpt = Annotated[bool, typer.Option(
    "--delete-volumes", help="Also delete the volumes and object-store containers the profile keeps across down.")]


def _bounded(option: str, high: float, *, low: float = 0.0, low_inclusive: bool = False, unit: str = "",
             why: str = ""):  # noqa: ANN202
    """A Typer callback that refuses a number that is not finite or not within (low, high] with labctl's
    one-line error (exit 2), while the command line is parsed: before anything is created or recorded."""

    def check(value: float | int | None) -> float | int | None:
        if value is not None:
            from labctl.service import check_number

            check_number(value, option, high=high, low=low, low_inclusive=low_inclusive, unit=unit, why=why)
        return value

    return check


def _concurrency(value: int) -> int:
    from labctl.classroom import check_options

    check_options(value)
    return value


# Numbers the user gives, bounded (maxima also in labctl.service / labctl.classroom, which check them again).
HoursOpt = Annotated[float, typer.Option(
    "--hours", callback=_bounded("--hours", 168, unit=" hours", why=" (Chameleon leases last at most 7 days)"),
    help="Hours to add to the lease: more than 0, at most 168 (Chameleon's 7-day lease maximum).")]
SshTimeoutOpt = Annotated[float, typer.Option(
    "--ssh-timeout", callback=_bounded("--ssh-timeout", 86400, unit=" seconds"),
    help="Seconds to wait for SSH on the nodes: more than 0, at most 86400 (a day).")]
ConcurrencyOpt = Annotated[int, typer.Option(
    "--concurrency", callback=_concurrency, help="Environments in flight (per site): 1 to 256.")]


def _ctx(owner: str | None = None, progress: bool = False, as_json: bool = False):  # noqa: ANN202
    from labctl.service import Context

    reporter = None
    if progress:
        from labctl.cli.render import progress_reporter

        reporter = progress_reporter(quiet=as_json)
    return Context.create(owner, reporter)


@app.command()
def up(
    lab: Annotated[str, typer.Argument(help="Lab profile name (profiles/<lab>.yaml) or path.")],
    site: Annotated[str, typer.Option("--site", "-s", help="A site, or several in order (chi@tacc,chi@uc: the next "
                                      "when one has no room); auto: the profile's sites in order. "
                                      + site_help())] = "auto",
    name: NameOpt = None,
    owner: OwnerOpt = None,
    cloud: CloudOpt = None,
    allow_host_changes: Annotated[bool, typer.Option(
        help="On sim, also run setup steps that would change this machine (apt, sudo).")] = False,
    ssh_timeout: SshTimeoutOpt = 900,
    as_json: JsonOpt = False,
) -> None:
    """Create a lab: reserve, launch, attach IPs, run setup. Rerun it to resume after any failure.

    Examples:\n
      labctl up hello --site sim\n
      labctl up gpu-a100 --site chi@tacc\n
      labctl up gpu-a100 --site chi@tacc,chi@uc   (chi@uc when chi@tacc has no free hosts)\n
      labctl up gpu-a100 --site sim:chi@uc --json
    """
    from labctl import service
    from labctl.cli.render import print_status

    ctx = _ctx(owner, progress=True, as_json=as_json)
    try:
        result = service.up(ctx, lab, site, name=name, cloud=cloud, allow_host_changes=allow_host_changes,
                            ssh_timeout=ssh_timeout)
    except LabctlError as exc:
        from labctl.cli.overview import lab_name

        raise _with_name(exc, name or lab_name(lab)) from None
    _stop_progress(ctx)
    if as_json:
        _print_json(result.to_json())
    else:
        print_status([result], detail=True)


@app.command()
def down(
    lab: Annotated[str | None, typer.Argument(help="Deployment name (optional if you have one).")] = None,
    owner: OwnerOpt = None,
    cloud: CloudOpt = None,
    delete_volumes: DeleteVolumesOpt = False,
    missing_ok: Annotated[bool, typer.Option(
        "--missing-ok", help="Exit 0 when no deployment of that name exists (for clean-up scripts); "
                             "without it a name that matches nothing exits 2.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete everything labctl created for a lab (and nothing else), even after a crash.

    Volumes and object-store containers marked `keep` (the default) stay for the next `up`, unless
    --delete-volumes.

    Examples:\n
      labctl down hello\n
      labctl down data-persist --delete-volumes\n
      labctl down hello --missing-ok   (in a clean-up script: nothing to do is fine)
    """
    from labctl import service

    if missing_ok and _nothing_named(owner, lab):
        if as_json:
            _print_json({"deleted": False, "missing": True, "left": [], "kept": []})
        else:
            _echo(f"nothing named '{lab}' to delete" if lab else "you have no deployments; nothing to delete")
        return
    ctx = _ctx(owner, progress=True, as_json=as_json)
    kept: list[str] = []
    left = service.down(ctx, lab, cloud=cloud, delete_volumes=delete_volumes, kept=kept)
    _stop_progress(ctx)
    if as_json:
        _print_json({"deleted": not left, "left": left, "kept": kept})
    elif left:
        from labctl.errors import CloudError

        raise CloudError("down left resources behind: " + "; ".join(left) + " (run 'labctl down' again)")
    elif kept:
        for line in kept:
            _echo(line)
        typer.echo("Deleted everything else of this lab at the site.")
    else:
        typer.echo("Deleted. Nothing of this lab is left at the site.")


def _with_name(exc: LabctlError, name: str) -> LabctlError:
    """The error with its `labctl ssh LAB ...` advice naming the deployment, so the command runs as printed."""
    text = str(exc)
    if "'labctl ssh LAB " not in text:
        return exc
    named = LabctlError(text.replace("'labctl ssh LAB ", f"'labctl ssh {name} "))
    named.exit_code = exc.exit_code
    return named


def _nothing_named(owner: str | None, lab: str | None) -> bool:
    """No deployment of this owner that `down LAB` could mean (by id, name or lab; any with no LAB)."""
    from labctl.service import Context

    ctx = Context.create(owner)
    mine = ctx.store.deployments(owner=ctx.owner)
    return not any(lab in (d.id, d.name, d.lab) for d in mine) if lab else not mine


@app.command()
def status(
    lab: Annotated[str | None, typer.Argument(help="Deployment name (default: an overview of the state).")] = None,
    owner: OwnerOpt = None,
    everyone: Annotated[bool, typer.Option(
        "--all", help="Also other owners' labs (a state shared by course staff).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show one lab (nodes, IPs, lease end, setup, outputs) or, without a name, every deployment in the state:
    your labs, and class environments by course and lab with counts by state.

    Examples:\n
      labctl status\n
      labctl status --all --json\n
      labctl status hello
    """
    from labctl import service

    ctx = _ctx(owner)
    if lab is None:
        from labctl.cli.overview import overview
        from labctl.cli.render import print_overview

        view = overview(ctx, everyone=everyone)
        _print_json(view.to_json()) if as_json else print_overview(view)
        return
    from labctl.cli.render import print_status

    result = service.status(ctx, service.resolve_deployment(ctx, lab, action="status").id)
    if as_json:
        _print_json(result.to_json())
    else:
        print_status([result], detail=True)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh(
    words: Annotated[list[str] | None, typer.Argument(help="[LAB] [NODE] [-- COMMAND...]", show_default=False)] = None,
    forward: Annotated[list[str] | None, typer.Option(
        "--forward", "-L", metavar="PORT|LOCAL:REMOTE",
        help="Forward 127.0.0.1:LOCAL here to the node's localhost:REMOTE (PORT: the same on both).")] = None,
    owner: OwnerOpt = None,
    forget_host_key: Annotated[bool, typer.Option(
        "--forget-host-key",
        help="Forget the node's pinned SSH host key (every node's, without NODE) after it was rebuilt; "
             "the next `labctl up` pins the key it presents then.")] = False,
) -> None:
    """Open a shell on a node, or run a command after `--`, with the pinned host key.

    Examples:\n
      labctl ssh hello\n
      labctl ssh hello node-1 -- uname -a\n
      labctl ssh gpu-a100 --forward 8888\n
      labctl ssh gpu-a100 --forward 18888:8888   (local 18888 -> the node's 8888)\n
      labctl ssh hello node-1 --forget-host-key   (after the node was rebuilt)
    """
    import subprocess

    from labctl import service

    words = list(words or [])
    # Click drops the "--" itself; find where it was in the command line to split target from command.
    argv = sys.argv[1:]
    n_command = len(argv) - argv.index("--") - 1 if "--" in argv else 0
    target, command = (words[: len(words) - n_command], words[len(words) - n_command:])
    if len(target) > 2:
        from labctl.errors import UserError

        raise UserError(f"labctl ssh takes [LAB] [NODE], then '--' and a command; got {' '.join(target)}")
    lab, node = (target + [None, None])[:2]
    if forget_host_key:
        if command or forward:
            from labctl.errors import UserError

            raise UserError("--forget-host-key takes [LAB] [NODE] only (no command, no --forward)")
        dep, forgotten = service.forget_host_keys(_ctx(owner), lab, node)
        if not forgotten:
            _echo(f"{dep.name}: no pinned host key for {node or 'any node'}; nothing to forget")
        for k in forgotten:
            _echo(f"{dep.name}/{k.node}: forgot the pinned host key {k.fingerprint} of {k.host}:{k.port}")
        if forgotten:
            _echo(f"'{service.up_command(dep)}' pins the key the node presents now")
        return
    argv_ssh = service.ssh_argv(_ctx(owner), lab, node, command, forward or [])
    raise typer.Exit(subprocess.call(argv_ssh))


@app.command()
def plan(
    lab: Annotated[str, typer.Argument(help="Lab profile name or path.")],
    site: SiteOpt,
    name: NameOpt = None,
    owner: OwnerOpt = None,
    as_json: JsonOpt = False,
    prices: Annotated[Path | None, typer.Option(
        "--prices", help="Price table (JSON, same shape as the shipped one) to use instead of labctl's.")] = None,
) -> None:
    """Show what `up` would create at a site, with lease hours and cost (or Chameleon SUs). Changes nothing.

    Examples:\n
      labctl plan gpu-a100 --site chi@uc\n
      labctl plan hello --site aws:us-east-1 --prices my-prices.json
    """
    from labctl import pricing, service
    from labctl.cli.render import plan_json, print_plan

    table = pricing.load_prices(prices)
    the_plan = service.plan(_ctx(owner), lab, site, name=name)
    estimate = pricing.estimate(the_plan, table)
    if as_json:
        _print_json({**plan_json(the_plan), "estimate": estimate.to_json()})
    else:
        print_plan(the_plan, estimate)


@app.command()
def validate(
    profiles: Annotated[list[str] | None, typer.Argument(help="Profile names or paths (default: all found).")] = None,
    site: Annotated[str | None, typer.Option("--site", "-s", help="Also check it can run at this site.")] = None,
) -> None:
    """Check lab profiles (and that they can run at a site): print every problem, with file and field, then
    exit 2 if there was any (0 when all are fine).

    Examples:\n
      labctl validate\n
      labctl validate gpu-a100 --site chi@uc
    """
    from labctl import profile as profile_mod
    from labctl import site_fit, sites
    from labctl.errors import UserError

    refs = profiles or [str(p) for p in profile_mod.available_profiles().values()]
    errors = []
    for ref in refs:
        try:
            prof = profile_mod.load_profile(profile_mod.find_profile(ref))
            for site_name in [site] if site else prof.sites:
                problems = site_fit.validate_for_site(prof, sites.resolve(site_name, prof))
                errors += [f"{prof.name} at {site_name}: {p}" for p in problems]
            if not errors:
                _echo(f"ok: {prof.name} ({', '.join([site] if site else prof.sites)})")
        except UserError as exc:
            errors.append(str(exc))
    if errors:
        for line in errors:
            _echo(f"error: {line}", err=True)
        raise typer.Exit(2)


@app.command()
def schema() -> None:
    """Print the JSON Schema of lab profiles (for editors)."""
    from labctl.profile import json_schema

    _print_json(json_schema())


@app.command("sites")
def sites_cmd(as_json: JsonOpt = False, cloud: CloudOpt = None) -> None:
    """List known sites and whether credentials are found for each."""
    from labctl import sites
    from labctl.cli.render import print_sites
    from labctl.providers.base import describe_credentials

    known = [*sites.usable_sites(), sites.resolve("aws"), sites.resolve("gcp")]
    rows = [{"site": s.name if s.provider == "chameleon" else sites.CLOUD_FORMS[s.provider],
             "provider": s.provider, "family": s.family, "region": s.region if s.provider == "chameleon" else "any",
             "reservation": s.reservation, "credentials": describe_credentials(s, cloud)} for s in known]
    for name, what in sites.EMULATED_SITES.items():
        rows.append({"site": name, "provider": what, "family": "-", "region": "-",
                     "reservation": "as the site it stands for", "credentials": "none needed"})
    if as_json:
        _print_json(rows)
    else:
        print_sites(rows)


@app.command()
def extend(
    lab: Annotated[str | None, typer.Argument(help="Deployment name.")] = None,
    hours: HoursOpt = 1,
    owner: OwnerOpt = None,
    cloud: CloudOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Extend a lab's lease.

    Examples:\n
      labctl extend gpu-a100 --hours 2
    """
    from labctl import service

    result = service.extend(_ctx(owner), lab, hours, cloud=cloud)
    if as_json:
        _print_json(result.to_json())
    else:
        _echo(f"{result.name}: lease now ends {result.lease_end}")


CourseOpt = Annotated[str, typer.Option("--course", envvar="LABCTL_COURSE", help="Course name in resource names.")]
# Commands on a class that exists (retry, status, report, down, extend) find its course; none defaults to one.
FindCourseOpt = Annotated[str | None, typer.Option(
    "--course", envvar="LABCTL_COURSE",
    help="Course name (default: the only course with environments of LAB; several: they are listed).")]


def _class_options(lab: str, roster: Path | None, site: str | None, sites: str | None, **kw: object):  # noqa: ANN202
    from labctl.classroom import ClassOptions
    from labctl.errors import UserError

    names = [s.strip() for s in (sites or "").split(",") if s.strip()] or ([site] if site else [])
    if not names:
        raise UserError("class up needs --site SITE or --sites S1,S2")
    return ClassOptions(lab=lab, sites=names, roster=roster, **kw)


def _class_run(opts, as_json: bool) -> None:  # noqa: ANN001
    from labctl import classroom
    from labctl.cli.overview import lab_name
    from labctl.cli.render import class_progress, print_class_results

    ui = class_progress(quiet=as_json)
    try:
        results = classroom.class_up(_ctx(), opts, ui.events())
    finally:
        ui.stop()
    if as_json:
        _print_json([r.__dict__ for r in results])
    else:
        import shlex

        lab, course = shlex.quote(lab_name(opts.lab)), shlex.quote(opts.course)
        where = f"--sites {shlex.quote(','.join(opts.sites))}" if len(opts.sites) > 1 else \
            f"--site {shlex.quote(opts.sites[0])}"
        steps = (f"labctl class status {lab} --course {course}   (per student: site, state, IP, setup)",
                 f"labctl class report {lab} --course {course} -o {lab_name(opts.lab)}.csv   "
                 "(IPs and SSH commands to hand out)")
        if any(r.status in ("failed", "interrupted", "busy") for r in results):
            steps += (f"labctl class retry {lab} --course {course} --roster {shlex.quote(str(opts.roster))} "
                      f"{where}   (again, only those not up)",)
        print_class_results(results, f"{opts.course}/{lab_name(opts.lab)}", steps)
    if any(r.status == "failed" for r in results):
        raise typer.Exit(1)


@class_app.command("up")
def class_up(
    lab: Annotated[str, typer.Argument(help="Lab profile name or path.")],
    roster: Annotated[Path, typer.Option("--roster", "-r", help="Roster CSV: student_id,name,email,ssh_public_key")],
    site: Annotated[str | None, typer.Option("--site", "-s", help="Site for every student.")] = None,
    sites: Annotated[str | None, typer.Option("--sites", help="Several sites, in order: S1,S2.")] = None,
    spread: Annotated[bool, typer.Option(help="Spread students evenly over --sites.")] = False,
    course: CourseOpt = "course",
    keys: Annotated[Path | None, typer.Option("--keys", help="Directory of <student>.pub keys.")] = None,
    skip_bad_rows: Annotated[bool, typer.Option(help="Provision the good rows, report the bad.")] = False,
    concurrency: ConcurrencyOpt = 16,
    rate: Annotated[float | None, typer.Option(
        "--rate", callback=_bounded("--rate", 1000, unit=" calls per second"),
        help="Client-side API calls per second per site: more than 0, at most 1000.")] = None,
    allow_host_changes: Annotated[bool, typer.Option(help="On sim, also run host-changing setup steps.")] = False,
    cloud: CloudOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Provision LAB for every student of a roster. Rerun to resume; Ctrl-C stops cleanly.

    Examples:\n
      labctl class up hello --roster roster.csv --site sim --course ml-sys\n
      labctl class up gpu-a100 --roster roster.csv --sites chi@tacc,chi@uc --spread
    """
    _class_run(_class_options(lab, roster, site, sites, course=course, keys_dir=keys, spread=spread,
                              skip_bad_rows=skip_bad_rows, concurrency=concurrency, rate=rate,
                              allow_host_changes=allow_host_changes, cloud=cloud), as_json)


@class_app.command("retry")
def class_retry(
    lab: Annotated[str, typer.Argument(help="Lab profile name or path.")],
    roster: Annotated[Path, typer.Option("--roster", "-r", help="The roster CSV used for class up.")],
    site: Annotated[str | None, typer.Option("--site", "-s")] = None,
    sites: Annotated[str | None, typer.Option("--sites")] = None,
    course: FindCourseOpt = None,
    keys: Annotated[Path | None, typer.Option("--keys")] = None,
    skip_bad_rows: Annotated[bool, typer.Option()] = False,
    concurrency: ConcurrencyOpt = 16,
    allow_host_changes: Annotated[bool, typer.Option()] = False,
    cloud: CloudOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Provision again only the students whose environment is not up.

    Examples:\n
      labctl class retry hello --roster roster.csv --site sim
    """
    from labctl.cli.overview import course_for

    course = course_for(_ctx(), lab, course, "retry")
    _class_run(_class_options(lab, roster, site, sites, course=course, keys_dir=keys, only_failed=True,
                              skip_bad_rows=skip_bad_rows, concurrency=concurrency,
                              allow_host_changes=allow_host_changes, cloud=cloud), as_json)


@class_app.command("status")
def class_status(
    lab: Annotated[str, typer.Argument(help="Lab name.")],
    course: FindCourseOpt = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Per student: site, state, IP, setup step, error.

    Examples:\n
      labctl class status hello --watch
    """
    from labctl import classroom
    from labctl.cli.overview import course_for
    from labctl.cli.render import class_status_table, out_console

    ctx = _ctx()
    course = course_for(ctx, lab, course, "status")
    if as_json:
        _print_json([r.__dict__ for r in classroom.class_status(ctx, lab, course)])
        return
    if not watch:
        out_console.print(class_status_table(classroom.class_status(ctx, lab, course), lab))
        return
    import time

    from rich.live import Live

    with Live(class_status_table(classroom.class_status(ctx, lab, course), lab), console=out_console) as live:
        try:
            while True:
                time.sleep(2)
                live.update(class_status_table(classroom.class_status(ctx, lab, course), lab))
        except KeyboardInterrupt:
            pass


@class_app.command("report")
def class_report(
    lab: Annotated[str, typer.Argument(help="Lab name.")],
    course: FindCourseOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="csv or json (--json is the same as --format json).")] = "csv",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Who got what: IPs, SSH commands, lease ends, failures (CSV or JSON).

    Examples:\n
      labctl class report hello --course ml-sys -o hello.csv\n
      labctl class report hello --json
    """
    from labctl import classroom
    from labctl.cli.overview import course_for
    from labctl.cli.render import class_report_text
    from labctl.errors import UserError

    if fmt not in ("csv", "json"):
        raise UserError(f"--format must be csv or json, not '{fmt}'")
    ctx = _ctx()
    rows = classroom.class_status(ctx, lab, course_for(ctx, lab, course, "report"))
    _sim_ssh_note(rows)
    text = class_report_text(rows, "json" if as_json else fmt)
    if output:
        _write_private(output, text)
        _echo(f"wrote {output}", err=True)
    else:
        sys.stdout.write(text)


def _sim_ssh_note(rows: list) -> None:  # noqa: ANN001 - classroom.StudentStatus
    """The report's SSH commands for emulated nodes work only while a labctl process serves their SSH: say what
    to run first when no background testbed does (on stderr, so the CSV / JSON on stdout stays clean)."""
    if not any(r.ssh and r.site.startswith("sim") for r in rows):
        return
    from labctl.testbed.serve import running
    from labctl.testbed.world import default_state_dir

    if running(default_state_dir()) is None:
        _echo("note: on sim the nodes answer SSH only while labctl serves them: run 'labctl testbed start' "
              "before the report's ssh commands ('labctl testbed stop' afterwards)", err=True)


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only (0600): a report holds names, e-mails and IPs."""
    import os

    from labctl.errors import UserError
    from labctl.redact import clean

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode otherwise
            f.write(text)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UserError(f"cannot write the report to {clean(str(path), one_line=True)}: {reason}") from None


@class_app.command("down")
def class_down(
    lab: Annotated[str, typer.Argument(help="Lab name.")],
    course: FindCourseOpt = None,
    student: Annotated[str | None, typer.Option("--student", help="Only this student's environment.")] = None,
    concurrency: ConcurrencyOpt = 16,
    cloud: CloudOpt = None,
    delete_volumes: DeleteVolumesOpt = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before deleting a whole class "
                                                          "(needed when not on a terminal).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete every student's environment of LAB (or one with --student); kept volumes and containers stay
    unless --delete-volumes. A whole class is deleted only after you confirm (or with --yes).

    Examples:\n
      labctl class down hello --yes\n
      labctl class down hello --student alice
    """
    from labctl import classroom
    from labctl.cli.overview import course_for
    from labctl.cli.render import class_progress, print_class_results
    from labctl.errors import UserError
    from labctl.redact import clean

    ctx = _ctx()
    course = course_for(ctx, lab, course, "down")
    targets = classroom.class_down_targets(ctx, lab, course, student)  # refuses an empty selector
    if student is None and targets:
        what = (f"{len(targets)} environment(s) of {clean(course, one_line=True)}/{clean(lab, one_line=True)}"
                + (", with their kept volumes and containers" if delete_volumes else ""))
        if not yes:
            if not (sys.stdin.isatty() and sys.stderr.isatty()):
                raise UserError(f"class down would delete {what}; not on a terminal, so pass --yes to confirm")
            if not typer.confirm(f"Delete {what}?", default=False, err=True):
                raise UserError("nothing deleted")
    ui = class_progress(quiet=as_json)
    try:
        results = classroom.class_down(ctx, lab, course, student, concurrency, ui.events(), cloud=cloud,
                                       delete_volumes=delete_volumes)
    finally:
        ui.stop()
    if as_json:
        _print_json([r.__dict__ for r in results])
    else:
        print_class_results(results)
    if any(r.status == "failed" for r in results):
        raise typer.Exit(1)


@class_app.command("extend")
def class_extend(
    lab: Annotated[str, typer.Argument(help="Lab name.")],
    hours: HoursOpt = 1,
    course: FindCourseOpt = None,
    cloud: CloudOpt = None,
) -> None:
    """Extend the lease of every student's environment."""
    from labctl import classroom
    from labctl.cli.overview import course_for

    ctx = _ctx()
    for line in classroom.class_extend(ctx, lab, course_for(ctx, lab, course, "extend"), hours, cloud=cloud):
        _echo(line)


def _stop_progress(ctx: object) -> None:
    stop = getattr(getattr(ctx, "on_progress", None), "stop", None)
    if stop:
        stop()


def _plain_command(argv: list[str]) -> bool:
    """True for a top-level command such as `status` or `up`: Typer builds the parameters of every command
    at each start, and such a run does not need the `class` and `testbed` groups built."""
    first = next((a for a in argv if not a.startswith("-")), None)
    plain = {c.name or c.callback.__name__ for c in app.registered_commands}  # type: ignore[union-attr]
    return first in plain and "--help" not in argv and "-h" not in argv


def main() -> None:
    groups = app.registered_groups
    if _plain_command(sys.argv[1:]):
        app.registered_groups = []
    try:
        _run()
    finally:
        app.registered_groups = groups  # in-process callers (tests) run one command after another


def _run() -> None:
    try:
        code = app(prog_name="labctl", standalone_mode=False)
    except LabctlError as exc:
        _stop_live()
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _stop_live()
        _fail("interrupted; state is saved: rerun the same command to resume", 130)
    except Exception as exc:
        kinds = {c.__name__ for c in type(exc).__mro__}  # Click's, or the copy Typer >= 0.28 vendors
        if "NoArgsIsHelpError" in kinds:  # `labctl` / `labctl class` alone: the help, as before
            sys.stdout.write(exc.ctx.get_help() + "\n")  # type: ignore[attr-defined]
            sys.exit(2)
        if "Abort" in kinds:
            _stop_live()
            _fail("interrupted; state is saved: rerun the same command to resume", 130)
        if "ClickException" not in kinds:
            raise
        # A usage error (unknown option, bad type, missing argument) in labctl's one-line form, exit 2.
        where = getattr(getattr(exc, "ctx", None), "command_path", None) or "labctl"
        _fail(f"{exc.format_message()} (see '{where} --help')", getattr(exc, "exit_code", 2))  # type: ignore
    sys.exit(code if isinstance(code, int) else 0)


def _stop_live() -> None:
    if "labctl.cli.render" in sys.modules:
        sys.modules["labctl.cli.render"].stop_all()


def _fail(message: str, code: int) -> None:
    """`error: <first line>` (then any detail lines, e.g. a setup log's tail), secrets masked, no control
    characters: the message may carry text from a cloud, a node or the user."""
    from labctl.redact import clean

    first, _, rest = message.partition("\n")
    # Unicode line and paragraph separators would split the one line in a log viewer or an editor.
    first = clean(first, one_line=True).replace("\u2028", " ").replace("\u2029", " ")
    sys.stderr.write(f"error: {first}\n")
    if rest.strip():
        sys.stderr.write(clean(rest).rstrip() + "\n")
    sys.exit(code)
