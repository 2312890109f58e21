"""``dvcray runs``, ``logs``, ``stop`` and ``pull`` against a real local Ray head,
real git, real ``dvc exp run`` and a local store."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run_dvcray, sh, store_log

TRAIN_PY = """\
import json, time, yaml
p = yaml.safe_load(open("params.yaml"))
print(f"STAGE-START lr={p['lr']}", flush=True)
time.sleep(p["sleep"])
open("model.txt", "w").write(f"model lr={p['lr']}\\n")
json.dump({"acc": round(0.5 + p["lr"], 6)}, open("metrics.json", "w"))
print("STAGE-END", flush=True)
"""

DVC_YAML = """\
stages:
  train:
    cmd: python train.py
    deps: [train.py]
    params: [lr, sleep]
    outs: [model.txt]
    metrics:
      - metrics.json:
          cache: false
"""

SPEC = {"train.py": TRAIN_PY, "dvc.yaml": DVC_YAML, "params.yaml": "lr: 0.1\nsleep: 0\n"}


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def the_record(root: Path) -> tuple[Path, dict]:
    (path,) = (root / ".dvcray" / "runs").glob("*.json")
    return path, json.loads(path.read_text())


def runs_json(root: Path, *args: str) -> list[dict]:
    proc = run_dvcray("runs", "--json", *args, cwd=root)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


def test_finished_run_listed_logged_and_pulled_into_another_clone(ray_cluster, make_dvc_project, store, tmp_path):
    root = make_dvc_project(SPEC)
    proc = run_dvcray("run", "-n", "first", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record_path, record = the_record(root)
    run_id = record["run_id"]

    # runs: the table and --json.
    proc = run_dvcray("runs", cwd=root)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if run_id in l)
    assert "first" in line and "SUCCEEDED" in line and "acc=0.6" in line
    (entry,) = runs_json(root)
    assert entry["run_id"] == run_id and entry["exp_name"] == "first" and entry["state"] == "SUCCEEDED"
    assert entry["metrics"] == {"metrics.json": {"acc": 0.6}}
    assert entry["duration_s"] > 0 and entry["source"] == "record"

    # logs from the cluster, by run id and by experiment name.
    for key in (run_id, "first"):
        proc = run_dvcray("logs", key, cwd=root)
        assert proc.returncode == 0, proc.stderr
        assert "STAGE-START lr=0.1" in proc.stdout and "STAGE-END" in proc.stdout
        assert "copy of the log in the store" not in proc.stderr

    # The cluster is gone (the record points at a closed port), and the record
    # does not know the outcome: state and log come from the store.
    record.update(address=closed_port_url(), state="PENDING")
    record.pop("ended", None)
    record_path.write_text(json.dumps(record))
    (entry,) = runs_json(root)
    assert entry["state"] == "SUCCEEDED" and entry["exp_name"] == "first"
    proc = run_dvcray("logs", run_id, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "STAGE-START lr=0.1" in proc.stdout and "STAGE-END" in proc.stdout
    assert "copy of the log in the store" in proc.stderr

    # A second clone: no records, nothing from the cluster, same store.
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(root), str(clone), cwd=tmp_path)
    (entry,) = runs_json(clone, "--store", str(store))
    assert entry["run_id"] == run_id and entry["state"] == "SUCCEEDED" and entry["source"] == "store"
    config_before = (clone / ".dvc" / "config").read_bytes()
    proc = run_dvcray("pull", "first", "--store", str(store), cwd=clone)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dvc exp apply first" in proc.stderr
    head = sh("git", "rev-parse", "HEAD", cwd=clone)
    assert sh("git", "rev-parse", "--verify", "-q", f"refs/exps/{head[:2]}/{head[2:]}/first", cwd=clone)
    # The user's DVC config is untouched.
    assert (clone / ".dvc" / "config").read_bytes() == config_before
    assert not (clone / ".dvc" / "config.local").exists()
    assert not (clone / "model.txt").exists()
    sh("dvc", "exp", "apply", "first", cwd=clone)
    assert (clone / "model.txt").read_text() == "model lr=0.1\n"
    assert json.loads((clone / "metrics.json").read_text()) == {"acc": 0.6}


def test_stop_a_running_run(ray_cluster, make_dvc_project, store):
    root = make_dvc_project(SPEC)
    proc = run_dvcray("run", "-n", "sleepy", "-S", "sleep=60", "--detach", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stderr
    _, record = the_record(root)
    run_id = record["run_id"]
    run_dir = store / "dvcray" / "runs" / run_id
    wait_for(lambda: "STAGE-START" in store_log(run_dir), 90, "the stage to start")
    assert runs_json(root)[0]["state"] == "RUNNING"

    # Someone follows the log meanwhile; it ends when the run does.
    follower = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "logs", run_id, "--follow"], cwd=root,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc = run_dvcray("stop", run_id, cwd=root, timeout=60)   # the stage would sleep 60 s
        assert proc.returncode == 0, proc.stderr
        assert "STOPPED" in proc.stderr
        # `stop` returns once the run has ended and saved what it had.
        assert json.loads((run_dir / "result.json").read_text())["status"] == "STOPPED"
        followed, follow_err = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert "STAGE-START lr=0.1" in followed
    assert follower.returncode == 1, follow_err  # --follow exits with the run's outcome

    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "STOPPED"
    text = (run_dir / "log.txt").read_text()
    assert "STAGE-START lr=0.1" in text and "STAGE-END" not in text
    (entry,) = runs_json(root)
    assert entry["state"] == "STOPPED" and entry["exp_name"] == "sleepy"

    proc = run_dvcray("stop", "sleepy", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "already ended" in proc.stderr and "STOPPED" in proc.stderr
    proc = run_dvcray("pull", "sleepy", cwd=root)
    assert proc.returncode == 1 and "STOPPED" in proc.stderr


def test_run_whose_cluster_is_gone_is_lost(make_dvc_project, store):
    root = make_dvc_project(SPEC)
    head = sh("git", "rev-parse", "HEAD", cwd=root)
    run_id = "dvcray-20250101-120000-abcdef"
    (root / ".dvcray" / "runs").mkdir(parents=True)
    (root / ".dvcray" / "runs" / f"{run_id}.json").write_text(json.dumps({
        "run_id": run_id, "address": closed_port_url(), "store": {"url": str(store), "options": {}},
        "exp_name": "ghost", "baseline": head, "submitted": time.time(), "state": "PENDING",
    }))
    run_dir = store / "dvcray" / "runs" / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps({"state": "RUNNING", "started": time.time()}))
    (run_dir / "log.txt").write_text("last words\n")

    (entry,) = runs_json(root)
    assert entry["state"] == "LOST"
    proc = run_dvcray("logs", "ghost", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "last words\n" and "LOST" in proc.stderr
    proc = run_dvcray("stop", "ghost", cwd=root)
    assert proc.returncode == 3, proc.stderr
    assert "127.0.0.1" in proc.stderr
    proc = run_dvcray("pull", "ghost", cwd=root)
    assert proc.returncode == 2 and "not ended" in proc.stderr


def test_unknown_run_is_a_usage_error(make_dvc_project, store):
    root = make_dvc_project(SPEC)
    for args in (["logs", "nope"], ["logs", "nope", "--follow"], ["stop", "nope"], ["pull", "nope"]):
        proc = run_dvcray(*args, "--store", str(store), cwd=root)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "No run or experiment named 'nope'" in proc.stderr and "dvcray runs" in proc.stderr
    proc = run_dvcray("runs", cwd=root)
    assert proc.returncode == 0 and "No runs yet" in proc.stderr
    assert runs_json(root) == []


def test_store_runs_of_other_repos_are_not_listed(make_dvc_project, store):
    root = make_dvc_project(SPEC)
    head = sh("git", "rev-parse", "HEAD", cwd=root)
    for run_id, baseline in (("dvcray-20250101-120000-aaaaaa", head),
                             ("dvcray-20250101-130000-bbbbbb", "f" * 40)):
        run_dir = store / "dvcray" / "runs" / run_id
        run_dir.mkdir(parents=True)
        (run_dir / "manifest.json").write_text(json.dumps({"run_id": run_id, "baseline": baseline,
                                                           "exp_name": "theirs", "created": 1735732800}))
        # A heartbeat of a minute ago: alive, on a cluster this clone cannot see.
        (run_dir / "status.json").write_text(json.dumps({"state": "RUNNING", "started": time.time() - 600,
                                                         "heartbeat": time.time() - 60}))
    # Submitted from another clone, to a cluster this one does not know: the store's word.
    (entry,) = runs_json(root, "--store", str(store))
    assert entry["run_id"] == "dvcray-20250101-120000-aaaaaa"
    assert entry["state"] == "RUNNING" and entry["source"] == "store" and entry["exp_name"] == "theirs"
    proc = run_dvcray("logs", "aaaaaa", "--store", str(store), cwd=root)  # the end of a run id will do
    assert proc.returncode == 0 and "no log yet" in proc.stderr


def test_runs_as_ray_jobs_of_their_own_are_listed_logged_and_stopped_through_ray(
        ray_cluster, make_dvc_project, store, monkeypatch):
    """Without the runner service (``DVCRAY_SERVICE=0``) each run is a Ray Job (its record
    says so), a sweep's experiments share one on the head, and ``runs``, ``logs`` and
    ``stop`` reach each through Ray."""
    monkeypatch.setenv("DVCRAY_SERVICE", "0")
    root = make_dvc_project(SPEC)
    proc = run_dvcray("run", "-n", "jobs", "-S", "lr=0.31,0.32", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(p.read_text()) for p in sorted((root / ".dvcray" / "runs").glob("*.json"))]
    assert {r["backend"] for r in records} == {"job"} and len({r["job_id"] for r in records}) == 1
    assert all(r["job_id"] != r["run_id"] for r in records), "the sweep's experiments share one job"
    listed = {r["exp_name"]: r for r in runs_json(root)}
    assert listed["jobs-1"]["state"] == listed["jobs-2"]["state"] == "SUCCEEDED"
    assert listed["jobs-2"]["metrics"] == {"metrics.json": {"acc": 0.82}}
    logs = run_dvcray("logs", "jobs-2", cwd=root)
    assert logs.returncode == 0, logs.stderr
    assert "STAGE-START lr=0.32" in logs.stdout and "lr=0.31" not in logs.stdout, "its own log, from the store"

    # Placed by resources, each experiment is a Ray Job of its own; its log comes from Ray.
    proc = run_dvcray("run", "-n", "placed", "-S", "lr=0.34,0.35", "--cpus-per-exp", "1", "-j", "1",
                      "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    placed = [json.loads(p.read_text()) for p in (root / ".dvcray" / "runs").glob("*.json")]
    placed = [r for r in placed if r["exp_name"].startswith("placed-")]
    assert len(placed) == 2 and all(r["job_id"] == r["run_id"] and r["backend"] == "job" for r in placed)
    logs = run_dvcray("logs", "placed-1", cwd=root)
    assert logs.returncode == 0 and "STAGE-START lr=0.34" in logs.stdout, logs.stderr
    assert {r["exp_name"]: r["state"] for r in runs_json(root)}["placed-2"] == "SUCCEEDED"

    proc = run_dvcray("run", "-n", "sleepy", "-S", "lr=0.33", "-S", "sleep=60", "--detach", "--store", str(store),
                      cwd=root)
    assert proc.returncode == 0, proc.stderr
    (record,) = [json.loads(p.read_text()) for p in (root / ".dvcray" / "runs").glob("*.json")
                 if json.loads(p.read_text())["exp_name"] == "sleepy"]
    assert record["backend"] == "job" and record["job_id"] == record["run_id"]
    run_dir = store / "dvcray" / "runs" / record["run_id"]
    wait_for(lambda: "STAGE-START" in store_log(run_dir), 90, "the stage to start")
    stop = run_dvcray("stop", "sleepy", cwd=root, timeout=120)
    assert stop.returncode == 0, stop.stderr
    # It ended mid-stage and saved its result; ``stop`` and ``runs`` say how it ended: STOPPED (its
    # parent shell dies with the job's process group, and that is no loss: only a runner forked
    # by the runner service or a node's warm runner is lost with its parent).
    status = json.loads((run_dir / "result.json").read_text())["status"]
    assert status == "STOPPED" and f"ended {status}" in stop.stderr, stop.stderr
    assert "Traceback" not in stop.stderr and "STAGE-END" not in store_log(run_dir)
    assert {r["exp_name"]: r["state"] for r in runs_json(root)}["sleepy"] == status
