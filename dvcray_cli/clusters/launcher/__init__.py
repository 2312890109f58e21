"""Clusters from any Ray cluster-launcher YAML (DESIGN.md, "Clusters").

``dvcray cluster up FILE.yaml`` for a provider other than AWS (which has its own
package, built on this one): Ray's on-prem provider (``provider: {type: local,
head_ip, worker_ips}``, machines reached over SSH) is tested end to end on a bed
of namespaces; other providers (gcp, azure, vsphere, ...) pass through Ray's
launcher with dvcray's additions, untested here.

1. ``plan`` (``planning``): read the YAML, check it with Ray's own schema, name the
   cluster, add dvcray's additions (``config.with_additions``: token, dvcray's wheel,
   dashboard on the head's 127.0.0.1, idle watcher) and, for on-prem machines, log in
   to each one and check its Ray version. Creates nothing: ``--dry-run`` stops here.
2. ``up`` and ``down`` (``cluster``): Ray's launcher in a process of its own
   (``launch``), the SSH port-forward (``ssh``), the record (``records``); on-prem, a
   wait for the workers, and Ray stopped on every machine at ``down``.
3. Where runs reach it (``reach``): the job API and the runner service, each through
   a port-forward of its own.

Other modules: ``provider`` (Ray's node provider, used directly), ``wheel`` (dvcray's
own wheel for the nodes).
"""

from dvcray_cli.clusters.launcher.cluster import (DOWN_NOW, WORKERS_TIMEOUT_S, LauncherDown, down, status,
                                                  stop_machines, stop_runs, up, wait_workers, write_config)
from dvcray_cli.clusters.launcher.planning import (CLOUD_IDLE_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S, ON_PREM, Check,
                                                   LauncherPlan, check_machines, plan)
from dvcray_cli.clusters.launcher.reach import (ensure_reachable, forward_url, recorded_address, recorded_at,
                                                service_reach, service_url)
from dvcray_cli.clusters.launcher.records import LauncherCluster

__all__ = ["CLOUD_IDLE_TIMEOUT_S", "DEFAULT_IDLE_TIMEOUT_S", "DOWN_NOW", "ON_PREM", "WORKERS_TIMEOUT_S", "Check",
           "LauncherCluster", "LauncherDown", "LauncherPlan", "check_machines", "down", "ensure_reachable",
           "forward_url", "plan",
           "recorded_address", "recorded_at", "service_reach", "service_url", "status", "stop_machines",
           "stop_runs", "up", "wait_workers", "write_config"]
