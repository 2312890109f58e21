"""A cluster that hangs rather than dies (README, ``dvcray cluster``): its processes are
there but do not answer. ``dvcray run`` ends with exit 3 once it has had no answer for
``DVCRAY_RECONNECT_TIMEOUT_S``, naming the cluster, instead of waiting forever.

Each test freezes a head of its own with SIGSTOP and thaws it (SIGCONT) before it is
stopped by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import running_head, store_log

pytestmark = pytest.mark.slow

TIMEOUT_S = 10

STAGE = """\
import time
print("STAGE-STARTED", flush=True)
time.sleep(600)
"""


@pytest.fixture
def own_head(tmp_path):
    frozen: list[int] = []
    with running_head(tmp_path / "head-home", "pytest-hang", num_cpus=2) as head:
        try:
            yield head, frozen
        finally:
            for pid in frozen:   # thawed, so that it can be stopped
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass


def _run_until_the_stage_starts(head, make_dvc_project, tmp_path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    root = make_dvc_project({"stage.py": STAGE,
                             "dvc.yaml": "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n"})
    store = tmp_path / "store"
    env = {**os.environ, "RAY_ADDRESS": head.dashboard_url, "RAY_AUTH_TOKEN": head.token(),
           "DVCRAY_RECONNECT_TIMEOUT_S": str(TIMEOUT_S), **env}
    proc = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "-n", "hung", "--store", str(store)],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180   # a hang guard
    while True:
        runs = list((store / "dvcray" / "runs").glob("dvcray-*")) if (store / "dvcray" / "runs").is_dir() else []
        if runs and "STAGE-STARTED" in store_log(runs[0]):
            return proc, runs[0]
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.5)


def _freeze(pids: list[int], frozen: list[int]) -> None:
    for pid in pids:
        frozen.append(pid)
        os.kill(pid, signal.SIGSTOP)


def _ends_with_exit_3_naming_the_cluster(proc: subprocess.Popen, head) -> str:
    try:
        time.sleep(TIMEOUT_S / 2)
        assert proc.poll() is None, "it gave up before DVCRAY_RECONNECT_TIMEOUT_S: " + "".join(proc.communicate())
        _, stderr = proc.communicate(timeout=300)   # a hang guard
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, stderr
    assert f"Lost contact with the Ray cluster at {head.dashboard_url} for {TIMEOUT_S} s" in stderr, stderr
    assert "Traceback" not in stderr
    return stderr


def test_a_run_whose_clusters_gcs_hangs_ends_with_exit_3_after_the_reconnect_timeout(own_head, make_dvc_project,
                                                                                     tmp_path):
    """A run as a Ray Job of its own: the job API needs the GCS, which no longer answers."""
    head, frozen = own_head
    proc, _run_dir = _run_until_the_stage_starts(head, make_dvc_project, tmp_path, {"DVCRAY_SERVICE": "0"})
    gcs = [p for p in head.pids() if psutil.Process(p).name() == "gcs_server"]
    assert len(gcs) == 1
    _freeze(gcs, frozen)
    _ends_with_exit_3_naming_the_cluster(proc, head)


def test_a_run_whose_head_hangs_ends_with_exit_3_after_the_reconnect_timeout(own_head, make_dvc_project, tmp_path):
    """A run of the runner service: the whole head stops answering (every process of the
    cluster frozen, as on a machine that hangs), the service's port included."""
    head, frozen = own_head
    proc, _run_dir = _run_until_the_stage_starts(head, make_dvc_project, tmp_path, {})
    _freeze(head.pids(), frozen)
    _ends_with_exit_3_naming_the_cluster(proc, head)
