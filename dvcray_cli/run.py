"""``dvcray run``: preflight, snapshot, submit, follow, and bring the experiment home.

Everything that can be checked is checked before anything is submitted or
changed (DESIGN.md, "The run lifecycle").
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from dvcray_cli import __version__, gitutil, params, records, snapshot
from dvcray_cli.errors import ClusterError, ExperimentFailed, Interrupted, UsageError
from dvcray_cli.store import REMOTE_NAME, Store

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Seconds the runner gets after SIGTERM to push outputs, the log and result.json.
STOP_GRACE_S = int(os.environ.get("DVCRAY_STOP_GRACE_S", "60"))
# How long the client keeps trying to reach a cluster that stopped answering.
RECONNECT_TIMEOUT_S = float(os.environ.get("DVCRAY_RECONNECT_TIMEOUT_S", "60"))
# A job status that takes longer than this counts as no answer.
STATUS_TIMEOUT_S = 10.0


@dataclass
class RunOptions:
    targets: list[str] = field(default_factory=list)
    exp_name: str | None = None
    overrides: list[str] = field(default_factory=list)
    address: str | None = None
    store: str | None = None
    force: bool = False
    downstream: bool = False
    message: str | None = None
    pull: bool = False
    allow_missing: bool = False
    copy_paths: list[str] = field(default_factory=list)
    cpus_per_exp: float | None = None  # reserve for each runner: Ray places it where there is room
    gpus_per_exp: float | None = None


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


@dataclass
class Submitted:
    run_id: str
    address: str
    store: Store
    exp_name: str | None
    baseline: str
    started_cluster: bool = False
    snapshot_bytes: int = 0
    client: Any = field(default=None, repr=False)  # the JobSubmissionClient that submitted it
    project: Project | None = field(default=None, repr=False)  # where it comes home


@dataclass
class Outcome:
    run_id: str
    status: str
    exp_name: str | None = None
    ref: str | None = None
    exp_sha: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    store: str = ""
    applied: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def new_run_id() -> str:
    return time.strftime("dvcray-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


# --------------------------------------------------------------------------- preflight

def find_project(start: Path) -> Project:
    """The git and DVC project that holds ``start``, checked as ``dvc exp run`` needs it."""
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


def exp_ref(baseline: str, name: str) -> str:
    return f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"


def check_exp_name(project: Project, name: str | None, force: bool) -> None:
    if not name:
        return
    if "/" in name or _ref_format_fails(project, name):
        raise UsageError(f"'{name}' is not a valid experiment name.",
                         "Use letters, digits, '-', '_' and '.'; no spaces or slashes.")
    ref = exp_ref(project.baseline, name)
    if gitutil.git("rev-parse", "--verify", "-q", ref, cwd=project.git_root, check=False) and not force:
        raise UsageError(f"Experiment '{name}' already exists for this baseline ({project.baseline[:7]}).",
                         "Pick another --exp-name, or pass -f to replace it.")


def _ref_format_fails(project: Project, name: str) -> bool:
    import subprocess

    return subprocess.run(["git", "check-ref-format", f"refs/exps/{name}"],
                          cwd=project.git_root, capture_output=True).returncode != 0


def open_repo(project: Project, store: Store | None = None):
    """DVC's Repo for the project; with ``store``, that store as an in-memory
    default remote, so the user's DVC config is never changed."""
    from dvc.repo import Repo

    return Repo(os.fspath(project.dvc_root), config=store.dvc_config() if store else None)


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
        from dvcray_cli.errors import StoreError

        raise StoreError(f"Could not push input data to the store: {exc}") from exc


# --------------------------------------------------------------------------- cluster

def _known_address(explicit: str | None) -> str | None:
    """``--address``, ``RAY_ADDRESS``, this repo's AWS cluster (through its
    port-forward) or the recorded cluster on this machine (``local`` or
    ``local-multinode``, the one started last); None if a cluster would have
    to be started."""
    if explicit or os.environ.get("RAY_ADDRESS"):
        return explicit or os.environ["RAY_ADDRESS"]
    from dvcray_cli import aws, cluster

    in_aws = aws.recorded_address(Path.cwd())
    if in_aws:
        return in_aws
    current = cluster.current()
    return current.dashboard_url if current else None


