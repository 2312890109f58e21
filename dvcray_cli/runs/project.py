"""The user's project: the git and DVC repository a run starts from and comes home to.

Finding and checking it as ``dvc exp run`` needs it, opening it with a store as
an in-memory remote (the user's DVC config is never changed), pushing inputs
before a run, and bringing an experiment's ref and outputs into it afterwards.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dvcray_cli import gitutil
from dvcray_cli.errors import GitError, StoreError, UsageError
from dvcray_cli.runs.model import BUNDLE, ExpRef, valid_exp_name
from dvcray_cli.store import REMOTE_NAME, Store


@dataclass
class Project:
    git_root: Path
    dvc_root: Path
    baseline: str
    identity: tuple[str, str]

    @property
    def subdir(self) -> str:
        rel = self.dvc_root.relative_to(self.git_root).as_posix()
        return "" if rel == "." else rel


def find_project(start: Path) -> Project:
    """The git and DVC project that holds ``start``, checked as ``dvc exp run`` needs it.

    Raises:
        UsageError: not a git repo, no commit, no git identity, not a DVC
            project, or a shallow clone.
    """
    git_root = gitutil.git_root(start)
    if git_root is None:
        raise UsageError(f"{start} is not in a git repository.",
                         "Run dvcray inside your DVC project (or create one: git init && dvc init).")
    head = gitutil.git("rev-parse", "--verify", "-q", "HEAD", cwd=git_root, check=False)
    if not head:
        raise UsageError("The repository has no commit yet: an experiment needs a baseline.",
                         "Commit your project first: git add -A && git commit -m 'start'")
    identity = gitutil.identity(git_root)
    dvc_root = gitutil.dvc_root(start.resolve(), git_root)
    if dvc_root is None:
        raise UsageError(f"{start} is not in a DVC project.",
                         "Run dvc init (dvc init --subdir below the git root), then add a stage.")
    shallow = gitutil.git("rev-parse", "--is-shallow-repository", cwd=git_root)
    if shallow == "true":
        raise UsageError("This is a shallow clone; DVC experiments need the full history.",
                         "Run: git fetch --unshallow")
    return Project(git_root, dvc_root, head, identity)


def check_exp_name(project: Project, name: str | None, force: bool) -> None:
    """``name`` is a valid experiment name, free for this baseline unless ``force``.

    Raises:
        UsageError: it is not, naming what to do.
    """
    if not name:
        return
    if not valid_exp_name(name):
        raise UsageError(f"'{name}' is not a valid experiment name.",
                         "Use letters, digits, '-', '_' and '.'; no spaces or slashes.")
    ref = str(ExpRef(project.baseline, name))
    if gitutil.git("rev-parse", "--verify", "-q", ref, cwd=project.git_root, check=False) and not force:
        raise UsageError(f"Experiment '{name}' already exists for this baseline ({project.baseline[:7]}).",
                         "Pick another --exp-name, or pass -f to replace it.")


def open_repo(project: Project, store: Store | None = None):
    """DVC's Repo for the project; with ``store``, that store as an in-memory
    default remote, so the user's DVC config is never changed."""
    from dvc.repo import Repo

    return Repo(os.fspath(project.dvc_root), config=store.dvc_config() if store else None)


def read_project(project: Project, store_url: str | None, targets: list[str] = ()) -> tuple[Store, bool]:
    """Load the pipeline as DVC sees it (a broken dvc.yaml fails here), check the
    targets, pick the store, and tell whether ``.dvc`` files track inputs that may
    need pushing.

    Raises:
        UsageError: DVC cannot read the project, it has no pipeline, a target is
            no stage of it, or another DVC command holds the project's lock.
    """
    from dvc.exceptions import DvcException
    from dvc.lock import LockError

    from dvcray_cli import store as store_mod

    try:
        repo = open_repo(project)
        try:
            if not repo.index.stages:
                raise UsageError(f"The DVC project at {project.dvc_root} has no pipeline (no stages).",
                                 "Add one: dvc stage add -n train -d train.py python train.py")
            for target in targets:
                try:
                    repo.stage.collect(target)
                except DvcException as exc:
                    raise UsageError(f"{target} is not a stage of this pipeline: {exc}",
                                     "See the stages with: dvc stage list") from None
            try:
                with repo.lock:
                    pass
            except LockError:
                raise UsageError("Another DVC command holds this project's lock (.dvc/tmp/lock): a dvc exp run "
                                 "or dvc repro is going on here.", "Wait for it to finish, then rerun.") from None
            from dvc.stage import PipelineStage

            has_inputs = any(not isinstance(st, PipelineStage) and st.outs for st in repo.index.stages)
            return store_mod.resolve(store_url, repo), has_inputs
        finally:
            repo.close()
    except DvcException as exc:
        raise UsageError(f"DVC cannot read the project: {exc}",
                         "Fix it until dvc status works, then rerun.") from None


