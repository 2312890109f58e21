"""A 4-experiment sweep of a 5-second stage: `dvcray run -S x=1,2,3,4` against DVC's queue.

Side by side in one run, alternating, on this machine:

- DVC's queue: `dvc exp run --queue -S x=I` four times, then `dvc queue start -j 4`,
  timed from the first queue call until the 4 experiment refs exist (watched with
  `git for-each-ref`, not `dvc queue status`, which costs ~3 s of CPU per call here
  and would slow what it measures).
- dvcray: `dvcray run -n NAME -S x=1,2,3,4` against a local Ray head already up
  (started here in a private HOME, stopped by pid at the end), timed until it
  exits, i.e. until all 4 experiments are in the repo.

Target (issue 6): never slower than DVC's queue; aim for 0.8 of its wall time.

    python benchmarks/sweep.py [-n 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

from _bench import BIN, SLOW_PIPELINE, drain_dvc_queue, refs, sh, start_head, table, workspace, write_result



def dvc_queue(project: Path, env: dict[str, str], tag: str, values: list[int]) -> float:
    start = time.perf_counter()
    for x in values:
        sh(["dvc", "exp", "run", "--queue", "-q", "-n", f"{tag}-{values.index(x) + 1}", "-S", f"x={x}"],
           project, env)
    return drain_dvc_queue(project, env, tag, 4, 4, start, 300)


def dvcray(project: Path, env: dict[str, str], tag: str, store: Path, values: list[int]) -> float:
    start = time.perf_counter()
    sh([str(BIN / "dvcray"), "run", "-n", tag, "-S", "x=" + ",".join(map(str, values)), "--store", str(store)],
       project, env)
    elapsed = time.perf_counter() - start
    if refs(project, f"{tag}-") != 4:
        raise SystemExit(f"dvcray did not bring 4 experiments home for {tag}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3, help="rounds of each (default 3)")
    args = parser.parse_args()

    tmp, env, project = workspace("dvcray-sweep-", SLOW_PIPELINE)
    env["CI"] = "true"
    head, run_env = start_head(tmp, env, "bench-sweep")
    store = tmp / "store"
    times: dict[str, list[float]] = {"DVC queue (`dvc queue start -j 4`)": [], "`dvcray run -S x=1,2,3,4`": []}
    try:
        sh([str(BIN / "dvcray"), "run", "-n", "warm", "-S", "x=0", "--store", str(store)], project, run_env)
        for i in range(args.n):
            # Values never seen before by either tool: no run-cache hit skips a stage.
            times["DVC queue (`dvc queue start -j 4`)"].append(
                dvc_queue(project, env, f"q{i}", [100 * i + k for k in range(1, 5)]))
            times["`dvcray run -S x=1,2,3,4`"].append(
                dvcray(project, run_env, f"r{i}", store, [100 * i + 50 + k for k in range(1, 5)]))
    finally:
        head.stop()
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=project, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)

    queue = statistics.median(times["DVC queue (`dvc queue start -j 4`)"])
    rows = table(times, ("vs DVC queue", lambda med: f"{med / queue:.2f}x"))
    ratio = statistics.median(times["`dvcray run -S x=1,2,3,4`"]) / queue
    verdict = ("met (aim of 0.8x met too)" if ratio <= 0.8 else "met (never slower), aim of 0.8x not met"
               if ratio <= 1.0 else "NOT met: slower than DVC's queue")
    text = "\n".join([
        f"4 experiments of a 5 s stage, {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"n={args.n} rounds each, alternating; dvcray against a local Ray head already up:",
        "",
        *rows,
        "",
        f"Target: never slower than DVC's queue, aim 0.8x: {verdict} ({ratio:.2f}x).",
    ])
    write_result("sweep.md", text)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