def resolve_address(explicit: str | None, on_start: Callable[[str], None] | None = None) -> tuple[str, bool]:
    """Where to submit: ``--address``, ``RAY_ADDRESS``, the recorded local
    cluster, else a local cluster started now (the embedded default)."""
    known = _known_address(explicit)
    if known:
        return known, False
    from dvcray_cli import cluster

    if on_start:
        on_start("No cluster configured: starting a local Ray cluster on this machine "
                 "(stop it with: dvcray cluster down local).")
    started, _ = cluster.up("local")
    return started.dashboard_url, True


def connect(address: str):
    import logging

    from dvcray_cli import cluster

    client = cluster.job_client(address)
    # Ray's SDK logs each package upload and websocket close at INFO.
    for name in ["ray", *(n for n in logging.root.manager.loggerDict if n.startswith("ray."))]:
        logging.getLogger(name).setLevel(logging.WARNING)
    return client


# --------------------------------------------------------------------------- submit

def _read_project(project: Project, opts: RunOptions) -> tuple[Store, bool]:
    """Load the pipeline as DVC sees it (a broken dvc.yaml fails here), pick the
    store, and tell whether ``.dvc`` files track inputs that may need pushing."""
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
            return store_mod.resolve(opts.store, repo), has_inputs
        finally:
            repo.close()
    except DvcException as exc:
        raise UsageError(f"DVC cannot read the project: {exc}",
                         "Fix it until dvc status works, then rerun.") from None


