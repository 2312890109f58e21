"""``dvcray run`` up to the submission: preflight, snapshot, submit.

Everything that can be checked is checked before anything is submitted or
changed (DESIGN.md, "The run lifecycle"): the repo, the names, ``-S``, the
store, the cluster and the dvcray version it runs.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from dvcray_cli import __version__, clusters, params, ray_api
from dvcray_cli.errors import ClusterError, UsageError
from dvcray_cli.runs import placement, snapshot, warm
from dvcray_cli.runs.model import MANIFEST, ExpSpec, Manifest, RunOptions, RunRecord, RunState, new_run_id
from dvcray_cli.runs.project import (Project, check_exp_name, find_project, open_repo, push_inputs,
                                     read_project)
from dvcray_cli.service_api import Service, ServiceError
from dvcray_cli import store as store_mod
from dvcray_cli.store import Store

Say = Callable[[str], None]


@dataclass
class Submitted:
    """One experiment submitted as a Ray Job of its own."""

    run_id: str
    address: str
    store: Store
    exp_name: str | None
    baseline: str
    started_cluster: bool = False
    snapshot_bytes: int = 0
    client: Any = field(default=None, repr=False)  # the JobSubmissionClient that submitted it
    project: Project | None = field(default=None, repr=False)  # where it comes home
    service: Service | None = field(default=None, repr=False)  # the runner service that runs it


@dataclass
class Plan:
    """What preflight found: everything needed to submit jobs."""

    opts: RunOptions
    project: Project
    store: Store
    address: str
    client: Any
    started_cluster: bool
    experiments: list[ExpSpec]
    snapshot_dir: Path
    snapshot_bytes: int = 0
    placement: placement.Placement | None = None  # how runners are submitted (--cpus-per-exp ...)
    worktree_flags: dict[str, list[str]] = field(default_factory=dict)  # snapshot.Snapshot.flags
    service: Service | None = None  # the cluster's runner service (None: runs go as Ray Jobs of their own)
    repo_root: str = ""  # the project's first commit, when the bundle is made against the cluster's cache
    bundle_commits: int = -1  # how many commits the snapshot's bundle carries (Manifest.bundle_commits)

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
        )


def expand(opts: RunOptions, project: Project) -> list[ExpSpec]:
    """One experiment per combination of a sweep (DVC's own sweep parser); names
    NAME-1..NAME-k as DVC gives them. Every name is checked free."""
    from dvc.utils.hydra import get_hydra_sweeps

    grouped = params.check(project.dvc_root, opts.overrides)
    base = new_run_id()
    if not params.is_sweep(opts.overrides):
        check_exp_name(project, opts.exp_name, opts.force)
        return [ExpSpec(base, opts.exp_name, list(opts.overrides))]
    combos = get_hydra_sweeps(grouped)
    specs = []
    for i, combo in enumerate(combos, 1):
        overrides = [ov if path == "params.yaml" else f"{path}:{ov}" for path, ovs in combo.items() for ov in ovs]
        params.check(project.dvc_root, overrides)
        name = f"{opts.exp_name}-{i}" if opts.exp_name else None
        check_exp_name(project, name, opts.force)
        specs.append(ExpSpec(f"{base}-{i}", name, overrides))
    return specs


def connect(address: str) -> Any:
    """A job client for the cluster at ``address``, once it is known to run a
    dvcray that can run this client's runs.

    Raises:
        ClusterError: it does not answer, refuses the token, or its dvcray differs.
    """
    client = clusters.connect(address)
    clusters.check_version(address, client)
    return client


def reach(address: str, say: Say) -> tuple[Service | None, Any]:
    """The cluster's runner service (started if needed) and None, or where there is
    none, None and a job client (runs go as Ray Jobs of their own).

    Raises:
        ClusterError: the cluster does not answer, refuses the token, or its dvcray differs.
    """
    service = warm.reach(address, say)
    return (service, None) if service is not None else (None, connect(address))


class Source(Protocol):
    """Where a run's experiments come from, when not from the workspace and ``-S``
    (e.g. DVC's queue): their specs, and the snapshot that carries them."""

    def experiments(self, project: Project) -> list[ExpSpec]: ...

    def snapshot(self, project: Project, folder: Path) -> snapshot.Snapshot: ...


def prepare(opts: RunOptions, cwd: Path, say: Say, snapshot_dir: Path, jobs: int | None = None,
            source: Source | None = None) -> Plan:
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
    known = clusters.known_address(opts.address, cwd)
    asked = opts.cpus_per_exp is not None or opts.gpus_per_exp is not None
    early = None
    if known:
        # Reaching the cluster (its runner service, or Ray's SDK) takes a while the first
        # time; do it while DVC reads the project. Its errors surface after DVC's.
        early = concurrent.futures.ThreadPoolExecutor(1).submit(reach, known, say)
    project = find_project(cwd)
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
        service, client = early.result()
    else:
        address, started = clusters.ensure_address(opts.address, cwd, say)
        service, client = reach(address, say)

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
        against = None
        if service is not None:
            # Only what the cluster's copy of the repository lacks travels (DESIGN.md,
            # "Snapshot"): ask it which of HEAD's ancestors it has.
            root, samples = snapshot.history(project.git_root)
            against = warm.have(service, root, samples)
        packed = snapshot.create(project.git_root, project.dvc_root, snapshot_dir, opts.copy_paths, against)
        commits = snapshot.bundle_commits(project.git_root, against)
    return Plan(opts, project, store, address, client, started, experiments, snapshot_dir,
                packed.total, where, packed.flags, service, root, commits)


def launch(plan: Plan, job_id: str, specs: list[ExpSpec], jobs: int = 0, placed: bool = False) -> None:
    """Submit one Ray Job that runs ``specs`` (one experiment, or a sweep's on one node);
    ``placed``: with the resources of ``plan.placement`` (``--cpus-per-exp`` ...).

    Raises:
        ClusterError: the cluster refused the job.
    """
    manifest = plan.manifest(job_id, specs, jobs)
    folder = plan.snapshot_dir
    if plan.service is None and plan.snapshot_bytes > snapshot.via_store_bytes():
        # Too big for a Ray Job's package (Ray refuses one of 512 MiB, warns about
        # files of 10 MiB, and keeps every package in its GCS): the runner fetches it.
        manifest.parts = f"{store_mod.SNAPSHOTS}/{job_id}"
        for part in sorted(folder.iterdir()):
            if part.is_file() and part.name != MANIFEST:
                plan.store.upload(f"{manifest.parts}/{part.name}", part)
        folder = Path(tempfile.mkdtemp(prefix="manifest-", dir=plan.snapshot_dir.parent))
    manifest.write(folder)
    data = (folder / MANIFEST).read_bytes()
    for spec in specs:
        plan.store.write(plan.store.run_path(spec.run_id, MANIFEST), data)
    if plan.service is not None:
        _send(plan, folder, placed)
    else:
        _submit_job(plan, folder, job_id, specs, placed)
    for spec in specs:
        RunRecord(run_id=spec.run_id, job_id=job_id, address=plan.address, store=plan.store.to_json(),
                  exp_name=spec.exp_name, baseline=spec.baseline or plan.project.baseline, submitted=time.time(),
                  state=RunState.PENDING, service=plan.service.service_id if plan.service else "",
                  ).save(plan.project.git_root)


def _send(plan: Plan, folder: Path, placed: bool) -> None:
    """Hand the snapshot to the runner service; with the whole history when the cluster's
    copy of the repository lacks what the bundle was made against (wiped, rewritten)."""
    where = plan.placement if placed and plan.placement is not None and plan.placement.placed else None
    shape = ",".join(f"{k}={v:g}" for k, v in (("CPU", where.num_cpus), ("GPU", where.num_gpus),
                                               *(where.resources or {}).items()) if v is not None) if where else ""
    try:
        try:
            warm.send(plan.service, folder, shape)
        except warm.MissingCommits:
            snapshot.write_bundle(plan.project.git_root, folder / snapshot.BUNDLE, None)
            warm.send(plan.service, folder, shape)
    except (ServiceError, warm.MissingCommits) as exc:
        raise ClusterError(f"Could not hand the run to dvcray's runner service on the cluster at {plan.address}: "
                           f"{exc}", "Check the cluster: dvcray cluster status (DVCRAY_SERVICE=0 runs it as a "
                           "Ray Job instead)") from None


def _submit_job(plan: Plan, folder: Path, job_id: str, specs: list[ExpSpec], placed: bool) -> None:
    resources = plan.placement.submit_options() if placed and plan.placement is not None else {}
    try:
        plan.client.submit_job(
            entrypoint="python -m dvcray_cli.runner",
            submission_id=job_id,
            runtime_env={
                "working_dir": os.fspath(folder),
                "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(ray_api.stop_grace_s()), "PYTHONUNBUFFERED": "1"},
            },
            metadata={"dvcray_version": __version__, "baseline": plan.project.baseline, "run_id": job_id,
                      "exp_name": ",".join(s.exp_name or "" for s in specs),
                      "run_ids": ",".join(s.run_id for s in specs)},
            **resources,
        )
    except Exception as exc:
        raise ClusterError(f"Could not submit the run to the cluster at {plan.address}: {exc}",
                           "Check the cluster: dvcray cluster status") from exc


def submit(opts: RunOptions, cwd: Path, say: Say) -> Submitted:
    """Preflight, then snapshot the workspace and submit one experiment as a Ray Job.

    Raises:
        UsageError: a sweep (those go through ``sweep.run_sweep``), or anything preflight refuses.
        ClusterError, StoreError: the cluster or the store is unfit.
    """
    if params.is_sweep(opts.overrides):
        raise UsageError("A sweep runs through run_sweep, not submit.")
    with tempfile.TemporaryDirectory(prefix="dvcray-snapshot-") as tmp:
        plan = prepare(opts, cwd, say, Path(tmp))
        spec = plan.experiments[0]
        launch(plan, spec.run_id, [spec], placed=True)
    return Submitted(spec.run_id, plan.address, plan.store, spec.exp_name, plan.project.baseline,
                     plan.started_cluster, plan.snapshot_bytes, plan.client, plan.project, plan.service)
