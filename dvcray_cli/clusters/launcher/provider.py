"""Taking a whole launcher cluster down, head included, from wherever the caller runs:
Ray's node provider for clouds (AWS among them), SSH and ``ray stop`` for on-prem machines.

Ray's autoscaler only ever removes workers, never the head; ``ray down`` of an
on-prem cluster stops Ray on the head only (the workers' raylets linger until they
notice). dvcray's idle watcher and ``cluster down`` use these instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from dvcray_cli.clusters.launcher import ssh


def node_provider(provider_config: dict[str, Any], cluster_name: str):
    from ray.autoscaler._private.providers import _get_node_provider

    return _get_node_provider(provider_config, cluster_name, use_cache=False)


def terminate_cluster(provider_config: dict[str, Any], cluster_name: str) -> list[str]:
    """Terminate every node of ``cluster_name`` through Ray's node provider, workers
    first and the head last, as Ray's teardown does.

    ``cache_stopped_nodes`` is forced off: down means terminate (a stopped cloud
    instance still bills its disk). Skips Ray's ``ray stop`` over SSH: the nodes go anyway.

    Returns:
        The node ids it asked to terminate.
    """
    from ray.autoscaler.tags import NODE_KIND_HEAD, NODE_KIND_WORKER, TAG_RAY_NODE_KIND

    provider = node_provider({**provider_config, "cache_stopped_nodes": False}, cluster_name)
    done: list[str] = []
    for kind in (NODE_KIND_WORKER, NODE_KIND_HEAD, None):
        for _attempt in range(3):
            nodes = provider.non_terminated_nodes({TAG_RAY_NODE_KIND: kind} if kind else {})
            nodes = [n for n in nodes if n not in done] if kind is None else nodes
            if not nodes:
                break
            provider.terminate_nodes(nodes)
            done.extend(n for n in nodes if n not in done)
    return done


def stop_machines_from_head(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """On an on-prem head: ``ray stop`` on every worker over SSH (with the key Ray's
    launcher gave the head), then on the head itself. The machines keep running.

    Returns:
        ``(stopped, unreachable)`` worker addresses.
    """
    from concurrent.futures import ThreadPoolExecutor

    auth = config.get("auth") or {}
    user, key = str(auth.get("ssh_user") or ""), str(auth.get("ssh_private_key") or "~/ray_bootstrap_key.pem")
    workers = [str(ip) for ip in (config.get("provider") or {}).get("worker_ips") or []]
    stopped: list[str] = []
    unreachable: list[str] = []
    if workers:
        with ThreadPoolExecutor(len(workers)) as pool:
            answers = list(pool.map(lambda ip: ssh.run(ip, user, key, "ray stop", ssh.known_hosts_file(), timeout=120),
                                    workers))
        for ip, answer in zip(workers, answers):
            (stopped if answer.returncode == 0 else unreachable).append(ip)
    ray = Path(sys.executable).parent / "ray"
    subprocess.run([str(ray) if ray.exists() else "ray", "stop"], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    wait_ray_gone()
    return stopped, unreachable


# What Ray's own processes have in their command lines (``ray stop`` knows most of them;
# the dashboard's forkserver children end on their own, shortly after it).
RAY_MARKERS = ("gcs_server", "raylet", "ray::", "ray/dashboard", "ray/autoscaler", "ray/_private/",
               "default_worker.py", "ray_client_server")


def wait_ray_gone(timeout: float = 15.0) -> list[int]:
    """Wait until no Ray process of this user is left on this machine after ``ray stop``;
    kill what is still there after ``timeout`` (as ``ray stop --force`` would).

    Returns:
        The pids it had to kill.
    """
    import os
    import time

    import psutil

    def left() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["pid", "uids", "cmdline"]):
            try:
                if proc.pid == os.getpid() or not proc.info["uids"] or proc.info["uids"].real != os.getuid():
                    continue
                line = " ".join(proc.info["cmdline"] or [])
            except (psutil.Error, TypeError):
                continue
            if any(marker in line for marker in RAY_MARKERS):
                found.append(proc)
        return found

    deadline = time.monotonic() + timeout
    while (remaining := left()) and time.monotonic() < deadline:
        time.sleep(0.3)
    killed = []
    for proc in remaining:
        try:
            proc.kill()
            killed.append(proc.pid)
        except psutil.Error:
            pass
    return killed
