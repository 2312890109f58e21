"""``dvcray cluster up|down|status``."""

from __future__ import annotations

import contextlib
from typing import Annotated, Iterator, Optional

import typer

from dvcray_cli.cli._common import boundary, err, out, plain_output, write_json

ConfigArg = Annotated[str, typer.Argument(
    metavar="[CONFIG]",
    help="A built-in cluster (local, local-multinode, aws, aws-gpu) or a Ray cluster YAML path.")]


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Start, stop and inspect Ray clusters.", no_args_is_help=True)
    group.command()(up)
    group.command()(down)
    group.command()(status)
    app.add_typer(group, name="cluster")


@contextlib.contextmanager
def _working(message: str) -> Iterator[None]:
    if plain_output():
        err.print(message)
        yield
    else:
        with err.status(message):
            yield


@boundary
def up(
    config: ConfigArg = "local",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan (and, for AWS, the cost); create nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before creating cloud resources.")] = False,
    idle_timeout: Annotated[Optional[str], typer.Option("--idle-timeout", metavar="DURATION", help="Take the whole cluster down after this long with no dvcray run, e.g. 30m, 90s, 1h; 0 = never. Default: 60m on AWS, never for local.", show_default=False)] = None,
) -> None:
    """Start a Ray cluster and wait until it takes jobs; a no-op if it already runs.

    The local cluster runs on this machine with token authentication on; its
    dashboard and job API listen on 127.0.0.1 only. `aws` and `aws-gpu` (or a
    YAML file whose provider is aws) start a cluster on AWS through Ray's
    cluster launcher: run `--dry-run` first to see the plan and its cost.

    Example:

        dvcray cluster up local --idle-timeout 30m
        dvcray cluster up aws --dry-run
    """
    from dvcray_cli import aws

    if aws.is_aws_config(config):
        from dvcray_cli.cli import cluster_aws

        cluster_aws.up(config, dry_run=dry_run, yes=yes, idle_timeout=idle_timeout)
        return
    from dvcray_cli import cluster as core
    from dvcray_cli import idle

    name = core.check_name(config)
    timeout = idle.parse_duration(idle_timeout) if idle_timeout is not None else None
    if dry_run:
        err.print(f"Dry run: would start Ray cluster {name} on this machine unless it runs"
                  f"{'' if not timeout else f', idle timeout {idle.format_duration(timeout)}'}; nothing was started.",
                  markup=False)
        return
    with _working(f"Starting Ray cluster {name} unless it runs (this takes a few seconds)..."):
        cluster, started = core.up(name)
    cpus = f"{cluster.num_cpus:g} CPUs" if cluster.num_cpus else "CPUs unknown"
    if started:
        err.print(f"Started Ray cluster [bold]{cluster.name}[/] ({cpus}).")
    else:
        err.print(f"Ray cluster [bold]{cluster.name}[/] is already running (since {cluster.started_at}); nothing to do.")
    if timeout is not None:
        watcher = idle.arm(cluster.name, timeout)
        if watcher:
            err.print(f"Idle timeout: {idle.format_duration(timeout)} (it stops itself after that long with no dvcray run).",
                      markup=False)
    if cluster.autoscaling_config:
        err.print("Its autoscaler adds and removes worker nodes with the load: dvcray cluster status shows them.",
                  markup=False)
    err.print(f"Dashboard and job API: {cluster.dashboard_url}", markup=False)
    err.print(f"Stop it with: dvcray cluster down {cluster.name}", markup=False)


@boundary
def down(
    config: ConfigArg = "local",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Also stop runs that are still in progress.")] = False,
) -> None:
    """Stop a Ray cluster: every process it started, nothing else.

    Refuses while dvcray runs are in progress on it, unless --yes (then they get
    SIGTERM and a few seconds to save their results first).

    Example:

        dvcray cluster down local --yes
    """
    from dvcray_cli import aws

    if aws.is_aws_config(config):
        from dvcray_cli.cli import cluster_aws

        cluster_aws.down(config, yes=yes)
        return
    from dvcray_cli import cluster as core
    from dvcray_cli import idle

    name = core.check_name(config)
    with _working(f"Stopping Ray cluster {name}..."):
        result = core.down(name, yes=yes)
    idle.disarm(name)
    if result.cluster is None:
        err.print(f"Ray cluster [bold]{result.name}[/] is not running; nothing to stop.")
        return
    if result.stopped_runs:
        err.print(f"Stopped runs: {', '.join(result.stopped_runs)}", markup=False)
    err.print(f"Stopped Ray cluster [bold]{result.name}[/] ({len(result.pids)} processes).")


@boundary
def status(
    json_: Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")] = False,
) -> None:
    """Show the clusters dvcray started: nodes, CPUs, runs in progress, addresses;
    for AWS clusters, their instances, age and estimated cost so far.

    Example:

        dvcray cluster status --json
    """
    from rich.table import Table

    from dvcray_cli import aws, idle
    from dvcray_cli import cluster as core
    from dvcray_cli.cli import cluster_aws

    clusters = core.status()
    for c in clusters:
        watcher = idle.watcher(c["name"])
        c["idle_timeout_s"] = watcher["timeout_s"] if watcher else None
    in_aws = aws.status()
    if json_:
        write_json(clusters + in_aws)
        return
    for note in idle.auto_downs():
        if not any(c["name"] == note["name"] for c in clusters):
            err.print(f"Ray cluster {note['name']} was taken down by its idle timeout "
                      f"({idle.format_duration(note['timeout_s'])} without a dvcray run) at {note['at']}.", markup=False)
    if not clusters:
        if in_aws:
            cluster_aws.status_rows(in_aws)
        else:
            err.print("No Ray cluster is running. Start one with: dvcray cluster up local")
        return
    table = Table("Cluster", "Nodes", "CPUs", "Runs", "Dashboard", "GCS")
    for c in clusters:
        runs = ", ".join(r["run_id"] for r in c["runs"]) or "-"
        pending = f" (+{len(c['pending'])} pending)" if c.get("pending") else ""
        table.add_row(c["name"], f"{len(c['nodes'])}{pending}", f"{c['cpus'] or 0:g}", runs,
                      c["dashboard_url"], c["gcs_address"])
    out.print(table)
    for c in clusters:
        if c.get("autoscaling"):
            out.print(_nodes_table(c))
    for c in clusters:
        if c["error"]:
            err.print(f"{c['name']}: {c['error']}", markup=False)
        if c.get("autoscaler_error"):
            err.print(f"{c['name']}: the autoscaler reports: {c['autoscaler_error']}", markup=False)
    if in_aws:
        cluster_aws.status_rows(in_aws)


def _nodes_table(c: dict):
    """An autoscaling cluster's nodes, alive and pending, with their resources."""
    from rich.table import Table

    def shape(resources: dict) -> str:
        return ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) and k not in ("memory", "object_store_memory")
                         else f"{k} {v / 2**30:.1f} GiB" if isinstance(v, (int, float)) else f"{k} {v}"
                         for k, v in sorted(resources.items()))

    table = Table("Node", "Kind", "State", "Resources", title=f"Nodes of {c['name']}", title_justify="left")
    for n in c["nodes"]:
        table.add_row(str(n["node_id"])[-12:], "head" if n["is_head"] else "worker", "alive", shape(n["resources"]))
    for p in c.get("pending", []):
        table.add_row("-", p["node_type"], p["state"], shape(p["resources"]))
    for w in c.get("waiting", []):
        table.add_row("-", "demand", f"{w['count']} waiting", shape(w["resources"]))
    return table
