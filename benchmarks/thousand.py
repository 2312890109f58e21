"""A thousand experiments, and `dvcray runs` on a store of five thousand runs (issue 22, item 3).

1. A sweep of 1,000 experiments of the one-stage pipeline of run_overhead.py on a local
   Ray head already up (started here in a private HOME, stopped by pid at the end), CI
   mode: `dvcray run -n big -S x=A,B,...`, timed until it exits, i.e. until all 1,000
   are home (counted after with `git for-each-ref`). The client's peak RSS and CPU time
   come from GNU time (as many.py measured 200); the runner service's RSS is read from
   /proc every half second while the sweep runs (its start, peak, and end, and the peak
   of each quarter of the sweep, to show whether it grows with the experiments).
2. `dvcray runs` in a clone whose DVC default remote is an S3 bucket on a moto server on
   127.0.0.1 holding 5,000 runs of the project: 50 sweeps of 100, each run's
   ``manifest.json``, ``status.json`` and ``result.json`` written by dvcray's own
   ``Store`` from its own records (``Manifest``, ``RunStatus``, ``RunResult``), as a
   runner leaves them. Measured from a clone that has no record of them (they come from
   another clone: found in the store) and from the clone that submitted them (5,000
   records in ``.dvcray/runs``), three times each, the median kept.

Targets: all 1,000 home; client peak RSS at most 150 MiB; the service's RSS bounded;
seconds per experiment no worse than the 200-experiment figure (0.33 s, many.py);
`dvcray runs` within 2 s.

    python benchmarks/thousand.py [-n 1000] [--runs 5000] [--skip-sweep] [--skip-listing]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import secrets
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

from _bench import BIN, load, moto_server, refs, sh, start_head, workspace, write_result
from run_overhead import DVC_YAML, STAGE

BEFORE_PER_EXP = 0.33  # seconds per experiment of 200 (benchmarks/results/many.md)
FILES = {"params.yaml": "x: 1\n", "double.py": STAGE, "dvc.yaml": DVC_YAML}


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def service_pid(head) -> int:
    """The runner service's process among the head's (``python -m dvcray_cli.service``)."""
    for pid in head.pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dvcray_cli.service" in cmd:
            return pid
    raise SystemExit("no runner service among the head's processes")


class Sampler(threading.Thread):
    """The RSS of one process, every ``every`` seconds, until stopped."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            value = rss_kib(self.pid)
            if value is not None:
                self.samples.append((time.perf_counter(), value))
            self.done.wait(self.every)


