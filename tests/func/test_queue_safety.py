"""Nothing is lost from DVC's queue (issue 20, point 7, and the queue's known gaps).

``dvcray queue start`` takes experiments from DVC's queue. Each test kills or stops the
client where it would hurt (after taking them, after submitting them, when one has
ended and its outcome is not recorded yet) with SIGKILL and with SIGTERM, and checks
that every experiment ends up home, listed as failed where DVC lists a local failure,
or back in the queue: never gone. Real ``dvcray`` processes, a real Ray head, real DVC.
The client stops itself at the point a test names (``DVCRAY_QUEUE_PAUSE``) so that the
signal lands exactly there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import exp_metrics, exp_refs, run_dvcray, sh

STAGE = """\
import json, os, sys, time, yaml
p = yaml.safe_load(open("params.yaml"))
note = open("note.txt").read().strip()
extra = open("extra.txt").read().strip() if os.path.exists("extra.txt") else None
time.sleep(p["pause"])
print(f"queued run x={p['x']} note={note}", flush=True)
if note == "fail":
    sys.exit("the planned failure")
json.dump({"x": p["x"], "note": note, "extra": extra}, open("m.json", "w"))
"""


def queue_project(make_dvc_project) -> Path:
    return make_dvc_project({
        "params.yaml": "x: 0\npause: 0\n",
        "note.txt": "committed\n",
        "stage.py": STAGE,
        ".gitignore": "extra.txt\n",
        "dvc.yaml": "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py, note.txt]\n    params: [x, pause]\n"
                    "    metrics: [{m.json: {cache: false}}]\n",
    })


def status(root: Path) -> dict[str, str]:
    """``{name: status}`` as ``dvc queue status`` lists them (DVC's own API for it)."""
    from dvc.repo import Repo

    with Repo(os.fspath(root)) as repo:
        return {e["name"]: e["status"] for e in repo.experiments.celery_queue.status()}


def home(root: Path) -> set[str]:
    return {r.rsplit("/", 1)[-1] for r in exp_refs(root) if r.count("/") == 4}


def journal(root: Path) -> list[str]:
    folder = root / ".dvcray" / "queue"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def results(store: Path) -> int:
    return len(list((store / "dvcray" / "runs").glob("*/result.json"))) if store.exists() else 0


def stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def test_a_cluster_failure_is_listed_as_dvc_lists_a_local_one_and_copy_paths_travel(
        ray_cluster, make_dvc_project, tmp_path):
    """An experiment that failed on the cluster is Failed in ``dvc queue status``, shown by
    ``dvc exp show`` and removed by ``dvc queue remove --failed``, as a local failure is;
    ``--copy-paths`` given at queue time reach the run (from the workspace, as DVC copies them)."""
    root = queue_project(make_dvc_project)
    store = tmp_path / "store"
    (root / "extra.txt").write_text("copied\n")   # ignored by git: only --copy-paths takes it
    sh("dvc", "exp", "run", "--queue", "-n", "c-ok", "-S", "x=31", "--copy-paths", "extra.txt", cwd=root)
    (root / "note.txt").write_text("fail\n")
    sh("dvc", "exp", "run", "--queue", "-n", "c-fail", "-S", "x=32", cwd=root)
    sh("git", "checkout", "-q", "--", "note.txt", cwd=root)

    proc = run_dvcray("queue", "start", "--store", str(store), cwd=root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 of 2 experiments failed: c-fail" in proc.stderr, proc.stderr
    assert exp_metrics(root, "c-ok", "m.json") == {"x": 31, "note": "committed", "extra": "copied"}
    assert status(root) == {"c-fail": "Failed"}
    shown = subprocess.run(["dvc", "exp", "show", "--no-pager", "--csv"], cwd=root, capture_output=True, text=True)
    assert shown.returncode == 0 and "c-fail" in shown.stdout, shown.stderr
    assert "Failed" in sh("dvc", "queue", "status", cwd=root)
    sh("dvc", "queue", "remove", "--failed", cwd=root)
    assert status(root) == {} and journal(root) == []


@pytest.mark.parametrize("point", ["taken", "submitted", "ended"])
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_or_terminated_at_each_point_no_experiment_is_lost(ray_cluster, make_dvc_project, tmp_path,
                                                                   point, sig):
    root = queue_project(make_dvc_project)
    store = tmp_path / "store"
    seed = {"taken": 40, "submitted": 50, "ended": 60}[point] + (0 if sig == "SIGKILL" else 5)
    sh("dvc", "exp", "run", "--queue", "-n", "k1", "-S", f"x={seed + 1}", "-S", "pause=0", cwd=root)
    sh("dvc", "exp", "run", "--queue", "-n", "k2", "-S", f"x={seed + 2}", "-S", "pause=6", cwd=root)
    assert status(root) == {"k1": "Queued", "k2": "Queued"}

    client = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "queue", "start", "--store", str(store)],
                              cwd=root, env={**os.environ, "DVCRAY_QUEUE_PAUSE": point},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not stopped(client.pid):
            assert client.poll() is None and time.monotonic() < deadline, client.communicate()
            time.sleep(0.2)
        os.kill(client.pid, getattr(signal, sig))
        if sig == "SIGTERM":
            os.kill(client.pid, signal.SIGCONT)
        out, err = client.communicate(timeout=300)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()

    if sig == "SIGTERM":
        # Caught: nothing is left to a later start. Never-submitted ones are back in the queue;
        # submitted ones were stopped, as Ctrl-C stops them, and recorded as DVC records them.
        assert client.returncode == 130, out + err
        assert journal(root) == [], err
        left = status(root)
        if point == "taken":
            assert left == {"k1": "Queued", "k2": "Queued"}, err
        else:
            assert {n: left.get(n) for n in ("k1", "k2") if n not in home(root)} == \
                {n: "Failed" for n in ("k1", "k2") if n not in home(root)}, (left, err)
        if point != "ended":
            assert home(root) == set()
    else:
        assert client.returncode == -signal.SIGKILL
        assert len(journal(root)) == 4, journal(root)   # both, each with its DVC message
        assert status(root) == {}, "taken from DVC's queue, and not lost: in the journal"
        if point != "taken":   # submitted: they run on; the next start records them once ended
            deadline = time.monotonic() + 300
            while results(store) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.5)

    again = run_dvcray("queue", "start", "--store", str(store), cwd=root)
    assert again.returncode == 0, again.stdout + again.stderr
    if sig == "SIGKILL" and point == "taken":
        assert "Put back in DVC's queue: k1, k2" in again.stderr
    elif sig == "SIGKILL":
        assert "Brought home from an earlier dvcray queue start" in again.stderr
    # Every experiment is home, or listed where DVC lists failures: none lost, none twice.
    left = status(root)
    assert set(home(root)) | {n for n, s in left.items() if s == "Failed"} == {"k1", "k2"}, (home(root), left)
    assert not [s for s in left.values() if s in ("Queued", "Running")]
    assert journal(root) == []
    for name in home(root):
        assert exp_metrics(root, name, "m.json")["x"] == seed + int(name[1])


