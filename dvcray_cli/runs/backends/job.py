"""Runs as Ray Jobs of their own (``JobSubmissionClient``): one per experiment, or one a
sweep's experiments share on the head.

The log streams live from the cluster and a dropped connection resumes without lost
or repeated lines; the job's status is polled so its end is seen at once; a cluster
that stops answering ends the wait with a ClusterError (``base.lost_contact``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dvcray_cli import __version__, clusters, files, ray_api
from dvcray_cli.errors import ClusterError, Interrupted
from dvcray_cli.runs import snapshot
from dvcray_cli.runs.backends.base import Emit, Followed, LogGone, RunInfo, Say, lost_contact
from dvcray_cli.runs.logtee import made_in_log
from dvcray_cli.runs.model import MANIFEST, RESULT, ExpSpec, Manifest, RunState
from dvcray_cli.service.protocol import SERVICE_MARKER

if TYPE_CHECKING:  # pragma: no cover
    from dvcray_cli.runs.submit import Prepared
    from dvcray_cli.store import Store

# A job status that takes longer than this counts as no answer.
STATUS_TIMEOUT_S = 10.0
POLL_S = 0.3


def info_of(job: Any) -> RunInfo:
    """A Ray job's details (``JobDetails``) as a RunInfo: LOST when its node died."""
    died = ray_api.node_died_of(job)
    node = getattr(getattr(job, "driver_info", None), "node_ip_address", "") or ""
    return RunInfo(job.submission_id or "", RunState.LOST if died else ray_api.job_state(job.status),
                   job.start_time / 1000 if job.start_time else None, job.end_time / 1000 if job.end_time else None,
                   str(node), died or "")


class JobLog:
    """What of a job's log has been shown. Ray sends a job's log from the start
    on every tail, so after a dropped connection the client reconnects and skips
    what it has already shown: nothing is lost or repeated."""

    def __init__(self, client, job_id: str, emit: Emit) -> None:
        self.client, self.job_id, self.emit = client, job_id, emit
        self.shown = 0

    def _show(self, text: str, position: int) -> int:
        end = position + len(text)
        if end > self.shown:
            self.emit(text[self.shown - position:] if self.shown > position else text)
            self.shown = end
        return end

    async def tail_forever(self) -> None:
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


def _reopen(address: str) -> None:
    """Reopen the port-forward to the job API at ``address`` if it is a launcher or AWS
    cluster's and its ssh died (a laptop's sleep): on the port it had, when still free."""
    try:
        clusters.job_api(address)
    except ClusterError:
        pass  # not (yet): asked again at the next failure, until lost_contact gives up


class StatusWatch:
    """Ray's tail notices the end of a job only after a second of sleep
    (LOG_TAIL_SLEEP_S); polling the status ends the wait at once. A cluster
    that stops answering for RECONNECT_TIMEOUT_S is a ClusterError."""

    def __init__(self, client) -> None:
        self.client = client
        self.lost_since: float | None = None

    async def statuses(self, job_ids) -> dict[str, RunState] | None:
        """``{job_id: state}``, or None while the cluster does not answer (wait and ask again)."""
        try:
            found = {j: ray_api.job_state(await _call(self.client.get_job_status, j, timeout=STATUS_TIMEOUT_S))
                     for j in job_ids}
        except Exception as exc:
            self.lost_since = self.lost_since or time.time()
            error = await asyncio.to_thread(lost_contact, self.client.get_address(), list(job_ids), exc,
                                            self.lost_since)
            if error is not None:
                raise error from None
            await asyncio.to_thread(_reopen, self.client.get_address())
            await asyncio.sleep(1.0)
            return None
        self.lost_since = None
        return found


