"""``dvcray queue start``: the experiments waiting in DVC's own queue, run on a Ray cluster.

DVC runs its queue (``dvc exp run --queue``, VS Code's DVC extension, DVC Studio)
only on the machine it sits on. Here each queued experiment is taken from DVC's queue
as DVC's own worker takes one (``queue_journal``: journaled until its outcome is
recorded, so nothing taken is ever lost) and runs on the cluster with exactly the
workspace it was queued with: the changes of its stash commit against its baseline
(the uncommitted edits and ``-S`` values of that moment), with its queued name,
``dvc exp run`` options and ``--copy-paths`` (copied from the workspace now, as DVC
copies them when it runs one). Never the stash commit itself, and never
``.dvc/tmp/repro.dat``: DVC pickles the run's variables there, a Studio token
included (DESIGN.md). The experiments then run and come home as a sweep's do
(``runs/sweep.py``). One that does not succeed is recorded as DVC's queue records a
failed experiment: ``dvc queue status`` lists it as Failed, and the workspace it was
queued with is kept (``refs/exps/celery/failed``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dvcray_cli import gitutil
from dvcray_cli.errors import Interrupted, UsageError
from dvcray_cli.runs import queue_journal as journal
from dvcray_cli.runs import snapshot, stage_env
from dvcray_cli.runs.model import ExpRef, ExpSpec, RunId, RunOptions, RunRecord, valid_exp_name
from dvcray_cli.runs.project import Project, find_project, open_repo
from dvcray_cli.runs.submit import prepare
from dvcray_cli.runs.sweep import ExpState, Sweep, SweepResult

# The ``dvc exp run`` options of a queued experiment that the runner applies (DVC packs
# them with the run's variables into repro.dat; only these leave this machine).
CARRIED = ("force", "downstream", "pull", "allow_missing")


@dataclass
class Queued:
    """An experiment waiting in DVC's queue."""

    stash_rev: str          # its stash commit: the workspace it was queued with
    baseline: str
    name: str | None
    options: dict[str, Any] = field(default_factory=dict)  # targets, force, message, ...
    entry: Any = field(default=None, repr=False)           # DVC's QueueEntry
    copy_paths: list[str] = field(default_factory=list)    # --copy-paths it was queued with


def read_queue(project: Project, names: list[str]) -> list[Queued]:
    """The experiments waiting in DVC's queue (all, or ``names`` in that order), each
    checked: a valid name that is still free for its baseline (unless queued with ``-f``).

    Raises:
        UsageError: a name is not in the queue, or is taken; nothing is changed.
    """
    repo = open_repo(project)
    try:
        celery = repo.experiments.celery_queue
        waiting = _waiting(celery)
        if not waiting:
            return []
        entries = [entry for entry, _ in waiting]
        if names:
            found = celery.match_queue_entry_by_name(names, entries)
            missing = [n for n, e in found.items() if e is None]
            if missing:
                queued = ", ".join(e.name or e.stash_rev[:7] for e in entries)
                raise UsageError(f"Not in DVC's queue: {', '.join(missing)}.",
                                 f"Queued now: {queued} (dvc queue status shows them).")
            chosen = [found[n].stash_rev for n in names]
            waiting = [w for rev in dict.fromkeys(chosen) for w in waiting if w[0].stash_rev == rev]
        picked = [Queued(entry.stash_rev, entry.baseline_rev, entry.name,
                         _options(repo, project, entry, message_args), entry,
                         [str(p) for p in message_args.get("copy_paths") or [] if isinstance(p, str)])
                  for entry, message_args in waiting]
    finally:
        repo.close()
    _check_names(project, picked)
    for q in picked:
        snapshot.check_copy_paths(project.dvc_root, q.copy_paths)
    return picked


def _waiting(celery) -> list[tuple[Any, dict[str, Any]]]:
    """DVC's queued entries, oldest first, with the arguments of their task message
    (``-m`` message, ``--copy-paths``)."""
    try:
        return [(entry, msg.decode()[1] or {}) for msg, entry in celery._iter_queued()]
    except AttributeError:  # a DVC without it: the entries alone
        return [(entry, {}) for entry in celery.iter_queued()]


