"""No per-run cost that grows with runs (issue 22). Warm workspaces: a node resets the
clone an earlier run of the project used instead of cloning afresh, and the experiment
still starts from exactly what a fresh clone gives (no file, output or experiment ref of
an earlier run left). At home, experiments come in as loose objects, not a pack each.

Real Ray (the session head), real git and `dvc exp run`; the stage itself reports what
it found in its workspace.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from helpers import exp_metrics, node_dir, run_dvcray, sh

STAGE = """\
import json, os, yaml
seen = {"extra": os.path.exists("extra.txt"), "scratch": os.path.exists("scratch.tmp")}
open("scratch.tmp", "w").write("left by a run")
json.dump({"y": yaml.safe_load(open("params.yaml"))["x"] * 2, **seen}, open("m.json", "w"))
"""
SPEC = {
    "params.yaml": "x: 1\n",
    "stage.py": STAGE,
    ".gitignore": "scratch.tmp\n",
    "dvc.yaml": "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n    params: [x]\n"
                "    metrics: [{m.json: {cache: false}}]\n",
}


def run(root: Path, name: str, x: int, store: Path) -> dict:
    proc = run_dvcray("run", "-n", name, "-S", f"x={x}", "--store", str(store), "--json", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    return json.loads((store / "dvcray" / "runs" / run_id / "result.json").read_text())


def test_a_second_run_resets_the_first_runs_workspace_to_what_a_fresh_clone_gives(
        ray_cluster, make_dvc_project, tmp_path):
    root = make_dvc_project({**SPEC, "unique.txt": uuid.uuid4().hex})
    store = tmp_path / "store"
    (root / "extra.txt").write_text("untracked, travels with the first run only\n")
    packs = sorted((root / ".git" / "objects" / "pack").glob("*.pack"))

    first = run(root, "w1", 8101, store)
    assert exp_metrics(root, "w1", "m.json") == {"y": 16202, "extra": True, "scratch": False}

    (root / "extra.txt").unlink()
    second = run(root, "w2", 8102, store)
    # The second run found neither the first's untracked file nor what its stage left.
    assert exp_metrics(root, "w2", "m.json") == {"y": 16204, "extra": False, "scratch": False}
    for result in (first, second):
        assert {"restore", "restore_cpu", "exp_run", "exp_run_cpu"} <= set(result["timings"])
    # Experiments come home as loose objects, not a pack each (git would repack the whole
    # repository every 50 packs).
    assert sorted((root / ".git" / "objects" / "pack").glob("*.pack")) == packs

    root_commit = sh("git", "rev-list", "--max-parents=0", "HEAD", cwd=root)
    pool = node_dir(ray_cluster) / "workspaces" / root_commit
    states = [json.loads(p.read_text()) for p in pool.glob("*/state.json")]
    assert {"uses": 2, "flagged": False} in states, f"one slot served both runs: {states}"
    slot = next(p.parent for p in pool.glob("*/state.json") if json.loads(p.read_text())["uses"] == 2)
    names = sh("git", "for-each-ref", "--format=%(refname)", "refs/exps/", cwd=slot / "repo").split()
    assert not any(n.endswith("/w1") for n in names), f"the first run's experiment ref stayed: {names}"
    assert (slot / "site").is_dir(), "DVC's site cache of the clone lives with it"


def test_a_bundle_that_lacks_the_experiment_or_its_base_is_refused(make_dvc_project, tmp_path):
    from dvcray_cli import gitutil
    from dvcray_cli.errors import GitError

    root = make_dvc_project({**SPEC, "unique.txt": uuid.uuid4().hex})
    other = make_dvc_project({**SPEC, "unique.txt": uuid.uuid4().hex}, name="other")
    sh("git", "commit", "-q", "--allow-empty", "-m", "exp", cwd=other)
    sh("git", "update-ref", "refs/exps/aa/bb/e1", "HEAD", cwd=other)
    bundle = tmp_path / "b.bundle"
    sh("git", "bundle", "create", "-q", str(bundle), "refs/exps/aa/bb/e1", "^HEAD~1", cwd=other)
    with pytest.raises(GitError, match="lacks"):
        gitutil.unbundle(root, bundle, "refs/exps/aa/bb/e1")
    with pytest.raises(GitError, match="does not hold"):
        gitutil.unbundle(other, bundle, "refs/exps/aa/bb/e2")
    (tmp_path / "junk").write_bytes(b"not a bundle")
    with pytest.raises(GitError, match="not a git bundle"):
        gitutil.unbundle(root, tmp_path / "junk", "refs/exps/aa/bb/e1")
    assert gitutil.unbundle(other, bundle, "refs/exps/aa/bb/e1") == sh("git", "rev-parse", "HEAD", cwd=other)
