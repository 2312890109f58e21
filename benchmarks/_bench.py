"""What the benchmarks share: a private HOME and environment, a small committed
DVC project, a Ray head started there (and stopped by pid), and result files."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent

# A one-stage pipeline whose stage sleeps 5 s: the sweep benchmarks' experiment.
SLOW_STAGE = """\
import json, time, yaml
x = yaml.safe_load(open("params.yaml"))["x"]
time.sleep(5)
json.dump({"y": x * 2}, open("metrics.json", "w"))
"""
SLOW_PIPELINE = {
    "params.yaml": "x: 0\n",
    "slow.py": SLOW_STAGE,
    "dvc.yaml": """\
stages:
  slow:
    cmd: python slow.py
    deps: [slow.py]
    params: [x]
    metrics:
      - metrics.json:
          cache: false
""",
}
BIN = Path(sys.executable).parent


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Run a command; return its wall time; stop the benchmark if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode()[-800:]}")
    return elapsed


def workspace(prefix: str, files: dict[str, str]) -> tuple[Path, dict[str, str], Path]:
    """A temp folder with a HOME of its own and a committed DVC project of ``files``.

    Returns the folder, the environment to run tools in, and the project.
    """
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
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
    for rel, text in files.items():
        (project / rel).write_text(text)
    for cmd in (["git", "init", "-q", "-b", "main"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "bench"]):
        sh(cmd, project, env)
    return tmp, env, project


def start_head(tmp: Path, env: dict[str, str], name: str, **options):
    """A local Ray head in ``tmp`` with ``env``'s HOME; returns it and the env that reaches it."""
    from dvcray_cli.clusters import local

    saved = os.environ.copy()
    os.environ.update(env)
    try:
        head = local.start_head(name, temp_dir=tmp / "ray", env=env,
                                  token_path=Path(env["HOME"]) / ".ray" / "auth_token", **options)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return head, {**env, "RAY_ADDRESS": head.dashboard_url, "RAY_AUTH_TOKEN": head.token()}


def load() -> str:
    """The machine's load averages (1, 5, 15 minutes), as ``uptime`` shows them."""
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def table(times: dict[str, list[float]], extra: tuple[str, Callable[[float], str]] | None = None) -> list[str]:
    """Markdown rows: each way's median, min and max seconds, and an ``extra``
    column (header, format of the median) such as the difference to a baseline."""
    header = "| how | median (s) | min (s) | max (s) |" + (f" {extra[0]} |" if extra else "")
    rows = [header, "|---" * header.count(" |") + "|"]
    for name, values in times.items():
        med = statistics.median(values)
        rows.append(f"| {name} | {med:.2f} | {min(values):.2f} | {max(values):.2f} |"
                    + (f" {extra[1](med)} |" if extra else ""))
    return rows


def write_result(name: str, text: str) -> None:
    print(text)
    out = HERE / "results" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")


def refs(project: Path, prefix: str) -> int:
    """How many experiment refs named ``prefix...`` the project has."""
    out = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], cwd=project,
                         capture_output=True, text=True).stdout.split()
    return sum(1 for r in out if r.rsplit("/", 1)[-1].startswith(prefix))


def drain_dvc_queue(project: Path, env: dict[str, str], tag: str, count: int, jobs: int, start: float,
                    limit_s: float) -> float:
    """``dvc queue start -j JOBS``, then wait until ``count`` experiments ``TAG-*`` exist:
    the seconds since ``start``. The queue's workers stay up until told; they are
    stopped after, so the next round starts clean."""
    worker = subprocess.Popen(["dvc", "queue", "start", "-j", str(jobs)], cwd=project, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while refs(project, f"{tag}-") < count:
        if time.perf_counter() - start > limit_s:
            raise SystemExit(f"DVC's queue did not finish {count} experiments in {limit_s:.0f} s")
        time.sleep(0.1)
    elapsed = time.perf_counter() - start
    worker.wait()
    subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=project, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return elapsed
