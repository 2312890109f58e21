"""Runs after submission: list them, show their logs, stop them, bring them home.

A run has two sources of truth. The cluster knows its Ray job (status, live
log) for as long as the cluster lives; the store keeps ``status.json``,
``log.txt``, ``result.json`` and the experiment's bundle for good
(``dvcray/runs/RUN_ID/``). The client's records (``.dvcray/runs/``) say where
each run went. Everything here asks the cluster first and falls back on the
store, so runs, logs and pull keep working after the cluster is gone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from dvcray_cli import clusters, gitutil, ray_api
from dvcray_cli.errors import ClusterError, ExperimentFailed, StoreError, UsageError
from dvcray_cli.runs import follow as following
from dvcray_cli.runs import warm
from dvcray_cli.runs.model import (MANIFEST, RESULT, STATUS, ExpRef, Manifest, RunRecord, RunResult, RunState,
                                   RunStatus, valid_exp_name)
from dvcray_cli.runs.project import find_project, import_experiment, pull_outputs
from dvcray_cli.store import Store

# How many of a store's newest runs `runs` and `pull` look at beyond this clone's records.
SCAN_LIMIT = 200
LIST_HINT = "See this repo's runs with: dvcray runs"


@dataclass
class RunInfo:
    """One run as ``dvcray runs`` shows it."""

    run_id: str
    exp_name: str | None
    state: RunState
    submitted: float | None = None  # Unix time
    started: float | None = None
    ended: float | None = None
    baseline: str | None = None
    address: str | None = None      # the cluster it was submitted to (None: found only in the store)
    store: str = ""
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    source: str = "record"          # "record": submitted from this clone; "store": found in the store

    @property
    def duration(self) -> float | None:
        if self.started is None:
            return None
        end = self.ended if self.ended is not None else (time.time() if self.state.is_active() else None)
        return None if end is None else max(0.0, end - self.started)

    def key_metric(self) -> tuple[str, Any] | None:
        """The first metric the run reported, as ``(name, value)``."""
        for values in self.metrics.values():
            for name, value in (values or {}).items():
                return name, value
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "exp_name": self.exp_name, "state": self.state.value,
            "submitted": _iso(self.submitted), "started": _iso(self.started), "ended": _iso(self.ended),
            "duration_s": None if self.duration is None else round(self.duration, 3),
            "baseline": self.baseline, "address": self.address, "store": self.store,
            "metrics": self.metrics, "error": self.error, "source": self.source,
        }


@dataclass
class StopResult:
    run_id: str
    exp_name: str | None
    state: RunState
    already_finished: bool
    waited_s: float = 0.0
    saved: bool = False  # the runner wrote its result.json (log, outputs and record are in the store)
    store: str = ""


@dataclass
class PullResult:
    run_id: str
    exp_name: str
    ref: str
    exp_sha: str
    fetched: int  # files brought into the local DVC cache
    store: str
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- what is known of a run


@dataclass
class _Run:
    """A run and what its record and its store say; the store's files are read lazily."""

    run_id: str
    store: Store
    record: RunRecord | None = None
    _files: dict[str, dict[str, Any] | None] = field(default_factory=dict, repr=False)
    problems: dict[str, str] = field(default_factory=dict, repr=False)  # file -> what is wrong with it

    def read(self, name: str) -> dict[str, Any] | None:
        """A record of the run in the store; None when missing or unusable (then
        ``problems`` says which file is bad)."""
        if name not in self._files:
            data, problem = self.store.read_record(self.store.run_path(self.run_id, name))
            self._files[name] = data
            if problem:
                self.problems[name] = problem
        return self._files[name]

    @property
    def result(self) -> RunResult | None:
        return RunResult.from_json(self.read(RESULT))

    @property
    def status(self) -> RunStatus | None:
        return RunStatus.from_json(self.read(STATUS))

    @property
    def manifest(self) -> Manifest | None:
        return Manifest.from_json(self.read(MANIFEST))

    @property
    def job_id(self) -> str:
        """The Ray Job that ran it: its own, or the one a sweep's experiments share."""
        if self.record:
            return self.record.job_id or self.run_id
        manifest = self.manifest
        return (manifest.run_id if manifest else None) or self.run_id

    @property
    def address(self) -> str | None:
        """Where this clone submitted it. A store's word is never an address to send
        a token to: a run known only from the store has none (its state comes
        from the store, or from a cluster configured here)."""
        return self.record.address if self.record else None

    def exp_name(self) -> str | None:
        # The record first: it costs no read of the store. The runner's result
        # names experiments that DVC named itself.
        if self.record and self.record.exp_name:
            return self.record.exp_name
        for source in (self.result, self.manifest):
            if source is not None and source.exp_name:
                return source.exp_name
        return None

    def baseline(self) -> str | None:
        for source in (self.record, self.result, self.manifest):
            if source is not None and source.baseline:
                return source.baseline
        return None

    def submitted(self) -> float | None:
        if self.record and self.record.submitted:
            return self.record.submitted
        manifest = self.manifest
        return (manifest.created if manifest else None) or _time_of(self.run_id)


