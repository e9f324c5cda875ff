"""The ``pmod`` command line: parses arguments and calls into the package, nothing more."""

from __future__ import annotations

import sys

import typer

from .errors import UserError

app = typer.Typer(
    name="pmod",
    help="p-MoD for LLaVA-family models: convert, train, evaluate, count FLOPs, visualise.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    try:
        app()
    except UserError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
