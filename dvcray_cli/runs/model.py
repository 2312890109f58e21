"""dvcray's records of runs, each defined once with its own JSON I/O.

- ``RunState``: where a run is (PENDING ... LOST), with ``is_terminal``: defined with the
  runner service's protocol (``dvcray_cli.service.protocol``), which speaks it too.
- ``ExpRef``, ``RunId``: an experiment's ref and a run's id (``ids.py``, re-exported here).
- ``Manifest``: what the runner needs to rebuild the workspace and run
  (``manifest.json`` in the snapshot and in the store).
- ``RunStatus``: the runner's heartbeat (``status.json`` in the store).
- ``RunResult``: the runner's final word (``result.json`` in the store); ``Attempt``: one try
  of a run (``attempts.json``, written by the runner service once a run was retried or lost).
- ``RunRecord``: what this clone remembers of a run it submitted
  (``<repo>/.dvcray/runs/RUN_ID.json``).
- ``RunOptions``, ``ExpSpec``, ``Outcome``: a run as asked for and as it ended.

Records from a store are shared data: ``from_json`` never trusts a type, an
unknown key is ignored, and anything unusable reads as None.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dvcray_cli import files
from dvcray_cli.runs.ids import SHA as _SHA
from dvcray_cli.runs.ids import ExpRef, RunId, valid_exp_name
from dvcray_cli.service.protocol import Attempt, RunState, attempts_of

__all__ = ["Attempt", "ExpRef", "RunId", "RunState", "valid_exp_name"]  # re-exported: defined elsewhere

# The files of a run in the store, under ``dvcray/runs/RUN_ID/``.
MANIFEST = "manifest.json"
STATUS = "status.json"
RESULT = "result.json"
LOG = "log.txt"
LOG_PARTS = "log.parts"   # the log while it grows: numbered pieces, each uploaded once
BUNDLE = "exp.bundle"
ATTEMPTS = "attempts.json"  # every try of a run that was retried or lost (written by the runner service)
# The runner rewrites status.json this often; a run silent for STALE_AFTER_S
# whose cluster does not answer is LOST, not RUNNING forever.
HEARTBEAT_EVERY_S = 30.0
STALE_AFTER_S = 3 * HEARTBEAT_EVERY_S


# A file name inside a snapshot folder: no path separators, not hidden.
_SAFE_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


# --------------------------------------------------------------------------- what a run is asked to do


@dataclass
class RunOptions:
    """``dvcray run``'s options, as the core takes them."""

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
    env: list[str] = field(default_factory=list)  # --env NAME=VALUE / NAME, as given (runs.stage_env)
    retries: int | None = None  # how often a run lost with its machine is retried (None: the project's, or 3)


@dataclass
class ExpSpec:
    """One experiment of a run: its run id (its records' folder), name and overrides.

    An experiment taken from DVC's queue brings its own workspace: ``baseline`` (the
    commit it was queued on, when not the run's), ``patch`` (a file of the snapshot
    holding its changes, instead of the workspace's) and ``options`` (``dvc exp run``
    options it was queued with: targets, force, message, ...).
    """

    run_id: str
    exp_name: str | None
    overrides: list[str] = field(default_factory=list)
    baseline: str = ""
    patch: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1   # which try this is (the runner service submits a lost one again)
    before: list[dict[str, Any]] = field(default_factory=list)  # the tries before it (Attempt JSON)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"run_id": self.run_id, "exp_name": self.exp_name,
                                "overrides": list(self.overrides)}
        data.update({k: v for k, v in (("baseline", self.baseline), ("patch", self.patch),
                                       ("options", self.options), ("before", self.before)) if v})
        if self.attempt > 1:
            data["attempt"] = self.attempt
        return data

    @classmethod
    def from_json(cls, data: Any) -> ExpSpec | None:
        spec = files.from_json(cls, data)
        if spec is None or not isinstance(spec.run_id, str):
            return None
        spec.baseline = spec.baseline if isinstance(spec.baseline, str) and _SHA.fullmatch(spec.baseline) else ""
        spec.patch = spec.patch if isinstance(spec.patch, str) and _SAFE_FILE.fullmatch(spec.patch) else ""
        spec.options = _mapping(spec.options)
        spec.attempt = spec.attempt if isinstance(spec.attempt, int) and spec.attempt > 1 else 1
        spec.before = [a.to_json() for a in attempts_of(spec.before)]
        return spec

    @property
    def own_workspace(self) -> bool:
        """Whether it runs a workspace of its own (a queued experiment), not the run's."""
        return bool(self.baseline or self.patch or self.options)


