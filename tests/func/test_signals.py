"""SIGTERM, as CI sends it when a job is cancelled, to ``dvcray run`` and ``dvcray queue
start``: the runs are stopped (their runners save what they had), the command exits 130,
and nothing of the stage keeps running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import run_dvcray, sh, store_log

# Writes its pid where the test finds it, says it started, then works until stopped.
LONG = """\
import os, sys, time, yaml
x = yaml.safe_load(open("params.yaml"))["x"]
open(sys.argv[1] + f"/{x}.pid", "w").write(str(os.getpid()))
print(f"STAGE-STARTED x={x}", flush=True)
time.sleep(300)
"""


def _project(make_dvc_project, pids: Path) -> Path:
    pids.mkdir()
    return make_dvc_project({
        "params.yaml": "x: 0\n", "long.py": LONG,
        "dvc.yaml": f"stages:\n  long:\n    cmd: python long.py {pids}\n    deps: [long.py]\n    params: [x]\n"
                    "    outs: [never.txt]\n",
    })


def _wait_started(proc: subprocess.Popen, store: Path, count: int = 1) -> list[Path]:
    """The store folders of the runs whose stage has started, once ``count`` have."""
    deadline = time.monotonic() + 180   # a hang guard
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        runs = sorted((store / "dvcray" / "runs").glob("dvcray-*")) if (store / "dvcray" / "runs").is_dir() else []
        started = [r for r in runs if "STAGE-STARTED" in store_log(r)]
        if len(started) >= count:
            return started
        time.sleep(0.5)
    raise AssertionError("the stage did not start")


def _gone(pid_files: list[Path]) -> list[int]:
    """The stage processes (from their pid files) still alive after a hang guard."""
    pids = [int(p.read_text()) for p in pid_files]
    deadline = time.monotonic() + 60
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()
                 and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"]
        time.sleep(0.2)
    return alive


def test_sigterm_stops_the_run_and_exits_130(ray_cluster, make_dvc_project, tmp_path):
    pids = tmp_path / "pids"
    root = _project(make_dvc_project, pids)
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "-n", "termed", "-S", "x=7101",
                             "--store", str(store)], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        [run_dir] = _wait_started(proc, store)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)   # a hang guard: the grace is 60 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "STOPPED", result
    assert "STAGE-STARTED x=7101" in (run_dir / "log.txt").read_text(), "the log was saved"
    runs = json.loads(run_dvcray("runs", "--json", cwd=root).stdout)
    assert [r["state"] for r in runs if r["run_id"] == run_dir.name] == ["STOPPED"]
    assert _gone(list(pids.glob("*.pid"))) == [], "the stage still runs"


def test_sigterm_stops_every_experiment_of_a_queue_and_records_them_as_dvc_does(ray_cluster, make_dvc_project,
                                                                                 tmp_path):
    pids = tmp_path / "pids"
    root = _project(make_dvc_project, pids)
    store = tmp_path / "store"
    sh("dvc", "exp", "run", "--queue", "-n", "qterm-1", "-S", "x=7201", cwd=root)
    sh("dvc", "exp", "run", "--queue", "-n", "qterm-2", "-S", "x=7202", cwd=root)
    proc = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "queue", "start", "--jobs", "1", "--store",
                             str(store)], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        [run_dir] = _wait_started(proc, store)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "every experiment of the sweep was stopped" in stderr and "Traceback" not in stderr
    assert json.loads((run_dir / "result.json").read_text())["status"] == "STOPPED"
    assert _gone(list(pids.glob("*.pid"))) == [], "the stage still runs"
    # Both left DVC's queue; neither succeeded, so both are where DVC keeps failed ones.
    assert "Queued" not in sh("dvc", "queue", "status", cwd=root)
    failed = sh("git", "reflog", "refs/exps/celery/failed", cwd=root)
    assert "qterm-1" in failed and "qterm-2" in failed, failed
    assert not [ref for ref in sh("git", "for-each-ref", "--format=%(refname)", "refs/exps/", cwd=root).split()
                if ref.endswith(("/qterm-1", "/qterm-2"))], "no experiment came home"
    assert os.listdir(pids) == ["7201.pid"], "the second never started"
