"""What dvcray took from DVC's queue, kept until each experiment's outcome is recorded
(issue 20, point 7): nothing taken from DVC's queue is ever lost.

DVC's queue (``dvc exp run --queue``) is a Celery queue on disk: each experiment a stash
commit (``refs/exps/stash``) and a message file in ``.dvc/tmp/exps/celery/broker/in``.
``dvcray queue start`` takes an experiment as DVC's own worker does, with one atomic
rename of its message file (a local worker that took it first wins; nothing finished is
ever matched), into the journal, ``.dvcray/queue/``, beside a record of what it became
(``Taken``). DVC's stash entry stays until the outcome is recorded, so the stash commit
stays reachable. Then:

- an experiment never submitted goes back to DVC's queue (its message renamed back) on
  any exit dvcray can catch (an error, Ctrl-C or SIGTERM, which stop the submitted ones
  as ``dvc queue kill`` does: recorded as failed), and at the next ``queue start`` after
  one it cannot (SIGKILL, a power cut), once the process that took it is gone;
- one that succeeded and came home leaves DVC's queue (its stash entry dropped), as after
  a local run;
- one that did not succeed is recorded as DVC records a local failure: its message among
  the processed ones with a FAILURE result, its stash commit in ``refs/exps/celery/failed``.
  ``dvc queue status`` lists it as Failed, ``dvc exp show`` shows it, ``dvc queue remove
  --failed`` removes it;
- one still running when the client went (SIGKILL, a lost client, ``--detach``) is recorded
  by the next ``queue start`` (or ``dvcray pull``) once it has ended.

Each step is safe to redo: a step cut short is finished by the next ``queue start``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from dvcray_cli import files
from dvcray_cli.errors import UsageError
from dvcray_cli.runs.project import Project, open_repo

TAKEN, SUBMITTING, SUBMITTED = "taken", "submitting", "submitted"
FAILURE_TEXT = "the experiment did not succeed on the Ray cluster (dvcray queue start): see dvcray logs"


@dataclass
class Taken:
    """One experiment dvcray took from DVC's queue, as the journal keeps it."""

    stash_rev: str
    run_id: str
    entry: dict[str, Any]        # DVC's QueueEntry, as its asdict() spells it
    task_id: str                 # its Celery task
    message: str                 # its message file's name in DVC's broker
    state: str = TAKEN           # taken, submitting (launch under way), submitted
    address: str = ""            # the cluster it goes to
    force: bool = False          # queued with -f: it may replace an experiment of its name
    owner: int = 0               # the process that took it, and when that process started
    owner_started: float = 0.0
    taken_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Taken | None:
        found = files.from_json(cls, data)
        if found is None or not isinstance(found.stash_rev, str) or len(found.stash_rev) != 40 \
                or not isinstance(found.entry, dict) or not isinstance(found.message, str) \
                or "/" in found.message or found.message.startswith("."):
            return None
        return found


def folder(git_root: Path) -> Path:
    return files.private_dir(files.repo_dir(git_root) / "queue")


def _path(git_root: Path, rev: str, suffix: str) -> Path:
    return folder(git_root) / f"{rev}.{suffix}"


def save(git_root: Path, taken: Taken) -> None:
    files.write_json(_path(git_root, taken.stash_rev, "json"), taken.to_json())


def journal(git_root: Path) -> list[Taken]:
    """Everything the journal holds, oldest first."""
    found = [Taken.from_json(files.read_json(p)) for p in sorted(folder(git_root).glob("*.json"))]
    return sorted((t for t in found if t is not None), key=lambda t: t.taken_at)


def _me() -> tuple[int, float]:
    import psutil

    return os.getpid(), psutil.Process().create_time()


def owner_alive(taken: Taken) -> bool:
    """The process that took it still runs (then it is that process's to record)."""
    import psutil

    try:
        return abs(psutil.Process(taken.owner).create_time() - taken.owner_started) < 1
    except (psutil.Error, OSError):
        return False


# --------------------------------------------------------------------------- Ctrl-C and SIGTERM


_state = {"critical": 0, "pending": False}


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM (a CI runner cancelling the job) raise KeyboardInterrupt in the
    block, as everywhere in dvcray, except inside ``critical()`` sections, which finish first."""
    def on_signal(signum, frame) -> None:
        if _state["critical"]:
            _state["pending"] = True
        else:
            raise KeyboardInterrupt()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A change of DVC's queue and the journal that Ctrl-C and SIGTERM do not cut in two."""
    _state["critical"] += 1
    try:
        yield
    finally:
        _state["critical"] -= 1
        if not _state["critical"] and _state["pending"]:
            _state["pending"] = False
            raise KeyboardInterrupt()


