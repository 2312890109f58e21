"""Runs lost with their machine are retried where they live (the runner service) and resume,
on ``local-multinode``: a fake node is a real raylet on this machine, and killing it (by pid)
is its machine dying: its runner, its stage, the node's warm runner go with it, and Ray
counts the node dead. The store is S3 (moto on 127.0.0.1), so experiments are placed on the
workers (``--cpus-per-exp``), where the runner service retries them.

Each stage of the test pipeline appends a line to a file outside the run (``runs.txt``):
how often each command ran, and the epoch the checkpointing stage started from. The same
scenario on machines of their own (a namespace test bed): ``test_onprem.py`` (a killed machine mid-stage).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from helpers import (RETRY_PIPELINE, RETRY_STAGES, bucket_objects, cluster_env, exp_metrics, retry_count, retry_events,
                     retry_starts, run_dvcray, sh)

pytestmark = pytest.mark.slow


def dvcray(*args: str, env: dict, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``dvcray`` with ``env`` as its whole environment (the cluster's HOME, not this one's)."""
    return run_dvcray(*args, cwd=cwd, env=env, timeout=timeout, inherit=False)


LONG_STAGE = """\
import os, socket, time, yaml
from pathlib import Path
runs = Path(yaml.safe_load(open("params.yaml"))["counts"])
with open(runs / "runs.txt", "a") as f:
    f.write(f"started {os.getpid()}\\n")
print("STAGE-STARTED", os.getpid(), flush=True)
time.sleep(600)
"""



@pytest.fixture
def project(on_multinode, s3_bucket, make_dvc_project, tmp_path):
    """A project whose default remote (the store) is a fresh bucket, and the folder its stages
    count their runs in; every value is new, so no run-cache of an earlier test applies."""
    endpoint, bucket = s3_bucket
    counts = tmp_path / "counts"
    counts.mkdir()

    def make(files: dict[str, str], params: dict) -> Path:
        root = make_dvc_project({**files, "params.yaml": json.dumps(
            {"counts": str(counts), "salt": uuid.uuid4().hex, **params})}, commit=False)
        sh("dvc", "remote", "add", "-d", "storage", f"s3://{bucket}/dvc", cwd=root)
        sh("dvc", "remote", "modify", "storage", "endpointurl", endpoint, cwd=root)
        sh("git", "add", "-A", cwd=root)
        sh("git", "commit", "-qm", "a pipeline", cwd=root)
        return root

    return make, counts, endpoint, bucket


