"""Start-up time of `dvcray --help` beside the tools a user would use instead.

Runs `dvcray --help`, `dvc --help` and `ray --help` N times each, interleaved (so
a burst of load elsewhere on the machine hits all three alike), prints a Markdown
table of median and min wall time, and writes it to benchmarks/results/startup.md.

    python benchmarks/startup.py [-n 10]

The commands are the console scripts beside this interpreter (the venv's).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
TOOLS = {"dvcray": "dvcray", "dvc": "dvc", "ray": "ray"}


def time_once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="runs per command (default 10)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "startup.md")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as home:
        # Same quiet environment for all three: no telemetry, no update checks,
        # and a HOME of their own (nothing read from or written to the user's).
        env = {**os.environ, "HOME": home, "DVC_NO_ANALYTICS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        commands = {tool: [str(BIN / exe), "--help"] for tool, exe in TOOLS.items()}
        for argv in commands.values():  # warm the OS file cache; not counted
            time_once(argv, env)
        times: dict[str, list[float]] = {tool: [] for tool in commands}
        for _ in range(args.n):
            for tool, argv in commands.items():
                times[tool].append(time_once(argv, env))

    load_after = os.getloadavg()[0]
    base = statistics.median(times["dvcray"])
    rows = ["| command | median (s) | min (s) | median vs dvcray |", "| --- | ---: | ---: | ---: |"]
    for tool, samples in times.items():
        median = statistics.median(samples)
        rows.append(f"| `{tool} --help` | {median:.3f} | {min(samples):.3f} | {median / base:.1f}x |")
    versions = ", ".join(f"{pkg} {version(pkg)}" for pkg in ("dvcray", "dvc", "ray"))
    note = (f"{args.n} runs each, interleaved, after one warm-up run; "
            f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, {versions}; 1-minute load average "
            f"{load_before:.2f} before, {load_after:.2f} after (other work on the machine).")
    table = "\n".join(rows)
    print(table)
    print()
    print(note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# Start-up time\n\n{table}\n\n{note}\n")
    print(f"\nWrote {args.out.relative_to(Path.cwd()) if args.out.is_relative_to(Path.cwd()) else args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
