"""The idle watcher's logic, without a cluster: durations and the watch loop (on a fake clock).
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


class FakeClock:
    """Time that passes only when the loop sleeps (or a probe says it took time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_watch_waits_for_busy_runs_and_starts_over_when_refused():
    """Busy polls reset the idle time; a refused take-down (a run came in) starts the wait over."""
    clock = FakeClock()
    events: list[tuple[float, str]] = []
    busy = iter([True, True] + [False] * 10)
    answers = iter([False, True])

    def is_busy() -> bool:
        value = next(busy)
        events.append((clock.now - 1000, "busy" if value else "idle"))
        return value

    def take_down() -> bool:
        events.append((clock.now - 1000, "down?"))
        return next(answers)

    assert idle.watch(is_busy, take_down, lambda: True, timeout_s=25, poll_s=10,
                      clock=clock, sleep=clock.sleep) == "down"
    assert events == [(10, "busy"), (20, "busy"), (30, "idle"), (40, "idle"), (50, "idle"), (50, "down?"),
                      (60, "idle"), (70, "idle"), (80, "idle"), (80, "down?")]


def test_the_wait_starts_over_when_the_refused_take_down_ends():
    """A take-down that took long and was refused: the full timeout counts from its end."""
    clock = FakeClock()
    downs: list[float] = []

    def take_down() -> bool:
        downs.append(clock.now - 1000)
        clock.sleep(100)   # asking the cluster took that long, and a run came in meanwhile
        return len(downs) > 1

    assert idle.watch(lambda: False, take_down, lambda: True, timeout_s=30, poll_s=10,
                      clock=clock, sleep=clock.sleep) == "down"
    assert downs == [30, 160]


def test_a_job_api_that_does_not_answer_never_takes_the_cluster_down():
    """Runs go on while a dashboard is down: no answer is no proof of idleness."""
    clock = FakeClock()
    calls = {"n": 0}

    def broken() -> bool:
        calls["n"] += 1
        raise ConnectionError("refused")

    still = iter([True] * 12 + [False])
    outcome = idle.watch(broken, lambda: pytest.fail("taken down on no answer"), lambda: next(still),
                         timeout_s=10, poll_s=5, clock=clock, sleep=clock.sleep)
    assert outcome == "gone" and calls["n"] == 12
    assert clock.now - 1000 == 65  # six and a half timeouts of silence, never taken down


def test_silence_then_idle_answers_take_it_down_after_the_full_timeout():
    """The idle time counts from the last silence, not from the start."""
    clock = FakeClock()
    answers = iter([ConnectionError("refused")] * 3 + [False] * 50)
    downs: list[float] = []

    def probe() -> bool:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def take_down() -> bool:
        downs.append(clock.now - 1000)
        return True

    assert idle.watch(probe, take_down, lambda: True, timeout_s=20, poll_s=5,
                      clock=clock, sleep=clock.sleep) == "down"
    assert downs == [35]  # the last silence at 15 s, then 20 s idle
