"""`labctl class dashboard LAB`: the class as a live web page on 127.0.0.1 (see labctl.dashboard)."""

# No `from __future__ import annotations`: Typer reads the annotations at each start (see cli/__init__.py).

from typing import Annotated

import typer

from labctl.cli.output import echo as _echo


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        from labctl.errors import UserError

        raise UserError(f"--port must be 0 (any free port) or 1..65535, not {value}")
    return value


def dashboard_command(
    lab: Annotated[str, typer.Argument(help="Lab name.")],
    course: Annotated[str | None, typer.Option(
        "--course", envvar="LABCTL_COURSE",
        help="Course name (default: the only course with environments of LAB).")] = None,
    port: Annotated[int, typer.Option(
        "--port", callback=_port, help="Port on 127.0.0.1 (default 0: any free port, printed).")] = 0,
) -> None:
    """A live web page of the class for the instructor: students by state, lease ends, failures with their
    errors, counts and cost per hour per site. Read-only; served on 127.0.0.1 only, at a URL with a random
    token (printed); it follows `class up` as it runs. Ctrl-C stops it.

    Examples:\n
      labctl class dashboard hello --course ml-sys\n
      labctl class dashboard hello --port 8765
    """
    from labctl.cli.overview import course_for
    from labctl.dashboard import Dashboard, Prices
    from labctl.errors import UserError
    from labctl.pricing import load_prices
    from labctl.service import Context

    ctx = Context.create()
    course = course_for(ctx, lab, course, "dashboard")
    board = Dashboard(ctx, lab, course, Prices(load_prices()))
    try:
        server = board.serve(port)
    except OSError as exc:
        raise UserError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None
    _echo(f"Dashboard of {course}/{lab}: {board.url(server.server_port)}")
    _echo("Only this machine can open it (127.0.0.1); anyone who has the URL can read it. Ctrl-C stops it.")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        ctx.store.close()
    _echo("Dashboard stopped.")
