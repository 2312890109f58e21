"""How fast dvcray reacts, where the README says "at once": `dvcray run --detach` returning,
`dvcray stop` of a running run, and `dvcray run` noticing that its cluster died.

The functional tests assert that these happen, and in order; how long they take is
measured here, side by side with the Ray CLI a user would use instead, in one run,
interleaved (a local Ray head started here in a private HOME, stopped by pid at the end):

- detach:  `dvcray run --detach` against `ray job submit --no-wait` of the same stage
           (which sends the last commit only, no snapshot, nothing saved);
- stop:    `dvcray stop RUN` (the runner saves log, outputs and result first) against
           `ray job stop JOB` of a Ray Job running the same stage;
- death:   from SIGKILL of the head's GCS until `dvcray run` exits 3 (a head of its own
           each round; DVCRAY_RECONNECT_TIMEOUT_S is 600 s, so only noticing the death ends it).

    python benchmarks/reactions.py [-n 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from _bench import BIN, load, sh, start_head, table, workspace, write_result

STAGE = """\
import time, yaml
x = yaml.safe_load(open("params.yaml"))["x"]
print(f"STAGE-STARTED x={x}", flush=True)
time.sleep(120)
open("out.txt", "w").write(str(x))
"""
DVC_YAML = """\
stages:
  wait:
    cmd: python wait.py
    deps: [wait.py]
    params: [x]
    outs: [out.txt]
"""


def _run_id(out: str) -> str:
    return json.loads(out)["run_id"]


def _until(predicate, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not happen in {limit_s:.0f} s")
        time.sleep(0.05)


def _log(store: Path, run_id: str) -> str:
    parts = store / "dvcray" / "runs" / run_id / "log.parts"
    return b"".join(p.read_bytes() for p in sorted(parts.glob("[0-9]*"))).decode(errors="replace") \
        if parts.is_dir() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args()

    tmp, env, project = workspace("dvcray-bench-react-", {"params.yaml": "x: 0\n", "wait.py": STAGE,
                                                          "dvc.yaml": DVC_YAML})
    head, run_env = start_head(tmp, env, "bench-react", num_cpus=4)
    cli_env = {**run_env, "RAY_AUTH_MODE": "token"}
    store = tmp / "store"
    dvcray = str(BIN / "dvcray")
    times: dict[str, list[float]] = {"`dvcray run --detach`": [], "`ray job submit --no-wait`": [],
                                     "`dvcray stop` (saves first)": [], "`ray job stop`": [],
                                     "`dvcray run` notices its GCS died": []}
    before = load()
    try:
        sh([dvcray, "run", "-n", "warm", "-S", "x=1", "--detach", "--store", str(store)], project, run_env)
        for i in range(args.n):
            x = int(time.time() * 1000) % 10 ** 9   # a value no earlier run used
            start = time.perf_counter()
            proc = subprocess.run([dvcray, "run", "-n", f"d{i}-{x}", "-S", f"x={x}", "--detach", "--json",
                                   "--store", str(store)], cwd=project, env=run_env, capture_output=True, text=True)
            times["`dvcray run --detach`"].append(time.perf_counter() - start)
            run_id = _run_id(proc.stdout)
            job = f"bench-{i}-{x}"
            times["`ray job submit --no-wait`"].append(
                sh([str(BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--submission-id", job,
                    "--no-wait", "--working-dir", str(project), "--", "python", "wait.py"], project, cli_env))
            _until(lambda: "STAGE-STARTED" in _log(store, run_id), 120, "the dvcray stage's start")
            times["`dvcray stop` (saves first)"].append(sh([dvcray, "stop", run_id], project, run_env))
            time.sleep(2)   # the Ray Job's stage has started too (it needs no clone)
            times["`ray job stop`"].append(
                sh([str(BIN / "ray"), "job", "stop", "--address", head.dashboard_url, job], project, cli_env))
            times["`dvcray run` notices its GCS died"].append(_death(tmp / f"death-{i}", env, project, x))
    finally:
        head.stop()
        after = load()
        shutil.rmtree(tmp, ignore_errors=True)

    text = "\n".join([
        f"How fast dvcray reacts, {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"n={args.n} each, local Ray head; load average {before} before, {after} after:",
        "",
        *table(times),
        "",
        "`dvcray run --detach` also snapshots the workspace and records the run; `dvcray stop` returns once the "
        "runner has saved the log, outputs and result.json to the store. A dead GCS is noticed by the client's "
        "check every few seconds (`DVCRAY_RECONNECT_TIMEOUT_S` only bounds a cluster that stops answering).",
    ])
    write_result("reactions.md", text)


def _death(folder: Path, env: dict[str, str], project: Path, x: int) -> float:
    """A head of its own; a run on it; SIGKILL to its GCS once the stage runs: seconds until
    `dvcray run` exits 3."""
    import psutil

    folder.mkdir()
    # Ray's socket paths must stay short: its temp dir goes right under /tmp.
    ray_dir = Path(tempfile.mkdtemp(prefix="dvb-"))
    home = folder / "home"
    home.mkdir()
    own_env = {**env, "HOME": str(home)}
    head, run_env = start_head(ray_dir, own_env, f"bench-death-{x}", num_cpus=2)
    store = folder / "store"
    try:
        proc = subprocess.Popen([str(BIN / "dvcray"), "run", "-n", f"dies-{x}", "-S", f"x={x + 1}", "--store",
                                 str(store)], cwd=project, env={**run_env, "DVCRAY_RECONNECT_TIMEOUT_S": "600"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _until(lambda: any("STAGE-STARTED" in _log(store, r.name)
                           for r in (store / "dvcray" / "runs").glob("dvcray-*")), 120, "the stage's start")
        [gcs] = [p for p in head.pids() if psutil.Process(p).name() == "gcs_server"]
        start = time.perf_counter()
        os.kill(gcs, signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
        elapsed = time.perf_counter() - start
        if proc.returncode != 3:
            raise SystemExit(f"`dvcray run` exited {proc.returncode}, not 3, when its GCS died: {err[-800:]}")
        return elapsed
    finally:
        head.stop()
        shutil.rmtree(ray_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
