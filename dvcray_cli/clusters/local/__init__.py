"""Local clusters: a Ray head on this machine, alone (``local``) or with the
autoscaler's fake nodes (``local-multinode``).

A local cluster is one ``ray start --head`` on this machine with its own Ray
``--temp-dir``, token authentication on, the job API on 127.0.0.1. It is
machine-wide, so its record lives in ``~/.dvcray/clusters/<name>.json``. It is
stopped by its pids only (``procs``), never with ``ray stop``.

Modules: ``head`` (starting the head), ``environment`` (what its processes inherit: an
allowlist, not the starting shell's whole environment), ``multinode`` (the autoscaler's YAML and the
wait for its workers), ``registry`` (the records and lookups over them), ``cluster``
(``up``, ``down``, ``status``). Ray is imported inside the functions that need it:
``dvcray --help`` stays fast.
"""

from dvcray_cli.clusters.common import VERSION_LABEL
from dvcray_cli.clusters.local.cluster import LocalDown, LocalPlan, down, status, up
from dvcray_cli.clusters.local.environment import head_environment
from dvcray_cli.clusters.local.head import DEFAULT_DASHBOARD_PORT, DEFAULT_GCS_PORT, START_TIMEOUT_S, start_head
from dvcray_cli.clusters.local.multinode import (WORKERS_TIMEOUT_S, builtin_options, head_type_cpus, max_resources,
                                                 node_types, resolve_autoscaling_config, wait_for_workers)
from dvcray_cli.clusters.local.registry import (NAMES, LocalCluster, current, dead_cluster_at, default_temp_dir,
                                                record_path, recorded, recorded_at, records)

__all__ = ["DEFAULT_DASHBOARD_PORT", "DEFAULT_GCS_PORT", "NAMES", "START_TIMEOUT_S", "VERSION_LABEL",
           "WORKERS_TIMEOUT_S", "LocalCluster", "LocalDown", "LocalPlan", "builtin_options", "current",
           "dead_cluster_at", "default_temp_dir", "down", "head_environment", "head_type_cpus", "max_resources", "node_types",
           "record_path", "recorded", "recorded_at", "records", "resolve_autoscaling_config", "start_head",
           "status", "up", "wait_for_workers"]
