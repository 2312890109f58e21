"""Following runs on the terminal, for ``dvcray run`` and ``dvcray queue start``: one
run's log as it comes, many experiments as a live table, and the summary at the end."""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Any, Callable, Iterator

from rich.text import Text

from dvcray_cli.cli._common import err, out, plain_output, write_json
from dvcray_cli.errors import ExperimentFailed, StoreError, UsageError

# Beyond this many experiments the live table shows counts, the running ones and the
# last to end, not a row each: it stays readable at hundreds.
TABLE_ROWS = 12


def say(message: str) -> None:
    """A message for the person, as text (never Rich markup: it may quote a store)."""
    err.print(message, markup=False)


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM (a CI runner cancelling the job) stops the runs as Ctrl-C does."""
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def log_stream(json_: bool) -> Callable[[str], None]:
    """Where a run's log goes: stdout, or stderr when stdout carries ``--json``."""
    stream = sys.stderr if json_ else sys.stdout

    def emit(text: str) -> None:
        stream.write(text)
        stream.flush()

    return emit


def follow_many(start: Callable[..., Any], json_: bool) -> None:
    """Follow several experiments to their end and report them (sweeps, DVC's queue).

    ``start(say, on_line, on_change, on_progress)`` runs them and returns a SweepResult
    (None when nothing ran). In a terminal a live table (state, elapsed, latest step or
    line); elsewhere plain lines prefixed with the experiment's name, one per state
    change and per live step.

    Raises:
        ExperimentFailed, UsageError, StoreError: what the exit code comes from when not
            every experiment succeeded and came home whole.
    """
    plain = plain_output() or json_
    stream = sys.stderr if json_ else sys.stdout
    live = None
    seen: set = set()

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
            live.update(live_table(states))
        elif plain:
            for st in states:
                key = (st.name, st.state)
                if key not in seen:
                    seen.add(key)
                    say(f"[{st.name}] {st.state.value}")

    with interruptible():
        if plain:
            result = start(say, on_line, on_change, on_progress)
        else:
            from rich.live import Live

            with Live(live_table([]), console=err, refresh_per_second=4, transient=False) as live:
                result = start(lambda m: live.console.print(m, markup=False), on_line, on_change, on_progress)
                if result is None:
                    live.update(Text(""))  # nothing ran: no empty table left behind
    if result is None:
        return
    if json_:
        write_json([o.to_json() for o in result.outcomes])
    else:
        _summary(result)
    _raise_for(result)


def _raise_for(result) -> None:
    """The error the exit code of a sweep comes from: the first kind of trouble it had."""
    if result.failed:
        names = ", ".join(o.exp_name or o.run_id for o in result.failed)
        raise ExperimentFailed(f"{len(result.failed)} of {len(result.outcomes)} experiments failed: {names}.",
                               "Read one's log with: dvcray logs NAME")
    away = [o for o in result.outcomes if not o.home and not o.store_error]
    if away:
        for o in away:
            say(f"{o.error} {o.hint or ''}")
        raise UsageError(f"{len(away)} experiment(s) did not come home: their names are taken here "
                         f"({', '.join(o.exp_name or o.run_id for o in away)}).",
                         "Each one stays in the store; the lines above say how to keep both or replace yours.")
    short = [o for o in result.outcomes if o.store_error]
    if short:
        for o in short:
            say(f"{o.exp_name or o.run_id}: {o.store_error}")
        raise StoreError(f"{len(short)} experiment(s) did not save everything to the store.",
                         "The lines above say what is missing and where it stays.")


def live_table(states):
    """The live table of experiments (``sweep.ExpState``): a row each, or beyond
    ``TABLE_ROWS`` the counts per state, the running ones and the last to end."""
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


def _summary(result) -> None:
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
        say("Every experiment is in your repo. Next: dvc exp show")
