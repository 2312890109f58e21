"""Speed and scale (issue 12): the runner service's incremental snapshots, a node's warm
runner dying mid-run, and job records that do not pile up.

Real Ray (the session head), real git and `dvc exp run`. What travelled is read from
what the runner service kept of each submission on the node (its snapshot folder).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from helpers import exp_metrics, node_dir, run_dvcray, sh, store_log

SPEC = {
    "params.yaml": "x: 1\n",
    "stage.py": "import json, yaml\njson.dump({'y': yaml.safe_load(open('params.yaml'))['x'] * 2}, "
                "open('m.json', 'w'))\n",
    "dvc.yaml": "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n    params: [x]\n"
                "    metrics: [{m.json: {cache: false}}]\n",
}


def project(make_dvc_project, name: str = "project") -> Path:
    # A root commit of its own: the node's repository cache is keyed by it.
    return make_dvc_project({**SPEC, "unique.txt": uuid.uuid4().hex}, name=name)


def run(root: Path, name: str, x: int, store: Path, *args: str) -> str:
    proc = run_dvcray("run", "-n", name, "-S", f"x={x}", "--store", str(store), "--json", *args, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert exp_metrics(root, name, "m.json") == {"y": 2 * x}
    return json.loads(proc.stdout)["run_id"]


def sent(head, run_id: str) -> list[str] | None:
    """The prerequisites of the bundle the runner service received for ``run_id``
    (commits it was made against); None when no bundle travelled at all."""
    folder = node_dir(head) / "service" / "snapshots" / run_id
    assert folder.is_dir(), f"the service kept no snapshot for {run_id}"
    bundle = folder / "repo.bundle"
    if not bundle.exists():
        return None
    header = bundle.read_bytes().split(b"\n\n", 1)[0].decode().splitlines()
    return [line[1:41] for line in header if line.startswith("-")]


def commit(root: Path, n: int) -> None:
    for i in range(n):
        (root / "notes.txt").write_text(f"{uuid.uuid4().hex}\n")
        sh("git", "add", "-A", cwd=root)
        sh("git", "commit", "-q", "-m", f"note {i}", cwd=root)


def head_of(root: Path) -> str:
    return sh("git", "rev-parse", "HEAD", cwd=root)


def test_only_what_the_cluster_lacks_travels_and_a_wiped_cache_or_rewritten_history_needs_nothing(
        ray_cluster, make_dvc_project, tmp_path):
    root = project(make_dvc_project)
    store = tmp_path / "store"
    commit(root, 3)

    first = run(root, "a1", 7101, store)
    assert sent(ray_cluster, first) == [], "the first run sends the whole history"
    before = head_of(root)
    commit(root, 2)
    thin = run(root, "a2", 7102, store)
    assert sent(ray_cluster, thin) == [before], "the next one sends only the new commits"
    assert sent(ray_cluster, run(root, "a3", 7103, store)) is None, "nothing new: no bundle at all"

    # The node's copy of the project is wiped: the next run sends it all again, unasked.
    caches = list((node_dir(ray_cluster) / "repos").glob("*.git"))
    root_commit = sh("git", "rev-list", "--max-parents=0", "HEAD", cwd=root)
    assert [c.name for c in caches if c.name == f"{root_commit}.git"], caches
    shutil.rmtree(node_dir(ray_cluster) / "repos" / f"{root_commit}.git")
    commit(root, 1)
    assert sent(ray_cluster, run(root, "a4", 7104, store)) == []

    # History rewritten (the last commit amended): only the rewritten commit travels.
    base = sh("git", "rev-parse", "HEAD~1", cwd=root)
    sh("git", "commit", "-q", "--amend", "-m", "rewritten", cwd=root)
    assert sent(ray_cluster, run(root, "a5", 7105, store)) == [base]

    # A second clone of the project: the cluster has its HEAD already.
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(root), str(clone), cwd=tmp_path)
    assert sent(ray_cluster, run(clone, "b1", 7106, store)) is None


def test_a_cluster_that_lost_what_the_bundle_needs_gets_the_whole_history(
        ray_cluster, make_dvc_project, tmp_path, monkeypatch):
    """The cluster said it had a commit, and lost it before the run arrived (wiped
    meanwhile): the service names what is missing and the client sends it all."""
    from dvcray_cli.runs import submit
    from dvcray_cli.runs.finish import finish
    from dvcray_cli.runs.model import RunOptions
    from dvcray_cli.service.client import Service

    root = project(make_dvc_project)
    store = tmp_path / "store"
    run(root, "c1", 7201, store)
    commit(root, 1)
    root_commit = sh("git", "rev-list", "--max-parents=0", "HEAD", cwd=root)
    shutil.rmtree(node_dir(ray_cluster) / "repos" / f"{root_commit}.git")
    monkeypatch.setattr(Service, "have", lambda service, root_, shas: shas[1:])  # stale: "I have HEAD~1"
    sub = submit.submit(RunOptions(exp_name="c2", overrides=["x=7202"], store=str(store)), root, lambda m: None)
    assert sub.backend.recorded()["backend"] == "service"
    state = sub.backend.follow(sub.run_id, lambda text: None)
    assert finish(sub, state).status == "SUCCEEDED"
    assert sent(ray_cluster, sub.run_id) == []
    assert exp_metrics(root, "c2", "m.json") == {"y": 14404}


LONG_STAGE = """\
import time
print("STAGE-STARTED", flush=True)
time.sleep(120)
"""


def _actors(head) -> list[dict]:
    import requests

    return requests.get(f"{head.dashboard_url}/api/v0/actors", params={"detail": "1", "limit": "1000"},
                        headers={"Authorization": f"Bearer {head.token()}"},
                        timeout=30).json()["data"]["result"]["result"]


def test_a_nodes_runner_killed_mid_run_loses_the_run_and_the_next_one_runs(ray_cluster, make_dvc_project, tmp_path):
    """Retries off (with them, the run is tried again: test_retry.py)."""
    root = make_dvc_project({**SPEC, "long.py": LONG_STAGE,
                             "dvc.yaml": SPEC["dvc.yaml"] + "  long:\n    cmd: python long.py\n    deps: [long.py]\n"})
    store = tmp_path / "store"
    client = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "long", "-n", "doomed", "--cpus-per-exp",
                               "1", "--store", str(store), "--retries", "0"], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            runs = list((store / "dvcray" / "runs").glob("dvcray-*"))
            if runs and "STAGE-STARTED" in store_log(runs[0]):
                break
            assert time.monotonic() < deadline and client.poll() is None, client.communicate()
            time.sleep(0.5)
        runners = [a for a in _actors(ray_cluster) if (a.get("name") or "").startswith("dvcray-runner-")
                   and a["state"] == "ALIVE"]
        assert len(runners) == 1, runners
        os.kill(runners[0]["pid"], signal.SIGKILL)
        out, err = client.communicate(timeout=120)   # a hang guard: the stage would sleep 120 s
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 3, out + err   # LOST: not its stage's failure
    assert "is LOST" in err and "went away" in err and "Traceback" not in err
    result = json.loads((runs[0] / "result.json").read_text())
    assert result["status"] == "LOST" and "went away" in result["error"]
    assert "STAGE-STARTED" in store_log(runs[0])
    # The node's runner came back (Ray restarts it): the next placed run runs.
    run(root, "after", 7301, store, "s", "--cpus-per-exp", "1")


def test_finished_job_records_beyond_those_kept_are_deleted(ray_cluster, make_dvc_project, tmp_path, monkeypatch):
    """Runs as Ray Jobs of their own (no runner service), one job record kept."""
    from dvcray_cli import clusters

    monkeypatch.setenv("DVCRAY_SERVICE", "0")
    monkeypatch.setenv("DVCRAY_KEEP_JOBS", "1")
    client = clusters.connect(ray_cluster.dashboard_url)
    theirs = client.submit_job(entrypoint="true")  # not dvcray's: never deleted
    root = project(make_dvc_project)
    store = tmp_path / "store"
    first = run(root, "j1", 7401, store)
    second = run(root, "j2", 7402, store)
    jobs = {j.submission_id for j in client.list_jobs()}
    assert second in jobs and theirs in jobs
    assert first not in jobs, "the older run's job record was deleted once its result was in the store"
    assert (store / "dvcray" / "runs" / first / "log.txt").exists(), "its log lives on in the store"
    logs = run_dvcray("logs", first, cwd=root)
    assert logs.returncode == 0 and "Running stage 's'" in logs.stdout


def test_a_big_snapshot_goes_through_the_store_and_a_big_untracked_file_is_refused_by_name(
        ray_cluster, make_dvc_project, tmp_path, monkeypatch):
    """As Ray Jobs of their own (a snapshot travels as the job's package there)."""
    from dvcray_cli import clusters

    monkeypatch.setenv("DVCRAY_SERVICE", "0")
    root = project(make_dvc_project)
    store = tmp_path / "store"
    (root / "big.bin").write_bytes(os.urandom(3 * 2**20))  # untracked, not ignored: it travels
    monkeypatch.setenv("DVCRAY_MAX_UNTRACKED_MB", "2")
    refused = run_dvcray("run", "-n", "big", "--store", str(store), cwd=root)
    assert refused.returncode == 2, refused.stderr
    assert "big.bin" in refused.stderr and "dvc add big.bin" in refused.stderr and "Traceback" not in refused.stderr
    assert not (store / "dvcray" / "runs").exists()

    monkeypatch.setenv("DVCRAY_MAX_UNTRACKED_MB", "50")
    monkeypatch.setenv("DVCRAY_SNAPSHOT_VIA_STORE_MB", "1")
    run_id = run(root, "big", 7501, store)
    log = clusters.connect(ray_cluster.dashboard_url).get_job_logs(run_id)
    assert "snapshot fetched from the store (3.0 MiB)" in log
    assert not any((store / "dvcray" / "snapshots").iterdir()), "the runner removed it from the store"
