"""The runner: the Ray Job entrypoint that runs one experiment on the cluster.

``python -m dvcray_cli.runner`` runs in the job's working_dir (the snapshot).
It rebuilds the workspace in a folder of its own, runs ``dvc exp run`` through
DVC's Python API (one process: DESIGN.md measures the cost of a chain of CLI
calls), uploads its log to the store as it grows, saves each stage to the store as it
finishes (``runs/resume.py``), and at the end, whatever happened (SIGTERM included),
pushes outputs and run-cache, a bundle of the experiment ref and ``result.json``.

A retry of a run lost with its machine (``ExpSpec.attempt`` above 1) restores the
stages earlier attempts saved, writes its log under ``attempt-N/`` of the run's store
folder, and a lost attempt that will be retried leaves the run's own ``result.json`` and
``status.json`` to the next one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from dvcray_cli import files
from dvcray_cli.gitutil import git
from dvcray_cli.runs import live, parts, resume, snapshot, stage_env
from dvcray_cli.runs.logtee import LogTee, made_line
from dvcray_cli.runs.project import shown_files
from dvcray_cli.runs.model import (BUNDLE, LOG, RESULT, STATUS, ExpRef, ExpSpec, Manifest, RunResult,
                                   RunState, RunStatus)
from dvcray_cli.service.protocol import LOST_EXIT, Attempt, attempts_of, losses_text
from dvcray_cli.store import REMOTE_NAME, Store

# Each step of the end-of-run save is tried this often before it is reported as failed.
SAVE_ATTEMPTS = 3
BUNDLE_STEP = "the experiment's bundle"


class Terminated(BaseException):
    """SIGTERM from ``dvcray stop``, Ctrl-C on the client, or Ray."""


# Written by the runner service into a snapshot folder before it stops the folder's
# runs because their cluster died (its GCS stopped answering): the runs are LOST.
CLUSTER_GONE = "CLUSTER-GONE"


def _cluster_gone(here: Path) -> str | None:
    """Why the runner service stopped this run for its cluster's death, or None."""
    try:
        why = (here / CLUSTER_GONE).read_text(errors="replace").strip()
    except OSError:
        return None
    return why or "its cluster died mid-run"


def runner_dir() -> Path:
    return Path(os.environ.get("DVCRAY_RUNNER_DIR") or Path.home() / ".cache" / "dvcray")


def say(msg: str) -> None:
    print(f"dvcray: {msg}", flush=True)


def configure_dvc(ws: Path, store: Store) -> None:
    """The store as the clone's default remote and the node's shared cache, both
    in ``.dvc/config.local`` so nothing of it lands in the experiment's commit."""
    from dvc.config import Config

    config = Config(dvc_dir=os.fspath(ws / ".dvc"), validate=False)
    cache = runner_dir() / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    with config.edit("local") as conf:
        conf.setdefault("remote", {})[REMOTE_NAME] = store.remote_config()
        conf.setdefault("core", {})["remote"] = REMOTE_NAME
        conf.setdefault("cache", {})["dir"] = os.fspath(cache)
        conf["cache"]["shared"] = "group"


def storage_env(store: Store, run_id: str) -> None:
    """Tell stages where Ray Tune and Train may keep checkpoints that every node reaches
    (the store: ``dvcray_cli.integrations.storage``; a local store is a folder of the one
    machine its cluster runs on), the run they belong to (its attempts resume from them),
    and the store's S3 endpoint, if it has its own, where pyarrow (Ray's storage) looks for it."""
    from dvcray_cli.integrations.storage import RUN_VAR, STORE_VAR

    os.environ[RUN_VAR] = run_id
    os.environ.setdefault(STORE_VAR, f"{store.url.rstrip('/')}/dvcray/ray")
    if store.is_local:
        return
    endpoint = str(store.options.get("endpointurl") or "")
    if endpoint and store.url.startswith("s3://"):
        os.environ.setdefault("AWS_ENDPOINT_URL_S3", endpoint)


