"""dvcray's records (runs/model.py): states, experiment refs, and JSON that
comes from a shared store and so is never trusted."""

from __future__ import annotations

import json

import pytest

from dvcray_cli.runs.model import (ExpRef, ExpSpec, Manifest, Outcome, RunId, RunRecord, RunResult, RunState,
                                   RunStatus, valid_exp_name)

SHA = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------- RunState


def test_terminal_and_active_states():
    # LOST has ended (following, waiting and stopping end there) without an outcome of its
    # own: its cluster may come back and say otherwise.
    assert {s for s in RunState if s.is_terminal()} == \
        {RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED, RunState.LOST}
    assert {s for s in RunState if s.has_outcome()} == {RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED}
    assert {s for s in RunState if s.is_active()} == {RunState.PENDING, RunState.RUNNING}
    assert not RunState.WAITING.is_terminal() and not RunState.WAITING.is_active()


def test_state_parses_rays_statuses_and_tolerates_junk():
    class JobStatus:  # what Ray's JobStatus looks like: an enum with a string value
        value = "RUNNING"

    assert RunState.parse(JobStatus()) is RunState.RUNNING
    assert RunState.parse("succeeded") is RunState.SUCCEEDED
    assert RunState.parse("nonsense") is None
    assert RunState.parse(None, RunState.PENDING) is RunState.PENDING
    assert json.dumps({"s": RunState.FAILED}) == '{"s": "FAILED"}'
    assert str(RunState.LOST) == "LOST"


# --------------------------------------------------------------------------- ExpRef


def test_exp_ref_formats_and_parses_back():
    ref = ExpRef(SHA, "lr-01")
    assert str(ref) == f"refs/exps/01/{SHA[2:]}/lr-01"
    assert ExpRef.parse(str(ref)) == ref


@pytest.mark.parametrize("text", [
    "refs/heads/release",                       # a branch, never an experiment
    "refs/tags/v1",
    "refs/exps/stash",                          # DVC's internal refs carry pickled variables
    "refs/exps/exec/EXEC_HEAD",
    "refs/exps/celery/abc",
    f"refs/exps/{SHA[:2]}/{SHA[2:]}",            # no name
    f"refs/exps/{SHA[:3]}/{SHA[3:]}/name",       # the baseline split in the wrong place
    f"refs/exps/{SHA[:2]}/{SHA[2:-1]}/name",     # a baseline that is not a sha
    f"refs/exps/{SHA[:2]}/{SHA[2:]}/a/b",        # a name with a slash
    f"refs/exps/{SHA[:2]}/{SHA[2:]}/..",
    f"refs/exps/{SHA[:2]}/{SHA[2:].upper()}/x",
    "", None, 42, ["refs/exps"],
])
def test_anything_but_an_experiment_ref_does_not_parse(text):
    assert ExpRef.parse(text) is None


@pytest.mark.parametrize("name, ok", [
    ("lr-01", True), ("exp_2.final", True), ("a[b]", False), ("a b", False), ("a/b", False), ("a..b", False),
    (".hidden", False), ("x.lock", False), ("x.", False), ("@", False), ("a@{1}", False), ("a~1", False),
    ("a^", False), ("a:b", False), ("a?", False), ("a*", False), ("a\\b", False), ("tab\there", False), ("", False),
])
def test_experiment_names_follow_gits_ref_rules(name, ok):
    assert valid_exp_name(name) is ok


# --------------------------------------------------------------------------- records from a store


def test_result_round_trips():
    result = RunResult(run_id="r1", status=RunState.SUCCEEDED, exp_name="e", baseline=SHA,
                       ref=str(ExpRef(SHA, "e")), metrics={"m.json": {"acc": 0.9}}, timings={"push": 0.5})
    again = RunResult.from_json(json.loads(json.dumps(result.to_json())))
    assert again == result
    assert result.to_json()["status"] == "SUCCEEDED"


@pytest.mark.parametrize("data", [None, [], "text", 3, {}, {"run_id": 7}, {"status": "SUCCEEDED"}])
def test_a_result_that_is_not_one_reads_as_none(data):
    assert RunResult.from_json(data) is None


def test_a_result_with_wrong_types_keeps_only_what_is_usable():
    result = RunResult.from_json({"run_id": "r", "status": "WHATEVER", "exp_name": ["x"], "metrics": "lots",
                                  "params": None, "overrides": ["a=1", 3], "timings": {"push": "slow", "x": 1},
                                  "started": "yesterday", "ref": {"bad": 1}, "unknown": "ignored"})
    assert result.status is RunState.FAILED
    assert result.exp_name is None and result.metrics == {} and result.params == {}
    assert result.overrides == ["a=1"] and result.timings == {"x": 1} and result.started is None
    assert result.ref is None


def test_status_reads_tolerantly():
    assert RunStatus.from_json({"state": "RUNNING", "started": 1.0, "heartbeat": 2}).state is RunState.RUNNING
    assert RunStatus.from_json({"state": 5}).state is RunState.PENDING
    assert RunStatus.from_json("torn") is None
    status = RunStatus(RunState.SUCCEEDED, 1.0, 2.0, "node")
    assert RunStatus.from_json(status.to_json()) == status


