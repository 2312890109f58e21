"""``dvcray queue start``: DVC's own queue, run on a Ray cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dvcray_cli.cli._common import EnvOption, boundary, check_jobs
from dvcray_cli.cli._follow import follow_many

app = typer.Typer(help="Run DVC's own experiment queue (dvc exp run --queue) on a Ray cluster.",
                  no_args_is_help=True)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="queue")


@app.command("start")
@boundary
def start(
    names: Annotated[Optional[list[str]], typer.Argument(help="Queued experiments to run, by name or stash rev (default: all).", show_default=False)] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", help="At most this many experiments at once (default: all).", show_default=False)] = None,
    cpus_per_exp: Annotated[Optional[float], typer.Option("--cpus-per-exp", min=0, help="CPUs reserved for each experiment's runner, as in dvcray run (needs an S3 store).", show_default=False)] = None,
    gpus_per_exp: Annotated[Optional[float], typer.Option("--gpus-per-exp", min=0, help="GPUs reserved for each experiment's runner.", show_default=False)] = None,
    retries: Annotated[Optional[int], typer.Option("--retries", min=0, help="Run an experiment again, on another machine, when it is lost with its machine (died, spot instance reclaimed); finished stages are restored, not rerun. 0: never. [default: the project's retries in \\[tool.dvcray] of pyproject.toml, else 3]", show_default=False)] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="Ray job API, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS, the recorded cluster, or a local one)", show_default=False)] = None,
    store: Annotated[Optional[str], typer.Option("--store", help="Where outputs and run records go: s3://bucket/prefix or a folder (default: as dvcray run)", show_default=False)] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the outcomes as JSON on stdout; messages go to stderr.")] = False,
    env: EnvOption = None,
    cwd: Annotated[Path, typer.Option("--cwd", hidden=True)] = Path("."),
) -> None:
    """Run the experiments waiting in DVC's queue on a Ray cluster.

    Each leaves DVC's queue (dvc queue status no longer lists it) and runs with
    exactly the workspace, name and params it was queued with; each comes home
    as it ends, as with a dvcray run sweep. One that fails is recorded where
    DVC's queue records failures.

    Example:

        dvc exp run --queue -n lr-01 -S train.lr=0.1
        dvcray queue start --jobs 2
    """
    from dvcray_cli.runs import queue
    from dvcray_cli.runs.model import RunOptions

    check_jobs(jobs)
    opts = RunOptions(address=address, store=store, cpus_per_exp=cpus_per_exp, gpus_per_exp=gpus_per_exp,
                      env=env or [], retries=retries)
    where = cwd.resolve()
    follow_many(lambda say, on_line, on_change, on_progress:
                queue.start(opts, names or [], where, say, jobs, on_line, on_change, on_progress), json_)
