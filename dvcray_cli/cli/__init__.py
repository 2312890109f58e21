"""The ``dvcray`` command line. Commands parse, call the core, and render.

Nothing here imports ray, dvc, boto3 or torch at module level: ``dvcray
--help`` must stay fast (tests/test_imports.py).
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from dvcray_cli import __version__
from dvcray_cli.cli._common import flags

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
    flags["verbose"] = verbose


# Each command module adds its commands to the app; the modules keep their heavy
# imports inside the command bodies.
from dvcray_cli.cli import cluster, queue, report, run, runs, scaffold  # noqa: E402

for _module in (scaffold, run, queue, runs, report, cluster):
    _module.register(app)


def main() -> None:
    import os

    from dvcray_cli.cli._common import quiet_stdout

    def stdout_is_null() -> bool:
        try:
            out, null = os.fstat(1), os.stat(os.devnull)
        except OSError:
            return False
        return (out.st_dev, out.st_ino) == (null.st_dev, null.st_ino)

    was_null = stdout_is_null()
    try:
        app(prog_name="dvcray")
    except BrokenPipeError:
        quiet_stdout()
        raise SystemExit(0) from None
    except SystemExit as exc:
        # A reader that went away (`dvcray --help | head -1`): Rich and Click point
        # stdout at /dev/null and exit 1. Ending early is no error: exit 0, quietly.
        broken = type(sys.stdout).__name__ == "PacifyFlushWrapper" or (not was_null and stdout_is_null())
        if exc.code not in (0, None) and broken:
            raise SystemExit(0) from None
        raise
