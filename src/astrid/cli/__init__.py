"""The ``astrid`` command line.

Each command lives in its own module and only parses arguments, calls library
functions and prints or writes their results.
"""

from __future__ import annotations

import typer

from astrid import __version__

app = typer.Typer(
    name="astrid",
    help="AstrID, the Astronomical Identification System: find what changed in the sky.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"astrid {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """AstrID, the Astronomical Identification System: find what changed in the sky."""


def _register() -> None:
    from astrid.cli import commands

    commands.register(app)


_register()

__all__ = ["app"]
