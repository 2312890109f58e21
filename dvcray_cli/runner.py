"""The runner: the Ray Job entrypoint that runs one experiment on the cluster.

``python -m dvcray_cli.runner`` runs in the job's working_dir (the snapshot).
It rebuilds the workspace in a folder of its own, runs ``dvc exp run`` through
DVC's Python API (one process: DESIGN.md measures the cost of a chain of CLI
calls), uploads its log to the store as it grows, and at the end, whatever
happened (SIGTERM included), pushes outputs and run-cache, a bundle of the
experiment ref and ``result.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from dvcray_cli.gitutil import git
from dvcray_cli.runs import snapshot
from dvcray_cli.runs.model import (BUNDLE, LOG, RESULT, STATUS, ExpRef, ExpSpec, Manifest, RunResult, RunState,
                                   RunStatus)
from dvcray_cli.store import REMOTE_NAME, Store

LOG_UPLOAD_EVERY_S = 1.0
# status.json is rewritten this often while the run goes, so a run whose
# cluster cannot be seen can still be told running from lost.
HEARTBEAT_EVERY_S = 30.0


class Terminated(BaseException):
    """SIGTERM from ``dvcray stop``, Ctrl-C on the client, or Ray."""


def runner_dir() -> Path:
    return Path(os.environ.get("DVCRAY_RUNNER_DIR") or Path.home() / ".cache" / "dvcray")


class LogTee:
    """Send this process's fd 1 and 2 (and so every stage's output) both to the
    job log and to a file that is uploaded to the store while it grows."""

    def __init__(self, path: Path, store: Store, rel: str, prefix: str = "") -> None:
        self.path, self.store, self.rel = path, store, rel
        # In a sweep, experiments share one job log: each line there starts
        # with "[NAME] ". The experiment's own log in the store stays plain.
        self.prefix = prefix.encode()
        self.partial = b""
        self.heartbeat = None  # set by main(): rewrites status.json
        self.real_out = os.dup(1)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        self.file = open(path, "ab", buffering=0)
        self.reader = threading.Thread(target=self._pump, args=(read_fd,), daemon=True)
        self.reader.start()
        self.stop_upload = threading.Event()
        self.uploaded = -1
        self.uploader = threading.Thread(target=self._upload_loop, daemon=True)
        self.uploader.start()

    def _pump(self, fd: int) -> None:
        while chunk := os.read(fd, 65536):
            self.file.write(chunk)
            if not self.prefix:
                os.write(self.real_out, chunk)
                continue
            lines = (self.partial + chunk).split(b"\n")
            self.partial = lines.pop()
            if lines:
                # One write per line: lines of experiments running at once do not interleave.
                for line in lines:
                    os.write(self.real_out, self.prefix + line + b"\n")
        if self.partial:
            os.write(self.real_out, self.prefix + self.partial + b"\n")

    def upload(self) -> None:
        size = self.path.stat().st_size
        if size != self.uploaded:
            self.store.upload(self.rel, self.path)
            self.uploaded = size

    def _upload_loop(self) -> None:
        last_beat = time.time()
        while not self.stop_upload.wait(LOG_UPLOAD_EVERY_S):
            try:
                self.upload()
                if self.heartbeat and time.time() - last_beat >= HEARTBEAT_EVERY_S:
                    self.heartbeat()
                    last_beat = time.time()
            except Exception as exc:  # keep running; the final upload reports
                os.write(self.real_out, f"dvcray: log upload failed: {exc}\n".encode())

    def close(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # Closing our ends of the pipe lets the pump reach its end once the
        # stages' processes are gone too.
        os.dup2(self.real_out, 1)
        os.dup2(self.real_out, 2)
        self.reader.join(timeout=3)
        self.stop_upload.set()
        self.upload()


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


def storage_env(store: Store) -> None:
    """Tell stages where Ray Tune and Train may keep checkpoints that every node reaches:
    the store, when it is not a folder on one machine (``dvcray_cli.integrations.storage``),
    and its S3 endpoint, if it has its own, where pyarrow (Ray's storage) looks for it."""
    from dvcray_cli.integrations.storage import STORE_VAR

    if store.is_local:
        return
    os.environ.setdefault(STORE_VAR, f"{store.url.rstrip('/')}/dvcray/ray")
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
    here = Path.cwd()
    manifest = Manifest.read(here)
    specs = manifest.specs()
    if len(specs) == 1:
        return run_experiment(here, manifest, specs[0])
    return _run_many(here, manifest, specs)


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


def run_experiment(here: Path, manifest: Manifest, spec: ExpSpec, prefix: str = "") -> int:
    """Rebuild the workspace, run one experiment, save everything; return an exit code."""
    store = Store.from_json(manifest.store)
    run_id, exp_name, overrides = spec.run_id, spec.exp_name, spec.overrides
    work = runner_dir() / "runs" / run_id
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    tee = LogTee(work / LOG, store, store.run_path(run_id, LOG), prefix)

    def _on_term(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, _on_term)
    result = RunResult(run_id=run_id, exp_name=exp_name, baseline=manifest.baseline, overrides=overrides,
                       status=RunState.FAILED, node=socket.gethostname(), started=time.time(),
                       dvcray_version=manifest.dvcray_version)
    repo = None
    ws = work / "repo"
    status_lock = threading.Lock()

    def write_status(status: RunStatus) -> None:
        store.write(store.run_path(run_id, STATUS), json.dumps(status.to_json()).encode())

    def beat() -> None:
        with status_lock:
            if result.ended:
                return
            write_status(RunStatus(RunState.RUNNING, result.started, node=result.node, heartbeat=time.time()))

    try:
        _check_version(manifest.dvcray_version)
        beat()
        tee.heartbeat = beat
        t = time.time()
        dvc_root = snapshot.restore(here, ws, manifest)
        configure_dvc(dvc_root, store)
        result.timings["restore"] = time.time() - t
        say(f"workspace ready at baseline {manifest.baseline[:7]} ({result.timings['restore']:.1f}s)")

        os.environ["DVCRAY_WORKSPACE"] = os.fspath(dvc_root)
        os.environ["RAY_RUNTIME_ENV_HOOK"] = "dvcray_cli.integrations.runtime_env.hook"
        os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
        storage_env(store)
        os.chdir(dvc_root)

        from dvc.repo import Repo

        repo = Repo(os.fspath(dvc_root))
        pull_inputs(repo)
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
        _save(repo, ws, store, manifest.baseline, exp_name, result)
        with status_lock:
            result.ended = time.time()
        try:
            store.write(store.run_path(run_id, RESULT), json.dumps(result.to_json(), indent=2, default=str).encode())
            write_status(RunStatus(result.status, result.started, result.ended, result.node))
        finally:
            tee.close()
            if repo is not None:
                repo.close()
            os.chdir(here)
            shutil.rmtree(work, ignore_errors=True)
    return {RunState.SUCCEEDED: 0, RunState.STOPPED: 143}.get(result.status, 1)


def _save(repo, ws: Path, store: Store, baseline: str, exp_name: str | None, result: RunResult) -> None:
    """Push outputs and run-cache, bundle the experiment ref: on success and failure alike."""
    if repo is None:
        return
    t = time.time()
    try:
        pushed = repo.push(run_cache=True)
        say(f"pushed {pushed} file(s) and the run-cache to the store")
    except Exception as exc:
        say(f"push incomplete: {exc}")
        result.push_error = str(exc)
    result.timings["push"] = time.time() - t
    result.params = collect(repo, "params")
    result.metrics = collect(repo, "metrics")
    if result.status == RunState.SUCCEEDED:
        ref = experiment_ref(ws, baseline, result.exp_sha, exp_name)
        if ref:
            bundle = ws.parent / BUNDLE
            git("bundle", "create", "-q", os.fspath(bundle), str(ref), f"^{baseline}", cwd=ws)
            store.upload(store.run_path(result.run_id, BUNDLE), bundle)
            result.ref = str(ref)
            result.exp_name = ref.name
            say(f"experiment {ref.name} saved ({ref})")
        else:
            result.status = RunState.FAILED
            result.error = "dvc exp run finished but made no experiment ref"


if __name__ == "__main__":
    sys.exit(main())
