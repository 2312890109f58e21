"""``up``, ``down`` and ``status`` of local clusters: one ``up`` or ``down`` of a
cluster at a time (a lock per name), records written only for a head that answers,
processes stopped by their pids only, never with ``ray stop``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dvcray_cli import ray_api
from dvcray_cli.clusters.local.head import start_head
from dvcray_cli.clusters.local.multinode import builtin_options, max_resources, node_types, wait_for_workers
from dvcray_cli.clusters.local.registry import LocalCluster, load, locked, records, recorded, remove_record, \
    write_record
from dvcray_cli.errors import ClusterError, UsageError


@dataclass
class LocalPlan:
    """What ``up`` of a local cluster would do."""

    name: str
    idle_timeout_s: float | None
    kind: str = "local"


@dataclass
class LocalDown:
    """What ``down`` of a local cluster did."""

    name: str
    cluster: LocalCluster | None      # None: there was nothing to stop
    pids: list[int]
    stopped_runs: list[str]


def up(name: str = "local", **start_options: Any) -> tuple[LocalCluster, bool]:
    """Start the cluster ``name`` unless it already runs; record it.

    Returns:
        ``(cluster, started)``: ``started`` is False when it was already running.

    Raises:
        ClusterError: the head did not start.
    """
    with locked(name):
        cluster = recorded(name)
        if cluster is not None:
            return cluster, False
        cluster = start_head(name, **{**builtin_options(name), **start_options})
        try:
            if cluster.autoscaling_config:
                wait_for_workers(cluster)
            write_record(cluster)
        except BaseException:
            cluster.stop(timeout=5)
            raise
    return cluster, True


def down(name: str = "local", yes: bool = False) -> LocalDown:
    """Stop the cluster ``name`` and remove its record.

    Runs still going on it are a reason to refuse, unless ``yes``: then they are
    stopped first (Ray sends their runners SIGTERM, so they save what they can).

    Raises:
        UsageError: dvcray runs are pending or running and ``yes`` is False.
    """
    with locked(name):
        return _down(name, yes)


def _down(name: str, yes: bool) -> LocalDown:
    record = load(name)
    if record is not None and not record.is_alive():
        # It died (its GCS is gone): what is left of it (dashboard, autoscaler,
        # workers, runners) is stopped all the same.
        pids = record.stop()
        remove_record(name)
        return LocalDown(name, record if pids else None, pids, [])
    cluster = recorded(name)
    if cluster is None:
        return LocalDown(name, None, [], [])
    runs: list[dict[str, Any]] = []
    client = None
    try:
        client = ray_api.client(cluster.dashboard_url, cluster.token())
        runs = ray_api.active_runs(client)
    except ClusterError:
        client = None  # the job API is down; the processes still get stopped
    if runs and not yes:
        ids = ", ".join(r["run_id"] for r in runs)
        raise UsageError(f"Cluster {name!r} has {len(runs)} run(s) in progress: {ids}.",
                         f"Let them finish, or stop them with the cluster: dvcray cluster down {name} --yes")
    stopped_runs: list[str] = []
    if client is not None and runs:
        # Every runner gets the whole grace it was promised to save its work (and Ray's
        # kill after it), before the head's processes go.
        stopped_runs = ray_api.stop_runs(client, runs, ray_api.stop_grace_s() + 10)
    pids = cluster.stop()
    remove_record(name)
    return LocalDown(name, cluster, pids, stopped_runs)


def status() -> list[dict[str, Any]]:
    """Every recorded local cluster: addresses, nodes with their resources, and dvcray runs in progress.

    Stale records (their GCS is gone) are cleaned up and not listed.
    """
    result = []
    for record in records():
        cluster = recorded(record.name)
        if cluster is None:
            continue
        entry: dict[str, Any] = {
            "name": cluster.name, "alive": True, "gcs_address": cluster.gcs_address,
            "dashboard_url": cluster.dashboard_url, "temp_dir": cluster.temp_dir,
            "started_at": cluster.started_at, "nodes": [], "cpus": None, "runs": [], "error": None,
            "autoscaling": bool(cluster.autoscaling_config), "pending": [], "waiting": [],
        }
        try:
            nodes = ray_api.list_nodes(cluster.dashboard_url, cluster.token())
            entry["nodes"] = [n for n in nodes if n["alive"]]
            entry["cpus"] = sum(n["resources"].get("CPU", 0) for n in entry["nodes"])
            if cluster.autoscaling_config:
                entry["max_resources"] = max_resources(cluster)
                report = ray_api.autoscaler_status(cluster.dashboard_url, cluster.token(),
                                                   alive=entry["nodes"], types=node_types(cluster)) or {}
                entry["pending"], entry["waiting"] = report.get("pending", []), report.get("waiting", [])
                entry["autoscaler_error"] = report.get("error")
            entry["runs"] = ray_api.active_runs(ray_api.client(cluster.dashboard_url, cluster.token()))
        except ClusterError as exc:
            entry["error"] = exc.message
        result.append(entry)
    return result
