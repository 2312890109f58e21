"""``dvcray cluster up|down|status`` for AWS clusters: rendering only (core: ``dvcray_cli.clusters.aws``)."""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.text import Text

from dvcray_cli.cli._common import err, out, print_idle_timeout
from dvcray_cli.errors import UsageError


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 0.1 or value == 0 else f"${value:,.3f}"


def _usd_range(low: float, high: float, sep: str = "-") -> str:
    return _usd(low) if low == high else f"{_usd(low)}{sep}{_usd(high)}"


def show_plan(p: Any, dry_run: bool) -> None:
    """The plan, on stdout: what would be created, where, and what it costs."""
    out.print(Text.assemble(("AWS cluster " + p.cluster_name, "bold"), f" from {p.config_label} ({p.source})"))
    out.print(f"  Region:        {p.region} (account {p.account})", markup=False)
    for n in p.node_types:
        count = "1" if n.role == "head" else f"{n.min_count}-{n.max_count}"
        market = "spot" if n.spot else "on-demand"
        shape = f"{n.shape}; " if n.shape else ""
        extra = ", 0 CPUs for Ray tasks" if n.role == "head" else ""
        out.print(f"  {n.role.capitalize() + ':':<14} {count} x {n.instance_type} ({shape}{market}{extra}), "
                  f"image {n.image_id}, node type {n.name}", markup=False)
    out.print(f"  Workers:       at most {p.max_workers}, started by Ray's autoscaler on demand", markup=False)
    cost = p.cost
    line = f"  Cost:          {_usd(cost['low_usd_per_hour'])} to {_usd(cost['high_usd_per_hour'])} per hour"
    out.print(line + f" (an estimate from dvcray's price table of {cost['as_of']})", markup=False)
    if cost["unpriced"]:
        out.print(f"                 not in the price table, so not counted: {', '.join(cost['unpriced'])}",
                  markup=False)
    out.print(f"                 {cost['note']}", markup=False)
    print_idle_timeout(p.idle_timeout_s, "the head takes the whole cluster down after {idle} without a dvcray run")
    out.print(f"  Store:         {p.store_url} (the nodes' only S3 access)", markup=False)
    verb = "Would create" if dry_run else "Creates"
    if p.iam["managed"]:
        out.print(f"  {verb}:  IAM roles and instance profiles {p.iam['head_role']}, {p.iam['worker_role']} "
                  f"(bucket {p.store_bucket} only; the head may also launch and terminate this cluster's "
                  "instances)", markup=False)
    out.print(f"  {verb}:  through Ray: key pair ray-autoscaler_{p.region}, security group "
              f"ray-autoscaler-{p.cluster_name} (SSH in; nothing else open), then the head instance",
              markup=False)
    out.print(f"  Auth token:    {p.token_path} (mode 0600), shipped to every node", markup=False)
    out.print("  Job API:       through an SSH port-forward to the head's 127.0.0.1:8265, never open to the internet",
              markup=False)
    for check in p.checks:
        mark = "ok" if check.ok else "warning"
        out.print(f"  Check {check.name}: {mark}: {check.detail}", markup=False)


def up(p: Any, dry_run: bool, yes: bool) -> None:
    """Show an AWS plan; unless a dry run, confirm, then bootstrap and launch it."""
    from dvcray_cli import clusters

    show_plan(p, dry_run)
    if dry_run:
        err.print("Dry run: nothing was created. Start it with: "
                  f"dvcray cluster up {p.config_label}", markup=False)
        return
    clusters.refuse_fake_endpoint()
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("Starting an AWS cluster costs money: confirm with --yes when not at a terminal.",
                             f"dvcray cluster up {p.config_label} --yes")
        if not typer.confirm("Create these AWS resources and start the cluster?", default=False):
            err.print("Nothing was created.")
            raise typer.Exit(0)
    result = clusters.up(p, say=lambda m: err.print(m, markup=False))
    err.print(Text.assemble("Started AWS cluster ", (result.name, "bold"), f" (head {result.head_ip})."))
    err.print(f"Job API through the port-forward: {result.dashboard_url}", markup=False)
    err.print(f"`dvcray run` in this project uses it. Stop it with: dvcray cluster down {p.config_label} --yes",
              markup=False)


