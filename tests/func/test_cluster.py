"""The local cluster's lifecycle: `dvcray cluster up|down|status`, token auth, the job client.

Real Ray heads, started with `ray start` and stopped by pid (other Ray clusters
may run on this machine at the same time: none of them may be touched).
"""

from __future__ import annotations

import json
import socket
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from helpers import run_dvcray, sh
from dvcray_cli import clusters, ray_api, files
from dvcray_cli.clusters import local
from dvcray_cli.errors import ClusterError, UsageError

RAY_INIT_42 = 'python -c "import ray; ray.init(); print(ray.get(ray.remote(lambda: 41+1).remote()))"'


def wait_status(client, job_id: str, wanted: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id).value
        if status in wanted:
            return status
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {status} after {timeout} s:\n{client.get_job_logs(job_id)}")


def named(pids: list[int], name: str) -> list[int]:
    return [p for p in pids if psutil.Process(p).name() == name]


# --------------------------------------------------------------------------- no Ray needed


def test_state_dir_is_hidden_from_git(tmp_path):
    sh("git", "init", "-q", cwd=tmp_path)
    (tmp_path / "sub").mkdir()
    path = files.repo_dir_of(tmp_path / "sub")
    assert path == tmp_path.resolve() / ".dvcray"
    assert (path / ".gitignore").read_text().splitlines()[-1] == "*"
    (path / "runs").mkdir()
    (path / "runs" / "r.json").write_text("{}")
    assert sh("git", "status", "--porcelain", "--untracked-files=all", cwd=tmp_path) == ""
    assert files.repo_dir_of(tmp_path) == path  # idempotent


def test_state_dir_outside_git_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not inside a git repository"):
        files.repo_dir_of(tmp_path)


def test_token_is_created_private_and_kept(isolated_env):
    path = ray_api.ensure_token()
    assert path == isolated_env / ".ray" / "auth_token"
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # as Ray makes them: secrets.token_hex(32)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ray_api.ensure_token() == path and path.read_text() == token


def test_client_token_precedence(isolated_env, monkeypatch, tmp_path):
    ray_api.ensure_token()
    home_token = (isolated_env / ".ray" / "auth_token").read_text()
    assert clusters.token_for() == home_token
    other = tmp_path / "tok"
    other.write_text("from-path\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    assert clusters.token_for() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert clusters.token_for() == "from-env"


@pytest.mark.parametrize("config, message", [("nope", "Unknown cluster 'nope'"),
                                             ("my-cluster.yaml", "No cluster config at my-cluster.yaml")])
def test_unknown_cluster_is_a_usage_error(config, message, tmp_path):
    with pytest.raises(UsageError) as info:
        clusters.plan(config, tmp_path)
    assert info.value.exit_code == 2
    assert message in info.value.message
    assert "local" in (info.value.message + (info.value.hint or ""))
    assert not (files.clusters_dir() / f"{config}.json").exists()


@pytest.mark.parametrize("args", [("up", "nope"), ("down", "nope")])
def test_unsupported_cluster_exits_2(args):
    proc = run_dvcray("cluster", *args)
    assert proc.returncode == 2, proc.stderr
    assert args[1] in proc.stderr and "local" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_job_client_on_a_closed_port_names_the_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClusterError) as info:
        clusters.connect(f"http://127.0.0.1:{port}")
    assert info.value.exit_code == 3
    assert f"127.0.0.1:{port}" in info.value.message
    assert "dvcray cluster up" in info.value.hint


def test_down_with_nothing_running_says_so():
    proc = run_dvcray("cluster", "down")
    assert proc.returncode == 0, proc.stderr
    assert "nothing to stop" in proc.stderr
    proc = run_dvcray("cluster", "status")
    assert proc.returncode == 0 and "No Ray cluster is running" in proc.stderr


def test_a_stale_record_is_removed(isolated_env, tmp_path):
    dead = local.LocalCluster("local", "127.0.0.1:1", "http://127.0.0.1:1", str(tmp_path / "gone"),
                                str(tmp_path / "tok"), "2020-01-01T00:00:00+00:00", 2, 0)
    path = files.write_json(local.record_path("local"), dead.to_json())
    assert local.recorded("local") is None
    assert not path.exists()
    assert clusters.status().local == []


# --------------------------------------------------------------------------- real Ray


