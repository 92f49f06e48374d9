"""`labctl gc`: the leak audit (see labctl.gc). Dry run by default; `--delete` removes what it listed."""

# No `from __future__ import annotations`: Typer reads the annotations at each start (see cli/__init__.py).

import sys
from typing import Annotated

import typer

from labctl.cli.output import JsonOpt
from labctl.cli.output import echo as _echo
from labctl.cli.output import print_json as _print_json


def gc_command(
    site: Annotated[list[str] | None, typer.Option(
        "--site", "-s", help="Only these sites (repeat, or S1,S2; `sim` = the emulated Chameleon sites). "
                             "Default: every site with credentials.")] = None,
    deployment: Annotated[str | None, typer.Option(
        "--deployment", help="Only this deployment's leftovers (its id, e.g. labctl-alice-hello).")] = None,
    delete: Annotated[bool, typer.Option("--delete", help="Delete what is listed (asks first on a terminal).")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking (needed off a terminal).")] = False,
    lost_state: Annotated[bool, typer.Option(
        "--lost-state", help="With --delete and a state that holds no deployment at all: the state that made what "
                             "is listed is lost, delete it all (refused without it: a mistyped --state makes "
                             "everyone's labs look orphaned).")] = False,
    cloud: Annotated[str | None, typer.Option("--cloud", envvar="OS_CLOUD", help="clouds.yaml entry to use.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List what carries labctl's tags but no live deployment in the state accounts for: orphans of lost state,
    leftovers of ended leases, other owners' leftovers in a shared state. Never lists untagged resources.

    Examples:\n
      labctl gc\n
      labctl gc --site chi@tacc --json\n
      labctl gc --site aws:us-east-1 --delete\n
      labctl gc --site chi@tacc --delete --lost-state   (the state that made them is gone)
    """
    from labctl import gc
    from labctl.errors import UserError
    from labctl.service import Context

    interactive = sys.stdin.isatty() and sys.stderr.isatty()
    if delete and not yes and not interactive:  # before any cloud call
        raise UserError("gc --delete asks before deleting; not on a terminal, so pass --yes to confirm")
    ctx = Context.create()
    # An empty state accounts for nothing: every labctl resource at the site, anyone's, would be taken for an orphan.
    empty_state = not ctx.store.deployments(include_destroyed=True)
    if delete and empty_state and deployment is None and not lost_state:  # before any cloud call
        raise UserError(f"gc --delete: the state {ctx.store.url} holds no deployment, so everything labctl made at "
                        "these sites looks orphaned, other people's labs too (a mistyped --state?); pass --deployment "
                        "ID for one deployment's leftovers, or --lost-state if the state that made them is lost")
    found = gc.audit(ctx, site, cloud=cloud, deployment=deployment)
    if not as_json:
        _print_audit(found)
        if empty_state and found.leaks:
            _echo(f"note: the state {ctx.store.url} holds no deployment: all that labctl made at these sites is "
                  "listed (is it the state you use?)", err=True)
    if not delete:
        if as_json:
            _print_json(found.to_json())
        if found.skipped and not found.sites:
            raise typer.Exit(1)  # nothing could be audited
        return
    if not found.leaks:
        if as_json:
            _print_json({**found.to_json(), "deleted": [], "left": [], "not_deleted": []})
        else:
            _echo("Nothing to delete.")
        return
    if not yes and not typer.confirm(f"Delete these {len(found.leaks)} resource(s)?", default=False, err=True):
        raise UserError("nothing deleted")
    if not as_json:  # after the question: a live display would hide it
        from labctl.cli.render import progress_reporter

        ctx.on_progress = progress_reporter()
    result = gc.delete(ctx, found)
    stop = getattr(ctx.on_progress, "stop", None)
    if stop:
        stop()
    if as_json:
        _print_json({**found.to_json(), **result.to_json()})
    else:
        _echo(f"Deleted {len(result.deleted)} of {len(found.leaks)}.")
        for line in result.skipped:
            _echo(f"not deleted: {line}", err=True)
        for leak in result.left:
            _echo(f"still there: {leak.kind} {leak.name} at {leak.site} ({leak.cloud_id})", err=True)
    if result.left or result.skipped:
        raise typer.Exit(1)


def _print_audit(found) -> None:  # noqa: ANN001
    from rich.table import Table
    from rich.text import Text

    from labctl import gc
    from labctl.cli.render import out_console
    from labctl.redact import clean

    def cell(value: object) -> Text:  # names and ids come from a cloud: one line, no control characters, no markup
        return Text(clean(str(value), one_line=True))

    for line in found.skipped:
        _echo(f"warning: not audited: {line}", err=True)
    if not found.sites and not found.skipped:
        _echo("No site with credentials to audit; name one with --site.")
        return
    if not found.sites:
        _echo("Nothing was audited.")
        return
    if not found.leaks:
        _echo(f"Nothing leaked at {', '.join(found.sites)}: every labctl resource belongs to a live deployment.")
        return
    table = Table(title=f"labctl gc: {len(found.leaks)} resource(s) no live deployment accounts for")
    for col in ("kind", "site", "name", "age", "owner", "cost/h", "why"):
        table.add_column(col)
    for leak in found.leaks:
        cost = f"{leak.cost_per_hour:.4f}" if leak.cost_per_hour is not None else "-"
        table.add_row(*map(cell, (leak.kind + (" (kept)" if leak.keep else ""), leak.site, leak.name,
                                gc.age_text(leak.age_hours), leak.owner or "-", cost, leak.reason)))
    out_console.print(table)
    _echo(f"Audited: {', '.join(found.sites)}")
    total = found.cost_per_hour
    if total is not None:
        _echo(f"Known cost of what is listed: {total:.2f} {found.currency} per hour (servers on AWS/GCP, on-demand)")
    owners = sorted({leak.owner or "-" for leak in found.leaks})
    if len(owners) > 1:
        _echo(f"Owners: {', '.join(owners)}. gc trusts this state: a run that keeps another state file looks "
              "orphaned here.")
