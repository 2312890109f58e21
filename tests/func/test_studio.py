"""Live metrics: DVC Studio gets from ``dvcray run`` what it gets from a local ``dvc exp run``
(relayed by the client with its own token), and the terminal shows the latest step.

Every Studio here is a capture server on 127.0.0.1 (tests never reach a real one).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from helpers import node_files, run_dvcray, sh

PLANTED_TOKEN = "isat_studio-planted-token-0a1b2c3d4e5f"

TRAIN = """\
import time, yaml
from dvclive import Live
p = yaml.safe_load(open("params.yaml"))
with Live("dvclive", dvcyaml=None, report=None) as live:
    for i in range(p["steps"]):
        live.log_metric("acc", round(p["lr"] * (i + 1), 6))
        live.log_metric("loss", round(1 / (i + 1), 6))
        live.next_step()
        time.sleep(p["pause"])
print("trained", flush=True)
"""


def live_project(make_dvc_project) -> Path:
    root = make_dvc_project({
        "params.yaml": "lr: 0.1\nsteps: 3\npause: 0.0\n",
        "train.py": TRAIN,
        "dvc.yaml": "stages:\n  train:\n    cmd: python train.py\n    deps: [train.py]\n"
                    "    params: [lr, steps, pause]\n    outs: [{dvclive: {cache: false}}]\n"
                    "metrics: [dvclive/metrics.json]\nplots: [dvclive/plots/metrics]\n",
    })
    # Studio names a repo by its git remote's URL (only read, never contacted).
    sh("git", "remote", "add", "origin", "https://git.example.com/team/live.git", cwd=root)
    return root


def comparable(post: dict) -> tuple:
    """A post without what differs between two runs of one experiment: its name, the
    experiment commit, and the plots' timestamps."""
    body = {k: v for k, v in post["body"].items() if k not in ("name", "experiment_rev")}
    for plot in (body.get("plots") or {}).values():
        for point in plot.get("data") or []:
            point.pop("timestamp", None)
    return post["path"], post["authorization"], repr(sorted(body.items()))


def test_studio_gets_the_same_posts_as_from_a_local_run_and_the_token_stays_home(
        ray_cluster, make_dvc_project, tmp_path, studio_capture):
    root = live_project(make_dvc_project)
    store = tmp_path / "store"
    env = studio_capture.env(PLANTED_TOKEN)

    sh("dvc", "exp", "run", "-n", "here", "-S", "lr=0.31", cwd=root, env=env)
    local = studio_capture.take()
    sh("git", "checkout", "-q", "--", ".", cwd=root)
    sh("git", "clean", "-fdq", cwd=root)  # the local run's dvc.lock and outputs must not travel
    proc = run_dvcray("run", "-n", "there", "-S", "lr=0.31", "--store", str(store), cwd=root, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    remote = studio_capture.take()

    # DVC's start, DVCLive's data for each step (DVCLive posts some steps twice), DVC's done.
    kinds = [(p["body"]["type"], p["body"]["client"]) for p in local]
    assert kinds[0] == ("start", "dvc") and kinds[-1] == ("done", "dvc")
    assert set(kinds[1:-1]) == {("data", "dvclive")}
    assert {p["body"]["step"] for p in local[1:-1]} == {0, 1, 2}
    assert [comparable(p) for p in remote] == [comparable(p) for p in local]
    assert {p["body"]["name"] for p in remote} == {"there"}
    head = sh("git", "rev-parse", "HEAD", cwd=root)
    assert remote[0]["body"]["repo_url"] == "https://git.example.com/team/live.git"
    assert remote[0]["body"]["baseline_sha"] == head
    exp_sha = sh("git", "rev-parse", f"refs/exps/{head[:2]}/{head[2:]}/there", cwd=root)
    assert remote[-1]["body"]["experiment_rev"] == exp_sha

    # The terminal (not a tty here: CI mode) showed the latest step.
    assert re.search(r"^live: dvclive step 2 +acc=0\.93 +loss=0\.3333$", proc.stdout, re.M), proc.stdout

    # The token is nowhere on the cluster's side: store, job records, Ray's session (logs, packages).
    files = [p for p in store.rglob("*") if p.is_file()] + node_files(ray_cluster)
    assert not [p for p in files if PLANTED_TOKEN.encode() in p.read_bytes()]
    from dvcray_cli import clusters

    client = clusters.connect(ray_cluster.dashboard_url)
    assert PLANTED_TOKEN not in repr(client.list_jobs())


def test_a_fast_loop_stays_calm_and_no_token_sends_nothing(ray_cluster, make_dvc_project, tmp_path,
                                                           studio_capture):
    root = live_project(make_dvc_project)
    env = {"DVC_STUDIO_URL": studio_capture.url, "DVC_STUDIO_OFFLINE": "false"}  # no token
    started = time.monotonic()
    proc = run_dvcray("run", "-n", "calm", "-S", "steps=400,3", "-S", "lr=0.41", "--store", str(tmp_path / "s"),
                      cwd=root, env=env)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {name: [ln for ln in proc.stdout.splitlines() if ln.startswith(f"[{name}] live: ")]
             for name in ("calm-1", "calm-2")}
    # One line per experiment at most once a second (of however long the command took, the
    # machine's load included), however fast its loop of 400 steps; the last one its last step.
    assert lines["calm-1"] and len(lines["calm-1"]) <= took + 1, (took, lines["calm-1"])
    assert lines["calm-1"][-1].startswith("[calm-1] live: dvclive step 399 ")
    assert lines["calm-2"][-1].startswith("[calm-2] live: dvclive step 2 ")
    assert studio_capture.take() == []


@pytest.mark.parametrize("setting, expected", [
    ({"env": {"DVC_STUDIO_TOKEN": PLANTED_TOKEN}}, "capture"),
    ({"env": {"DVC_STUDIO_TOKEN": PLANTED_TOKEN, "DVC_STUDIO_OFFLINE": "true"}}, None),
    ({"env": {}}, None),
    ({"env": {}, "config": {"studio.token": PLANTED_TOKEN}}, "capture"),
    ({"env": {"DVC_STUDIO_TOKEN": PLANTED_TOKEN}, "config": {"studio.offline": "true"}}, None),
    ({"env": {"DVC_STUDIO_TOKEN": PLANTED_TOKEN, "DVC_STUDIO_URL": ""},
      "config": {"studio.url": "http://127.0.0.1:9/configured"}}, "http://127.0.0.1:9/configured"),
])
def test_studio_settings_are_dvcs(make_dvc_project, monkeypatch, studio_capture, setting, expected):
    """The client posts where, and only when, a local dvc exp run in the project would."""
    from dvcray_cli.runs import studio
    from dvcray_cli.runs.project import find_project

    root = live_project(make_dvc_project)
    for key, value in setting.get("config", {}).items():
        sh("dvc", "config", "--local", key, value, cwd=root)
    monkeypatch.setenv("DVC_STUDIO_URL", studio_capture.url)
    monkeypatch.setenv("DVC_STUDIO_OFFLINE", "false")
    for key, value in setting["env"].items():
        if value:
            monkeypatch.setenv(key, value)
        else:
            monkeypatch.delenv(key)
    found = studio.config(find_project(root))
    if expected is None:
        assert found == {}
    else:
        assert found == {"token": PLANTED_TOKEN, "repo_url": "https://git.example.com/team/live.git",
                         "url": studio_capture.url if expected == "capture" else expected}
