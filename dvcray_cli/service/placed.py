"""Placed experiments of the runner service (``--cpus-per-exp``/``--gpus-per-exp``).

Each experiment's resources are reserved with a Ray placement group of one bundle of
its shape (named ``dvcray-RUN_ID``, so Ray's dashboard shows it), which the
autoscaler sees as demand. Once Ray has placed it, the experiment runs on the warm
runner of that node: a detached actor per node and dvcray version
(``dvcray-runner-VERSION-NODE``, no resources of its own, restarted by Ray if it
dies), which imported DVC once in its forkserver and forks the experiment as the
service does on the head. The reservation and the work are on the same node; the
reservation is released when the experiment's process ends.

The node's runner keeps a repository cache of the project as the head does; what it
lacks the service bundles from the head's cache. The experiment's log is copied to the
head as it grows (``refresh``), so what it wrote is there when its node dies.

When the node's runner dies under an experiment (``RayActorError``: the node died, its
spot instance was reclaimed, or the runner's process was killed), the experiment is LOST,
never FAILED, and the service may try it again (``retries.py``): each attempt has its own
reservation, folder and log on its node (``key``).
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

from dvcray_cli import __version__, files
from dvcray_cli.runs import snapshot
from dvcray_cli.runs.model import RunState
from dvcray_cli.service import forks, retries

NAMESPACE = "dvcray"


class NodeRunner:
    """The warm runner of one node (a Ray actor, methods called from the service)."""

    def __init__(self, base: str) -> None:
        problem = snapshot.interpreter_problem()
        if problem:
            raise RuntimeError(problem)
        self.base = Path(base)
        self.launcher = forks.Launcher()
        self.runs: dict[str, tuple[forks.Fork, Path, Path]] = {}
        self.node = socket.gethostname()

    def have(self, root: str, head: str) -> bool:
        return bool(snapshot.cache_has(snapshot.cache_path(self.base, root), [head]))

    def start(self, run_id: str, job_id: str, data: bytes, spec: dict[str, Any], root: str, head: str,
              env: dict[str, str]) -> dict[str, Any]:
        """Unpack the snapshot, bring its bundle into this node's cache, fork the experiment."""
        # Folders of its own: on the head's node (or every fake node of local-multinode, which
        # share one disk) the service's are beside them, and it copies these logs into its own.
        # This user's alone on a shared node (issue 20, point 10).
        folder = self.base / "node-runner" / "snapshots" / f"{job_id}--{run_id}"
        logs = self.base / "node-runner" / "logs"
        for private in (self.base / "node-runner", logs, folder.parent):
            files.private_dir(private)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(folder, filter="data")
        if root:
            bundle = folder / snapshot.BUNDLE
            missing = snapshot.cache_fetch(snapshot.cache_path(self.base, root), bundle if bundle.exists() else None,
                                           head)
            if missing:
                shutil.rmtree(folder, ignore_errors=True)
                return {"missing": missing}
        log = logs / f"{run_id}.log"
        fork = self.launcher.start(folder, spec, log, {"PYTHONUNBUFFERED": "1", **env})
        self.runs[run_id] = (fork, folder, log)
        return {"pid": fork.pid, "node": self.node}

    def wait(self, run_id: str) -> int | None:
        """Block until the experiment's process ends; its exit code."""
        fork, folder, _ = self.runs[run_id]
        fork.process.join()
        shutil.rmtree(folder, ignore_errors=True)
        return fork.process.exitcode

    def log_size(self, run_id: str) -> int:
        try:
            return self.runs[run_id][2].stat().st_size
        except (KeyError, OSError):
            return 0

    def read_log(self, run_id: str, offset: int, limit: int) -> bytes:
        try:
            with open(self.runs[run_id][2], "rb") as f:
                f.seek(offset)
                return f.read(limit)
        except (KeyError, OSError):
            return b""

    def forget(self, run_id: str, keep: int = 1000) -> None:
        """Drop finished runs (and their log files) beyond the ``keep`` newest."""
        done = [r for r, (fork, _, _) in self.runs.items() if not fork.process.is_alive()]
        for old in done[:max(0, len(done) - keep)]:
            self.runs.pop(old)[2].unlink(missing_ok=True)

    def stop(self, run_id: str, grace: float) -> None:
        fork = self.runs[run_id][0]
        fork.terminate()
        timer = threading.Timer(grace, lambda: fork.kill() if fork.process.is_alive() else None)
        timer.daemon = True
        timer.start()


