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
            st.state, st.started, st.ended = RunState.SUCCEEDED, now - 200 + i / 10, now - 50 + i / 10
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


def _rows(text: str) -> dict[str, list[str]]:
    """``{experiment: [state, elapsed, latest]}`` of each table row."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("│┃|").split("│")]
        if len(cells) == 4 and cells[0].startswith("exp-"):
            rows[cells[0]] = cells[1:]
    return rows


def test_the_header_names_the_columns():
    header = next(ln for ln in _render(live_table(_states(1, 0, 0))).splitlines() if "experiment" in ln)
    assert [c.strip() for c in header.strip("┃│ ").split("┃")] == ["experiment", "state", "elapsed", "latest"]


def _running_for(cells: list[str], before: float) -> bool:
    """A running experiment's elapsed time: 5 s when its state was made, plus what passed since."""
    return 5 <= int(cells[1].removesuffix("s")) <= 5 + round(time.time() - before)


def test_a_few_experiments_get_a_row_each_with_state_time_and_latest():
    before = time.time()
    rows = _rows(_render(live_table(_states(2, 1, 1))))
    assert _running_for(rows["exp-2"], before)
    rows["exp-2"][1] = "-"
    assert rows == {
        "exp-0": ["SUCCEEDED", "150s", "y=0"],        # ended: start to end, its first metrics
        "exp-1": ["SUCCEEDED", "150s", "y=1"],
        "exp-2": ["RUNNING", "-", "working on 2"],    # going: its latest line
        "exp-3": ["PENDING", "", ""],                 # not started: nothing yet
    }


def test_hundreds_show_counts_the_running_ones_and_the_last_to_end():
    before = time.time()
    text = _render(live_table(_states(150, 8, 42)))
    assert "200 experiments: 150 succeeded, 8 running, 42 pending" in text
    rows = _rows(text)
    assert len(rows) <= TABLE_ROWS
    running = {name: cells for name, cells in rows.items() if cells[0] == "RUNNING"}
    assert sorted(running) == sorted(f"exp-{i}" for i in range(150, 158))
    assert all(cells[2] == f"working on {name[4:]}" and _running_for(cells, before) for name, cells in running.items())
    ended = {name: cells for name, cells in rows.items() if cells[0] != "RUNNING"}
    assert ended == {f"exp-{i}": ["SUCCEEDED", "150s", f"y={i}"] for i in (147, 148, 149)}, "the last three to end"
