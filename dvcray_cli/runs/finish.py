"""A run that has ended, home: the experiment's ref (checked to be an experiment ref of
the run's own baseline), what ``dvc exp show`` reads of it, and with ``--apply`` its
outputs; or the error its exit code comes from.
"""

from __future__ import annotations

import time

from dvcray_cli.errors import ClusterError, ExperimentFailed, Interrupted, StoreError, UsageError
from dvcray_cli.runs.model import RESULT, ExpRef, Outcome, RunRecord, RunResult, RunState
from dvcray_cli.runs.project import NameTaken, fetch_shown_files, import_experiment, open_repo, pull_outputs
from dvcray_cli.runs.submit import Submitted
from dvcray_cli.store import Store


def fetch_result(store: Store, run_id: str, wait_s: float = 10) -> RunResult | None:
    """The runner's result.json (it is written before the job ends); None when there
    is none after ``wait_s``.

    Raises:
        StoreError: there is a file, but it is no result (names the file).
    """
    deadline = time.time() + wait_s
    while True:
        data, problem = store.read_record(store.run_path(run_id, RESULT))
        result = RunResult.from_json(data)
        if result is not None:
            return result
        if time.time() > deadline:
            if problem or data is not None:
                raise StoreError(f"Run {run_id}: {problem or f'{RESULT} in the store {store.url} is not a result'}.",
                                 f"Its log: dvcray logs {run_id}")
            return None
        time.sleep(0.5)


def finish(sub: Submitted, state: RunState, apply: bool = False, force: bool = False) -> Outcome:
    """Bring a finished run home: the experiment ref, what ``dvc exp show`` reads of
    it, and with ``apply`` its outputs too.

    The ref must be an experiment ref of the run's own baseline; an experiment of
    the same name here is never replaced unless ``force`` (then the outcome says
    so, and how to keep both).

    Args:
        sub: the run.
        state: how it ended, as its cluster says.
        apply: also fetch its outputs and ``dvc exp apply`` it.
        force: replace an experiment of the same name (``dvcray run -f``).
    """
    project = sub.project
    result = fetch_result(sub.store, sub.run_id, wait_s=10 if state == RunState.SUCCEEDED else 3)
    outcome = Outcome(run_id=sub.run_id, status=state.value, exp_name=sub.exp_name, store=sub.store.url)
    if result is not None:
        outcome = Outcome(
            run_id=sub.run_id, status=result.status.value, exp_name=result.exp_name, ref=result.ref,
            exp_sha=result.exp_sha, params=result.params, metrics=result.metrics, error=result.error,
            store=sub.store.url, timings=result.timings)
        if result.push_error:
            where = f"; the run's workspace stays on its node at {result.workspace}" if result.workspace else ""
            outcome.store_error = (f"its outputs did not reach the store {sub.store.url} "
                                   f"({result.push_error}){where}")
        elif result.save_errors:
            outcome.store_error = "; ".join(f"{k}: {v}" for k, v in result.save_errors.items())
    died, attempts = None, list(result.attempts) if result is not None else []
    if result is None and state in (RunState.FAILED, RunState.LOST) and sub.backend is not None:
        died, attempts = lost_because(sub)
    if died:
        # Not the experiment's failure: the machine it ran on went away. Its log stays in the store.
        outcome.status, outcome.error = RunState.LOST.value, died
    outcome.attempts = [a.to_json() for a in attempts]
    if outcome.status == RunState.LOST.value and sub.backend is not None and not sub.backend.retries_lost:
        outcome.hint = ("It went as a Ray Job of its own (DVCRAY_SERVICE=0, or a cluster without dvcray's runner "
                        "service), and those are not retried.")
    RunRecord.update(project.git_root, sub.run_id, state=outcome.status, exp_name=outcome.exp_name,
                     attempts=attempts or None)
    if state != RunState.SUCCEEDED or outcome.status != RunState.SUCCEEDED:
        if result is None and not died:
            outcome.error = "the runner ended without a result (see the log above)"
        return outcome
    ref = ExpRef.parse(result.ref)
    if ref is None or ref.baseline != sub.baseline:
        outcome.status = RunState.FAILED.value
        outcome.error = "the runner reported success but saved no experiment of this baseline"
        return outcome
    try:
        target, sha = import_experiment(project.git_root, sub.store, sub.run_id, ref, force=force)
    except NameTaken as exc:
        outcome.home = False
        outcome.error, outcome.hint = exc.message, exc.hint
        return outcome
    outcome.ref, outcome.exp_sha = str(target), sha
    if result.shown_files and not result.push_error:
        try:
            fetch_shown_files(project, sub.store, sha, result.shown_files)
        except StoreError as exc:
            outcome.store_error = exc.message
    if apply and not outcome.store_error:
        pull_outputs(project, sub.store, sha)
        repo = open_repo(project, sub.store)
        try:
            repo.experiments.apply(target.name)
        finally:
            repo.close()
        outcome.applied = True
    return outcome


def lost_because(sub: Submitted) -> tuple[str | None, list]:
    """Why the run's cluster counts it lost (its node died: the runner service says so of its
    runs, Ray of a Ray Job), or None; and its attempts as the cluster knows them."""
    try:
        info = sub.backend.info(sub.run_id, sub.run_id)
    except ClusterError:
        return None, []
    if info is None or info.state != RunState.LOST:
        return None, []
    return info.lost or "its machine was lost", list(info.attempts)


def raise_for(outcome: Outcome) -> None:
    """Raise the error an outcome's exit code comes from (none when it succeeded and is home)."""
    if outcome.status == "SUCCEEDED":
        if not outcome.home:
            raise UsageError(outcome.error or "The experiment could not come home.", outcome.hint)
        if outcome.store_error:
            raise StoreError(f"Experiment {outcome.exp_name} is in your repo, but {outcome.store_error}.",
                             f"Its log: dvcray logs {outcome.run_id}")
        return
    if outcome.status == "STOPPED":
        raise Interrupted(f"Run {outcome.run_id} was stopped.",
                          f"Its log: dvcray logs {outcome.run_id}")
    if outcome.status == RunState.LOST.value:
        raise ClusterError(f"Run {outcome.run_id} is LOST: {outcome.error or 'its cluster lost it'}.",
                           f"{outcome.hint + ' ' if outcome.hint else ''}Its log so far stays in the store: "
                           f"dvcray logs {outcome.run_id}; run it again.")
    raise ExperimentFailed(f"The experiment failed: {outcome.error or 'see the log above'}",
                           f"Its log stays in the store: dvcray logs {outcome.run_id}")
