"""Runs lost with their machine: what is a loss, what is retried, how attempts are kept and
shown (no process, no cluster: the runner service's table with nothing started, a local store)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from dvcray_cli.errors import UsageError
from dvcray_cli.runs import settings
from dvcray_cli.runs.logtee import StoreLog
from dvcray_cli.runs.model import ExpSpec, Manifest, RunOptions, RunRecord, RunResult, RunStatus, attempt_file
from dvcray_cli.runs.submit import retries_for
from dvcray_cli.service import protocol, table
from dvcray_cli.service.protocol import LOST_EXIT, Attempt, RunState, ended_as, losses_text, retry
from dvcray_cli.store import Store


@pytest.mark.parametrize("code, lost, stopped, state", [
    (0, "", False, RunState.SUCCEEDED),
    (1, "", False, RunState.FAILED),              # its stage failed: the user's code
    (2, "", False, RunState.FAILED),
    (None, "", False, RunState.FAILED),           # ended without an exit code, and nothing says why
    (143, "", False, RunState.STOPPED),
    (None, "", True, RunState.STOPPED),
    (None, "its node 10.0.0.2 died", False, RunState.LOST),
    (None, "its node died", True, RunState.LOST),  # lost before the stop reached it
    (LOST_EXIT, "", False, RunState.LOST),        # its runner saved it as lost (its parent went away)
    (protocol.FORKSERVER_GONE, "", False, RunState.LOST),
    (0, "its node died", False, RunState.SUCCEEDED),  # it had finished
])
def test_how_a_runner_ended_decides_its_state(code, lost, stopped, state):
    assert ended_as(code, lost, stopped) == state


def test_only_a_loss_is_retried_and_only_as_often_as_asked():
    assert retry(RunState.LOST, attempt=1, retries=3)
    assert retry(RunState.LOST, attempt=3, retries=3)
    assert not retry(RunState.LOST, attempt=4, retries=3), "retries spent"
    assert not retry(RunState.LOST, attempt=1, retries=0), "--retries 0: today's LOST"
    for state in (RunState.FAILED, RunState.STOPPED, RunState.SUCCEEDED):
        assert not retry(state, attempt=1, retries=3), state
    assert not retry(RunState.LOST, attempt=1, retries=3, stop_requested=True)
    assert not retry(RunState.LOST, attempt=1, retries=3, draining=True)


def test_attempts_are_read_tolerantly_and_every_loss_is_named():
    good = Attempt(2, "n2", 1.0, 2.0, RunState.LOST, "its node 10.0.0.3 died")
    assert Attempt.from_json(json.loads(json.dumps(good.to_json()))) == good
    assert protocol.attempts_of([{"number": 2, "node": "n2"}, "junk", {"number": 0}, {"number": "1"},
                                 {"number": 1, "state": "nonsense", "started": "soon"}]) == [
        Attempt(1), Attempt(2, "n2")]
    assert protocol.attempts_of(None) == [] and protocol.attempts_of({"number": 1}) == []
    one = [Attempt(1, "n1", state=RunState.LOST, lost="its node died")]
    assert losses_text(one) == "its node died"
    two = [*one, Attempt(2, "n2", state=RunState.LOST, lost="dvcray's runner went away")]
    assert losses_text(two) == ("lost 2 times: attempt 1 on n1: its node died; "
                                "attempt 2 on n2: dvcray's runner went away")


def test_records_carry_attempts_and_old_records_still_read():
    spec = ExpSpec("r-1", "e", ["x=1"], attempt=2, before=[Attempt(1, "n1", state=RunState.LOST).to_json()])
    again = ExpSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again.attempt == 2 and again.before == [Attempt(1, "n1", state=RunState.LOST).to_json()]
    assert "attempt" not in ExpSpec("r", None).to_json(), "a first attempt's spec is as before"
    assert ExpSpec.from_json({"run_id": "r", "exp_name": None, "attempt": "3", "before": "x"}).attempt == 1
    old = {"run_id": "r", "status": "SUCCEEDED", "node": "n1"}   # a result from before retries
    result = RunResult.from_json(old)
    assert (result.attempt, result.attempts) == (1, [])
    tried = RunResult("r", RunState.SUCCEEDED, attempt=2, attempts=[Attempt(1, "n1", state=RunState.LOST),
                                                                    Attempt(2, "n2", state=RunState.SUCCEEDED)])
    assert RunResult.from_json(json.loads(json.dumps(tried.to_json()))) == tried
    assert RunStatus.from_json({"state": "RUNNING", "attempt": 3}).attempt == 3
    assert RunStatus.from_json({"state": "RUNNING"}).attempt == 1
    assert Manifest.from_json({"run_id": "r", "baseline": "b", "retries": -2}).retries == 0
    record = RunRecord("r", attempts=[Attempt(1, "n1", state=RunState.LOST)])
    assert RunRecord.from_json(json.loads(json.dumps(record.to_json()))).attempts == record.attempts
    assert RunRecord.from_json({"run_id": "r", "attempts": "junk"}).attempts == []
    assert attempt_file(1, "log.txt") == "log.txt" and attempt_file(3, "log.txt") == "attempt-3/log.txt"


def test_retries_come_from_the_option_then_the_project_then_the_default(tmp_path):
    assert retries_for(RunOptions(), settings.read(tmp_path)) == protocol.DEFAULT_RETRIES
    (tmp_path / settings.FILE).write_text("[tool.dvcray]\nretries = 1\n")
    assert retries_for(RunOptions(), settings.read(tmp_path)) == 1
    assert retries_for(RunOptions(retries=0), settings.read(tmp_path)) == 0
    with pytest.raises(UsageError, match="--retries must be 0 or more"):
        retries_for(RunOptions(retries=-1), settings.read(tmp_path))


def test_the_store_log_of_a_retried_run_is_each_attempts_in_order_with_a_line_between(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.write(store.run_path("r", "log.parts/000001"), b"one: started\n")
    store.write(store.run_path("r", "log.parts/000002"), b"one: epoch 1")   # died mid-line
    store.write(store.run_path("r", "attempt-2/log.txt"), b"two: resumed\n")
    assert StoreLog(store, "r").read() == b"one: started\none: epoch 1", "no attempts.json: one attempt"
    store.write(store.run_path("r", "attempts.json"), json.dumps({"attempts": [
        Attempt(1, "n1", state=RunState.LOST, lost="its node died").to_json(), Attempt(2, "n2").to_json()]}).encode())
    assert StoreLog(store, "r").read() == (b"one: started\none: epoch 1\n"
                                           b"----- dvcray: attempt 2 (attempt 1 on n1: its node died) -----\n"
                                           b"two: resumed\n")


class Placer:
    """Stands in for the service's placer: records what would start (nothing runs here)."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []

    def start(self, batch, entry) -> None:
        self.started.append((entry.run_id, entry.attempt))