def test_job_inside_the_cluster_calls_ray_init_with_auth_on(ray_cluster):
    # A request without the token, or with a wrong one, is refused.
    assert requests.get(f"{ray_cluster.dashboard_url}/api/jobs/", timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer " + "0" * 64}
    assert requests.get(f"{ray_cluster.dashboard_url}/api/jobs/", headers=wrong, timeout=10).status_code == 403
    with pytest.raises(ClusterError, match="refused the auth token"):
        ray_api.client(ray_cluster.dashboard_url, "0" * 64)

    client = clusters.connect(ray_cluster.dashboard_url)  # RAY_AUTH_TOKEN, from ray_cluster
    job = client.submit_job(entrypoint=RAY_INIT_42)
    assert wait_status(client, job, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", client.get_job_logs(job)
    assert "42" in client.get_job_logs(job).split()


STUDIO_TOKEN = "isat_cluster-planted-token-1234567890"


def test_local_cluster_lifecycle(ray_head, isolated_env):
    # Offline stays on (conftest): nothing is posted anywhere, the URL is loopback regardless.
    studio_env = {"DVC_STUDIO_TOKEN": STUDIO_TOKEN, "DVC_STUDIO_URL": "http://127.0.0.1:9"}
    # --- up: a real head, its dashboard URL, how to stop it. Two at once start one head.
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda _: run_dvcray("cluster", "up", "local", timeout=300, env=studio_env),
                              range(2)))
    assert [p.returncode for p in procs] == [0, 0], [p.stderr for p in procs]
    assert sorted("already running" in p.stderr for p in procs) == [False, True]
    proc = next(p for p in procs if "Started" in p.stderr)
    head = local.recorded("local")
    assert head is not None and head.is_alive()
    assert head.dashboard_url.startswith("http://127.0.0.1:") and head.dashboard_url in proc.stderr
    assert "dvcray cluster down local" in proc.stderr
    record = isolated_env / ".dvcray" / "clusters" / "local.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert stat.S_IMODE(record.parent.stat().st_mode) == 0o700
    assert head.token_path == str(isolated_env / ".ray" / "auth_token")
    core = {n: named(head.pids(), n) for n in ("gcs_server", "raylet")}
    assert all(len(v) == 1 for v in core.values()), core
    # The client's Studio token stays with the client: no process of the cluster has it.
    assert not [p for p in head.pids() if STUDIO_TOKEN in str(psutil.Process(p).environ())]

    # Two clusters on one machine never share a process.
    assert not set(head.pids()) & set(ray_head.pids())

    # --- a second up is a no-op
    proc = run_dvcray("cluster", "up", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "already running" in proc.stderr and head.dashboard_url in proc.stderr
    assert local.recorded("local") == head
    assert {n: named(head.pids(), n) for n in core} == core

    # --- status --json: alive, one node, its CPUs
    proc = run_dvcray("cluster", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    [entry] = json.loads(proc.stdout)
    assert entry["name"] == "local" and entry["alive"] is True
    assert entry["dashboard_url"] == head.dashboard_url
    assert len(entry["nodes"]) >= 1 and entry["nodes"][0]["resources"]["CPU"] >= 1
    assert entry["cpus"] == head.num_cpus >= 1
    assert entry["runs"] == []

    # --- token auth is on
    assert requests.get(f"{head.dashboard_url}/api/jobs/", timeout=10).status_code == 401

    # --- a dvcray run in progress: down refuses without --yes, naming it
    client = clusters.connect(head.dashboard_url)  # the record's token: HOME is this test's
    run_id = client.submit_job(entrypoint="sleep 600", metadata={"dvcray_version": "test", "exp_name": "e1"})
    client.submit_job(entrypoint="sleep 600")  # not dvcray's: never named, still stopped with the cluster
    wait_status(client, run_id, {"RUNNING"})
    proc = run_dvcray("cluster", "status", "--json")
    assert [r["run_id"] for r in json.loads(proc.stdout)[0]["runs"]] == [run_id]
    proc = run_dvcray("cluster", "down", "local")
    assert proc.returncode == 2, proc.stderr
    assert run_id in proc.stderr and "--yes" in proc.stderr
    assert head.is_alive()
    assert client.get_job_status(run_id).value == "RUNNING"

    # --- down --yes: the run is stopped, and no process of that cluster is left
    procs = [psutil.Process(p) for p in head.pids()]
    assert any("sleep" in p.name() for p in procs)
    proc = run_dvcray("cluster", "down", "local", "--yes", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert run_id in proc.stderr
    assert [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert head.pids() == []
    assert not record.exists()

    # The other cluster is untouched.
    assert ray_head.is_alive()
    ray_api.client(ray_head.dashboard_url, ray_head.token()).list_jobs()

    # --- status now says not running
    proc = run_dvcray("cluster", "status")
    assert proc.returncode == 0 and "No Ray cluster is running" in proc.stderr
    assert json.loads(run_dvcray("cluster", "status", "--json").stdout) == []
