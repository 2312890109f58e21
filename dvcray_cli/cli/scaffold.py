"""``dvcray scaffold``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from dvcray_cli.cli._common import boundary, err, out
from dvcray_cli.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command()(scaffold)


@boundary
def scaffold(
    template: Annotated[Optional[str], typer.Argument(help="Template name (see --list).", show_default=False)] = None,
    dest: Annotated[Optional[Path], typer.Argument(help="Folder to create or fill [default: ./TEMPLATE].", show_default=False)] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a params.yaml value by dotted key, e.g. data.source=digits.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite files that already exist.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the templates and exit.")] = False,
) -> None:
    """Start a DVC + Ray project from a template that works at once.

    In a folder outside any git repo it also runs git init and dvc init and
    makes a first commit; inside a repo it only adds files.

    Example:

        dvcray scaffold mnist --set data.source=digits
    """
    from dvcray_cli import scaffold as core

    if list_:
        for t in core.list_templates():
            out.print(Text.assemble((f"{t.name:<10}", "bold"), " ", t.description))
        return
    if not template:
        names = ", ".join(t.name for t in core.list_templates())
        raise UsageError(f"Name a template: dvcray scaffold TEMPLATE [DEST]. Known templates: {names}.",
                         "See them described with: dvcray scaffold --list")

    result = core.scaffold(template, dest, set_ or [], force)
    err.print(Text.assemble("Created ", (str(result.dest), "bold"), " from template ", (result.template, "bold"),
                            f" ({len(result.files)} files)."))
    if result.overwritten:
        err.print(f"Overwrote: {', '.join(result.overwritten)}", markup=False)
    if result.created_repo:
        err.print("Initialized git and DVC and committed the project.")
    elif result.dvc_initialized:
        err.print("Ran dvc init; nothing was committed.")
    else:
        err.print("Added the files to your repo; nothing was committed.")
    if result.next_steps:
        err.print("\nNext steps:")
        for step in result.next_steps:
            err.print(f"  {step}", markup=False)
