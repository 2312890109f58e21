"""Idle auto-down (``--idle-timeout``): the watcher takes the whole cluster down,
head included, after that long with no dvcray run; a running run keeps it alive.

The real thing runs on ``local``: a Ray head started by ``dvcray cluster up
local``, a real job tagged as a dvcray run, and the watcher process that
``dvcray cluster up local --idle-timeout 6s`` starts beside the head. The AWS side (terminating a cluster's instances) is
tested against moto in tests/func/test_aws.py; the loop alone in tests/unit/test_idle_loop.py.
"""

from __future__ import annotations

import json
import time


from helpers import run_dvcray
from dvcray_cli import ray_api
from dvcray_cli.clusters import idle, local


def test_bad_idle_timeout_is_a_usage_error():
    proc = run_dvcray("cluster", "up", "local", "--idle-timeout", "soon")
    assert proc.returncode == 2
    assert "Invalid duration 'soon'" in proc.stderr


def _submit_run(cluster, seconds: float) -> str:
    client = ray_api.client(cluster.dashboard_url, cluster.token())
    return client.submit_job(entrypoint=f"python -c 'import time; time.sleep({seconds})'",
                             metadata={ray_api.RUN_MARKER: "test", "exp_name": "idle-test"})


def test_local_cluster_goes_down_by_itself_after_the_idle_timeout_but_not_during_a_run():
    timeout = 6.0
    assert run_dvcray("cluster", "up", "local").returncode == 0
    cluster = local.recorded("local")
    assert cluster is not None
    try:
        # A run is going when the watcher starts (`up --idle-timeout` on a running
        # cluster arms it), so a slow submission cannot race the timeout.
        run_id = _submit_run(cluster, 20)
        proc = run_dvcray("cluster", "up", "local", "--idle-timeout", "6s")
        assert proc.returncode == 0, proc.stderr
        assert "already running" in proc.stderr and "Idle timeout: 6s" in proc.stderr
        armed_at = time.monotonic()
        watcher = idle.watcher("local")
        assert watcher is not None and watcher["timeout_s"] == timeout
        assert watcher["pid"] not in cluster.pids(), "the watcher is not one of the cluster's processes"
        status = json.loads(run_dvcray("cluster", "status", "--json").stdout)
        assert status[0]["idle_timeout_s"] == timeout

        # The run outlasts the timeout and keeps the cluster up...
        while time.monotonic() - armed_at < timeout * 1.5:
            time.sleep(0.5)
        assert cluster.pids(), "the cluster went down while a dvcray run was running"
        client = ray_api.client(cluster.dashboard_url, cluster.token())
        assert str(client.get_job_status(run_id)).endswith("RUNNING"), "the run ended too early to prove anything"

        # ...and once it ends, the cluster goes by itself: head, every process, the record.
        deadline = time.monotonic() + 20 + timeout + 30
        while cluster.pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cluster.pids() == [], "the idle cluster did not go down by itself"
        assert local.recorded("local") is None
        while idle.watcher("local") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert idle.watcher("local") is None, "the watcher exits once it took the cluster down"

        status = run_dvcray("cluster", "status")
        assert status.returncode == 0
        assert "taken down by its idle timeout (6s without a dvcray run)" in status.stderr, status.stderr
        assert json.loads(run_dvcray("cluster", "status", "--json").stdout) == []

        # A new `up` clears the note.
        assert run_dvcray("cluster", "up", "local").returncode == 0
        assert "idle timeout" not in run_dvcray("cluster", "status").stderr
    finally:
        idle.disarm("local")


def test_down_stops_the_watcher_and_idle_timeout_zero_turns_it_off():
    assert run_dvcray("cluster", "up", "local", "--idle-timeout", "1h").returncode == 0
    try:
        watcher = idle.watcher("local")
        assert watcher is not None
        assert run_dvcray("cluster", "up", "local", "--idle-timeout", "0").returncode == 0
        assert idle.watcher("local") is None
        assert not idle.is_watcher(watcher["pid"])
        assert run_dvcray("cluster", "up", "local", "--idle-timeout", "30m").returncode == 0
        second = idle.watcher("local")
        assert second is not None and second["timeout_s"] == 1800
        assert run_dvcray("cluster", "down", "local").returncode == 0
        assert idle.watcher("local") is None and not idle.is_watcher(second["pid"])
        assert local.recorded("local") is None
    finally:
        idle.disarm("local")


SAVES_FOR_15_S = """
import pathlib, signal, sys, time
def save(*_):
    time.sleep(15)   # a runner pushing its outputs after SIGTERM
    pathlib.Path(sys.argv[1]).write_text("saved")
    raise SystemExit(0)
signal.signal(signal.SIGTERM, save)
print("ready", flush=True)
time.sleep(600)
"""


def test_down_yes_gives_runners_the_whole_grace_they_were_promised(tmp_path, monkeypatch):
    """Runners are submitted with ``RAY_JOB_STOP_WAIT_TIME_S`` = the stop grace
    (``DVCRAY_STOP_GRACE_S``, 60 s by default); ``down --yes`` used to stop the head
    10 s after stopping them (issue 10, item 11). Here the grace is 20 s and the
    runner needs 15 s to save."""
    import shlex

    from dvcray_cli import clusters

    monkeypatch.setenv("DVCRAY_STOP_GRACE_S", "20")
    assert run_dvcray("cluster", "up", "local").returncode == 0
    cluster = local.recorded("local")
    marker = tmp_path / "saved"
    (tmp_path / "runner.py").write_text(SAVES_FOR_15_S)
    client = ray_api.client(cluster.dashboard_url, cluster.token())
    job = client.submit_job(entrypoint=f"python {shlex.quote(str(tmp_path / 'runner.py'))} {shlex.quote(str(marker))}",
                            runtime_env={"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "20"}},
                            metadata={ray_api.RUN_MARKER: "test", "exp_name": "graceful"})
    deadline = time.monotonic() + 60
    while "ready" not in client.get_job_logs(job):
        assert time.monotonic() < deadline, client.get_job_logs(job)
        time.sleep(0.3)
    waits = []
    real = ray_api.stop_and_wait

    def spy(job_client, job_ids, timeout):
        stopped = real(job_client, job_ids, timeout)
        waits.append((timeout, ray_api.job_status(job_client, job), marker.exists()))
        return stopped

    monkeypatch.setattr(ray_api, "stop_and_wait", spy)
    result = clusters.down("local", tmp_path, yes=True)
    assert result.stopped_runs == [job] and result.was_running
    assert waits == [(30, "STOPPED", True)], "the head went before the runner had saved"
    assert cluster.pids() == []
