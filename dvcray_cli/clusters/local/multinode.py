"""``local-multinode``: a head whose autoscaler starts Ray's fake nodes on this
machine (DESIGN.md, "Clusters" and "Facts": ``fake_multinode``). What the autoscaler
YAML says (node types, the most a cluster can grow to), the config the head runs,
and the wait for its first workers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dvcray_cli import ray_api
from dvcray_cli.clusters import procs
from dvcray_cli.clusters.local.registry import LocalCluster
from dvcray_cli.errors import ClusterError, UsageError

# How long `up` waits for an autoscaling cluster's min_workers to join (a fake
# node joins in about 4 s on an idle machine).
WORKERS_TIMEOUT_S = 120.0


def builtin_options(name: str) -> dict[str, Any]:
    """``start_head`` options of a built-in cluster."""
    if name == "local-multinode":
        from dvcray_cli.packaged import cluster_configs_dir

        return {"autoscaling_config": cluster_configs_dir() / "local-multinode.yaml"}
    return {}


def resolve_autoscaling_config(source: Path, temp: Path, gcs_port: int) -> tuple[Path, bool]:
    """The autoscaler config as the head will run it, written into the cluster's temp dir.

    For the ``fake_multinode`` provider the fake nodes join ``provider.gcs_address``,
    or port 6379 of this machine when it is empty, which may be another cluster's
    (``ray/autoscaler/_private/fake_multi_node/node_provider.py``): it is set to
    this cluster's own GCS.

    Returns:
        ``(path, fake)``: ``fake`` when the provider is ``fake_multinode``.

    Raises:
        UsageError: the YAML cannot be read or is not a mapping with a provider.
    """
    import yaml

    try:
        config = yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"Cannot read the cluster config {source}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("provider"), dict):
        raise UsageError(f"The cluster config {source} has no provider section.")
    fake = config["provider"].get("type") == "fake_multinode"
    if fake and not config["provider"].get("gcs_address"):
        config["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"
    path = temp / "autoscaling-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, fake


def _read_config(path: str | Path | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def head_type_cpus(config_path: Path) -> float | None:
    """The CPUs the config gives the head's node type (``ray start --num-cpus`` must match)."""
    config = _read_config(config_path)
    head = (config.get("available_node_types") or {}).get(config.get("head_node_type") or "", {})
    cpus = (head.get("resources") or {}).get("CPU")
    return float(cpus) if cpus is not None else None


def node_types(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    """The worker node types of an autoscaling cluster: ``{type: {resources, min_workers, max_workers}}``."""
    config = _read_config(cluster.autoscaling_config)
    head = config.get("head_node_type")
    return {name: {"resources": dict(t.get("resources") or {}), "min_workers": int(t.get("min_workers") or 0),
                   "max_workers": int(t.get("max_workers") or 0)}
            for name, t in (config.get("available_node_types") or {}).items() if name != head}


def max_resources(cluster: LocalCluster) -> dict[str, float] | None:
    """The resources an autoscaling cluster can grow to (head plus every worker at
    its maximum, capped by the cluster's ``max_workers``); None for a fixed cluster."""
    config = _read_config(cluster.autoscaling_config)
    if not config:
        return None
    types = config.get("available_node_types") or {}
    head = types.get(config.get("head_node_type") or "", {})
    total: dict[str, float] = {k: float(v) for k, v in (head.get("resources") or {}).items()
                               if isinstance(v, (int, float))}
    left = int(config.get("max_workers", 10 ** 6))
    for name, t in types.items():
        if name == config.get("head_node_type"):
            continue
        count = min(int(t.get("max_workers") or 0), left)
        left -= count
        for key, value in (t.get("resources") or {}).items():
            if isinstance(value, (int, float)):
                total[key] = total.get(key, 0.0) + count * float(value)
    return total


def _monitor_running(cluster: LocalCluster) -> bool:
    return procs.named_running(procs.core_pids(cluster.temp_dir, cluster.session_id),
                               "autoscaler/_private/monitor.py")


def wait_for_workers(cluster: LocalCluster, timeout: float = WORKERS_TIMEOUT_S) -> list[dict[str, Any]]:
    """Wait until an autoscaling cluster's ``min_workers`` have joined; update ``num_cpus``.

    Returns:
        The alive nodes.

    Raises:
        ClusterError: the autoscaler died or reported an error (a key missing from
            its config kills it while ``ray start`` still succeeds), or the workers
            did not join in time. Names the autoscaler's log.
    """
    want = sum(t["min_workers"] for t in node_types(cluster).values())
    logs = Path(cluster.temp_dir) / "session_latest" / "logs"
    deadline = time.monotonic() + timeout
    alive: list[dict[str, Any]] = []
    while True:
        try:
            alive = [n for n in ray_api.list_nodes(cluster.dashboard_url, cluster.token()) if n["alive"]]
        except ClusterError:
            alive = []
        if sum(not n["is_head"] for n in alive) >= want:
            cluster.num_cpus = sum(n["resources"].get("CPU", 0) for n in alive)
            return alive
        error = None
        if not _monitor_running(cluster):
            error = "Ray's autoscaler exited"
        else:
            error = (ray_api.autoscaler_status(cluster.dashboard_url, cluster.token()) or {}).get("error")
        if error or time.monotonic() > deadline:
            tail = _tail(logs / "monitor.err", 3)
            raise ClusterError(
                f"{error or f'The autoscaler did not start {want} worker node(s) within {timeout:.0f} s'}"
                f" (cluster {cluster.name!r}). Its log: {logs / 'monitor.err'}" + (f"\n{tail}" if tail else ""),
                "A key missing from the cluster config stops the autoscaler: compare it with the built-in one.")
        time.sleep(1.0)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