def experiment_ref(ws: Path, baseline: str, exp_sha: str | None, name: str | None) -> ExpRef | None:
    """The experiment ``dvc exp run`` made: ``refs/exps/XX/SHA/NAME`` of ``baseline``.

    DVC's internal refs (``refs/exps/stash``, ``exec``, ...) carry pickled run
    variables, a Studio token included: they are never taken.
    """
    out = git("for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/", cwd=ws)
    for line in out.splitlines():
        refname, sha = line.split()
        ref = ExpRef.parse(refname)
        if ref is None or ref.baseline != baseline:
            continue
        if (exp_sha and sha == exp_sha) or (name and ref.name == name):
            return ref
    return None


def pull_inputs(repo) -> None:
    """Data tracked by ``.dvc`` files comes from the store (the client pushed it
    there); the node's shared cache makes this a checkout after the first run."""
    from dvc.stage import PipelineStage

    inputs = [s.addressing for s in repo.index.stages if not isinstance(s, PipelineStage) and s.outs]
    if inputs:
        t = time.time()
        repo.pull(targets=inputs)
        say(f"inputs ready: {', '.join(inputs)} ({time.time() - t:.1f}s)")


def _flatten(prefix: str, value: Any, into: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, into)
    else:
        into[prefix] = value


def collect(repo, kind: str) -> dict[str, dict[str, Any]]:
    """Workspace params or metrics as ``{file: {dotted.key: value}}``."""
    try:
        shown = (repo.params.show() if kind == "params" else repo.metrics.show())
    except Exception:
        return {}
    data = shown.get("", {}).get("data", {})
    result: dict[str, dict[str, Any]] = {}
    for file, entry in data.items():
        flat: dict[str, Any] = {}
        _flatten("", entry.get("data", {}), flat)
        result[file] = flat
    return result


def _check_version(client_version: str) -> None:
    """Client and cluster must agree on the snapshot and store formats (the client
    checks before it submits; this is the last line of defence)."""
    from dvcray_cli import __version__, compatible

    if client_version and not compatible(client_version):
        raise RuntimeError(f"this cluster runs dvcray {__version__} but the client is dvcray "
                           f"{client_version}: install the same version on both")


def main() -> int:
    """Run the manifest's experiment, or a sweep's experiments side by side."""
    problem = snapshot.interpreter_problem()
    if problem:
        say(problem)
        return 3
    here = Path.cwd()
    manifest = Manifest.read(here)
    specs = manifest.specs()
    if manifest.parts:
        try:
            here = parts.fetch(here, manifest, runner_dir() / "snapshots" / manifest.run_id, say)
        except RuntimeError as exc:
            return _refused(manifest, specs, str(exc))
    try:
        if len(specs) == 1:
            return run_experiment(here, manifest, specs[0])
        return _run_many(here, manifest, specs)
    finally:
        if manifest.parts:
            shutil.rmtree(here, ignore_errors=True)


def _refused(manifest: Manifest, specs: list[ExpSpec], why: str) -> int:
    """End every experiment of the job FAILED with ``why``, before anything of it ran."""
    print(f"dvcray: {why}", file=sys.stderr, flush=True)
    store = Store.from_json(manifest.store)
    for spec in specs:
        result = RunResult(run_id=spec.run_id, exp_name=spec.exp_name, baseline=manifest.baseline,
                           overrides=spec.overrides, status=RunState.FAILED, error=why, node=socket.gethostname(),
                           started=time.time(), ended=time.time(), dvcray_version=manifest.dvcray_version)
        try:
            store.write(store.run_path(spec.run_id, RESULT), json.dumps(result.to_json(), default=str).encode())
        except Exception as exc:  # noqa: BLE001 - the job's log says why it failed
            print(f"dvcray: could not save {RESULT}: {exc}", file=sys.stderr, flush=True)
    return 1


def _run_many(here: Path, manifest: Manifest, specs: list[ExpSpec]) -> int:
    """One process per experiment, forked after DVC is imported, so a sweep pays
    for one interpreter and one import of DVC (DESIGN.md: the runner's own CPU
    is what limits a small head). At most ``manifest.jobs`` at once."""
    import dvc.repo  # noqa: F401 - imported once, shared by the forks
    import dvc.repo.experiments  # noqa: F401

    # Ray's stop sends SIGTERM to every process of the job: the children save
    # their own work; this one waits for them.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    limit = max(1, manifest.jobs or len(specs))
    pending = list(specs)
    running: dict[int, str] = {}
    failed = []
    while pending or running:
        while pending and len(running) < limit:
            spec = pending.pop(0)
            pid = os.fork()
            if pid == 0:  # the child
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                code = 1
                try:
                    code = run_experiment(here, manifest, spec, prefix=f"[{spec.exp_name or spec.run_id}] ")
                finally:
                    os._exit(code)
            running[pid] = spec.run_id
        pid, status = os.wait()
        run_id = running.pop(pid, None)
        if run_id and os.waitstatus_to_exitcode(status) != 0:
            failed.append(run_id)
    return 1 if failed else 0


