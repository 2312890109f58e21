"""Proof on ``local-multinode``: Ray's fake_multinode provider, whose autoscaler starts
real raylets on this machine as worker nodes (a head of 0 CPUs, 1-CPU workers, 1 to 3).

One cluster for the module, started and stopped through the real ``dvcray cluster``
commands with a HOME of its own (its record and token live there). Its processes
have fake AWS credentials of their own, as an instance profile would give nodes.
The test that kills the cluster goes last; the module's teardown then proves that
``cluster down`` leaves nothing running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from helpers import bucket_objects, cluster_env, exp_metrics, s3_default_remote, sh, store_log

pytestmark = pytest.mark.slow

HEAD_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # fake_multinode's head node id

def _dvcray(*args: str, env: dict, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvcray_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _left_behind(gcs_address: str, temp_dir: str) -> list[str]:
    """Processes that still belong to the cluster by their environment or command line
    (a stronger test than find_pids, which follows the process tree). Its GCS address
    spelled out, not its port alone: Ray clusters of test beds (other namespaces, other
    addresses) use port 6379 too."""
    port = gcs_address.rsplit(":", 1)[1]
    marks = (temp_dir, gcs_address, f"127.0.0.1:{port}")
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        if p.pid == os.getpid():
            continue
        try:
            text = " ".join(p.info["cmdline"] or []) + " " + " ".join(p.environ().values())
        except psutil.Error:
            continue
        if any(mark in text for mark in marks):
            found.append(f"{p.pid} {p.info['name']}")
    return found


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    from dvcray_cli.clusters import local

    home = tmp_path_factory.mktemp("multinode-home")
    env = cluster_env(home)
    t = time.monotonic()
    proc = _dvcray("cluster", "up", "local-multinode", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    up_s = time.monotonic() - t
    record = json.loads((home / ".dvcray" / "clusters" / "local-multinode.json").read_text())
    head = local.LocalCluster.from_json(record)
    try:
        yield SimpleNamespace(home=home, env=env, head=head, up_s=up_s, up_stderr=proc.stderr)
    finally:
        down = _dvcray("cluster", "down", "local-multinode", "--yes", env=env)
        left = head.pids()
        behind = _left_behind(head.gcs_address, head.temp_dir)
        if left or behind:  # never leave another test a stray cluster
            head.stop(timeout=5)
        shutil.rmtree(head.temp_dir, ignore_errors=True)
        assert down.returncode == 0, down.stdout + down.stderr
        assert left == [] and behind == [], f"cluster down left {left} {behind}"
        assert not (home / ".dvcray" / "clusters" / "local-multinode.json").exists()


@pytest.fixture
def on_multinode(multinode, monkeypatch):
    """This test's dvcray commands reach the module's cluster."""
    monkeypatch.setenv("RAY_ADDRESS", multinode.head.dashboard_url)
    monkeypatch.setenv("RAY_AUTH_TOKEN", multinode.head.token())
    return multinode


def _status(multinode) -> dict:
    proc = _dvcray("cluster", "status", "--json", env=multinode.env)
    assert proc.returncode == 0, proc.stderr
    return next(c for c in json.loads(proc.stdout) if c["name"] == "local-multinode")


def test_status_shows_the_workers_the_autoscaler_added(multinode):
    assert "autoscaler" in multinode.up_stderr
    entry = _status(multinode)
    nodes = entry["nodes"]
    assert len(nodes) >= 2, nodes
    heads = [n for n in nodes if n["is_head"]]
    assert len(heads) == 1 and heads[0]["resources"].get("CPU", 0) == 0
    workers = [n for n in nodes if not n["is_head"]]
    assert workers and all(n["resources"]["CPU"] == 1 for n in workers)
    assert entry["autoscaling"] and entry["max_resources"]["CPU"] == 3
    assert isinstance(entry["pending"], list) and isinstance(entry["waiting"], list)
    table = _dvcray("cluster", "status", env=multinode.env)
    assert "Nodes of local-multinode" in table.stdout and "worker" in table.stdout


PINNED_STAGE = """\
import json, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
here = ray.get_runtime_context().get_node_id()
workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"]]
@ray.remote(num_cpus=1)
def probe():
    import helper
    return {"value": helper.VALUE, "node": ray.get_runtime_context().get_node_id()}
got = ray.get(probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(workers[0], soft=False)).remote())
json.dump({**got, "driver": here, "on_worker": got["node"] in workers}, open("out.json", "w"))
"""


def test_a_task_pinned_to_a_worker_node_imports_the_edited_module(on_multinode, make_dvc_project, tmp_path):
    root = make_dvc_project({
        "src/helper.py": 'VALUE = "committed"\n',
        "src/stage.py": PINNED_STAGE,
        "dvc.yaml": "stages:\n  s:\n    cmd: python src/stage.py\n    deps: [src]\n"
                    "    metrics: [{out.json: {cache: false}}]\n",
    })
    (root / "src" / "helper.py").write_text('VALUE = "edited"\n')  # uncommitted
    proc = _dvcray("run", "-n", "pinned", "--cpus-per-exp", "1", "--store", str(tmp_path / "store"), cwd=root,
                   env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = exp_metrics(root, "pinned", "out.json")
    assert out["value"] == "edited"
    # The runner (and the stage's driver) stayed on the head, and dvcray said why: the
    # store is a folder only the head reaches, and the head has no CPU to reserve.
    assert out["driver"] == HEAD_ID
    assert "only the head reaches" in proc.stderr and "without a reservation" in proc.stderr
    assert out["node"] != HEAD_ID and out["on_worker"] is True


PLACED_STAGE = """\
import json, ray, yaml
x = yaml.safe_load(open("params.yaml"))["x"]
ray.init()
@ray.remote(num_cpus=1)
def times_ten(v):
    return v * 10