def test_manifest_round_trips_and_lists_its_experiments(tmp_path):
    one = Manifest(run_id="r", baseline=SHA, subdir="sub", exp_name="e", overrides=["a=1"],
                   store={"url": "s3://b/p", "options": {}}, dvcray_version="0.1.0")
    one.write(tmp_path)
    assert Manifest.read(tmp_path) == one
    assert one.specs() == [ExpSpec("r", "e", ["a=1"])]
    sweep = Manifest(run_id="job", baseline=SHA, experiments=[
        {"run_id": "job-1", "exp_name": "s-1", "overrides": ["a=1"]}, "junk",
        {"run_id": "job-2", "exp_name": None, "overrides": ["a=2"]}])
    assert [s.run_id for s in sweep.specs()] == ["job-1", "job-2"]


def test_a_partial_manifest_from_another_clone_still_reads(tmp_path):
    manifest = Manifest.from_json({"run_id": "r", "baseline": SHA, "exp_name": "theirs", "created": 5})
    assert manifest.exp_name == "theirs" and manifest.created == 5.0 and manifest.subdir == ""
    assert Manifest.from_json({"run_id": "r"}) is None
    with pytest.raises(ValueError):
        Manifest.read(tmp_path)


# --------------------------------------------------------------------------- records of this clone


def test_records_are_saved_listed_and_updated(tmp_path):
    (tmp_path / ".git").mkdir()
    old = RunRecord(run_id="dvcray-1", job_id="dvcray-1", exp_name="a", baseline=SHA, submitted=1.0)
    new = RunRecord(run_id="dvcray-2", job_id="job", exp_name="b", baseline=SHA, submitted=2.0)
    old.save(tmp_path)
    new.save(tmp_path)
    assert [r.run_id for r in RunRecord.all(tmp_path)] == ["dvcray-2", "dvcray-1"]
    assert (tmp_path / ".dvcray" / ".gitignore").read_text().splitlines()[-1] == "*"
    RunRecord.update(tmp_path, "dvcray-1", state="SUCCEEDED", exp_name=None, ended=3.0)
    again = RunRecord.load(tmp_path, "dvcray-1")
    assert again.state is RunState.SUCCEEDED and again.exp_name == "a" and again.ended == 3.0
    RunRecord.update(tmp_path, "dvcray-missing", state="FAILED")  # nothing to update: no error
    (tmp_path / ".dvcray" / "runs" / "torn.json").write_text('{"run_id": "dvcray-3", "sta')
    (tmp_path / ".dvcray" / "runs" / "list.json").write_text("[1, 2]")
    assert [r.run_id for r in RunRecord.all(tmp_path)] == ["dvcray-2", "dvcray-1"]


def test_a_record_without_a_job_id_runs_in_its_own_job():
    record = RunRecord.from_json({"run_id": "r", "state": "nope", "store": "x", "submitted": "soon"})
    assert record.job_id == "r" and record.state is RunState.PENDING and record.store == {}
    assert record.submitted == 0.0


def test_run_ids_sort_by_time_and_outcomes_serialize():
    first, second = str(RunId.new()), str(RunId.new())
    assert first.startswith("dvcray-") and len(first) == len("dvcray-20250101-120000-abcdef")
    assert first[:22] <= second[:22]
    assert Outcome("r", "SUCCEEDED", metrics={"m": {"a": 1}}).to_json()["metrics"] == {"m": {"a": 1}}


def test_a_run_id_parses_and_formats_itself():
    one = RunId.parse("dvcray-20250101-120000-a1b2c3")
    assert one == RunId("20250101-120000", "a1b2c3") and str(one) == "dvcray-20250101-120000-a1b2c3"
    assert one.time == 1735732800.0  # 2025-01-01 12:00:00 UTC
    member = one.member(12)
    assert str(member) == "dvcray-20250101-120000-a1b2c3-12" and RunId.parse(str(member)) == member
    assert member.index == 12 and member.submission == one and one.submission == one
    assert RunId.parse("dvcray-20251399-250000-a1b2c3").time is None  # the shape of a stamp, not a time
    for junk in ("dvcray-service-ab12", "lr-01", "dvcray-20250101-120000", "dvcray-20250101-120000-XYZ",
                 " dvcray-20250101-120000-a1b2c3", None, 7):
        assert RunId.parse(junk) is None, junk


def test_a_record_names_how_its_run_executes():
    assert RunRecord.from_json({"run_id": "r"}).backend == "job"
    # Records written before the backend was named: the runner service's id said so.
    assert RunRecord.from_json({"run_id": "r", "service": "dvcray-service-ab12"}).backend == "service"
    assert RunRecord.from_json({"run_id": "r", "backend": "service", "service": "s"}).backend == "service"
    assert RunRecord.from_json({"run_id": "r", "backend": 3}).backend == "job"