def checkpoint(name: str) -> None:
    """Where a test stops the client to kill it (``DVCRAY_QUEUE_PAUSE=name``: it stops itself
    with SIGSTOP there). Nothing otherwise."""
    if os.environ.get("DVCRAY_QUEUE_PAUSE") == name:
        os.kill(os.getpid(), signal.SIGSTOP)


# --------------------------------------------------------------------------- DVC's queue on disk


class Broker:
    """DVC's queue of ``repo`` as its Celery app keeps it on disk."""

    def __init__(self, repo) -> None:
        self.queue = repo.experiments.celery_queue
        options = self.queue.celery.conf.broker_transport_options
        self.inbox, self.processed = Path(options["data_folder_in"]), Path(options["processed_folder"])

    def queued(self) -> dict[str, tuple[Path, str, Any]]:
        """``{stash_rev: (message file, task id, QueueEntry)}`` of what waits in DVC's queue."""
        found = {}
        for msg, entry in self.queue._iter_queued():
            path = self.queue.celery._queued_msg_path_cache.get(msg.delivery_tag)
            if path:
                found[entry.stash_rev] = (Path(path), str(msg.headers.get("id") or ""), entry)
        return found


def claim(project: Project, picks: list[tuple[str, str, bool]], address: str) -> list[Taken]:
    """Take ``picks`` (``(stash_rev, run_id, force)``) out of DVC's queue into the journal: each
    recorded first, then its message file renamed into the journal (the claim itself).

    Raises:
        UsageError: one left DVC's queue meanwhile (a local worker took it); none is taken.
    """
    root = project.git_root
    owner, started = _me()
    repo = open_repo(project)
    try:
        queued = Broker(repo).queued()
    finally:
        repo.close()
    taken: list[Taken] = []
    with critical():
        for rev, run_id, force in picks:
            found = queued.get(rev)
            if found is not None:
                path, task_id, entry = found
                item = Taken(rev, run_id, entry.asdict(), task_id, path.name, address=address, force=force,
                             owner=owner, owner_started=started)
                save(root, item)
                try:
                    os.rename(path, _path(root, rev, "msg"))
                    taken.append(item)
                    continue
                except FileNotFoundError:
                    _path(root, rev, "json").unlink(missing_ok=True)
            put_back(project, taken)
            raise UsageError("An experiment left DVC's queue while dvcray prepared to run it "
                             "(is a local dvc queue worker running?).",
                             "See dvc queue status, then rerun dvcray queue start.")
    return taken


def journaled(project: Project, taken: Taken) -> bool:
    """Its outcome is not recorded yet."""
    return _path(project.git_root, taken.stash_rev, "json").exists()


def mark(project: Project, taken: list[Taken], state: str) -> None:
    with critical():
        for item in taken:
            item.state = state
            save(project.git_root, item)


def put_back(project: Project, taken: list[Taken]) -> list[Taken]:
    """Put experiments taken and never submitted back in DVC's queue (their messages back
    where DVC's workers and ``dvc queue status`` find them); returns them."""
    if not taken:
        return []
    repo = open_repo(project)
    try:
        inbox = Broker(repo).inbox
    finally:
        repo.close()
    with critical():
        for item in taken:
            message = _path(project.git_root, item.stash_rev, "msg")
            if message.exists():
                os.replace(message, inbox / item.message)
            _path(project.git_root, item.stash_rev, "json").unlink(missing_ok=True)
    return taken


def record(project: Project, taken: Taken, succeeded: bool) -> None:
    """Record an experiment's outcome in DVC's queue (module docstring) and leave the journal.
    Every step may be redone."""
    from dvc.repo.experiments.queue.base import QueueEntry

    root = project.git_root
    repo = open_repo(project)
    try:
        broker = Broker(repo)
        queue = broker.queue
        entry = QueueEntry.from_dict(taken.entry)
        with critical():
            message = _path(root, taken.stash_rev, "msg")
            if not succeeded:
                failed = queue.failed_stash
                if failed is not None and taken.stash_rev not in failed.stash_revs:
                    queue.stash_failed(entry)
                queue.celery.backend.mark_as_failure(taken.task_id, RuntimeError(FAILURE_TEXT))
                if message.exists():
                    os.replace(message, broker.processed / taken.message)
            _drop_stash_entry(repo, taken.stash_rev)
            message.unlink(missing_ok=True)
            _path(root, taken.stash_rev, "json").unlink(missing_ok=True)
    finally:
        repo.close()


