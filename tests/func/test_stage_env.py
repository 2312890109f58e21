"""The stage's environment, end to end (issue 17; DESIGN.md, "The stage's environment").

A project laid out as ``src/`` imported from scripts in subfolders (``python
src/stages/train.py`` doing ``from src.model import VALUE``), whose README says
``export PYTHONPATH=$PWD``, runs on a real local cluster: the stage, a Ray task and a Ray
Train worker all import ``src.*`` from the run's own copy. The cluster is started from
one shell with a stray ``PYTHONPATH`` (another folder with a ``src`` package) and
``CUDA_VISIBLE_DEVICES``; the run comes from another shell and sees neither. The stage
waits at a gate while the test edits the user's ``src/model.py``: the run never sees the
edit. ``--env`` values and the project's ``[tool.dvcray] env`` reach the stage and its
workers; secret-like and unset names are refused before anything runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import SRC_LAYOUT as SPEC, queued, run_dvcray, seen_by, sh

def _stray_src(folder: Path) -> Path:
    """Another folder holding a ``src`` package, as another project's PYTHONPATH would."""
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "__init__.py").write_text("")
    (folder / "src" / "model.py").write_text("VALUE = 99\n")
    return folder


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended before its stage reached the gate:\n{out}\n{err}")
        assert time.monotonic() < deadline, f"the stage never reached the gate ({path})"
        time.sleep(0.5)