@dataclass
class _Context:
    git_root: Path
    config: Any                # DVC's config (all levels), for the stores' secrets
    stores: list[Store]        # where to look for runs this clone did not submit


def _context(cwd: Path, store_url: str | None = None) -> _Context:
    root = gitutil.git_root(cwd)
    if root is None:
        raise UsageError(f"{cwd} is not in a git repository.", "Run dvcray inside your DVC project.")
    dvc_root = gitutil.dvc_root(cwd.resolve(), root)
    config: Any = {}
    if dvc_root is not None:
        from dvc.config import Config

        try:
            config = Config(dvc_dir=os.fspath(dvc_root / ".dvc"))
        except Exception as exc:  # a broken .dvc/config: say so instead of a traceback
            raise UsageError(f"Could not read the DVC config in {dvc_root / '.dvc'}: {exc}") from None
    from dvcray_cli import store as store_mod

    holder = SimpleNamespace(config=config)
    if store_url:
        stores = [store_mod.resolve(store_url, holder if config else None)]
    else:
        stores = [store_mod.resolve(None, holder if config else None)]
        for record in RunRecord.all(root):
            if record.store.get("url"):
                stores.append(store_mod.from_record(record.store, holder if config else None))
    unique: dict[str, Store] = {}
    for s in stores:
        unique.setdefault(s.url.rstrip("/"), s)
    return _Context(root, config, list(unique.values()))


def _record_run(ctx: _Context, record: RunRecord) -> _Run:
    from dvcray_cli import store as store_mod

    if not record.store.get("url"):
        return _Run(record.run_id, ctx.stores[0], record)
    url = str(record.store["url"]).rstrip("/")
    # One Store (and so one filesystem client) per URL.
    store = next((s for s in ctx.stores if s.url.rstrip("/") == url), None)
    if store is None:
        store = store_mod.from_record(record.store, SimpleNamespace(config=ctx.config) if ctx.config else None)
    return _Run(record.run_id, store, record)


def _in_repo(git_root: Path, shas: list[str]) -> set[str]:
    """The commits among ``shas`` that this repository has (one ``git cat-file`` call)."""
    shas = [s for s in dict.fromkeys(shas) if s]
    if not shas:
        return set()
    out = gitutil.git("cat-file", "--batch-check", cwd=git_root,
                      input="".join(f"{s}^{{commit}}\n" for s in shas).encode())
    found = set()
    for sha, line in zip(shas, out.splitlines()):
        if not line.endswith("missing") and " commit " in line:
            found.add(sha)
    return found


def _store_runs(ctx: _Context, skip: set[str], want: int | None = None) -> list[_Run]:
    """Runs in the stores that this clone has no record of but whose baseline it
    has (submitted from another clone), newest first; at most ``want``."""
    found: list[_Run] = []
    for store in ctx.stores:
        ids = [i for i in store.run_ids() if i not in skip][:SCAN_LIMIT]
        # Run ids sort by submission time: read the newest first, a batch at a time,
        # and stop once there are enough (each run costs a read or two of the store).
        for start in range(0, len(ids), 25):
            batch = [_Run(i, store) for i in ids[start:start + 25]]
            ours = _in_repo(ctx.git_root, [r.baseline() or "" for r in batch])
            for run in batch:
                if run.baseline() in ours:
                    found.append(run)
                    skip.add(run.run_id)
            if want and sum(r.store is store for r in found) >= want:
                break
    return found


