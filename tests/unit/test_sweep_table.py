"""The live table of a sweep stays readable at hundreds of experiments."""

from __future__ import annotations

import time

from rich.console import Console

from dvcray_cli.cli._follow import TABLE_ROWS, live_table
from dvcray_cli.runs.model import ExpSpec, Outcome, RunState
from dvcray_cli.runs.sweep import ExpState


def _states(n_done: int, n_running: int, n_pending: int) -> list[ExpState]:
    now = time.time()
    states = []
    for i in range(n_done + n_running + n_pending):
        st = ExpState(ExpSpec(f"run-{i}", f"exp-{i}"), job_id="job")
        if i < n_done:
            st.state, st.started, st.ended = RunState.SUCCEEDED, now - 100 + i, now - 50 + i / 10
            st.outcome = Outcome(run_id=st.spec.run_id, status="SUCCEEDED", metrics={"m.json": {"y": i}})
        elif i < n_done + n_running:
            st.state, st.started, st.last_line = RunState.RUNNING, now - 5, f"working on {i}"
        else:
            st.state = RunState.PENDING
        states.append(st)
    return states


def _render(renderable) -> str:
    console = Console(record=True, width=120, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_a_few_experiments_get_a_row_each():
    text = _render(live_table(_states(2, 1, 1)))
    assert all(f"exp-{i}" in text for i in range(4))


def test_hundreds_show_counts_the_running_ones_and_the_last_to_end():
    text = _render(live_table(_states(150, 8, 42)))
    assert "200 experiments: 150 succeeded, 8 running, 42 pending" in text
    rows = [line for line in text.splitlines() if "exp-" in line]
    assert len(rows) <= TABLE_ROWS
    assert sum("RUNNING" in r for r in rows) == 8
    assert any("exp-149" in r for r in rows), "the last to end is shown"
    assert not any("PENDING" in r for r in rows)