@pytest.mark.slow
def test_src_layout_runs_from_the_runs_own_copy_with_only_what_it_names(make_dvc_project, tmp_path):
    root = make_dvc_project(SPEC)
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "CUDA_VISIBLE_DEVICES")}
    # Shell 1 starts the local cluster, with what another project left in its environment.
    stray = _stray_src(tmp_path / "stray-shell")
    shell1 = {**base, "PYTHONPATH": str(stray), "CUDA_VISIBLE_DEVICES": "7", "UNNAMED": "from-shell-1"}
    up = run_dvcray("cluster", "up", "local", cwd=root, env=shell1)
    assert up.returncode == 0, up.stderr

    # Shell 2, in the project: export PYTHONPATH=$PWD (and a folder outside the project).
    outside = tmp_path / "site-extra"
    outside.mkdir()
    gate = tmp_path / "gate"
    shell2 = {**base, "PYTHONPATH": os.pathsep.join([str(root), str(outside)]), "SEED": "seed-4242",
              "LISTED": "listed-5151", "UNNAMED": "from-shell-2"}
    run = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "-n", "srcrun", "--env", "MODE=mode-3131",
                            "--env", "SEED", "--env", f"GATE={gate}", "--env", "TRAIN=1"],
                           cwd=root, env=shell2, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(Path(f"{gate}.started"), run)
        # After submission the user edits their copy: the run must not see it.
        (root / "src" / "model.py").write_text("VALUE = 2\n")
        gate.touch()
        stdout, stderr = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, f"{stdout[-3000:]}\n{stderr[-5000:]}"
    assert f"PYTHONPATH entries outside the project do not travel to the cluster: {outside}" in stderr, stderr
    assert "the stage's variables: GATE, LISTED, MODE, SEED, TRAIN; PYTHONPATH in the project: ." in stdout + stderr

    seen = seen_by(root, "srcrun")
    for who in ("stage", "task", "train"):
        view = seen[who]
        assert view["value"] == 1, f"{who} imported {view['value']}: not the run's own copy"
        assert view["stray"] is False, f"{who} has the stray shell's PYTHONPATH"
        assert view["cuda"] != "7", f"{who} sees the stray shell's CUDA_VISIBLE_DEVICES"
        assert (view["MODE"], view["SEED"], view["LISTED"]) == ("mode-3131", "seed-4242", "listed-5151"), who
        assert view["UNNAMED"] is None, f"{who} sees a variable nobody named"
    assert seen["stage"]["cuda"] is None or seen["stage"]["cuda"] == ""
    # The stage's PYTHONPATH starts with the run's clone (never the user's), and has nothing of Ray's package.
    first = seen["stage"]["pythonpath"].split(os.pathsep)[0]
    assert first.endswith("/repo") and str(root) not in seen["stage"]["pythonpath"], seen["stage"]
    assert "_ray_pkg_" not in seen["stage"]["pythonpath"], seen["stage"]

    # `dvcray runs --json` names what the run carried, never the values.
    listing = run_dvcray("runs", "--json", cwd=root)
    assert listing.returncode == 0, listing.stderr
    [mine] = [r for r in json.loads(listing.stdout) if r["exp_name"] == "srcrun"]
    assert mine["env"] == ["GATE", "LISTED", "MODE", "SEED", "TRAIN"]
    beside_metrics = json.dumps({k: v for k, v in mine.items() if k != "metrics"})  # seen.json is a metric
    assert "mode-3131" not in beside_metrics and "seed-4242" not in beside_metrics

    # The same as a Ray Job of its own (no runner service): Ray puts the job's package on
    # the runner's PYTHONPATH; the stage's starts with the run's clone and has none of it.
    (root / "src" / "model.py").write_text("VALUE = 3\n")
    proc = run_dvcray("run", "-n", "asjob", "--env", "MODE=job-mode", "--env", "SEED", "--env", "LISTED",
                      cwd=root, env={**shell2, "DVCRAY_SERVICE": "0"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = seen_by(root, "asjob")
    assert seen["stage"]["value"] == seen["task"]["value"] == 3, "the edited workspace, as it was submitted"
    assert seen["task"]["MODE"] == "job-mode" and seen["task"]["stray"] is False
    assert "_ray_pkg_" not in seen["stage"]["pythonpath"], seen["stage"]
    assert seen["stage"]["pythonpath"].split(os.pathsep)[0].endswith("/repo"), seen["stage"]


def test_secret_like_and_unset_names_are_refused_before_anything_runs(make_dvc_project, tmp_path):
    """No cluster anywhere: a refused --env starts none, records nothing, writes no store."""
    from dvcray_cli.clusters import local

    root = make_dvc_project({**SPEC, "pyproject.toml": '[tool.dvcray]\nenv = ["NOT_SET_FOR_17"]\n'})
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "NOT_SET_FOR_17")}
    store = tmp_path / "store"

    def refused(*args: str, message: str) -> None:
        proc = run_dvcray(*args, "--store", str(store), cwd=root, env=env)
        assert proc.returncode == 2, f"{args}: exit {proc.returncode}\n{proc.stderr}"
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "hunter2" not in proc.stderr + proc.stdout, "a value is never echoed"
        if "secret" in message:
            assert "~/.aws" in proc.stderr and "instance profile" in proc.stderr, proc.stderr

    refused("run", message="NOT_SET_FOR_17 (env of [tool.dvcray] in")
    (root / "pyproject.toml").write_text("[tool.dvcray]\n")
    sh("git", "commit", "-qam", "no list", cwd=root)
    cases = [
        (["--env", "HF_TOKEN=hunter2"], "HF_TOKEN (--env) looks like a secret"),
        (["--env", "AWS_ACCESS_KEY_ID"], "AWS_ACCESS_KEY_ID (--env) looks like a secret"),
        (["--env", "DB_PASSWORD=hunter2"], "DB_PASSWORD (--env) looks like a secret"),
        (["--env", "UNSET_FOR_17"], "UNSET_FOR_17 (--env) is not set here"),
        (["--env", "PYTHONPATH=/x"], "PYTHONPATH (--env) follows the project"),
    ]
    for args, message in cases:
        refused("run", *args, message=message)
    assert local.records() == [], "no local cluster was started"
    assert not (root / ".dvcray" / "runs").exists(), "a run was recorded"
    assert not store.exists() or not any(store.rglob("manifest.json")), "something reached the store"

    # The same for DVC's queue: the queued experiment stays queued.
    sh("dvc", "exp", "run", "--queue", "-n", "waiting", cwd=root)
    for args, message in cases:
        refused("queue", "start", *args, message=message)
    assert queued(root) == ["waiting"]
    assert local.records() == [] and not (root / ".dvcray" / "runs").exists()
