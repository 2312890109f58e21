"""Idle auto-down (``--idle-timeout``): the watcher takes the whole cluster down,
head included, after that long with no dvcray run; a running run keeps it alive.

The real thing runs on ``local``: a Ray head started by ``dvcray cluster up
local``, a real job tagged as a dvcray run, and the watcher process that
``dvcray cluster up local --idle-timeout 6s`` starts beside the head. The AWS side (terminating a cluster's instances) is
tested against moto in tests/test_aws.py.
"""

from __future__ import annotations

import json
import time

import pytest

from conftest import run_dvcray
from dvcray_cli import idle


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("30m", 1800), ("1h", 3600), ("1h30m", 5400), ("45", 45), ("2d", 172800),
    ("0", 0), ("off", 0), (" 10S ", 10),
])
def test_parse_duration(text, seconds):
    assert idle.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "5x", "-3", "1h-5m", ""])
def test_parse_duration_refuses(text):
    with pytest.raises(idle.UsageError, match="Invalid duration"):
        idle.parse_duration(text)


def test_format_duration():
    assert [idle.format_duration(s) for s in (0, 10, 90, 3600, 5400)] == ["off", "10s", "1m30s", "1h", "1h30m"]


def test_bad_idle_timeout_is_a_usage_error():
    proc = run_dvcray("cluster", "up", "local", "--idle-timeout", "soon")
    assert proc.returncode == 2
    assert "Invalid duration 'soon'" in proc.stderr


def test_watch_waits_for_busy_runs_and_starts_over_when_refused():
    """The loop alone, with a fake clock of polls: busy polls reset the idle time,
    a refused take-down (a run came in) starts the wait over."""
    events: list[str] = []
    busy = iter([True, True, False, False, False, False, False, False, False, False])
    answers = iter([False, True])

    def is_busy() -> bool:
        value = next(busy)
        events.append("busy" if value else "idle")
        return value

    def take_down() -> bool:
        events.append("down?")
        return next(answers)

    assert idle.watch(is_busy, take_down, lambda: True, timeout_s=0.25, poll_s=0.1) == "down"
    assert events.count("down?") == 2
    assert events[:2] == ["busy", "busy"] and events.index("down?") >= 4


def test_watch_counts_an_unreachable_job_api_as_idle_and_stops_when_gone():
    def broken() -> bool:
        raise ConnectionError("refused")

    assert idle.watch(broken, lambda: True, lambda: True, timeout_s=0.15, poll_s=0.05) == "down"
    assert idle.watch(broken, lambda: pytest.fail("not taken down"), lambda: False, 10, 0.05) == "gone"


def _submit_run(cluster, seconds: float) -> str:
    from dvcray_cli import cluster as core

    client = core.job_client(cluster.dashboard_url, token=cluster.token())
    return client.submit_job(entrypoint=f"python -c 'import time; time.sleep({seconds})'",
                             metadata={core.RUN_MARKER: "test", "exp_name": "idle-test"})


def test_local_cluster_goes_down_by_itself_after_the_idle_timeout_but_not_during_a_run():
    from dvcray_cli import cluster as core

    timeout = 6.0
    assert run_dvcray("cluster", "up", "local").returncode == 0
    cluster = core.recorded("local")
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
        assert watcher["pid"] not in core.find_pids(cluster), "the watcher is not one of the cluster's processes"
        status = json.loads(run_dvcray("cluster", "status", "--json").stdout)
        assert status[0]["idle_timeout_s"] == timeout

        # The run outlasts the timeout and keeps the cluster up...
        while time.monotonic() - armed_at < timeout * 1.5:
            time.sleep(0.5)
        assert core.find_pids(cluster), "the cluster went down while a dvcray run was running"
        client = core.job_client(cluster.dashboard_url, token=cluster.token())
        assert str(client.get_job_status(run_id)).endswith("RUNNING"), "the run ended too early to prove anything"

        # ...and once it ends, the cluster goes by itself: head, every process, the record.
        deadline = time.monotonic() + 20 + timeout + 30
        while core.find_pids(cluster) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert core.find_pids(cluster) == [], "the idle cluster did not go down by itself"
        assert core.recorded("local") is None
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
    from dvcray_cli import cluster as core

    assert run_dvcray("cluster", "up", "local", "--idle-timeout", "1h").returncode == 0
    try:
        watcher = idle.watcher("local")
        assert watcher is not None
        assert run_dvcray("cluster", "up", "local", "--idle-timeout", "0").returncode == 0
        assert idle.watcher("local") is None
        assert not idle._is_watcher(watcher["pid"])
        assert run_dvcray("cluster", "up", "local", "--idle-timeout", "30m").returncode == 0
        second = idle.watcher("local")
        assert second is not None and second["timeout_s"] == 1800
        assert run_dvcray("cluster", "down", "local").returncode == 0
        assert idle.watcher("local") is None and not idle._is_watcher(second["pid"])
        assert core.recorded("local") is None
    finally:
        idle.disarm("local")
