"""Finding runs after the fact: by run id, experiment name or the end of a run id, in
this clone's records (``.dvcray/runs/``) and in the stores.

A run has two sources of truth. The cluster knows it (status, live log) for as long
as the cluster lives; the store keeps ``status.json``, ``log.txt``, ``result.json``
and the experiment's bundle for good (``dvcray/runs/RUN_ID/``). The client's records
say where each run went. ``listing``, ``logs``, ``stop`` and ``pull`` ask the cluster
first (``runs.backends``) and fall back on the store, so they keep working after the
cluster is gone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dvcray_cli import gitutil
from dvcray_cli.errors import UsageError
from dvcray_cli.runs.model import MANIFEST, RESULT, STATUS, Manifest, RunId, RunRecord, RunResult, RunState, RunStatus
from dvcray_cli.store import Store

# How many of a store's newest runs `runs` and `pull` look at beyond this clone's records.
SCAN_LIMIT = 200
LIST_HINT = "See this repo's runs with: dvcray runs"


@dataclass
class Run:
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

    def env_names(self) -> list[str]:
        """The names of the variables it carried to its stage (never their values)."""
        if self.record is not None:
            return list(self.record.env)
        manifest = self.manifest
        return sorted(manifest.env) if manifest else []

    def submitted(self) -> float | None:
        if self.record and self.record.submitted:
            return self.record.submitted
        manifest = self.manifest
        parsed = RunId.parse(self.run_id)
        return (manifest.created if manifest else None) or (parsed.time if parsed else None)


@dataclass
class Context:
    """Where runs are looked for: this clone's records and the stores."""

    git_root: Path
    config: Any                # DVC's config (all levels), for the stores' secrets
    stores: list[Store]        # where to look for runs this clone did not submit


def context(cwd: Path, store_url: str | None = None) -> Context:
    """This clone and the stores its runs may be in (``store_url`` only, when given).

    Raises:
        UsageError: not in a git repository, or its DVC config is broken.
    """
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
    return Context(root, config, list(unique.values()))


def record_run(ctx: Context, record: RunRecord) -> Run:
    """The run this clone's ``record`` names, with its store."""
    from dvcray_cli import store as store_mod

    if not record.store.get("url"):
        return Run(record.run_id, ctx.stores[0], record)
    url = str(record.store["url"]).rstrip("/")
    # One Store (and so one filesystem client) per URL.
    store = next((s for s in ctx.stores if s.url.rstrip("/") == url), None)
    if store is None:
        store = store_mod.from_record(record.store, SimpleNamespace(config=ctx.config) if ctx.config else None)
    return Run(record.run_id, store, record)


def in_repo(git_root: Path, shas: list[str]) -> set[str]:
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


def store_runs(ctx: Context, skip: set[str], want: int | None = None) -> list[Run]:
    """Runs in the stores that this clone has no record of but whose baseline it
    has (submitted from another clone), newest first; at most ``want``."""
    found: list[Run] = []
    for store in ctx.stores:
        ids = [i for i in store.run_ids() if i not in skip][:SCAN_LIMIT]
        # Run ids sort by submission time: read the newest first, a batch at a time,
        # and stop once there are enough (each run costs a read or two of the store).
        for start in range(0, len(ids), 25):
            batch = [Run(i, store) for i in ids[start:start + 25]]
            ours = in_repo(ctx.git_root, [r.baseline() or "" for r in batch])
            for run in batch:
                if run.baseline() in ours:
                    found.append(run)
                    skip.add(run.run_id)
            if want and sum(r.store is store for r in found) >= want:
                break
    return found


def locate(ctx: Context, key: str, prefer_success: bool = False) -> Run:
    """The run ``key`` names: a run id, an experiment name (newest run of that
    name; with ``prefer_success``, its newest that succeeded), or the unique end of a
    run id; records first, then the stores.

    Raises:
        UsageError: no run, or several, match ``key``.
    """
    key = key.strip()
    recs = RunRecord.all(ctx.git_root)  # newest first
    for record in recs:
        if record.run_id == key:
            return record_run(ctx, record)
    for store in ctx.stores:
        if RunId.parse(key) is not None and store.read_json(store.run_path(key, MANIFEST)) is not None:
            return Run(key, store)

    by_name = [record_run(ctx, r) for r in recs]
    matches = [r for r in by_name if r.exp_name() == key]
    if not matches:
        matches = [r for r in store_runs(ctx, {r.run_id for r in by_name}) if r.exp_name() == key]
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
        return locate(ctx, ends[0])
    if len(ends) > 1:
        raise UsageError(f"'{key}' matches several runs: {', '.join(ends)}.", "Give the whole run id.")
    where = ", ".join(s.url for s in ctx.stores)
    raise UsageError(f"No run or experiment named '{key}' in this repo's records or in the store ({where}).",
                     f"{LIST_HINT} (a run from another store: --store URL).")
