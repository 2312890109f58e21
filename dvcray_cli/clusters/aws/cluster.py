"""``up``, ``down`` and ``status`` of an AWS cluster.

``up`` is ``bootstrap`` then ``launch``, after ``planning.plan``:

- ``bootstrap``: the auth token (``.dvcray/clusters/<cluster>.token``, 0600),
  dvcray's IAM roles and instance profiles (the store bucket only; see
  ``config.node_policies``), then Ray's ``bootstrap_config(no_config_cache=True)``,
  which makes the key pair, picks subnets and makes the security group.
  No instance is created here.
- ``launch``: Ray's ``create_or_update_cluster(no_config_cache=True)`` in a process
  of its own (``launcher.launch``, as for every launcher cluster), the SSH
  port-forward to the head's job API (``launcher.ssh``), and the record in ``.dvcray/``.

Both refuse to run when ``AWS_ENDPOINT_URL`` points at this machine: a fake endpoint
(moto) hands out public IP addresses, and Ray would open SSH connections to them.
For the same reason as ``no_config_cache`` (see ``account``), ``down`` does not use
``sdk.teardown_cluster`` (which bootstraps with the cache on) but Ray's node provider
directly.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dvcray_cli import ray_api, files
from dvcray_cli.clusters.aws import account, config as cfg, records
from dvcray_cli.clusters.aws.planning import AwsPlan, find_repo_root, first_commit
from dvcray_cli.clusters.aws.records import AwsCluster
from dvcray_cli.clusters.common import Say, quiet, utc_now
from dvcray_cli.clusters.launcher import launch as launcher_launch, ssh, stop_runs
from dvcray_cli.errors import ClusterError, DvcrayError

# Real AWS needs a few seconds before EC2 accepts a new instance profile (Ray waits 15 s).
IAM_PROPAGATION_S = 10.0


@dataclass
class Bootstrapped:
    """What the bootstrap step created or found."""

    created: list[str]
    existing: list[str]
    key_name: str
    key_path: str
    security_groups: list[str]
    subnets: list[str]
    config_path: str
    resolved: dict[str, Any] = field(repr=False)


@dataclass
class AwsDown:
    """What ``down`` did."""

    name: str
    region: str
    terminated: list[str]
    stopped_runs: list[str]
    recorded: bool


def bootstrap(p: AwsPlan, iam_wait_s: float = IAM_PROPAGATION_S) -> Bootstrapped:
    """Create what the cluster needs before any instance: the token, dvcray's IAM
    roles and instance profiles, and (through Ray's ``bootstrap_config``) the key
    pair and security group. Creates no instance.

    Args:
        p: the plan (``plan``).
        iam_wait_s: seconds to let a new instance profile propagate to EC2.
    """
    from dvcray_cli.clusters.launcher import wheel

    folder = files.repo_clusters_dir(Path(p.repo_root), create=True)
    ray_api.ensure_token(Path(p.token_path))
    os.chmod(p.token_path, 0o600)
    wheel.build()
    if not p.project_requirements and not Path(p.requirements_path).exists():
        Path(p.requirements_path).write_text("# This project has no requirements.txt.\n")

    created: list[str] = []
    existing: list[str] = []
    if p.iam["managed"]:
        new_profiles = account.ensure_iam(p, created, existing)
        if new_profiles and iam_wait_s > 0:
            time.sleep(iam_wait_s)

    config_path = folder / f"{p.cluster_name}.yaml"
    _write_yaml(config_path, p.config)
    resolved = account.ray_bootstrap(p.config)
    key_name = ""
    groups: set[str] = set()
    subnets: set[str] = set()
    for node_type in resolved["available_node_types"].values():
        node_config = node_type.get("node_config", {})
        key_name = node_config.get("KeyName", key_name)
        groups.update(node_config.get("SecurityGroupIds", []))
        subnets.update(node_config.get("SubnetIds", []))
    return Bootstrapped(created=created, existing=existing, key_name=key_name,
                        key_path=str(resolved.get("auth", {}).get("ssh_private_key", "")),
                        security_groups=sorted(groups), subnets=sorted(subnets),
                        config_path=str(config_path), resolved=resolved)


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    path.write_text("# Written by `dvcray cluster up`: the config as launched.\n"
                    + yaml.safe_dump(data, sort_keys=False))


def launch(p: AwsPlan, boot: Bootstrapped, forward_timeout: float = 300.0) -> AwsCluster:
    """Start the head through Ray's launcher (the autoscaler on the head starts
    workers), open the port-forward to its job API and record the cluster."""
    account.refuse_fake_endpoint()
    log = Path(boot.config_path).with_suffix(".up.log")
    try:
        launcher_launch.run("up", Path(boot.config_path), log)
    except ClusterError as exc:
        if launcher_launch.REFUSED in exc.message:
            # AWS refused the head (a quota, capacity): no instance was made.
            raise ClusterError(exc.message, "No instance was launched. A quota is raised in AWS's Service Quotas "
                                            "console; or pick another instance type or region.") from None
        raise ClusterError(exc.message, f"Inspect: ray attach {boot.config_path}; stop everything: "
                                        f"dvcray cluster down {p.config_label} --yes") from None
    head_ip = account.head_ip(p.config)
    if not head_ip:
        raise ClusterError("The head node has no public IP address.",
                           f"Stop it: dvcray cluster down {p.config_label} --yes")
    ssh_user = str(boot.resolved.get("auth", {}).get("ssh_user", "ubuntu"))
    from dvcray_cli.clusters import procs

    port = procs.pick_port(None)
    known_hosts = Path(p.state_dir) / "known_hosts"
    ssh.forget_host(head_ip, known_hosts)
    pid = ssh.start_forward(head_ip, ssh_user, boot.key_path, port, known_hosts)
    record = AwsCluster(name=p.cluster_name, config_label=p.config_label, config_path=boot.config_path,
                        region=p.region, token_path=p.token_path, dashboard_url=f"http://127.0.0.1:{port}",
                        forward_port=port, forward_pid=pid, head_ip=head_ip, ssh_user=ssh_user,
                        key_path=boot.key_path, started_at=utc_now(), idle_timeout_s=p.idle_timeout_s,
                        node_types=[dataclasses.asdict(n) for n in p.node_types], known_hosts=str(known_hosts))
    records.write_record(record, Path(p.state_dir))
    ssh.wait_job_api(record, forward_timeout)
    return record


def up(p: AwsPlan, say: Say = quiet) -> AwsCluster:
    """Bootstrap, then launch the planned cluster (``say`` tells what it does).

    Raises:
        ClusterError: ``AWS_ENDPOINT_URL`` points at this machine, or a step failed.
    """
    account.refuse_fake_endpoint()
    say("Creating IAM roles, key pair and security group...")
    boot = bootstrap(p)
    for item in boot.created:
        say(f"  created {item}")
    say("Launching the head through Ray's cluster launcher (setup takes several minutes)...")
    return launch(p, boot)


def down(config: str, cwd: Path, yes: bool = False) -> AwsDown:
    """Terminate every instance of the cluster, stop its port-forward, remove its record.

    Works without a record too (it was lost, or the idle watcher already took
    the cluster down): the instances are found by their cluster tag.

    Raises:
        UsageError: dvcray runs are in progress and ``yes`` is False.
    """
    raw, source = cfg.load_config(config)
    cfg.check_structure(raw, source)
    repo_root = find_repo_root(cwd)
    cluster_name = cfg.render(raw.get("cluster_name", "{{ cluster_name }}"),
                              {"cluster_name": cfg.default_cluster_name(first_commit(repo_root), config)})
    provider_config = raw["provider"]
    repo_state = files.repo_dir(repo_root, create=False)
    record = records.load(repo_state / "clusters" / f"{cluster_name}.json")
    stopped: list[str] = []
    if record is not None:
        opened = ssh.ensure_forward(record, lambda r: records.write_record(r, repo_state))
        stopped = stop_runs(opened, yes, config, lambda r: records.write_record(r, repo_state))
    ids = account.terminate_cluster(provider_config, cluster_name)
    if record is not None:
        ssh.stop_forward(record)
    records.remove_record(cluster_name, repo_state)
    return AwsDown(name=cluster_name, region=str(provider_config["region"]), terminated=ids,
                   stopped_runs=stopped, recorded=record is not None)


def status() -> list[dict[str, Any]]:
    """Every recorded AWS cluster: its instances (type, spot, age), the cluster's
    age and estimated cost so far. A cluster whose instances cannot be seen (its
    idle watcher took it down, someone terminated them, or they are there but
    not visible to this AWS identity or region) is reported as such; its record
    stays until ``down`` (never forget a cluster on an empty answer)."""
    from dvcray_cli.clusters.aws import pricing

    entries = []
    for record, path in records.records():
        entry: dict[str, Any] = {
            "name": record.name, "kind": "aws", "config": record.config_label, "region": record.region,
            "alive": None, "dashboard_url": record.dashboard_url, "started_at": record.started_at,
            "age_s": _age_s(record.started_at), "idle_timeout_s": record.idle_timeout_s,
            "instances": [], "cost_so_far_usd": None, "error": None,
        }
        try:
            instances = account.instances(record.region, record.name)
        except DvcrayError as exc:
            entry["error"] = exc.message
            entries.append(entry)
            continue
        for inst in instances:
            price = pricing.hourly(record.region, inst["instance_type"], inst["spot"])
            inst["usd_per_hour"] = [round(price[0], 4), round(price[1], 4)] if price else None
        entry["instances"] = instances
        entry["alive"] = bool(instances)
        if instances:
            low, high, unpriced = pricing.cost_so_far(record.region, [
                {"instance_type": i["instance_type"], "spot": i["spot"], "hours": i["age_s"] / 3600}
                for i in instances])
            entry["cost_so_far_usd"] = {"low": round(low, 2), "high": round(high, 2), "unpriced": unpriced,
                                        "as_of": pricing.table()["as_of"]}
        else:
            entry["state"] = "no instances found"
        entries.append(entry)
    return entries


def _age_s(started_at: str) -> float:
    try:
        start = datetime.fromisoformat(started_at)
    except ValueError:
        return 0.0
    return max(0.0, (datetime.now(timezone.utc) - start).total_seconds())
