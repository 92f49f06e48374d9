"""`labctl class ...`: a lab for every student of a roster: up, retry, status, report, down, extend, dashboard."""

# No `from __future__ import annotations`: Typer reads every command's annotations at each start (see __init__).

import sys
from pathlib import Path
from typing import Annotated

import typer

from labctl.cli.dashboard_command import dashboard_command
from labctl.cli.options import (
    CloudOpt,
    ConcurrencyOpt,
    CourseOpt,
    DeleteVolumesOpt,
    FindCourseOpt,
    HoursOpt,
)
from labctl.cli.options import bounded as _bounded
from labctl.cli.options import make_context as _ctx
from labctl.cli.output import JsonOpt
from labctl.cli.output import echo as _echo
from labctl.cli.output import print_json as _print_json

class_app = typer.Typer(help="Provision a lab for a whole class roster, watch it, report, tear it down.",
                        no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
class_app.command("dashboard")(dashboard_command)


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
    from labctl.redact import clean

    if fmt not in ("csv", "json"):
        raise UserError(f"--format must be csv or json, not '{fmt}'")
    if output and (refusal := _not_replaceable(output)):  # before anything is read or said
        raise UserError(f"-o {clean(str(output), one_line=True)}: {refusal}")
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
    """Write the report to `path` (checked by `_not_replaceable` first), readable by its owner only (0600): it
    holds names, e-mails and IPs. It is written beside its place and renamed in, so a link put there meanwhile is
    replaced, not followed, and a half-written report never stands in its place."""
    import contextlib
    import os
    import tempfile

    from labctl.errors import UserError
    from labctl.redact import clean

    shown = clean(str(path), one_line=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        tmp = None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UserError(f"cannot write the report to {shown}: {reason}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


REPORT_PEEK = 1 << 20  # bytes of an existing file read to tell whether it is a report


def _not_replaceable(path: Path) -> str | None:
    """Why `-o path` must not be written (None: it may). Only a new file, an empty one or a report labctl wrote
    before is replaced (rerunning the report refreshes it): `-o roster.csv` or `-o ~/.bashrc` by mistake is
    refused and the file left as it was."""
    import json
    import stat

    from labctl.cli.render import REPORT_FIELDS

    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISDIR(st.st_mode):
        return "is a directory; name a file in it"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a link, a device...); name a file (without -o the report goes to stdout)"
    if st.st_size == 0:
        return None
    try:
        with path.open("rb") as f:
            head = f.read(REPORT_PEEK + 1)
    except OSError as exc:
        return exc.strerror or str(exc)
    first = head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
    if first in (",".join(REPORT_FIELDS), "student_id"):  # labctl's CSV header (of an empty class too)
        return None
    if len(head) <= REPORT_PEEK:
        try:
            records = json.loads(head)
        except ValueError:
            records = None
        if isinstance(records, list) and all(isinstance(r, dict) and tuple(r) == REPORT_FIELDS for r in records):
            return None
    return ("exists and is not a labctl class report: labctl replaces only a report it wrote; name a new file, "
            "or move this one away first")


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