# --------------------------------------------------------------------------- the cluster's view


class _Clusters:
    """One job client per address, made at most once; None where nothing answers."""

    def __init__(self) -> None:
        self._clients: dict[str, Any] = {}
        self._jobs: dict[str, dict[str, Any] | None] = {}
        self._services: dict[str, tuple[Any, dict[str, Any] | None]] = {}
        self.errors: dict[str, str] = {}

    def service(self, address: str | None) -> tuple[Any, dict[str, Any] | None]:
        """The runner service this machine knows for ``address`` and its runs
        (``{run_id: info}``); ``(None, None)`` when it does not answer."""
        if not address:
            return None, None
        if address not in self._services:
            service, runs = None, None
            dead = clusters.dead_at(address)
            if dead is not None:  # its service may linger a while, but its runs are gone
                self.errors[address] = f"the Ray cluster {dead!r} died (its GCS process is gone)"
                self._services[address] = (None, None)
                return None, None
            try:
                service = warm.find(address)
                runs = warm.runs_of(service) if service is not None else None
            except ClusterError as exc:
                self.errors[address] = exc.message
            self._services[address] = (service, runs)
        return self._services[address]

    def client(self, address: str | None):
        if not address:
            return None
        if address not in self._clients:
            dead = clusters.dead_at(address)
            if dead is not None:
                # Its dashboard may linger and answer only after long GCS timeouts.
                self._clients[address] = None
                self.errors[address] = f"the Ray cluster {dead!r} died (its GCS process is gone)"
                return None
            try:
                self._clients[address] = clusters.connect(address)
            except ClusterError as exc:
                self._clients[address] = None
                self.errors[address] = exc.message
            except Exception as exc:  # e.g. Ray's AuthenticationError: treat as not answering
                self._clients[address] = None
                self.errors[address] = f"{type(exc).__name__}: {exc}"
        return self._clients[address]

    def jobs(self, address: str | None) -> dict[str, Any] | None:
        """``{submission_id: JobDetails}`` of the cluster at ``address``; None if it does not answer."""
        client = self.client(address)
        if client is None:
            return None
        if address not in self._jobs:
            try:
                self._jobs[address] = {j.submission_id: j for j in client.list_jobs() if j.submission_id}
            except Exception as exc:
                self._jobs[address] = None
                self.errors[address] = f"{type(exc).__name__}: {exc}"
        return self._jobs[address]


def _status(job) -> RunState:
    return RunState.parse(job.status, RunState.PENDING)


def _info(run: _Run, seen: _Clusters, fallbacks: list[str], git_root: Path) -> RunInfo:
    record = run.record
    info = RunInfo(run_id=run.run_id, exp_name=run.exp_name(), state=record.state if record else RunState.PENDING,
                   submitted=run.submitted(), baseline=run.baseline(), address=run.address,
                   store=run.store.url, source="record" if record else "store")
    if record and record.state.is_terminal() and record.ended:
        # Final and already looked up once: nothing can change any more.
        info.started, info.ended = record.started, record.ended
        info.metrics, info.error = record.metrics, record.error
        return info

    job = None
    if record and record.service:  # run by the cluster's runner service, not a Ray Job of its own
        job = warm.as_job((seen.service(run.address)[1] or {}).get(run.run_id))
    for address in ([] if record and record.service else [run.address] if run.address else fallbacks):
        jobs = seen.jobs(address)
        if jobs is None:
            continue
        job = jobs.get(run.job_id)
        if job is not None:
            info.address = address
            break

    result = run.result
    status = run.status
    if result and result.is_final():
        # The runner's own word; a job that a sweep's experiments share runs on
        # after this one has ended.
        info.state = result.status
    elif job is not None and _status(job).is_active():
        info.state = _status(job)
    elif job is not None and (died := getattr(job, "lost", "") or ray_api.node_died_of(job)):
        info.state = RunState.LOST  # its machine went away
        info.error = died
    elif job is not None:  # ended without a result: the runner was killed before it could save
        info.state = _status(job)
        info.error = "the runner ended without saving a result"
    elif record and record.state.is_terminal():
        pass  # `dvcray run` saw it end (the cluster said so) before the cluster went
    elif record:
        # Submitted from here and the cluster is gone or forgot the job; no final result.
        info.state = RunState.LOST
    elif status is not None and status.is_stale():
        # Found only in the store, and its runner has not been heard of for long.
        info.state = RunState.LOST
        info.error = "no sign of life in the store for a while, and no cluster here knows it"
    else:
        # Found only in the store, from a clone that may use a cluster this one
        # cannot see: what the store last said.
        info.state = status.state if status else RunState.PENDING

    times: Any = result or status
    info.started = (times.started if times else None) or \
        (job.start_time / 1000 if job is not None and job.start_time else None)
    info.ended = (times.ended if times else None) or \
        (job.end_time / 1000 if job is not None and job.end_time else None)
    if result:
        info.metrics = result.metrics
        info.error = result.error or info.error
        info.exp_name = result.exp_name or info.exp_name
        if result.push_error and not info.error:
            info.error = f"its outputs did not reach the store ({result.push_error})"
    if run.problems:
        info.error = "; ".join(run.problems.values())
    if record and info.state.is_terminal():
        RunRecord.update(git_root, run.run_id, state=info.state, exp_name=info.exp_name,
                         started=info.started, ended=info.ended or time.time(),
                         metrics=info.metrics, error=info.error)
    return info


