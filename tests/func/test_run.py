"""``dvcray run`` against a real local Ray head, real git and real ``dvc exp run``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TRAIN_PY, exp_metrics, exp_refs, project_spec, run_dvcray, sh

def workspace_state(root: Path) -> tuple[str, dict[str, bytes]]:
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith((".git/", ".dvc/tmp", ".dvc/cache", ".dvcray/")):
            files[rel] = path.read_bytes()
    return sh("git", "status", "--porcelain", cwd=root), files


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


def test_remote_experiment_equals_local_and_leaves_workspace_alone(ray_cluster, make_dvc_project, store):
    root = make_dvc_project(project_spec())
    # Uncommitted edit of a tracked file, an untracked file, and an ignored one.
    (root / "train.py").write_text(TRAIN_PY.replace("FACTOR", "2"))
    (root / "extra.txt").write_text("untracked-but-not-ignored\n")
    (root / "secret.ignored").write_text("must not travel\n")
    before = workspace_state(root)

    proc = run_dvcray("run", "--exp-name", "remote", "-S", "train.lr=0.25", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "training with lr=0.25 epochs=3" in proc.stdout  # the stage's own log line streamed here
    assert workspace_state(root) == before  # no --apply: nothing in the workspace changed

    head = sh("git", "rev-parse", "HEAD", cwd=root)
    ref = f"refs/exps/{head[:2]}/{head[2:]}/remote"
    refs = exp_refs(root)
    assert ref in refs
    assert all(r.count("/") == 4 for r in refs), f"DVC's internal refs came home: {refs}"
    remote = exp_metrics(root, "remote")
    assert remote == {"score": 1.5, "extra": "untracked-but-not-ignored", "ignored_travelled": False}

    # The same experiment run locally by DVC gives the same metrics (the ignored
    # file would be visible to a local run, so it goes first).
    (root / "secret.ignored").unlink()
    sh("dvc", "exp", "run", "-n", "local", "-S", "train.lr=0.25", cwd=root)
    assert exp_metrics(root, "local") == remote


def test_apply_brings_outputs_into_the_workspace(ray_cluster, make_dvc_project, store):
    root = make_dvc_project(project_spec())
    proc = run_dvcray("run", "-n", "applied", "-S", "train.epochs=4", "--apply", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert (root / "model.txt").read_text() == "model 2.0\n"
    assert "epochs: 4" in (root / "params.yaml").read_text()


def test_json_output(ray_cluster, make_dvc_project, store):
    root = make_dvc_project(project_spec())
    proc = run_dvcray("run", "-n", "js", "--json", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "SUCCEEDED"
    assert result["exp_name"] == "js"
    assert result["metrics"]["metrics.json"]["score"] == 1.5
    assert result["params"]["params.yaml"]["train.lr"] == 0.5
    assert "training with" in proc.stderr  # the log went to stderr, stdout is JSON only


def test_failing_stage_exits_1_and_keeps_its_log(ray_cluster, make_dvc_project, store):
    root = make_dvc_project({
        "dvc.yaml": "stages:\n  boom:\n    cmd: python boom.py\n    deps: [boom.py]\n",
        "boom.py": "import sys\nprint('about to fail', flush=True)\nsys.exit('the loss went to NaN')\n",
    })
    proc = run_dvcray("run", "-n", "bad", "--store", str(store), cwd=root)
    assert proc.returncode == 1, proc.stderr
    assert "the loss went to NaN" in proc.stdout + proc.stderr
    run_id = next((store / "dvcray" / "runs").iterdir()).name
    result = json.loads((store / "dvcray" / "runs" / run_id / "result.json").read_text())
    assert result["status"] == "FAILED"
    assert "the loss went to NaN" in (store / "dvcray" / "runs" / run_id / "log.txt").read_text()
    assert not exp_refs(root)


def test_workers_import_the_runs_code(ray_cluster, make_dvc_project, store):
    root = make_dvc_project({
        "src/helper.py": 'VALUE = "committed"\n',
        "src/stage.py": (
            "import json, os, ray\n"
            "ray.init(runtime_env={'env_vars': {'FROM_STAGE': 'yes'}})\n"
            "@ray.remote\n"
            "def probe():\n"
            "    import helper, os\n"
            "    return {'value': helper.VALUE, 'env': os.environ.get('FROM_STAGE')}\n"
            "json.dump(ray.get(probe.remote()), open('out.json', 'w'))\n"
        ),
        "dvc.yaml": "stages:\n  s:\n    cmd: python src/stage.py\n    deps: [src]\n"
                    "    metrics: [{out.json: {cache: false}}]\n",
    })
    (root / "src" / "helper.py").write_text('VALUE = "edited"\n')  # uncommitted
    proc = run_dvcray("run", "-n", "code", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert exp_metrics(root, "code", "out.json") == {"value": "edited", "env": "yes"}
    # No packaging chatter from Ray about the clone dvcray shipped (.git skipped, .gitignore followed, pushed).
    chatter = ("Ignoring upload to cluster", "is now ignored by default", "file package")
    assert not [ln for ln in (proc.stdout + proc.stderr).splitlines() if any(c in ln for c in chatter)]


def test_subdir_project(ray_cluster, tmp_path, store):
    root = tmp_path / "mono"
    sub = root / "ml"
    sub.mkdir(parents=True)
    sh("git", "init", "-q", "-b", "main", cwd=root)
    (root / "README.md").write_text("monorepo\n")
    sh("dvc", "init", "-q", "--subdir", cwd=sub)
    for rel, text in project_spec().items():
        (sub / rel).write_text(text)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-q", "-m", "init", cwd=root)
    proc = run_dvcray("run", "-n", "insub", "--store", str(store), cwd=sub)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert exp_metrics(sub, "insub")["score"] == 1.5


def test_inputs_in_the_local_cache_are_pushed(ray_cluster, make_dvc_project, store):
    root = make_dvc_project({
        "dvc.yaml": "stages:\n  count:\n    cmd: python count.py\n    deps: [count.py, data.csv]\n"
                    "    metrics: [{n.json: {cache: false}}]\n",
        "count.py": "import json\njson.dump({'rows': len(open('data.csv').readlines())}, open('n.json', 'w'))\n",
    }, commit=False)
    (root / "data.csv").write_text("a\nb\nc\n")
    sh("dvc", "add", "-q", "data.csv", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-q", "-m", "data", cwd=root)
    proc = run_dvcray("run", "-n", "withdata", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert exp_metrics(root, "withdata", "n.json") == {"rows": 3}
    assert list((store / "files" / "md5").rglob("*")), "data.csv was not pushed to the store"


def test_missing_input_is_a_clear_error(ray_cluster, make_dvc_project, store):
    root = make_dvc_project({"dvc.yaml": "stages:\n  c:\n    cmd: cat data.csv\n    deps: [data.csv]\n"},
                            commit=False)
    (root / "data.csv").write_text("x\n")
    sh("dvc", "add", "-q", "data.csv", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-q", "-m", "data", cwd=root)
    sh("rm", "-rf", ".dvc/cache", "data.csv", cwd=root)
    proc = run_dvcray("run", "--store", str(store), cwd=root)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "data.csv" in proc.stderr and "missing" in proc.stderr.lower()
    assert not (store / "dvcray" / "runs").exists() or not any((store / "dvcray" / "runs").iterdir())


def test_rerun_after_failure_skips_finished_stages(ray_cluster, make_dvc_project, store):
    root = make_dvc_project({
        "params.yaml": "fail: true\n",
        "dvc.yaml": (
            "stages:\n"
            "  first:\n    cmd: python first.py\n    deps: [first.py]\n    outs: [a.txt]\n"
            "  second:\n    cmd: python second.py\n    deps: [a.txt, second.py]\n    params: [fail]\n"
            "    outs: [b.txt]\n"
        ),
        "first.py": "import time\nprint('FIRST' + ' RAN', flush=True)\nopen('a.txt', 'w').write(str(time.time()))\n",
        "second.py": "import yaml, sys\nif yaml.safe_load(open('params.yaml'))['fail']: sys.exit('planned failure')\n"
                     "open('b.txt', 'w').write(open('a.txt').read())\n",
    })
    first = run_dvcray("run", "-n", "try1", "--store", str(store), cwd=root)
    assert first.returncode == 1 and "planned failure" in first.stdout + first.stderr
    assert "FIRST RAN" in first.stdout
    second = run_dvcray("run", "-n", "try2", "-S", "fail=false", "--store", str(store), cwd=root)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "FIRST RAN" not in second.stdout, "the finished stage was computed again"


def test_two_runs_at_once(ray_cluster, make_dvc_project, store):
    root = make_dvc_project(project_spec())
    env = {**os.environ}
    procs = [subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "-n", name, "-S", f"train.lr={lr}",
                               "--store", str(store)], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for name, lr in (("one", 0.1), ("two", 0.2))]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert exp_metrics(root, "one")["score"] == 0.3
    assert exp_metrics(root, "two")["score"] == 0.6


def test_detach_returns_at_once(ray_cluster, make_dvc_project, store, tmp_path):
    """`--detach` returns while the run goes: its stage cannot end before the test opens a
    gate, which it does only once the command has returned."""
    gate = tmp_path / "gate"
    stage = (f"import os, time\nfor _ in range(3000):\n    if os.path.exists({str(gate)!r}): break\n"
             "    time.sleep(0.1)\nopen('o.txt', 'w').write('x')\n")
    root = make_dvc_project({"stage.py": stage, "dvc.yaml": "stages:\n  gated:\n    cmd: python stage.py\n"
                                                            "    outs: [o.txt]\n"})
    proc = run_dvcray("run", "-n", "bg", "--detach", "--json", "--store", str(store), cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    assert f"dvcray logs {run_id}" in proc.stderr
    assert run_state(root, run_id) in ("PENDING", "RUNNING")
    gate.touch()
    deadline = time.time() + 300   # a hang guard
    while run_state(root, run_id) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline
        time.sleep(0.5)
    assert run_state(root, run_id) == "SUCCEEDED"


def run_state(root: Path, run_id: str) -> str:
    """The run's state as ``dvcray runs --json`` says (the cluster's word while it answers)."""
    proc = run_dvcray("runs", "--json", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return next(r["state"] for r in json.loads(proc.stdout) if r["run_id"] == run_id)


def test_ctrl_c_stops_the_job(ray_cluster, make_dvc_project, store):
    root = make_dvc_project({
        "dvc.yaml": "stages:\n  long:\n    cmd: python long.py\n    outs: [o.txt]\n",
        "long.py": "import time\nprint('long stage started', flush=True)\ntime.sleep(120)\n",
    })
    proc = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "-n", "cc", "--store", str(store)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.time() + 120
    while "long stage started" not in seen:
        assert time.time() < deadline, seen
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.stderr.read()
        seen += line
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 130, stderr
    run_id = next((store / "dvcray" / "runs").iterdir()).name
    assert run_state(root, run_id) == "STOPPED"
    result = json.loads((store / "dvcray" / "runs" / run_id / "result.json").read_text())
    assert result["status"] == "STOPPED"
    assert "long stage started" in (store / "dvcray" / "runs" / run_id / "log.txt").read_text()


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_before_anything_changes(ray_cluster, make_dvc_project, tmp_path, store):
    plain = tmp_path / "plain"
    plain.mkdir()
    r = run_dvcray("run", cwd=plain)
    assert r.returncode == 2 and "not in a git repository" in r.stderr

    sh("git", "init", "-q", cwd=plain)
    r = run_dvcray("run", cwd=plain)
    assert r.returncode == 2 and "no commit" in r.stderr

    (plain / "a.txt").write_text("a\n")
    sh("git", "add", "-A", cwd=plain)
    sh("git", "commit", "-q", "-m", "a", cwd=plain)
    r = run_dvcray("run", cwd=plain)
    assert r.returncode == 2 and "not in a DVC project" in r.stderr

    sh("dvc", "init", "-q", cwd=plain)
    r = run_dvcray("run", cwd=plain)
    assert r.returncode == 2 and "no pipeline" in r.stderr

    root = make_dvc_project(project_spec())
    before = workspace_state(root)
    r = run_dvcray("run", "-S", "train.lrr=1", "--store", str(store), cwd=root)
    assert r.returncode == 2 and "train.lrr" in r.stderr

    r = run_dvcray("run", "-S", "train.lr=1,2", "--detach", "--store", str(store), cwd=root)
    assert r.returncode == 2 and "--detach is not supported with a sweep" in r.stderr

    r = run_dvcray("run", "-S", "train.lrr=1,2", "--store", str(store), cwd=root)
    assert r.returncode == 2 and "train.lrr" in r.stderr

    sh("dvc", "exp", "run", "-q", "-n", "taken", cwd=root)
    before = workspace_state(root)
    r = run_dvcray("run", "-n", "taken", "--store", str(store), cwd=root)
    assert r.returncode == 2 and "already exists" in r.stderr

    r = run_dvcray("run", "-n", "x", "--address", "http://127.0.0.1:9", "--store", str(store), cwd=root)
    assert r.returncode == 3 and "127.0.0.1:9" in r.stderr

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = run_dvcray("run", "-n", "y", "--store", str(blocker / "store"), cwd=root)
    assert r.returncode == 4 and "store" in r.stderr.lower()

    env = {k: "" for k in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL")}
    r = run_dvcray("run", "-n", "z", "--store", str(store), cwd=root, env=env)
    assert r.returncode == 2 and "git config --global user.name" in r.stderr

    assert workspace_state(root) == before
    assert not (store / "dvcray" / "runs").exists() or not any((store / "dvcray" / "runs").iterdir())
    for line in (r.stderr for r in [r]):
        assert "Traceback" not in line
