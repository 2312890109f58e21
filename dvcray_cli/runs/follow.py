"""After submission: follow a run's log and state, stop it, bring it home.

The log streams live from the cluster and a dropped connection resumes without
lost or repeated lines; the run's state is polled so its end is seen at once;
a cluster that stops answering ends the wait with a ClusterError. At the end
the experiment comes home from the store: its ref (checked to be an
experiment ref of the run's own baseline), and with ``--apply`` its outputs.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from dvcray_cli import ray_api
from dvcray_cli.errors import ClusterError, ExperimentFailed, Interrupted, StoreError, UsageError
from dvcray_cli.runs.model import RESULT, ExpRef, Outcome, RunRecord, RunResult, RunState
from dvcray_cli.runs.project import NameTaken, fetch_shown_files, import_experiment, open_repo, pull_outputs
from dvcray_cli.runs.submit import Submitted
from dvcray_cli.runs import warm
from dvcray_cli.runs.warm import lost_contact
from dvcray_cli.store import Store

# A job status that takes longer than this counts as no answer.
STATUS_TIMEOUT_S = 10.0


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
            found = {j: ray_api.status_text(await _call(self.client.get_job_status, j, timeout=STATUS_TIMEOUT_S))
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
                if found and ray_api.is_terminal(found[run_id]):
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
            stop_jobs(client, [run_id])
        raise Interrupted.following(run_id, stopped=stop_on_interrupt) from None


def stop_jobs(client, job_ids: list[str]) -> None:
    """Stop jobs and wait until each has ended (the runners save their work first)."""
    import signal

    # A second Ctrl-C while stopping should not leave a job running.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray_api.stop_and_wait(client, job_ids, ray_api.stop_grace_s() + 10)
    finally:
        signal.signal(signal.SIGINT, previous)


def prune_jobs(client, store: Store) -> list[str]:
    """Delete the records of dvcray's finished Ray Jobs beyond ``DVCRAY_KEEP_JOBS``, those
    whose results are in ``store`` (``ray_api.prune_jobs``); a cluster that does not answer
    keeps them for the next time."""
    from dvcray_cli.service_api import SERVICE_MARKER

    def saved(job) -> bool:
        meta = job.metadata or {}
        if SERVICE_MARKER in meta or "dvcray_probe" in meta:
            return True
        runs = [r for r in str(meta.get("run_ids") or job.submission_id).split(",") if r]
        return all(store.exists(store.run_path(r, RESULT)) for r in runs)

    try:
        return ray_api.prune_jobs(client, ray_api.keep_jobs(), saved)
    except Exception:  # noqa: BLE001 - housekeeping: never the reason a run fails
        return []


# --------------------------------------------------------------------------- finish

def fetch_result(store: Store, run_id: str, wait_s: float = 10) -> RunResult | None:
    """The runner's result.json (it is written before the job ends); None when there
    is none after ``wait_s``.

    Raises:
        StoreError: there is a file, but it is no result (names the file).
    """
    deadline = time.time() + wait_s
    while True:
        data, problem = store.read_record(store.run_path(run_id, RESULT))
        result = RunResult.from_json(data)
        if result is not None:
            return result
        if time.time() > deadline:
            if problem or data is not None:
                raise StoreError(f"Run {run_id}: {problem or f'{RESULT} in the store {store.url} is not a result'}.",
                                 f"Its log: dvcray logs {run_id}")
            return None
        time.sleep(0.5)


def finish(sub: Submitted, status: str, apply: bool = False, force: bool = False) -> Outcome:
    """Bring a finished run home: the experiment ref, what ``dvc exp show`` reads of
    it, and with ``apply`` its outputs too.

    The ref must be an experiment ref of the run's own baseline; an experiment of
    the same name here is never replaced unless ``force`` (then the outcome says
    so, and how to keep both).

    Args:
        sub: the run.
        status: its Ray job's final status.
        apply: also fetch its outputs and ``dvc exp apply`` it.
        force: replace an experiment of the same name (``dvcray run -f``).
    """
    project = sub.project
    result = fetch_result(sub.store, sub.run_id, wait_s=10 if status == "SUCCEEDED" else 3)
    outcome = Outcome(run_id=sub.run_id, status=status, exp_name=sub.exp_name, store=sub.store.url)
    if result is not None:
        outcome = Outcome(
            run_id=sub.run_id, status=result.status.value, exp_name=result.exp_name, ref=result.ref,
            exp_sha=result.exp_sha, params=result.params, metrics=result.metrics, error=result.error,
            store=sub.store.url, timings=result.timings)
        if result.push_error:
            where = f"; the run's workspace stays on its node at {result.workspace}" if result.workspace else ""
            outcome.store_error = (f"its outputs did not reach the store {sub.store.url} "
                                   f"({result.push_error}){where}")
        elif result.save_errors:
            outcome.store_error = "; ".join(f"{k}: {v}" for k, v in result.save_errors.items())
    died = None
    if result is None and status == "FAILED":
        # The runner service says so of a run whose node died; Ray, of a run that is a Ray Job.
        if sub.service is not None:
            died = warm.lost(sub.service, sub.run_id)
        elif sub.client:
            died = ray_api.node_died(sub.client, sub.run_id)
    if died:
        # Not the experiment's failure: the machine it ran on went away. Its log stays in the store.
        outcome.status, outcome.error = RunState.LOST.value, died
    RunRecord.update(project.git_root, sub.run_id, state=outcome.status, exp_name=outcome.exp_name)
    if status != "SUCCEEDED" or outcome.status != RunState.SUCCEEDED:
        if result is None and not died:
            outcome.error = "the runner ended without a result (see the log above)"
        return outcome
    ref = ExpRef.parse(result.ref)
    if ref is None or ref.baseline != sub.baseline:
        outcome.status = RunState.FAILED.value
        outcome.error = "the runner reported success but saved no experiment of this baseline"
        return outcome
    try:
        target, sha = import_experiment(project.git_root, sub.store, sub.run_id, ref, force=force)
    except NameTaken as exc:
        outcome.home = False
        outcome.error, outcome.hint = exc.message, exc.hint
        return outcome
    outcome.ref, outcome.exp_sha = str(target), sha
    if result.shown_files and not result.push_error:
        try:
            fetch_shown_files(project, sub.store, sha, result.shown_files)
        except StoreError as exc:
            outcome.store_error = exc.message
    if apply and not outcome.store_error:
        pull_outputs(project, sub.store, sha)
        repo = open_repo(project, sub.store)
        try:
            repo.experiments.apply(target.name)
        finally:
            repo.close()
        outcome.applied = True
    return outcome


def raise_for(outcome: Outcome) -> None:
    """Raise the error an outcome's exit code comes from (none when it succeeded and is home)."""
    if outcome.status == "SUCCEEDED":
        if not outcome.home:
            raise UsageError(outcome.error or "The experiment could not come home.", outcome.hint)
        if outcome.store_error:
            raise StoreError(f"Experiment {outcome.exp_name} is in your repo, but {outcome.store_error}.",
                             f"Its log: dvcray logs {outcome.run_id}")
        return
    if outcome.status == "STOPPED":
        raise Interrupted(f"Run {outcome.run_id} was stopped.",
                          f"Its log: dvcray logs {outcome.run_id}")
    if outcome.status == RunState.LOST.value:
        raise ClusterError(f"Run {outcome.run_id} is LOST: {outcome.error or 'its cluster lost it'}.",
                           f"Its log so far stays in the store: dvcray logs {outcome.run_id}; run it again.")
    raise ExperimentFailed(f"The experiment failed: {outcome.error or 'see the log above'}",
                           f"Its log stays in the store: dvcray logs {outcome.run_id}")
