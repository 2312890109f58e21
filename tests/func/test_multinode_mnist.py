"""Proof on ``local-multinode``: the mnist template through ``dvcray run`` with its work on several nodes.

Ray's fake_multinode provider starts real raylets on this machine as worker
nodes (1 CPU each; the head has none), so Tune's trials and Ray Train's
workers run in other nodes' processes than the stage's driver on the head.
The experiment must still hold every epoch's DVCLive metrics (written on the
head by dvcray's callbacks) and the model file. All fake nodes share this
machine's disk, so the template's local ``ray.storage_path`` (an absolute path
in the run's workspace) is storage every node reaches; a real cluster needs
``s3://`` there.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from helpers import REPO, exp_metrics, exp_refs, run_dvcray, sh

pytestmark = [
    pytest.mark.slow,
    # mnist across machines (test_onprem) and the template's pipeline (test_template_mnist) cover it in CI.
    pytest.mark.extended,
    pytest.mark.skipif(not (REPO / "cluster-configs" / "local-multinode.yaml").is_file(),
                       reason="cluster-configs/local-multinode.yaml is absent: no local-multinode cluster"),
]

_DROP = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
         "DVC_STUDIO_TOKEN", "CI")
WORKERS = 2


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    """``dvcray cluster up local-multinode`` with a HOME of its own; ``down`` (and stop by pid) at the end."""
    from dvcray_cli.clusters import local

    home = tmp_path_factory.mktemp("mnist-multinode-home")
    env = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith("AWS_")}
    env.update({"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                "XDG_CACHE_HOME": str(home / ".cache"), "RAY_USAGE_STATS_ENABLED": "0",
                "DVC_NO_ANALYTICS": "1", "DVC_STUDIO_OFFLINE": "true", "GIT_CONFIG_NOSYSTEM": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    up = run_dvcray("cluster", "up", "local-multinode", env=env, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    head = local.LocalCluster.from_json(
        json.loads((home / ".dvcray" / "clusters" / "local-multinode.json").read_text()))
    try:
        yield SimpleNamespace(home=home, env=env, head=head)
    finally:
        down = run_dvcray("cluster", "down", "local-multinode", "--yes", env=env, timeout=120)
        if head.pids():   # never leave another test a stray cluster
            head.stop(timeout=5)
        shutil.rmtree(head.temp_dir, ignore_errors=True)
        assert down.returncode == 0, down.stdout + down.stderr


def _scale_to(head, workers: int, timeout: float = 120) -> list[str]:
    """Ask the autoscaler for ``workers`` one-CPU nodes (Ray's request_resources) and wait for them.

    The tune stage runs 2 trials at once, one CPU each, so with 2 workers they
    must land on 2 nodes; without waiting, a short search could finish on the
    first worker before the autoscaler's second one joins.
    """
    from dvcray_cli import ray_api

    code = ("import ray\nfrom ray.autoscaler.sdk import request_resources\n"
            f"ray.init()\nrequest_resources(bundles=[{{'CPU': 1}}] * {workers})\n")
    env = {**os.environ, "RAY_ADDRESS": head.gcs_address, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": head.token()}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=120)
    deadline = time.monotonic() + timeout
    while True:
        alive = [n["node_id"] for n in ray_api.list_nodes(head.dashboard_url, head.token())
                 if n["alive"] and not n["is_head"]]
        if len(alive) >= workers or time.monotonic() > deadline:
            return alive
        time.sleep(1)


def _csv(text: str, delimiter: str = ",") -> list[dict]:
    return list(csv.DictReader(text.splitlines(), delimiter=delimiter))


def test_mnist_on_several_nodes_keeps_per_epoch_metrics_and_the_model(multinode, monkeypatch, tmp_path):
    t0 = time.monotonic()
    workers = _scale_to(multinode.head, WORKERS)
    assert len(workers) >= WORKERS, workers
    scaled_s = time.monotonic() - t0

    monkeypatch.setenv("RAY_ADDRESS", multinode.head.dashboard_url)
    monkeypatch.setenv("RAY_AUTH_TOKEN", multinode.head.token())
    proc = run_dvcray("scaffold", "mnist", str(tmp_path / "proj"), "--set", "data.source=digits", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = tmp_path / "proj"
    store = tmp_path / "store"
    epochs, max_epochs = 3, 3
    t1 = time.monotonic()
    proc = run_dvcray("run", "-n", "multi", "-S", "tune.num_samples=4", "-S", f"tune.max_epochs={max_epochs}",
                      "-S", "tune.grace_period=1", "-S", f"train.epochs={epochs}", "--store", str(store),
                      cwd=root, timeout=400)
    run_s = time.monotonic() - t1
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    ref = next(r for r in exp_refs(root) if r.endswith("/multi"))

    def show(rel: str) -> str:
        return sh("git", "show", f"{ref}:{rel}", cwd=root)

    # Tune's trials ran on at least 2 worker nodes (each trial reports its node id).
    trials = _csv(show("tune/trials.csv"))
    assert len(trials) == 4
    nodes = {t["node"] for t in trials}
    from dvcray_cli import ray_api

    heads = {n["node_id"] for n in ray_api.list_nodes(multinode.head.dashboard_url, multinode.head.token())
             if n["is_head"]}
    assert len(nodes) >= 2 and not nodes & heads, (nodes, heads)

    # Per-epoch DVCLive metrics, as on one node: every trial's epochs, and train's.
    per_trial = {}
    for row in _csv(show("tune/epochs.csv")):
        per_trial.setdefault(row["trial"], []).append(int(row["epoch"]))
    for trial, trial_epochs in per_trial.items():
        rows = _csv(show(f"dvclive/tune/trial-{trial}/plots/metrics/accuracy.tsv"), "\t")
        assert [int(r["step"]) for r in rows] == sorted(trial_epochs), trial
    for name in ("loss", "accuracy", "val_accuracy"):
        rows = _csv(show(f"dvclive/train/plots/metrics/{name}.tsv"), "\t")
        assert [int(r["step"]) for r in rows] == list(range(1, epochs + 1)), name
    train = exp_metrics(root, "multi", "dvclive/train/metrics.json")
    assert train["step"] == epochs and train["val_accuracy"] > 0.5
    assert exp_metrics(root, "multi", "dvclive/evaluate/metrics.json")["test_examples"] == 360

    # The model file: in the experiment's dvc.lock, and in the store, from which dvcray pull
    # and dvc exp apply bring it here.
    lock = yaml.safe_load(show("dvc.lock"))
    model_md5 = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "models/model.pt")
    proc = run_dvcray("pull", "multi", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sh("dvc", "exp", "apply", "multi", cwd=root)
    assert hashlib.md5((root / "models/model.pt").read_bytes()).hexdigest() == model_md5

    print(f"\nscale to {WORKERS} workers {scaled_s:.0f}s, dvcray run {run_s:.0f}s, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
