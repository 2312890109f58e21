"""Save as you go, and resume: on the node, inside the runner (``runner.py``).

A run whose machine dies loses what is only on that machine. So each stage's outputs and
its run-cache entry go to the store as the stage finishes (``StageSaver``), not only at the
end of the run, and a retry of the run (the runner service submits it again, from the same
snapshot: ``service/retries.py``) brings them back before ``dvc exp run`` starts
(``restore_saved``): DVC then finds each finished stage in its run-cache and checks its
outputs out instead of running it ("Stage 'x' is cached - skipping run"), as ``dvc exp run
--pull`` would with the whole store, but only for what this run saved.

How a stage's end is seen: DVC writes a stage's run-cache entry (``StageCache.save``) once
its outputs are in the cache; the runner wraps that method in its own process (one process
per experiment) and hands each entry to a thread that pushes the outputs, then the entry,
so an entry in the store always has its outputs there. The stage's own time is not spent
on it. Stages DVC keeps no run-cache entry for (an output with ``cache: false`` that is not
a metric or plot, ``persist: true``, ``always_changed``) cannot be restored this way: a retry
runs them again (a Ray Train stage resumes from its checkpoint: ``integrations.storage``).

What an attempt saved is listed in the store, ``dvcray/runs/RUN_ID/[attempt-N/]stages.json``.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

from dvcray_cli.runs.model import attempt_file
from dvcray_cli.store import Store

STAGES = "stages.json"
# A run-cache entry in a DVC remote: runs/<key[:2]>/<key>/<value>, both sha256.
_ENTRY = re.compile(r"runs/([0-9a-f]{2})/(\1[0-9a-f]{62})/([0-9a-f]{64})")


def entry_path(key: str, value: str) -> str:
    """Where a run-cache entry lives, relative to a DVC cache or remote (DVC's layout)."""
    return f"runs/{key[:2]}/{key}/{value}"


def push_run_cache(repo, since: float, skip: set[str] | None = None) -> int:
    """Push the run-cache entries made since ``since`` (this run's; a sibling's on this
    node at most), but those in ``skip`` (``entry_path``: pushed already). ``dvc push
    --run-cache`` sends every entry of the cache each time (``StageCache.transfer(force=True)``):
    with one cache shared by a node's runs, that grows with every run the node ever made."""
    from dvc.fs import generic

    legacy = repo.cache.legacy
    runs = os.path.join(legacy.path, "runs")
    if not os.path.isdir(runs):
        return 0
    fresh = []
    for folder, _, names in os.walk(runs):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, legacy.path).replace(os.sep, "/")
            try:
                if os.stat(path).st_mtime >= since - 1 and rel not in (skip or ()):
                    fresh.append((path, rel))
            except OSError:
                continue
    if not fresh:
        return 0
    dest = repo.cloud.get_remote_odb(None, "push --run-cache", hash_name="md5-dos2unix")
    for src, rel in fresh:
        generic.copy(legacy.fs, src, dest.fs, dest.fs.join(dest.path, *rel.split("/")))
    return len(fresh)