def _time_of(run_id: str) -> float | None:
    """The submission time encoded in a run id (``dvcray-YYYYmmdd-HHMMSS-xxxxxx``)."""
    try:
        stamp = datetime.strptime(run_id[7:22], "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return stamp.timestamp()


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- runs


def list_runs(cwd: Path, store: str | None = None, limit: int | None = None) -> list[RunInfo]:
    """This repo's runs, newest first, with their states refreshed.

    The runs this clone submitted (its records), and the runs in the store
    whose baseline commit this repo has (submitted from another clone). States
    come from the cluster when it answers, else from the store; a run whose
    cluster is gone and whose store has no final result is LOST.

    Args:
        cwd: a folder inside the project.
        store: look in this store only (default: the stores of the records and
            the default store).
        limit: at most this many runs (newest).

    Raises:
        UsageError: not in a git repository.
        StoreError: a store could not be read.
    """
    ctx = _context(cwd, store)
    runs = [_record_run(ctx, record) for record in RunRecord.all(ctx.git_root)
            if not store or str(record.store.get("url", "")).rstrip("/") == ctx.stores[0].url.rstrip("/")]
    runs += _store_runs(ctx, {r.run_id for r in runs}, want=limit)
    runs.sort(key=lambda r: (r.submitted() or 0, r.run_id), reverse=True)
    if limit:
        runs = runs[:limit]
    seen = _Clusters()
    fallbacks = clusters.fallback_addresses() if any(r.record is None for r in runs) else []
    return [_info(r, seen, fallbacks, ctx.git_root) for r in runs]


def _locate(ctx: _Context, key: str, prefer_success: bool = False) -> _Run:
    """The run ``key`` names: a run id, an experiment name (newest run of that
    name), or the unique end of a run id; records first, then the stores."""
    key = key.strip()
    recs = RunRecord.all(ctx.git_root)  # newest first
    for record in recs:
        if record.run_id == key:
            return _record_run(ctx, record)
    for store in ctx.stores:
        if key.startswith("dvcray-") and store.read_json(store.run_path(key, MANIFEST)) is not None:
            return _Run(key, store)

    by_name = [_record_run(ctx, r) for r in recs]
    matches = [r for r in by_name if r.exp_name() == key]
    if not matches:
        matches = [r for r in _store_runs(ctx, {r.run_id for r in by_name}) if r.exp_name() == key]
        matches.sort(key=lambda r: (r.submitted() or 0, r.run_id), reverse=True)
    if matches:
        if prefer_success:
            good = [r for r in matches if r.result is not None and r.result.status == RunState.SUCCEEDED]
            return (good or matches)[0]
        return matches[0]

    ids = {r.run_id for r in recs}
    for store in ctx.stores:
        ids.update(store.run_ids()[:SCAN_LIMIT])
    ends = sorted(i for i in ids if len(key) >= 4 and i.endswith(key))
    if len(ends) == 1:
        return _locate(ctx, ends[0])
    if len(ends) > 1:
        raise UsageError(f"'{key}' matches several runs: {', '.join(ends)}.", "Give the whole run id.")
    where = ", ".join(s.url for s in ctx.stores)
    raise UsageError(f"No run or experiment named '{key}' in this repo's records or in the store ({where}).",
                     f"{LIST_HINT} (a run from another store: --store URL).")


# --------------------------------------------------------------------------- stop


def stop(cwd: Path, key: str, store: str | None = None, timeout: float | None = None,
         say: Callable[[str], None] = lambda m: None) -> StopResult:
    """Stop run ``key``'s Ray job and wait until it has ended.

    Ray sends the runner SIGTERM and gives it ``RAY_JOB_STOP_WAIT_TIME_S``
    (set at submission) to push what it has, its log and ``result.json``.

    Raises:
        UsageError: no such run.
        ClusterError: the run's cluster does not answer, does not know the run,
            or the job did not end in time.
    """
    ctx = _context(cwd, store)
    run = _locate(ctx, key)
    name = run.exp_name()
    result = run.result
    if result and result.is_final():
        return StopResult(run.run_id, name, result.status, True, saved=True, store=run.store.url)

    if run.record and run.record.service:
        return _stop_service_run(ctx, run, name, timeout, say)
    addresses = [run.address] if run.address else clusters.fallback_addresses()
    if not addresses:
        raise ClusterError(f"Run {run.run_id} was not submitted from this clone and no cluster is configured here.",
                           f"Point dvcray at its cluster: RAY_ADDRESS=http://HOST:8265 dvcray stop {run.run_id}")
    client, job = None, None
    problems = []
    for address in addresses:
        try:
            client = clusters.connect(address)
            job = client.get_job_info(run.job_id)
            break
        except ClusterError as exc:
            problems.append(exc.message)
        except Exception:  # the cluster answers but does not know the run
            problems.append(f"the cluster at {address} does not know run {run.run_id}")
        client = None
    if client is None:
        raise ClusterError(f"Cannot stop run {run.run_id}: {'; '.join(p.rstrip('.') for p in problems)}.",
                           f"If its cluster is gone, so is the run; what it saved: dvcray logs {run.run_id}")

    job_state = _status(job)
    started = time.monotonic()
    if not job_state.is_terminal():
        say(f"Stopping run {run.run_id}; its runner saves what it has before it ends...")
        if run.job_id != run.run_id:
            say(f"It shares Ray Job {run.job_id} with the other experiments of its sweep: they stop too.")
        client.stop_job(run.job_id)
        deadline = started + (timeout if timeout is not None else ray_api.stop_grace_s() + 15)
        while not job_state.is_terminal():
            if time.monotonic() > deadline:
                raise ClusterError(f"Run {run.run_id} did not end within {deadline - started:.0f}s of being stopped.",
                                   f"Check it: dvcray runs; dvcray logs {run.run_id}")
            time.sleep(0.3)
            job_state = _status(client.get_job_info(run.job_id))
        already = False
    else:
        already = True
    waited = time.monotonic() - started
    final = following.fetch_result(run.store, run.run_id, wait_s=0 if already else 5)
    if final:
        job_state = final.status
        name = final.exp_name or name
    if run.record:
        RunRecord.update(ctx.git_root, run.run_id, state=job_state)
    return StopResult(run.run_id, name, job_state, already, waited, saved=final is not None, store=run.store.url)


def _stop_service_run(ctx: _Context, run: _Run, name: str | None, timeout: float | None,
                      say: Callable[[str], None]) -> StopResult:
    """Stop a run of the cluster's runner service: SIGTERM, the grace to save, SIGKILL."""
    service, runs = _Clusters().service(run.address)
    known = (runs or {}).get(run.run_id)
    if service is None or known is None:
        raise ClusterError(f"Cannot stop run {run.run_id}: the runner service of the cluster at {run.address} "
                           f"{'does not know it' if service else 'does not answer'}.",
                           f"If its cluster is gone, so is the run; what it saved: dvcray logs {run.run_id}")
    started = time.monotonic()
    already = RunState.parse(known.get("state"), RunState.PENDING).is_terminal()
    if not already:
        say(f"Stopping run {run.run_id}; its runner saves what it has before it ends...")
        found = warm.stop(service, [run.run_id], timeout)
        if not ray_api.is_terminal(found.get(run.run_id, "")):
            raise ClusterError(f"Run {run.run_id} did not end within {time.monotonic() - started:.0f}s of being "
                               "stopped.", f"Check it: dvcray runs; dvcray logs {run.run_id}")
    final = following.fetch_result(run.store, run.run_id, wait_s=0 if already else 5)
    state_ = final.status if final else RunState.parse(known.get("state"), RunState.STOPPED)
    RunRecord.update(ctx.git_root, run.run_id, state=state_)
    return StopResult(run.run_id, (final.exp_name if final else None) or name, state_, already,
                      time.monotonic() - started, saved=final is not None, store=run.store.url)


# --------------------------------------------------------------------------- pull


def pull(cwd: Path, key: str, store: str | None = None, as_name: str | None = None,
         force: bool = False) -> PullResult:
    """Bring experiment ``key`` (a run id or an experiment name) into this repo
    from the store: its git ref and its outputs (into the local DVC cache).

    Nothing comes from the cluster, and the user's DVC config is not changed
    (the store is an in-memory remote). Afterwards ``dvc exp apply NAME``
    restores the outputs in the workspace. The store is data: only the ref
    ``refs/exps/<baseline>/<name>`` of the run's own baseline is fetched from
    its bundle, and an experiment of that name here is never replaced unless
    ``force``; ``as_name`` brings it home under another name.

    Raises:
        UsageError: no such run, the run has not ended, its baseline commit is
            not in this repo, ``as_name`` is not a valid name, or the name is
            taken (``NameTaken``).
        ExperimentFailed: the run ended without an experiment.
        StoreError: the run's records or bundle are not what a run saves.
    """
    project = find_project(cwd)
    if as_name is not None and not valid_exp_name(as_name):
        raise UsageError(f"'{as_name}' is not a valid experiment name.",
                         "Use letters, digits, '-', '_' and '.'; no spaces or slashes.")
    ctx = _context(cwd, store)
    run = _locate(ctx, key, prefer_success=True)
    result = run.result
    if result is None:
        if RESULT in run.problems:
            raise StoreError(f"Run {run.run_id}: {run.problems[RESULT]}.", f"Its log: dvcray logs {run.run_id}")
        raise UsageError(f"Run {run.run_id} has not ended yet: there is nothing to pull.",
                         f"Wait for it: dvcray logs {run.run_id} --follow")
    if result.status != RunState.SUCCEEDED or not result.ref:
        raise ExperimentFailed(
            f"Run {run.run_id} ended {result.status.value} and saved no experiment"
            + (f": {result.error}" if result.error else "."),
            f"Its log: dvcray logs {run.run_id}")
    baseline = (run.record.baseline if run.record else "") or result.baseline or run.baseline() or ""
    ref = ExpRef.parse(result.ref)
    if ref is None or ref.baseline != baseline:
        raise StoreError(f"Run {run.run_id}'s result in the store names {result.ref!r}, which is not an experiment "
                         f"of its baseline {baseline[:7] or '(unknown)'}: nothing was fetched.",
                         "The store holds records dvcray did not write; ask who writes to it.")
    if baseline not in _in_repo(ctx.git_root, [baseline]):
        raise UsageError(f"Run {run.run_id} ran on commit {baseline[:7]}, which this repo does not have.",
                         "Fetch it first (git fetch / git pull), then rerun dvcray pull.")
    target, exp_sha = import_experiment(ctx.git_root, run.store, run.run_id, ref, as_name=as_name, force=force)
    fetched = pull_outputs(project, run.store, exp_sha)
    if run.record:
        RunRecord.update(ctx.git_root, run.run_id, state=RunState.SUCCEEDED, exp_name=target.name)
    return PullResult(run.run_id, target.name, str(target), exp_sha, fetched, run.store.url,
                      result.params, result.metrics)
