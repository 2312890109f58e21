"""A machine dies mid-stage and the run carries on elsewhere, on machines of their own (the
namespace test bed of ``test_onprem.py``: its bed, S3 and lab cluster, built again for this
module: head n0, workers n1 and n2).

A three-stage pipeline whose middle stage checkpoints each epoch where dvcray tells Ray to
keep checkpoints (the S3 store), under a name the same for every attempt of the run. The
machine the middle stage runs on is killed (every process of it at once) after its second
epoch: the run still exits 0 and comes home, the first stage is not run again (its outputs
were saved as it finished), the middle one resumes after its last checkpoint, the last runs
once. Each stage counts itself in the bucket (a machine's own disk dies with it).

Set ``DVCRAY_BENCH_OUT`` to a file and the test writes what it measured there (work redone,
time from the loss to the retry's first line): ``benchmarks/retry_onprem.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import sh
from test_onprem import BUCKET, _clone, _dvcray, _out, _with_store, bed, client, lab, s3  # noqa: F401 - fixtures
from test_retry import PIPELINE, STAGES, count, events, starts
from test_run import exp_metrics, exp_refs

pytestmark = pytest.mark.slow

class Lines:
    """A process's stdout, line by line as it comes, each with the time it came."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append((time.monotonic(), line))

    def first(self, text: str, after: float = 0.0) -> float | None:
        return next((t for t, line in self.lines if t >= after and text in line), None)

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def _reboot(bed, node, timeout: float = 240) -> None:
    """The machine comes back, and Ray's autoscaler starts Ray there again (over SSH, from the
    head): wait for that, so that the lab's ``cluster down`` does not race it."""
    bed.start(node)
    deadline = time.monotonic() + timeout
    while not any(" raylet" in p or "/raylet " in p for p in bed.ray_processes(node)) \
            and time.monotonic() < deadline:
        time.sleep(2)


def test_a_killed_machine_mid_stage_is_retried_elsewhere_and_resumes(bed, client, lab):
    project = _clone(client, "resumed")
    sh("dvc", "init", "-q", cwd=project, env=client.env)
    _with_store(client, project)
    salt = uuid.uuid4().hex
    (project / "params.yaml").write_text(json.dumps({"salt": salt, "epochs": 6, "sleep": 2}))
    (project / "stages.py").write_text(STAGES)
    (project / "dvc.yaml").write_text(PIPELINE)
    sh("git", "add", "-A", cwd=project, env=client.env)
    sh("git", "commit", "-qm", "three stages, the middle one checkpoints", cwd=project, env=client.env)
    workers = {bed.node("n1").hostname, bed.node("n2").hostname}

    run = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "-n", "survivor", "--cpus-per-exp", "1"],
                           cwd=project, env=client.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(run)
    victim = None
    try:
        deadline = time.monotonic() + 300
        while victim is None and time.monotonic() < deadline:
            assert run.poll() is None, (lines.text[-3000:], run.stderr.read()[-3000:])
            found = events(client.s3, BUCKET, salt)
            if count(found, "b-epoch") >= 2:
                victim = bed.node(starts(found)[0][1])
            time.sleep(0.5)
        assert victim is not None and victim.hostname in workers, "stage b did not reach epoch 2 on a worker"
        bed.kill(victim)          # the machine dies: every process on it, at once
        lost_at = time.monotonic()
        epochs_before = count(events(client.s3, BUCKET, salt), "b-epoch")
        stderr = run.stderr.read()
        run.wait(timeout=600)
        lines.thread.join(timeout=10)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if victim is not None:
            _reboot(bed, victim)
    out = lines.text
    assert run.returncode == 0, f"exit {run.returncode}\n{out[-4000:]}\n{stderr[-4000:]}"
    found = events(client.s3, BUCKET, salt)
    begun = starts(found)
    assert count(found, "a") == 1, f"stage a ran again: {sorted(found)}"
    assert count(found, "c") == 1, sorted(found)
    assert begun[0][0] == 0 and len(begun) == 2 and begun[1][0] >= 2, f"stage b did not resume: {sorted(found)}"
    resumed, retry_host = begun[1][0], begun[1][1]
    assert retry_host in workers - {victim.hostname}, "the retry ran on the other worker"
    assert any(r.endswith("/survivor") for r in exp_refs(project)), "the experiment is home"
    assert exp_metrics(project, "survivor", "c.json") == {"b": f"b resumed from {resumed}"}
    assert f"machine {victim.hostname} lost (its node {victim.ip} died" in out, out[-4000:]
    assert f"retry 1/3 runs on {retry_host}" in out and "Stage 'a' is cached - skipping run" in out, out[-4000:]

    runs = json.loads(_dvcray("runs", "--json", env=client.env, cwd=project).stdout)
    [mine] = [r for r in runs if r["exp_name"] == "survivor"]
    assert [(a["node"], a["state"]) for a in mine["attempts"]] == [(victim.hostname, "LOST"),
                                                                   (retry_host, "SUCCEEDED")], mine
    logs = _dvcray("logs", mine["run_id"], env=client.env, cwd=project)
    assert logs.returncode == 0, _out(logs)
    assert logs.stdout.index(f"STAGE-B on {victim.hostname} from epoch 0") < logs.stdout.index(
        f"STAGE-B on {retry_host} from epoch {resumed}"), logs.stdout[-4000:]

    measured = {
        "stages_rerun": count(found, "a") - 1,
        "epochs_before_loss": epochs_before,
        "resumed_after_epoch": resumed,
        "epochs_redone": max(0, epochs_before - resumed),
        "loss_to_lost_line_s": (lines.first("lost (its node", lost_at) or lost_at) - lost_at,
        "loss_to_retry_first_line_s": (lines.first("attempt 2 of at most", lost_at) or lost_at) - lost_at,
        "loss_to_stage_resumed_s": (lines.first("STAGE-B on", lost_at) or lost_at) - lost_at,
    }
    print(f"\nretry on the bed: {measured}")
    if os.environ.get("DVCRAY_BENCH_OUT"):
        Path(os.environ["DVCRAY_BENCH_OUT"]).write_text(json.dumps(measured))
