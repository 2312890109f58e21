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
from test_run import exp_metrics, exp_refs

pytestmark = pytest.mark.slow

# Each event is an object of its own in the bucket: counts/<salt>/<event>-<unique>.
STAGES = """\
import json, os, socket, sys, time, uuid
from pathlib import Path
import pyarrow.fs, yaml
from dvcray_cli.integrations.storage import run_name, storage_path

params = yaml.safe_load(open("params.yaml"))
fs, root = pyarrow.fs.FileSystem.from_uri(storage_path(None))
bucket = root.split("/", 1)[0]

def mark(event):
    with fs.open_output_stream(f"{bucket}/counts/{params['salt']}/{event}-{uuid.uuid4().hex[:8]}") as f:
        f.write(socket.gethostname().encode())

stage = sys.argv[1]
if stage == "a":
    mark("a")
    Path("a.txt").write_text(f"a {params['salt']}\\n")
elif stage == "b":
    folder = f"{root}/{run_name('b')}"
    try:
        with fs.open_input_stream(f"{folder}/epoch.json") as f:
            start = json.loads(f.read())["epoch"]
    except (FileNotFoundError, OSError):
        start = 0
    mark(f"b-start-{start}")
    print(f"STAGE-B on {socket.gethostname()} from epoch {start}", flush=True)
    fs.create_dir(folder)
    for epoch in range(start + 1, params["epochs"] + 1):
        time.sleep(params["sleep"])
        with fs.open_output_stream(f"{folder}/epoch.json") as f:
            f.write(json.dumps({"epoch": epoch}).encode())
        mark(f"b-epoch-{epoch}")
        print(f"EPOCH {epoch}", flush=True)
    Path("b.txt").write_text(f"b resumed from {start}\\n")
elif stage == "c":
    mark("c")
    json.dump({"b": open("b.txt").read().strip()}, open("c.json", "w"))
"""

PIPELINE = """\
stages:
  a:
    cmd: python stages.py a
    deps: [stages.py]
    params: [salt]
    outs: [a.txt]
  b:
    cmd: python stages.py b
    deps: [stages.py, a.txt]
    params: [epochs, sleep]
    outs: [b.txt]
  c:
    cmd: python stages.py c
    deps: [stages.py, b.txt]
    metrics: [{c.json: {cache: false}}]
"""


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


def _events(client, salt: str) -> dict[str, str]:
    """``{event: host}`` of what the stages counted (one key per time a stage did something)."""
    import boto3

    api = boto3.client("s3", endpoint_url=client.s3, region_name="us-east-1", aws_access_key_id="x",
                       aws_secret_access_key="x")
    prefix = f"counts/{salt}/"
    found = {}
    for page in api.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            found[obj["Key"][len(prefix):]] = api.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read().decode()
    return found


def _count(events: dict[str, str], name: str) -> int:
    """How often event ``name`` happened (``b-epoch``: any epoch of stage b)."""
    names = [key.rsplit("-", 1)[0] for key in events]     # the unique part off
    return sum(1 for n in names if n == name or n.startswith(name + "-"))


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
            events = _events(client, salt)
            if _count(events, "b-epoch") >= 2:
                victim = bed.node(events[next(k for k in events if k.startswith("b-start-0"))])
            time.sleep(0.5)
        assert victim is not None and victim.hostname in workers, "stage b did not reach epoch 2 on a worker"
        bed.kill(victim)          # the machine dies: every process on it, at once
        lost_at = time.monotonic()
        epochs_before = _count(_events(client, salt), "b-epoch")
        stderr = run.stderr.read()
        run.wait(timeout=600)
        lines.thread.join(timeout=10)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if victim is not None:
            bed.start(victim)     # a reboot: the lab's teardown takes it down with the others
    out = lines.text
    assert run.returncode == 0, f"exit {run.returncode}\n{out[-4000:]}\n{stderr[-4000:]}"
    events = _events(client, salt)
    starts = sorted(int(k.split("-")[2]) for k in events if k.startswith("b-start-"))
    assert _count(events, "a") == 1, f"stage a ran again: {sorted(events)}"
    assert _count(events, "c") == 1, sorted(events)
    assert starts[0] == 0 and len(starts) == 2 and starts[1] >= 2, f"stage b did not resume: {sorted(events)}"
    retry_host = events[next(k for k in events if k.startswith(f"b-start-{starts[1]}"))]
    assert retry_host in workers - {victim.hostname}, "the retry ran on the other worker"
    assert any(r.endswith("/survivor") for r in exp_refs(project)), "the experiment is home"
    assert exp_metrics(project, "survivor", "c.json") == {"b": f"b resumed from {starts[1]}"}
    assert f"machine {victim.hostname} lost (its node {victim.ip} died" in out, out[-4000:]
    assert f"retry 1/3 runs on {retry_host}" in out and "Stage 'a' is cached - skipping run" in out, out[-4000:]

    runs = json.loads(_dvcray("runs", "--json", env=client.env, cwd=project).stdout)
    [mine] = [r for r in runs if r["exp_name"] == "survivor"]
    assert [(a["node"], a["state"]) for a in mine["attempts"]] == [(victim.hostname, "LOST"),
                                                                   (retry_host, "SUCCEEDED")], mine
    logs = _dvcray("logs", mine["run_id"], env=client.env, cwd=project)
    assert logs.returncode == 0, _out(logs)
    assert logs.stdout.index(f"STAGE-B on {victim.hostname} from epoch 0") < logs.stdout.index(
        f"STAGE-B on {retry_host} from epoch {starts[1]}"), logs.stdout[-4000:]

    measured = {
        "stages_rerun": _count(events, "a") - 1,
        "epochs_before_loss": epochs_before,
        "resumed_after_epoch": starts[1],
        "epochs_redone": max(0, epochs_before - starts[1]),
        "loss_to_lost_line_s": (lines.first("lost (its node", lost_at) or lost_at) - lost_at,
        "loss_to_retry_first_line_s": (lines.first("attempt 2 of at most", lost_at) or lost_at) - lost_at,
        "loss_to_stage_resumed_s": (lines.first("STAGE-B on", lost_at) or lost_at) - lost_at,
    }
    print(f"\nretry on the bed: {measured}")
    if os.environ.get("DVCRAY_BENCH_OUT"):
        Path(os.environ["DVCRAY_BENCH_OUT"]).write_text(json.dumps(measured))
