"""``dvcray logs``: a run's log, from its cluster while it answers, else from the store.

The cluster's copy is what the run's backend keeps (``runs.backends``: a Ray Job's log,
or the runner service's); the store's is what the runner uploads as it goes
(``logtee``), so a run's log outlives its cluster.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dvcray_cli import clusters, files
from dvcray_cli.errors import ClusterError, Interrupted
from dvcray_cli.runs import backends
from dvcray_cli.runs.backends import LogGone
from dvcray_cli.runs.logtee import StoreLog
from dvcray_cli.runs.lookup import Run, context, locate
from dvcray_cli.runs.model import RESULT, STATUS, RunResult, RunState, RunStatus


@dataclass
class LogsResult:
    run_id: str
    state: RunState       # the run's state when the command ended
    source: str           # "cluster" or "store"
    empty: bool = False   # there was no log to show yet
    reason: str | None = None  # why it is LOST, when its runner saved that (its cluster died)


def logs(cwd: Path, key: str, emit: Callable[[str], None], follow: bool = False,
         store: str | None = None, note: Callable[[str], None] = lambda m: None) -> LogsResult:
    """Write run ``key``'s log to ``emit``: from the cluster while it answers,
    else the copy the runner keeps in the store.

    With ``follow``, keep writing until the run ends (Ctrl-C stops following,
    not the run).

    Raises:
        UsageError: no such run.
        ClusterError: following a run whose cluster stopped answering and whose
            store copy shows no sign of life.
        StoreError: the store could not be read.
    """
    ctx = context(cwd, store)
    run = locate(ctx, key)
    shown = False
    user_emit = emit

    def emit(text: str) -> None:
        nonlocal shown
        if text:
            shown = True
            user_emit(text)

    seen = backends.Clusters()
    fallbacks = [] if run.address else clusters.fallback_addresses()
    where = [(kind, address) for kind, address in backends.candidates(run.record, run.address, fallbacks)
             if kind.keeps_log(run.run_id, run.job_id)]
    for kind, address in where:
        backend = seen.backend(kind, address)
        if backend is None:
            continue
        try:
            said = backend.show_log(run.run_id, emit, follow)
        except LogGone as exc:
            note(f"{exc.message}: showing the copy of the log in the store.")
            final, reason = _store_log(run, emit, follow)
            if exc.lost and final == RunState.PENDING:
                final = RunState.LOST
            return LogsResult(run.run_id, final, "store", empty=not shown, reason=reason)
        if said is None:
            continue  # that cluster does not know the run (restarted, or another cluster)
        result = _final_result(run) if said.is_terminal() else None
        final = result.status if result else said
        return LogsResult(run.run_id, final, "cluster", empty=not shown,
                          reason=result.error if result and final == RunState.LOST else None)
    if run.address and where:
        why = seen.errors.get(run.address) or f"The cluster at {run.address} does not know run {run.run_id}"
        note(f"{why.rstrip('.')}: showing the copy of the log in the store.")
    final, reason = _store_log(run, emit, follow)
    return LogsResult(run.run_id, final, "store", empty=not shown, reason=reason)


def _final_result(run: Run, wait_s: float = 5.0) -> RunResult | None:
    """The run's result once its cluster says it ended: its runner (or, for a run lost with its
    machine, the runner service) writes it then; None when none comes within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        result = RunResult.from_json(run.store.read_json(run.store.run_path(run.run_id, RESULT)))
        if result is not None or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def _store_log(run: Run, emit: Callable[[str], None], follow: bool) -> tuple[RunState, str | None]:
    """The store's copy of the log; with ``follow``, poll it until the run's result appears.
    Returns the run's state, and why it is lost when its runner saved that.

    A followed run whose log has not grown for ``DVCRAY_STALE_S`` and whose heartbeat
    is stale (its cluster does not answer) is lost: that ends the wait with exit 3.
    """
    log = StoreLog(run.store, run.run_id)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    shown = 0
    last_change = time.monotonic()
    stale_s = files.env_seconds("DVCRAY_STALE_S", 60)

    def show() -> bool:
        nonlocal shown
        data = log.read()
        if len(data) > shown:
            emit(decoder.decode(data[shown:]))
            shown = len(data)
            return True
        return False

    try:
        while True:
            result = RunResult.from_json(run.store.read_json(run.store.run_path(run.run_id, RESULT)))
            if show():
                last_change = time.monotonic()
            if result is not None:
                show()  # the runner's last lines are in the store before its result
                emit(decoder.decode(b"", final=True))
                return result.status, (result.error if result.status == RunState.LOST else None)
            if not follow:
                status = run.status
                return (RunState.LOST if run.record else (status.state if status else RunState.PENDING)), None
            status = RunStatus.from_json(run.store.read_json(run.store.run_path(run.run_id, STATUS)))
            quiet = time.monotonic() - last_change > stale_s
            if quiet and (status is None or status.is_stale() or status.state.has_outcome()):
                raise ClusterError(
                    f"Run {run.run_id}: its cluster does not answer, and neither its log nor its heartbeat in "
                    f"the store has changed for {stale_s:.0f}s; the run is probably lost.",
                    f"Check the cluster (dvcray cluster status); what the run saved: dvcray logs {run.run_id}")
            time.sleep(1.0)
    except KeyboardInterrupt:
        raise Interrupted.following(run.run_id, stopped=False) from None
