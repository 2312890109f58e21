"""What `dvcray run` costs over a local `dvc exp run`, and over the manual Ray CLI flow.

One small pipeline (one stage that writes a metric), side by side in one run,
interleaved so load elsewhere on the machine hits all alike, with a local Ray
cluster already up (started here in a private HOME, stopped by pid at the end):

- local:    `dvc exp run -n NAME -S x=I` in the project itself
- dvcray:   `dvcray run -n NAME -S x=I` (snapshot, Ray Job, live log, ref fetched home)
- ray CLI:  the tutorial's way by hand: `ray job submit -- bash -c "git clone REPO W &&
            cd W && dvc exp run -n NAME -S x=I"`, then `git fetch W refs/exps/...` home.
            (It runs the last commit, not the workspace, and pushes nothing: it does less.)

Target (issue 3): dvcray's median at most 3 s above the local run's.

    python benchmarks/run_overhead.py [-n 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

STAGE = """\
import json, yaml
x = yaml.safe_load(open("params.yaml"))["x"]
print(f"x={x}", flush=True)
json.dump({"y": x * 2}, open("metrics.json", "w"))
"""
DVC_YAML = """\
stages:
  double:
    cmd: python double.py
    deps: [double.py]
    params: [x]
    metrics:
      - metrics.json:
          cache: false
"""


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode()[-800:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="runs of each (default 5)")
    args = parser.parse_args()

    from dvcray_cli import cluster

    tmp = Path(tempfile.mkdtemp(prefix="dvcray-bench-"))
    home = tmp / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0", "DVC_NO_ANALYTICS": "1", "DVC_STUDIO_OFFLINE": "true",
           "GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
           "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(var, None)
    project = tmp / "project"
    project.mkdir()
    (project / "params.yaml").write_text("x: 1\n")
    (project / "double.py").write_text(STAGE)
    (project / "dvc.yaml").write_text(DVC_YAML)
    for cmd in (["git", "init", "-q", "-b", "main"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "bench"]):
        sh(cmd, project, env)

    saved = os.environ.copy()
    os.environ.update(env)
    try:
        head = cluster.start_head("bench", num_cpus=2, temp_dir=tmp / "ray", env=env,
                                  token_path=home / ".ray" / "auth_token")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    run_env = {**env, "RAY_ADDRESS": head.dashboard_url, "RAY_AUTH_TOKEN": head.token()}
    # The Ray CLI sends the token only in token mode.
    cli_env = {**run_env, "RAY_AUTH_MODE": "token"}
    store = tmp / "store"
    work = tmp / "manual"
    times: dict[str, list[float]] = {"local `dvc exp run`": [], "`dvcray run`": [], "manual `ray job submit`": []}
    try:
        # One warm-up of each, not counted (first imports, first package upload).
        sh([str(BIN / "dvcray"), "run", "-n", "warm", "--store", str(store)], project, run_env)
        for i in range(args.n):
            times["local `dvc exp run`"].append(
                sh(["dvc", "exp", "run", "-q", "-n", f"local-{i}", "-S", f"x={i + 10}"], project, env))
            sh(["git", "checkout", "-q", "--", "."], project, env)
            times["`dvcray run`"].append(
                sh([str(BIN / "dvcray"), "run", "-n", f"dvcray-{i}", "-S", f"x={i + 10}", "--store", str(store)],
                   project, run_env))
            script = (f"rm -rf {work}-{i} && git clone -q {project} {work}-{i} && cd {work}-{i} && "
                      f"dvc exp run -q -n manual-{i} -S x={i + 10}")
            start = time.perf_counter()
            sh([str(BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--", "bash", "-c", script],
               project, cli_env)
            sh(["git", "fetch", "-q", f"{work}-{i}", "+refs/exps/*:refs/exps/*"], project, env)
            times["manual `ray job submit`"].append(time.perf_counter() - start)
    finally:
        cluster.stop_head(head)
        shutil.rmtree(tmp, ignore_errors=True)

    local = statistics.median(times["local `dvc exp run`"])
    rows = ["| how | median (s) | min (s) | max (s) | median over local (s) |", "|---|---|---|---|---|"]
    for name, values in times.items():
        med = statistics.median(values)
        rows.append(f"| {name} | {med:.2f} | {min(values):.2f} | {max(values):.2f} | {med - local:+.2f} |")
    over = statistics.median(times["`dvcray run`"]) - local
    verdict = "met" if over <= 3.0 else "NOT met"
    text = "\n".join([
        f"`dvcray run` overhead, {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"n={args.n} each, local Ray head already up, one-stage pipeline:",
        "",
        *rows,
        "",
        f"Target: at most 3 s over the local run (median): {verdict} ({over:+.2f} s).",
    ])
    print(text)
    out = HERE / "results" / "run_overhead.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
