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
from dvcray_cli.errors import StoreError, UsageError
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


def read_project(project: Project, store_url: str | None) -> tuple[Store, bool]:
    """Load the pipeline as DVC sees it (a broken dvc.yaml fails here), pick the
    store, and tell whether ``.dvc`` files track inputs that may need pushing.

    Raises:
        UsageError: DVC cannot read the project, or it has no pipeline.
    """
    from dvc.exceptions import DvcException

    from dvcray_cli import store as store_mod

    try:
        repo = open_repo(project)
        try:
            if not repo.index.stages:
                raise UsageError(f"The DVC project at {project.dvc_root} has no pipeline (no stages).",
                                 "Add one: dvc stage add -n train -d train.py python train.py")
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
    from dvc.stage import PipelineStage

    targets = [s.addressing for s in repo.index.stages
               if not isinstance(s, PipelineStage) and s.outs]
    if not targets:
        return 0
    # Cloud status: "missing" means neither the local cache nor the store has it.
    status = repo.status(targets=targets, cloud=True, remote=REMOTE_NAME)
    missing = sorted(name for name, state in status.items() if state == "missing")
    if missing:
        raise UsageError(f"Input data is missing: {', '.join(missing)} is neither in your DVC cache "
                         "nor in the store.",
                         "Get it back (dvc pull, or dvc add it again), then rerun.")
    try:
        return repo.push(targets=targets, remote=REMOTE_NAME)
    except UploadError as exc:
        raise StoreError(f"Could not push input data to the store: {exc}") from exc


def import_experiment(git_root: Path, store: Store, run_id: str, ref: ExpRef) -> None:
    """Fetch the experiment ref from the bundle the runner saved (never DVC's internal refs)."""
    with tempfile.TemporaryDirectory(prefix="dvcray-bundle-") as tmp:
        bundle = Path(tmp) / BUNDLE
        store.download(store.run_path(run_id, BUNDLE), bundle)
        gitutil.git("fetch", "-q", "--force", os.fspath(bundle), f"+{ref}:{ref}", cwd=git_root)


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
