"""The idle watcher's logic, without a cluster: durations and the watch loop.
The real watcher on a real cluster: tests/func/test_idle.py."""

from __future__ import annotations

import pytest

from dvcray_cli import clusters
from dvcray_cli.clusters import idle
from dvcray_cli.errors import UsageError


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("30m", 1800), ("1h", 3600), ("1h30m", 5400), ("45", 45), ("2d", 172800),
    ("0", 0), ("off", 0), (" 10S ", 10),
])
def test_parse_duration(text, seconds):
    assert clusters.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "5x", "-3", "1h-5m", ""])
def test_parse_duration_refuses(text):
    with pytest.raises(UsageError, match="Invalid duration"):
        clusters.parse_duration(text)


def test_format_duration():
    assert [clusters.format_duration(s) for s in (0, 10, 90, 3600, 5400)] == ["off", "10s", "1m30s", "1h", "1h30m"]


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


def test_a_job_api_that_does_not_answer_never_takes_the_cluster_down():
    """Runs go on while a dashboard is down: no answer is no proof of idleness."""
    calls = {"n": 0}

    def broken() -> bool:
        calls["n"] += 1
        raise ConnectionError("refused")

    still = iter([True] * 12 + [False])
    outcome = idle.watch(broken, lambda: pytest.fail("taken down on no answer"), lambda: next(still),
                         timeout_s=0.1, poll_s=0.05)
    assert outcome == "gone" and calls["n"] == 12  # 0.6 s of silence, six times the timeout


def test_silence_then_idle_answers_take_it_down_after_the_full_timeout():
    answers = iter([ConnectionError("refused")] * 3 + [False] * 50)
    seen = []

    def probe() -> bool:
        answer = next(answers)
        seen.append(answer)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert idle.watch(probe, lambda: True, lambda: True, timeout_s=0.2, poll_s=0.05) == "down"
    assert sum(1 for a in seen if a is False) >= 4  # the idle time counts from the last silence
