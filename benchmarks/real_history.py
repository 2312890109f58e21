"""Many runs in a row in a real repository with a long history, against a local `dvc exp run`.

The repository is DVC's own (iterative/dvc: about 9,500 commits, 590 files), or any
other given by path; it is cloned into a temp folder, a one-stage pipeline is added
and committed, and a local Ray head is started there (private HOME, stopped by pid
at the end). Then, after one warm-up of each (not counted: the runner service starts
and the cluster's copy of the history is made), `-n` rounds, each with a parameter
value no run used before, side by side in one run:

- local:  `dvc exp run -n local-I -S x=V` in the clone itself
- dvcray: `dvcray run -n run-I -S x=V` (no new commit between runs)

For each dvcray run it keeps the wall time of the whole command and the cluster-side
timings its `result.json` carries (`restore`, `exp_run`, and their CPU seconds), so a
cost that grows with every run shows where it grows.

Targets (issue 22): the last run within 1.1x the second; dvcray's median within
+0.3 s of the local run's median.

Getting the repository (not shipped with dvcray, and CI does not run benchmarks):

    git clone https://github.com/iterative/dvc /tmp/dvc-src
    python benchmarks/real_history.py --repo /tmp/dvc-src [-n 50]

(or `DVCRAY_BENCH_REPO=/tmp/dvc-src`). Only the branch checked out there is used.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path

from _bench import BIN, load, private_home, sh, start_head, write_result
from run_overhead import DVC_YAML, STAGE


def clone(source: Path, tmp: Path, env: dict[str, str]) -> Path:
    """The repository's checked-out branch, cloned, with the pipeline committed on top."""
    project = tmp / "repo"
    branch = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=source, capture_output=True,
                            text=True).stdout.strip()
    args = ["git", "clone", "-q", "--no-local", "--single-branch"] + (["-b", branch] if branch not in ("", "HEAD")
                                                                         else [])
    sh(args + [str(source), str(project)], tmp, env)
    if not (project / ".dvc").is_dir():
        sh(["dvc", "init", "-q"], project, env)
    for rel, text in {"params.yaml": "x: 1\n", "double.py": STAGE, "dvc.yaml": DVC_YAML}.items():
        (project / rel).write_text(text)
    sh(["git", "add", "-A"], project, env)
    sh(["git", "commit", "-q", "-m", "a one-stage pipeline"], project, env)
    return project


def result_of(store: Path, seen: set[str]) -> dict:
    """The result.json of the run that appeared in the store since ``seen``."""
    runs = store / "dvcray" / "runs"
    new = [p for p in runs.iterdir() if p.name not in seen and (p / "result.json").exists()]
    seen.update(p.name for p in runs.iterdir())
    return json.loads((new[0] / "result.json").read_text()) if len(new) == 1 else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=50, help="runs of each (default 50)")
    parser.add_argument("--repo", default=os.environ.get("DVCRAY_BENCH_REPO"),
                        help="a clone of a repository with a long history (default: $DVCRAY_BENCH_REPO)")
    args = parser.parse_args()
    if not args.repo or not Path(args.repo).is_dir():
        raise SystemExit("Give a repository with a long history: --repo PATH or DVCRAY_BENCH_REPO "
                         "(git clone https://github.com/iterative/dvc /tmp/dvc-src).")

    tmp, env = private_home("dvcray-real-")
    project = clone(Path(args.repo), tmp, env)
    commits = int(subprocess.run(["git", "rev-list", "--count", "HEAD"], cwd=project, capture_output=True,
                                 text=True).stdout)
    files = len(subprocess.run(["git", "ls-files"], cwd=project, capture_output=True, text=True).stdout.split())
    head, run_env = start_head(tmp, env, "bench-real", num_cpus=2)
    store = tmp / "store"
    dvcray = str(BIN / "dvcray")
    local: list[float] = []
    runs: list[tuple[float, dict]] = []
    seen: set[str] = set()
    before = load()
    try:
        sh([dvcray, "run", "-n", "warm", "-S", "x=2", "--store", str(store)], project, run_env)
        result_of(store, seen)
        sh(["dvc", "exp", "run", "-q", "-n", "local-warm", "-S", "x=3"], project, env)
        sh(["git", "checkout", "-q", "--", "."], project, env)
        for i in range(args.n):
            local.append(sh(["dvc", "exp", "run", "-q", "-n", f"local-{i}", "-S", f"x={1000 + i}"], project, env))
            sh(["git", "checkout", "-q", "--", "."], project, env)
            wall = sh([dvcray, "run", "-n", f"run-{i}", "-S", f"x={5000 + i}", "--store", str(store)], project,
                      run_env)
            runs.append((wall, result_of(store, seen).get("timings") or {}))
            print(f"{i}: local {local[-1]:.2f} s, dvcray {wall:.2f} s {runs[-1][1]}", flush=True)
    finally:
        head.stop()
        after = load()
        shutil.rmtree(tmp, ignore_errors=True)
    write_result("real_history.md", report(args, commits, files, local, runs, before, after))


def report(args, commits: int, files: int, local: list[float], runs: list[tuple[float, dict]], before: str,
           after: str) -> str:
    walls = [w for w, _ in runs]

    def step(i: int, key: str) -> str:
        value = runs[i][1].get(key)
        return f"{value:.2f}" if isinstance(value, (int, float)) else "-"

    picked = sorted({0, 1, 2, len(runs) // 4, len(runs) // 2, 3 * len(runs) // 4, len(runs) - 2, len(runs) - 1}
                    & set(range(len(runs))))
    rows = ["| run | dvcray (s) | local (s) | restore (s) | restore CPU (s) | exp_run (s) | exp_run CPU (s) |",
            "|---|---|---|---|---|---|---|"]
    for i in picked:
        rows.append(f"| {i + 1} | {walls[i]:.2f} | {local[i]:.2f} | {step(i, 'restore')} | {step(i, 'restore_cpu')} "
                    f"| {step(i, 'exp_run')} | {step(i, 'exp_run_cpu')} |")
    fifth = max(1, len(runs) // 5)
    spans = [f"runs {k + 1}-{min(k + fifth, len(runs))}: dvcray {statistics.median(walls[k:k + fifth]):.2f} s, "
             f"local {statistics.median(local[k:k + fifth]):.2f} s" for k in range(0, len(runs), fifth)]
    over = statistics.median(walls) - statistics.median(local)
    lines = [
        f"{args.n} runs in a row in a real repository ({commits} commits, {files} files: {Path(args.repo).name}) "
        f"with a one-stage pipeline, local `dvc exp run` and `dvcray run` alternating, local Ray head already up, "
        f"after one warm-up of each, {datetime.date.today()}, {os.cpu_count()} cores; load average {before} before, "
        f"{after} after:",
        "",
        *rows,
        "",
        "Medians by fifths: " + "; ".join(spans) + ".",
        "",
    ]
    if len(runs) >= 2:
        ratio = walls[-1] / walls[1]
        steady = statistics.median(walls[-5:]) / statistics.median(walls[1:6])
        lines.append(f"Target: the last run within 1.1x the second: {'met' if ratio <= 1.1 else 'NOT met'} "
                     f"({walls[-1]:.2f} s against {walls[1]:.2f} s, {ratio:.2f}x; median of the last 5 against "
                     f"runs 2-6: {steady:.2f}x).")
    lines.append(f"Target: dvcray within +0.3 s of the local run (medians): {'met' if over <= 0.3 else 'NOT met'} "
                 f"({statistics.median(walls):.2f} s against {statistics.median(local):.2f} s, {over:+.2f} s).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