def test_detach_returns_once_submitted_and_pull_and_the_next_start_record_them(
        ray_cluster, make_dvc_project, tmp_path):
    """``queue start --detach`` returns once both are submitted; ``dvcray pull`` brings the one
    that succeeded home (and it leaves DVC's queue), the next ``queue start`` records the one
    that failed as DVC lists a failure."""
    root = queue_project(make_dvc_project)
    store = tmp_path / "store"
    sh("dvc", "exp", "run", "--queue", "-n", "d-ok", "-S", "x=71", "-S", "pause=2", cwd=root)
    (root / "note.txt").write_text("fail\n")
    sh("dvc", "exp", "run", "--queue", "-n", "d-fail", "-S", "x=72", cwd=root)
    sh("git", "checkout", "-q", "--", "note.txt", cwd=root)

    proc = run_dvcray("queue", "start", "--detach", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Submitted 2 experiment(s)" in proc.stderr and home(root) == set()
    assert status(root) == {} and len(journal(root)) == 4
    deadline = time.monotonic() + 300
    while results(store) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    pulled = run_dvcray("pull", "d-ok", "--store", str(store), cwd=root)
    assert pulled.returncode == 0, pulled.stderr
    assert exp_metrics(root, "d-ok", "m.json")["x"] == 71
    assert len(journal(root)) == 2, "d-ok left the journal and DVC's queue once it came home"
    again = run_dvcray("queue", "start", "--store", str(store), cwd=root)
    assert again.returncode == 0, again.stderr
    assert "Recorded as failed in DVC's queue (dvc queue status): d-fail" in again.stderr
    assert status(root) == {"d-fail": "Failed"} and journal(root) == []
