"""`labctl testbed serve|start|status|stop`: the emulated clouds, in the foreground or in the background."""

import sys
from typing import Annotated

import typer

from labctl.cli.output import JsonOpt, echo, print_json

testbed_app = typer.Typer(help="The emulated clouds (Chameleon, Compute Engine, EC2): labctl with no account.",
                          no_args_is_help=True)

TbSiteOpt = Annotated[str, typer.Option("--site", "-s", help="Emulated Chameleon site to print the openrc for.")]


@testbed_app.command("serve")
def testbed_serve(site: TbSiteOpt = "chi@tacc") -> None:
    """Serve the emulated Chameleon, Compute Engine and EC2 until Ctrl-C; print each cloud's client settings."""
    from labctl.errors import UserError
    from labctl.testbed import serve
    from labctl.testbed.world import default_state_dir

    try:
        serve.serve(default_state_dir(), site, out=sys.stdout)
    except serve.AlreadyServing as exc:
        raise UserError(f"{exc}: see 'labctl testbed status'") from None
    except KeyboardInterrupt:
        pass


@testbed_app.command("start")
def testbed_start(site: TbSiteOpt = "chi@tacc") -> None:
    """Run `labctl testbed serve` in the background (nodes answer SSH after `labctl up` returns)."""
    from labctl.testbed import serve
    from labctl.testbed.world import default_state_dir

    world = default_state_dir()
    info, already = serve.start(world, site)
    if already:
        echo(f"the testbed already runs for {world} (pid {info['pid']}); 'labctl testbed stop' stops it", err=True)
    sys.stdout.write((world / serve.ENV_FILE).read_text())
    echo(f"# the same settings: source {world / serve.ENV_FILE}; 'labctl testbed stop' stops the testbed", err=True)


@testbed_app.command("status")
def testbed_status(as_json: JsonOpt = False) -> None:
    """Whether the background testbed runs (pid alive, endpoints answering), its ports and world dir."""
    from labctl.testbed import serve
    from labctl.testbed.world import default_state_dir

    st = serve.status(default_state_dir())
    if as_json:
        print_json(st)
        return
    ports = " ".join(f"{k}={v}" for k, v in st["ports"].items()) or "-"
    state = f"running (pid {st['pid']})" if st["running"] else "stopped"
    echo(f"testbed: {state}\nworld: {st['world']}\nports: {ports}" +
          (f"\nsettings: {st['env_file']}" if st["running"] else ""))


@testbed_app.command("stop")
def testbed_stop() -> None:
    """Stop the background testbed and the world's moto daemon (emulated EC2's state is lost with it; the
    daemon also stops by itself once idle and empty: LABCTL_MOTO_IDLE_SECONDS)."""
    from labctl.testbed import serve
    from labctl.testbed.world import default_state_dir

    pid, moto = serve.stop(default_state_dir())
    echo(f"stopped the testbed (pid {pid})" if pid else "no testbed runs for this world")
    if moto:
        echo("stopped the moto daemon (emulated EC2's state is gone)")
