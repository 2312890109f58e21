"""Saving that cannot fail silently (issue 10, items 8-10).

Each end-of-run save step is tried on its own and reported; outputs that did not
reach the store make the run exit 4 naming where its workspace stays; a run
whose heartbeat went stale is LOST; the log tee never blocks a stage and
uploads each byte once; the client's own failure never abandons experiments.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run_dvcray, sh

BLOCK_FILES = """\
import json, os, shutil, yaml
p = yaml.safe_load(open("params.yaml"))
open("model.txt", "w").write(f"model {p['v']}\\n")
json.dump({"v": p["v"]}, open("m.json", "w"))
# Where DVC keeps outputs in the store becomes a file: the push must fail.
files = os.path.join(STORE, "files")
shutil.rmtree(files, ignore_errors=True)
open(files, "w").write("in the way\\n")
"""
DVC_YAML = ("stages:\n  s:\n    cmd: python s.py\n    deps: [s.py]\n    params: [v]\n    outs: [model.txt]\n"
            "    metrics: [{m.json: {cache: false}}]\n")


def test_outputs_that_did_not_reach_the_store_exit_4_and_the_workspace_stays(ray_cluster, make_dvc_project,
                                                                               tmp_path):
    store = tmp_path / "store"
    root = make_dvc_project({"s.py": BLOCK_FILES.replace("STORE", repr(str(store))), "params.yaml": "v: 1\n",
                             "dvc.yaml": DVC_YAML})
    proc = run_dvcray("run", "-n", "blocked", "-S", "v=41", "--store", str(store), cwd=root)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "its outputs did not reach the store" in proc.stderr and "Traceback" not in proc.stderr
    (record,) = (root / ".dvcray" / "runs").glob("*.json")
    result = json.loads((store / "dvcray" / "runs" / record.stem / "result.json").read_text())
    assert result["status"] == "SUCCEEDED" and result["push_error"] and "outputs (dvc push)" in result["save_errors"]
    node, _, where = result["workspace"].partition(":")
    assert where in proc.stderr
    assert (Path(where) / "model.txt").read_text() == "model 41\n", "the workspace with the outputs stays"
    # The experiment itself (git) came home, and the log has every save step's word.
    assert sh("dvc", "exp", "show", "--json", cwd=root).count('"blocked"') >= 1
    log = run_dvcray("logs", record.stem, cwd=root).stdout
    assert "could not save outputs (dvc push)" in log and "experiment blocked saved" in log


def test_a_runner_silent_for_long_is_lost_not_running_forever(make_dvc_project, tmp_path):
    root = make_dvc_project({"params.yaml": "v: 1\n", "dvc.yaml": "stages:\n  s:\n    cmd: echo\n"})
    head = sh("git", "rev-parse", "HEAD", cwd=root)
    store = tmp_path / "store"
    for run_id, beat in (("dvcray-20260101-120000-aaaaaa", time.time() - 3600),
                         ("dvcray-20260101-130000-bbbbbb", time.time())):
        folder = store / "dvcray" / "runs" / run_id
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"run_id": run_id, "baseline": head, "exp_name": run_id[-6:]}))
        (folder / "status.json").write_text(json.dumps({"state": "RUNNING", "started": beat - 10, "heartbeat": beat}))
    proc = run_dvcray("runs", "--json", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stderr
    states = {r["exp_name"]: r["state"] for r in json.loads(proc.stdout)}
    assert states == {"aaaaaa": "LOST", "bbbbbb": "RUNNING"}


TEE = """
import os, subprocess, sys
from pathlib import Path
from dvcray_cli.store import Store
from dvcray_cli.runs.logtee import LogTee
store = Store(sys.argv[1])
tee = LogTee(Path(sys.argv[2]), store, "r1")
# A stage that writes far more than a pipe holds (64 KiB), over a few seconds.
child = subprocess.run([sys.executable, "-c",
    "import sys, time\\nfor i in range(40):\\n    sys.stdout.write(('%06d ' % i) + 'x' * 50000 + chr(10)); "
    "sys.stdout.flush(); time.sleep(0.06)"], timeout=60)
problems = tee.close()
print("CHILD", child.returncode, "PROBLEMS", problems, file=sys.stderr)
"""


@pytest.mark.parametrize("log_file", ["/dev/full", "LOCAL"])
def test_the_log_tee_keeps_draining_and_uploads_each_byte_once(tmp_path, log_file):
    """On a full disk (``/dev/full``: every write fails with ENOSPC) the tee used to
    die and leave the stage blocked on a pipe nobody read."""
    store = tmp_path / "store"
    path = log_file if log_file != "LOCAL" else str(tmp_path / "log.txt")
    proc = subprocess.run([sys.executable, "-c", TEE, str(store), path], capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"CHILD 0 PROBLEMS []" in proc.stdout  # the tee joined stderr to the job log
    expected = 40 * (7 + 50000 + 1)
    assert proc.stdout.count(b"x") == 40 * 50000, "the job log got everything"
    parts = sorted((store / "dvcray" / "runs" / "r1" / "log.parts").iterdir())
    uploaded = b"".join(p.read_bytes() for p in parts)
    assert len(parts) >= 2, "the log went up while it grew"
    if log_file == "/dev/full":
        assert b"cannot be written" in proc.stdout and not (store / "dvcray" / "runs" / "r1" / "log.txt").exists()
        assert uploaded.count(b"x") == 40 * 50000
    else:
        assert len(uploaded) == expected, "each byte was uploaded once"
        assert (store / "dvcray" / "runs" / "r1" / "log.txt").read_bytes() == uploaded


SLOW = """\
import json, time, yaml
p = yaml.safe_load(open("params.yaml"))
time.sleep(p["sleep"])
json.dump({"v": p["v"]}, open("m.json", "w"))
"""


def test_the_clients_own_failure_leaves_the_experiments_running_and_says_how_to_bring_them_home(
        ray_cluster, make_dvc_project, tmp_path):
    from dvcray_cli import clusters, ray_api
    from dvcray_cli.runs import sweep
    from dvcray_cli.runs.model import RunOptions, RunState

    root = make_dvc_project({"s.py": SLOW, "params.yaml": "v: 1\nsleep: 0\n",
                             "dvc.yaml": "stages:\n  s:\n    cmd: python s.py\n    deps: [s.py]\n"
                                         "    params: [v, sleep]\n    metrics: [{m.json: {cache: false}}]\n"})
    said: list[str] = []

    def broken(states) -> None:  # the client fails while the experiments run
        if any(s.state == RunState.RUNNING for s in states):
            raise RuntimeError("a bug in the client")

    opts = RunOptions(exp_name="orphan", overrides=["v=8801,8802", "sleep=20"], store=str(tmp_path / "store"))
    with pytest.raises(RuntimeError, match="a bug in the client"):
        sweep.run_sweep(opts, root, said.append, None, lambda n, t: None, broken)
    message = next(m for m in said if "go on on the cluster" in m)
    assert "orphan-1, orphan-2" in message and "dvcray pull" in message
    client = clusters.connect(ray_cluster.dashboard_url)
    running = ray_api.active_runs(client)
    assert running, "the experiments were abandoned"
    ray_api.stop_runs(client, running, 90)
