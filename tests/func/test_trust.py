"""A store is shared data, never code and never a source of addresses (issue 10, items 1-4).

A careless or hostile teammate can write anything into a shared store. Each test
plants such records and checks that dvcray sends no token anywhere the user did
not configure, fetches no ref but an experiment of the run's own baseline,
prints data as text, and says which record is bad instead of crashing.
A capture server on 127.0.0.1 stands in for a foreign address.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from helpers import run_dvcray, sh

SPEC = {"params.yaml": "lr: 0.1\n", "dvc.yaml": "stages:\n  s:\n    cmd: echo hi\n"}
RUN = "dvcray-20260101-120000-abcdef"


def plant(store: Path, run_id: str, **files) -> Path:
    folder = store / "dvcray" / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        name = name.replace("_json", ".json").replace("_txt", ".txt")
        (folder / name).write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return folder


def test_a_store_never_says_where_the_token_goes(make_dvc_project, tmp_path, capture_server, monkeypatch):
    root = make_dvc_project(SPEC)
    head = sh("git", "rev-parse", "HEAD", cwd=root)
    store = tmp_path / "store"
    plant(store, RUN, manifest_json={"run_id": RUN, "baseline": head, "exp_name": "theirs", "created": time.time(),
                                     "address": capture_server.url},
          status_json={"state": "RUNNING", "started": time.time(), "heartbeat": time.time()})
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-token-that-stays-home")

    listed = run_dvcray("runs", "--json", "--store", str(store), cwd=root)
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry["run_id"] == RUN and entry["state"] == "RUNNING" and entry["address"] is None
    logs = run_dvcray("logs", RUN, "--store", str(store), cwd=root)
    assert logs.returncode == 0, logs.stderr
    stop = run_dvcray("stop", RUN, "--store", str(store), cwd=root)
    assert stop.returncode == 3 and "no cluster is configured here" in stop.stderr
    assert capture_server.requests == [], "a store named an address and dvcray went there"


def test_a_crafted_result_cannot_rewrite_a_branch(make_dvc_project, tmp_path):
    root = make_dvc_project(SPEC)
    head = sh("git", "rev-parse", "HEAD", cwd=root)
    sh("git", "branch", "release", cwd=root)
    # A bundle that moves `release` somewhere else, as a hostile record would carry.
    other = tmp_path / "other"
    sh("git", "clone", "-q", str(root), str(other), cwd=tmp_path)
    (other / "evil.txt").write_text("evil\n")
    sh("git", "add", "evil.txt", cwd=other)
    sh("git", "commit", "-qm", "evil", cwd=other)
    evil = sh("git", "rev-parse", "HEAD", cwd=other)
    store = tmp_path / "store"
    folder = plant(store, RUN, manifest_json={"run_id": RUN, "baseline": head, "exp_name": "x"},
                   result_json={"run_id": RUN, "status": "SUCCEEDED", "baseline": head, "exp_name": "x",
                                "ref": "refs/heads/release", "exp_sha": evil})
    sh("git", "branch", "-f", "release", "HEAD", cwd=other)
    sh("git", "bundle", "create", "-q", str(folder / "exp.bundle"), "refs/heads/release", f"^{head}", cwd=other)

    proc = run_dvcray("pull", RUN, "--store", str(store), cwd=root)
    assert proc.returncode == 4, proc.stderr
    assert "not an experiment of its baseline" in proc.stderr and "nothing was fetched" in proc.stderr
    assert sh("git", "rev-parse", "release", cwd=root) == head
    assert sh("git", "cat-file", "-t", evil, cwd=root, check=False) != "commit"

    # An experiment ref of another baseline is refused the same way.
    result = json.loads((folder / "result.json").read_text())
    result["ref"] = f"refs/exps/{'ab'}/{'c' * 38}/x"
    (folder / "result.json").write_text(json.dumps(result))
    proc = run_dvcray("pull", RUN, "--store", str(store), cwd=root)
    assert proc.returncode == 4 and "not an experiment of its baseline" in proc.stderr
    assert sh("git", "for-each-ref", "refs/exps", cwd=root) == ""


def test_names_and_records_are_printed_as_text(make_dvc_project, tmp_path):
    root = make_dvc_project(SPEC)
    proc = run_dvcray("run", "-n", "a[/b]", "--store", str(tmp_path / "s"), cwd=root)
    assert proc.returncode == 2, proc.stderr
    assert "'a[/b]' is not a valid experiment name" in proc.stderr
    assert "Traceback" not in proc.stderr and "MarkupError" not in proc.stderr

    head = sh("git", "rev-parse", "HEAD", cwd=root)
    store = tmp_path / "store"
    plant(store, RUN, manifest_json={"run_id": RUN, "baseline": head, "exp_name": "[bold red]boom[/]"},
          result_json={"run_id": RUN, "status": "FAILED", "baseline": head, "exp_name": "[bold red]boom[/]",
                       "metrics": {"m.json": {"[/oops]": 1.5}}, "error": "[/] closing tag", "started": 1.0,
                       "ended": 2.0})
    proc = run_dvcray("runs", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "[bold red]boom[/]" in proc.stdout and "[/oops]=1.5" in proc.stdout


def test_torn_or_invalid_records_say_which_file_is_bad(make_dvc_project, tmp_path):
    root = make_dvc_project(SPEC)
    head = sh("git", "rev-parse", "HEAD", cwd=root)
    store = tmp_path / "store"
    plant(store, RUN, manifest_json={"run_id": RUN, "baseline": head, "exp_name": "torn"},
          result_json=b'{"run_id": "' + RUN.encode() + b'", "sta')
    other = "dvcray-20260101-130000-bbbbbb"
    plant(store, other, manifest_json={"run_id": other, "baseline": head, "exp_name": "listy"}, result_json=b"[1, 2]")

    proc = run_dvcray("runs", "--json", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stderr
    errors = {e["run_id"]: e["error"] for e in json.loads(proc.stdout)}
    assert f"dvcray/runs/{RUN}/result.json in the store {store} is not a JSON object" == errors[RUN]
    assert "result.json" in errors[other]
    proc = run_dvcray("pull", "torn", "--store", str(store), cwd=root)
    assert proc.returncode == 4, proc.stderr
    assert "result.json" in proc.stderr and "is not a JSON object" in proc.stderr and "Traceback" not in proc.stderr