@dataclass
class Manifest:
    """What the runner needs to rebuild the workspace and run its experiments."""

    run_id: str
    baseline: str  # the user's HEAD sha
    subdir: str = ""  # the DVC project's path inside the git repo ("" at the top)
    exp_name: str | None = None
    overrides: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # force, downstream, message, ...
    copy_paths: list[str] = field(default_factory=list)
    git_name: str = ""
    git_email: str = ""
    store: dict[str, Any] = field(default_factory=dict)  # Store.to_json(): no secrets
    dvcray_version: str = ""
    created: float = 0.0
    address: str = ""  # the cluster it was submitted to, for clones that have no record of the run
    # A sweep's experiments sharing this job: [{"run_id", "exp_name", "overrides"}], run
    # at most `jobs` at once. Empty: the one experiment above.
    experiments: list[dict[str, Any]] = field(default_factory=list)
    jobs: int = 0
    # Tracked files git stops looking at, restored as they are locally:
    # {"assume_unchanged": [...], "skip_worktree": [...], "absent": [...]}.
    worktree_flags: dict[str, list[str]] = field(default_factory=dict)
    # The project's first commit, when the history comes from the node's repository
    # cache of the project (the runner service): the snapshot's bundle, if any, holds
    # only what the cache lacked. Empty: the bundle holds the whole history.
    repo_root: str = ""
    # Where in the store the snapshot's other files wait, when they were too big to travel
    # as the Ray Job's package (``dvcray/snapshots/JOB_ID``); the runner fetches them.
    parts: str = ""
    # How many commits the snapshot's bundle carries as first sent (0: none, the cluster had HEAD; -1:
    # not counted): what a thin bundle saved is visible in the store (DESIGN.md, "Snapshot").
    bundle_commits: int = -1
    # The stage's environment (runs/stage_env.py): variables by name (never secret-like names:
    # this goes to the store), and PYTHONPATH entries relative to the DVC root.
    env: dict[str, str] = field(default_factory=dict)
    pythonpath: list[str] = field(default_factory=list)
    # How often the runner service submits an experiment lost with its machine again (0: never).
    retries: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Manifest | None:
        manifest = files.from_json(cls, data)
        if manifest is None or not isinstance(manifest.run_id, str) or not isinstance(manifest.baseline, str):
            return None
        manifest.exp_name = _text(manifest.exp_name)
        manifest.address = manifest.address if isinstance(manifest.address, str) else ""
        manifest.repo_root = manifest.repo_root if isinstance(manifest.repo_root, str) and \
            _SHA.fullmatch(manifest.repo_root) else ""
        manifest.parts = manifest.parts if isinstance(manifest.parts, str) and \
            re.fullmatch(r"dvcray/snapshots/[A-Za-z0-9_.-]+", manifest.parts) and ".." not in manifest.parts else ""
        manifest.created = _number(manifest.created) or 0.0
        manifest.retries = manifest.retries if isinstance(manifest.retries, int) and manifest.retries > 0 else 0
        manifest.worktree_flags = {k: [p for p in v if isinstance(p, str)]
                                   for k, v in _mapping(manifest.worktree_flags).items() if isinstance(v, list)}
        manifest.env = {k: v for k, v in _mapping(manifest.env).items() if isinstance(v, str)}
        manifest.pythonpath = [p for p in manifest.pythonpath if isinstance(p, str)] \
            if isinstance(manifest.pythonpath, list) else []
        return manifest

    def specs(self) -> list[ExpSpec]:
        """The experiments this job runs: a sweep's, or the one of the manifest itself."""
        if self.experiments:
            return [s for s in (ExpSpec.from_json(e) for e in self.experiments) if s is not None]
        return [ExpSpec(self.run_id, self.exp_name, list(self.overrides))]

    def write(self, folder: Path) -> Path:
        return files.write_json(Path(folder) / MANIFEST, self.to_json(), mode=0o644)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """The manifest in ``folder`` (a snapshot).

        Raises:
            ValueError: it is missing or not a manifest.
        """
        manifest = cls.from_json(files.read_json(Path(folder) / MANIFEST))
        if manifest is None:
            raise ValueError(f"no valid {MANIFEST} in {folder}")
        return manifest


