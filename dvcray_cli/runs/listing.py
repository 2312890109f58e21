"""``dvcray runs``: this repo's runs, newest first, each in the state its sources agree on.

A run's state comes from three places: the runner's own word in the store
(``result.json``, ``status.json``), what its cluster says now (``backends.RunInfo``),
and what this clone last recorded. ``reconcile`` decides between them, and nothing
else: it reads nothing and writes nothing, so its whole decision table is tested
without a cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dvcray_cli import clusters
from dvcray_cli.runs import backends
from dvcray_cli.runs.backends import RunInfo
from dvcray_cli.runs.lookup import Run, context, record_run, store_runs
from dvcray_cli.runs.model import ATTEMPTS, Attempt, RunRecord, RunResult, RunState, RunStatus
from dvcray_cli.service.protocol import attempts_of

STALE = "no sign of life in the store for a while, and no cluster here knows it"
NO_RESULT = "the runner ended without saving a result"


@dataclass
class RunSummary:
    """One run as ``dvcray runs`` shows it."""

    run_id: str
    exp_name: str | None
    state: RunState
    submitted: float | None = None  # Unix time
    started: float | None = None
    ended: float | None = None
    baseline: str | None = None
    address: str | None = None      # the cluster it was submitted to (None: found only in the store)
    store: str = ""
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    source: str = "record"          # "record": submitted from this clone; "store": found in the store
    env: list[str] = field(default_factory=list)  # the names of the variables it carried (never values)
    node: str = ""                  # the machine it ran on (its last attempt's)
    attempts: list[Attempt] = field(default_factory=list)  # its tries, once it was retried or lost

    @property
    def duration(self) -> float | None:
        if self.started is None:
            return None
        end = self.ended if self.ended is not None else (time.time() if self.state.is_active() else None)
        return None if end is None else max(0.0, end - self.started)

    def key_metric(self) -> tuple[str, Any] | None:
        """The first metric the run reported, as ``(name, value)``."""
        for values in self.metrics.values():
            for name, value in (values or {}).items():
                return name, value
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "exp_name": self.exp_name, "state": self.state.value,
            "submitted": _iso(self.submitted), "started": _iso(self.started), "ended": _iso(self.ended),
            "duration_s": None if self.duration is None else round(self.duration, 3),
            "baseline": self.baseline, "address": self.address, "store": self.store,
            "metrics": self.metrics, "error": self.error, "source": self.source, "env": self.env, "node": self.node,
            "attempts": [{**a.to_json(), "started": _iso(a.started), "ended": _iso(a.ended)} for a in self.attempts],
        }


def reconcile(record: RunRecord | None, result: RunResult | None, status: RunStatus | None,
              info: RunInfo | None, now: float | None = None) -> tuple[RunState, str | None]:
    """A run's state, and what went wrong, from what each source says.

    Args:
        record: this clone's record (None: the run is known only from the store).
        result: the runner's final word in the store, if any.
        status: the runner's heartbeat in the store, if any.
        info: what its cluster says now (None: no cluster answers, or none knows it).
        now: the time to judge a heartbeat's age by.

    Returns:
        ``(state, error)``, first match wins: the runner's final result; a run its cluster
        says is going; one whose node died (LOST); one that ended without a result; what
        this clone saw it end as; LOST, for a run submitted from here that no cluster knows
        any more; LOST, for a run of another clone whose heartbeat is stale; else what the
        store last said. The result's error (or its outputs' failure to reach the store)
        comes with it.
    """
    error = None
    if result is not None and result.is_final():
        # The runner's own word; a job that a sweep's experiments share runs on
        # after this one has ended.
        state = result.status
    elif info is not None and info.state.is_active():
        state = info.state
    elif info is not None and info.state == RunState.LOST:
        state, error = RunState.LOST, info.lost  # its machine went away
    elif info is not None:  # ended without a result: the runner was killed before it could save
        state, error = info.state, NO_RESULT
    elif record is not None and record.state.has_outcome():
        state = record.state  # `dvcray run` saw it end (the cluster said so) before the cluster went
    elif record is not None:
        # Submitted from here and the cluster is gone or forgot it; no final result.
        state = RunState.LOST
    elif status is not None and status.is_stale(now):
        # Found only in the store, and its runner has not been heard of for long.
        state, error = RunState.LOST, STALE
    else:
        # Found only in the store, from a clone that may use a cluster this one
        # cannot see: what the store last said.
        state = status.state if status else RunState.PENDING
    if result is not None:
        error = result.error or error
        if result.push_error and not error:
            error = f"its outputs did not reach the store ({result.push_error})"
    return state, error


def summarize(run: Run, seen: backends.Clusters, fallbacks: list[str], git_root: Path) -> RunSummary:
    """Run ``run`` as ``dvcray runs`` shows it, its state reconciled; a run that has ended is
    recorded so (its record is then never looked up again)."""
    record = run.record
    summary = RunSummary(run_id=run.run_id, exp_name=run.exp_name(),
                         state=record.state if record else RunState.PENDING, submitted=run.submitted(),
                         baseline=run.baseline(), address=run.address, store=run.store.url,
                         source="record" if record else "store", env=run.env_names())
    if record and record.state.has_outcome() and record.ended:
        # Final and already looked up once: nothing can change any more.
        summary.started, summary.ended = record.started, record.ended
        summary.metrics, summary.error = record.metrics, record.error
        summary.attempts = list(record.attempts)
        summary.node = summary.attempts[-1].node if summary.attempts else ""
        return summary

    info = None
    for kind, address in backends.candidates(record, run.address, fallbacks):
        info = seen.info(kind, address, run.run_id, run.job_id)
        if info is not None:
            summary.address = address
            break
    result, status = run.result, run.status
    summary.state, summary.error = reconcile(record, result, status, info)
    times: Any = result or status
    summary.started = (times.started if times else None) or (info.started if info else None)
    summary.ended = (times.ended if times else None) or (info.ended if info else None)
    if result:
        summary.metrics = result.metrics
        summary.exp_name = result.exp_name or summary.exp_name
    summary.attempts = attempts_seen(run, result, info)
    summary.node = (summary.attempts[-1].node if summary.attempts else "") or (result.node if result else "") \
        or (status.node if status else "") or (info.node if info else "")
    if run.problems:
        summary.error = "; ".join(run.problems.values())
    if record and summary.state.has_outcome():
        RunRecord.update(git_root, run.run_id, state=summary.state, exp_name=summary.exp_name,
                         started=summary.started, ended=summary.ended or time.time(),
                         metrics=summary.metrics, error=summary.error, attempts=summary.attempts or None)
    return summary


def attempts_seen(run: Run, result: RunResult | None, info: RunInfo | None) -> list[Attempt]:
    """A run's tries, from the source that knows the most: its cluster while it goes, the
    runner's result, the runner service's record in the store (``attempts.json``)."""
    found = [list(info.attempts) if info else [], list(result.attempts) if result else []]
    if not any(len(a) > 1 for a in found) and not (result and result.is_final()):
        found.append(attempts_of((run.read(ATTEMPTS) or {}).get("attempts")))
    best = max(found, key=len)
    return best if len(best) > 1 or any(a.state == RunState.LOST for a in best) else []


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def list_runs(cwd: Path, store: str | None = None, limit: int | None = None) -> list[RunSummary]:
    """This repo's runs, newest first, with their states refreshed.

    The runs this clone submitted (its records), and the runs in the store
    whose baseline commit this repo has (submitted from another clone). States
    come from the cluster when it answers, else from the store; a run whose
    cluster is gone and whose store has no final result is LOST.

    Args:
        cwd: a folder inside the project.
        store: look in this store only (default: the stores of the records and
            the default store).
        limit: at most this many runs (newest).

    Raises:
        UsageError: not in a git repository.
        StoreError: a store could not be read.
    """
    ctx = context(cwd, store)
    runs = [record_run(ctx, record) for record in RunRecord.all(ctx.git_root)
            if not store or str(record.store.get("url", "")).rstrip("/") == ctx.stores[0].url.rstrip("/")]
    runs += store_runs(ctx, {r.run_id for r in runs}, want=limit)
    runs.sort(key=lambda r: (r.submitted() or 0, r.run_id), reverse=True)
    if limit:
        runs = runs[:limit]
    seen = backends.Clusters()
    fallbacks = clusters.fallback_addresses() if any(r.record is None for r in runs) else []
    return [summarize(r, seen, fallbacks, ctx.git_root) for r in runs]
