"""``dvcray queue start``: DVC's own queue (``dvc exp run --queue``) run on a real Ray head."""

from __future__ import annotations

from pathlib import Path

from helpers import exp_metrics, exp_refs, node_files, queued, run_dvcray, sh

PLANTED_TOKEN = "isat_queue-planted-token-9f8e7d6c5b4a"

STAGE = """\
import json, sys, yaml
p = yaml.safe_load(open("params.yaml"))
note = open("note.txt").read().strip()
print(f"queued run x={p['x']} note={note}", flush=True)
if note == "fail":
    sys.exit("the planned failure")
json.dump({"x": p["x"], "note": note}, open("m.json", "w"))
"""


def queue_project(make_dvc_project) -> Path:
    return make_dvc_project({
        "params.yaml": "x: 0\n",
        "note.txt": "committed\n",
        "stage.py": STAGE,
        "dvc.yaml": "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py, note.txt]\n    params: [x]\n"
                    "    metrics: [{m.json: {cache: false}}]\n",
    })


def test_queued_experiments_run_with_their_workspace_and_leave_the_queue(
        ray_cluster, make_dvc_project, tmp_path, studio_capture):
    root = queue_project(make_dvc_project)
    # Studio names a repo by its git remote's URL (only read, never contacted).
    sh("git", "remote", "add", "origin", "https://git.example.com/team/queue.git", cwd=root)
    store = tmp_path / "store"
    # Queued with a Studio token set, so DVC pickles it into the stash entry's repro.dat.
    token_env = studio_capture.env(PLANTED_TOKEN)
    (root / "note.txt").write_text("edited\n")                 # an uncommitted edit, queued...
    sh("dvc", "exp", "run", "--queue", "-n", "q-edit", "-S", "x=11", cwd=root, env=token_env)
    sh("git", "checkout", "-q", "--", "note.txt", cwd=root)    # ... then reverted
    sh("dvc", "exp", "run", "--queue", "-n", "q-plain", "-S", "x=12", cwd=root, env=token_env)
    (root / "note.txt").write_text("fail\n")
    sh("dvc", "exp", "run", "--queue", "-n", "q-fail", "-S", "x=13", cwd=root, env=token_env)
    sh("git", "checkout", "-q", "--", "note.txt", cwd=root)
    assert queued(root) == ["q-edit", "q-plain", "q-fail"]
    before = sh("git", "status", "--porcelain", cwd=root)

    proc = run_dvcray("queue", "start", "--store", str(store), cwd=root, env=token_env)
    assert proc.returncode == 1, proc.stdout + proc.stderr       # q-fail failed, as planned
    assert "q-fail" in proc.stderr and "1 of 3 experiments failed" in proc.stderr

    # Names, params and the reverted edit reached the runs, and each came home.
    assert exp_metrics(root, "q-edit", "m.json") == {"x": 11, "note": "edited"}
    assert exp_metrics(root, "q-plain", "m.json") == {"x": 12, "note": "committed"}
    assert {r.rsplit("/", 1)[-1] for r in exp_refs(root) if r.count("/") == 4} == {"q-edit", "q-plain"}
    assert sh("git", "status", "--porcelain", cwd=root) == before
    # DVC's queue is empty, as dvc queue status says; the failure is where DVC records one.
    assert queued(root) == []
    assert "Queued" not in sh("dvc", "queue", "status", cwd=root)
    assert "q-fail" in sh("git", "reflog", "refs/exps/celery/failed", cwd=root)

    # The token never reached the cluster: not in the store, not in Ray's session (job
    # packages as unpacked on the node, logs), not in what the runner service received
    # (its snapshots and logs on the node), and repro.dat did not travel.
    cluster_files = [p for p in store.rglob("*") if p.is_file()] + node_files(ray_cluster)
    patches = [p for p in cluster_files if p.name.startswith("queued-") and p.suffix == ".patch"]
    assert patches, "the queued experiments' patches were not found on the node"
    assert not any(b"repro.dat" in p.read_bytes() for p in patches)
    leaked = [p for p in cluster_files if PLANTED_TOKEN.encode() in p.read_bytes()]
    assert not leaked, leaked
    from dvcray_cli import clusters

    jobs = clusters.connect(ray_cluster.dashboard_url).list_jobs()
    assert PLANTED_TOKEN not in repr(jobs)
    # The client relayed the runs' live updates to Studio with its own token.
    sent = studio_capture.take()
    assert {(p["body"]["name"], p["body"]["type"]) for p in sent} >= {
        ("q-edit", "start"), ("q-edit", "done"), ("q-plain", "start"), ("q-plain", "done")}
    assert {p["authorization"] for p in sent} == {f"token {PLANTED_TOKEN}"}


def test_a_name_taken_meanwhile_is_refused_before_anything_changes(ray_cluster, make_dvc_project, tmp_path):
    root = queue_project(make_dvc_project)
    store = tmp_path / "store"
    sh("dvc", "exp", "run", "--queue", "-n", "taken", "-S", "x=21", cwd=root)
    sh("dvc", "exp", "run", "--queue", "-n", "free", "-S", "x=22", cwd=root)
    sh("dvc", "exp", "run", "-n", "taken", "-S", "x=23", cwd=root)   # the name is taken meanwhile
    sh("git", "checkout", "-q", "--", ".", cwd=root)

    proc = run_dvcray("queue", "start", "--store", str(store), cwd=root)
    assert proc.returncode == 2, proc.stderr
    assert "taken" in proc.stderr and "dvcray queue start free" in proc.stderr
    assert queued(root) == ["taken", "free"] and not store.exists()

    proc = run_dvcray("queue", "start", "nope", "--store", str(store), cwd=root)
    assert proc.returncode == 2 and "Not in DVC's queue: nope" in proc.stderr

    proc = run_dvcray("queue", "start", "free", "--store", str(store), cwd=root)   # the others, by name
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert exp_metrics(root, "free", "m.json") == {"x": 22, "note": "committed"}
    assert queued(root) == ["taken"]


def test_an_empty_queue_says_so_and_starts_nothing(make_dvc_project):
    root = queue_project(make_dvc_project)
    proc = run_dvcray("queue", "start", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "no experiments waiting" in proc.stderr
    from dvcray_cli.clusters import local

    assert local.records() == []  # no local cluster was started for nothing