# --------------------------------------------------------------------------- what the runner says


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def attempt_file(attempt: int, name: str) -> str:
    """A run's file ``name`` as attempt ``attempt`` writes it in the run's store folder: the
    run's own for the first (as before retries existed), ``attempt-N/NAME`` for the others."""
    return name if attempt <= 1 else f"attempt-{attempt}/{name}"


@dataclass
class RunStatus:
    """The runner's heartbeat, rewritten while the run goes (``status.json``)."""

    state: RunState = RunState.PENDING
    started: float | None = None
    ended: float | None = None
    node: str = ""
    heartbeat: float | None = None
    attempt: int = 1

    def to_json(self) -> dict[str, Any]:
        data = {"state": self.state.value, "started": self.started, "node": self.node, "attempt": self.attempt}
        if self.ended is not None:
            data["ended"] = self.ended
        if self.heartbeat is not None:
            data["heartbeat"] = self.heartbeat
        return data

    def is_stale(self, now: float | None = None) -> bool:
        """A running run whose heartbeat (or start) is older than ``STALE_AFTER_S``."""
        last = self.heartbeat or self.started
        return self.state.is_active() and last is not None and (now or time.time()) - last > STALE_AFTER_S

    @classmethod
    def from_json(cls, data: Any) -> RunStatus | None:
        if not isinstance(data, dict):
            return None
        return cls(RunState.parse(data.get("state"), RunState.PENDING), _number(data.get("started")),
                   _number(data.get("ended")), str(data.get("node") or ""), _number(data.get("heartbeat")),
                   max(1, int(_number(data.get("attempt")) or 1)))


@dataclass
class RunResult:
    """The runner's final word on one experiment (``result.json``)."""

    run_id: str
    status: RunState = RunState.FAILED
    exp_name: str | None = None
    baseline: str = ""
    overrides: list[str] = field(default_factory=list)
    node: str = ""
    started: float | None = None
    ended: float | None = None
    dvcray_version: str = ""
    exp_sha: str | None = None
    ray_node: str = ""   # the Ray node it ran on, when the runner service placed it (``--cpus-per-exp``)
    ref: str | None = None
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    push_error: str | None = None   # the outputs did not reach the store
    workspace: str | None = None    # "NODE:PATH" where the run's workspace stays when they did not
    save_errors: dict[str, str] = field(default_factory=dict)  # what of the end-of-run save failed
    shown_files: list[str] = field(default_factory=list)  # metrics/plots/params inside cached outputs
    timings: dict[str, float] = field(default_factory=dict)
    attempt: int = 1    # the try that wrote it
    attempts: list[Attempt] = field(default_factory=list)  # every try, this one last (none before retries)

    def is_final(self) -> bool:
        """The runner's last word: an outcome, or LOST (its cluster died under it, and the
        runner saved what it had)."""
        return self.status.is_terminal()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        data["attempts"] = [a.to_json() for a in self.attempts]
        return data

    @classmethod
    def from_json(cls, data: Any) -> RunResult | None:
        """A result from the store, its fields checked one by one (never trusted)."""
        if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
            return None
        overrides = data.get("overrides")
        return cls(
            run_id=data["run_id"], status=RunState.parse(data.get("status"), RunState.FAILED),
            exp_name=_text(data.get("exp_name")), baseline=_text(data.get("baseline")) or "",
            overrides=[o for o in overrides if isinstance(o, str)] if isinstance(overrides, list) else [],
            node=str(data.get("node") or ""), ray_node=str(data.get("ray_node") or ""),
            started=_number(data.get("started")),
            ended=_number(data.get("ended")), dvcray_version=str(data.get("dvcray_version") or ""),
            exp_sha=_text(data.get("exp_sha")), ref=_text(data.get("ref")),
            params=_mapping(data.get("params")), metrics=_mapping(data.get("metrics")),
            error=_text(data.get("error")), push_error=_text(data.get("push_error")),
            workspace=_text(data.get("workspace")),
            save_errors={k: v for k, v in _mapping(data.get("save_errors")).items() if isinstance(v, str)},
            shown_files=[f for f in data.get("shown_files") or [] if isinstance(f, str)]
            if isinstance(data.get("shown_files"), list) else [],
            timings={k: v for k, v in _mapping(data.get("timings")).items() if _number(v) is not None},
            attempt=max(1, int(_number(data.get("attempt")) or 1)), attempts=attempts_of(data.get("attempts")))


