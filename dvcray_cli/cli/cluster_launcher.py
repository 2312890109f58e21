"""``dvcray cluster up|down|status`` for clusters from any Ray YAML (on-prem machines,
other clouds): rendering only (core: ``dvcray_cli.clusters.launcher``)."""

from __future__ import annotations

from typing import Any

from rich.text import Text

from dvcray_cli.cli._common import err, out, print_idle_timeout


def show_plan(p: Any, dry_run: bool) -> None:
    """The plan, on stdout: where Ray starts, what runs on each node, what dvcray adds."""
    out.print(Text.assemble(("Ray cluster " + p.cluster_name, "bold"), f" from {p.config_label} ({p.source})"))
    out.print(f"  Provider:      {p.provider}" + (" (on-prem machines over SSH)" if p.on_prem else
                                                   " (through Ray's launcher; not tested by dvcray)"), markup=False)
    if p.on_prem:
        out.print(f"  Head:          {p.head_ip}", markup=False)
        out.print(f"  Workers:       {', '.join(p.worker_ips) or 'none'} (started by the head's autoscaler; "
                  f"up waits for {p.min_workers})", markup=False)
    else:
        out.print(f"  Workers:       at most {p.max_workers}, started by Ray's autoscaler on demand", markup=False)
    out.print(f"  SSH:           as {p.ssh_user or '(Ray default)'} with {p.key_path}", markup=False)
    config = p.config
    for title, key in (("On every node", "setup_commands"), ("On the head", "head_setup_commands"),
                       ("On workers", "worker_setup_commands"), ("Starts the head", "head_start_ray_commands"),
                       ("Starts workers", "worker_start_ray_commands")):
        commands = config.get(key) or []
        if commands:
            out.print(f"  {title}:", markup=False)
            for command in commands:
                out.print(f"    $ {command}", markup=False, soft_wrap=True)
    mounts = config.get("file_mounts") or {}
    if mounts:
        out.print("  Copies:", markup=False)
        for remote, local in mounts.items():
            out.print(f"    {local} -> {remote}", markup=False, soft_wrap=True)
    out.print("  dvcray adds:", markup=False)
    for line in p.additions:
        out.print(f"    - {line}", markup=False)
    print_idle_timeout(p.idle_timeout_s, "Ray stops on every node after {idle} without a dvcray run")
    out.print(f"  Auth token:    {p.token_path} (mode 0600), shipped to every node", markup=False)
    for check in p.checks:
        mark = "ok" if check.ok else "warning"
        out.print(f"  Check {check.name}: {mark}: {check.detail}", markup=False)
    if dry_run:
        err.print(f"Dry run: nothing was started. Start it with: dvcray cluster up {p.config_label}", markup=False)


def up_result(result: Any) -> None:
    err.print(Text.assemble("Started Ray cluster ", (result.name, "bold"), f" (head {result.head_ip}"
                            + (f", workers {', '.join(result.workers)}" if result.workers else "") + ")."))
    if result.idle_timeout_s:
        from dvcray_cli.clusters import format_duration

        err.print(f"Idle timeout: {format_duration(result.idle_timeout_s)} (Ray stops on every node after that "
                  "long with no dvcray run).", markup=False)
    err.print(f"Job API through the SSH port-forward: {result.dashboard_url}", markup=False)
    err.print("`dvcray run` in this project (any clone of it) uses it. Stop it with: "
              f"dvcray cluster down {result.config_label}", markup=False)


def down_result(result: Any) -> None:
    if not result.was_running:
        err.print(Text.assemble("Ray cluster ", (result.name, "bold"), " is not recorded; Ray's teardown ran "
                                "anyway."))
    elif result.provider == "local":
        err.print(Text.assemble("Stopped Ray cluster ", (result.name, "bold"),
                                f": Ray stopped on {', '.join(result.nodes) or 'no machine'}."))
    else:
        err.print(Text.assemble("Took down Ray cluster ", (result.name, "bold"), " through Ray's launcher."))
    if result.unreachable:
        err.print(f"Not reached over SSH (nothing could be stopped there): {', '.join(result.unreachable)}",
                  markup=False)


def status_rows(clusters: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table("Cluster", "Provider", "Head", "Nodes", "CPUs", "Runs", "Job API")
    for c in clusters:
        if c.get("state") == "gone":
            table.add_row(Text(c["name"]), c["provider"], Text(c["head_ip"]), "gone", "-", "-", "-")
            continue
        runs = ", ".join(r["run_id"] for r in c["runs"]) or "-"
        nodes = "?" if c["error"] else str(len(c["nodes"]))
        cpus = "?" if c["cpus"] is None else f"{c['cpus']:g}"
        table.add_row(Text(c["name"]), c["provider"], Text(c["head_ip"]), nodes, cpus, Text(runs),
                      Text(c["dashboard_url"]))
    out.print(table)
    for c in clusters:
        if c.get("error"):
            err.print(f"{c['name']}: {c['error']}", markup=False)
        elif c.get("state") == "gone":
            err.print(f"Ray cluster {c['name']} is gone: Ray no longer runs on its head {c['head_ip']} (its idle "
                      "watcher took it down, or it was stopped). Its record was removed.", markup=False)