def run_experiment(here: Path, manifest: Manifest, spec: ExpSpec, prefix: str = "", forked: bool = False) -> int:
    """Rebuild the workspace, run one experiment, save everything; return an exit code
    (0, 1 its stage failed, 143 stopped, ``LOST_EXIT`` lost with its runner or cluster).
    ``forked``: by the runner service or a node's warm runner (``forks``), whose death sends
    it SIGTERM; elsewhere (a Ray Job) a SIGTERM is a stop, its shell parent going with it."""
    store = Store.from_json(manifest.store)
    run_id, exp_name, overrides, attempt = spec.run_id, spec.exp_name, spec.overrides, spec.attempt
    if spec.own_workspace:  # from DVC's queue: its own baseline, changes and dvc exp run options
        manifest = dataclasses.replace(manifest, baseline=spec.baseline or manifest.baseline,
                                       targets=list(spec.options.get("targets") or manifest.targets),
                                       options={**manifest.options, **spec.options})
    job_dir = Path.cwd()  # a Ray Job's package: on the runner's PYTHONPATH, not the stage's
    # Its own folder per attempt: a lost attempt's runner may still be saving on this node.
    # The run's workspace and log are this user's alone on a shared node (issue 20, point 10).
    work = files.private_dir(runner_dir() / "runs") / (run_id if attempt == 1 else f"{run_id}.attempt-{attempt}")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(mode=0o700)
    tee = LogTee(work / LOG, store, run_id, prefix, attempt)

    def _on_term(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, _on_term)
    parent = os.getppid()
    result = RunResult(run_id=run_id, exp_name=exp_name, baseline=manifest.baseline, overrides=overrides,
                       status=RunState.FAILED, node=socket.gethostname(), started=time.time(),
                       ray_node=os.environ.get("DVCRAY_RAY_NODE", ""),
                       dvcray_version=manifest.dvcray_version, attempt=attempt)
    before = attempts_of(spec.before)
    if before:
        say(f"attempt {attempt} of at most {manifest.retries + 1}, on {result.node} (after {before[-1].text()})")
    repo = None
    capture = None
    saver = None
    retryable = False  # lost in a way the runner service retries (its machine or warm runner went)
    ws = work / "repo"

    def beat() -> None:
        status = RunStatus(RunState.RUNNING, result.started, node=result.node, heartbeat=time.time(), attempt=attempt)
        store.write(store.run_path(run_id, STATUS), json.dumps(status.to_json()).encode())

    try:
        _check_version(manifest.dvcray_version)
        beat()
        tee.heartbeat = beat
        t = time.time()
        cache = snapshot.cache_path(runner_dir(), manifest.repo_root) if manifest.repo_root else None
        dvc_root = snapshot.restore(here, ws, manifest, spec.patch, cache)
        configure_dvc(dvc_root, store)
        result.timings["restore"] = time.time() - t
        say(f"workspace ready at baseline {manifest.baseline[:7]} ({result.timings['restore']:.1f}s)")

        os.environ["DVCRAY_WORKSPACE"] = os.fspath(dvc_root)
        # The stage's environment: the node's, plus the run's variables and PYTHONPATH (runs/stage_env.py).
        to_set, to_unset = stage_env.for_stage(manifest.env, manifest.pythonpath, dvc_root, os.environ, job_dir)
        os.environ.update(to_set)
        for name in to_unset:
            os.environ.pop(name, None)
        names, rels = to_set[stage_env.ENV_VAR], to_set[stage_env.PYTHONPATH_VAR]
        if names or rels:
            say(f"the stage's variables: {names.replace(',', ', ') or 'none'}; PYTHONPATH in the project: "
                f"{rels.replace(os.pathsep, ', ') or 'none'}")
        os.environ["RAY_RUNTIME_ENV_HOOK"] = "dvcray_cli.integrations.runtime_env.hook"
        os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
        # DVC and DVCLive post their live updates to the runner, as they would to Studio (runs/live.py).
        capture = live.Capture(store, run_id, resume=attempt > 1)
        os.environ.update(capture.env())
        storage_env(store, run_id)
        os.chdir(dvc_root)

        from dvc.repo import Repo

        repo = Repo(os.fspath(dvc_root))
        pull_inputs(repo)
        if attempt > 1:
            resume.restore_saved(repo, store, run_id, attempt, say)
        saver = resume.StageSaver(dvc_root, store, run_id, attempt, say)
        saver.install()
        opts = manifest.options
        t = time.time()
        results = repo.experiments.run(
            targets=manifest.targets or None,
            params=overrides or None,
            name=exp_name,
            message=opts.get("message"),
            force=bool(opts.get("force")),
            downstream=bool(opts.get("downstream")),
            pull=bool(opts.get("pull")),
            allow_missing=bool(opts.get("allow_missing")),
        )
        result.timings["exp_run"] = time.time() - t
        result.exp_sha = next(iter(results), None)
        result.status = RunState.SUCCEEDED
    except Terminated:
        gone = _cluster_gone(here)
        if gone or (forked and os.getppid() != parent):
            # Not a stop anyone asked for, nor the experiment's failure: the runner service
            # stops its runs because their cluster died under them, or the process this one
            # ran under (the runner service, a node's warm runner) died and took it down with
            # it (forks.die_with_parent). Its stage goes too.
            result.status = RunState.LOST
            result.error = gone or "dvcray's runner on this node went away mid-run (its process was killed)"
            # Placed on a node's warm runner (``service/placed.py`` names the node): the runner
            # service lives on and submits it again. On the head, the service itself went.
            retryable = not gone and bool(os.environ.get("DVCRAY_RAY_NODE"))
            _end_stage()
            say(f"{result.error}: saving what the run produced")
        else:
            result.status = RunState.STOPPED
            result.error = "stopped (SIGTERM)"
            say("stopped: saving what the run produced")
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        cause = exc.__cause__
        if cause:
            result.error += f" ({type(cause).__name__}: {cause})"
        print(f"dvcray: the experiment failed: {result.error}", file=sys.stderr, flush=True)
        if os.environ.get("DVCRAY_DEBUG"):
            traceback.print_exc()
    finally:
        # Ignore further SIGTERMs while saving: Ray gives the job a grace period.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        retried = retryable and attempt <= manifest.retries
        if capture is not None and retried:
            capture.abandon()  # the next attempt carries the live updates on
        result.attempts = [*before, Attempt(attempt, result.node, result.started, None, result.status,
                                            result.error if result.status == RunState.LOST else "")] \
            if before or result.status == RunState.LOST else []
        if result.status == RunState.LOST and before:
            result.error = losses_text(result.attempts)
        try:
            if saver is not None:
                saver.close()
            _save(repo, ws, store, manifest.baseline, exp_name, result, tee, None if retried else capture,
                  final=not retried, pushed=saver.entries if saver is not None else set())
        finally:
            if repo is not None:
                repo.close()
            os.chdir(here)
            if result.workspace is None:
                shutil.rmtree(work, ignore_errors=True)
    return {RunState.SUCCEEDED: 0, RunState.STOPPED: 143, RunState.LOST: LOST_EXIT}.get(result.status, 1)


