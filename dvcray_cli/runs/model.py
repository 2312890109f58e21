"""dvcray's records of runs, each defined once with its own JSON I/O.

- ``RunState``: where a run is (PENDING ... LOST), with ``is_terminal``: defined with the
  runner service's protocol (``dvcray_cli.service.protocol``), which speaks it too.
- ``ExpRef``: ``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>``, parsed and
  formatted here only (as DVC's ``ExpRefInfo``).
- ``Manifest``: what the runner needs to rebuild the workspace and run
  (``manifest.json`` in the snapshot and in the store).
- ``RunStatus``: the runner's heartbeat (``status.json`` in the store).
- ``RunResult``: the runner's final word (``result.json`` in the store).
- ``RunRecord``: what this clone remembers of a run it submitted
  (``<repo>/.dvcray/runs/RUN_ID.json``).
- ``RunOptions``, ``ExpSpec``, ``Outcome``: a run as asked for and as it ended.

Records from a store are shared data: ``from_json`` never trusts a type, an
unknown key is ignored, and anything unusable reads as None.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dvcray_cli import files
from dvcray_cli.service.protocol import RunState

# The files of a run in the store, under ``dvcray/runs/RUN_ID/``.
MANIFEST = "manifest.json"
STATUS = "status.json"
RESULT = "result.json"
LOG = "log.txt"
LOG_PARTS = "log.parts"   # the log while it grows: numbered pieces, each uploaded once
BUNDLE = "exp.bundle"
# The runner rewrites status.json this often; a run silent for STALE_AFTER_S
# whose cluster does not answer is LOST, not RUNNING forever.
HEARTBEAT_EVERY_S = 30.0
STALE_AFTER_S = 3 * HEARTBEAT_EVERY_S


# --------------------------------------------------------------------------- experiment refs


_SHA = re.compile(r"[0-9a-f]{40}")
# A file name inside a snapshot folder: no path separators, not hidden.
_SAFE_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# git check-ref-format, for one component: no control characters, space, ~ ^ : ? * [ \.
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def valid_exp_name(name: str) -> bool:
    """``name`` makes a valid experiment ref (git's ``check-ref-format`` rules for
    one component, as DVC checks it): no ``/``, no control characters or ``~^:?*[\\``
    or spaces, no ``..`` or ``@{``, not ``@``, not starting with ``.`` or ending in
    ``.``/``.lock``."""
    return bool(name) and "/" not in name and not _BAD_CHARS.search(name) and ".." not in name \
        and "@{" not in name and name != "@" and not name.startswith(".") \
        and not name.endswith((".", ".lock"))


@dataclass(frozen=True)
class ExpRef:
    """An experiment's git ref, ``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>``.

    Never DVC's internal refs (``refs/exps/stash``, ``exec``, ``celery``, ...):
    those carry pickled run variables, a Studio token included.
    """

    baseline: str
    name: str

    def __str__(self) -> str:
        return f"refs/exps/{self.baseline[:2]}/{self.baseline[2:]}/{self.name}"

    @classmethod
    def parse(cls, ref: Any) -> ExpRef | None:
        """The ExpRef ``ref`` spells, or None when it is anything else."""
        if not isinstance(ref, str):
            return None
        parts = ref.split("/")
        if len(parts) != 5 or parts[:2] != ["refs", "exps"]:
            return None
        baseline = parts[2] + parts[3]
        if len(parts[2]) != 2 or not _SHA.fullmatch(baseline) or not valid_exp_name(parts[4]):
            return None
        return cls(baseline, parts[4])


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

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"run_id": self.run_id, "exp_name": self.exp_name,
                                "overrides": list(self.overrides)}
        data.update({k: v for k, v in (("baseline", self.baseline), ("patch", self.patch),
                                       ("options", self.options)) if v})
        return data

    @classmethod
    def from_json(cls, data: Any) -> ExpSpec | None:
        spec = files.from_json(cls, data)
        if spec is None or not isinstance(spec.run_id, str):
            return None
        spec.baseline = spec.baseline if isinstance(spec.baseline, str) and _SHA.fullmatch(spec.baseline) else ""
        spec.patch = spec.patch if isinstance(spec.patch, str) and _SAFE_FILE.fullmatch(spec.patch) else ""
        spec.options = _mapping(spec.options)
        return spec

    @property
    def own_workspace(self) -> bool:
        """Whether it runs a workspace of its own (a queued experiment), not the run's."""
        return bool(self.baseline or self.patch or self.options)


_RUN_ID = re.compile(r"dvcray-(\d{8}-\d{6})-([0-9a-f]+)(?:-(\d+))?")


@dataclass(frozen=True)
class RunId:
    """A run's id, ``dvcray-YYYYmmdd-HHMMSS-xxxxxx`` (its submission's UTC time, so ids sort
    by it, and a random part), with ``-N`` after it for the N-th experiment of a sweep or
    of ``queue start``: their shared submission has the id without it. Parsed and
    formatted here only (as ``ExpRef``)."""

    stamp: str      # YYYYmmdd-HHMMSS
    token: str
    index: int = 0  # 0: a run of its own, or a submission that several share

    def __str__(self) -> str:
        return f"dvcray-{self.stamp}-{self.token}" + (f"-{self.index}" if self.index else "")

    @classmethod
    def new(cls) -> RunId:
        """A fresh id, stamped now."""
        return cls(time.strftime("%Y%m%d-%H%M%S", time.gmtime()), secrets.token_hex(3))

    @classmethod
    def parse(cls, text: Any) -> RunId | None:
        """The RunId ``text`` spells, or None when it is anything else."""
        found = _RUN_ID.fullmatch(text) if isinstance(text, str) else None
        if found is None:
            return None
        return cls(found.group(1), found.group(2), int(found.group(3) or 0))

    def member(self, index: int) -> RunId:
        """The id of experiment ``index`` (from 1) of the submission with this id."""
        return dataclasses.replace(self, index=index)

    @property
    def submission(self) -> RunId:
        """The id of the submission it belongs to (itself, for a run of its own)."""
        return dataclasses.replace(self, index=0)

    @property
    def time(self) -> float | None:
        """When it was submitted (Unix time); None for a stamp that is no time."""
        from datetime import datetime, timezone

        try:
            return datetime.strptime(self.stamp, "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            return None


MAX_EXPERIMENTS = 10000  # in one submission
# A DVC project's path in its clone: relative, and below it.
_SUBDIR = re.compile(r"(?!/)(?!.*(^|/)\.\.(/|$))(?!.*//)[^\\\x00]*(?<!/)")


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
    # Their sha256 by name: the manifest comes through Ray, the files through the store (issue 20, point 2).
    parts_sha256: dict[str, str] = field(default_factory=dict)
    # How many commits the snapshot's bundle carries as first sent (0: none, the cluster had HEAD; -1:
    # not counted): what a thin bundle saved is visible in the store (DESIGN.md, "Snapshot").
    bundle_commits: int = -1
    # The stage's environment (runs/stage_env.py): variables by name (never secret-like names:
    # this goes to the store), and PYTHONPATH entries relative to the DVC root.
    env: dict[str, str] = field(default_factory=dict)
    pythonpath: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Manifest | None:
        manifest = files.from_json(cls, data)
        if manifest is None or not isinstance(manifest.run_id, str) or not isinstance(manifest.baseline, str):
            return None
        if not (isinstance(manifest.subdir, str) and _SUBDIR.fullmatch(manifest.subdir) and type(manifest.jobs) is int
                and manifest.jobs >= 0 and isinstance(manifest.experiments, list)
                and len(manifest.experiments) <= MAX_EXPERIMENTS):
            return None
        manifest.exp_name = _text(manifest.exp_name)
        manifest.address = manifest.address if isinstance(manifest.address, str) else ""
        manifest.repo_root = manifest.repo_root if isinstance(manifest.repo_root, str) and \
            _SHA.fullmatch(manifest.repo_root) else ""
        manifest.parts = manifest.parts if isinstance(manifest.parts, str) and \
            re.fullmatch(r"dvcray/snapshots/[A-Za-z0-9_.-]+", manifest.parts) and ".." not in manifest.parts else ""
        manifest.parts_sha256 = {k: v for k, v in _mapping(manifest.parts_sha256).items() if isinstance(v, str)
                                 and re.fullmatch(r"[A-Za-z0-9_.-]+", k) and re.fullmatch(r"[0-9a-f]{64}", v)}
        manifest.created = _number(manifest.created) or 0.0
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


@dataclass
class RunStatus:
    """The runner's heartbeat, rewritten while the run goes (``status.json``)."""

    state: RunState = RunState.PENDING
    started: float | None = None
    ended: float | None = None
    node: str = ""
    heartbeat: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = {"state": self.state.value, "started": self.started, "node": self.node}
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
                   _number(data.get("ended")), str(data.get("node") or ""), _number(data.get("heartbeat")))


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

    def is_final(self) -> bool:
        """The runner's last word: an outcome, or LOST (its cluster died under it, and the
        runner saved what it had)."""
        return self.status.is_terminal()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
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
            timings={k: v for k, v in _mapping(data.get("timings")).items() if _number(v) is not None})


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

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
