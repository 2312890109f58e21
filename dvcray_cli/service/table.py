"""The runner service's run table: the experiments it was given, their processes, and
the long poll that reports them (``protocol.py``). ``server.py`` serves it over HTTP.

A submission is a snapshot and its experiments (a ``Batch``), started at most
``limit`` at once: forked from the service's forkserver on the head (``forks.py``), or
on the warm runner of the node Ray placed them on (``placed.py``). A placed experiment
lost with its machine goes back to its batch for another attempt (``retries.py``).

Each run's log, as the service reports it, is one file on the head for all its attempts:
written there by a run on the head, copied there as it grows from the node of a placed one.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvcray_cli import __version__, compatible, ray_api
from dvcray_cli.runs import snapshot
from dvcray_cli.runs.model import Manifest
from dvcray_cli.service import forks, protocol, retries
from dvcray_cli.service.protocol import Attempt, PollAnswer, PollRequest, RunState, ServiceRun

# Finished runs (and their log files) the service remembers, beyond those still going.
KEEP_FINISHED = 1000
# Snapshots of finished submissions kept on the node.
KEEP_SNAPSHOTS = 20
# A log is read at most this much per run per poll.
LOG_CHUNK = 1 << 20
TICK_S = 0.2
# How often an idle service looks whether dvcray on its node was upgraded.
UPGRADE_CHECK_S = 5.0
# Run and submission ids name files and folders on the node.
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MAX_WAIT_S = 30.0


def say(message: str) -> None:
    print(f"dvcray-service: {message}", flush=True)


def default_limit() -> int:
    """How many of a submission's experiments run at once on the head when the client
    does not say (``--jobs``): 4 per CPU of the machine, at least 8."""
    return max(8, 4 * (os.cpu_count() or 1))


@dataclass
class Entry:
    """One experiment the service was given."""

    run_id: str
    job_id: str
    exp_name: str | None
    spec: dict[str, Any]
    state: RunState = RunState.PENDING
    seq: int = 0
    node: str = ""
    pid: int = 0
    started: float | None = None
    ended: float | None = None
    code: int | None = None
    log_path: Path | None = None
    log_size: int = 0
    stop_requested: bool = False
    placed: bool = False
    lost: str = ""        # why the run (its current attempt) is lost, when it is
    handle: Any = field(default=None, repr=False)  # forks.Fork, or placed.Placed
    attempt: int = 1      # its current try
    attempts: list[Attempt] = field(default_factory=list)  # every try started, the current one last
    mirrored: int = 0     # bytes of a placed attempt's log copied to the head so far

    def report(self) -> ServiceRun:
        """The run as the service reports it."""
        return ServiceRun(self.run_id, self.job_id, self.exp_name, self.state, self.node, self.pid, self.started,
                          self.ended, self.code, self.placed, self.lost, [Attempt(**vars(a)) for a in self.attempts])

    def begin(self, node: str) -> None:
        """Its current attempt runs now, on ``node``."""
        if not self.attempts or self.attempts[-1].number != self.attempt:
            self.attempts.append(Attempt(self.attempt))
        self.attempts[-1].node, self.attempts[-1].started = node, time.time()


@dataclass
class Batch:
    """One submission: a snapshot folder and its experiments, at most ``limit`` at once."""

    job_id: str
    folder: Path
    manifest: Manifest
    pending: list[Entry]
    limit: int
    running: int = 0
    resources: dict[str, float] = field(default_factory=dict)  # placed: what each experiment reserves


class RunnerService:
    """The run table, the forkserver and the HTTP handlers."""

    def __init__(self, token: str, service_id: str, base: Path) -> None:
        self.token, self.service_id, self.base = token, service_id, base
        self.logs_dir = base / "service" / "logs"
        self.snapshots = base / "service" / "snapshots"
        for folder in (self.logs_dir, self.snapshots):
            folder.mkdir(parents=True, exist_ok=True)
        self.launcher = forks.Launcher()
        self.entries: dict[str, Entry] = {}
        self.batches: dict[str, Batch] = {}
        self.seq = 0
        self.changed = asyncio.Event()
        self.draining = False
        self.node = socket.gethostname()
        self.grace = ray_api.stop_grace_s()
        self.placer: Any = None  # placed.Placer, made for the first placed experiment
        self.writes: dict[str, asyncio.Task] = {}  # each run's latest record on its way to a store

    # ------------------------------------------------------------------ changes

    def touch(self, entry: Entry | None = None) -> None:
        """Something changed: a run's state (``entry``) or a log grew; wake the long polls."""
        if entry is not None:
            self.seq += 1
            entry.seq = self.seq
        self.changed.set()
        self.changed = asyncio.Event()

    async def wait_change(self, timeout: float) -> None:
        event = self.changed
        try:
            await asyncio.wait_for(event.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            pass

    async def tick(self) -> None:
        """Notice logs that grew (the runners write them; nobody tells the service)."""
        checked = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            if time.monotonic() - checked >= UPGRADE_CHECK_S:
                checked = time.monotonic()
                self.notice_upgrade()
            grew = False
            for entry in list(self.entries.values()):
                if entry.state != RunState.RUNNING:
                    continue
                if entry.placed:
                    grew = await self.placer.refresh(entry) or grew
                    continue
                try:
                    size = entry.log_path.stat().st_size if entry.log_path else 0
                except OSError:
                    size = 0
                if size != entry.log_size:
                    entry.log_size, grew = size, True
            if grew:
                self.touch()

    # ------------------------------------------------------------------ runs

    def start(self, batch: Batch, entry: Entry) -> None:
        entry.log_path = self.logs_dir / f"{entry.run_id}.log"
        entry.handle = self.launcher.start(batch.folder, entry.spec, entry.log_path, {"PYTHONUNBUFFERED": "1"})
        entry.state, entry.started, entry.pid, entry.node = RunState.RUNNING, time.time(), entry.handle.pid, self.node
        entry.begin(self.node)
        batch.running += 1
        asyncio.get_running_loop().add_reader(entry.handle.sentinel, self.ended, batch, entry, None)
        say(f"run {entry.run_id} ({entry.exp_name or 'unnamed'}) started on {entry.node}, pid {entry.pid}")
        self.touch(entry)

    def ended(self, batch: Batch, entry: Entry, code: int | None) -> None:
        """An experiment's process ended (``code``: its exit code, read here for a fork)."""
        if entry.state.is_terminal():
            return
        if not entry.placed:
            asyncio.get_running_loop().remove_reader(entry.handle.sentinel)
            code = entry.handle.exitcode()
        entry.code = code
        entry.ended = time.time()
        state = protocol.ended_as(code, entry.lost, entry.stop_requested)
        if state == RunState.LOST and not entry.lost:
            entry.lost = "dvcray's runner went away mid-run (it saved what it had)"
        began = bool(entry.attempts) and entry.attempts[-1].number == entry.attempt
        if began or state == RunState.LOST:  # lost before it began: its attempt counts all the same
            if not began:
                entry.attempts.append(Attempt(entry.attempt))
            current = entry.attempts[-1]
            current.ended, current.state, current.lost = entry.ended, state, entry.lost
        try:
            entry.log_size = entry.log_path.stat().st_size if entry.log_path else entry.log_size
        except OSError:
            pass
        batch.running -= 1
        took = entry.ended - (entry.started or entry.ended)
        say(f"run {entry.run_id} attempt {entry.attempt} ended {state.value} (exit {code}) after {took:.1f}s on "
            f"{entry.node}" + (f": {entry.lost}" if entry.lost else ""))
        if entry.placed and protocol.retry(state, entry.attempt, batch.manifest.retries, entry.stop_requested,
                                           self.draining):
            self.again(batch, entry)
        else:
            entry.state = state
            if state == RunState.LOST and len(entry.attempts) > 1:
                entry.lost = protocol.losses_text(entry.attempts)
            if state == RunState.LOST or entry.attempt > 1:
                self.record(batch, entry, ended=state)
        self.touch(entry)
        self.pump(batch)

    def again(self, batch: Batch, entry: Entry) -> None:
        """Put a lost experiment back in its batch for its next attempt (first in line)."""
        lost, total = entry.attempts[-1], batch.manifest.retries
        entry.attempt += 1
        entry.spec = {**entry.spec, "attempt": entry.attempt, "before": [a.to_json() for a in entry.attempts]}
        entry.state, entry.lost, entry.code, entry.pid, entry.mirrored = RunState.PENDING, "", None, 0, 0
        entry.log_size = retries.append(entry.log_path, retries.lost_line(lost, entry.attempt - 1, total)) \
            or entry.log_size
        batch.pending.insert(0, entry)
        say(f"run {entry.run_id}: {lost.text()}; retry {entry.attempt - 1} of {total}")
        self.record(batch, entry)

    def record(self, batch: Batch, entry: Entry, ended: RunState | None = None) -> None:
        """The run's attempts to the store, in the background (``retries.record``), one write
        of a run after the other (an older list never lands after a newer one)."""
        attempts = [Attempt(**vars(a)) for a in entry.attempts]
        before = self.writes.get(entry.run_id)

        async def write() -> None:
            if before is not None:
                await asyncio.wait([before])
            problem = await asyncio.to_thread(retries.record, batch.manifest, entry.run_id, entry.exp_name,
                                              attempts, ended)
            if problem:
                say(f"run {entry.run_id}: could not record its attempts in the store: {problem}")

        task = self.writes[entry.run_id] = asyncio.get_running_loop().create_task(write())
        task.add_done_callback(lambda done: self.writes.pop(entry.run_id, None) if self.writes.get(
            entry.run_id) is done else None)

    def pump(self, batch: Batch) -> None:
        """Start the batch's next experiments while it has room; forget it once all ended."""
        while batch.pending and batch.running < batch.limit and not self.draining:
            entry = batch.pending.pop(0)
            if entry.placed:
                batch.running += 1
                self.placer.start(batch, entry)
            else:
                self.start(batch, entry)
        if not batch.pending and batch.running <= 0:
            self.batches.pop(batch.job_id, None)
            self.prune()

    def stop_entry(self, entry: Entry) -> None:
        """SIGTERM (the runner saves its work), SIGKILL after the grace; a run not
        started yet never starts."""
        entry.stop_requested = True
        batch = self.batches.get(entry.job_id)
        if entry.state == RunState.PENDING and batch is not None and entry in batch.pending:
            batch.pending.remove(entry)
            entry.state, entry.ended = RunState.STOPPED, time.time()
            if entry.attempts:  # stopped while it waited for a retry
                self.record(batch, entry, ended=RunState.STOPPED)
            self.touch(entry)
            self.pump(batch)
            return
        if entry.state != RunState.RUNNING and not (entry.placed and entry.state == RunState.PENDING):
            return
        if entry.placed:
            self.placer.stop(entry, self.grace)
            return
        entry.handle.terminate()
        asyncio.get_running_loop().call_later(self.grace, self._kill_if_running, entry)

    def _kill_if_running(self, entry: Entry) -> None:
        if entry.state == RunState.RUNNING and entry.handle is not None:
            entry.handle.kill()

    def prune(self) -> None:
        """Forget the oldest finished runs and their logs; keep the snapshots of the last
        submissions (as Ray keeps a job's package on its node: what a run received can
        be looked at afterwards)."""
        done = sorted((p for p in self.snapshots.iterdir() if not p.name.startswith(".")
                       and p.name not in self.batches), key=lambda p: p.stat().st_mtime)
        for old in done[:max(0, len(done) - KEEP_SNAPSHOTS)]:
            shutil.rmtree(old, ignore_errors=True)
        finished = [e for e in self.entries.values() if e.state.is_terminal()]
        for entry in sorted(finished, key=lambda e: e.ended or 0)[:max(0, len(finished) - KEEP_FINISHED)]:
            self.entries.pop(entry.run_id, None)
            if entry.log_path is not None:
                entry.log_path.unlink(missing_ok=True)

    async def read_log(self, entry: Entry, offset: int) -> bytes:
        if entry.log_path is None or offset >= entry.log_size:
            return b""
        try:
            with open(entry.log_path, "rb") as f:
                f.seek(offset)
                return f.read(LOG_CHUNK)
        except OSError:
            return b""

    # ------------------------------------------------------------------ submissions

    async def receive(self, request) -> tuple[Path, Manifest]:
        """Unpack the snapshot the request carries into a folder of its own."""
        tmp = self.snapshots / f".incoming-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir(parents=True)
        tar_path = tmp.with_suffix(".tar")
        try:
            with open(tar_path, "wb") as f:
                async for chunk in request.content.iter_chunked(1 << 20):
                    f.write(chunk)
            await asyncio.to_thread(_unpack, tar_path, tmp)
            manifest = Manifest.read(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            tar_path.unlink(missing_ok=True)
        return tmp, manifest

    async def submit(self, request) -> tuple[int, dict[str, Any]]:
        if self.notice_upgrade():
            return 503, {"error": "this runner service is draining: start another"}
        try:
            tmp, manifest = await self.receive(request)
        except (ValueError, OSError, tarfile.TarError) as exc:
            return 400, {"error": f"not a snapshot: {exc}"}
        job_id = manifest.run_id
        folder = self.snapshots / job_id
        if not _SAFE_ID.fullmatch(job_id) or folder.exists() or job_id in self.batches:
            shutil.rmtree(tmp, ignore_errors=True)
            return 409, {"error": f"a submission {job_id!r} exists already"}
        if not compatible(manifest.dvcray_version):
            shutil.rmtree(tmp, ignore_errors=True)
            return 400, {"error": f"this cluster runs dvcray {__version__}, the client dvcray "
                                  f"{manifest.dvcray_version}: install the same version on both"}
        os.replace(tmp, folder)
        if manifest.repo_root:
            bundle = folder / snapshot.BUNDLE
            missing = await asyncio.to_thread(snapshot.cache_fetch, snapshot.cache_path(self.base, manifest.repo_root),
                                              bundle if bundle.exists() else None, manifest.baseline)
            if missing:
                shutil.rmtree(folder, ignore_errors=True)
                return 409, {"error": "the cluster's copy of the repository lacks commits the snapshot needs",
                             "missing": missing}
        placement = request.query.get("placement")
        resources = protocol.parse_placement(placement)
        entries = []
        for spec in manifest.specs():
            entry = Entry(spec.run_id, job_id, spec.exp_name, spec.to_json(), placed=bool(resources))
            if entry.run_id in self.entries or not _SAFE_ID.fullmatch(entry.run_id):
                shutil.rmtree(folder, ignore_errors=True)
                return 409, {"error": f"run {entry.run_id!r} exists already or is no run id"}
            entries.append(entry)
        if resources and self.placer is None:
            from dvcray_cli.service.placed import Placer

            self.placer = await Placer.make(self)
        limit = manifest.jobs or (len(entries) if resources else min(len(entries), default_limit()))
        batch = Batch(job_id, folder, manifest, list(entries), max(1, limit), resources=resources)
        for entry in entries:
            self.entries[entry.run_id] = entry
            self.touch(entry)
        self.batches[job_id] = batch
        say(f"submission {job_id}: {len(entries)} experiment(s), at most {batch.limit} at once"
            + (f", each reserving {resources}" if resources else ""))
        self.pump(batch)
        return 200, {"job_id": job_id, "runs": [e.run_id for e in entries], "service_id": self.service_id}

    def notice_upgrade(self) -> bool:
        """Whether this service drains (takes no new runs, leaves once its runs have ended):
        from the moment dvcray on its node was upgraded, so that clients start another."""
        if not self.draining and self.outdated():
            self.draining = True
            say("dvcray on this node was upgraded: no new runs here; leaving once the runs going have ended")
        return self.draining

    def outdated(self) -> bool:
        """The dvcray installed on this node is no longer the one this service runs:
        it takes no new runs, and leaves once its runs have ended."""
        import dvcray_cli

        try:
            text = Path(dvcray_cli.__file__).read_text()
        except OSError:
            return False
        found = re.search(r'__version__ = "([^"]+)"', text)
        return bool(found) and found.group(1) != __version__

    # ------------------------------------------------------------------ polls

    async def poll(self, request: PollRequest) -> PollAnswer:
        """State changes after ``request.after`` of the runs it watches, and new log bytes of
        the runs in ``request.logs``: at once when there are some, else when some come, at
        most ``request.wait`` seconds later."""
        deadline = time.monotonic() + min(request.wait, MAX_WAIT_S)
        while True:
            # The changes up to ``seq``; reading a placed run's log awaits, and a change made
            # meanwhile comes with the next poll (answering a later seq would lose it).
            seq = self.seq
            runs = {r: self.entries[r].report() for r in request.watch
                    if r in self.entries and self.entries[r].seq > request.after}
            unknown = [r for r in request.watch if r not in self.entries]
            logs = {}
            for run_id, offset in request.logs.items():
                entry = self.entries.get(run_id)
                data = await self.read_log(entry, offset) if entry is not None else b""
                if data:
                    logs[run_id] = (offset, data)
            if runs or logs or unknown or time.monotonic() >= deadline:
                return PollAnswer(seq, runs, logs, unknown)
            await self.wait_change(deadline - time.monotonic())

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self, lost: str | None = None) -> None:
        """Stop taking runs; every running experiment saves its work (SIGTERM, the grace,
        SIGKILL); then leave. ``lost``: why the cluster is gone, when that is why: the
        runners then record their runs LOST, not STOPPED (``runner.CLUSTER_GONE``)."""
        if self.draining and not self.entries:
            return
        self.draining = True
        say("stopping: every running experiment saves its work first")
        if lost:
            from dvcray_cli.runner import CLUSTER_GONE

            for batch in list(self.batches.values()):
                try:
                    (batch.folder / CLUSTER_GONE).write_text(lost)
                except OSError as exc:
                    say(f"could not mark {batch.folder} as lost: {exc}")
        for entry in list(self.entries.values()):
            if entry.state in (RunState.RUNNING, RunState.PENDING):
                entry.lost = entry.lost or (lost or "")
                self.stop_entry(entry)
        deadline = time.monotonic() + self.grace + 5
        while any(e.state == RunState.RUNNING for e in self.entries.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)


def _unpack(tar_path: Path, dest: Path) -> None:
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
