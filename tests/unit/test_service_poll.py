"""The runner service's long poll, without a process: no state change is ever skipped."""

from __future__ import annotations

import asyncio

from dvcray_cli.service import table
from dvcray_cli.service.protocol import PollRequest, RunState


def test_a_change_made_while_a_placed_runs_log_is_read_comes_with_the_next_poll(tmp_path, monkeypatch):
    monkeypatch.setattr(table.forks, "Launcher", lambda: None)  # no forkserver: nothing is started here

    async def scenario():
        service = table.RunnerService("tok", "dvcray-service-t", tmp_path)
        reading = service.entries["a"] = table.Entry("a", "j", "a", {}, state=RunState.RUNNING, placed=True)
        ending = service.entries["b"] = table.Entry("b", "j", "b", {}, state=RunState.RUNNING, placed=True)

        async def read_log(entry, offset):
            await asyncio.sleep(0)
            if entry is reading and ending.state == RunState.RUNNING:
                # The other run ends while this log is read (reading awaits).
                ending.state = RunState.SUCCEEDED
                service.touch(ending)
            return b""

        service.read_log = read_log
        first = await service.poll(PollRequest(0, ["a", "b"], {"a": 0}, 0))
        second = await service.poll(PollRequest(first.seq, ["a", "b"], {}, 0))
        return first, second

    first, second = asyncio.run(scenario())
    seen = {**first.runs, **second.runs}
    assert "b" in seen and seen["b"].state == RunState.SUCCEEDED, (first, second)
    assert second.seq >= 1
