"""What `dvcray run` costs over a local `dvc exp run`, and over the manual Ray CLI flow.

One small pipeline (one stage that writes a metric), side by side in one run,
interleaved so load elsewhere on the machine hits all alike, with a local Ray
cluster already up (started here in a private HOME, stopped by pid at the end):

- local:    `dvc exp run -n NAME -S x=I` in the project itself
- dvcray:   `dvcray run -n NAME -S x=I` (snapshot, Ray Job, live log, ref fetched home)
- ray CLI:  the tutorial's way by hand: `ray job submit -- bash -c "git clone REPO W &&
            cd W && dvc exp run -n NAME -S x=I"`, then `git fetch W refs/exps/...` home.
            (It runs the last commit, not the workspace, and pushes nothing: it does less.)

Target (issue 12): dvcray's median at most 1.0 s above the local run's (issue 3's was 3 s).
The warm-up run starts the cluster's runner service (once per cluster).

    python benchmarks/run_overhead.py [-n 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import time

from _bench import BIN, load, sh, start_head, table, workspace, write_result

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="runs of each (default 5)")
    args = parser.parse_args()

    tmp, env, project = workspace("dvcray-bench-", {"params.yaml": "x: 1\n", "double.py": STAGE,
                                                    "dvc.yaml": DVC_YAML})
    head, run_env = start_head(tmp, env, "bench", num_cpus=2)
    # The Ray CLI sends the token only in token mode.
    cli_env = {**run_env, "RAY_AUTH_MODE": "token"}
    store = tmp / "store"
    work = tmp / "manual"
    times: dict[str, list[float]] = {"local `dvc exp run`": [], "`dvcray run`": [], "manual `ray job submit`": []}
    before = load()
    try:
        # One warm-up of each, not counted (first imports, first package upload, the runner service).
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
        head.stop()
        after = load()
        shutil.rmtree(tmp, ignore_errors=True)

    local = statistics.median(times["local `dvc exp run`"])
    rows = table(times, ("median over local (s)", lambda med: f"{med - local:+.2f}"))
    over = statistics.median(times["`dvcray run`"]) - local
    verdict = "met" if over <= 1.0 else "NOT met"
    text = "\n".join([
        f"`dvcray run` overhead, {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"n={args.n} each, local Ray head already up, one-stage pipeline; load average {before} before, "
        f"{after} after:",
        "",
        *rows,
        "",
        f"Target: at most 1.0 s over the local run (median): {verdict} ({over:+.2f} s).",
    ])
    write_result("run_overhead.md", text)


if __name__ == "__main__":
    main()
