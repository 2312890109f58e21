"""Several experiments at once (a ``-S a=1,2`` sweep), followed by one client.

Where runners are placed by resources (``--cpus-per-exp``/``--gpus-per-exp``),
each experiment is a Ray Job of its own, at most ``--jobs`` submitted at once.
Otherwise all of them share one job on the head: each job costs a supervisor
process and a fresh interpreter, which on a small head is what limits a sweep
(DESIGN.md); the runner forks one process per experiment after importing DVC.

Each experiment comes back into the repo as soon as its result is in the store.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dvcray_cli import ray_api
from dvcray_cli.errors import Interrupted, UsageError
from dvcray_cli.runs import follow, live, warm
from dvcray_cli.runs.model import RESULT, STATUS, ExpSpec, Outcome, RunOptions, RunResult, RunState, RunStatus
from dvcray_cli.runs.submit import Plan, Submitted, launch, prepare

POLL_S = 0.3


@dataclass
class ExpState:
    """What the client knows of one experiment while the sweep runs."""

    spec: ExpSpec
    job_id: str | None = None
    state: RunState = RunState.WAITING  # not submitted yet; then PENDING, RUNNING, and how it ended
    started: float | None = None
    ended: float | None = None
    last_line: str = ""
    progress: str = ""  # the latest DVCLive step and metrics
    outcome: Outcome | None = None

    @property
    def name(self) -> str:
        return self.spec.exp_name or self.spec.run_id


@dataclass
class SweepResult:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != "SUCCEEDED"]


class Sweep:
    """Submit a plan's experiments and follow them to the end from one process."""

    def __init__(self, plan: Plan, jobs: int | None, on_line: Callable[[str, str], None],
                 on_change: Callable[[list[ExpState]], None],
                 on_progress: Callable[[str, str], None] | None = None,
                 say: Callable[[str], None] = lambda m: None) -> None:
        self.plan = plan
        self.say = say
        self.on_progress = on_progress
        self.drained: set[str] = set()
        self.limit = max(1, jobs) if jobs else len(plan.experiments)
        self.on_line, self.on_change = on_line, on_change
        self.states = [ExpState(spec) for spec in plan.experiments]
        self.placed = plan.placement is not None and plan.placement.placed
        if self.placed and plan.placement.limit:
            # Runners that held every CPU would wait forever for their stages' tasks (placement.py).
            self.limit = min(self.limit, plan.placement.limit)
        self.jobs: dict[str, list[ExpState]] = {}

    # ------------------------------------------------------------------ submit

    def _submit_next(self) -> None:
        if not self.placed or self.plan.service is not None:
            if not self.jobs:
                job_id = self.states[0].spec.run_id.rsplit("-", 1)[0]
                launch(self.plan, job_id, [s.spec for s in self.states], jobs=self.limit, placed=self.placed)
                self._started(job_id, self.states)
            return
        active = sum(1 for s in self.states if s.state.is_active())
        for state in self.states:
            if active >= self.limit:
                break
            if state.state == RunState.WAITING:
                launch(self.plan, state.spec.run_id, [state.spec], placed=True)
                self._started(state.spec.run_id, [state])
                active += 1

    def _started(self, job_id: str, states: list[ExpState]) -> None:
        self.jobs[job_id] = states
        for state in states:
            state.job_id, state.state, state.started = job_id, RunState.PENDING, time.time()
        self.on_change(self.states)

    # ------------------------------------------------------------------ logs

    def _emit(self, job_id: str, text: str) -> None:
        states = self.jobs[job_id]
        for line in text.splitlines():
            if len(states) == 1:
                name, body = states[0].name, line
            elif line.startswith("[") and "] " in line:
                name, body = line[1:].split("] ", 1)
            else:
                continue  # Ray's own lines about the shared job
            for state in states:
                if state.name == name:
                    state.last_line = body.strip()[:120]
            self.on_line(name, body)

    # ------------------------------------------------------------------ results

    def _collect(self, state: ExpState, job_status: str, lost: str = "") -> bool:
        """Bring an experiment home once its result is in the store; ``lost``: the runner
        service's word that its node died."""
        store = self.plan.store
        result = RunResult.from_json(store.read_json(store.run_path(state.spec.run_id, RESULT)))
        if result is None:
            if ray_api.is_terminal(job_status):
                died = None
                if job_status == "FAILED":  # the service's word, or Ray's for a Ray Job
                    died = lost or (ray_api.node_died(self.plan.client, state.job_id) if self.plan.client else None)
                state.state = RunState.LOST if job_status == "SUCCEEDED" or died else RunState(job_status)
                state.outcome = Outcome(run_id=state.spec.run_id, status=state.state.value,
                                        exp_name=state.spec.exp_name,
                                        error=died or "the runner ended without a result", store=store.url)
                state.ended = time.time()
                return True
            status = RunStatus.from_json(store.read_json(store.run_path(state.spec.run_id, STATUS)))
            if status is not None and status.state == RunState.RUNNING and state.state == RunState.PENDING:
                state.state = RunState.RUNNING
                self.on_change(self.states)
            return False
        sub = Submitted(state.spec.run_id, self.plan.address, store, state.spec.exp_name,
                        state.spec.baseline or self.plan.project.baseline, client=self.plan.client,
                        project=self.plan.project)
        # An experiment queued with -f replaces one of its name, as dvcray run -f does.
        force = self.plan.opts.force or bool(state.spec.options.get("force"))
        state.outcome = follow.finish(sub, result.status.value, force=force)
        state.state = RunState.parse(state.outcome.status, RunState.FAILED)
        state.ended = time.time()
        return True

    async def _watch(self) -> None:
        watch = follow.StatusWatch(self.plan.client, "The runs may still be going: dvcray runs")
        logs: dict[str, follow.JobLog] = {}
        tails: dict[str, asyncio.Task] = {}
        ended: set[str] = set()
        store_read: dict[str, float] = {}
        try:
            while True:
                for job_id in self.jobs:
                    if job_id not in logs:
                        logs[job_id] = follow.JobLog(self.plan.client, job_id,
                                                     lambda text, j=job_id: self._emit(j, text))
                        tails[job_id] = asyncio.create_task(logs[job_id].tail_forever())
                statuses = await watch.statuses([j for j in self.jobs if j not in ended])
                if statuses is None:
                    continue
                changed = False
                for job_id, status in statuses.items():
                    if ray_api.is_terminal(status):
                        ended.add(job_id)
                        tails[job_id].cancel()
                        await logs[job_id].drain()
                    shared = len(self.jobs[job_id]) > 1
                    # A job of its own ends right after its result is written: read the
                    # store then. A shared job's experiments end one by one: read it
                    # at most once a second (each read is a request to the store).
                    look = ray_api.is_terminal(status) or (shared and time.time() - store_read.get(job_id, 0) >= 1.0)
                    for state in self.jobs[job_id]:
                        if state.outcome is None:
                            if status == "RUNNING" and state.state == RunState.PENDING and not shared:
                                state.state = RunState.RUNNING
                                changed = True
                            if look and await asyncio.to_thread(self._collect, state, status):
                                changed = True
                    if look:
                        store_read[job_id] = time.time()
                if changed:
                    self.on_change(self.states)
                    await asyncio.to_thread(self._submit_next)
                # Done when every experiment is home and every job has ended.
                if all(s.outcome is not None for s in self.states) and ended >= set(self.jobs):
                    return
                await asyncio.sleep(POLL_S)
        finally:
            for task in tails.values():
                task.cancel()

    def _follow_service(self) -> None:
        """Follow the experiments the runner service runs with one long poll for all:
        their state changes, and the new lines of those that go. The store is read
        only for an experiment the service says has ended (its result)."""
        by_id = {s.spec.run_id: s for s in self.states}
        watch = warm.Watch(self.plan.service, self.plan.address, list(by_id))
        partial: dict[str, str] = {}
        draining: set[str] = set()  # ended, and their last lines maybe not read yet
        while True:
            open_ = [s for s in self.states if s.outcome is None]
            if not open_ and not draining:
                return
            logs = [s.spec.run_id for s in open_ if s.state == RunState.RUNNING] + sorted(draining)
            changed, text, unknown = watch.poll([s.spec.run_id for s in open_], logs,
                                                wait=0 if draining else warm.POLL_WAIT_S)
            for run_id, chunk in text.items():
                lines = (partial.pop(run_id, "") + chunk).split("\n")
                partial[run_id] = lines.pop()
                state = by_id[run_id]
                for line in lines:
                    state.last_line = line.strip()[:120]
                    self.on_line(state.name, line)
            draining &= set(text)
            moved = False
            for run_id, info in changed.items():
                state = by_id.get(run_id)
                new = RunState.parse(info.get("state"), RunState.PENDING)
                if state is None or state.outcome is not None:
                    continue
                if new == RunState.RUNNING and state.state == RunState.PENDING:
                    state.state, state.started, moved = RunState.RUNNING, info.get("started") or time.time(), True
                elif new.is_terminal():
                    draining.add(run_id)
                    self._collect(state, new.value, str(info.get("lost") or ""))
                    moved = True
            for run_id in unknown:  # the service forgot it (it was restarted): the store says how it ended
                state = by_id.get(run_id)
                if state is not None and state.outcome is None:
                    self._collect(state, RunState.SUCCEEDED.value)
                    moved = True
            if moved:
                self.on_change(self.states)

    # ------------------------------------------------------------------ live metrics

    def _live(self) -> list[str]:
        """The runs whose live updates to read now: those going, and once more those
        that just ended (their runner wrote its last updates before its result)."""
        ids = []
        for state in self.states:
            if state.state.is_active():
                ids.append(state.spec.run_id)
            elif state.outcome is not None and state.spec.run_id not in self.drained:
                self.drained.add(state.spec.run_id)
                ids.append(state.spec.run_id)
        return ids

    def _progress(self, run_id: str, progress: live.Progress) -> None:
        for state in self.states:
            if state.spec.run_id == run_id:
                state.progress = progress.text()
                if self.on_progress is not None:
                    self.on_progress(state.name, state.progress)
        self.on_change(self.states)

    def run(self) -> SweepResult:
        relay = live.Relay(self.plan.store, self.plan.project, self._live, self._progress)
        try:
            self._submit_next()
            if self.plan.service is not None:
                self._follow_service()
            else:
                asyncio.run(self._watch())
        except KeyboardInterrupt:
            if self.plan.service is not None:
                warm.stop(self.plan.service, [s.spec.run_id for s in self.states if s.outcome is None])
            else:
                follow.stop_jobs(self.plan.client, list(self.jobs))
            raise Interrupted("Interrupted: every experiment of the sweep was stopped.",
                              "Their logs and what they produced are in the store: dvcray runs") from None
        except Exception:
            # The client failed, not the experiments: they go on. Say exactly how to bring them home.
            left = [s for s in self.states if s.outcome is None and s.state != RunState.WAITING]
            never = [s for s in self.states if s.state == RunState.WAITING]
            if left:
                names = ", ".join(s.name for s in left)
                self.say(f"dvcray stopped following the sweep, but {len(left)} experiment(s) go on on the cluster: "
                         f"{names}. See them with: dvcray runs. Bring each home once it has ended: "
                         f"dvcray pull NAME (or its run id).")
            if never:
                self.say(f"{len(never)} experiment(s) were not submitted: {', '.join(s.name for s in never)}.")
            raise
        finally:
            relay.close([s.spec.run_id for s in self.states if s.job_id])
        if self.plan.client is not None:
            follow.prune_jobs(self.plan.client, self.plan.store)
        return SweepResult([s.outcome for s in self.states if s.outcome is not None])


