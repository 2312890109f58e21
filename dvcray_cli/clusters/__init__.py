"""The one cluster API that commands and runs call (DESIGN.md, "Clusters").

Each operation is declared here once and routed by the kind of cluster, as
SkyPilot's ``sky/provision/__init__.py`` does: the built-ins ``local`` and
``local-multinode`` go to ``local``, ``aws``, ``aws-gpu`` and YAML files whose
provider is aws go to ``aws``, any other Ray cluster-launcher YAML (on-prem
machines over SSH, other clouds) to ``launcher``, whose shared pieces ``aws``
builds on. Each of them has the same shape: ``plan``, ``up``, ``down``, ``status``,
and where runs reach it. Around them this module arms and disarms the idle watchers
of local clusters (``idle``). The rest is re-exported: where runs go and the tokens
that belong to an address (``reach``), the cluster's dvcray (``version``), the
results and durations every kind shares (``common``). ``local`` and ``aws`` never
import each other, and ``launcher`` imports neither (a test keeps it so).

Importing this package imports nothing heavy: ``dvcray --help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dvcray_cli import ray_api
from dvcray_cli.clusters import aws, launcher, local
from dvcray_cli.clusters.aws.account import refuse_fake_endpoint
from dvcray_cli.clusters.common import (AWS, BUILT_INS, LOCAL, UP_HINT, DownResult, Say, Status, UpResult,
                                        format_duration, parse_duration, quiet)
from dvcray_cli.clusters.local import LocalPlan
from dvcray_cli.clusters.reach import (Shape, connect, dead_cluster_name, ensure_address,
                                       fallback_addresses, is_remote, job_api, known_address, on_this_machine,
                                       reaches_service, service_url, shape, token_for)
from dvcray_cli.clusters.version import check_version, cluster_dvcray_version
from dvcray_cli.errors import UsageError

__all__ = ["AWS", "BUILT_INS", "LOCAL", "UP_HINT", "DownResult", "LocalPlan", "Say", "Shape", "Status", "UpResult",
           "check_version", "cluster_dvcray_version", "connect", "dead_cluster_name", "down",
           "ensure_address", "fallback_addresses", "format_duration", "is_remote", "job_api", "kind_of",
           "known_address", "on_this_machine", "parse_duration", "plan", "reaches_service", "refuse_fake_endpoint",
           "service_url", "shape", "status", "token_for", "up"]

# ``idle`` is imported inside the functions that use it: the watcher runs as
# ``python -m dvcray_cli.clusters.idle``, which imports this package first and must
# not find itself imported already.


def kind_of(config: str) -> str:
    """``"local"``, ``"aws"`` or ``"launcher"``: who handles the cluster ``config`` names.

    Raises:
        UsageError: an unknown name, or a YAML file that does not exist or cannot be read.
    """
    name = config.strip()
    if name in LOCAL:
        return "local"
    if aws.is_aws_config(name):
        return "aws"
    if name.endswith((".yaml", ".yml")) and not Path(name).expanduser().exists():
        raise UsageError(f"No cluster config at {name}.",
                         f"Pass a built-in ({', '.join(BUILT_INS)}) or the path of a Ray cluster YAML.")
    if name.endswith((".yaml", ".yml")) or os.sep in name or Path(name).exists():
        if not Path(name).expanduser().is_file():
            raise UsageError(f"No cluster config at {name}.", "Pass the path of a Ray cluster YAML.")
        return "launcher"
    raise UsageError(f"Unknown cluster {name!r}. Built-ins: {', '.join(BUILT_INS)}, or a YAML path.", UP_HINT)


def plan(config: str, cwd: Path, idle_timeout_s: float | None = None) -> Any:
    """What ``up`` would do, checked; creates nothing. An AWS plan is checked
    read-only against the account and priced (``aws.AwsPlan``); an on-prem plan
    logs in to each machine and checks its Ray (``launcher.LauncherPlan``).

    Raises:
        UsageError: a bad config name or file, or a project unfit for the cluster.
        ClusterError: AWS credentials missing or refused; a machine unreachable,
            refusing the key, or running another Ray version.
    """
    kind = kind_of(config)
    if kind == "local":
        return LocalPlan(config.strip(), idle_timeout_s)
    if kind == "launcher":
        return launcher.plan(config, cwd, idle_timeout_s)
    return aws.plan(config, cwd, idle_timeout_s)


def up(planned: Any, say: Say = quiet) -> UpResult:
    """Start the planned cluster unless it runs, record it, arm its idle watcher.

    Raises:
        ClusterError: it did not start (names the log to read).
    """
    if planned.kind == "local":
        from dvcray_cli.clusters import idle

        cluster, started = local.up(planned.name)
        watcher = None
        if planned.idle_timeout_s is not None:
            watcher = idle.arm(cluster.name, planned.idle_timeout_s)
        return UpResult(cluster.name, "local", started, cluster.dashboard_url, cluster.started_at,
                        cluster.num_cpus, bool(cluster.autoscaling_config),
                        watcher["timeout_s"] if watcher else None)
    if planned.kind == "launcher":
        record = launcher.up(planned, say)
        workers = [n["ip"] for n in ray_api.list_nodes(record.api_url, record.token())
                   if n["alive"] and not n["is_head"]]
        return UpResult(record.name, "launcher", True, record.dashboard_url, record.started_at,
                        idle_timeout_s=record.idle_timeout_s or None, head_ip=record.head_ip,
                        config_label=record.config_label, workers=sorted(workers))
    record = aws.up(planned, say)
    return UpResult(record.name, "aws", True, record.dashboard_url, record.started_at,
                    idle_timeout_s=record.idle_timeout_s or None, head_ip=record.head_ip)


def down(config: str, cwd: Path, yes: bool = False) -> DownResult:
    """Stop the cluster ``config`` names, and its idle watcher; remove its record.

    Runs still going on it are a reason to refuse, unless ``yes``: then they are
    stopped first (their runners get SIGTERM and a grace period to save).

    Raises:
        UsageError: dvcray runs are in progress and ``yes`` is False.
    """
    kind = kind_of(config)
    if kind == "local":
        from dvcray_cli.clusters import idle

        name = config.strip()
        result = local.down(name, yes=yes)
        idle.disarm(name)
        return DownResult(name, "local", result.cluster is not None, result.stopped_runs, result.pids)
    if kind == "launcher":
        gone = launcher.down(config, cwd, yes=yes)
        return DownResult(gone.name, "launcher", gone.recorded or bool(gone.nodes), gone.stopped_runs,
                          nodes=gone.nodes, unreachable=gone.unreachable, provider=gone.provider)
    done = aws.down(config, cwd, yes=yes)
    return DownResult(done.name, "aws", bool(done.terminated), done.stopped_runs,
                      terminated=done.terminated, region=done.region)


def status() -> Status:
    """The recorded clusters with their nodes, runs in progress and idle timeouts;
    AWS clusters with their instances and estimated cost so far; launcher clusters
    (on-prem, other clouds) with their nodes."""
    from dvcray_cli.clusters import idle

    found = local.status()
    for entry in found:
        watcher = idle.watcher(entry["name"])
        entry["idle_timeout_s"] = watcher["timeout_s"] if watcher else None
    running = {c["name"] for c in found}
    notes = [n for n in idle.auto_downs() if n.get("name") not in running]
    return Status(found, aws.status(), notes, launcher.status())
