"""The ``dvcray`` command line. Commands parse, call the core, and render.

Nothing here imports ray, dvc, boto3 or torch at module level: ``dvcray
--help`` must stay fast (tests/test_imports.py).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from dvcray_cli import __version__
from dvcray_cli.cli._common import state

app = typer.Typer(
    name="dvcray",
    help="Run DVC experiments on Ray clusters: `dvcray run` where you would type `dvc exp run`.",
    no_args_is_help=True,
    add_completion=False,
    # Locals can hold credentials: never print them.
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dvcray {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks of errors.")] = False,
) -> None:
    state["verbose"] = verbose


# Each command module adds its commands to the app; the modules keep their heavy
# imports inside the command bodies.
from dvcray_cli.cli import cluster, queue, report, run, runs, scaffold  # noqa: E402

for _module in (scaffold, run, queue, runs, report, cluster):
    _module.register(app)


def main() -> None:
    app(prog_name="dvcray")
