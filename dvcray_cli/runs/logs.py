"""``dvcray logs``: a run's log, from its cluster while it answers, else from the store.

The cluster's copy is the Ray Job's log (a run of its own) or the runner service's
(``warm``); the store's is what the runner uploads as it goes (``logtee``), so a
run's log outlives its cluster.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dvcray_cli import clusters, ray_api, state
from dvcray_cli.errors import ClusterError, Interrupted
from dvcray_cli.runs import follow as following
from dvcray_cli.runs import warm
from dvcray_cli.runs.history import _Clusters, _context, _locate, _Run
from dvcray_cli.runs.logtee import StoreLog
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
    ctx = _context(cwd, store)
    run = _locate(ctx, key)
    shown = False
    user_emit = emit

    def emit(text: str) -> None:
        nonlocal shown
        if text:
            shown = True
            user_emit(text)

    seen = _Clusters()
    if run.record and run.record.service:
        service, runs = seen.service(run.address)
        if service is not None and run.run_id in (runs or {}):
            said = warm.show_log(service, run.address, run.run_id, emit, follow)
            lost = str(((runs or {}).get(run.run_id) or {}).get("lost") or "")
            if shown or not lost:
                result = run.result if ray_api.is_terminal(said) else None
                return LogsResult(run.run_id, result.status if result else RunState.parse(said, RunState.PENDING),
                                  "cluster", empty=not shown)
            # Its log was on the node that died: the store keeps the copy the runner uploaded.
            note(f"Run {run.run_id} is lost ({lost}): showing the copy of the log in the store.")
            final, reason = _store_log(run, emit, follow)
            return LogsResult(run.run_id, final if final != RunState.PENDING else RunState.LOST, "store",
                              empty=not shown, reason=reason)
    # A sweep's experiments share one job whose log holds them all: the store
    # keeps each one's own log.
    candidates = ([run.address] if run.address else clusters.fallback_addresses()) \
        if run.job_id == run.run_id and not (run.record and run.record.service) else []
    for address in candidates:
        client = seen.client(address)
        if client is None:
            continue
        try:
            job_state = ray_api.status_text(client.get_job_info(run.run_id).status)
        except Exception:  # the cluster does not know this run (restarted, or another cluster)
            continue
        if follow and not ray_api.is_terminal(job_state):
            job_state = following.follow(client, run.run_id, emit, stop_on_interrupt=False)
        else:
            try:
                text = client.get_job_logs(run.run_id)
            except Exception:  # noqa: BLE001 - the log lived on a node that is gone
                note(f"The cluster at {address} could not give run {run.run_id}'s log (the node that held it "
                     "is gone): showing the copy of the log in the store.")
                break
            emit(text)
        result = run.result if ray_api.is_terminal(job_state) else None
        final = result.status if result else RunState.parse(job_state, RunState.PENDING)
        return LogsResult(run.run_id, final, "cluster", empty=not shown)
    else:
        if run.address and (candidates or (run.record and run.record.service)):
            why = seen.errors.get(run.address) or f"The cluster at {run.address} does not know run {run.run_id}"
            note(f"{why.rstrip('.')}: showing the copy of the log in the store.")
    final, reason = _store_log(run, emit, follow)
    return LogsResult(run.run_id, final, "store", empty=not shown, reason=reason)


def _store_log(run: _Run, emit: Callable[[str], None], follow: bool) -> tuple[RunState, str | None]:
    """The store's copy of the log; with ``follow``, poll it until the run's result appears.
    Returns the run's state, and why it is lost when its runner saved that.

    A followed run whose log has not grown for ``DVCRAY_STALE_S`` and whose heartbeat
    is stale (its cluster does not answer) is lost: that ends the wait with exit 3.
    """
    log = StoreLog(run.store, run.run_id)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    shown = 0
    last_change = time.monotonic()
    stale_s = state.env_seconds("DVCRAY_STALE_S", 60)

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
            if quiet and (status is None or status.is_stale() or status.state.is_terminal()):
                raise ClusterError(
                    f"Run {run.run_id}: its cluster does not answer, and neither its log nor its heartbeat in "
                    f"the store has changed for {stale_s:.0f}s; the run is probably lost.",
                    f"Check the cluster (dvcray cluster status); what the run saved: dvcray logs {run.run_id}")
            time.sleep(1.0)
    except KeyboardInterrupt:
        raise Interrupted.following(run.run_id, stopped=False) from None
