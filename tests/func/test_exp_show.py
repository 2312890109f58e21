"""``dvc exp show`` of an experiment brought home equals a local run's (issue 10, item 7),
also when its metrics and plots live inside a DVC-tracked output folder; the
folder's big files stay in the store until ``dvcray pull``."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_dvcray, sh

EVAL = """\
import json, os, yaml
p = yaml.safe_load(open("params.yaml"))
os.makedirs("eval", exist_ok=True)
json.dump({"acc": p["x"] / 10}, open("eval/metrics.json", "w"))
open("eval/model.bin", "wb").write(os.urandom(200_000))
open("eval/curve.csv", "w").write("step,loss\\n1,0.5\\n2,0.25\\n")
"""
SPEC = {
    "ev.py": EVAL, "params.yaml": "x: 3\n",
    "dvc.yaml": "stages:\n  ev:\n    cmd: python ev.py\n    deps: [ev.py]\n    params: [x]\n    outs: [eval]\n"
                "metrics:\n  - eval/metrics.json\nplots:\n  - eval/curve.csv\n",
}


def shown(root: Path, name: str) -> dict:
    data = json.loads(sh("dvc", "exp", "show", "--json", cwd=root))
    for exp in data[1]["experiments"] or []:
        if exp["name"] == name:
            return exp["revs"][0]
    raise AssertionError(f"{name} not in dvc exp show: {data}")


def cached_sizes(root: Path) -> list[int]:
    return sorted(p.stat().st_size for p in (root / ".dvc" / "cache").rglob("*") if p.is_file())


def test_metrics_inside_an_output_folder_show_as_for_a_local_run(ray_cluster, make_dvc_project, tmp_path):
    root = make_dvc_project(SPEC)
    proc = run_dvcray("run", "-n", "remote", "-S", "x=7", "--store", str(tmp_path / "store"), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    remote = shown(root, "remote")
    assert remote["error"] is None and remote["data"]["metrics"]["eval/metrics.json"] == {"data": {"acc": 0.7}}
    assert all(size < 100_000 for size in cached_sizes(root)), "the big output was fetched"
    plots = json.loads(sh("dvc", "plots", "diff", "--json", "--split", remote["rev"], cwd=root))
    assert "eval/curve.csv" in json.dumps(plots) and "error" not in json.dumps(plots["errors"] if "errors" in plots
                                                                                 else {})

    sh("dvc", "exp", "run", "-q", "-n", "local", "-S", "x=7", cwd=root)
    local = shown(root, "local")
    assert local["data"]["metrics"] == remote["data"]["metrics"]
    assert local["data"]["params"] == remote["data"]["params"]
    assert local["data"]["outs"]["eval"]["nfiles"] == remote["data"]["outs"]["eval"]["nfiles"] == 3
