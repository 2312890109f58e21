"""``dvcray run`` up to the submission: preflight, snapshot, submit.

Everything that can be checked is checked before anything is submitted or
changed (DESIGN.md, "The run lifecycle"): the repo, the names, ``-S``, the
store, the cluster and the dvcray version it runs.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from dvcray_cli import __version__, clusters, params, ray_api
from dvcray_cli.errors import UsageError
from dvcray_cli.runs import backends, placement, settings, snapshot, stage_env
from dvcray_cli.runs.backends import Backend
from dvcray_cli.runs.model import MANIFEST, ExpSpec, Manifest, RunId, RunOptions, RunRecord, RunState
from dvcray_cli.runs.project import (Project, check_exp_name, find_project, open_repo, push_inputs,
                                     read_project)
from dvcray_cli.store import Store

Say = Callable[[str], None]


@dataclass
class Submitted:
    """One experiment, submitted."""

    run_id: str
    address: str
    store: Store
    exp_name: str | None
    baseline: str
    started_cluster: bool = False
    snapshot_bytes: int = 0
    backend: Backend | None = field(default=None, repr=False)  # how it runs there
    project: Project | None = field(default=None, repr=False)  # where it comes home
    job_id: str = ""  # the submission it went in (a sweep's experiments share one); "" : its own


@dataclass
class Prepared:
    """What preflight found and the snapshot it made: everything needed to submit runs."""

    opts: RunOptions
    project: Project
    store: Store
    address: str
    backend: Backend  # how runs go to the cluster (chosen once: ``backends.choose``)
    started_cluster: bool
    experiments: list[ExpSpec]
    snapshot_dir: Path
    snapshot_bytes: int = 0
    placement: placement.Placement | None = None  # how runners are submitted (--cpus-per-exp ...)
    worktree_flags: dict[str, list[str]] = field(default_factory=dict)  # snapshot.Snapshot.flags
    repo_root: str = ""  # the project's first commit, when the bundle is made against the cluster's cache
    bundle_commits: int = -1  # how many commits the snapshot's bundle carries (Manifest.bundle_commits)
    stage: stage_env.StageEnv = field(default_factory=stage_env.StageEnv)  # what the stage gets on purpose
    retries: int = 0  # how often the cluster tries a run lost with its machine again (0 where it cannot)

    def manifest(self, job_id: str, specs: list[ExpSpec], jobs: int = 0) -> Manifest:
        opts, project = self.opts, self.project
        one = specs[0] if len(specs) == 1 and not specs[0].own_workspace else None
        return Manifest(
            run_id=one.run_id if one else job_id, baseline=project.baseline, subdir=project.subdir,
            exp_name=one.exp_name if one else None, overrides=list(one.overrides) if one else [],
            targets=list(opts.targets),
            options={"force": opts.force, "downstream": opts.downstream, "message": opts.message,
                     "pull": opts.pull, "allow_missing": opts.allow_missing},
            copy_paths=list(opts.copy_paths), git_name=project.identity[0], git_email=project.identity[1],
            store=self.store.to_json(), dvcray_version=__version__, created=time.time(), address=self.address,
            experiments=[] if one else [s.to_json() for s in specs], jobs=jobs,
            worktree_flags=self.worktree_flags, repo_root=self.repo_root, bundle_commits=self.bundle_commits,
            env=dict(self.stage.env), pythonpath=list(self.stage.pythonpath), retries=self.retries,
        )


def expand(opts: RunOptions, project: Project) -> list[ExpSpec]:
    """One experiment per combination of a sweep (DVC's own sweep parser); names
    NAME-1..NAME-k as DVC gives them. Every name is checked free."""
    from dvc.utils.hydra import get_hydra_sweeps

    grouped = params.check(project.dvc_root, opts.overrides)
    base = RunId.new()
    if not params.is_sweep(opts.overrides):
        check_exp_name(project, opts.exp_name, opts.force)
        return [ExpSpec(str(base), opts.exp_name, list(opts.overrides))]
    combos = get_hydra_sweeps(grouped)
    specs = []
    for i, combo in enumerate(combos, 1):
        overrides = [ov if path == "params.yaml" else f"{path}:{ov}" for path, ovs in combo.items() for ov in ovs]
        params.check(project.dvc_root, overrides)
        name = f"{opts.exp_name}-{i}" if opts.exp_name else None
        check_exp_name(project, name, opts.force)
        specs.append(ExpSpec(str(base.member(i)), name, overrides))
    return specs


class Source(Protocol):
    """Where a run's experiments come from, when not from the workspace and ``-S``
    (e.g. DVC's queue): their specs, and the snapshot that carries them."""

    def experiments(self, project: Project) -> list[ExpSpec]: ...

    def snapshot(self, project: Project, folder: Path) -> snapshot.Snapshot: ...


def prepare(opts: RunOptions, cwd: Path, say: Say, snapshot_dir: Path, jobs: int | None = None,
            source: Source | None = None) -> Prepared:
    """Preflight (every check before anything is submitted), then snapshot the workspace.
    ``jobs``: a sweep's ``--jobs``, for the placement of its runners; ``source``: where
    the experiments come from (default: the workspace, with ``opts.overrides``)."""
    import concurrent.futures

    if jobs is not None and jobs < 1:
        raise UsageError("--jobs must be at least 1.")
    # Bad settings are refused now, not at submission.
    ray_api.stop_grace_s()
    ray_api.keep_jobs()
    snapshot.via_store_bytes()
    project = find_project(cwd)
    # The stage's variables and PYTHONPATH: refused before anything starts (a runner service included).
    listed = settings.read(project.dvc_root, project.git_root)
    stage = stage_env.resolve(opts.env, listed.env, listed.path, project.dvc_root, cwd, opts.copy_paths)
    retries = retries_for(opts, listed)
    known = clusters.known_address(opts.address, cwd)
    asked = opts.cpus_per_exp is not None or opts.gpus_per_exp is not None
    early = None
    if known:
        # Reaching the cluster (its runner service, or Ray's SDK) takes a while the first
        # time; do it while DVC reads the project. Its errors surface after DVC's.
        early = concurrent.futures.ThreadPoolExecutor(1).submit(backends.choose, known, say)
    snapshot.check_workspace(project.git_root)
    snapshot.check_copy_paths(project.dvc_root, opts.copy_paths)
    if not source:
        snapshot.check_untracked(project.git_root)
    experiments = source.experiments(project) if source else expand(opts, project)
    store, has_inputs = read_project(project, opts.store, opts.targets)
    if store.is_local and known and not clusters.on_this_machine(known):
        # Before the store is touched: the runner would write to its own node's disk.
        raise UsageError(f"The store {store.url} is a folder on this machine, but the cluster at {known} runs "
                         "elsewhere: its runners cannot reach it.",
                         "Use a store every node reaches: --store s3://BUCKET/PREFIX (or an S3 default remote).")
    store.check_writable()

    if early is not None:
        address, started = known, False
        backend = early.result()
    else:
        address, started = clusters.ensure_address(opts.address, cwd, say)
        backend = backends.choose(address, say)

    for note in stage.notes:
        say(note)
    where = placement.decide(clusters.shape(address) if asked else None, opts.cpus_per_exp, opts.gpus_per_exp,
                             store.is_local, store.url, len(experiments), jobs)
    if where.note:
        say(where.note)
    if has_inputs:
        repo = open_repo(project, store)
        try:
            pushed = push_inputs(repo)
        finally:
            repo.close()
        if pushed:
            say(f"Pushed {pushed} input file(s) to the store {store.url}.")
    root, commits = "", -1
    if source:
        packed = source.snapshot(project, snapshot_dir)
    else:
        root, against = backend.cached_history(project.git_root)
        packed = snapshot.create(project.git_root, project.dvc_root, snapshot_dir, opts.copy_paths, against)
        commits = snapshot.bundle_commits(project.git_root, against)
    return Prepared(opts, project, store, address, backend, started, experiments, snapshot_dir,
                    packed.total, where, packed.flags, root, commits, stage,
                    retries if backend.retries_lost else 0)


def retries_for(opts: RunOptions, listed: settings.Settings) -> int:
    """How often a run lost with its machine is tried again: ``--retries``, else the project's
    (``listed``: its ``[tool.dvcray] retries``), else ``DEFAULT_RETRIES``.

    Raises:
        UsageError: a negative number.
    """
    from dvcray_cli.service.protocol import DEFAULT_RETRIES

    if opts.retries is not None:
        if opts.retries < 0:
            raise UsageError(f"--retries must be 0 or more (not {opts.retries}).", "0 turns retries off.")
        return opts.retries
    return DEFAULT_RETRIES if listed.retries is None else listed.retries


def launch(prepared: Prepared, job_id: str, specs: list[ExpSpec], jobs: int = 0, placed: bool = False) -> None:
    """Submit ``specs`` (one experiment, or a sweep's together) as submission ``job_id``;
    ``placed``: with the resources of ``prepared.placement`` (``--cpus-per-exp`` ...).

    Raises:
        ClusterError: the cluster refused it.
    """
    manifest = prepared.manifest(job_id, specs, jobs)
    folder = prepared.backend.package(prepared, manifest)
    manifest.write(folder)
    data = (folder / MANIFEST).read_bytes()
    for spec in specs:
        prepared.store.write(prepared.store.run_path(spec.run_id, MANIFEST), data)
    prepared.backend.submit(prepared, folder, job_id, specs, placed)
    for spec in specs:
        RunRecord(run_id=spec.run_id, job_id=job_id, address=prepared.address, store=prepared.store.to_json(),
                  exp_name=spec.exp_name, baseline=spec.baseline or prepared.project.baseline, submitted=time.time(),
                  state=RunState.PENDING, env=sorted(prepared.stage.env),
                  **prepared.backend.recorded()).save(prepared.project.git_root)


def submit(opts: RunOptions, cwd: Path, say: Say) -> Submitted:
    """Preflight, then snapshot the workspace and submit one experiment.

    Raises:
        UsageError: a sweep (those go through ``sweep.run_sweep``), or anything preflight refuses.
        ClusterError, StoreError: the cluster or the store is unfit.
    """
    if params.is_sweep(opts.overrides):
        raise UsageError("A sweep runs through run_sweep, not submit.")
    with tempfile.TemporaryDirectory(prefix="dvcray-snapshot-") as tmp:
        prepared = prepare(opts, cwd, say, Path(tmp))
        spec = prepared.experiments[0]
        launch(prepared, spec.run_id, [spec], placed=True)
    return Submitted(spec.run_id, prepared.address, prepared.store, spec.exp_name, prepared.project.baseline,
                     prepared.started_cluster, prepared.snapshot_bytes, prepared.backend, prepared.project)
