"""Options of ``dvcray run`` and of DVC's queue, end to end: ``-C/--copy-paths``, ``-f``
replacing an experiment, and the ``dvc exp run`` options a queued experiment was queued
with (targets, ``--downstream``, ``-m``, ``-f``, ``--pull``, ``--allow-missing``) carried
to the cluster by ``dvcray queue start``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from helpers import exp_metrics, exp_refs, run_dvcray, sh


def _ref(root: Path, name: str) -> str:
    [ref] = [r for r in exp_refs(root) if r.endswith(f"/{name}")]
    return ref


def _at(root: Path, name: str, path: str) -> str:
    return sh("git", "show", f"{_ref(root, name)}:{path}", cwd=root)


# --------------------------------------------------------------------------- dvcray run


READS = """\
import json
from pathlib import Path
data = Path("data")
json.dump({"files": sorted(p.name for p in data.iterdir()) if data.is_dir() else [],
           "raw": (data / "raw.txt").read_text().strip() if (data / "raw.txt").exists() else None},
          open("m.json", "w"))
"""


def test_copy_paths_send_ignored_files_that_the_experiment_reads_but_does_not_commit(
        ray_cluster, make_dvc_project, tmp_path):
    # A param each run sets anew: DVC's run-cache would restore an earlier run's m.json
    # (what the stage reads from data/ is no dependency of it).
    root = make_dvc_project({"reads.py": READS, ".gitignore": "data/\n", "params.yaml": "x: 0\n",
                             "dvc.yaml": "stages:\n  r:\n    cmd: python reads.py\n    deps: [reads.py]\n"
                                         "    params: [x]\n    metrics: [{m.json: {cache: false}}]\n"})
    (root / "data").mkdir()
    (root / "data" / "raw.txt").write_text("ignored by git, needed by the stage\n")
    (root / "data" / "other.txt").write_text("also here\n")
    store = str(tmp_path / "store")

    proc = run_dvcray("run", "-n", "without", "-S", "x=9201", "--store", store, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(_at(root, "without", "m.json")) == {"files": [], "raw": None}, "ignored files do not travel"

    proc = run_dvcray("run", "-n", "with-file", "-S", "x=9202", "-C", "data/raw.txt", "--store", store, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(_at(root, "with-file", "m.json")) == {"files": ["raw.txt"],
                                                            "raw": "ignored by git, needed by the stage"}

    proc = run_dvcray("run", "-n", "with-folder", "-S", "x=9203", "--copy-paths", "data", "--store", store, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(_at(root, "with-folder", "m.json"))["files"] == ["other.txt", "raw.txt"]
    tree = sh("git", "ls-tree", "-r", "--name-only", _ref(root, "with-folder"), cwd=root).split()
    assert not [p for p in tree if p.startswith("data/")], "what -C sent is not in the experiment's commit"
    assert sh("git", "status", "--porcelain", "--ignored", "data", cwd=root) == "!! data/", "nor changed here"


COUNTS = """\
import json, yaml
x = yaml.safe_load(open("params.yaml"))["x"]
json.dump({"x": x}, open("m.json", "w"))
"""


def test_run_f_replaces_an_experiment_of_the_same_name_and_without_it_nothing_changes(
        ray_cluster, make_dvc_project, tmp_path):
    root = make_dvc_project({"params.yaml": "x: 0\n", "counts.py": COUNTS,
                             "dvc.yaml": "stages:\n  c:\n    cmd: python counts.py\n    deps: [counts.py]\n"
                                         "    params: [x]\n    metrics: [{m.json: {cache: false}}]\n"})
    store = str(tmp_path / "store")
    proc = run_dvcray("run", "-n", "same", "-S", "x=9301", "--store", store, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = exp_refs(root)

    proc = run_dvcray("run", "-n", "same", "-S", "x=9302", "--store", store, cwd=root)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "same" in proc.stderr and "-f" in proc.stderr and "Traceback" not in proc.stderr
    assert exp_refs(root) == first and exp_metrics(root, "same", "m.json") == {"x": 9301}
    assert not (Path(store) / "dvcray" / "runs").exists() or len(list((Path(store) / "dvcray" / "runs").iterdir())) == 1

    proc = run_dvcray("run", "-n", "same", "-S", "x=9303", "-f", "--store", store, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(exp_refs(root)) == list(first) and exp_refs(root) != first, "the same ref, another commit"
    assert exp_metrics(root, "same", "m.json") == {"x": 9303}


# --------------------------------------------------------------------------- DVC's queue


STAGE = """\
import sys, yaml
name = sys.argv[1]
x = yaml.safe_load(open("params.yaml"))["x"]
open(f"{name}.txt", "w").write(f"{name} x={x}\\n")
"""

CHAIN = """\
stages:
  a:
    cmd: python stage.py a
    deps: [stage.py]
    params: [x]
    outs: [{a.txt: {cache: false}}]
  b:
    cmd: python stage.py b
    deps: [stage.py, a.txt]
    params: [x]
    outs: [{b.txt: {cache: false}}]
  c:
    cmd: python stage.py c
    deps: [stage.py, b.txt]
    params: [x]
    outs: [{c.txt: {cache: false}}]