def sweep(n: int) -> list[str]:
    tmp, env, project = workspace("dvcray-thousand-", FILES)
    env["CI"] = "true"
    head, run_env = start_head(tmp, env, "bench-thousand", num_cpus=2)
    store = tmp / "store"
    report = tmp / "client.time"
    before = load()
    try:
        sh([str(BIN / "dvcray"), "run", "-n", "warm", "-S", "x=0", "--store", str(store)], project, run_env)
        pid = service_pid(head)
        sampler = Sampler(pid)
        sampler.start()
        start = time.perf_counter()
        base = 10_000_000 + secrets.randbelow(10_000) * 10_000  # values no earlier run used
        sh(["/usr/bin/time", "-o", str(report), "-f", "%M %U %S", str(BIN / "dvcray"), "run", "-n", "big",
            "-S", "x=" + ",".join(str(base + k) for k in range(n)), "--store", str(store)], project, run_env)
        elapsed = time.perf_counter() - start
        time.sleep(1.0)
        sampler.done.set()
        sampler.join()
        alive = rss_kib(pid) is not None
        home = refs(project, "big-")
        peak_kib, user, system = report.read_text().strip().splitlines()[-1].split()
    finally:
        head.stop()
        after = load()
        shutil.rmtree(tmp, ignore_errors=True)
    samples = sampler.samples
    mib = [kib / 1024 for _, kib in samples]
    quarters = []
    if samples:
        t0 = samples[0][0]
        for q in range(4):
            part = [kib / 1024 for t, kib in samples
                    if q * elapsed / 4 <= t - t0 < (q + 1) * elapsed / 4 or (q == 3 and t - t0 >= elapsed)]
            quarters.append(f"{max(part):.0f}" if part else "-")
    per_exp = elapsed / n
    client_mib = int(peak_kib) / 1024
    bounded = bool(quarters) and quarters[-1] != "-" and quarters[1] != "-" and \
        float(quarters[-1]) <= 1.10 * max(float(q) for q in quarters[:2])
    return [
        f"{n} experiments of a one-stage pipeline with `dvcray run -S x=...` (one sweep), {datetime.date.today()}, "
        f"{os.cpu_count()} cores, against a local Ray head already up (2 CPUs); load average {before} before, "
        f"{after} after (other work shared the machine):",
        "",
        f"- home: {home} of {n} ({'met' if home == n else 'NOT met'})",
        f"- wall time {elapsed:.1f} s, {per_exp:.3f} s per experiment against {BEFORE_PER_EXP} s for 200: "
        f"{'met' if per_exp <= BEFORE_PER_EXP else 'NOT met'}",
        f"- the client's peak RSS {client_mib:.0f} MiB (target at most 150 MiB: "
        f"{'met' if client_mib <= 150 else 'NOT met'}), its CPU time {float(user) + float(system):.1f} s",
        f"- the runner service's RSS (pid {pid}, {len(samples)} samples, every 0.5 s): "
        + (f"{mib[0]:.0f} MiB at the start, peak {max(mib):.0f} MiB, {mib[-1]:.0f} MiB at the end; "
           f"peak of each quarter of the sweep {' / '.join(quarters)} MiB; "
           f"{'bounded' if bounded else 'NOT bounded'} (the last quarter's peak within 1.1x the first half's); "
           f"{'alive' if alive else 'GONE'} after" if samples else "no samples"),
    ]


def seed(store, baseline: str, count: int, per_sweep: int = 100) -> None:
    """``count`` runs of the project in ``store``, as runners leave them (newest sweep first)."""
    from dvcray_cli import __version__
    from dvcray_cli.runs.model import MANIFEST, RESULT, STATUS, Manifest, RunId, RunResult, RunState, RunStatus

    now = time.time()
    writes = []
    for s in range(count // per_sweep):
        created = now - 3600 * (s + 1)
        base = RunId(time.strftime("%Y%m%d-%H%M%S", time.gmtime(created)), secrets.token_hex(3))
        for k in range(1, per_sweep + 1):
            run_id, name = str(base.member(k)), f"s{s}-{k}"
            started, ended = created + k, created + k + 2.5
            state = RunState.FAILED if k % 50 == 0 else RunState.SUCCEEDED
            manifest = Manifest(run_id=run_id, baseline=baseline, exp_name=name, overrides=[f"x={s * 1000 + k}"],
                                store=store.to_json(), dvcray_version=__version__, created=created,
                                address="http://127.0.0.1:8265")
            result = RunResult(run_id=run_id, status=state, exp_name=name, baseline=baseline,
                               overrides=list(manifest.overrides), node="bench", started=started, ended=ended,
                               dvcray_version=__version__, metrics={"metrics.json": {"y": 2 * (s * 1000 + k)}},
                               error="stage failed" if state == RunState.FAILED else None,
                               timings={"restore": 0.1, "exp_run": 0.5, "push": 0.1})
            status = RunStatus(state, started, ended, "bench")
            writes += [(store.run_path(run_id, MANIFEST), manifest.to_json()),
                       (store.run_path(run_id, STATUS), status.to_json()),
                       (store.run_path(run_id, RESULT), result.to_json())]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda w: store.write(w[0], json.dumps(w[1], default=str).encode()), writes))