def _service(tmp_path, monkeypatch, retries: int):
    monkeypatch.setattr(table.forks, "Launcher", lambda: None)  # no forkserver
    service = table.RunnerService("tok", "dvcray-service-t", tmp_path / "node")
    service.placer = Placer()
    store = Store(str(tmp_path / "store"))
    manifest = Manifest("r", "ab" * 20, exp_name="e", store=store.to_json(), retries=retries)
    entry = table.Entry("r", "r", "e", ExpSpec("r", "e").to_json(), placed=True)
    batch = table.Batch("r", tmp_path, manifest, [entry], 1)
    service.entries["r"], service.batches["r"] = entry, batch
    return service, batch, entry, store


def _lose(service, batch, entry, node: str) -> None:
    """The entry runs on ``node``, and its node dies under it."""
    entry.state, entry.node, entry.log_path = RunState.RUNNING, node, service.logs_dir / "r.log"
    entry.begin(node)
    entry.lost = f"its node {node} died"
    service.ended(batch, entry, None)


def test_a_lost_placed_run_goes_back_for_another_attempt_until_its_retries_are_spent(tmp_path, monkeypatch):
    async def scenario():
        service, batch, entry, store = _service(tmp_path, monkeypatch, retries=1)
        service.pump(batch)
        _lose(service, batch, entry, "n1")
        assert entry.state == RunState.PENDING and entry.attempt == 2
        assert entry.spec["attempt"] == 2 and entry.spec["before"][0]["lost"] == "its node n1 died"
        assert "machine n1 lost (its node n1 died); retrying (1/1)" in (service.logs_dir / "r.log").read_text()
        assert service.placer.started == [("r", 1), ("r", 2)], "submitted again, from the same snapshot"
        _lose(service, batch, entry, "n2")
        await asyncio.gather(*service.writes.values())
        return entry, store, service

    entry, store, service = asyncio.run(scenario())
    assert entry.state == RunState.LOST and service.placer.started == [("r", 1), ("r", 2)], "retries spent"
    assert entry.lost == "lost 2 times: attempt 1 on n1: its node n1 died; attempt 2 on n2: its node n2 died"
    assert [a.number for a in entry.report().attempts] == [1, 2]
    recorded = json.loads(Path(tmp_path / "store/dvcray/runs/r/attempts.json").read_text())["attempts"]
    assert [(a["number"], a["node"], a["state"]) for a in recorded] == [(1, "n1", "LOST"), (2, "n2", "LOST")]
    result = RunResult.from_json(store.read_json(store.run_path("r", "result.json")))
    assert result.status == RunState.LOST and result.error == entry.lost and len(result.attempts) == 2


