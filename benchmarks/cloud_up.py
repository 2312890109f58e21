"""AWS on the cloud bed (tests/cloudbed.py: moto's EC2 whose instances become namespace
machines), side by side in one run:

1. ``dvcray cluster up aws-bed.yaml`` to a ready head (the job API answers through the
   port-forward), against Ray's own ``ray up --no-config-cache`` of the same YAML as dvcray
   launches it (placeholders filled, dvcray's additions in: the same work on the head),
   alternating, each followed by ``dvcray cluster down`` and a wait until no machine is left.
   Goal (issue 18): dvcray within 1.2x of Ray.
2. On a cluster with no worker: the time from ``dvcray run --cpus-per-exp 1`` to the stage's
   first log line on the client (the autoscaler asks EC2 for a spot worker, it becomes a
   machine, Ray and dvcray are set up there, the runner starts).
3. Then the worker is reclaimed (``Cloud.reclaim``: terminated, its machine dies at once;
   AWS's two-minute notice is not modelled): the time until ``dvcray run`` reports LOST.

Needs root (network, mount and PID namespaces). Run: ``python benchmarks/cloud_up.py -n 3``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import cloudbed  # noqa: E402

from _bench import BIN, load, table, workspace, write_result  # noqa: E402

BUCKET = "bench-store"
STAGE = """\
import socket, time
print("STAGE-STARTED on", socket.gethostname(), flush=True)
time.sleep(600)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3, help="rounds of each measurement")
    args = parser.parse_args()
    before = load()
    cloud = cloudbed.build()
    try:
        rows = measure(cloud, args.n)
    finally:
        problems = cloud.teardown()
        if problems:
            print("teardown:", problems, file=sys.stderr)
    after = load()
    up = rows["up"]
    ratio = statistics.median(up["dvcray cluster up"]) / statistics.median(up["ray up (the same YAML)"])
    lines = [f"AWS on the cloud bed (moto {moto_version()}, instances as namespace machines), "
             f"{time.strftime('%Y-%m-%d')}, 2 cores, n={args.n} each, alternating; load average {before} before, "
             f"{after} after.", "", "Up to a ready head, then `dvcray cluster down` between rounds:", ""]
    lines += table(up)
    lines += ["", f"dvcray / Ray (medians): {ratio:.2f}x. Goal: at most 1.2x: {'met' if ratio <= 1.2 else 'NOT met'}.",
              "", "On a cluster with no worker (each round's worker was reclaimed in the round before):", ""]
    lines += table(rows["run"])
    write_result("cloud_up.md", "\n".join(lines))


def moto_version() -> str:
    from importlib.metadata import version

    return version("moto")


def measure(cloud: cloudbed.Cloud, rounds: int) -> dict[str, dict[str, list[float]]]:
    tmp, base, project = workspace("dvcray-bench-cloud-", {"stage.py": STAGE, "dvc.yaml": (
        "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n")})
    env = cloud.env(base)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    cloud.client("s3").create_bucket(Bucket=BUCKET)
    for cmd in (["dvc", "remote", "add", "-q", "-d", "store", f"s3://{BUCKET}/dvc"],
                ["dvc", "remote", "modify", "store", "endpointurl", cloud.endpoint],
                ["git", "commit", "-qam", "store"]):
        subprocess.run(cmd, cwd=project, env=env, check=True)
    config = cloudbed.bed_config(cloud, tmp / "aws-bed.yaml")

    def dvcray(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        proc = cloud.run([sys.executable, "-m", "dvcray_cli", *args], env, cwd=project, timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"dvcray {' '.join(args)} exited {proc.returncode}: {proc.stderr[-1500:]}")
        return proc

    def down() -> None:
        dvcray("cluster", "down", str(config), "--yes")
        left = cloud.wait_no_machine(120)
        if left:
            raise SystemExit(f"machines left after down: {left}")

    dvcray_up, ray_up = "dvcray cluster up", "ray up (the same YAML)"
    up: dict[str, list[float]] = {dvcray_up: [], ray_up: []}
    launched = None
    for i in range(rounds):
        # dvcray first in odd rounds: Ray's turn needs the config as dvcray launches it.
        for way in ((dvcray_up, ray_up) if i % 2 == 0 else (ray_up, dvcray_up)):
            start = time.perf_counter()
            if way == dvcray_up:
                dvcray("cluster", "up", str(config), "--yes")
                launched = next((project / ".dvcray" / "clusters").glob("*.yaml"))
            else:
                proc = cloud.run([str(BIN / "ray"), "up", "-y", "--no-config-cache", str(launched)], env,
                                 cwd=project, timeout=900)
                if proc.returncode != 0:
                    raise SystemExit(f"ray up exited {proc.returncode}: {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
            up[way].append(time.perf_counter() - start)
            print(f"round {i + 1}: {way} {up[way][-1]:.1f} s", flush=True)
            down()

    run: dict[str, list[float]] = {"`dvcray run` to the stage's first log line (no worker)": [],
                                   "spot reclaim to LOST (exit 3, `--retries 0`)": []}
    dvcray("cluster", "up", str(config), "--yes")
    try:
        for i in range(rounds):
            first, lost = doomed_run(cloud, env, project, f"doomed{i}-{os.getpid()}")
            run["`dvcray run` to the stage's first log line (no worker)"].append(first)
            run["spot reclaim to LOST (exit 3, `--retries 0`)"].append(lost)
            print(f"round {i + 1}: first line {first:.1f} s, reclaim to LOST {lost:.1f} s", flush=True)
    finally:
        down()
    return {"up": up, "run": run}


def doomed_run(cloud: cloudbed.Cloud, env: dict[str, str], project: Path, name: str) -> tuple[float, float]:
    """A run of the long stage on a cluster with no worker: seconds to its first log line;
    then its worker is reclaimed: seconds until the run ends LOST."""
    start = time.perf_counter()
    proc = subprocess.Popen(cloud.command([sys.executable, "-m", "dvcray_cli", "run", "-n", name,
                                           "--cpus-per-exp", "1", "--retries", "0"]), cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = threading.Event()
    host: list[str] = []
    output: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            if "STAGE-STARTED on" in line and not seen.is_set():
                host.append(line.split("STAGE-STARTED on", 1)[1].split()[0])
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not seen.wait(600):
        proc.kill()
        raise SystemExit("the stage did not start: " + "".join(output)[-2000:])
    first = time.perf_counter() - start
    ip = host[0].removeprefix("ip-").replace("-", ".")
    [instance] = [i["InstanceId"] for i in cloud.instances(("running",)) if i.get("PrivateIpAddress") == ip]
    reclaimed = time.perf_counter()
    cloud.reclaim(instance)
    code = proc.wait(600)
    lost = time.perf_counter() - reclaimed
    reader.join(10)
    if code != 3 or "LOST" not in "".join(output):
        raise SystemExit(f"the reclaimed run ended {code}, not LOST: " + "".join(output)[-2000:])
    return first, lost


if __name__ == "__main__":
    main()
