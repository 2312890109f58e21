"""``dvcray run``."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from dvcray_cli.cli._common import boundary, err, out, plain_output, write_json
from dvcray_cli.errors import ExperimentFailed, Interrupted, StoreError, UsageError


def register(app: typer.Typer) -> None:
    app.command()(run)


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


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
    cpus_per_exp: Annotated[Optional[float], typer.Option("--cpus-per-exp", help="CPUs reserved for each experiment's runner and its stage's own processes (Ray tasks the stage starts ask for their own); Ray places the runner on any node with room (needs an S3 store).", show_default=False)] = None,
    gpus_per_exp: Annotated[Optional[float], typer.Option("--gpus-per-exp", help="GPUs reserved for each experiment's runner.", show_default=False)] = None,
    cwd: Annotated[Path, typer.Option("--cwd", hidden=True)] = Path("."),
) -> None:
    """Run the pipeline as a DVC experiment on a Ray cluster.

    The experiment sees your workspace exactly as dvc exp run would (uncommitted
    changes included), its log streams here, and when it ends it is in your repo:
    dvc exp show lists it, dvcray pull NAME brings its outputs.

    Example:

        dvcray run --exp-name lr-01 -S train.lr=0.1
    """
    from dvcray_cli import params
    from dvcray_cli.runs import follow, live, submit, warm
    from dvcray_cli.runs.model import RunOptions

    opts = RunOptions(
        targets=targets or [], exp_name=exp_name, overrides=set_param or [], address=address,
        store=store, force=force, downstream=downstream, message=message, pull=pull,
        allow_missing=allow_missing, copy_paths=copy_paths or [], cpus_per_exp=cpus_per_exp,
        gpus_per_exp=gpus_per_exp,
    )
    where = cwd.resolve()
    if jobs is not None and jobs < 1:
        raise UsageError("--jobs must be at least 1.", "Example: --jobs 2 runs at most two experiments at once.")
    if params.is_sweep(opts.overrides):
        if detach:
            raise UsageError("--detach is not supported with a sweep yet: follow it, or run one value at a time.")
        _sweep(opts, where, jobs, json_, apply)
        return
    sub = submit.submit(opts, where, say=lambda m: err.print(m, markup=False))
    err.print(Text.assemble("Submitted run ", (sub.run_id, "bold"), f" to {sub.address}."))
    if detach:
        if json_:
            write_json({"run_id": sub.run_id, "state": "PENDING", "address": sub.address, "store": sub.store.url})
        err.print(f"Follow it with: dvcray logs {sub.run_id} --follow", markup=False)
        return

    stream = sys.stderr if json_ else sys.stdout

    def emit(text: str) -> None:
        stream.write(text)
        stream.flush()

    def progress(run_id: str, latest) -> None:
        (err if json_ else out).print(Text(f"live: {latest.text()}", style="dim"))

    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        with live.relayed(sub.store, sub.project, [sub.run_id], progress):
            if sub.service is not None:
                status = warm.follow(sub.service, sub.address, sub.run_id, emit)
            else:
                status = follow.follow(sub.client, sub.run_id, emit)
        outcome = follow.finish(sub, status, apply=apply, force=force)
        if sub.client is not None:
            follow.prune_jobs(sub.client, sub.store)
    except (KeyboardInterrupt, Interrupted):
        raise
    except Exception:
        # Whatever went wrong here, the run is the cluster's: say how to find it and bring it home.
        err.print(f"Run {sub.run_id} is not lost: dvcray logs {sub.run_id} --follow shows it; once it has "
                  f"ended, dvcray pull {sub.run_id} brings it home.", markup=False)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if json_:
        write_json(outcome.to_json())
    else:
        _summary(outcome, opts.overrides)
    follow.raise_for(outcome)


def _summary(outcome, overrides: list[str]) -> None:
    """Metrics, and the params this run set with -S (dvc exp show has them all)."""
    from rich.table import Table

    if outcome.status != "SUCCEEDED" or not outcome.home:
        return
    set_keys = {o.split("=", 1)[0].rsplit(":", 1)[-1].lstrip("+~") for o in overrides}
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
    err.print(f"The experiment is in your repo as {outcome.exp_name}. Next:", markup=False)
    err.print("  dvc exp show", markup=False)
    if not outcome.applied:
        err.print(f"  dvcray pull {outcome.exp_name} && dvc exp apply {outcome.exp_name}", markup=False)


def _sweep(opts, where: Path, jobs: int | None, json_: bool, apply: bool) -> None:
    """Run a sweep: a live table in a terminal, plain prefixed lines elsewhere."""
    from dvcray_cli.runs import sweep

    if apply:
        raise UsageError("--apply takes one experiment: run the sweep, then dvc exp apply the one you want.")
    follow_many(lambda say, on_line, on_change, on_progress:
                sweep.run_sweep(opts, where, say, jobs, on_line, on_change, on_progress), json_)


def follow_many(start, json_: bool) -> None:
    """Follow several experiments to their end and report them (sweeps, DVC's queue).

    ``start(say, on_line, on_change, on_progress)`` runs them and returns a SweepResult.
    In a terminal a live table (state, elapsed, latest step or line); elsewhere plain
    lines prefixed with the experiment's name, one per state change and per live step.
    """
    plain = plain_output() or json_
    stream = sys.stderr if json_ else sys.stdout
    live = None

    def on_line(name: str, text: str) -> None:
        if plain:
            stream.write(f"[{name}] {text}\n")
            stream.flush()

    def on_progress(name: str, text: str) -> None:
        if plain:
            stream.write(f"[{name}] live: {text}\n")
            stream.flush()

    def on_change(states) -> None:
        if live is not None:
            live.update(_live_table(states))
        elif plain:
            for st in states:
                key = (st.name, st.state)
                if key not in seen:
                    seen.add(key)
                    err.print(f"[{st.name}] {st.state.value}", markup=False)

    seen: set = set()
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        if plain:
            result = start(lambda m: err.print(m, markup=False), on_line, on_change, on_progress)
        else:
            from rich.live import Live

            with Live(_live_table([]), console=err, refresh_per_second=4, transient=False) as live:
                result = start(lambda m: live.console.print(m, markup=False), on_line, on_change, on_progress)
                if result is None:
                    live.update(Text(""))  # nothing ran: no empty table left behind
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result is None:
        return
    if json_:
        write_json([o.to_json() for o in result.outcomes])
    else:
        _sweep_summary(result)
    if result.failed:
        names = ", ".join(o.exp_name or o.run_id for o in result.failed)
        raise ExperimentFailed(f"{len(result.failed)} of {len(result.outcomes)} experiments failed: {names}.",
                               "Read one's log with: dvcray logs NAME")
    away = [o for o in result.outcomes if not o.home]
    if away:
        for o in away:
            err.print(f"{o.error} {o.hint or ''}", markup=False)
        raise UsageError(f"{len(away)} experiment(s) did not come home: their names are taken here "
                         f"({', '.join(o.exp_name or o.run_id for o in away)}).",
                         "Each one stays in the store; the lines above say how to keep both or replace yours.")
    short = [o for o in result.outcomes if o.store_error]
    if short:
        for o in short:
            err.print(f"{o.exp_name or o.run_id}: {o.store_error}", markup=False)
        raise StoreError(f"{len(short)} experiment(s) did not save everything to the store.",
                         "The lines above say what is missing and where it stays.")


# Beyond this many experiments the live table shows counts, the running ones and the
# last to end, not a row each: it stays readable at hundreds.
TABLE_ROWS = 12


def _live_table(states):
    import time
    from collections import Counter

    from rich.console import Group
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    for column in ("experiment", "state", "elapsed", "latest"):
        table.add_column(column, overflow="ellipsis", no_wrap=True)
    now = time.time()
    shown = list(states)
    counts = None
    if len(states) > TABLE_ROWS:
        counts = Counter(st.state.value for st in states)
        going = sorted((st for st in states if st.state.value == "RUNNING"),
                       key=lambda st: st.started or now)
        ended = sorted((st for st in states if st.outcome is not None), key=lambda st: st.ended or now)
        shown = going[:TABLE_ROWS - 3] + ended[-3:]
    for st in shown:
        elapsed = f"{(st.ended or now) - st.started:.0f}s" if st.started else ""
        latest = st.progress or st.last_line
        if st.outcome and st.outcome.metrics:
            first = next(iter(st.outcome.metrics.values()), {})
            latest = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(first.items())[:3])
        table.add_row(Text(st.name), st.state.value, elapsed, Text(latest[:60]))
    if counts is None:
        return table
    order = ("SUCCEEDED", "FAILED", "STOPPED", "LOST", "RUNNING", "PENDING", "WAITING")
    line = f"{len(states)} experiments: " + ", ".join(f"{counts[k]} {k.lower()}" for k in order if counts.get(k))
    return Group(Text(line), table)


def _sweep_summary(result) -> None:
    from rich.table import Table

    from dvcray_cli.runs import sweep

    columns, rows = sweep.table_rows(result.outcomes)
    table = Table(show_header=True, header_style="bold")
    for column in columns:
        table.add_column(Text(column))
    for row in rows:
        table.add_row(*(Text("" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)) for v in row))
    out.print(table)
    if not result.failed and all(o.home and not o.store_error for o in result.outcomes):
        err.print("Every experiment is in your repo. Next: dvc exp show", markup=False)