def records(git_root: Path, store, count: int) -> None:
    """The records the clone that submitted the store's runs keeps, once they ended."""
    from dvcray_cli.runs.lookup import Run
    from dvcray_cli.runs.model import RunRecord

    for run_id in store.run_ids()[:count]:
        run = Run(run_id, store)
        result = run.result
        RunRecord(run_id=run_id, job_id=run_id.rsplit("-", 1)[0], address="http://127.0.0.1:8265",
                  store=store.to_json(), exp_name=result.exp_name, baseline=result.baseline,
                  submitted=run.submitted() or 0.0, state=result.status, started=result.started,
                  ended=result.ended, metrics=result.metrics, error=result.error, backend="service",
                  service="raysubmit_bench").save(git_root)


def listing(count: int) -> list[str]:
    tmp, env, project = workspace("dvcray-listing-", FILES)
    server, endpoint = moto_server()
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    env.update(creds)
    saved = os.environ.copy()
    os.environ.update(creds)
    before = load()
    times: dict[str, list[float]] = {}
    shown = {}
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        sh(["dvc", "remote", "add", "-d", "storage", "s3://bench/dvc"], project, env)
        sh(["dvc", "remote", "modify", "storage", "endpointurl", endpoint], project, env)
        sh(["git", "commit", "-qam", "remote"], project, env)
        from dvcray_cli import gitutil
        from dvcray_cli.store import Store

        store = Store("s3://bench/dvc", {"endpointurl": endpoint})
        baseline = gitutil.git("rev-parse", "HEAD", cwd=project).strip()
        t = time.perf_counter()
        seed(store, baseline, count)
        seeded = time.perf_counter() - t
        other = tmp / "other"
        sh(["git", "clone", "-q", str(project), str(other)], tmp, env)
        sh(["dvc", "remote", "modify", "--local", "storage", "endpointurl", endpoint], other, env)
        cases = {"`dvcray runs`, a clone with no record of them (found in the store)": (other, []),
                 "`dvcray runs --json`, the same": (other, ["--json"]),
                 "`dvcray runs --limit 0` (all the store's newest 200), the same": (other, ["--limit", "0"])}
        for name, (cwd, args) in cases.items():
            times[name] = [sh([str(BIN / "dvcray"), "runs", *args], cwd, env) for _ in range(3)]
        records(project, store, count)
        mine = {f"`dvcray runs`, the clone that submitted them ({count} records)": (project, []),
                "`dvcray runs --limit 0`, the same": (project, ["--limit", "0"])}
        for name, (cwd, args) in mine.items():
            times[name] = [sh([str(BIN / "dvcray"), "runs", *args], cwd, env) for _ in range(3)]
        out = subprocess.run([str(BIN / "dvcray"), "runs", "--json", "--limit", "0"], cwd=other, env=env,
                             capture_output=True, text=True, check=True).stdout
        shown["store"] = len(json.loads(out))
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()
        after = load()
        shutil.rmtree(tmp, ignore_errors=True)
    worst = max(statistics.median(v) for k, v in times.items() if "--limit 0" not in k)
    lines = [
        f"`dvcray runs` on an S3 store (moto on 127.0.0.1) with {count} runs of the project (50 sweeps of 100; "
        f"seeded in {seeded:.0f} s), {datetime.date.today()}, {os.cpu_count()} cores, 3 times each; load average "
        f"{before} before, {after} after (other work shared the machine):",
        "",
        "| how | median (s) | min (s) | max (s) |",
        "|---|---|---|---|",
        *[f"| {k} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} |" for k, v in times.items()],
        "",
        f"Target: `dvcray runs` within 2 s: {'met' if worst <= 2 else 'NOT met'} (slowest median {worst:.2f} s); "
        f"`--limit 0` listed {shown.get('store', '?')} runs from the store.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="the sweep's size (default 1000)")
    parser.add_argument("--runs", type=int, default=5000, help="runs in the listed store (default 5000)")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-listing", action="store_true")
    args = parser.parse_args()
    lines: list[str] = []
    if not args.skip_listing:
        lines += listing(args.runs)
        print("\n".join(lines), flush=True)  # kept should the sweep fail
    if not args.skip_sweep:
        lines += ([""] if lines else []) + sweep(args.n)
    write_result("thousand.md", "\n".join(lines))


if __name__ == "__main__":
    main()
