"""``dvcray runs``' decision table: a run's state from its record, the store and its cluster
(``listing.reconcile``), every row of it, without a cluster."""

from __future__ import annotations

import time

import pytest

from dvcray_cli.runs.backends import RunInfo
from dvcray_cli.runs.listing import NO_RESULT, STALE, reconcile
from dvcray_cli.runs.model import STALE_AFTER_S, RunRecord, RunResult, RunState, RunStatus

S = RunState
NOW = 1_000_000.0


def record(state: RunState = S.PENDING) -> RunRecord:
    return RunRecord(run_id="r", state=state)


def result(status: RunState, **fields) -> RunResult:
    return RunResult(run_id="r", status=status, **fields)


def status(state: RunState, heartbeat: float) -> RunStatus:
    return RunStatus(state, started=heartbeat, heartbeat=heartbeat)


def info(state: RunState, lost: str = "") -> RunInfo:
    return RunInfo("r", state, lost=lost)


FRESH, STALE_BEAT = NOW - 5, NOW - STALE_AFTER_S - 5

TABLE = [
    # (record, result, status, info) -> (state, error)
    # 1. The runner's final word wins, whatever else says.
    ("result wins over a cluster that still runs the shared job",
     record(), result(S.SUCCEEDED), None, info(S.RUNNING), S.SUCCEEDED, None),
    ("a LOST result is final too", None, result(S.LOST, error="its cluster died"), None, info(S.FAILED),
     S.LOST, "its cluster died"),
    ("a failed result brings its error", record(), result(S.FAILED, error="stage failed"), None, None,
     S.FAILED, "stage failed"),
    # 2. A run its cluster says is going.
    ("pending on the cluster", record(), None, None, info(S.PENDING), S.PENDING, None),
    ("running on the cluster, over a stale heartbeat", None, None, status(S.RUNNING, STALE_BEAT),
     info(S.RUNNING), S.RUNNING, None),
    ("running on the cluster although this clone recorded it ended", record(S.FAILED), None, None,
     info(S.RUNNING), S.RUNNING, None),
    # 3. Its node died: LOST, and why.
    ("its node died", record(), None, None, info(S.LOST, "its node 10.0.0.2 died"), S.LOST,
     "its node 10.0.0.2 died"),
    # 4. It ended without a result: the runner was killed before it could save.
    ("ended failed without a result", record(), None, None, info(S.FAILED), S.FAILED, NO_RESULT),
    ("stopped without a result", None, None, status(S.RUNNING, FRESH), info(S.STOPPED), S.STOPPED, NO_RESULT),
    ("succeeded without a result", record(), None, None, info(S.SUCCEEDED), S.SUCCEEDED, NO_RESULT),
    # 5. No cluster knows it; this clone saw it end.
    ("recorded as succeeded", record(S.SUCCEEDED), None, None, None, S.SUCCEEDED, None),
    ("recorded as stopped", record(S.STOPPED), None, status(S.RUNNING, STALE_BEAT), None, S.STOPPED, None),
    # 6. Submitted from here, no cluster knows it, no result: LOST (a record's LOST may come back).
    ("recorded as pending, cluster gone", record(S.PENDING), None, status(S.RUNNING, FRESH), None, S.LOST, None),
    ("recorded as lost before", record(S.LOST), None, None, None, S.LOST, None),
    # 7. Known only from the store: its heartbeat's age decides.
    ("another clone's run, heartbeat stale", None, None, status(S.RUNNING, STALE_BEAT), None, S.LOST, STALE),
    ("another clone's run, heartbeat fresh", None, None, status(S.RUNNING, FRESH), None, S.RUNNING, None),
    ("another clone's run, ended in the store's word", None, None, status(S.FAILED, STALE_BEAT), None,
     S.FAILED, None),
    ("another clone's run, nothing yet", None, None, None, None, S.PENDING, None),
]


@pytest.mark.parametrize("rec, res, stat, inf, state, error", [row[1:] for row in TABLE],
                         ids=[row[0] for row in TABLE])
def test_the_decision_table(rec, res, stat, inf, state, error):
    assert reconcile(rec, res, stat, inf, now=NOW) == (state, error)


def test_a_result_that_is_no_final_word_does_not_win():
    # A runner writes only final results; a store may hold anything: a RUNNING "result" is not one.
    assert reconcile(record(), result(S.RUNNING), None, info(S.FAILED), now=NOW) == (S.FAILED, NO_RESULT)


def test_the_result_says_why_when_its_outputs_did_not_reach_the_store():
    pushed = result(S.SUCCEEDED, push_error="AccessDenied")
    assert reconcile(record(), pushed, None, None, now=NOW) == \
        (S.SUCCEEDED, "its outputs did not reach the store (AccessDenied)")
    both = result(S.FAILED, error="stage failed", push_error="AccessDenied")
    assert reconcile(record(), both, None, None, now=NOW) == (S.FAILED, "stage failed")


def test_the_cluster_reason_stays_when_the_result_names_none():
    # A result that is not final (no final word) still brings its error, or leaves the cluster's.
    quiet = result(S.PENDING)
    assert reconcile(record(), quiet, None, info(S.LOST, "its node died"), now=NOW) == (S.LOST, "its node died")


def test_heartbeats_age_by_the_clock_when_no_time_is_given():
    assert reconcile(None, None, status(S.RUNNING, time.time() - STALE_AFTER_S - 60), None) == (S.LOST, STALE)
