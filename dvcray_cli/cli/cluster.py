"""``dvcray cluster up|down|status``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.text import Text

from dvcray_cli.cli._common import boundary, err, out, plain_output, write_json

ConfigArg = Annotated[str, typer.Argument(
    metavar="[CONFIG]",
    help="A built-in cluster (local, local-multinode, aws, aws-gpu) or the path of any Ray cluster-launcher "
         "YAML (on-prem machines over SSH, AWS, other clouds).")]


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Start, stop and inspect Ray clusters.", no_args_is_help=True)
    group.command()(up)
    group.command()(down)
    group.command()(status)
    app.add_typer(group, name="cluster")


@contextlib.contextmanager
def _working(message: str) -> Iterator[None]:
    if plain_output():
        err.print(message, markup=False)
        yield
    else:
        with err.status(Text(message)):
            yield


@boundary
def up(
    config: ConfigArg = "local",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan (and, for AWS, the cost); create nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before creating cloud resources.")] = False,
    idle_timeout: Annotated[Optional[str], typer.Option("--idle-timeout", metavar="DURATION", help="Take the whole cluster down after this long with no dvcray run, e.g. 30m, 90s, 1h; 0 = never. Default: 60m on AWS, never otherwise.", show_default=False)] = None,
) -> None:
    """Start a Ray cluster and wait until it takes jobs; a no-op if it already runs.

    The local cluster runs on this machine with token authentication on; its
    dashboard and job API listen on 127.0.0.1 only. Any Ray cluster-launcher YAML
    starts a cluster through Ray's launcher: your own machines over SSH (provider
    local), AWS (`aws`, `aws-gpu`, or a YAML whose provider is aws: run `--dry-run`
    first to see the plan and its cost), other clouds. dvcray ships its auth token
    and its own dvcray to every node and reaches the head's job API through an SSH
    port-forward.

    Example:

        dvcray cluster up local --idle-timeout 30m
        dvcray cluster up lab.yaml --dry-run
        dvcray cluster up aws --dry-run
    """
    from dvcray_cli import clusters

    timeout = clusters.parse_duration(idle_timeout) if idle_timeout is not None else None
    planned = clusters.plan(config, Path.cwd(), timeout)
    if planned.kind == "aws":
        from dvcray_cli.cli import cluster_aws

        cluster_aws.up(planned, dry_run=dry_run, yes=yes)
        return
    if planned.kind == "launcher":
        from dvcray_cli.cli import cluster_launcher

        cluster_launcher.show_plan(planned, dry_run)
        if dry_run:
            return
        result = clusters.up(planned, say=lambda m: err.print(m, markup=False))
        cluster_launcher.up_result(result)
        return
    if dry_run:
        err.print(f"Dry run: would start Ray cluster {planned.name} on this machine unless it runs"
                  f"{'' if not timeout else f', idle timeout {clusters.format_duration(timeout)}'}; nothing was started.",
                  markup=False)
        return
    with _working(f"Starting Ray cluster {planned.name} unless it runs (this takes a few seconds)..."):
        result = clusters.up(planned)
    cpus = f"{result.num_cpus:g} CPUs" if result.num_cpus else "CPUs unknown"
    if result.started:
        err.print(Text.assemble("Started Ray cluster ", (result.name, "bold"), f" ({cpus})."))
    else:
        err.print(Text.assemble("Ray cluster ", (result.name, "bold"),
                                f" is already running (since {result.started_at}); nothing to do."))
    if result.idle_timeout_s:
        err.print(f"Idle timeout: {clusters.format_duration(result.idle_timeout_s)} (it stops itself after that "
                  "long with no dvcray run).", markup=False)
    if result.autoscaling:
        err.print("Its autoscaler adds and removes worker nodes with the load: dvcray cluster status shows them.",
                  markup=False)
    err.print(f"Dashboard and job API: {result.dashboard_url}", markup=False)
    err.print(f"Stop it with: dvcray cluster down {result.name}", markup=False)


@boundary
def down(
    config: ConfigArg = "local",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Also stop runs that are still in progress.")] = False,
) -> None:
    """Stop a Ray cluster: every process it started, nothing else.

    Refuses while dvcray runs are in progress on it, unless --yes (then they get
    SIGTERM and a few seconds to save their results first). On-prem machines keep
    running: Ray stops on each of them.

    Example:

        dvcray cluster down local --yes
        dvcray cluster down lab.yaml
    """
    from dvcray_cli import clusters

    kind = clusters.kind_of(config)
    message = (f"Terminating the instances of AWS cluster {config}..." if kind == "aws"
               else f"Stopping Ray on every node of {config.strip()}..." if kind == "launcher"
               else f"Stopping Ray cluster {config.strip()}...")
    with _working(message):
        result = clusters.down(config, Path.cwd(), yes=yes)
    if result.stopped_runs:
        err.print(f"Stopped runs: {', '.join(result.stopped_runs)}", markup=False)
    if kind == "aws":
        from dvcray_cli.cli import cluster_aws

        cluster_aws.down_result(result)
        return
    if kind == "launcher":
        from dvcray_cli.cli import cluster_launcher

        cluster_launcher.down_result(result)
        return
    if not result.was_running:
        err.print(Text.assemble("Ray cluster ", (result.name, "bold"), " is not running; nothing to stop."))
        return
    err.print(Text.assemble("Stopped Ray cluster ", (result.name, "bold"), f" ({len(result.pids)} processes)."))


@boundary
def status(
    json_: Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")] = False,
) -> None:
    """Show the clusters dvcray started: nodes, CPUs, runs in progress, addresses;
    for AWS clusters, their instances, age and estimated cost so far; for clusters
    from other YAMLs (on-prem machines), their head and nodes.

    Example:

        dvcray cluster status --json
    """
    from rich.table import Table

    from dvcray_cli import clusters
    from dvcray_cli.cli import cluster_aws, cluster_launcher

    found = clusters.status()
    if json_:
        write_json(found.to_json())
        return
    for note in found.auto_downs:
        err.print(f"Ray cluster {note['name']} was taken down by its idle timeout "
                  f"({clusters.format_duration(note['timeout_s'])} without a dvcray run) at {note['at']}.",
                  markup=False)
    if not found.local:
        if found.aws:
            cluster_aws.status_rows(found.aws)
        if found.launcher:
            cluster_launcher.status_rows(found.launcher)
        if not found.aws and not found.launcher:
            err.print("No Ray cluster is running. Start one with: dvcray cluster up local")
        return
    table = Table("Cluster", "Nodes", "CPUs", "Runs", "Dashboard", "GCS")
    for c in found.local:
        runs = ", ".join(r["run_id"] for r in c["runs"]) or "-"
        pending = f" (+{len(c['pending'])} pending)" if c.get("pending") else ""
        table.add_row(Text(c["name"]), f"{len(c['nodes'])}{pending}", f"{c['cpus'] or 0:g}", Text(runs),
                      Text(c["dashboard_url"]), Text(c["gcs_address"]))
    out.print(table)
    for c in found.local:
        if c.get("autoscaling"):
            out.print(_nodes_table(c))
    for c in found.local:
        if c["error"]:
            err.print(f"{c['name']}: {c['error']}", markup=False)
        if c.get("autoscaler_error"):
            err.print(f"{c['name']}: the autoscaler reports: {c['autoscaler_error']}", markup=False)
    if found.aws:
        cluster_aws.status_rows(found.aws)
    if found.launcher:
        cluster_launcher.status_rows(found.launcher)


def _nodes_table(c: dict):
    """An autoscaling cluster's nodes, alive and pending, with their resources."""
    from rich.table import Table

    def shape(resources: dict) -> str:
        return ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) and k not in ("memory", "object_store_memory")
                         else f"{k} {v / 2**30:.1f} GiB" if isinstance(v, (int, float)) else f"{k} {v}"
                         for k, v in sorted(resources.items()))

    table = Table("Node", "Kind", "State", "Resources", title=Text(f"Nodes of {c['name']}"), title_justify="left")
    for n in c["nodes"]:
        table.add_row(Text(str(n["node_id"])[-12:]), "head" if n["is_head"] else "worker", "alive",
                      Text(shape(n["resources"])))
    for p in c.get("pending", []):
        table.add_row("-", Text(str(p["node_type"])), Text(str(p["state"])), Text(shape(p["resources"])))
    for w in c.get("waiting", []):
        table.add_row("-", "demand", f"{w['count']} waiting", Text(shape(w["resources"])))
    return table
