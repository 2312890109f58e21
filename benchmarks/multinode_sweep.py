"""Six placed experiments against one, on `local-multinode` with an S3 store.

The cluster is Ray's fake_multinode provider (`dvcray cluster up local-multinode`:
a 0-CPU head and up to 3 autoscaled 1-CPU worker nodes, real raylets on this
machine); the store is a moto S3 server on 127.0.0.1 behind the project's DVC
default remote (`endpointurl`). A warm-up sweep brings the 3 workers up first.
Then, alternating:

- one:  `dvcray run -n one-I --cpus-per-exp 1` (a 5 s stage)
- six:  `dvcray run -n sixI -S x=A,..,F --cpus-per-exp 1 --jobs 6`

Every value of x is new, so no run-cache hit skips a stage.

Target (issues 6 and 12): the six finish within twice the one's time plus 3 s, with
runners on at least 2 distinct nodes (the Ray node each runner recorded).

    python benchmarks/multinode_sweep.py [-n 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import time

from _bench import BIN, SLOW_PIPELINE, load, sh, table, workspace, write_result



def workers_alive(env: dict[str, str], project) -> int:
    proc = subprocess.run([str(BIN / "dvcray"), "cluster", "status", "--json"], cwd=project, env=env,
                          capture_output=True, text=True)
    entries = [c for c in json.loads(proc.stdout or "[]") if c.get("name") == "local-multinode"]
    return sum(1 for n in (entries[0].get("nodes") or []) if not n.get("is_head")) if entries else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2, help="rounds of each (default 2)")
    args = parser.parse_args()

    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log

    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    tmp, env, project = workspace("dvcray-mn-", SLOW_PIPELINE)
    # Fake credentials for moto, for the client and (inherited by `cluster up`) the nodes.
    env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "CI": "true"})
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="bench")
    sh(["dvc", "remote", "add", "-d", "store", "s3://bench/dvc"], project, env)
    sh(["dvc", "remote", "modify", "store", "endpointurl", endpoint], project, env)
    sh(["git", "commit", "-qam", "store"], project, env)

    dvcray = str(BIN / "dvcray")
    times: dict[str, list[float]] = {"one experiment": [], "six experiments": []}
    nodes: set[str] = set()
    before = load()
    try:
        sh([dvcray, "cluster", "up", "local-multinode"], project, env)
        from dvcray_cli import ray_api
        from dvcray_cli.clusters import local

        os.environ["HOME"] = env["HOME"]
        record = local.recorded("local-multinode")
        # Ask the autoscaler to keep 3 one-CPU nodes (Ray's request_resources), and wait for them.
        code = ("import ray\nfrom ray.autoscaler.sdk import request_resources\n"
                "ray.init()\nrequest_resources(bundles=[{'CPU': 1}] * 3)\n")
        subprocess.run([str(BIN / "python"), "-c", code], check=True, capture_output=True, timeout=120,
                       env={**env, "RAY_ADDRESS": record.gcs_address, "RAY_AUTH_MODE": "token",
                            "RAY_AUTH_TOKEN": record.token()})
        deadline = time.time() + 180
        while workers_alive(env, project) < 3 and time.time() < deadline:
            time.sleep(2)
        up = workers_alive(env, project)
        # One run not counted: first imports on the nodes.
        sh([dvcray, "run", "-n", "warm", "-S", "x=901,902,903", "--cpus-per-exp", "1", "--jobs", "3"], project, env)
        for i in range(args.n):
            times["one experiment"].append(
                sh([dvcray, "run", "-n", f"one-{i}", "-S", f"x={1000 + i}", "--cpus-per-exp", "1"], project, env))
            times["six experiments"].append(
                sh([dvcray, "run", "-n", f"six{i}", "-S", "x=" + ",".join(str(100 * (i + 1) + k) for k in range(6)),
                    "--cpus-per-exp", "1", "--jobs", "6"], project, env))
        # Where each of the six ran: the Ray node its runner recorded (the runner service
        # places it), or its Ray Job's driver (runs as Ray Jobs of their own).
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix="dvc/dvcray/runs/"):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/result.json"):
                    result = json.loads(s3.get_object(Bucket="bench", Key=obj["Key"])["Body"].read())
                    if str(result.get("exp_name") or "").startswith("six") and result.get("ray_node"):
                        nodes.add(result["ray_node"])
        client = ray_api.client(record.dashboard_url, record.token())
        nodes |= {j.driver_node_id for j in client.list_jobs()
                  if (j.metadata or {}).get("exp_name", "").startswith("six") and j.driver_node_id}
    finally:
        subprocess.run([dvcray, "cluster", "down", "local-multinode", "--yes"], cwd=project, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server.stop()
        after = load()
        shutil.rmtree(tmp, ignore_errors=True)

    one, six = statistics.median(times["one experiment"]), statistics.median(times["six experiments"])
    rows = table(times)
    limit = 2 * one + 3
    verdict = "met" if six <= limit and len(nodes) >= 2 else "NOT met"
    text = "\n".join([
        f"`local-multinode` ({up} worker nodes up), S3 store (moto on 127.0.0.1), `--cpus-per-exp 1`, a 5 s stage, "
        f"{datetime.date.today()}, {os.cpu_count()} cores, n={args.n} rounds each, alternating; load average "
        f"{before} before, {after} after:",
        "",
        *rows,
        "",
        f"Target: six within 2 x one + 3 s = {limit:.2f} s, runners on >= 2 nodes: {verdict} "
        f"(six took {six:.2f} s; runners on {len(nodes)} distinct nodes).",
    ])
    write_result("multinode_sweep.md", text)


if __name__ == "__main__":
    main()