def down_result(result: Any) -> None:
    """What ``down`` of an AWS cluster did."""
    if result.terminated:
        err.print(Text.assemble(f"Terminated {len(result.terminated)} instance(s) of AWS cluster ",
                                (result.name, "bold"), f" in {result.region}: {', '.join(result.terminated)}"))
    else:
        err.print(Text.assemble("AWS cluster ", (result.name, "bold"),
                                f" has no running instances in {result.region}; nothing to terminate."))
    err.print("Left in place (free of charge, reused by the next `up`): IAM roles and instance profiles, "
              "key pair, security group.", markup=False)


def status_rows(clusters: list[dict[str, Any]]) -> None:
    """AWS clusters after the local ones: instances, age, estimated cost so far."""
    from rich.table import Table

    from dvcray_cli.clusters import format_duration

    table = Table("AWS cluster", "Region", "Instances", "Age", "Cost so far (est.)", "Idle timeout", "Job API")
    for c in clusters:
        if c.get("error"):
            table.add_row(Text(c["name"]), Text(c["region"]), "?", format_duration(c["age_s"]), "?",
                          format_duration(c["idle_timeout_s"]), Text(c["dashboard_url"]))
            continue
        if not c["alive"]:
            table.add_row(Text(c["name"]), Text(c["region"]), "none found", "-", "-",
                          format_duration(c["idle_timeout_s"]), "-")
            continue
        kinds: dict[str, int] = {}
        for inst in c["instances"]:
            key = f"{inst['instance_type']}{' spot' if inst['spot'] else ''} ({inst['kind']})"
            kinds[key] = kinds.get(key, 0) + 1
        instances = ", ".join(f"{n} x {k}" for k, n in kinds.items())
        cost = c["cost_so_far_usd"]
        spent = (_usd(cost["low"]) if cost["low"] == cost["high"] else f"{_usd(cost['low'])}-{_usd(cost['high'])}")
        if cost["unpriced"]:
            spent += f" (+ unpriced {', '.join(cost['unpriced'])})"
        table.add_row(Text(c["name"]), Text(c["region"]), Text(instances), format_duration(c["age_s"]), Text(spent),
                      format_duration(c["idle_timeout_s"]), Text(c["dashboard_url"]))
    out.print(table)
    for c in clusters:
        if c.get("error"):
            err.print(f"{c['name']}: {c['error']}", markup=False)
        elif c["alive"]:
            prices = [i.get("usd_per_hour") for i in c["instances"]]
            total = _usd_range(sum(p[0] for p in prices if p), sum(p[1] for p in prices if p), " to ")
            each = ", ".join(f"{i['instance_type']}{' spot' if i['spot'] else ''} "
                             + (f"{_usd_range(*i['usd_per_hour'])}/h" if i.get("usd_per_hour") else "(not priced)")
                             for i in c["instances"])
            err.print(f"AWS cluster {c['name']} costs {total} per hour now (est.): {each}", markup=False)
        else:
            err.print(f"AWS cluster {c['name']} has no running instances that your AWS identity can see in "
                      f"{c['region']} (its idle watcher may have taken it down, or they were terminated). Its "
                      f"record is kept until: dvcray cluster down {c.get('config') or 'aws'}", markup=False)
    if any(c.get("cost_so_far_usd") for c in clusters):
        as_of = next(c["cost_so_far_usd"]["as_of"] for c in clusters if c.get("cost_so_far_usd"))
        err.print(f"Costs are estimates from dvcray's price table of {as_of} (instances only).", markup=False)
