"""Bad input: one line that says what to do, exit 2, before anything runs (issue 10, item 12).

Nothing may be submitted, recorded or written to the store for any of these.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_dvcray, sh

SPEC = {"params.yaml": "lr: 0.1\n", "other.yaml": "depth: 2\n", "extra.txt": "x\n",
        "dvc.yaml": "stages:\n  train:\n    cmd: echo trained > out.txt\n    params: [lr]\n    outs: [out.txt]\n"}


@pytest.fixture
def project(make_dvc_project, ray_cluster):
    root = make_dvc_project(SPEC)
    (root / ".dvc" / "config.local").write_text("['remote \"s\"']\n    url = s3://bucket/p\n"
                                                "    secret_access_key = hunter2\n")
    return root


def refused(root: Path, *args: str, env: dict | None = None) -> str:
    store = root.parent / "store-bad"
    proc = run_dvcray("run", *args, "--store", str(store), cwd=root, env=env)
    assert proc.returncode == 2, f"dvcray run {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    assert "Traceback" not in proc.stderr and "bug in dvcray" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3, proc.stderr
    assert not (root / ".dvcray" / "runs").exists(), "a run was recorded"
    assert not any(store.rglob("manifest.json")), "something reached the store"
    return proc.stderr


@pytest.mark.parametrize("args, message", [
    (("-S", "x"), "Bad -S value"),
    (("-S", "other.yaml:nokey=1"), "Unknown parameter 'nokey' in other.yaml"),
    (("-S", "other.yaml:depth"), "Bad -S value"),
    (("-C", "missing.txt"), "-C missing.txt: no such file"),
    (("-C", ".dvc/config.local"), "never sent to a cluster"),
    (("-C", "../.."), "outside the DVC project"),
    (("nostage",), "nostage is not a stage of this pipeline"),
    (("--jobs", "0"), "--jobs must be at least 1"),
    (("--env", "GH_TOKEN=x"), "GH_TOKEN (--env) looks like a secret"),
    (("--env", "UNSET_NAME_FOR_17"), "UNSET_NAME_FOR_17 (--env) is not set here"),
])
def test_bad_run_options(project, args, message):
    assert message in refused(project, *args)


def test_a_bad_store_url_and_a_bad_grace(project):
    proc = run_dvcray("run", "--store", "gs://bucket/x", cwd=project)
    assert proc.returncode == 2 and "Unsupported store URL gs://bucket/x" in proc.stderr
    assert "DVCRAY_STOP_GRACE_S=abc is not a number of seconds" in refused(project, env={"DVCRAY_STOP_GRACE_S": "abc"})


def test_a_local_store_with_a_cluster_elsewhere_is_refused(project, tmp_path):
    """A cluster reached through a port-forward (here a recorded AWS cluster whose
    forward answers on 127.0.0.1) runs elsewhere: its runners would write the
    store to their own disk."""
    from dvcray_cli import ray_api
    from dvcray_cli.clusters.aws.records import AwsCluster, write_record

    token = ray_api.ensure_token(tmp_path / "tok")
    record = AwsCluster(name="dvcray-elsewhere", config_label="aws", config_path="", region="us-east-1",
                        token_path=str(token), dashboard_url="http://127.0.0.1:9", forward_port=9, forward_pid=0,
                        head_ip="127.0.0.1", ssh_user="nobody", key_path="/nonexistent", started_at="2026-01-01",
                        idle_timeout_s=0, node_types=[])
    write_record(record, project / ".dvcray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "dvcray_cli", "run", "--store", str(tmp_path / "s")], cwd=project,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "is a folder on this machine, but the cluster at http://127.0.0.1:9 runs elsewhere" in proc.stderr
    assert not (tmp_path / "s").exists()


HOLD_LOCK = """
import sys, time
from dvc.repo import Repo
repo = Repo(".")
repo.lock.lock()   # what a long dvc push, pull or gc of this project holds
print("locked", flush=True)
time.sleep(60)
"""


def test_dvcs_lock_held_by_another_dvc_command(project):
    (project / "data.txt").write_text("input\n")
    sh("dvc", "add", "-q", "data.txt", cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "an input", cwd=project)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK], cwd=project, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert "Another DVC command holds this project's lock" in refused(project)
    finally:
        holder.kill()
        holder.wait()


def test_a_closed_pipe_ends_quietly(tmp_path):
    for args in (["scaffold", "--list"], ["--help"], ["runs", "--help"]):
        proc = subprocess.run(f"{sys.executable} -m dvcray_cli {' '.join(args)} | true; exit ${{PIPESTATUS[0]}}",
                              shell=True, executable="/bin/bash", capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, (args, proc.stderr)
        assert proc.stderr == "", proc.stderr
