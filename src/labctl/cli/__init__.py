"""The labctl command line. Thin: parse, call labctl.service, render. Heavy modules load inside commands."""

# No `from __future__ import annotations`: Typer reads every command's annotations at each start, and
# evaluating ~400 postponed string annotations cost more than building them once here.

import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from labctl.cli.class_commands import class_app
from labctl.cli.gc_command import gc_command
from labctl.cli.options import (
    CloudOpt,
    DeleteVolumesOpt,
    HoursOpt,
    NameOpt,
    OwnerOpt,
    SiteOpt,
    SshTimeoutOpt,
)
from labctl.cli.options import make_context as _ctx
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
app.add_typer(class_app, name="class")
app.command("gc")(gc_command)

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


def quiet_known_warnings() -> None:
    """asyncssh (2.24) names cryptography's DSA classes when it is imported, and cryptography 51 warns at each
    name: five warnings, ten lines, on every command that uses SSH. labctl never makes or accepts a DSA key, so
    they tell its users nothing. Only those: the same message from anything else, and asyncssh's other
    warnings, still show."""
    warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh\.")


def main() -> None:
    quiet_known_warnings()
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