class Placer:
    """The service's side: reservations, the nodes' runners, and the runs on them."""

    def __init__(self, service) -> None:
        self.service = service
        self.actors: dict[str, Any] = {}
        self.groups: dict[str, Any] = {}  # run_id -> placement group
        self.where: dict[str, Any] = {}   # run_id -> the node runner it runs on
        self.keys: dict[str, str] = {}    # run_id -> its current attempt's name on the node
        self.tasks: dict[str, asyncio.Task] = {}

    @classmethod
    async def make(cls, service) -> Placer:
        import ray

        if not ray.is_initialized():
            # The service is a Ray Job: this driver joins its cluster (and its job).
            ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False, logging_level="warning")
        return cls(service)

    def runner(self, node_id: str) -> Any:
        """The warm runner of ``node_id``, made if it has none (DVC imported there once)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if node_id not in self.actors:
            remote = ray.remote(num_cpus=0, max_concurrency=256, max_restarts=-1, max_task_retries=0)(NodeRunner)
            self.actors[node_id] = remote.options(
                name=f"dvcray-runner-{__version__}-{node_id[:16]}", namespace=NAMESPACE, lifetime="detached",
                get_if_exists=True, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(os.fspath(self.service.base))
        return self.actors[node_id]

    def start(self, batch, entry) -> None:
        self.tasks[entry.run_id] = asyncio.get_running_loop().create_task(self._run(batch, entry))

    async def _run(self, batch, entry) -> None:
        import ray
        from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

        code = None
        node_id = ""
        key = self.keys[entry.run_id] = entry.run_id if entry.attempt == 1 else f"{entry.run_id}.attempt-{entry.attempt}"
        self.where.pop(entry.run_id, None)
        group = placement_group([dict(batch.resources)], strategy="STRICT_PACK", name=f"dvcray-{key}")
        self.groups[entry.run_id] = group
        try:
            await group.ready()
            if entry.stop_requested:
                code = 143
                return
            node_id = placement_group_table(group)["bundles_to_node_id"][0]
            env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, "DVCRAY_RAY_NODE": node_id}
            if batch.resources.get("GPU"):
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, await self._gpu_ids(group, batch.resources["GPU"])))
            actor = self.runner(node_id)
            self.where[entry.run_id] = actor
            manifest = batch.manifest
            answer = await actor.start.remote(key, batch.job_id, _pack(batch.folder), entry.spec,
                                              manifest.repo_root, manifest.baseline, env)
            if answer.get("missing"):
                # The node lacks history the head's cache has: send it what it lacks.
                answer = await actor.start.remote(key, batch.job_id,
                                                  _pack(batch.folder, self._bundle_for(manifest)), entry.spec,
                                                  manifest.repo_root, manifest.baseline, env)
            if answer.get("missing"):
                raise RuntimeError(f"node {node_id[:12]} lacks commits {answer['missing']}")
            entry.state, entry.pid, entry.node = RunState.RUNNING, int(answer["pid"]), str(answer["node"])
            entry.started = entry.started or time.time()
            entry.begin(entry.node)
            entry.log_path = entry.log_path or self.service.logs_dir / f"{entry.run_id}.log"
            if entry.attempt > 1:
                entry.log_size = retries.append(entry.log_path, retries.placed_line(
                    entry.attempt - 1, batch.manifest.retries, entry.node)) or entry.log_size
            self.service.touch(entry)
            print(f"dvcray-service: run {entry.run_id} ({entry.exp_name or 'unnamed'}) attempt {entry.attempt} started "
                  f"on {entry.node} (Ray node {node_id[:12]}, reserving {batch.resources}), pid {entry.pid}", flush=True)
            code = await actor.wait.remote(key)
            while await self.refresh(entry):  # its last lines too
                pass
            actor.forget.remote(key)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError,
                ray.exceptions.NodeDiedError) as exc:
            # Not the experiment's failure: the runner it ran under went away, with its machine
            # (died, spot instance reclaimed) or alone (its process killed), or the reserved node
            # died before the runner started there (unschedulable: a spot worker reclaimed as it
            # joined). It is lost.
            said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"dvcray-service: the runner of run {entry.run_id} on {entry.node or 'its node'} died: "
                  f"{said[:300]}", flush=True)
            first = said if len(said) <= 100 else said[:99] + "…"
            code = None
            ip = await _node_died(node_id, self.runner(node_id)) if node_id else None
            if ip is not None:
                entry.lost = f"its node{(' ' + ip) if ip else ''} died (Ray: {first})"
            else:
                entry.lost = f"dvcray's runner on {entry.node or 'its node'} went away (Ray: {first})"
            print(f"dvcray-service: run {entry.run_id} is lost: {entry.lost}", flush=True)
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as exc:
            # Ray lost what ran it (its node, its worker): a loss too, never the experiment's failure.
            entry.lost = f"Ray lost its runner on {entry.node or 'its node'} ({type(exc).__name__})"
            print(f"dvcray-service: run {entry.run_id} is lost: {entry.lost}: {str(exc)[:300]}", flush=True)
        except Exception as exc:  # noqa: BLE001 - the run fails; the service goes on
            print(f"dvcray-service: run {entry.run_id} could not start: {type(exc).__name__}: {exc}", flush=True)
            code = 1
        finally:
            self.groups.pop(entry.run_id, None)
            self.tasks.pop(entry.run_id, None)
            try:
                remove_placement_group(group)
            except Exception:  # noqa: BLE001 - gone with its job
                pass
            if code is None and entry.stop_requested:
                code = 143
            self.service.ended(batch, entry, code)

    async def _gpu_ids(self, group, gpus: float) -> list:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        @ray.remote(num_cpus=0, num_gpus=gpus)
        def ids() -> list:
            return ray.get_gpu_ids()

        return await ids.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0)).remote()

    def _bundle_for(self, manifest) -> bytes:
        cache = snapshot.cache_path(self.service.base, manifest.repo_root)
        return snapshot.cache_bundle(cache, manifest.baseline)

    async def refresh(self, entry, chunk: int = 1 << 20) -> bool:
        """Copy what is new of a placed run's log from its node's runner to the head (its
        log as the service reports it); whether there was something."""
        actor = self.where.get(entry.run_id)
        if actor is None or entry.log_path is None:
            return False
        try:
            data = await actor.read_log.remote(self.keys[entry.run_id], entry.mirrored, chunk)
        except Exception:  # noqa: BLE001 - a runner that died: its run ends through wait()
            return False
        if not data:
            return False
        entry.mirrored += len(data)
        entry.log_size = retries.append(entry.log_path, data) or entry.log_size
        return True

    def stop(self, entry, grace: float) -> None:
        actor = self.where.get(entry.run_id)
        if actor is not None and entry.state == RunState.RUNNING:
            actor.stop.remote(self.keys[entry.run_id], grace)
        elif entry.run_id in self.tasks and entry.state == RunState.PENDING:
            self.tasks[entry.run_id].cancel()  # still waiting for its reservation: it never starts


async def _node_died(node_id: str, actor: Any, wait_s: float = 90.0) -> str | None:
    """The address of Ray node ``node_id`` once Ray counts it dead ("" when it gives
    none); None as soon as the node's runner ``actor`` answers again (Ray restarted it:
    the runner died, not its machine), or when neither happened within ``wait_s``.
    Ray notices a dead machine only after its health checks fail: wait for that."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        try:
            node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)
        except Exception:  # noqa: BLE001 - the GCS did not answer: ask again
            node = {"Alive": True}
        if node is None or not node.get("Alive", True):
            return str((node or {}).get("NodeManagerAddress") or "")
        if time.monotonic() > deadline:
            return None
        try:
            await asyncio.wait_for(asyncio.wrap_future(actor.have.remote("", "").future()), timeout=2.0)
            return None
        except ray.exceptions.RayTaskError:
            return None   # it answered (with an error of its own): it runs
        except Exception:  # noqa: BLE001 - not (yet) restarted
            pass
        await asyncio.sleep(0.5)


def _pack(folder: Path, bundle: bytes | None = None) -> bytes:
    """The snapshot folder as a tar; ``bundle`` in place of its own bundle."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(folder.iterdir()):
            if bundle is not None and path.name == snapshot.BUNDLE:
                continue
            tar.add(path, arcname=path.name)
        if bundle is not None:
            info = tarfile.TarInfo(snapshot.BUNDLE)
            info.size = len(bundle)
            tar.addfile(info, io.BytesIO(bundle))
    return buffer.getvalue()