json.dump({"z": ray.get(times_ten.remote(x))}, open("m.json", "w"))
"""


def test_s3_store_places_runners_on_workers_and_more_experiments_than_cpus_all_finish(
        on_multinode, s3_bucket, make_dvc_project):
    endpoint, bucket = s3_bucket
    root = make_dvc_project({
        "params.yaml": "x: 0\n",
        "stage.py": PLACED_STAGE,
        "dvc.yaml": "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n    params: [x]\n"
                    "    metrics: [{m.json: {cache: false}}]\n",
    }, commit=False)
    s3_default_remote(root, endpoint, bucket)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-q", "-m", "s3 project", cwd=root)

    # 4 experiments, each runner reserving 1 CPU, its stage's task needing 1 more, on at
    # most 3 CPUs: all 4 at once would hold every CPU and wait forever for their tasks.
    # No address and no token: `dvcray run` finds the cluster where `cluster up` recorded
    # it (its HOME), as for a user, and so knows the most it can grow to (3 CPUs).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(on_multinode.home)
    proc = _dvcray("run", "-n", "placed", "-S", "x=1,2,3,4", "--cpus-per-exp", "1", cwd=root, env=env,
                   timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "At most 2 experiment(s) at once" in proc.stderr
    assert on_multinode.head.dashboard_url in proc.stderr  # "Running 4 experiment(s) on URL"
    assert [exp_metrics(root, f"placed-{i}", "m.json")["z"] for i in range(1, 5)] == [10, 20, 30, 40]

    # Where Ray placed each experiment (the node of its reservation, where its runner ran,
    # as the runner recorded it): on worker nodes, never the head, and on more than one:
    # the autoscaler added nodes for the experiments that waited. No Ray Job each.
    results = [json.loads(data) for key, data in bucket_objects(endpoint, bucket).items()
               if key.endswith("/result.json")]
    placed_on = {r["ray_node"] for r in results}
    assert HEAD_ID not in placed_on and "" not in placed_on, placed_on
    assert len(placed_on) >= 2, placed_on
    from dvcray_cli import ray_api

    client = ray_api.client(on_multinode.head.dashboard_url, on_multinode.head.token())
    assert not [j for j in client.list_jobs() if (j.metadata or {}).get("exp_name", "").startswith("placed-")]
    # Runners queued: at most 2 ran at once (each one's span, as it recorded it in the store).
    spans = sorted((r["started"], r["ended"]) for r in results)
    assert len(spans) == 4
    assert max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans) <= 2, spans


DYING_STAGE = """\
import time
print("STAGE-STARTED", flush=True)
time.sleep(300)
"""


def test_a_cluster_that_dies_mid_run_is_exit_3_and_the_run_lost(on_multinode, make_dvc_project, tmp_path):
    """Goes last: it kills the module's cluster (its GCS and raylets, by pid)."""

    head = on_multinode.head
    root = make_dvc_project({
        "stage.py": DYING_STAGE,
        "dvc.yaml": "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n",
    })
    store = tmp_path / "store"
    # The cluster's HOME: where `dvcray cluster up` recorded it, as for a user.
    env = {**os.environ, "HOME": str(on_multinode.home), "DVCRAY_RECONNECT_TIMEOUT_S": "5"}
    # No reconnect timeout within the test's hang guard: the run can end only by noticing the death.
    run = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "-n", "doomed", "--store", str(store)],
                           cwd=root, env={**env, "DVCRAY_RECONNECT_TIMEOUT_S": "3600"}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        run_dir = None
        while time.monotonic() < deadline:
            dirs = list((store / "dvcray" / "runs").glob("dvcray-*"))
            if dirs and "STAGE-STARTED" in store_log(dirs[0]):
                run_dir = dirs[0]
                break
            assert run.poll() is None, run.communicate()
            time.sleep(0.5)
        assert run_dir is not None, "the stage did not start"
        run_id = run_dir.name

        victims = [p for p in head.pids() if psutil.Process(p).name() in ("gcs_server", "raylet")]
        assert sum(psutil.Process(p).name() == "raylet" for p in victims) >= 2, victims  # head and a worker
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        out, err = run.communicate(timeout=300)   # a hang guard: the stage would sleep 300 s
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 3, out + err
    assert "died" in err and run_id in err and "Traceback" not in err
    assert "STAGE-STARTED" in store_log(run_dir)  # the store kept the log up to then

    # The runner service outlives the GCS by a few seconds; its watchdog then stops the
    # run, whose runner saves what it has: its word must be LOST, not STOPPED (nobody
    # stopped it), in the store and in `dvcray runs` before and after it saved.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (run_dir / "result.json").exists():
        runs = _dvcray("runs", "--json", cwd=root, env=env, timeout=120)
        assert runs.returncode == 0, runs.stderr
        states = {r["run_id"]: r["state"] for r in json.loads(runs.stdout)}
        assert states[run_id] == "LOST", states
        time.sleep(2)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "LOST" and "died" in result["error"], result
    runs = _dvcray("runs", "--json", cwd=root, env=env, timeout=120)
    assert runs.returncode == 0, runs.stderr
    states = {r["run_id"]: (r["state"], r.get("error")) for r in json.loads(runs.stdout)}
    assert states[run_id][0] == "LOST" and "died" in states[run_id][1], states
    logs = _dvcray("logs", run_id, cwd=root, env=env, timeout=120)
    assert "STAGE-STARTED" in logs.stdout, logs.stdout
    assert f"Run {run_id} is LOST: its cluster died" in logs.stderr and "saved no result" not in logs.stderr, \
        logs.stderr