def _options(repo, project: Project, entry, message_args: dict[str, Any]) -> dict[str, Any]:
    """The ``dvc exp run`` options ``entry`` was queued with, read on this machine from
    its repro.dat (with DVC's own reader); the run variables beside them stay here."""
    from dvc.repo.experiments.executor.base import BaseExecutor

    rel = "/".join(p for p in (project.subdir, ".dvc", "tmp", BaseExecutor.PACKED_ARGS_FILE) if p)
    options: dict[str, Any] = {}
    try:
        data = repo.scm.get_fs(entry.stash_rev).read_bytes(rel)
    except (FileNotFoundError, OSError):
        data = None
    if data:
        with tempfile.TemporaryDirectory(prefix="dvcray-queue-") as tmp:
            path = Path(tmp) / BaseExecutor.PACKED_ARGS_FILE
            path.write_bytes(data)
            args, kwargs = BaseExecutor.unpack_repro_args(os.fspath(path))
        targets = args[0] if args else kwargs.get("targets")
        if targets:
            options["targets"] = [targets] if isinstance(targets, str) else list(targets)
        options.update({k: True for k in CARRIED if kwargs.get(k)})
    if message_args.get("message"):
        options["message"] = str(message_args["message"])
    return options


def _check_names(project: Project, picked: list[Queued]) -> None:
    seen: set[tuple[str, str]] = set()
    for q in picked:
        if q.name is None:
            continue
        if not valid_exp_name(q.name):
            raise UsageError(f"The queued experiment '{q.name}' has a name git refuses.",
                             f"Remove it (dvc queue remove {q.stash_rev[:7]}) and queue it again with -n NAME.")
        key = (q.baseline, q.name)
        if key in seen:
            raise UsageError(f"Two queued experiments are named '{q.name}'.",
                             "Remove one (dvc queue remove REV; dvc queue status lists them), then rerun.")
        seen.add(key)
        taken = gitutil.git("rev-parse", "--verify", "-q", str(ExpRef(q.baseline, q.name)),
                            cwd=project.git_root, check=False)
        if taken and not q.options.get("force"):
            others = [o.name for o in picked if o is not q and o.name]
            raise UsageError(
                f"The queued experiment '{q.name}' cannot run: an experiment of that name now exists "
                f"for its baseline ({q.baseline[:7]}).",
                f"Remove the old one (dvc exp remove {q.name}) or the queued one (dvc queue remove {q.name})"
                + (f", or start the others: dvcray queue start {' '.join(others)}" if others else "") + ".")


@dataclass
class QueueSource:
    """The picked experiments as a run's experiments (``submit.Source``): each with its
    own baseline, changes and options; its snapshot holds one patch per experiment."""

    picked: list[Queued]
    specs: list[ExpSpec] = field(default_factory=list)

    def experiments(self, project: Project) -> list[ExpSpec]:
        base = RunId.new()
        self.specs = [ExpSpec(str(base.member(i)), q.name, [], baseline=q.baseline, patch=f"queued-{i}.patch",
                              options=q.options) for i, q in enumerate(self.picked, 1)]
        return self.specs

    def snapshot(self, project: Project, folder: Path) -> snapshot.Snapshot:
        return snapshot.create_queued(project.git_root, project.dvc_root, folder,
                                      [(s.patch, q.baseline, q.stash_rev, q.copy_paths)
                                       for s, q in zip(self.specs, self.picked)])


def start(opts: RunOptions, names: list[str], cwd: Path, say: Callable[[str], None], jobs: int | None,
          on_line: Callable[[str, str], None], on_change: Callable[[list[ExpState]], None],
          on_progress: Callable[[str, str], None] | None = None, detach: bool = False) -> SweepResult | None:
    """Run the experiments waiting in DVC's queue (all, or ``names``) on the cluster,
    each home as it ends; None when the queue is empty (or with ``detach``). What an
    earlier ``queue start`` could not record is recorded first (``queue_journal.recover``).
    ``detach``: return once every experiment is submitted (``dvcray runs``, ``logs`` and
    ``pull`` take it from there; the next ``queue start`` records the failed ones in DVC's
    queue).

    Raises:
        UsageError: bad names or options, before anything changes.
        ClusterError, StoreError: as ``dvcray run``.
        Interrupted: Ctrl-C or SIGTERM: the experiments submitted were stopped, the others
            are back in DVC's queue.
    """
    if jobs is not None and jobs < 1:
        raise UsageError("--jobs must be at least 1.")
    stage_env.parse(opts.env)  # a bad --env is refused even when nothing is queued
    project = find_project(cwd)
    with journal.interruptible():
        journal.recover(project, say)
        picked = read_queue(project, names)
        if not picked:
            say("DVC's queue has no experiments waiting. Queue one with: dvc exp run --queue -S KEY=VALUE")
            return None
        source = QueueSource(picked)
        with tempfile.TemporaryDirectory(prefix="dvcray-snapshot-") as tmp:
            prepared = prepare(opts, cwd, say, Path(tmp), jobs, source=source)
            return _run(prepared, source, jobs, say, on_line, on_change, on_progress, detach)