def _end_stage() -> None:
    """SIGTERM to this runner's process group (its stage's processes): a runner that lost
    its parent is the group's leader (``forks``, or a Ray Job's entrypoint), and its stage
    must not run on, writing to a workspace nobody will save, beside its retry."""
    if os.getpgrp() == os.getpid():
        try:
            os.killpg(os.getpgrp(), signal.SIGTERM)  # this process ignores it (saving)
        except OSError:
            pass


def _attempt(what: str, step, errors: dict[str, str]) -> bool:
    """Run one save step, retried; on failure record it in ``errors`` and say so. Never raises."""
    for attempt in range(SAVE_ATTEMPTS):
        try:
            step()
            return True
        except Exception as exc:  # noqa: BLE001 - every step is tried, each failure reported
            if attempt == SAVE_ATTEMPTS - 1:
                errors[what] = f"{type(exc).__name__}: {exc}"
                print(f"dvcray: could not save {what}: {errors[what]}", file=sys.stderr, flush=True)
                return False
            time.sleep(1.0 + attempt)
    return False


def _save(repo, ws: Path, store: Store, baseline: str, exp_name: str | None, result: RunResult,
          tee: LogTee, capture=None, final: bool = True, pushed: set[str] | frozenset = frozenset()) -> None:
    """Save what the run produced, on success and failure alike, each step on its
    own (retried, and reported when it fails, so one failure never skips the rest):
    outputs and run-cache (but the entries in ``pushed``, saved as their stages ended),
    the experiment's bundle, ``result.json``, the final ``status.json`` and the log. When
    the outputs did not reach the store, the run's workspace stays on this node and the
    result says where. Not ``final`` (a lost attempt that will be retried): its result goes
    to ``attempt-N/``, and the run's own result and status are the next attempt's."""
    errors = result.save_errors
    tee.stop_heartbeat()
    if repo is not None:
        t = time.time()

        def push() -> None:
            pushed_files = repo.push()
            entries = resume.push_run_cache(repo, result.started or 0.0, set(pushed))
            say(f"pushed {pushed_files} file(s) and {entries} run-cache entr{'y' if entries == 1 else 'ies'} "
                "to the store")

        if not _attempt("outputs (dvc push)", push, errors):
            result.push_error = errors["outputs (dvc push)"]
            result.workspace = f"{result.node}:{ws}"
            say(f"the outputs did not reach the store; the run's workspace stays at {result.workspace}")
        result.timings["push"] = time.time() - t
        result.params = collect(repo, "params")
        result.metrics = collect(repo, "metrics")
        try:
            result.shown_files = shown_files(repo)
        except Exception as exc:  # noqa: BLE001 - only a help for dvc exp show at home
            say(f"could not list the metrics and plots inside outputs: {exc}")
    if result.status == RunState.SUCCEEDED:
        ref = experiment_ref(ws, baseline, result.exp_sha, exp_name)
        if ref is None:
            result.status = RunState.FAILED
            result.error = "dvc exp run finished but made no experiment ref"
        else:
            bundle = ws.parent / BUNDLE

            def save_bundle() -> None:
                git("bundle", "create", "-q", os.fspath(bundle), str(ref), f"^{baseline}", cwd=ws)
                store.upload(store.run_path(result.run_id, BUNDLE), bundle)

            if _attempt(BUNDLE_STEP, save_bundle, errors):
                result.ref = str(ref)
                result.exp_name = ref.name
                # Said in the run's log, which reaches the client over the channel the cluster
                # authenticates: the client takes the commit from here, not from the store.
                say(made_line(ref, git("rev-parse", str(ref), cwd=ws), result.run_id))
            else:
                result.status = RunState.FAILED
                result.error = f"the experiment could not be saved to the store: {errors[BUNDLE_STEP]}"
    if capture is not None:
        try:
            capture.close()  # the last live updates, before result.json
        except Exception as exc:  # noqa: BLE001 - live updates are a view; the run's record is not
            say(f"live updates incomplete: {exc}")
    result.ended = time.time()
    if result.attempts:
        result.attempts[-1].ended, result.attempts[-1].state = result.ended, result.status
    # The log before the result: whoever sees result.json finds the whole log.
    for problem in tee.close():
        errors["log"] = problem
        print(f"dvcray: could not save {problem}", file=sys.stderr, flush=True)
    where = RESULT if final else f"attempt-{result.attempt}/{RESULT}"
    _attempt("result.json", lambda: store.write(store.run_path(result.run_id, where),
                                                json.dumps(result.to_json(), indent=2, default=str).encode()), errors)
    if final:
        _attempt("status.json", lambda: store.write(store.run_path(result.run_id, STATUS), json.dumps(
            RunStatus(result.status, result.started, result.ended, result.node,
                      attempt=result.attempt).to_json()).encode()), errors)


if __name__ == "__main__":
    sys.exit(main())
