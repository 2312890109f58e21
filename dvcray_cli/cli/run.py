"""``dvcray run``."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dvcray_cli.cli._common import boundary, err, out, write_json


def register(app: typer.Typer) -> None:
    app.command()(run)


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


@boundary
def run(
    targets: Annotated[Optional[list[str]], typer.Argument(help="Stages or dvc.yaml files to run (default: all).", show_default=False)] = None,
    exp_name: Annotated[Optional[str], typer.Option("--exp-name", "-n", help="Name of the experiment (DVC makes one up if not given).")] = None,
    set_param: Annotated[Optional[list[str]], typer.Option("--set-param", "-S", metavar="KEY=VALUE", help="Override a parameter, as in dvc exp run -S.")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="Ray job API, e.g. http://127.0.0.1:8265 [default: RAY_ADDRESS, the recorded cluster, or a local one]", show_default=False)] = None,
    store: Annotated[Optional[str], typer.Option("--store", help="Where outputs and run records go: s3://bucket/prefix or a folder [default: the DVC default remote if on S3, else ~/.dvcray/store]", show_default=False)] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Submit, print the run id and return.")] = False,
    apply: Annotated[bool, typer.Option("--apply", help="Apply the experiment to your workspace when it succeeds (dvc exp apply).")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout; messages go to stderr.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Rerun every stage; replace an experiment of the same name.")] = False,
    downstream: Annotated[bool, typer.Option("--downstream", help="Run the given targets and every stage after them.")] = False,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Commit message of the experiment.")] = None,
    pull: Annotated[bool, typer.Option("--pull", help="Pull missing data and run-cache from the store on the cluster.")] = False,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Skip stages whose only change is missing data.")] = False,
    copy_paths: Annotated[Optional[list[str]], typer.Option("--copy-paths", "-C", help="Also send this ignored or untracked path (repeatable).")] = None,
    cwd: Annotated[Path, typer.Option("--cwd", hidden=True)] = Path("."),
) -> None:
    """Run the pipeline as a DVC experiment on a Ray cluster.

    The experiment sees your workspace exactly as dvc exp run would (uncommitted
    changes included), its log streams here, and when it ends it is in your repo:
    dvc exp show lists it, dvcray pull NAME brings its outputs.

    Example:

        dvcray run --exp-name lr-01 -S train.lr=0.1
    """
    from dvcray_cli import run as core

    opts = core.RunOptions(
        targets=targets or [], exp_name=exp_name, overrides=set_param or [], address=address,
        store=store, force=force, downstream=downstream, message=message, pull=pull,
        allow_missing=allow_missing, copy_paths=copy_paths or [],
    )
    where = cwd.resolve()
    sub = core.submit(opts, where, say=lambda m: err.print(m, markup=False))
    err.print(f"Submitted run [bold]{sub.run_id}[/] to {sub.address}.")
    if detach:
        if json_:
            write_json({"run_id": sub.run_id, "state": "PENDING", "address": sub.address, "store": sub.store.url})
        err.print(f"Follow it with: dvcray logs {sub.run_id} --follow", markup=False)
        return

    stream = sys.stderr if json_ else sys.stdout

    def emit(text: str) -> None:
        stream.write(text)
        stream.flush()

    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        status = core.follow(sub.client, sub.run_id, emit)
    finally:
        signal.signal(signal.SIGTERM, previous)
    outcome = core.finish(sub, status, where, apply=apply)
    if json_:
        write_json(outcome.to_json())
    else:
        _summary(outcome)
    core.raise_for(outcome)


def _summary(outcome) -> None:
    from rich.table import Table

    if outcome.status != "SUCCEEDED":
        return
    table = Table(title=f"Experiment {outcome.exp_name}", show_header=True, header_style="bold")
    table.add_column("kind")
    table.add_column("file")
    table.add_column("name")
    table.add_column("value", justify="right")
    for kind, data in (("metric", outcome.metrics), ("param", outcome.params)):
        for file, values in data.items():
            for key, value in values.items():
                table.add_row(kind, file, key, f"{value:.6g}" if isinstance(value, float) else str(value))
    out.print(table)
    err.print(f"The experiment is in your repo as {outcome.exp_name}. Next:", markup=False)
    err.print("  dvc exp show", markup=False)
    if not outcome.applied:
        err.print(f"  dvcray pull {outcome.exp_name} && dvc exp apply {outcome.exp_name}", markup=False)