"""


def test_queued_targets_downstream_message_and_force_are_carried(ray_cluster, make_dvc_project, tmp_path):
    root = make_dvc_project({"params.yaml": "x: 0\n", "stage.py": STAGE, "dvc.yaml": CHAIN}, commit=False)
    sh("dvc", "repro", "-q", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "the chain, run at x=0", cwd=root)
    sh("dvc", "exp", "run", "-n", "qf", "-S", "x=1", cwd=root)          # a local experiment the queue replaces
    sh("git", "checkout", "-q", "--", ".", cwd=root)
    before_f = exp_refs(root)[_ref(root, "qf")]

    sh("dvc", "exp", "run", "--queue", "-n", "qt", "-S", "x=5", "b", cwd=root)
    sh("dvc", "exp", "run", "--queue", "-n", "qd", "-S", "x=6", "--downstream", "b", cwd=root)
    sh("dvc", "exp", "run", "--queue", "-n", "qm", "-S", "x=7", "-m", "a message queued with it", cwd=root)
    sh("dvc", "exp", "run", "--queue", "-n", "qf", "-S", "x=8", "-f", cwd=root)
    proc = run_dvcray("queue", "start", "--store", str(tmp_path / "store"), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def files(name: str) -> list[str]:
        return [_at(root, name, f"{s}.txt") for s in "abc"]

    assert files("qt") == ["a x=5", "b x=5", "c x=0"], "target b: b and what it needs, not c"
    assert files("qd") == ["a x=0", "b x=6", "c x=6"], "b --downstream: b and what follows it, not a"
    assert files("qm") == ["a x=7", "b x=7", "c x=7"]
    assert sh("git", "log", "-1", "--format=%s", _ref(root, "qm"), cwd=root) == "a message queued with it"
    assert files("qf") == ["a x=8", "b x=8", "c x=8"]
    assert exp_refs(root)[_ref(root, "qf")] != before_f, "-f: the queued experiment replaced the local one"


def _made_and_used(counter: Path) -> str:
    """A pipeline: ``made`` writes a cached output (and counts its runs in ``counter``,
    outside the workspace); ``used`` depends on the param ``y`` only."""
    tag = f"{counter.name}-{os.getpid()}-{time.time_ns()}"  # an output no cache has yet
    return ("stages:\n"
            "  made:\n"
            f"    cmd: python -c \"open('{counter}', 'a').write('ran\\\\n'); open('m.txt', 'w').write('{tag}')\"\n"
            "    outs: [m.txt]\n"
            "  used:\n"
            "    cmd: python -c \"import json, yaml; json.dump(yaml.safe_load(open('params.yaml')), open('u.json', 'w'))\"\n"
            "    params: [y]\n"
            "    metrics: [{u.json: {cache: false}}]\n")


def _queued_once(make_dvc_project, tmp_path, name: str, options: list[str], prepare) -> tuple[Path, Path]:
    """A project whose pipeline ran here once, then ``prepare(root, store)``, then one
    experiment queued with ``options`` and started on the cluster. Returns the project
    and the counter of ``made``'s runs."""
    counter = tmp_path / f"{name}.runs"
    root = make_dvc_project({"params.yaml": "y: 0\n", "dvc.yaml": _made_and_used(counter)}, name=name, commit=False)
    sh("dvc", "repro", "-q", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "ran here once", cwd=root)
    store = tmp_path / f"{name}-store"
    prepare(root, store)
    (root / "m.txt").unlink()
    sh("dvc", "exp", "run", "--queue", "-n", name, "-S", "y=2", *options, cwd=root)
    proc = run_dvcray("queue", "start", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert exp_metrics(root, name, "u.json") == {"y": 2}
    return root, counter


def _push_to(root: Path, store: Path) -> None:
    """``made``'s output in the store (pushed with a remote of this clone's own)."""
    sh("dvc", "remote", "add", "--local", "thestore", str(store), cwd=root)
    sh("dvc", "push", "-q", "-r", "thestore", cwd=root)


def _drop_cache(root: Path, store: Path) -> None:
    """``made``'s output nowhere: not in this clone's cache, not in the store."""
    import shutil

    shutil.rmtree(root / ".dvc" / "cache")


def test_queued_pull_and_allow_missing_are_carried(ray_cluster, make_dvc_project, tmp_path):
    # Without either: an unchanged stage whose output is not in the cluster's cache runs again.
    _, counter = _queued_once(make_dvc_project, tmp_path, "plain", [], _push_to)
    assert counter.read_text().splitlines() == ["ran", "ran"]
    # --pull: its output comes from the store instead.
    root, counter = _queued_once(make_dvc_project, tmp_path, "pulled", ["--pull"], _push_to)
    assert counter.read_text().splitlines() == ["ran"], "made did not run again: its output was pulled"
    assert _lock(root, _ref(root, "pulled"))["made"] == _lock(root, "HEAD")["made"]
    # --allow-missing: its output is nowhere, and the stage is skipped, not run.
    root, counter = _queued_once(make_dvc_project, tmp_path, "missing", ["--allow-missing"], _drop_cache)
    assert counter.read_text().splitlines() == ["ran"], "made did not run again: its missing output was allowed"
    assert _lock(root, _ref(root, "missing"))["made"] == _lock(root, "HEAD")["made"]


def _lock(root: Path, rev: str) -> dict:
    import yaml

    return yaml.safe_load(sh("git", "show", f"{rev}:dvc.lock", cwd=root))["stages"]