def push_inputs(repo) -> int:
    """Push data tracked by ``.dvc`` files (the pipeline's inputs) to the store.

    Raises:
        UsageError: an input is neither in the local cache nor in the store.
        StoreError: the push failed.
    """
    from dvc.exceptions import UploadError
    from dvc.lock import LockError
    from dvc.stage import PipelineStage

    targets = [s.addressing for s in repo.index.stages
               if not isinstance(s, PipelineStage) and s.outs]
    if not targets:
        return 0
    # Cloud status: "missing" means neither the local cache nor the store has it.
    try:
        status = repo.status(targets=targets, cloud=True, remote=REMOTE_NAME)
    except LockError:
        raise UsageError("Another DVC command holds this project's lock: the inputs cannot be pushed now.",
                         "Wait for it to finish, then rerun.") from None
    missing = sorted(name for name, state in status.items() if state == "missing")
    if missing:
        raise UsageError(f"Input data is missing: {', '.join(missing)} is neither in your DVC cache "
                         "nor in the store.",
                         "Get it back (dvc pull, or dvc add it again), then rerun.")
    try:
        return repo.push(targets=targets, remote=REMOTE_NAME)
    except LockError:
        raise UsageError("Another DVC command holds this project's lock: the inputs cannot be pushed now.",
                         "Wait for it to finish, then rerun.") from None
    except UploadError as exc:
        raise StoreError(f"Could not push input data to the store: {exc}") from exc


ZERO_SHA = "0" * 40


def exp_sha_of(git_root: Path, ref: ExpRef) -> str | None:
    """The commit ``ref`` points to in this repo, None when there is no such ref."""
    return gitutil.git("rev-parse", "--verify", "-q", f"{ref}^{{commit}}", cwd=git_root, check=False) or None


def import_experiment(git_root: Path, store: Store, run_id: str, ref: ExpRef, as_name: str | None = None,
                      force: bool = False, made: str | None = None) -> tuple[ExpRef, str]:
    """Bring the experiment ``ref`` home from the bundle the runner saved, as ``as_name``
    when given. Only that ref is fetched (never DVC's internal refs), and an
    existing experiment of the same name is never replaced unless ``force``
    (``refs/exps`` has no reflog: a replaced experiment would be gone).

    The store is data anyone with write access may have changed: the commit must descend
    from the run's baseline (an experiment of it), and be ``made``, the commit the cluster
    said the run made over its authenticated channel, when the cluster could say
    (``Backend.made``). A planted commit never becomes one of the user's experiments.

    Returns:
        The experiment's ref here and its commit.

    Raises:
        UsageError: the name is taken here by another experiment and not ``force``.
        StoreError: the bundle is missing or does not hold the experiment, or holds
            a commit the run did not make.
    """
    target = ExpRef(ref.baseline, as_name or ref.name)
    incoming = f"refs/dvcray/incoming/{run_id}"
    with tempfile.TemporaryDirectory(prefix="dvcray-bundle-") as tmp:
        bundle = Path(tmp) / BUNDLE
        store.download(store.run_path(run_id, BUNDLE), bundle)
        try:
            gitutil.git("fetch", "-q", "--no-write-fetch-head", os.fspath(bundle), f"+{ref}:{incoming}", cwd=git_root)
        except GitError as exc:
            raise StoreError(f"The bundle of run {run_id} in the store {store.url} does not hold {ref}: {exc}",
                             f"Its log says what happened: dvcray logs {run_id}") from None
    try:
        sha = gitutil.git("rev-parse", incoming, cwd=git_root)
        planted = None
        if made and sha != made:
            planted = f"holds commit {sha[:7]}, but the cluster says run {run_id} made {made[:7]}"
        elif not descends(git_root, sha, ref.baseline):
            planted = f"holds commit {sha[:7]}, which does not descend from the run's baseline {ref.baseline[:7]}"
        if planted:
            raise StoreError(f"The bundle of run {run_id} in the store {store.url} {planted}: it was not made by "
                             "the run, and nothing was brought home.",
                             "The store holds records dvcray did not write; ask who writes to it.")
        existing = exp_sha_of(git_root, target)
        if existing == sha:
            return target, sha
        if existing and not force:
            raise NameTaken(target, existing, run_id, sha)
        # Compare-and-swap: the ref must still be what was just looked at.
        gitutil.git("update-ref", str(target), sha, existing or ZERO_SHA, cwd=git_root)
        return target, sha
    finally:
        gitutil.git("update-ref", "-d", incoming, cwd=git_root, check=False)