class StageSaver:
    """Each finished stage's outputs and run-cache entry, to the store from a thread of
    its own, and the list of them in ``stages.json`` of this attempt."""

    def __init__(self, root: Path, store: Store, run_id: str, attempt: int,
                 say: Callable[[str], None] = print) -> None:
        self.root, self.store, self.run_id, self.attempt, self.say = root, store, run_id, attempt, say
        self.todo: queue.Queue = queue.Queue()
        self.saved: list[dict[str, Any]] = []
        self.entries: set[str] = set()     # entry paths in the store now
        self.errors: list[str] = []
        self._undo: Callable[[], None] | None = None
        self._repo = None
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def install(self) -> bool:
        """Wrap DVC's ``StageCache.save`` in this process; False where this DVC has none
        (then only the end of the run saves, as before)."""
        try:
            from dvc.stage.cache import StageCache, _can_hash, _get_cache_hash, _get_stage_hash
            from dvc.stage.serialize import to_single_stage_lockfile
        except ImportError:
            return False
        original = StageCache.save
        todo = self.todo

        def save(cache, stage):
            original(cache, stage)
            try:
                if _can_hash(stage):
                    key = _get_stage_hash(stage)
                    todo.put((stage.addressing, key, _get_cache_hash(to_single_stage_lockfile(stage))))
            except Exception:  # noqa: BLE001 - the end of the run saves it all the same
                pass

        StageCache.save = save
        self._undo = lambda: setattr(StageCache, "save", original)
        self.thread.start()
        return True

    def _loop(self) -> None:
        while True:
            item = self.todo.get()
            try:
                if item is None:
                    return
                self._save(*item)
            except Exception as exc:  # noqa: BLE001 - said; the end of the run pushes again
                self.errors.append(f"{item[0]}: {type(exc).__name__}: {exc}")
                self.say(f"could not save stage {item[0]} to the store as it finished ({exc}); "
                         "the end of the run tries again")
            finally:
                self.todo.task_done()

    def _save(self, stage: str, key: str, value: str) -> None:
        from dvc.repo import Repo

        entry = entry_path(key, value)
        t = time.time()
        if self._repo is None:
            self._repo = Repo(os.fspath(self.root))  # its own: the stages run with the runner's
        repo = self._repo
        files = 0
        if not self.store.exists(entry):   # else it is in the store with its outputs already
            for objs in repo.stage_cache.get_used_objs([(key, value)]).values():
                result = repo.cloud.push(objs)
                if result.failed:
                    raise RuntimeError(f"{len(result.failed)} output file(s) did not reach the store")
                files += len(result.transferred)
            self.store.upload(entry, Path(repo.stage_cache.cache_dir).parent / entry)
            self.say(f"stage {stage} saved to the store ({files} file(s) and its run-cache entry, "
                     f"{time.time() - t:.1f}s)")
        self.entries.add(entry)
        self.saved.append({"stage": stage, "entry": entry, "saved": time.time(), "attempt": self.attempt})
        self.store.write(self.store.run_path(self.run_id, attempt_file(self.attempt, STAGES)),
                         json.dumps({"stages": self.saved}).encode())

    def close(self, timeout: float = 300.0) -> None:
        """Unwrap DVC, then wait (at most ``timeout``) for the stages still being saved."""
        if self._undo is None:
            return
        self._undo()
        self._undo = None
        self.todo.put(None)
        self.thread.join(timeout)
        if self._repo is not None:
            self._repo.close()


def saved_before(store: Store, run_id: str, attempt: int) -> list[tuple[str, str]]:
    """``(stage, entry path)`` of what the attempts before ``attempt`` saved, in order (the
    store is data: an entry that is not a run-cache path is left out)."""
    found: dict[str, str] = {}
    for earlier in range(1, attempt):
        data = store.read_json(store.run_path(run_id, attempt_file(earlier, STAGES))) or {}
        for item in data.get("stages") or [] if isinstance(data.get("stages"), list) else []:
            entry = item.get("entry") if isinstance(item, dict) else None
            if isinstance(entry, str) and _ENTRY.fullmatch(entry) and entry not in found:
                found[entry] = str(item.get("stage") or "?")
    return [(stage, entry) for entry, stage in found.items()]


def restore_saved(repo, store: Store, run_id: str, attempt: int, say: Callable[[str], None] = print) -> list[str]:
    """Bring what earlier attempts of this run saved into the node's cache (run-cache entries
    and their outputs), so that ``dvc exp run`` restores those stages instead of running them;
    the names of those stages."""
    saved = saved_before(store, run_id, attempt)
    if not saved:
        return []
    t = time.time()
    legacy = Path(repo.cache.legacy.path)
    keys = []
    for _, entry in saved:
        local = legacy / entry
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(f".{local.name}.part")
            store.download(entry, partial)
            os.replace(partial, local)
        _, _, key, value = entry.split("/")
        keys.append((key, value))
    files = 0
    for objs in repo.stage_cache.get_used_objs(keys).values():
        files += len(repo.cloud.pull(objs).transferred)
    names = [stage for stage, _ in saved]
    say(f"resuming: stage(s) {', '.join(names)} finished before this attempt; their outputs are back from "
        f"the store ({files} file(s), {time.time() - t:.1f}s) and DVC restores them instead of running them")
    return names