def _drop_stash_entry(repo, rev: str) -> None:
    """DVC's stash entry of ``rev`` goes, as a local worker drops it once it runs it."""
    from dvc.repo.experiments.refs import CELERY_STASH
    from dvc.repo.experiments.utils import get_exp_rwlock

    queue = repo.experiments.celery_queue
    with get_exp_rwlock(repo, writes=[CELERY_STASH]):
        found = queue.stash.stash_revs.get(rev)
        if found is not None:
            queue.stash.remove_revs([found])


def pulled(project: Project, run_id: str) -> bool:
    """Run ``run_id``, taken from DVC's queue, came home through ``dvcray pull``: it leaves DVC's
    queue as one that succeeded (unless the ``queue start`` that took it still runs and
    records it itself). Whether the journal had it."""
    for taken in journal(project.git_root):
        if taken.run_id == run_id and not owner_alive(taken):
            record(project, taken, True)
            return True
    return False


def record_all(project: Project, outcomes: list[tuple[Taken, bool]]) -> None:
    """``record`` each; one that fails never keeps the others from being recorded.

    Raises:
        Exception: the first failure, once every one was tried (the others stay in the journal).
    """
    first: BaseException | None = None
    for taken, succeeded in outcomes:
        try:
            record(project, taken, succeeded)
        except Exception as exc:  # noqa: BLE001 - raised below, after the rest
            first = first or exc
    if first is not None:
        raise first


def ended(run_id: str, job_id: str, store, backend, baseline: str, exp_name: str | None, project: Project,
          force: bool) -> bool | None:
    """How a run taken from DVC's queue ended, brought home when it succeeded: True (home),
    False (it did not succeed, or cannot come home), None (not ended yet, or its cluster
    cannot say)."""
    from dvcray_cli.errors import DvcrayError
    from dvcray_cli.runs.finish import fetch_result, finish
    from dvcray_cli.runs.model import RunState
    from dvcray_cli.runs.submit import Submitted

    result = fetch_result(store, run_id, wait_s=0)
    if result is None:
        try:
            info = backend.info(run_id, job_id) if backend is not None else None
        except DvcrayError:
            return None
        if info is None or not info.state.is_terminal():
            return None if info is None or info.state.is_active() else False
        return False
    sub = Submitted(run_id, getattr(backend, "address", ""), store, exp_name, baseline, backend=backend,
                    project=project, job_id=job_id)
    outcome = finish(sub, result.status, force=force)
    return outcome.status == RunState.SUCCEEDED.value and outcome.home


def recover(project: Project, say: Callable[[str], None], only: str | None = None) -> list[str]:
    """Record what an earlier ``queue start`` took and could not record (it was killed, or
    detached): never-submitted experiments back in DVC's queue, ended ones recorded (home
    when they succeeded). ``only``: that run alone (``dvcray pull``). Returns the names of
    those that are still running.
    """
    from dvcray_cli.runs import backends
    from dvcray_cli.runs.lookup import context, record_run
    from dvcray_cli.runs.model import RunRecord

    back, home, failed, running = [], [], [], []
    ctx = None
    for taken in journal(project.git_root):
        if (only and taken.run_id != only) or owner_alive(taken):
            continue
        name = taken.entry.get("name") or taken.stash_rev[:7]
        record_ = RunRecord.load(project.git_root, taken.run_id)
        if record_ is None and taken.state != SUBMITTED:
            put_back(project, [taken])   # never submitted: its launch left no record
            back.append(name)
            continue
        if record_ is None:
            running.append(name)
            continue
        ctx = ctx or context(project.git_root)
        run = record_run(ctx, record_)
        job_id = record_.job_id or taken.run_id
        backend, _, _ = backends.locate(record_, record_.address, taken.run_id, job_id)
        how = ended(taken.run_id, job_id, run.store, backend, record_.baseline or project.baseline,
                    record_.exp_name, project, force=taken.force)
        if how is None:
            running.append(name)
            continue
        record(project, taken, how)
        (home if how else failed).append(name)
    if back:
        say(f"Put back in DVC's queue: {', '.join(back)} (taken by a dvcray queue start that ended before it "
            "submitted them).")
    if home:
        say(f"Brought home from an earlier dvcray queue start: {', '.join(home)}.")
    if failed:
        say(f"Recorded as failed in DVC's queue (dvc queue status): {', '.join(failed)}.")
    if running:
        say(f"Not ended yet, or their cluster does not answer now: {', '.join(running)}, from an earlier dvcray "
            "queue start (dvcray runs shows them); the next dvcray queue start records them once they have ended.")
    return running
