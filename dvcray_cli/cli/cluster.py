"""``dvcray cluster up|down|status``."""

from __future__ import annotations

import contextlib
from typing import Annotated, Iterator

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
def up(config: ConfigArg = "local") -> None:
    """Start a Ray cluster and wait until it takes jobs; a no-op if it already runs.

    The local cluster runs on this machine with token authentication on; its
    dashboard and job API listen on 127.0.0.1 only.

    Example:

        dvcray cluster up local
    """
    from dvcray_cli import cluster as core

    name = core.check_name(config)
    with _working(f"Starting Ray cluster {name} unless it runs (this takes a few seconds)..."):
        cluster, started = core.up(name)
    cpus = f"{cluster.num_cpus:g} CPUs" if cluster.num_cpus else "CPUs unknown"
    if started:
        err.print(f"Started Ray cluster [bold]{cluster.name}[/] ({cpus}).")
    else:
        err.print(f"Ray cluster [bold]{cluster.name}[/] is already running (since {cluster.started_at}); nothing to do.")
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
    from dvcray_cli import cluster as core

    name = core.check_name(config)
    with _working(f"Stopping Ray cluster {name}..."):
        result = core.down(name, yes=yes)
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
    """Show the clusters dvcray started: nodes, CPUs, runs in progress, addresses.

    Example:

        dvcray cluster status --json
    """
    from rich.table import Table

    from dvcray_cli import cluster as core

    clusters = core.status()
    if json_:
        write_json(clusters)
        return
    if not clusters:
        err.print("No Ray cluster is running. Start one with: dvcray cluster up local")
        return
    table = Table("Cluster", "Nodes", "CPUs", "Runs", "Dashboard", "GCS")
    for c in clusters:
        runs = ", ".join(r["run_id"] for r in c["runs"]) or "-"
        table.add_row(c["name"], str(len(c["nodes"])), f"{c['cpus'] or 0:g}", runs,
                      c["dashboard_url"], c["gcs_address"])
    out.print(table)
    for c in clusters:
        if c["error"]:
            err.print(f"{c['name']}: {c['error']}", markup=False)
