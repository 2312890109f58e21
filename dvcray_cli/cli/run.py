"""``dvcray run``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from dvcray_cli.cli._common import EnvOption, boundary, check_jobs, err, out, write_json
from dvcray_cli.cli._follow import follow_many, interruptible, log_stream, say
from dvcray_cli.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command()(run)


@boundary
def run(
    targets: Annotated[Optional[list[str]], typer.Argument(help="Stages or dvc.yaml files to run (default: all).", show_default=False)] = None,
    exp_name: Annotated[Optional[str], typer.Option("--exp-name", "-n", help="Name of the experiment (DVC makes one up if not given).")] = None,
    set_param: Annotated[Optional[list[str]], typer.Option("--set-param", "-S", metavar="KEY=VALUE", help="Override a parameter, as in dvc exp run -S.")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="Ray job API, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS, the recorded cluster, or a local one)", show_default=False)] = None,
    store: Annotated[Optional[str], typer.Option("--store", help="Where outputs and run records go: s3://bucket/prefix or a folder (default: the DVC default remote if on S3, else ~/.dvcray/store)", show_default=False)] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Submit, print the run id and return.")] = False,
    apply: Annotated[bool, typer.Option("--apply", help="Apply the experiment to your workspace when it succeeds (dvc exp apply).")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout; messages go to stderr.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Rerun every stage; replace an experiment of the same name.")] = False,
    downstream: Annotated[bool, typer.Option("--downstream", help="Run the given targets and every stage after them.")] = False,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Commit message of the experiment.")] = None,
    pull: Annotated[bool, typer.Option("--pull", help="Pull missing data and run-cache from the store on the cluster.")] = False,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Skip stages whose only change is missing data.")] = False,
    copy_paths: Annotated[Optional[list[str]], typer.Option("--copy-paths", "-C", help="Also send this ignored or untracked path (repeatable).")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", help="With a sweep: at most this many experiments at once (default: all).", show_default=False)] = None,
    cpus_per_exp: Annotated[Optional[float], typer.Option("--cpus-per-exp", min=0, help="CPUs reserved for each experiment's runner and its stage's own processes (Ray tasks the stage starts ask for their own); Ray places the runner on any node with room (needs an S3 store).", show_default=False)] = None,
    gpus_per_exp: Annotated[Optional[float], typer.Option("--gpus-per-exp", min=0, help="GPUs reserved for each experiment's runner.", show_default=False)] = None,
    retries: Annotated[Optional[int], typer.Option("--retries", min=0, help="Run an experiment again, on another machine, when it is lost with its machine (died, spot instance reclaimed); finished stages are restored, not rerun. 0: never. [default: the project's retries in \\[tool.dvcray] of pyproject.toml, else 3]", show_default=False)] = None,
    env: EnvOption = None,
    cwd: Annotated[Path, typer.Option("--cwd", hidden=True)] = Path("."),
) -> None:
    """Run the pipeline as a DVC experiment on a Ray cluster.

    The experiment sees your workspace exactly as dvc exp run would (uncommitted
    changes included), its log streams here, and when it ends it is in your repo:
    dvc exp show lists it, dvcray pull NAME brings its outputs. The stage runs with
    the node's own environment, your PYTHONPATH entries inside the project (as
    folders of the run's own copy) and the variables you name with --env.

    Example:

        dvcray run --exp-name lr-01 -S train.lr=0.1 --env OMP_NUM_THREADS=2
    """
    from dvcray_cli import params
    from dvcray_cli.runs import submit, sweep
    from dvcray_cli.runs import run as running
    from dvcray_cli.runs.model import RunOptions

    opts = RunOptions(
        targets=targets or [], exp_name=exp_name, overrides=set_param or [], address=address,
        store=store, force=force, downstream=downstream, message=message, pull=pull,
        allow_missing=allow_missing, copy_paths=copy_paths or [], cpus_per_exp=cpus_per_exp,
        gpus_per_exp=gpus_per_exp, env=env or [], retries=retries,
    )
    where = cwd.resolve()
    check_jobs(jobs)
    if params.is_sweep(opts.overrides):
        _check_sweep_flags(detach, apply)
        follow_many(lambda say_, on_line, on_change, on_progress:
                    sweep.run_sweep(opts, where, say_, jobs, on_line, on_change, on_progress), json_)
        return
    sub = submit.submit(opts, where, say=say)
    err.print(Text.assemble("Submitted run ", (sub.run_id, "bold"), f" to {sub.address}."))
    if detach:
        _detached(sub, json_)
        return
    with interruptible():
        outcome = running.follow(sub, log_stream(json_), _progress_printer(json_), apply, force, say)
    _report(outcome, opts.overrides, json_)


def _check_sweep_flags(detach: bool, apply: bool) -> None:
    if detach:
        raise UsageError("--detach is not supported with a sweep yet: follow it, or run one value at a time.")
    if apply:
        raise UsageError("--apply takes one experiment: run the sweep, then dvc exp apply the one you want.")


def _detached(sub, json_: bool) -> None:
    if json_:
        write_json({"run_id": sub.run_id, "state": "PENDING", "address": sub.address, "store": sub.store.url})
    say(f"Follow it with: dvcray logs {sub.run_id} --follow")


def _progress_printer(json_: bool):
    def progress(run_id: str, latest) -> None:
        (err if json_ else out).print(Text(f"live: {latest.text()}", style="dim"))

    return progress


def _report(outcome, overrides: list[str], json_: bool) -> None:
    """The outcome (as JSON, or a summary), then the error its exit code comes from."""
    from dvcray_cli.runs import finish

    if json_:
        write_json(outcome.to_json())
    else:
        _summary(outcome, overrides)
    finish.raise_for(outcome)


def _summary(outcome, overrides: list[str]) -> None:
    """Metrics, and the params this run set with -S (dvc exp show has them all)."""
    from rich.table import Table

    from dvcray_cli import params as params_mod

    if outcome.status != "SUCCEEDED" or not outcome.home:
        return
    set_keys = params_mod.keys(overrides)
    params = {file: {k: v for k, v in values.items() if k in set_keys} for file, values in outcome.params.items()}
    table = Table(title=Text(f"Experiment {outcome.exp_name}"), show_header=True, header_style="bold")
    table.add_column("kind")
    table.add_column("file")
    table.add_column("name")
    table.add_column("value", justify="right")
    for kind, data in (("metric", outcome.metrics), ("param", params)):
        for file, values in data.items():
            for key, value in values.items():
                table.add_row(kind, Text(file), Text(key), Text(f"{value:.6g}" if isinstance(value, float) else str(value)))
    out.print(table)
    lost = [a for a in outcome.attempts if a.get("state") == "LOST"]
    if lost:
        say(f"It took {len(outcome.attempts)} attempts: " + "; ".join(
            f"attempt {a.get('number')} on {a.get('node') or 'its machine'} was lost ({a.get('lost')})" for a in lost)
            + ". Finished stages were restored, not rerun.")
    say(f"The experiment is in your repo as {outcome.exp_name}. Next:")
    say("  dvc exp show")
    if not outcome.applied:
        say(f"  dvcray pull {outcome.exp_name} && dvc exp apply {outcome.exp_name}")
