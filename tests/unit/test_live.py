"""Live updates and queued experiments as records: what the store and the snapshot may hold,
read as data (never trusted), and how the client hands events on."""

from __future__ import annotations

import json

from dvcray_cli.runs import live, studio
from dvcray_cli.runs.model import ExpSpec, Manifest
from dvcray_cli.store import Store

BASE = "ab" * 20


def data_event(step: int, **extra) -> dict:
    return {"type": "data", "repo_url": "dvcray://relay", "baseline_sha": BASE, "name": "e", "client": "dvclive",
            "step": step, **extra}


def test_a_queued_spec_round_trips_and_a_bad_one_reads_as_the_runs_own_workspace():
    spec = ExpSpec("r-1", "q", [], baseline=BASE, patch="queued-1.patch", options={"targets": ["s"], "force": True})
    assert ExpSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert spec.own_workspace and not ExpSpec("r-2", "n").own_workspace
    assert set(ExpSpec("r-2", "n").to_json()) == {"run_id", "exp_name", "overrides"}  # as before
    # A path out of the snapshot, a baseline that is not a sha: dropped.
    bad = ExpSpec.from_json({"run_id": "r", "exp_name": "q", "patch": "../../etc/passwd", "baseline": "HEAD",
                             "options": "force"})
    assert (bad.patch, bad.baseline, bad.options) == ("", "", {})


def test_a_manifest_keeps_a_single_queued_experiment_as_a_spec():
    spec = ExpSpec("r-1", "q", [], baseline=BASE, patch="queued-1.patch")
    manifest = Manifest("r", "cd" * 20, experiments=[spec.to_json()])
    assert Manifest.from_json(manifest.to_json()).specs() == [spec]


def test_events_are_studio_posts_or_nothing():
    event = data_event(3, metrics={"dvclive/metrics.json": {"data": {"acc": 0.5}}}, token="x", extra=1)
    assert live.clean_event(event) == {k: v for k, v in event.items() if k not in ("token", "extra")}
    assert live.clean_event({**event, "type": "delete"}) is None
    assert live.clean_event({**event, "client": "me"}) is None
    assert live.clean_event([event]) is None


def test_progress_is_the_folder_step_and_scalar_metrics():
    event = data_event(4, metrics={"dvclive/tune/trial-2/metrics.json": {
        "data": {"step": 4, "loss": 0.25, "acc": 0.9, "nested": {"f1": 0.8}, "name": "x"}}})
    progress = live.progress_of(event)
    assert progress.text() == "trial-2 step 4 loss=0.25  acc=0.9  nested.f1=0.8"
    assert live.progress_of(data_event(4, plots={"p.tsv": {"data": []}})) is None  # plots alone
    assert live.progress_of({"type": "start"}) is None


def test_feed_hands_on_complete_batches_in_order(tmp_path):
    store = Store(str(tmp_path))
    got = []
    feed = live.Feed(store, lambda: [], lambda run_id, events: got.append([e["step"] for e in events]),
                     every_s=3600)
    store.write(live.batch_path(store, "r", 1), json.dumps({"events": [data_event(0), data_event(1)]}).encode())
    store.write(live.batch_path(store, "r", 2), b'{"events": [')  # torn: not yet
    feed.read("r")
    assert got == [[0, 1]]
    store.write(live.batch_path(store, "r", 2), json.dumps({"events": [data_event(2), {"type": "x"}]}).encode())
    feed.close(["r"])
    assert got == [[0, 1], [2]]


def test_a_data_post_and_its_plots_are_posted_as_one(monkeypatch):
    sent = []
    monkeypatch.setattr(studio, "post", lambda settings, event: sent.append(event) or True)
    poster = studio.Poster({"token": "t", "url": "u", "repo_url": "r"})
    metrics = {"m.json": {"data": {"acc": 1.0}}}
    plots = {"p.tsv": {"data": [{"step": 0, "acc": 1.0}]}}
    poster.put([{"type": "start", "baseline_sha": BASE, "name": "e", "client": "dvc"},
                data_event(0, metrics=metrics, params={}), data_event(0, plots=plots),
                data_event(1, metrics=metrics), {"type": "done", "baseline_sha": BASE, "name": "e", "client": "dvc"}])
    poster.close()
    assert [(e["type"], e.get("step"), "plots" in e) for e in sent] == [
        ("start", None, False), ("data", 0, True), ("data", 1, False), ("done", None, False)]
    assert sent[1]["metrics"] == metrics and sent[1]["plots"] == plots