@dataclass
class ExpSpec:
    """One experiment of a run: its run id (its records' folder) and overrides."""

    run_id: str
    exp_name: str | None
    overrides: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "exp_name": self.exp_name, "overrides": self.overrides}


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
    placement: Any = None  # placement.Placement: how runners are submitted (--cpus-per-exp ...)

    def manifest(self, job_id: str, specs: list[ExpSpec], jobs: int = 0) -> snapshot.Manifest:
        opts, project = self.opts, self.project
        one = specs[0] if len(specs) == 1 else None
        return snapshot.Manifest(
            run_id=one.run_id if one else job_id, baseline=project.baseline, subdir=project.subdir,
            exp_name=one.exp_name if one else None, overrides=list(one.overrides) if one else [],
            targets=list(opts.targets),
            options={"force": opts.force, "downstream": opts.downstream, "message": opts.message,
                     "pull": opts.pull, "allow_missing": opts.allow_missing},
            copy_paths=list(opts.copy_paths), git_name=project.identity[0], git_email=project.identity[1],
            store=self.store.to_json(), dvcray_version=__version__, created=time.time(), address=self.address,
            experiments=[] if one else [s.to_json() for s in specs], jobs=jobs,
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


def prepare(opts: RunOptions, cwd: Path, say: Callable[[str], None], snapshot_dir: Path,
            jobs: int | None = None) -> Plan:
    """Preflight (every check before anything is submitted), then snapshot the workspace.
    ``jobs``: a sweep's ``--jobs``, for the placement of its runners."""
    import concurrent.futures

    known = _known_address(opts.address)
    early = None
    if known:
        # Importing Ray's SDK and asking the cluster take a second; do it while
        # DVC reads the project. Its errors surface after DVC's, in the same order.
        early = concurrent.futures.ThreadPoolExecutor(1).submit(connect, known)
    project = find_project(cwd)
    experiments = expand(opts, project)
    store, has_inputs = _read_project(project, opts)
    store.check_writable()

    if early is not None:
        address, started, client = known, False, early.result()
    else:
        address, started = resolve_address(opts.address, say)
        client = connect(address)

    from dvcray_cli import placement

    where = placement.decide(address, opts.cpus_per_exp, opts.gpus_per_exp, store.is_local, store.url,
                             len(experiments), jobs)
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
    sizes = snapshot.create(project.git_root, project.dvc_root, snapshot_dir, opts.copy_paths)
    return Plan(opts, project, store, address, client, started, experiments, snapshot_dir,
                sum(sizes.values()), where)


def launch(plan: Plan, job_id: str, specs: list[ExpSpec], jobs: int = 0, placed: bool = False) -> None:
    """Submit one Ray Job that runs ``specs`` (one experiment, or a sweep's on one node);
    ``placed``: with the resources of ``plan.placement`` (``--cpus-per-exp`` ...)."""
    manifest = plan.manifest(job_id, specs, jobs)
    folder = plan.snapshot_dir
    manifest.write(folder)
    data = (folder / snapshot.MANIFEST).read_bytes()
    for spec in specs:
        plan.store.write(plan.store.run_path(spec.run_id, "manifest.json"), data)
    resources = plan.placement.submit_options() if placed and plan.placement is not None else {}
    try:
        plan.client.submit_job(
            entrypoint="python -m dvcray_cli.runner",
            submission_id=job_id,
            runtime_env={
                "working_dir": os.fspath(folder),
                "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S), "PYTHONUNBUFFERED": "1"},
            },
            metadata={"dvcray_version": __version__, "baseline": plan.project.baseline, "run_id": job_id,
                      "exp_name": ",".join(s.exp_name or "" for s in specs)},
            **resources,
        )
    except Exception as exc:
        raise ClusterError(f"Could not submit the run to the cluster at {plan.address}: {exc}",
                           "Check the cluster: dvcray cluster status") from exc
    for spec in specs:
        records.save(plan.project.git_root, {
            "run_id": spec.run_id, "job_id": job_id, "address": plan.address, "store": plan.store.to_json(),
            "exp_name": spec.exp_name, "baseline": plan.project.baseline, "submitted": time.time(),
            "state": "PENDING",
        })


def submit(opts: RunOptions, cwd: Path, say: Callable[[str], None]) -> Submitted:
    """Preflight, then snapshot the workspace and submit one experiment as a Ray Job."""
    if params.is_sweep(opts.overrides):
        raise UsageError("A sweep runs through run_sweep, not submit.")
    with tempfile.TemporaryDirectory(prefix="dvcray-snapshot-") as tmp:
        plan = prepare(opts, cwd, say, Path(tmp))
        spec = plan.experiments[0]
        launch(plan, spec.run_id, [spec], placed=True)
    return Submitted(spec.run_id, plan.address, plan.store, spec.exp_name, plan.project.baseline,
                     plan.started_cluster, plan.snapshot_bytes, plan.client, plan.project)


# --------------------------------------------------------------------------- follow

class JobLog:
    """What of a job's log has been shown. Ray sends a job's log from the start
    on every tail, so after a dropped connection the client reconnects and skips
    what it has already shown: nothing is lost or repeated."""

    def __init__(self, client, job_id: str, emit: Callable[[str], None]) -> None:
        self.client, self.job_id, self.emit = client, job_id, emit
        self.shown = 0

    def _show(self, text: str, position: int) -> int:
        end = position + len(text)
        if end > self.shown:
            self.emit(text[self.shown - position:] if self.shown > position else text)
            self.shown = end
        return end

    async def tail_forever(self) -> None:
        import asyncio

        while True:
            position = 0
            try:
                async for chunk in self.client.tail_job_logs(self.job_id):
                    position = self._show(chunk, position)
            except asyncio.CancelledError:
                raise
            except Exception:
                pass  # a dropped connection: reconnect and skip what was shown
            await asyncio.sleep(0.5)

    async def drain(self) -> None:
        """Show the last lines, which the tail may not have delivered yet."""
        import asyncio

        try:
            self._show(await asyncio.to_thread(self.client.get_job_logs, self.job_id), 0)
        except Exception:
            pass


async def _call(func: Callable[..., Any], *args: Any, timeout: float) -> Any:
    """``func(*args)`` in a daemon thread, given up after ``timeout`` (TimeoutError).

    A dashboard whose GCS died answers a job's status only after the GCS RPC
    times out (measured: 30 s); a daemon thread left waiting for it does not hold
    up the exit, as a thread of ``asyncio.to_thread`` would.
    """
    import asyncio
    import threading

    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def work() -> None:
        try:
            outcome = (True, func(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the loop is gone: nobody waits for this any more

    threading.Thread(target=work, daemon=True).start()
    return await asyncio.wait_for(future, timeout)


class StatusWatch:
    """Ray's tail notices the end of a job only after a second of sleep
    (LOG_TAIL_SLEEP_S); polling the status ends the wait at once. A cluster
    that stops answering for RECONNECT_TIMEOUT_S is a ClusterError."""

    def __init__(self, client, hint: str) -> None:
        self.client, self.hint = client, hint
        self.lost_since: float | None = None

    async def statuses(self, job_ids) -> dict[str, str] | None:
        """``{job_id: status}``, or None while the cluster does not answer (wait and ask again)."""
        import asyncio

        try:
            found = {j: str((await _call(self.client.get_job_status, j, timeout=STATUS_TIMEOUT_S)).value)
                     for j in job_ids}
        except Exception as exc:
            self.lost_since = self.lost_since or time.time()
            error = await asyncio.to_thread(lost_contact, self.client.get_address(), list(job_ids), exc,
                                            self.lost_since)
            if error is not None:
                raise error from None
            await asyncio.sleep(1.0)
            return None
        self.lost_since = None
        return found


def lost_contact(address: str, run_ids: list[str], exc: BaseException, since: float) -> ClusterError | None:
    """The error to end on once the cluster stopped answering; None to keep trying.

    At once when ``address`` is a cluster dvcray started on this machine and its
    GCS is gone (it died: nothing will come back); otherwise after
    ``DVCRAY_RECONNECT_TIMEOUT_S`` (default 60) without an answer.
    """
    from dvcray_cli import cluster

    runs = ", ".join(run_ids)
    first = run_ids[0] if len(run_ids) == 1 else "RUN"
    where = f"Its log up to then is in the store: dvcray logs {first}; dvcray runs shows what became of it."
    dead = cluster.dead_at(address)
    if dead is not None:
        return ClusterError(f"The Ray cluster {dead.name!r} at {address} died during run {runs}: "
                            "its GCS process is gone, and the run with it.", where)
    if time.time() - since <= RECONNECT_TIMEOUT_S:
        return None
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
    return ClusterError(f"Lost contact with the Ray cluster at {address} for {RECONNECT_TIMEOUT_S:.0f} s "
                        f"while following run {runs} ({reason}). If the cluster died, the run is lost.",
                        f"The run may still be going if the cluster comes back. {where}")


def follow(client, run_id: str, emit: Callable[[str], None], stop_on_interrupt: bool = True) -> str:
    """Stream the job's log until the job ends; return its final status.

    Ctrl-C (or SIGTERM) stops the job and raises Interrupted once it has ended;
    with ``stop_on_interrupt=False`` (``dvcray logs --follow``, which only
    watches) it stops following and leaves the job be.
    """
    import asyncio

    log = JobLog(client, run_id, emit)
    watch = StatusWatch(client, f"The run may still be going: dvcray runs, dvcray logs {run_id}")

    async def main() -> str:
        tail = asyncio.create_task(log.tail_forever())
        try:
            while True:
                found = await watch.statuses([run_id])
                if found and found[run_id] in TERMINAL:
                    break
                await asyncio.sleep(0.2)
        finally:
            tail.cancel()
        await log.drain()
        return found[run_id]

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        if not stop_on_interrupt:
            raise Interrupted(f"Stopped following run {run_id}; the run itself goes on.",
                              f"Follow it again: dvcray logs {run_id} --follow") from None
        stop_jobs(client, [run_id])
        raise Interrupted(f"Interrupted: run {run_id} was stopped.",
                          f"Its log and what it produced are in the store: dvcray logs {run_id}") from None


def stop_jobs(client, job_ids: list[str]) -> None:
    """Stop jobs and wait until each has ended (the runners save their work first)."""
    import signal

    # A second Ctrl-C while stopping should not leave a job running.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for job_id in job_ids:
            try:
                client.stop_job(job_id)
            except Exception:
                pass
        deadline = time.time() + STOP_GRACE_S + 10
        for job_id in job_ids:
            while time.time() < deadline:
                try:
                    if str(client.get_job_status(job_id).value) in TERMINAL:
                        break
                except Exception:
                    break
                time.sleep(0.3)
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- finish

def fetch_result(store: Store, run_id: str, wait_s: float = 10) -> dict[str, Any] | None:
    """The runner's result.json (it is written before the job ends)."""
    deadline = time.time() + wait_s
    while True:
        result = store.read_json(store.run_path(run_id, "result.json"))
        if result is not None or time.time() > deadline:
            return result
        time.sleep(0.5)


def import_experiment(git_root: Path, store: Store, run_id: str, ref: str) -> None:
    """Fetch the experiment ref from the bundle the runner saved (never DVC's internal refs)."""
    with tempfile.TemporaryDirectory(prefix="dvcray-bundle-") as tmp:
        bundle = Path(tmp) / "exp.bundle"
        store.download(store.run_path(run_id, "exp.bundle"), bundle)
        gitutil.git("fetch", "-q", "--force", os.fspath(bundle), f"+{ref}:{ref}", cwd=git_root)


def pull_outputs(project: Project, store: Store, exp_sha: str) -> int:
    """Bring an experiment's outputs from the store into the local DVC cache."""
    repo = open_repo(project, store)
    try:
        return repo.fetch(revs=[exp_sha], remote=REMOTE_NAME)
    except Exception as exc:
        from dvcray_cli.errors import StoreError

        raise StoreError(f"Could not fetch the experiment's outputs from {store.url}: {exc}") from exc
    finally:
        repo.close()


def finish(sub: Submitted, status: str, apply: bool = False) -> Outcome:
    """Bring a finished run home: the experiment ref, and with ``apply`` its outputs too."""
    project = sub.project
    result = fetch_result(sub.store, sub.run_id, wait_s=10 if status == "SUCCEEDED" else 3) or {}
    outcome = Outcome(
        run_id=sub.run_id, status=result.get("status", status), exp_name=result.get("exp_name"),
        ref=result.get("ref"), exp_sha=result.get("exp_sha"), params=result.get("params") or {},
        metrics=result.get("metrics") or {}, error=result.get("error"), store=sub.store.url,
        timings=result.get("timings") or {},
    )
    records.update(project.git_root, sub.run_id, state=outcome.status, exp_name=outcome.exp_name)
    if status != "SUCCEEDED" or outcome.status != "SUCCEEDED":
        if not result:
            outcome.status = status
            outcome.error = outcome.error or "the runner ended without a result (see the log above)"
        return outcome
    if not outcome.ref:
        outcome.status = "FAILED"
        outcome.error = "the runner reported success but saved no experiment"
        return outcome
    import_experiment(project.git_root, sub.store, sub.run_id, outcome.ref)
    if apply:
        pull_outputs(project, sub.store, outcome.exp_sha or outcome.ref)
        repo = open_repo(project, sub.store)
        try:
            repo.experiments.apply(outcome.exp_name)
        finally:
            repo.close()
        outcome.applied = True
    return outcome


def raise_for(outcome: Outcome) -> None:
    if outcome.status == "SUCCEEDED":
        return
    if outcome.status == "STOPPED":
        raise Interrupted(f"Run {outcome.run_id} was stopped.",
                          f"Its log: dvcray logs {outcome.run_id}")
    raise ExperimentFailed(f"The experiment failed: {outcome.error or 'see the log above'}",
                           f"Its log stays in the store: dvcray logs {outcome.run_id}")