# --------------------------------------------------------------------------- what this clone remembers


@dataclass
class RunRecord:
    """A run this clone submitted (``<repo>/.dvcray/runs/RUN_ID.json``)."""

    run_id: str
    job_id: str = ""               # the Ray Job that runs it (a sweep's experiments may share one)
    address: str | None = None     # the cluster it went to
    store: dict[str, Any] = field(default_factory=dict)  # Store.to_json()
    exp_name: str | None = None
    baseline: str = ""
    submitted: float = 0.0
    state: RunState = RunState.PENDING
    started: float | None = None
    ended: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # How it runs (``runs.backends``): "job" (a Ray Job) or "service" (the cluster's runner service)
    backend: str = ""
    service: str = ""              # the runner service that runs it (its Ray Job id); "": a Ray Job of its own
    env: list[str] = field(default_factory=list)  # the names of the variables it carried (never values)
    attempts: list[Attempt] = field(default_factory=list)  # its tries, once it was retried or lost

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        data["attempts"] = [a.to_json() for a in self.attempts]
        return data

    @classmethod
    def from_json(cls, data: Any) -> RunRecord | None:
        record = files.from_json(cls, data)
        if record is None or not isinstance(record.run_id, str):
            return None
        record.state = RunState.parse(record.state, RunState.PENDING)
        record.store = _mapping(record.store)
        record.metrics = _mapping(record.metrics)
        record.submitted = _number(record.submitted) or 0.0
        record.job_id = record.job_id if isinstance(record.job_id, str) and record.job_id else record.run_id
        record.service = record.service if isinstance(record.service, str) else ""
        record.env = [n for n in record.env if isinstance(n, str)] if isinstance(record.env, list) else []
        record.attempts = attempts_of([a.to_json() if isinstance(a, Attempt) else a for a in record.attempts]
                                      if isinstance(record.attempts, list) else [])
        if not isinstance(record.backend, str) or not record.backend:  # a record from before it was named
            record.backend = "service" if record.service else "job"
        return record

    def save(self, git_root: Path) -> Path:
        return files.write_json(files.runs_dir(git_root, create=True) / f"{self.run_id}.json", self.to_json())

    @classmethod
    def load(cls, git_root: Path, run_id: str) -> RunRecord | None:
        return cls.from_json(files.read_json(files.runs_dir(git_root, create=False) / f"{run_id}.json"))

    @classmethod
    def all(cls, git_root: Path) -> list[RunRecord]:
        """Every record of this clone, newest first."""
        folder = files.runs_dir(git_root, create=False)
        if not folder.is_dir():
            return []
        found = [r for r in (cls.from_json(files.read_json(p)) for p in folder.glob("*.json")) if r is not None]
        return sorted(found, key=lambda r: r.submitted, reverse=True)

    @classmethod
    def update(cls, git_root: Path, run_id: str, **changes: Any) -> None:
        """Change fields of a saved record (None values leave a field as it is)."""
        record = cls.load(git_root, run_id)
        if record is None:
            return
        for key, value in changes.items():
            if value is not None and key in {f.name for f in dataclasses.fields(cls)}:
                setattr(record, key, RunState.parse(value) if key == "state" else value)
        record.save(git_root)


@dataclass
class Outcome:
    """How one experiment ended, as the client reports it."""

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
    home: bool = True                  # False: not brought home (its name is taken here)
    hint: str | None = None            # what to do about ``error``
    store_error: str | None = None     # it ran, but not everything reached the store or came home
    attempts: list[dict[str, Any]] = field(default_factory=list)  # its tries (Attempt JSON), when retried or lost

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
