"""What every command prints: one line for a person (secrets masked, control characters removed) or JSON."""

import json
import sys
from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def echo(text: str, err: bool = False) -> None:
    """One line for a person: it may carry names and messages from a cloud, a profile or a roster, so known
    secrets are masked and control characters (escape sequences) removed."""
    from labctl.redact import clean

    typer.echo(clean(text), err=err)


def print_json(data: object) -> None:
    """JSON on stdout; known secrets masked (control characters are \\u-escaped by json itself)."""
    from labctl.redact import mask

    sys.stdout.write(mask(json.dumps(data, indent=2, default=str)) + "\n")