def descends(git_root: Path, sha: str, baseline: str) -> bool:
    """Whether commit ``sha`` descends from ``baseline`` (an experiment of it does)."""
    try:
        gitutil.git("merge-base", "--is-ancestor", baseline, sha, cwd=git_root)
    except GitError:
        return False  # not an ancestor (exit 1), or no such commit here (exit 128)
    return True


class NameTaken(UsageError):
    """An experiment of that name exists here already; it is never replaced silently."""

    def __init__(self, target: ExpRef, existing: str, run_id: str, sha: str) -> None:
        super().__init__(
            f"Experiment '{target.name}' already exists for baseline {target.baseline[:7]} (commit {existing[:7]}); "
            f"run {run_id} made another one (commit {sha[:7]}), which stays in the store.",
            f"Keep both: dvcray pull {run_id} --as {target.name}-2   Replace yours: dvcray pull {run_id} -f")
        self.target, self.existing, self.run_id, self.sha = target, existing, run_id, sha


def shown_files(repo) -> list[str]:
    """What ``dvc exp show`` and ``dvc plots diff`` read of this workspace that is not
    in git: metrics, plots and params files inside a cached output (e.g. an
    ``eval/`` folder output holding ``metrics.json``). Empty in the common case,
    where they are outputs of their own with ``cache: false``."""
    index = repo.index
    cached = [out.index_key[1] for out in index.outs if out.use_cache]
    shown = set()
    for keys in (index.metric_keys, index.plot_keys, index.param_keys):
        shown.update(keys.get("repo", set()))
    return sorted("/".join(key) for key in shown if any(key[:len(out)] == out for out in cached))


def fetch_shown_files(project: Project, store: Store, exp_sha: str, files: list[str]) -> int:
    """Bring ``files`` of an experiment (``shown_files``, as the runner found them)
    into the local DVC cache, with their folders' ``.dir`` manifests, and nothing
    else of its outputs. Without them ``dvc exp show`` reports
    ``DataIndexDirError`` for the experiment (DESIGN.md, Facts).

    Returns:
        The files fetched.

    Raises:
        StoreError: DVC could not fetch them.
    """
    files = [f for f in files if isinstance(f, str) and f and not f.startswith("/") and ".." not in f.split("/")]
    if not files:
        return 0
    repo = open_repo(project, store)
    try:
        return repo.fetch(targets=files, revs=[exp_sha], workspace=False, remote=REMOTE_NAME)
    except Exception as exc:
        raise StoreError(f"Could not fetch the experiment's metrics and plots from {store.url}: {exc}",
                         "dvc exp show may not show this experiment until: dvcray pull NAME") from exc
    finally:
        repo.close()


def pull_outputs(project: Project, store: Store, exp_sha: str) -> int:
    """Bring an experiment's outputs from the store into the local DVC cache.

    Raises:
        StoreError: DVC could not fetch them.
    """
    repo = open_repo(project, store)
    try:
        return repo.fetch(revs=[exp_sha], remote=REMOTE_NAME)
    except Exception as exc:
        raise StoreError(f"Could not fetch the experiment's outputs from {store.url}: {exc}") from exc
    finally:
        repo.close()
