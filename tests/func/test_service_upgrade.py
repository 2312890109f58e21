"""The runner service after an upgrade of dvcray on the head (README, "The runner service"):
it takes no new runs, leaves once its runs have ended, and the next run starts a new one.

The head's Python imports dvcray from a folder of its own (an installed copy of this
package, first on its PYTHONPATH), as a node does from its site-packages. The upgrade is
what pip does to it: the installed files change under the running service; here the
version in ``dvcray_cli/__init__.py`` becomes the next patch release, which this client
still works with (same major and minor version).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, exp_metrics, run_dvcray, running_head, store_log
from dvcray_cli import __version__

NEXT = ".".join([*__version__.split(".")[:2], str(int(__version__.split(".")[2]) + 1)])


@pytest.fixture
def head_with_installed_dvcray(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(REPO / "dvcray_cli", site / "dvcray_cli", ignore=shutil.ignore_patterns("__pycache__"))
    with running_head(tmp_path / "head-home", "pytest-upgrade", env={"PYTHONPATH": str(site)}, num_cpus=2) as head:
        yield head, site


# Waits for its gate (a file named after its x) before it ends.
GATED = """\
import json, os, sys, time, yaml
x = yaml.safe_load(open("params.yaml"))["x"]
print(f"STAGE-STARTED x={x}", flush=True)
for _ in range(3000):
    if os.path.exists(os.path.join(sys.argv[1], str(x))):
        break
    time.sleep(0.1)
json.dump({"x": x}, open("m.json", "w"))
"""


def _services(head) -> dict[str, str]:
    """``{submission id: status}`` of the cluster's runner services (Ray Jobs)."""
    from dvcray_cli import ray_api

    client = ray_api.client(head.dashboard_url, head.token())
    return {j.submission_id: str(getattr(j.status, "value", j.status)) for j in client.list_jobs()
            if str(j.submission_id or "").startswith("dvcray-service-")}


def _service_log(head, submission_id: str) -> str:
    from dvcray_cli import ray_api

    return ray_api.client(head.dashboard_url, head.token()).get_job_logs(submission_id)


def _run_id(root: Path, exp_name: str) -> str:
    runs = json.loads(run_dvcray("runs", "--json", cwd=root).stdout)
    return next(r["run_id"] for r in runs if r["exp_name"] == exp_name)


def test_an_upgraded_service_takes_no_new_runs_leaves_when_its_runs_end_and_the_next_run_starts_a_new_one(
        head_with_installed_dvcray, make_dvc_project, tmp_path, monkeypatch):
    head, site = head_with_installed_dvcray
    monkeypatch.setenv("RAY_ADDRESS", head.dashboard_url)
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token())
    gates = tmp_path / "gates"
    gates.mkdir()
    root = make_dvc_project({
        "params.yaml": "x: 0\n", "gated.py": GATED,
        "dvc.yaml": f"stages:\n  s:\n    cmd: python gated.py {gates}\n    deps: [gated.py]\n    params: [x]\n"
                    "    metrics: [{m.json: {cache: false}}]\n",
    })
    store = tmp_path / "store"
    before = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "-n", "before", "-S", "x=9101",
                               "--store", str(store)], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 180   # a hang guard
        while not any("STAGE-STARTED" in store_log(r) for r in (store / "dvcray" / "runs").glob("dvcray-*")):
            assert time.monotonic() < deadline and before.poll() is None, before.communicate()
            time.sleep(0.5)
        [old] = _services(head)
        assert f"(dvcray {__version__}, pid" in _service_log(head, old)

        # pip upgrades dvcray on the head while the service runs "before".
        init = site / "dvcray_cli" / "__init__.py"
        init.write_text(init.read_text().replace(f'__version__ = "{__version__}"', f'__version__ = "{NEXT}"'))

        # The next run starts a new service (the upgraded dvcray), which runs it.
        (gates / "9102").touch()
        after = run_dvcray("run", "-n", "after", "-S", "x=9102", "--store", str(store), cwd=root, timeout=300)
        assert after.returncode == 0, after.stdout + after.stderr
        assert "Starting dvcray's runner service" in after.stderr, after.stderr
        services = _services(head)
        [new] = [s for s in services if s != old]
        assert services[old] == "RUNNING", "the old service goes on while its run does"
        assert f"(dvcray {NEXT}, pid" in _service_log(head, new)
        assert _run_id(root, "after") in _service_log(head, new)
        assert _run_id(root, "after") not in _service_log(head, old), "the old service took no new run"
    finally:
        (gates / "9101").touch()
        out, err = before.communicate(timeout=300)
    assert before.returncode == 0, out + err
    assert exp_metrics(root, "before", "m.json") == {"x": 9101}
    assert exp_metrics(root, "after", "m.json") == {"x": 9102}

    # Its run ended: the old service leaves; the new one stays.
    deadline = time.monotonic() + 120   # a hang guard
    while _services(head)[old] == "RUNNING" and time.monotonic() < deadline:
        time.sleep(1)
    assert _services(head)[old] == "SUCCEEDED", _service_log(head, old)[-2000:]
    assert _services(head)[new] == "RUNNING"
