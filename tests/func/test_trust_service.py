"""The runner service on a shared head (issue 20: points 4, 9 and 10): the cluster's token
never goes to whoever holds its port, it stands up to clients that misbehave, and what it
keeps of runs is its user's alone.

Real Ray (the session head), the real service it runs as a Ray Job, real `dvc exp run`.
"""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path

from conftest import run_dvcray

SPEC = {
    "params.yaml": "x: 1\n",
    "stage.py": "import json, yaml\njson.dump({'y': yaml.safe_load(open('params.yaml'))['x'] * 2}, "
                "open('m.json', 'w'))\n",
    "dvc.yaml": "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n    params: [x]\n"
                "    metrics: [{m.json: {cache: false}}]\n",
}


def node_dir(head) -> Path:
    """The runner's folder on the head's node (its HOME's cache)."""
    return Path(head.token_path).parents[1] / ".cache" / "dvcray"


def project(make_dvc_project, name: str = "project") -> Path:
    return make_dvc_project({**SPEC, "unique.txt": uuid.uuid4().hex}, name=name)


def run(root: Path, name: str, x: int, store: Path, *args: str) -> str:
    proc = run_dvcray("run", "-n", name, "-S", f"x={x}", "--store", str(store), "--json", *args, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)["run_id"]


def private(path: Path) -> bool:
    """Nobody but its owner can read or enter ``path``."""
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_run_logs_snapshots_and_workspaces_on_the_head_are_the_users_alone(ray_cluster, make_dvc_project, tmp_path,
                                                                            monkeypatch):
    """Point 10: on a head other users log in to, a run's log, its snapshot (the user's code and
    history) and its workspace are 0600/0700, through the runner service and as a Ray Job."""
    root = project(make_dvc_project)
    store = tmp_path / "store"
    run_id = run(root, "modes", 8101, store)
    base = node_dir(ray_cluster)
    log = base / "service" / "logs" / f"{run_id}.log"
    assert log.is_file(), sorted(p.name for p in (base / "service" / "logs").iterdir())
    assert private(log), oct(log.stat().st_mode)
    for folder in (base / "service", base / "service" / "logs", base / "service" / "snapshots", base / "runs",
                   base / "repos"):
        assert private(folder), f"{folder}: {oct(folder.stat().st_mode)}"
    snapshot = base / "service" / "snapshots" / run_id
    assert snapshot.is_dir() and private(snapshot.parent)

    monkeypatch.setenv("DVCRAY_SERVICE", "0")
    run(root, "modes-job", 8102, store)
    assert private(base / "runs")
