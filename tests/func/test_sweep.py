"""Sweeps: ``dvcray run -S a=1,2`` fans experiments out and brings each home."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import exp_metrics, exp_refs, run_dvcray, sh

STAGE = """\
import json, sys, time, yaml
p = yaml.safe_load(open("params.yaml"))
print(f"start x={p['x']} y={p['y']}", flush=True)
time.sleep(p.get("sleep", 0))
if p["x"] == p.get("fail_on"):
    sys.exit(f"x={p['x']} is the planned failure")
json.dump({"z": p["x"] * 10 + p["y"]}, open("m.json", "w"))
"""


def sweep_project(make_dvc_project, extra: str = "") -> Path:
    return make_dvc_project({
        "params.yaml": "x: 0\ny: 0\nsleep: 0\nfail_on: -1\n" + extra,
        "stage.py": STAGE,
        "dvc.yaml": "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n    params: [x, y, sleep, fail_on]\n"
                    "    metrics: [{m.json: {cache: false}}]\n",
    })


def test_grid_runs_every_combination_and_brings_each_home(ray_cluster, make_dvc_project, tmp_path):
    root = sweep_project(make_dvc_project)
    proc = run_dvcray("run", "-n", "grid", "-S", "x=1,2", "-S", "y=3,4", "--store", str(tmp_path / "s"), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = {name: exp_metrics(root, name, "m.json")["z"] for name in ("grid-1", "grid-2", "grid-3", "grid-4")}
    assert sorted(got.values()) == [13, 14, 23, 24]
    # Not in a terminal: plain lines, each prefixed with its experiment's name.
    assert any(line.startswith("[grid-") and "start x=" in line for line in proc.stdout.splitlines())
    assert "\x1b[" not in proc.stdout + proc.stderr  # no colour, no spinner codes


def test_one_failure_exits_1_names_it_and_keeps_the_others(ray_cluster, make_dvc_project, tmp_path):
    root = sweep_project(make_dvc_project)
    proc = run_dvcray("run", "-n", "part", "-S", "x=1,2,3", "-S", "fail_on=2", "--json",
                      "--store", str(tmp_path / "s"), cwd=root)
    assert proc.returncode == 1, proc.stderr
    assert "part-2" in proc.stderr and "1 of 3 experiments failed" in proc.stderr
    outcomes = {o["exp_name"]: o for o in json.loads(proc.stdout)}
    assert outcomes["part-2"]["status"] == "FAILED"
    assert outcomes["part-1"]["status"] == outcomes["part-3"]["status"] == "SUCCEEDED"
    names = {ref.rsplit("/", 1)[-1] for ref in exp_refs(root)}
    assert names == {"part-1", "part-3"}


def test_jobs_limits_how_many_run_at_once(ray_cluster, make_dvc_project, tmp_path):
    root = sweep_project(make_dvc_project)
    store = tmp_path / "s"
    proc = run_dvcray("run", "-n", "one", "-S", "x=1,2,3", "-S", "sleep=1", "-j", "1", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spans = sorted((r["started"], r["ended"]) for r in
                   (json.loads(p.read_text()) for p in (store / "dvcray" / "runs").glob("*/result.json")))
    assert len(spans) == 3
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans


def test_placed_experiments_reserve_their_resources_without_a_job_each(ray_cluster, make_dvc_project, tmp_path):
    root = sweep_project(make_dvc_project)
    proc = run_dvcray("run", "-n", "placed", "-S", "x=1,2", "--cpus-per-exp", "1", "--store", str(tmp_path / "s"),
                      cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from dvcray_cli import clusters

    # This project's (other test files run "placed-N" experiments as Ray Jobs on the session's cluster).
    baseline = sh("git", "rev-parse", "HEAD", cwd=root)
    assert not [j for j in clusters.connect(ray_cluster.dashboard_url).list_jobs()
                if (j.metadata or {}).get("baseline") == baseline], "no Ray Job per experiment"
    import requests

    # What Ray recorded: each experiment reserved 1 CPU (a placement group named after
    # its run; on the head, as the store is a folder here), and ran on the warm runner
    # of the node it was placed on.
    def state(kind: str) -> list[dict]:
        return requests.get(f"{ray_cluster.dashboard_url}/api/v0/{kind}", params={"detail": "1", "limit": "1000"},
                            headers={"Authorization": f"Bearer {ray_cluster.token()}"},
                            timeout=30).json()["data"]["result"]["result"]

    runs = [p.name for p in (tmp_path / "s" / "dvcray" / "runs").iterdir()]
    groups = {g["name"]: g for g in state("placement_groups")}
    for run_id in runs:
        bundles = groups[f"dvcray-{run_id}"]["bundles"]
        assert len(bundles) == 1 and bundles[0]["unit_resources"]["CPU"] == 1.0, bundles
    assert any(a["name"].startswith("dvcray-runner-") and a["state"] == "ALIVE" for a in state("actors"))
    assert {exp_metrics(root, n, "m.json")["z"] for n in ("placed-1", "placed-2")} == {10, 20}


def test_ctrl_c_stops_every_experiment(ray_cluster, make_dvc_project, tmp_path):
    root = sweep_project(make_dvc_project)
    store = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "-n", "stopme", "-S", "x=1,2",
                             "-S", "sleep=120", "--store", str(store)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = set()
    deadline = time.time() + 120
    while len(seen) < 2:
        assert time.time() < deadline
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.stderr.read()
        if "start x=" in line:
            seen.add(line.split("]")[0])
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    results = [json.loads(p.read_text()) for p in (store / "dvcray" / "runs").glob("*/result.json")]
    assert sorted(r["status"] for r in results) == ["STOPPED", "STOPPED"]
    from dvcray_cli import clusters, ray_api

    assert ray_api.active_runs(clusters.connect(ray_cluster.dashboard_url)) == []


def test_a_taken_name_in_the_grid_is_refused_first(ray_cluster, make_dvc_project, tmp_path):
    root = sweep_project(make_dvc_project)
    sh("dvc", "exp", "run", "-q", "-n", "dup-2", cwd=root)
    sh("git", "checkout", "-q", "--", ".", cwd=root)
    proc = run_dvcray("run", "-n", "dup", "-S", "x=1,2", "--store", str(tmp_path / "s"), cwd=root)
    assert proc.returncode == 2 and "dup-2" in proc.stderr
    assert not (tmp_path / "s" / "dvcray").exists()