def _run(prepared, source: QueueSource, jobs: int | None, say: Callable[[str], None],
         on_line: Callable[[str, str], None], on_change: Callable[[list[ExpState]], None],
         on_progress: Callable[[str, str], None] | None, detach: bool) -> SweepResult | None:
    """Take the experiments from DVC's queue into the journal, run them as a sweep, and
    record each outcome as it comes; on any way out, put back what was never submitted."""
    project, picked = prepared.project, source.picked
    taken = journal.claim(project, [(q.stash_rev, s.run_id, bool(q.options.get("force")))
                                    for q, s in zip(picked, source.specs)], prepared.address)
    by_run = {t.run_id: t for t in taken}
    sweep = None
    try:
        journal.checkpoint("taken")
        say(f"Took {len(picked)} experiment(s) from DVC's queue "
            f"({', '.join(q.name or q.stash_rev[:7] for q in picked)}); running them on {prepared.address}"
            + (f", at most {jobs} at once." if jobs else "."))
        sweep = Sweep(prepared, jobs, on_line, on_change, on_progress, say)
        sweep.detach = detach

        def launched(specs) -> None:
            journal.mark(project, [by_run[s.run_id] for s in specs], journal.SUBMITTED)
            journal.checkpoint("submitted")

        def on_outcome(state: ExpState) -> None:
            journal.checkpoint("ended")
            journal.record(project, by_run[state.spec.run_id], _succeeded(state))

        sweep.before_launch = lambda specs: journal.mark(project, [by_run[s.run_id] for s in specs],
                                                         journal.SUBMITTING)
        sweep.after_launch, sweep.on_outcome = launched, on_outcome
        result = sweep.run()
    except BaseException as exc:
        try:
            _settle(project, taken, {s.spec.run_id: s for s in sweep.states} if sweep is not None else {},
                    isinstance(exc, Interrupted), say)
        except Exception as problem:  # noqa: BLE001 - the first error is the one to raise
            say(f"Could not record every experiment in DVC's queue ({problem}); the next dvcray queue start "
                "records what is left.")
        raise
    if detach:
        say(f"Submitted {len(taken)} experiment(s) from DVC's queue. See them with: dvcray runs; dvcray pull NAME "
            "brings each home once it has ended (the next dvcray queue start records the failed ones in DVC's queue).")
        return None
    failed = [o for o in result.outcomes if o.status != "SUCCEEDED" or not o.home]
    if failed:
        say(f"Recorded as failed in DVC's queue: {', '.join(o.exp_name or o.run_id for o in failed)} (dvc queue status "
            "lists them; their workspaces are kept in refs/exps/celery/failed).")
    return result


def _succeeded(state: ExpState) -> bool:
    return state.outcome is not None and state.outcome.status == "SUCCEEDED" and state.outcome.home


def _settle(project: Project, taken: list[journal.Taken], states: dict[str, ExpState], stopped: bool,
            say: Callable[[str], None]) -> None:
    """On the way out of ``_run`` (an error, Ctrl-C, SIGTERM): every experiment never submitted
    back in DVC's queue; every one whose outcome is known recorded; with ``stopped`` (Ctrl-C
    stopped those submitted), those too, as failed (as ``dvc queue kill`` records them). What
    is left (runs the client no longer follows) waits in the journal for the next ``queue start``."""
    never = [t for t in taken if journal.journaled(project, t) and t.state != journal.SUBMITTED
             and RunRecord.load(project.git_root, t.run_id) is None]
    if journal.put_back(project, never):
        say("Back in DVC's queue (never submitted): "
            f"{', '.join(t.entry.get('name') or t.stash_rev[:7] for t in never)}.")
    known = []
    for t in taken:
        state = states.get(t.run_id)
        if t in never or not journal.journaled(project, t):
            continue
        if state is not None and state.outcome is not None:
            known.append((t, _succeeded(state)))
        elif stopped:
            known.append((t, False))
    journal.record_all(project, known)
