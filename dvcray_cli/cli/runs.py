"""``dvcray runs``, ``dvcray logs``, ``dvcray stop``, ``dvcray pull``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from dvcray_cli.cli._common import boundary, err, out, write_json
from dvcray_cli.errors import ClusterError, ExperimentFailed

STORE_HELP = ("Look for runs in this store (s3://bucket/prefix or a folder) "
              "[default: the stores of this repo's runs, and the default store]")
STATE_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow", "LOST": "bold red",
               "RUNNING": "cyan", "PENDING": "cyan"}


def register(app: typer.Typer) -> None:
    app.command("runs")(runs)
    app.command("logs")(logs)
    app.command("stop")(stop)
    app.command("pull")(pull)


Store = Annotated[Optional[str], typer.Option("--store", help=STORE_HELP, show_default=False)]
Cwd = Annotated[Path, typer.Option("--cwd", hidden=True)]


@boundary
def runs(
    json_: Annotated[bool, typer.Option("--json", help="Print the runs as a JSON list on stdout.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Show at most this many runs (0: all).")] = 20,
    store: Store = None,
    cwd: Cwd = Path("."),
) -> None:
    """List this repo's recent runs and their states, newest first.

    States come from the cluster while it answers, else from the store; a run
    whose cluster is gone and whose store has no final result is LOST. Runs
    submitted from another clone of the repo show too when they use the same store.

    Example:

        dvcray runs
        dvcray runs --json
    """
    from rich.console import Console

    from dvcray_cli.runs import listing

    found = listing.list_runs(cwd.resolve(), store=store, limit=limit or None)
    if json_:
        write_json([r.to_json() for r in found])
        return
    if not found:
        err.print("No runs yet. Start one with: dvcray run", markup=False)
        return
    # Piped output has no terminal width to respect: don't squeeze it into 80 columns.
    console = out if out.is_terminal else Console(width=240, highlight=False)
    console.print(_table(found))


def _table(found):
    from rich.table import Table

    # A run id is what people copy into the next command: never wrap or cut it.
    # The rest fits 80 columns beside it.
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("run", no_wrap=True)
    table.add_column("experiment", overflow="fold", min_width=10)
    table.add_column("state", no_wrap=True)
    table.add_column("started", no_wrap=True)
    table.add_column("took", justify="right", no_wrap=True)
    table.add_column("machine", overflow="fold", min_width=7)
    table.add_column("metric", overflow="fold", min_width=8)
    for r in found:
        metric = r.key_metric()
        table.add_row(
            Text(r.run_id), Text(r.exp_name or "-"), Text(r.state.value, style=STATE_STYLE.get(r.state.value, "")),
            time.strftime("%m-%d %H:%M", time.localtime(r.started or r.submitted or 0)),
            _duration(r.duration), Text(_machines(r)),
            Text("-" if metric is None else f"{metric[0]}={_value(metric[1])}"),
        )
    return table


def _machines(summary) -> str:
    """Where it ran: ``n2``, or each attempt's machine (``n1 lost, n2``) when it was retried or lost."""
    if not summary.attempts:
        return summary.node or "-"
    return ", ".join(f"{a.node or '?'}{' lost' if a.state.value == 'LOST' else ''}" for a in summary.attempts)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


@boundary
def logs(
    run: Annotated[str, typer.Argument(help="Run id or experiment name (see dvcray runs).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the run ends.")] = False,
    store: Store = None,
    cwd: Cwd = Path("."),
) -> None:
    """Print a run's log: from its cluster while it answers, else from the store.

    With --follow, stream it until the run ends; the exit code is then the
    run's (0 succeeded, 1 failed or stopped, 3 lost). Ctrl-C stops following, not the run.

    Example:

        dvcray logs dvcray-20250101-120000-a1b2c3
        dvcray logs lr-01 --follow
    """
    from dvcray_cli.runs import logs as runlogs
    from dvcray_cli.runs.model import RunState

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = runlogs.logs(cwd.resolve(), run, emit, follow=follow, store=store,
                          note=lambda m: err.print(m, markup=False))
    if result.empty:
        err.print(f"Run {result.run_id} has no log yet ({result.state.value}).", markup=False)
    if result.state == RunState.LOST:
        why = (f"{result.reason}; what it had is in the store" if result.reason
               else "its cluster is gone and it saved no result")
        if follow:
            raise ClusterError(f"Run {result.run_id} is LOST: {why}.", "dvcray runs shows its attempts.")
        err.print(f"Run {result.run_id} is LOST: {why}.", markup=False)
    if follow and result.state == RunState.STOPPED:
        raise ExperimentFailed(f"Run {result.run_id} was stopped.", "dvcray runs shows it.")
    if follow and result.state == RunState.FAILED:
        raise ExperimentFailed(f"Run {result.run_id} failed.", "The log above says why.")


@boundary
def stop(
    run: Annotated[str, typer.Argument(help="Run id or experiment name (see dvcray runs).")],
    store: Store = None,
    cwd: Cwd = Path("."),
) -> None:
    """Stop a run: its runner saves what it has (outputs, log, result) and ends.

    Waits until the run has ended. A run that has already ended is left as it is.

    Example:

        dvcray stop dvcray-20250101-120000-a1b2c3
    """
    from dvcray_cli.runs import stop as stopping

    result = stopping.stop(cwd.resolve(), run, store=store, say=lambda m: err.print(m, markup=False))
    if result.already_finished:
        err.print(f"Run {result.run_id} has already ended: {result.state.value}.", markup=False)
        return
    err.print(f"Run {result.run_id} ended {result.state.value} after {result.waited_s:.1f}s.", markup=False)
    if result.saved:
        err.print(f"Its log and what it produced are in the store {result.store}: "
                  f"dvcray logs {result.run_id}", markup=False)
    else:
        err.print(f"It ended without saving a result; what reached the store: dvcray logs {result.run_id}",
                  markup=False)


@boundary
def pull(
    run_or_exp: Annotated[str, typer.Argument(metavar="RUN_OR_EXP_NAME", help="Experiment name or run id.")],
    store: Store = None,
    as_name: Annotated[Optional[str], typer.Option("--as", metavar="NAME", help="Bring it home under this name (when its own is taken here).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an experiment of the same name here.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print what was pulled as JSON on stdout.")] = False,
    cwd: Cwd = Path("."),
) -> None:
    """Bring an experiment into this repo from the store: its git ref and its outputs.

    Needs nothing from the cluster, and leaves your DVC config and workspace as
    they are: afterwards dvc exp apply NAME restores the outputs. Works in any
    clone of the repo that reaches the store. An experiment of the same name
    here is never replaced: --as NAME keeps both, -f replaces yours.

    Example:

        dvcray pull lr-01
        dvc exp apply lr-01
    """
    from dvcray_cli.runs import pull as pulling

    result = pulling.pull(cwd.resolve(), run_or_exp, store=store, as_name=as_name, force=force)
    if json_:
        write_json(result.to_json())
    err.print(f"Experiment {result.exp_name} (run {result.run_id}) is in your repo; "
              f"{result.fetched} file(s) fetched into the DVC cache from {result.store}. Next:", markup=False)
    err.print("  dvc exp show", markup=False)
    err.print(f"  dvc exp apply {result.exp_name}", markup=False)