def _env(on_multinode) -> dict[str, str]:
    """The cluster where ``cluster up`` recorded it (its HOME), as for a user."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(on_multinode.home)
    return env


def _lines(counts: Path) -> list[str]:
    path = counts / "runs.txt"
    return path.read_text().splitlines() if path.exists() else []


def _wait(check, what: str, run: subprocess.Popen | None = None, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if run is not None and run.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {run.communicate()}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_node_of(pid: int) -> int:
    """The fake node a process runs on dies as a machine does: its raylet (an ancestor) and
    every process under it (its workers, the warm runner, the runner, the stage), SIGKILL."""
    raylet = next(p for p in psutil.Process(pid).parents() if p.name() == "raylet")
    for proc in [raylet, *raylet.children(recursive=True)]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return raylet.pid


def kill_warm_runner_of(pid: int) -> int:
    """Kill only the node's warm runner (the Ray actor a placed experiment runs under): the
    node lives on, Ray restarts the actor, the experiment's runner goes with its parent."""
    actor = next(p for p in psutil.Process(pid).parents() if (p.cmdline() or [""])[0].startswith("ray::"))
    actor.kill()
    return actor.pid


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    """``dvcray cluster up local-multinode`` with a HOME of its own; down at the end, and
    nothing of it left running (its processes found by pid and by its temp folder)."""
    from dvcray_cli.clusters import local

    home = tmp_path_factory.mktemp("retry-multinode-home")
    env = cluster_env(home)
    proc = dvcray("cluster", "up", "local-multinode", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    head = local.LocalCluster.from_json(json.loads((home / ".dvcray" / "clusters" / "local-multinode.json")
                                                   .read_text()))
    try:
        yield SimpleNamespace(home=home, env=env, head=head)
    finally:
        down = dvcray("cluster", "down", "local-multinode", "--yes", env=env)
        left = head.pids() + [p.pid for p in psutil.process_iter(["cmdline"])
                              if head.temp_dir in " ".join(p.info["cmdline"] or [])]
        if left:
            head.stop(timeout=5)
        shutil.rmtree(head.temp_dir, ignore_errors=True)
        assert down.returncode == 0 and not left, f"{down.stderr}\nleft running: {left}"


@pytest.fixture
def on_multinode(multinode, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return multinode


def test_a_lost_machine_is_retried_and_resumes_where_it_was(project, on_multinode):
    make, counts, endpoint, bucket = project
    root = make({"stages.py": RETRY_STAGES, "dvc.yaml": RETRY_PIPELINE}, {"epochs": 6, "sleep": 1.5})
    salt = json.loads((root / "params.yaml").read_text())["salt"]
    run = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "-n", "resumed", "--cpus-per-exp", "1"],
                           cwd=root, env=_env(on_multinode), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        _wait(lambda: retry_count(retry_events(endpoint, bucket, salt), "b-epoch") >= 2, "epoch 2 of stage b", run)
        killed = kill_node_of(retry_starts(retry_events(endpoint, bucket, salt))[0][2])
        out, err = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, f"exit {run.returncode}\n{out[-4000:]}\n{err[-4000:]}"
    assert _gone(killed)
    found = retry_events(endpoint, bucket, salt)
    begun = [epoch for epoch, _, _ in retry_starts(found)]
    assert retry_count(found, "a") == 1, f"stage a ran again: {sorted(found)}"
    assert retry_count(found, "c") == 1, sorted(found)
    assert begun[0] == 0 and len(begun) == 2 and begun[1] >= 2, f"stage b did not resume: {sorted(found)}"
    assert exp_metrics(root, "resumed", "c.json") == {"b": f"b resumed from {begun[1]}"}
    # What the person saw: the loss, the retry, the finished stage restored.
    assert "lost" in out and "retrying (1/3)" in out and "retry 1/3 runs on" in out, out[-4000:]
    assert "Stage 'a' is cached - skipping run" in out, out[-4000:]
    assert "It took 2 attempts" in err, err[-3000:]

    runs = json.loads(dvcray("runs", "--json", cwd=root, env=_env(on_multinode)).stdout)
    [mine] = [r for r in runs if r["exp_name"] == "resumed"]
    assert mine["state"] == "SUCCEEDED" and [a["state"] for a in mine["attempts"]] == ["LOST", "SUCCEEDED"], mine
    assert all(a["node"] for a in mine["attempts"]) and "died" in mine["attempts"][0]["lost"], mine
    logs = dvcray("logs", mine["run_id"], cwd=root, env=_env(on_multinode))
    assert logs.returncode == 0 and "EPOCH 1" in logs.stdout and "EPOCH 6" in logs.stdout, logs.stdout[-3000:]
    # In the store: attempt 1's log beside the run's, attempt 2's under attempt-2/, the attempts
    # recorded, and what each attempt saved as its stages ended.
    objects = bucket_objects(endpoint, bucket)
    prefix = f"dvc/dvcray/runs/{mine['run_id']}/"
    # (attempt 1 died with its machine: its log is the pieces it uploaded as it went, no log.txt).
    first = b"".join(v for k, v in sorted(objects.items()) if k.startswith(prefix + "log.parts/"))
    assert prefix + "log.txt" not in objects and b"EPOCH 1" in first, sorted(objects)  # up to 1 s of it is lost
    assert b"EPOCH 6" in objects[prefix + "attempt-2/log.txt"] and b"EPOCH 1\n" not in objects[
        prefix + "attempt-2/log.txt"], "attempt 2 started at epoch 3"
    saved = json.loads(objects[prefix + "stages.json"])["stages"]
    assert [s["stage"] for s in saved] == ["a"], saved
    assert [a["state"] for a in json.loads(objects[prefix + "attempts.json"])["attempts"]] == ["LOST", "SUCCEEDED"]


def test_a_failing_stage_is_not_retried(project, on_multinode):
    make, counts, endpoint, bucket = project
    root = make({"fail.py": "import sys, yaml\nfrom pathlib import Path\n"
                            "p = Path(yaml.safe_load(open('params.yaml'))['counts']) / 'runs.txt'\n"
                            "p.open('a').write('fail\\n')\nsys.exit(3)\n",
                 "dvc.yaml": "stages:\n  f:\n    cmd: python fail.py\n    deps: [fail.py]\n    params: [salt]\n"
                             "    outs: [never.txt]\n"}, {})
    proc = dvcray("run", "-n", "fails", "--cpus-per-exp", "1", cwd=root, env=_env(on_multinode))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _lines(counts) == ["fail"], "the stage ran once"
    assert "retrying (" not in proc.stdout and "The experiment failed" in proc.stderr, proc.stdout + proc.stderr
    [run_id] = {k.split("/")[3] for k in bucket_objects(endpoint, bucket) if k.startswith("dvc/dvcray/runs/dvcray-")}
    result = json.loads(bucket_objects(endpoint, bucket)[f"dvc/dvcray/runs/{run_id}/result.json"])
    assert result["status"] == "FAILED" and result["attempt"] == 1 and result["attempts"] == [], result


def test_retries_exhausted_end_lost_naming_each_loss_with_every_attempts_log(project, on_multinode):
    make, counts, endpoint, bucket = project
    root = make({"long.py": LONG_STAGE,
                 "dvc.yaml": "stages:\n  s:\n    cmd: python long.py\n    deps: [long.py]\n    params: [salt]\n"},
                {})
    proc = dvcray("run", "-n", "doomed", "--cpus-per-exp", "1", "--retries", "1", "--detach", cwd=root,
                   env=_env(on_multinode))
    assert proc.returncode == 0, proc.stdout + proc.stderr   # detached: it is retried without a client
    run_id = proc.stderr.split("Submitted run ", 1)[1].split()[0]
    prefix = f"dvc/dvcray/runs/{run_id}/"

    def in_store_log(attempt: str) -> bool:  # what the stage printed reached the store
        return b"STAGE-STARTED" in b"".join(v for k, v in sorted(bucket_objects(endpoint, bucket).items())
                                              if k.startswith(prefix + attempt + "log.parts/"))

    # Attempt 1 loses its node's warm runner (the node lives on), attempt 2 its whole node.
    for attempt, kill, folder in ((1, kill_warm_runner_of, ""), (2, kill_node_of, "attempt-2/")):
        started = _wait(lambda: [x for x in _lines(counts) if x.startswith("started")][attempt - 1:] if
                        in_store_log(folder) else None, f"attempt {attempt}")
        kill(int(started[0].split()[1]))
    follow = dvcray("logs", run_id, "--follow", cwd=root, env=_env(on_multinode), timeout=300)
    assert follow.returncode == 3 and f"Run {run_id} is LOST: lost 2 times" in follow.stderr, \
        follow.stdout[-3000:] + follow.stderr
    assert "retrying (1/1)" in follow.stdout and "attempt 2 of at most 2" in follow.stdout, follow.stdout[-3000:]
    runs = json.loads(dvcray("runs", "--json", cwd=root, env=_env(on_multinode)).stdout)
    [mine] = [r for r in runs if r["run_id"] == run_id]
    assert mine["state"] == "LOST" and [a["state"] for a in mine["attempts"]] == ["LOST", "LOST"], mine
    assert "lost 2 times" in mine["error"] and "attempt 1 on" in mine["error"] and "attempt 2 on" in mine["error"]
    assert "runner" in mine["attempts"][0]["lost"] and "went away" in mine["attempts"][0]["lost"], mine
    assert "died" in mine["attempts"][1]["lost"], mine
    # Every attempt's log, in order, with the line between them that says what happened.
    logs = dvcray("logs", run_id, cwd=root, env=_env(on_multinode))
    assert logs.stdout.count("STAGE-STARTED") == 2, logs.stdout[-3000:] + logs.stderr
    assert logs.stdout.index("STAGE-STARTED") < logs.stdout.index("retrying (1/1)") < logs.stdout.rindex(
        "STAGE-STARTED"), logs.stdout[-3000:]
    assert len(_lines(counts)) == 2, "two attempts, no third"
