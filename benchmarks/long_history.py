"""A run from a repository with a long history against one from a tiny repository.

Two projects with the same one-stage pipeline, side by side on one local Ray head
already up (started here in a private HOME, stopped by pid at the end):

- tiny: one commit.
- long: ~9,500 commits of random-content files before the pipeline's commit
  (a bundle of HEAD's history of about 20 MiB, as in issue 12's measurement).

Each project runs once first (not counted: the cluster's copy of its history is
made then); then runs alternate, each with parameter values no run used before.
Target (issue 12): a long-history run after the first costs at most 1.2x a tiny one.

    python benchmarks/long_history.py [-n 5] [--commits 9500]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
from pathlib import Path

from _bench import BIN, load, sh, start_head, table, workspace, write_result
from run_overhead import DVC_YAML, STAGE


def grow_history(project: Path, env: dict[str, str], commits: int, blob_bytes: int = 2048) -> int:
    """Put ``commits`` commits of random files under the project's history (git fast-import),
    then the pipeline's own commit on top. Returns the bytes of a bundle of HEAD."""
    import random

    rng = random.Random(12)
    lines = []
    for i in range(commits):
        data = rng.randbytes(blob_bytes)
        lines.append(b"commit refs/heads/main\n")
        lines.append(f"committer Bench <bench@example.com> {1_600_000_000 + i} +0000\n".encode())
        message = f"history {i}\n".encode()
        lines.append(b"data %d\n%s" % (len(message), message))
        if i == 0:
            lines.append(b"from refs/heads/main^0\n")
        lines.append(f"M 644 inline history/f{i % 97}.bin\n".encode())
        lines.append(b"data %d\n%s\n" % (len(data), data))
    subprocess.run(["git", "fast-import", "--quiet"], cwd=project, env=env, input=b"".join(lines), check=True)
    sh(["git", "reset", "-q", "--hard", "main"], project, env)
    bundle = project.parent / "size.bundle"
    sh(["git", "bundle", "create", "-q", str(bundle), "HEAD"], project, env)
    size = bundle.stat().st_size
    bundle.unlink()
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="runs of each (default 5)")
    parser.add_argument("--commits", type=int, default=9500)
    args = parser.parse_args()

    files = {"params.yaml": "x: 1\n", "double.py": STAGE, "dvc.yaml": DVC_YAML}
    tmp, env, tiny = workspace("dvcray-long-", files)
    long_ = tmp / "long"
    long_.mkdir()
    sh(["git", "init", "-q", "-b", "main"], long_, env)
    sh(["git", "commit", "-q", "--allow-empty", "-m", "root"], long_, env)
    bundle_bytes = grow_history(long_, env, args.commits)
    sh(["dvc", "init", "-q"], long_, env)
    for rel, text in files.items():
        (long_ / rel).write_text(text)
    sh(["git", "add", "-A"], long_, env)
    sh(["git", "commit", "-q", "-m", "pipeline"], long_, env)
    count = int(subprocess.run(["git", "rev-list", "--count", "HEAD"], cwd=long_, capture_output=True,
                               text=True).stdout)

    head, run_env = start_head(tmp, env, "bench-long", num_cpus=2)
    store = tmp / "store"
    names = {"tiny repository (1 commit)": tiny, f"long history ({count} commits, {bundle_bytes / 2**20:.1f} MiB "
             "bundle)": long_}
    times: dict[str, list[float]] = {k: [] for k in names}
    before = load()
    try:
        for key, project in names.items():  # first runs: the cluster's copy of each history
            sh([str(BIN / "dvcray"), "run", "-n", "first", "-S", "x=1", "--store", str(store)], project, run_env)
        for i in range(args.n):
            for key, project in names.items():
                times[key].append(sh([str(BIN / "dvcray"), "run", "-n", f"r{i}", "-S", f"x={i + 100}",
                                      "--store", str(store)], project, run_env))
    finally:
        head.stop()
        after = load()
        shutil.rmtree(tmp, ignore_errors=True)

    tiny_med = statistics.median(times[next(iter(names))])
    rows = table(times, ("vs tiny", lambda med: f"{med / tiny_med:.2f}x"))
    ratio = statistics.median(times[list(names)[1]]) / tiny_med
    text = "\n".join([
        f"A run from a long-history repository against a tiny one, {datetime.date.today()}, {os.cpu_count()} cores, "
        f"n={args.n} each, alternating, local Ray head already up, after each project's first run; "
        f"load average {before} before, {after} after:",
        "",
        *rows,
        "",
        f"Target: at most 1.2x the tiny repository's run: {'met' if ratio <= 1.2 else 'NOT met'} ({ratio:.2f}x).",
    ])
    write_result("long_history.md", text)


if __name__ == "__main__":
    main()
