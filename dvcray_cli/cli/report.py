"""``dvcray report``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from rich.text import Text

from dvcray_cli.cli._common import boundary, out, write_json


def register(app: typer.Typer) -> None:
    app.command()(report)


@boundary
def report(
    experiments: Annotated[Optional[list[str]], typer.Argument(help="Experiments to show (default: every experiment of HEAD).", show_default=False)] = None,
    md: Annotated[bool, typer.Option("--md", help="Print a Markdown table (for $GITHUB_STEP_SUMMARY or a PR comment).")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Params and metrics of experiments against their baseline; changed values marked.

    Example:

        dvcray report ci-abc123 --md >> "$GITHUB_STEP_SUMMARY"
    """
    from rich.table import Table

    from dvcray_cli import report as core

    result = core.build(Path.cwd(), experiments or None)
    if json_:
        write_json(result.to_json())
        return
    if md:
        sys.stdout.write(core.to_markdown(result))
        return
    # One row per metric or param, one column per experiment: wide projects stay readable.
    # Names and values are data (experiment names, param values): printed as text, never markup.
    table = Table(title=Text(f"Experiments against {result.baseline.name} ({result.baseline.rev})"),
                  header_style="bold")
    table.add_column("")
    table.add_column("")
    table.add_column(Text(f"{result.baseline.name}\n(baseline)"), justify="right")
    for row in result.experiments:
        table.add_column(Text(row.name), justify="right")
    for column in result.columns:
        kind, name = column
        cells = [Text(core.cell(result.baseline.values.get(column)))]
        for row in result.experiments:
            text = Text(core.cell(row.values.get(column)))
            if result.changed(row, column):
                delta = result.delta(row, column)
                text.stylize("bold yellow")
                if delta is not None:
                    text.append(f" ({delta:+.4g})")
            cells.append(text)
        table.add_row(Text(kind, style="dim"), Text(name), *cells)
    out.print(table)
