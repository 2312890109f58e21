"""A store writer cannot plant code (issue 20, points 1-3).

Anyone who can write to a shared store can change what is in it at any time: a run's
bundle and result, the snapshot parts a runner fetches from it, the live updates the
client relays to DVC Studio. Each test plays that writer (at the moment it would matter)
and checks that what it planted never becomes the user's experiment, never runs on the
cluster, and never reaches Studio under the user's token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_dvcray, sh
from dvcray_cli.runs.model import ExpRef

SPEC = {
    "params.yaml": "x: 1\n",
    "train.py": "import json, yaml\njson.dump({'y': yaml.safe_load(open('params.yaml'))['x'] * 2}, "
                "open('m.json', 'w'))\n",
    "dvc.yaml": "stages:\n  train:\n    cmd: python train.py\n    deps: [train.py]\n    params: [x]\n"
                "    metrics: [{m.json: {cache: false}}]\n",
}
EVIL = "import os\nopen(os.path.expanduser('~/PLANTED'), 'w').write('ran')\n"
RUN = "dvcray-20260102-120000-abcdef"


def planted_bundle(root: Path, tmp_path: Path, ref: ExpRef, orphan: bool) -> tuple[Path, str]:
    """A bundle of ``ref`` pointing at a commit whose train.py is the writer's: an orphan
    commit, or one on top of the baseline (it descends from it, as an experiment does)."""
    other = tmp_path / f"writer-{'orphan' if orphan else 'child'}"
    sh("git", "clone", "-q", str(root), str(other), cwd=tmp_path)
    if orphan:
        sh("git", "checkout", "-q", "--orphan", "planted", cwd=other)
    (other / "train.py").write_text(EVIL)
    sh("git", "add", "-A", cwd=other)
    sh("git", "commit", "-qm", "planted", cwd=other)
    sha = sh("git", "rev-parse", "HEAD", cwd=other)
    sh("git", "update-ref", str(ref), sha, cwd=other)
    bundle = tmp_path / f"planted-{sha[:7]}.bundle"
    sh("git", "bundle", "create", "-q", str(bundle), str(ref), *([] if orphan else [f"^{ref.baseline}"]), cwd=other)
    return bundle, sha


def test_a_planted_orphan_commit_never_becomes_an_experiment(make_dvc_project, tmp_path):
    """Point 1: a bundle under ``refs/exps/<baseline>/lr-01`` whose commit does not descend from
    the baseline is refused by ``dvcray pull``; nothing lands under refs/exps, and
    ``dvc exp apply`` has nothing to write into the workspace."""
    root = make_dvc_project(SPEC)
    head = sh("git", "rev-parse", "HEAD", cwd=root)
    ref = ExpRef(head, "lr-01")
    bundle, sha = planted_bundle(root, tmp_path, ref, orphan=True)
    folder = tmp_path / "store" / "dvcray" / "runs" / RUN
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"run_id": RUN, "baseline": head, "exp_name": "lr-01"}))
    (folder / "result.json").write_text(json.dumps({"run_id": RUN, "status": "SUCCEEDED", "baseline": head,
                                                    "exp_name": "lr-01", "ref": str(ref), "exp_sha": sha}))
    (folder / "exp.bundle").write_bytes(bundle.read_bytes())

    proc = run_dvcray("pull", "lr-01", "--store", str(tmp_path / "store"), cwd=root)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "does not descend from the run's baseline" in proc.stderr and "Traceback" not in proc.stderr
    assert sh("git", "for-each-ref", "refs/exps", cwd=root) == ""
    assert (root / "train.py").read_text() == SPEC["train.py"]


@pytest.mark.parametrize("service", ["1", "0"], ids=["runner-service", "ray-job"])
def test_a_bundle_swapped_after_the_run_saved_it_is_refused(ray_cluster, make_dvc_project, tmp_path, monkeypatch,
                                                            service):
    """Point 1: between the runner's save and the client's import, the writer swaps the bundle
    for a commit on top of the baseline (it descends, as a real experiment does) and fixes
    up result.json to match. The client takes the commit the run made from the cluster (the
    run's log, over the authenticated channel), not from the store: the swap is refused."""
    from dvcray_cli.runs import submit
    from dvcray_cli.runs.finish import finish, raise_for
    from dvcray_cli.runs.model import RunOptions
    from dvcray_cli.errors import StoreError

    monkeypatch.setenv("DVCRAY_SERVICE", service)
    root = make_dvc_project({**SPEC, "unique.txt": f"{service}-{tmp_path.name}"})
    store = tmp_path / "store"
    sub = submit.submit(RunOptions(exp_name="lr-01", overrides=[f"x={9100 + int(service)}"], store=str(store)),
                        root, lambda m: None)
    state = sub.backend.follow(sub.run_id, lambda text: None)
    assert state.value == "SUCCEEDED"
    ref = ExpRef(sub.baseline, "lr-01")
    bundle, sha = planted_bundle(root, tmp_path, ref, orphan=False)
    folder = store / "dvcray" / "runs" / sub.run_id
    (folder / "exp.bundle").write_bytes(bundle.read_bytes())
    result = json.loads((folder / "result.json").read_text())
    assert result["ref"] == str(ref) and result["exp_sha"] != sha
    (folder / "result.json").write_text(json.dumps({**result, "exp_sha": sha}))

    outcome = finish(sub, state)
    assert not outcome.home and "the cluster says run" in (outcome.store_error or ""), outcome
    with pytest.raises(StoreError):
        raise_for(outcome)
    assert sh("git", "for-each-ref", "refs/exps", cwd=root) == ""


def test_snapshot_parts_changed_in_the_store_before_the_runner_fetches_them_never_run(
        ray_cluster, make_dvc_project, tmp_path, monkeypatch):
    """Point 2: on the Ray Job path a big snapshot waits in the store until its runner starts
    (minutes while a node is added). The writer swaps its untracked files for a train.py of
    their own meanwhile: the runner checks each file against the sha256 the manifest (in the
    job's package) gives, and refuses; the writer's code never runs."""
    import os

    from dvcray_cli.runs import submit
    from dvcray_cli.runs.finish import finish
    from dvcray_cli.runs.model import RunOptions

    monkeypatch.setenv("DVCRAY_SERVICE", "0")
    monkeypatch.setenv("DVCRAY_SNAPSHOT_VIA_STORE_MB", "1")
    root = make_dvc_project({**SPEC, "unique.txt": tmp_path.name})
    (root / "big.bin").write_bytes(os.urandom(2 * 2**20))  # untracked: the snapshot goes through the store
    store = tmp_path / "store"
    marker = tmp_path / "PLANTED"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "train.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    import tarfile

    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        tar.add(evil / "train.py", arcname="train.py")

    real_prepare = submit.prepare

    def prepare_then_plant(*args, **kwargs):
        prepared = real_prepare(*args, **kwargs)
        real_submit = prepared.backend.submit

        def plant_then_submit(prepared_, folder, job_id, specs, placed):
            # The writer, between the client's upload and the runner's fetch.
            parts = store / "dvcray" / "snapshots" / job_id
            assert (parts / "untracked.tar").is_file(), sorted(parts.iterdir())
            (parts / "untracked.tar").write_bytes((tmp_path / "evil.tar").read_bytes())
            return real_submit(prepared_, folder, job_id, specs, placed)

        prepared.backend.submit = plant_then_submit
        return prepared

    monkeypatch.setattr(submit, "prepare", prepare_then_plant)
    sub = submit.submit(RunOptions(exp_name="big", overrides=["x=9201"], store=str(store)), root, lambda m: None)
    state = sub.backend.follow(sub.run_id, lambda text: None)
    outcome = finish(sub, state)
    assert outcome.status == "FAILED" and "untracked.tar" in (outcome.error or "") and "sha256" in outcome.error, \
        outcome
    assert not marker.exists(), "the writer's code ran on the cluster"
    assert sh("git", "for-each-ref", "refs/exps", cwd=root) == ""


def test_live_updates_planted_in_the_store_never_reach_studio_and_never_stop_the_run(
        make_dvc_project, tmp_path, studio_capture, monkeypatch, caplog):
    """Point 3: the client relays a run's live updates from the store to DVC Studio with the
    user's own token. A writer adds posts under another experiment's name, another baseline,
    and malformed ones (metrics that are no object: an AttributeError took the relay down).
    Only the run's own events reach Studio; the rest are dropped with one warning."""
    import logging

    from dvcray_cli.runs import live
    from dvcray_cli.runs.project import find_project
    from dvcray_cli.store import Store

    root = make_dvc_project(SPEC)
    sh("git", "remote", "add", "origin", "https://git.example.com/team/trust.git", cwd=root)
    for key, value in studio_capture.env("isat_user-token").items():
        monkeypatch.setenv(key, value)
    project = find_project(root)
    head = project.baseline
    store = Store(str(tmp_path / "store"))

    def event(kind: str, **extra) -> dict:
        return {"type": kind, "repo_url": live.RELAY_REPO_URL, "baseline_sha": head, "name": "mine",
                "client": "dvclive" if kind == "data" else "dvc", **extra}

    good = [event("start"), event("data", step=0, metrics={"dvclive/metrics.json": {"data": {"acc": 0.5}}})]
    planted = [event("data", step=1, name="theirs", metrics={"m.json": {"data": {"acc": 1.0}}}),
               event("data", step=1, baseline_sha="cd" * 20),
               event("data", step=2, metrics=[1, 2]),
               event("data", step="3"),
               event("done", experiment_rev="not-a-sha")]
    store.write(live.batch_path(store, RUN, 1), json.dumps({"events": good[:1] + planted + good[1:]}).encode())

    caplog.set_level(logging.WARNING)
    relay = live.Relay(store, project, lambda: [RUN])   # the run's name unknown: the first event's holds
    relay.close([RUN])
    posted = [(p["body"]["type"], p["body"]["name"], p["body"].get("step")) for p in studio_capture.take()]
    assert posted == [("start", "mine", None), ("data", "mine", 0)], posted
    warnings = [r for r in caplog.records if "Dropped a live update" in r.getMessage()]
    assert len(warnings) == 1 and RUN in warnings[0].getMessage()

    # Its name known from the start (dvcray run -n mine): an event of another name never goes.
    store.write(live.batch_path(store, "other-run", 1), json.dumps({"events": [
        event("start", name="theirs"), event("start")]}).encode())
    with live.relayed(store, project, {"other-run": (head, "mine")}):
        pass
    assert [(p["body"]["type"], p["body"]["name"]) for p in studio_capture.take()] == [("start", "mine")]
