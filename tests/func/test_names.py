"""Experiment names are never silently replaced on the way home (issue 10, item 5).

``refs/exps`` has no reflog: an experiment replaced by another of the same name
is gone. ``dvcray run`` and ``dvcray pull`` refuse, name both, and say how to
keep both (``pull --as``) or replace (``-f``), as ``dvc exp run`` raises
ExperimentExistsError.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import run_dvcray, sh

STAGE = """\
import json, time, yaml
p = yaml.safe_load(open("params.yaml"))
time.sleep(p["sleep"])
json.dump({"v": p["v"]}, open("m.json", "w"))
"""
SPEC = {"s.py": STAGE, "params.yaml": "v: 1\nsleep: 0\n",
        "dvc.yaml": "stages:\n  s:\n    cmd: python s.py\n    deps: [s.py]\n    params: [v, sleep]\n"
                    "    metrics: [{m.json: {cache: false}}]\n"}


def exp_sha(root: Path, name: str) -> str:
    head = sh("git", "rev-parse", "HEAD", cwd=root)
    return sh("git", "rev-parse", "--verify", "-q", f"refs/exps/{head[:2]}/{head[2:]}/{name}", cwd=root, check=False)


def local_exp(root: Path, name: str, v: int) -> str:
    sh("dvc", "exp", "run", "-q", "-n", name, "-S", f"v={v}", "-S", "sleep=0", cwd=root)
    sh("git", "checkout", "-q", "--", ".", cwd=root)
    return exp_sha(root, name)


def test_a_run_that_finds_its_name_taken_at_home_does_not_replace_it(ray_cluster, make_dvc_project, tmp_path):
    root = make_dvc_project(SPEC)
    store = tmp_path / "store"
    # The remote run takes a while; meanwhile a local experiment takes the name.
    proc = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "-n", "dup", "-S", "v=101", "-S", "sleep=8",
                             "--store", str(store)], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        runs = root / ".dvcray" / "runs"
        while not (runs.exists() and list(runs.glob("*.json"))):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run was never submitted"
            time.sleep(0.3)
        mine = local_exp(root, "dup", 7)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 2, out + err
    assert "Experiment 'dup' already exists" in err and "--as dup-2" in err and "-f" in err
    assert exp_sha(root, "dup") == mine, "the local experiment was replaced"

    run_id = next((root / ".dvcray" / "runs").glob("*.json")).stem
    kept = run_dvcray("pull", run_id, "--as", "dup-2", "--store", str(store), cwd=root)
    assert kept.returncode == 0, kept.stderr
    assert exp_sha(root, "dup") == mine and exp_sha(root, "dup-2") not in ("", mine)
    shown = sh("dvc", "exp", "show", "--json", cwd=root)
    assert '"v": 101' in shown.replace(" ", "").replace('"v":101', '"v": 101') and '"dup-2"' in shown


def test_pull_never_replaces_an_experiment_unless_forced(ray_cluster, make_dvc_project, tmp_path):
    root = make_dvc_project(SPEC)
    store = tmp_path / "store"
    proc = run_dvcray("run", "-n", "dup", "-S", "v=202", "--detach", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stderr
    run_id = next((root / ".dvcray" / "runs").glob("*.json")).stem
    assert run_dvcray("logs", run_id, "--follow", cwd=root).returncode == 0
    mine = local_exp(root, "dup", 3)

    refused = run_dvcray("pull", run_id, "--store", str(store), cwd=root)
    assert refused.returncode == 2, refused.stderr
    assert "already exists" in refused.stderr and run_id in refused.stderr
    assert exp_sha(root, "dup") == mine
    bad = run_dvcray("pull", run_id, "--as", "no/slash", cwd=root)
    assert bad.returncode == 2 and "not a valid experiment name" in bad.stderr

    forced = run_dvcray("pull", run_id, "-f", "--store", str(store), cwd=root)
    assert forced.returncode == 0, forced.stderr
    theirs = exp_sha(root, "dup")
    assert theirs not in ("", mine)
    again = run_dvcray("pull", run_id, "--store", str(store), cwd=root)
    assert again.returncode == 0 and exp_sha(root, "dup") == theirs  # the same experiment: nothing to refuse