def test_a_failed_stage_or_a_stop_is_never_retried(tmp_path, monkeypatch):
    async def scenario():
        service, batch, entry, store = _service(tmp_path, monkeypatch, retries=3)
        service.pump(batch)
        entry.state = RunState.RUNNING
        entry.begin("n1")
        service.ended(batch, entry, 1)
        return entry, service

    entry, service = asyncio.run(scenario())
    assert entry.state == RunState.FAILED and service.placer.started == [("r", 1)]


def test_a_run_waiting_for_its_retry_stops_at_once_and_says_so_in_the_store(tmp_path, monkeypatch):
    async def scenario():
        service, batch, entry, store = _service(tmp_path, monkeypatch, retries=3)
        batch.pending.clear()
        batch.running = 2  # it, and another experiment that holds the batch's one place
        _lose(service, batch, entry, "n1")
        assert entry.state == RunState.PENDING and entry in batch.pending
        service.stop_entry(entry)
        await asyncio.gather(*service.writes.values())
        return entry, store

    entry, store = asyncio.run(scenario())
    assert entry.state == RunState.STOPPED
    result = RunResult.from_json(store.read_json(store.run_path("r", "result.json")))
    assert result.status == RunState.STOPPED and "while it waited for a retry" in result.error


def test_a_sweep_retries_only_its_lost_experiments(tmp_path, monkeypatch):
    async def scenario():
        service, batch, lost, store = _service(tmp_path, monkeypatch, retries=3)
        done = table.Entry("r-2", "r", "e-2", ExpSpec("r-2", "e-2").to_json(), placed=True)
        service.entries["r-2"] = done
        batch.pending.append(done)
        batch.limit = 2
        service.pump(batch)
        done.state = RunState.RUNNING
        done.begin("n2")
        service.ended(batch, done, 0)
        _lose(service, batch, lost, "n1")
        return service, lost, done

    service, lost, done = asyncio.run(scenario())
    assert done.state == RunState.SUCCEEDED and done.attempt == 1
    assert lost.state == RunState.PENDING and lost.attempt == 2
    assert service.placer.started == [("r", 1), ("r-2", 1), ("r", 2)]
