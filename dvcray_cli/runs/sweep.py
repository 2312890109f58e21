"""Several experiments at once (a ``-S a=1,2`` sweep), followed by one client.

Whether the experiments go in one submission or one each (at most ``--jobs`` at once)
is the backend's to say: Ray Jobs share one job on the head unless runners are placed
by resources (``--cpus-per-exp``/``--gpus-per-exp``), as each job costs a supervisor
process and a fresh interpreter, which on a small head is what limits a sweep
(DESIGN.md); the runner service takes them all at once and paces them itself. The
backend follows them (``Backend.follow_many``) and hands each back here as it ends.

Each experiment comes back into the repo as soon as its result is in the store.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dvcray_cli.errors import Interrupted, UsageError
from dvcray_cli.runs import live
from dvcray_cli.runs.backends import RunInfo
from dvcray_cli.runs.finish import finish
from dvcray_cli.runs.model import RESULT, STATUS, ExpSpec, Outcome, RunId, RunOptions, RunResult, RunState, RunStatus
from dvcray_cli.runs.submit import Prepared, Submitted, launch, prepare


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


class _AllSubmitted(BaseException):
    """Every experiment is submitted, and the sweep returns then (``detach``)."""


@dataclass
class SweepResult:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != "SUCCEEDED"]


class Sweep:
    """Submit a prepared run's experiments and follow them to the end from one process
    (``backends.Followed``: the backend drives the following)."""

    def __init__(self, prepared: Prepared, jobs: int | None, on_line: Callable[[str, str], None],
                 on_change: Callable[[list[ExpState]], None],
                 on_progress: Callable[[str, str], None] | None = None,
                 say: Callable[[str], None] = lambda m: None) -> None:
        self.prepared = prepared
        self.backend = prepared.backend
        self.say = say
        self.on_progress = on_progress
        self.drained: set[str] = set()
        self.limit = max(1, jobs) if jobs else len(prepared.experiments)
        self.on_line, self.on_change = on_line, on_change
        self.states = [ExpState(spec) for spec in prepared.experiments]
        self.placed = prepared.placement is not None and prepared.placement.placed
        if self.placed and prepared.placement.limit:
            # Runners that held every CPU would wait forever for their stages' tasks (placement.py).
            self.limit = min(self.limit, prepared.placement.limit)
        self.jobs: dict[str, list[ExpState]] = {}
        # Around each submission and each outcome (DVC's queue journals them: ``queue_journal``).
        self.before_launch: Callable[[list[ExpSpec]], None] = lambda specs: None
        self.after_launch: Callable[[list[ExpSpec]], None] = lambda specs: None
        self.on_outcome: Callable[[ExpState], None] = lambda state: None
        self.detach = False  # return once every experiment is submitted

    # ------------------------------------------------------------------ submit

    def submit_next(self) -> None:
        """Submit what waits, while there is room (all at once, when they go in one submission)."""
        if self.backend.one_submission(self.placed):
            if not self.jobs:
                job_id = str(RunId.parse(self.states[0].spec.run_id).submission)
                specs = [s.spec for s in self.states]
                self.before_launch(specs)
                launch(self.prepared, job_id, specs, jobs=self.limit, placed=self.placed)
                self.after_launch(specs)
                self._started(job_id, self.states)
            return
        active = sum(1 for s in self.states if s.state.is_active())
        for state in self.states:
            if active >= self.limit:
                break
            if state.state == RunState.WAITING:
                self.before_launch([state.spec])
                launch(self.prepared, state.spec.run_id, [state.spec], placed=True)
                self.after_launch([state.spec])
                self._started(state.spec.run_id, [state])
                active += 1

    def _started(self, job_id: str, states: list[ExpState]) -> None:
        self.jobs[job_id] = states
        for state in states:
            state.job_id, state.state, state.started = job_id, RunState.PENDING, time.time()
        self.on_change(self.states)

    # ------------------------------------------------------------------ what the backend says

    def line(self, name: str, text: str) -> None:
        """A line of experiment ``name``'s own log."""
        for state in self.states:
            if state.name == name:
                state.last_line = text.strip()[:120]
        self.on_line(name, text)

    def running(self, state: ExpState, started: float | None = None) -> None:
        state.state = RunState.RUNNING
        if started is not None:
            state.started = started

    def changed(self) -> None:
        self.on_change(self.states)
        self.submit_next()
        if self.detach and all(s.state != RunState.WAITING for s in self.states):
            raise _AllSubmitted()

    def collect(self, state: ExpState, info: RunInfo) -> bool:
        """Bring an experiment home once its result is in the store; without one, record how
        it ended once ``info`` (what its cluster says) says it has. True when it changed."""
        store = self.prepared.store
        result = RunResult.from_json(store.read_json(store.run_path(state.spec.run_id, RESULT)))
        if result is None:
            if info.state.is_terminal():
                # Ended without a result: LOST when its node died, or when it "succeeded" without one.
                lost = info.state in (RunState.SUCCEEDED, RunState.LOST)
                state.state = RunState.LOST if lost else info.state
                state.outcome = Outcome(run_id=state.spec.run_id, status=state.state.value,
                                        exp_name=state.spec.exp_name,
                                        error=info.lost or "the runner ended without a result", store=store.url,
                                        attempts=[a.to_json() for a in info.attempts])
                state.ended = time.time()
                self.on_outcome(state)
                return True
            status = RunStatus.from_json(store.read_json(store.run_path(state.spec.run_id, STATUS)))
            if status is not None and status.state == RunState.RUNNING and state.state == RunState.PENDING:
                state.state = RunState.RUNNING
                self.on_change(self.states)
            return False
        sub = Submitted(state.spec.run_id, self.prepared.address, store, state.spec.exp_name,
                        state.spec.baseline or self.prepared.project.baseline, backend=self.backend,
                        project=self.prepared.project, job_id=state.job_id or "")
        # An experiment queued with -f replaces one of its name, as dvcray run -f does.
        force = self.prepared.opts.force or bool(state.spec.options.get("force"))
        state.outcome = finish(sub, result.status, force=force)
        state.state = RunState.parse(state.outcome.status, RunState.FAILED)
        state.ended = time.time()
        self.on_outcome(state)
        return True

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

    def _expect(self, run_id: str) -> tuple[str, str | None]:
        """The baseline and name of the experiment ``run_id``: its live updates must carry them."""
        spec = next(s.spec for s in self.states if s.spec.run_id == run_id)
        return spec.baseline or self.prepared.project.baseline, spec.exp_name

    def _progress(self, run_id: str, progress: live.Progress) -> None:
        for state in self.states:
            if state.spec.run_id == run_id:
                state.progress = progress.text()
                if self.on_progress is not None:
                    self.on_progress(state.name, state.progress)
        self.on_change(self.states)

    def run(self) -> SweepResult:
        relay = live.Relay(self.prepared.store, self.prepared.project, self._live, self._progress, self._expect)
        try:
            self.submit_next()
            if self.detach and all(s.state != RunState.WAITING for s in self.states):
                raise _AllSubmitted()
            self.backend.follow_many(self)
        except _AllSubmitted:
            return SweepResult([])
        except KeyboardInterrupt:
            self.backend.stop({s.spec.run_id: s.job_id for s in self.states if s.outcome is None and s.job_id})
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
        self.backend.tidy(self.prepared.store)
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
        prepared = prepare(opts, cwd, say, Path(tmp), jobs)
        say(f"Running {len(prepared.experiments)} experiment(s) on {prepared.address}"
            + (f", at most {jobs} at once." if jobs else "."))
        return Sweep(prepared, jobs, on_line, on_change, on_progress, say).run()


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