class JobBackend:
    """Each run a Ray Job of its own (a sweep's experiments on the head share one)."""

    name = "job"
    # Ray Jobs are not retried (Ray: "retries should be handled by the submitter"), and
    # dvcray retries where a run lives, not in a client that may be gone: a run sent as
    # a Ray Job of its own that is lost with its machine ends LOST.
    retries_lost = False

    def __init__(self, address: str, client: Any, many: bool = False) -> None:
        """``many``: what the cluster says of runs is read once, for all (``dvcray runs``)."""
        self.address, self.client, self.many = address, client, many
        self._jobs: dict[str, Any] | None = None

    @classmethod
    def open(cls, address: str, many: bool = False) -> JobBackend:
        """The cluster at ``address`` (its version unchecked: its runs exist already).

        Raises:
            ClusterError: it does not answer or refuses the token.
        """
        try:
            return cls(address, clusters.connect(address), many)
        except ClusterError:
            raise
        except Exception as exc:  # e.g. Ray's AuthenticationError: treat as not answering
            raise ClusterError(f"{type(exc).__name__}: {exc}") from None

    @classmethod
    def connect(cls, address: str) -> JobBackend:
        """The cluster at ``address``, once it is known to run a dvcray that can run this
        client's runs.

        Raises:
            ClusterError: it does not answer, refuses the token, or its dvcray differs.
        """
        client = clusters.connect(address)
        clusters.check_version(address, client)
        return cls(address, client)

    @classmethod
    def locate(cls, address: str, run_id: str, job_id: str) -> tuple[JobBackend, RunInfo]:
        """The cluster at ``address`` and what it says of the run now.

        Raises:
            ClusterError: it does not answer, or does not know the run (the message says which).
        """
        try:
            backend = cls(address, clusters.connect(address))
            return backend, info_of(backend.client.get_job_info(job_id))
        except ClusterError:
            raise
        except Exception:  # the cluster answers but does not know the run
            raise ClusterError(f"the cluster at {address} does not know run {run_id}") from None

    @staticmethod
    def keeps_log(run_id: str, job_id: str) -> bool:
        # A sweep's experiments share one job whose log holds them all: the store keeps each one's own.
        return job_id == run_id

    def recorded(self) -> dict[str, str]:
        return {"backend": self.name, "service": ""}

    # ------------------------------------------------------------------ submit

    def one_submission(self, placed: bool) -> bool:
        return not placed

    def cached_history(self, git_root: Path) -> tuple[str, list[str] | None]:
        return "", None

    def package(self, prepared: Prepared, manifest: Manifest) -> Path:
        folder = prepared.snapshot_dir
        if prepared.snapshot_bytes <= snapshot.via_store_bytes():
            return folder
        # Too big for a Ray Job's package (Ray refuses one of 512 MiB, warns about
        # files of 10 MiB, and keeps every package in its GCS): the runner fetches it.
        from dvcray_cli import store as store_mod

        manifest.parts = f"{store_mod.SNAPSHOTS}/{manifest.run_id}"
        for part in sorted(folder.iterdir()):
            if part.is_file() and part.name != MANIFEST:
                manifest.parts_sha256[part.name] = files.sha256_of(part)
                prepared.store.upload(f"{manifest.parts}/{part.name}", part)
        return Path(tempfile.mkdtemp(prefix="manifest-", dir=folder.parent))

    def submit(self, prepared: Prepared, folder: Path, job_id: str, specs: list[ExpSpec], placed: bool) -> None:
        resources = prepared.placement.submit_options() if placed and prepared.placement is not None else {}
        try:
            self.client.submit_job(
                entrypoint="python -m dvcray_cli.runner",
                submission_id=job_id,
                runtime_env={
                    "working_dir": os.fspath(folder),
                    "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(ray_api.stop_grace_s()), "PYTHONUNBUFFERED": "1"},
                },
                metadata={"dvcray_version": __version__, "baseline": prepared.project.baseline, "run_id": job_id,
                          "exp_name": ",".join(s.exp_name or "" for s in specs),
                          "run_ids": ",".join(s.run_id for s in specs)},
                **resources,
            )
        except Exception as exc:
            raise ClusterError(f"Could not submit the run to the cluster at {prepared.address}: {exc}",
                               "Check the cluster: dvcray cluster status") from exc

    # ------------------------------------------------------------------ follow

    def follow(self, run_id: str, emit: Emit, stop_on_interrupt: bool = True) -> RunState:
        log = JobLog(self.client, run_id, emit)
        watch = StatusWatch(self.client)

        async def main() -> RunState:
            tail = asyncio.create_task(log.tail_forever())
            try:
                while True:
                    found = await watch.statuses([run_id])
                    if found and found[run_id].is_terminal():
                        break
                    await asyncio.sleep(0.2)
            finally:
                tail.cancel()
            await log.drain()
            return found[run_id]

        try:
            return asyncio.run(main())
        except KeyboardInterrupt:
            if stop_on_interrupt:
                self.stop({run_id: run_id})
            raise Interrupted.following(run_id, stopped=stop_on_interrupt) from None

    def follow_many(self, sweep: Followed) -> None:
        asyncio.run(self._watch(sweep))

    async def _ended(self, job_id: str, state: RunState) -> RunInfo:
        """What a job that ended says for its experiments without a result: LOST when its node died."""
        died = await asyncio.to_thread(ray_api.node_died, self.client, job_id) if state == RunState.FAILED else None
        return RunInfo(job_id, RunState.LOST, lost=died) if died else RunInfo(job_id, state)

    async def _watch(self, sweep: Followed) -> None:
        watch = StatusWatch(self.client)
        logs: dict[str, JobLog] = {}
        tails: dict[str, asyncio.Task] = {}
        ended: dict[str, RunInfo] = {}
        store_read: dict[str, float] = {}
        try:
            while True:
                for job_id in sweep.jobs:
                    if job_id not in logs:
                        logs[job_id] = JobLog(self.client, job_id, lambda text, j=job_id: _demux(sweep, j, text))
                        tails[job_id] = asyncio.create_task(logs[job_id].tail_forever())
                statuses = await watch.statuses([j for j in sweep.jobs if j not in ended])
                if statuses is None:
                    continue
                changed = False
                for job_id, status in statuses.items():
                    if status.is_terminal():
                        ended[job_id] = await self._ended(job_id, status)
                        tails[job_id].cancel()
                        await logs[job_id].drain()
                    shared = len(sweep.jobs[job_id]) > 1
                    # A job of its own ends right after its result is written: read the
                    # store then. A shared job's experiments end one by one: read it
                    # at most once a second (each read is a request to the store).
                    look = status.is_terminal() or (shared and time.time() - store_read.get(job_id, 0) >= 1.0)
                    info = ended.get(job_id) or RunInfo(job_id, status)
                    for state in sweep.jobs[job_id]:
                        if state.outcome is None:
                            if status == RunState.RUNNING and state.state == RunState.PENDING and not shared:
                                sweep.running(state)
                                changed = True
                            if look and await asyncio.to_thread(sweep.collect, state, info):
                                changed = True
                    if look:
                        store_read[job_id] = time.time()
                if changed:
                    await asyncio.to_thread(sweep.changed)
                # Done when every experiment is home and every job has ended.
                if all(s.outcome is not None for s in sweep.states) and set(ended) >= set(sweep.jobs):
                    return
                await asyncio.sleep(POLL_S)
        finally:
            for task in tails.values():
                task.cancel()

    # ------------------------------------------------------------------ after the fact

    def info(self, run_id: str, job_id: str) -> RunInfo | None:
        if self.many:
            if self._jobs is None:
                self._jobs = {}  # asked once: a cluster that does not answer now is not asked again
                try:
                    self._jobs = {j.submission_id: j for j in self.client.list_jobs() if j.submission_id}
                except Exception as exc:
                    raise ClusterError(f"{type(exc).__name__}: {exc}") from None
            job = self._jobs.get(job_id)
            return info_of(job) if job is not None else None
        try:
            return info_of(self.client.get_job_info(job_id))
        except Exception:  # noqa: BLE001 - the cluster forgot it, or does not answer
            return None

    def made(self, run_id: str, job_id: str) -> tuple[str, str] | None:
        try:
            return made_in_log(self.client.get_job_logs(job_id), run_id)
        except Exception:  # noqa: BLE001 - the cluster forgot it, or does not answer
            return None

    def show_log(self, run_id: str, emit: Emit, follow: bool) -> RunState | None:
        try:
            state = ray_api.job_state(self.client.get_job_info(run_id).status)
        except Exception:  # the cluster does not know this run (restarted, or another cluster)
            return None
        if follow and not state.is_terminal():
            return self.follow(run_id, emit, stop_on_interrupt=False)
        try:
            text = self.client.get_job_logs(run_id)
        except Exception:  # noqa: BLE001 - the log lived on a node that is gone
            raise LogGone(f"The cluster at {self.address} could not give run {run_id}'s log (the node that held it "
                          "is gone)") from None
        emit(text)
        return state

    def stop(self, runs: dict[str, str], timeout: float | None = None, say: Say | None = None) -> dict[str, RunState]:
        jobs = list(dict.fromkeys(runs.values()))
        if say is not None:
            for run_id, job_id in runs.items():
                if job_id != run_id:
                    say(f"It shares Ray Job {job_id} with the other experiments of its sweep: they stop too.")
        # A second Ctrl-C while stopping should not leave a job running.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            ray_api.stop_and_wait(self.client, jobs, timeout if timeout is not None else ray_api.stop_grace_s() + 10)
        finally:
            signal.signal(signal.SIGINT, previous)
        found: dict[str, RunState] = {}
        for run_id, job_id in runs.items():
            try:
                found[run_id] = ray_api.job_state(ray_api.job_status(self.client, job_id))
            except Exception:  # noqa: BLE001 - nothing answers any more: its state is unknown
                continue
        return found

    def tidy(self, store: Store) -> None:
        """Delete the records of dvcray's finished Ray Jobs beyond ``DVCRAY_KEEP_JOBS``, those
        whose results are in ``store`` (``ray_api.prune_jobs``); a cluster that does not answer
        keeps them for the next time."""

        def saved(job) -> bool:
            meta = job.metadata or {}
            if SERVICE_MARKER in meta or "dvcray_probe" in meta:
                return True
            runs = [r for r in str(meta.get("run_ids") or job.submission_id).split(",") if r]
            return all(store.exists(store.run_path(r, RESULT)) for r in runs)

        try:
            ray_api.prune_jobs(self.client, ray_api.keep_jobs(), saved)
        except Exception:  # noqa: BLE001 - housekeeping: never the reason a run fails
            pass


def _demux(sweep: Followed, job_id: str, text: str) -> None:
    """A job's new log text, line by line to its experiments: a shared job's lines are
    ``[NAME] line``."""
    states = sweep.jobs[job_id]
    for line in text.splitlines():
        if len(states) == 1:
            name, body = states[0].name, line
        elif line.startswith("[") and "] " in line:
            name, body = line[1:].split("] ", 1)
        else:
            continue  # Ray's own lines about the shared job
        sweep.line(name, body)
