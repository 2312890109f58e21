"""``dvcray stop``: stop a run, and wait until it has saved its work and ended.

Its runner gets SIGTERM and the stop grace (``DVCRAY_STOP_GRACE_S``) to push what it
has, its log and ``result.json``; then it is killed. The run's backend (``runs.backends``)
does the stopping: a Ray Job's through Ray, the runner service's through the service.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dvcray_cli import clusters, ray_api
from dvcray_cli.errors import ClusterError
from dvcray_cli.runs import backends
from dvcray_cli.runs.finish import fetch_result
from dvcray_cli.runs.lookup import context, locate
from dvcray_cli.runs.model import RunRecord, RunState


@dataclass
class StopResult:
    run_id: str
    exp_name: str | None
    state: RunState
    already_finished: bool
    waited_s: float = 0.0
    saved: bool = False  # the runner wrote its result.json (log, outputs and record are in the store)
    store: str = ""


def stop(cwd: Path, key: str, store: str | None = None, timeout: float | None = None,
         say: Callable[[str], None] = lambda m: None) -> StopResult:
    """Stop run ``key`` and wait until it has ended (at most ``timeout`` seconds; default:
    the stop grace and 15 s).

    Raises:
        UsageError: no such run.
        ClusterError: the run's cluster does not answer, does not know the run,
            or the run did not end in time.
    """
    ctx = context(cwd, store)
    run = locate(ctx, key)
    name = run.exp_name()
    result = run.result
    if result and result.is_final():
        return StopResult(run.run_id, name, result.status, True, saved=True, store=run.store.url)

    fallbacks = [] if run.address else clusters.fallback_addresses()
    backend, info, problems = backends.locate(run.record, run.address, run.run_id, run.job_id, fallbacks)
    if backend is None:
        if not problems:
            raise ClusterError(f"Run {run.run_id} was not submitted from this clone and no cluster is configured "
                               "here.", f"Point dvcray at its cluster: RAY_ADDRESS=http://HOST:8265 dvcray stop "
                               f"{run.run_id}")
        raise ClusterError(f"Cannot stop run {run.run_id}: {'; '.join(p.rstrip('.') for p in problems)}.",
                           f"If its cluster is gone, so is the run; what it saved: dvcray logs {run.run_id}")

    state = info.state
    started = time.monotonic()
    already = state.is_terminal()
    if not already:
        say(f"Stopping run {run.run_id}; its runner saves what it has before it ends...")
        found = backend.stop({run.run_id: run.job_id},
                             timeout if timeout is not None else ray_api.stop_grace_s() + 15, say)
        state = found.get(run.run_id, RunState.PENDING)
        if not state.is_terminal():
            raise ClusterError(f"Run {run.run_id} did not end within {time.monotonic() - started:.0f}s of being "
                               "stopped.", f"Check it: dvcray runs; dvcray logs {run.run_id}")
    waited = time.monotonic() - started
    final = fetch_result(run.store, run.run_id, wait_s=0 if already else 5)
    if final:
        state = final.status
        name = final.exp_name or name
    if run.record:
        RunRecord.update(ctx.git_root, run.run_id, state=state)
    return StopResult(run.run_id, name, state, already, waited, saved=final is not None, store=run.store.url)
