"""The options commands share (types with their checks and help) and the context a command works in."""

# No `from __future__ import annotations`: Typer reads every command's annotations at each start (see __init__).

from typing import Annotated

import typer

from labctl.sites import site_help

SiteOpt = Annotated[str, typer.Option("--site", "-s", help=site_help())]
OwnerOpt = Annotated[str | None, typer.Option("--owner", envvar="LABCTL_OWNER", help="Owner name in resource names.")]
CloudOpt = Annotated[str | None, typer.Option("--cloud", envvar="OS_CLOUD", help="clouds.yaml entry to use.")]
NameOpt = Annotated[str | None, typer.Option("--name", help="Deployment name (default: the lab's name).")]
DeleteVolumesOpt = Annotated[bool, typer.Option(
    "--delete-volumes", help="Also delete the volumes and object-store containers the profile keeps across down.")]


def bounded(option: str, high: float, *, low: float = 0.0, low_inclusive: bool = False, unit: str = "",
             why: str = ""):  # noqa: ANN202
    """A Typer callback that refuses a number that is not finite or not within (low, high] with labctl's
    one-line error (exit 2), while the command line is parsed: before anything is created or recorded."""

    def check(value: float | int | None) -> float | int | None:
        if value is not None:
            from labctl.service import check_number

            check_number(value, option, high=high, low=low, low_inclusive=low_inclusive, unit=unit, why=why)
        return value

    return check


def check_concurrency(value: int) -> int:
    from labctl.classroom import check_options

    check_options(value)
    return value


# Numbers the user gives, bounded (maxima also in labctl.service / labctl.classroom, which check them again).
HoursOpt = Annotated[float, typer.Option(
    "--hours", callback=bounded("--hours", 168, unit=" hours", why=" (Chameleon leases last at most 7 days)"),
    help="Hours to add to the lease: more than 0, at most 168 (Chameleon's 7-day lease maximum).")]
SshTimeoutOpt = Annotated[float, typer.Option(
    "--ssh-timeout", callback=bounded("--ssh-timeout", 86400, unit=" seconds"),
    help="Seconds to wait for SSH on the nodes: more than 0, at most 86400 (a day).")]
ConcurrencyOpt = Annotated[int, typer.Option(
    "--concurrency", callback=check_concurrency, help="Environments in flight (per site): 1 to 256.")]


def make_context(owner: str | None = None, progress: bool = False, as_json: bool = False):  # noqa: ANN202
    from labctl.service import Context

    reporter = None
    if progress:
        from labctl.cli.render import progress_reporter

        reporter = progress_reporter(quiet=as_json)
    return Context.create(owner, reporter)


CourseOpt = Annotated[str, typer.Option("--course", envvar="LABCTL_COURSE", help="Course name in resource names.")]
# Commands on a class that exists (retry, status, report, down, extend) find its course; none defaults to one.
FindCourseOpt = Annotated[str | None, typer.Option(
    "--course", envvar="LABCTL_COURSE",
    help="Course name (default: the only course with environments of LAB; several: they are listed).")]
