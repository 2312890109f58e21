"""``dvcray pull``: bring an experiment home from the store, in any clone of the repo.

Nothing comes from the cluster: the experiment's ref from its bundle in the store
(only ``refs/exps/<baseline>/<name>`` of the run's own baseline), its outputs into
the local DVC cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvcray_cli.errors import ExperimentFailed, StoreError, UsageError
from dvcray_cli.runs import backends, queue_journal
from dvcray_cli.runs.lookup import context, in_repo, locate
from dvcray_cli.runs.model import RESULT, ExpRef, RunRecord, RunState, valid_exp_name
from dvcray_cli.runs.project import find_project, import_experiment, pull_outputs


def _made(run) -> tuple[str, str] | None:
    """What the cluster this clone submitted ``run`` to says it saved (``Backend.made``), over
    its authenticated channel; None for a run known only from the store, or a cluster that
    cannot say (gone, or it forgot the run): then the commit need only descend from the
    run's baseline."""
    if run.record is None or not run.address:
        return None
    backend, _, _ = backends.locate(run.record, run.address, run.run_id, run.job_id)
    return backend.made(run.run_id, run.job_id) if backend is not None else None


@dataclass
class PullResult:
    run_id: str
    exp_name: str
    ref: str
    exp_sha: str
    fetched: int  # files brought into the local DVC cache
    store: str
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def pull(cwd: Path, key: str, store: str | None = None, as_name: str | None = None,
         force: bool = False) -> PullResult:
    """Bring experiment ``key`` (a run id or an experiment name) into this repo
    from the store: its git ref and its outputs (into the local DVC cache).

    Nothing comes from the cluster, and the user's DVC config is not changed
    (the store is an in-memory remote). Afterwards ``dvc exp apply NAME``
    restores the outputs in the workspace. The store is data: only the ref
    ``refs/exps/<baseline>/<name>`` of the run's own baseline is fetched from
    its bundle, and an experiment of that name here is never replaced unless
    ``force``; ``as_name`` brings it home under another name.

    Raises:
        UsageError: no such run, the run has not ended, its baseline commit is
            not in this repo, ``as_name`` is not a valid name, or the name is
            taken (``NameTaken``).
        ExperimentFailed: the run ended without an experiment.
        StoreError: the run's records or bundle are not what a run saves.
    """
    project = find_project(cwd)
    if as_name is not None and not valid_exp_name(as_name):
        raise UsageError(f"'{as_name}' is not a valid experiment name.",
                         "Use letters, digits, '-', '_' and '.'; no spaces or slashes.")
    ctx = context(cwd, store)
    run = locate(ctx, key, prefer_success=True)
    result = run.result
    if result is None:
        if RESULT in run.problems:
            raise StoreError(f"Run {run.run_id}: {run.problems[RESULT]}.", f"Its log: dvcray logs {run.run_id}")
        raise UsageError(f"Run {run.run_id} has not ended yet: there is nothing to pull.",
                         f"Wait for it: dvcray logs {run.run_id} --follow")
    if result.status != RunState.SUCCEEDED or not result.ref:
        raise ExperimentFailed(
            f"Run {run.run_id} ended {result.status.value} and saved no experiment"
            + (f": {result.error}" if result.error else "."),
            f"Its log: dvcray logs {run.run_id}")
    baseline = (run.record.baseline if run.record else "") or result.baseline or run.baseline() or ""
    ref = ExpRef.parse(result.ref)
    if ref is None or ref.baseline != baseline:
        raise StoreError(f"Run {run.run_id}'s result in the store names {result.ref!r}, which is not an experiment "
                         f"of its baseline {baseline[:7] or '(unknown)'}: nothing was fetched.",
                         "The store holds records dvcray did not write; ask who writes to it.")
    if baseline not in in_repo(ctx.git_root, [baseline]):
        raise UsageError(f"Run {run.run_id} ran on commit {baseline[:7]}, which this repo does not have.",
                         "Fetch it first (git fetch / git pull), then rerun dvcray pull.")
    made = _made(run)
    if made is not None and made[0] != str(ref):
        raise StoreError(f"Run {run.run_id}'s result in the store names {ref}, but its cluster says the run saved "
                         f"{made[0]}: nothing was fetched.",
                         "The store holds records dvcray did not write; ask who writes to it.")
    target, exp_sha = import_experiment(ctx.git_root, run.store, run.run_id, ref, as_name=as_name, force=force,
                                        made=made[1] if made else None)
    fetched = pull_outputs(project, run.store, exp_sha)
    queue_journal.pulled(project, run.run_id)  # taken from DVC's queue (queue start --detach): it leaves it now
    if run.record:
        RunRecord.update(ctx.git_root, run.run_id, state=RunState.SUCCEEDED, exp_name=target.name)
    return PullResult(run.run_id, target.name, str(target), exp_sha, fetched, run.store.url,
                      result.params, result.metrics)