def run_sweep(opts: RunOptions, cwd: Path, say: Callable[[str], None], jobs: int | None,
              on_line: Callable[[str, str], None],
              on_change: Callable[[list[ExpState]], None],
              on_progress: Callable[[str, str], None] | None = None) -> SweepResult:
    """Preflight, then run every experiment of ``opts`` and bring each home as it ends.
    ``on_line(name, line)``: a line of an experiment's log; ``on_change(states)``: a state
    changed; ``on_progress(name, text)``: an experiment's latest DVCLive step."""
    if jobs is not None and jobs < 1:
        raise UsageError("--jobs must be at least 1.")
    with tempfile.TemporaryDirectory(prefix="dvcray-snapshot-") as tmp:
        plan = prepare(opts, cwd, say, Path(tmp), jobs)
        say(f"Running {len(plan.experiments)} experiment(s) on {plan.address}"
            + (f", at most {jobs} at once." if jobs else "."))
        return Sweep(plan, jobs, on_line, on_change, on_progress, say).run()


def table_rows(outcomes: list[Outcome]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the final table: experiment, status, params set, metrics."""
    param_keys: list[str] = []
    metric_keys: list[str] = []
    for o in outcomes:
        for file, values in o.params.items():
            for key in values:
                if f"{key}" not in param_keys:
                    param_keys.append(key)
        for file, values in o.metrics.items():
            for key in values:
                if key not in metric_keys:
                    metric_keys.append(key)

    def value(data: dict[str, dict[str, Any]], key: str) -> Any:
        for values in data.values():
            if key in values:
                return values[key]
        return None

    columns = ["experiment", "status", *metric_keys, *param_keys]
    rows = [[o.exp_name or o.run_id, o.status, *(value(o.metrics, k) for k in metric_keys),
             *(value(o.params, k) for k in param_keys)] for o in outcomes]
    return columns, rows
