"""Many experiments of a one-stage pipeline: 40 against DVC's queue, and 200.

One project (the one-stage pipeline of run_overhead.py), one local Ray head already up
(started here in a private HOME, stopped by pid at the end), CI mode (no live table):

- 40, DVC's queue: `dvc exp run --queue -S x=A,...` (one call queues all 40), then
  `dvc queue start -j 2`, timed from the queue call until the 40 experiment refs exist
  (watched with `git for-each-ref`, not `dvc queue status`).
- 40, dvcray: `dvcray run -n NAME -S x=A,...` (its default: at most 8 at once on this
  head), timed until it exits, i.e. until all 40 are in the repo.
- 200, dvcray: the same with 200 values, once (DVC's queue is not run at this size:
  over 3 minutes here); its wall time and the peak RSS and CPU time of the client
  process (GNU time).

Rounds alternate; every value of x is new, so no run-cache hit skips a stage.
Target (issue 12): 40 in at most 0.5x DVC's queue's time; 200 complete (every
experiment home), with the client's peak RSS reported.

    python benchmarks/many.py [-n 2] [--big 200]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from _bench import BIN, drain_dvc_queue, load, refs, sh, start_head, table, workspace, write_result
from run_overhead import DVC_YAML, STAGE


def dvc_queue(project: Path, env: dict[str, str], tag: str, values: list[int]) -> float:
    start = time.perf_counter()
    sh(["dvc", "exp", "run", "--queue", "-q", "-n", tag, "-S", "x=" + ",".join(map(str, values))], project, env)
    return drain_dvc_queue(project, env, tag, len(values), 2, start, 900)


def dvcray(project: Path, env: dict[str, str], tag: str, store: Path, values: list[int]) -> tuple[float, str]:
    """Wall time, and GNU time's ``peak_rss_kib user_s sys_s`` of the client."""
    report = project.parent / f"{tag}.time"
    start = time.perf_counter()
    sh(["/usr/bin/time", "-o", str(report), "-f", "%M %U %S", str(BIN / "dvcray"), "run", "-n", tag,
        "-S", "x=" + ",".join(map(str, values)), "--store", str(store)], project, env)
    elapsed = time.perf_counter() - start
    home = refs(project, f"{tag}-")
    if home != len(values):
        raise SystemExit(f"dvcray brought {home} of {len(values)} experiments home for {tag}")
    return elapsed, report.read_text().strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2, help="rounds of 40 of each (default 2)")
    parser.add_argument("--big", type=int, default=200, help="the large sweep's size (0: skip it)")
    args = parser.parse_args()

    tmp, env, project = workspace("dvcray-many-", {"params.yaml": "x: 1\n", "double.py": STAGE,
                                                   "dvc.yaml": DVC_YAML})
    env["CI"] = "true"
    head, run_env = start_head(tmp, env, "bench-many", num_cpus=2)
    store = tmp / "store"
    times: dict[str, list[float]] = {"DVC queue (`dvc queue start -j 2`), 40": [], "`dvcray run`, 40": []}
    big: tuple[float, str] | None = None
    before = load()
    try:
        sh([str(BIN / "dvcray"), "run", "-n", "warm", "-S", "x=0", "--store", str(store)], project, run_env)
        for i in range(args.n):
            base = 1000 * (i + 1)
            times["DVC queue (`dvc queue start -j 2`), 40"].append(
                dvc_queue(project, env, f"q{i}", [base + k for k in range(40)]))
            times["`dvcray run`, 40"].append(dvcray(project, run_env, f"r{i}", store,
                                                    [base + 500 + k for k in range(40)])[0])
        if args.big:
            big = dvcray(project, run_env, "big", store, [100_000 + k for k in range(args.big)])
    finally:
        head.stop()
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=project, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        after = load()
        shutil.rmtree(tmp, ignore_errors=True)

    queue = statistics.median(times["DVC queue (`dvc queue start -j 2`), 40"])
    ratio = statistics.median(times["`dvcray run`, 40"]) / queue
    lines = [
        f"Many experiments of a one-stage pipeline, {datetime.date.today()}, {os.cpu_count()} cores, n={args.n} "
        f"rounds of 40 each, alternating; dvcray against a local Ray head already up; load average {before} "
        f"before, {after} after:",
        "",
        *table(times, ("vs DVC queue", lambda med: f"{med / queue:.2f}x")),
        "",
        f"Target: 40 experiments in at most 0.5x DVC's queue's time: {'met' if ratio <= 0.5 else 'NOT met'} "
        f"({ratio:.2f}x).",
    ]
    if big is not None:
        rss_kib, user, system = big[1].split()
        lines += ["", f"{args.big} experiments with `dvcray run`: all {args.big} home in {big[0]:.1f} s "
                  f"({big[0] / args.big:.2f} s each); the client's peak RSS {int(rss_kib) / 1024:.0f} MiB, "
                  f"its CPU time {float(user) + float(system):.1f} s."]
    write_result("many.md", "\n".join(lines))


if __name__ == "__main__":
    main()
