"""``dvcray report``: experiments against their baseline, from DVC's own records."""

from __future__ import annotations

import json

from helpers import run_dvcray, sh


def test_report_marks_what_changed(make_dvc_project):
    root = make_dvc_project({
        "params.yaml": "lr: 0.1\nseed: 0\n",
        "fit.py": "import json, yaml\np = yaml.safe_load(open('params.yaml'))\n"
                  "json.dump({'acc': round(0.5 + p['lr'], 3)}, open('m.json', 'w'))\n",
        "dvc.yaml": "stages:\n  fit:\n    cmd: python fit.py\n    deps: [fit.py]\n    params: [lr, seed]\n"
                    "    metrics: [{m.json: {cache: false}}]\n",
    }, commit=False)
    sh("dvc", "repro", "-q", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-q", "-m", "baseline with metrics", cwd=root)
    sh("dvc", "exp", "run", "-q", "-n", "faster", "-S", "lr=0.3", cwd=root)
    sh("git", "checkout", "-q", "--", ".", cwd=root)  # dvc exp run leaves its result in the workspace
    sh("dvc", "exp", "run", "-q", "-n", "same", cwd=root)

    md = run_dvcray("report", "--md", cwd=root)
    assert md.returncode == 0, md.stderr
    lines = md.stdout.splitlines()
    faster = next(line for line in lines if line.startswith("| faster |"))
    same = next(line for line in lines if line.startswith("| same |"))
    assert "**0.8** (+0.2)" in faster and "**0.3**" in faster
    assert "**" not in same  # nothing differs from the baseline
    assert "seed" not in md.stdout  # a param no experiment changed is left out

    data = json.loads(run_dvcray("report", "faster", "--json", cwd=root, check=True).stdout)
    assert data["baseline"]["metrics"] == {"acc": 0.6}
    assert [e["name"] for e in data["experiments"]] == ["faster"]
    assert data["experiments"][0]["params"]["lr"] == 0.3

    missing = run_dvcray("report", "nope", cwd=root)
    assert missing.returncode == 2 and "nope" in missing.stderr
