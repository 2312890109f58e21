"""AWS clusters through Ray's cluster launcher (DESIGN.md, "Clusters").

``up`` is three steps, each a function of its own:

1. ``plan``: load the YAML (``aws``, ``aws-gpu`` or a path), check it against
   Ray's own schema, fill in dvcray's ``{{ placeholders }}`` and make read-only
   checks in the account (credentials, region, instance types offered, images,
   store bucket). It creates nothing, anywhere: ``--dry-run`` stops here and
   prints the plan with a cost range from the shipped price table.
2. ``bootstrap``: the auth token (``.dvcray/clusters/<cluster>.token``, 0600),
   dvcray's IAM roles and instance profiles (the store bucket only; see
   ``config.node_policies``), then Ray's ``bootstrap_config(no_config_cache=True)``,
   which makes the key pair, picks subnets and makes the security group.
   No instance is created here.
3. ``launch``: Ray's ``create_or_update_cluster(no_config_cache=True)`` in a process
   of its own (``launcher.launch``, as for every launcher cluster), the SSH
   port-forward to the head's job API (``launcher.ssh``), and the record in ``.dvcray/``.
   Refuses to run when ``AWS_ENDPOINT_URL`` points at this machine: a fake
   endpoint (moto) hands out public IP addresses, and Ray would open SSH
   connections to them.

For the same reason as ``no_config_cache`` (see ``account``), ``down`` does not
use ``sdk.teardown_cluster`` (which bootstraps with the cache on) but Ray's node
provider directly.

What every launcher cluster gets (the token, dvcray's own wheel installed on every
node, the dashboard on the head's 127.0.0.1, the idle watcher) comes from
``dvcray_cli.clusters.launcher.config.with_additions``; the built-in AWS configs
spell some of it out themselves.

Modules: ``config`` (the structure AWS needs, names, policies), ``account`` (boto3,
IAM, instances), ``records``, ``pricing``; the launcher's ``config`` (YAML, schema,
placeholders, additions), ``ssh`` (the port-forward) and ``launch``.
boto3 and Ray are imported inside the functions that need them.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dvcray_cli import ray_api, state
from dvcray_cli.clusters import launcher
from dvcray_cli.clusters.aws import account, config as cfg, records
from dvcray_cli.clusters.launcher import Check, config as launcher_config, launch as launcher_launch, ssh
from dvcray_cli.clusters.aws.config import BUILT_INS, NodeTypePlan, is_aws_config
from dvcray_cli.clusters.aws.records import AwsCluster
from dvcray_cli.errors import ClusterError, DvcrayError, UsageError

__all__ = ["BUILT_INS", "AwsCluster", "AwsDown", "Bootstrapped", "Check", "NodeTypePlan", "Plan", "bootstrap",
           "down", "is_aws_config", "launch", "plan", "recorded_address", "status", "up"]

# Real AWS needs a few seconds before EC2 accepts a new instance profile (Ray waits 15 s).
IAM_PROPAGATION_S = 10.0
DEFAULT_IDLE_TIMEOUT_S = 3600.0


@dataclass
class Plan:
    """What ``up`` would do. Nothing in it has been created."""

    config_label: str          # what the user typed: aws, aws-gpu or a path
    source: str                # the YAML file it came from
    cluster_name: str
    region: str
    account: str | None
    repo_root: str
    state_dir: str             # <repo>/.dvcray (may not exist yet)
    store_url: str
    store_bucket: str
    idle_timeout_s: float
    token_path: str
    requirements_path: str     # what file_mounts ships as the project's requirements
    project_requirements: bool  # the project has a requirements.txt of its own
    node_types: list[NodeTypePlan]
    max_workers: int
    iam: dict[str, Any]        # {"head_role", "worker_role", "policies": {...}, "managed": bool}
    cost: dict[str, Any]
    checks: list[Check]
    config: dict[str, Any] = field(repr=False)   # the rendered Ray config
    kind: str = "aws"


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


def plan(config: str, cwd: Path, idle_timeout_s: float | None = None) -> Plan:
    """Everything ``up`` would do, checked read-only. Creates nothing, anywhere:
    not in AWS, not in the repo (no ``.dvcray/``), not under ``/tmp``.

    Args:
        config: ``aws``, ``aws-gpu`` or a YAML path whose provider is aws.
        cwd: a folder inside the project's git repository.
        idle_timeout_s: the idle auto-down (None: 60 minutes; 0: off).

    Raises:
        UsageError: the config is invalid, the region or an instance type or
            image does not exist, the project has no S3 store.
        ClusterError: no or bad credentials, AWS unreachable.
    """
    raw, source = cfg.load_config(config)
    cfg.check_structure(raw, source)
    cfg.validate_with_ray(raw, source)
    repo_root = _repo_root(cwd)
    repo_state = state.repo_dir(repo_root, create=False)
    store_url, bucket = _store_bucket(repo_root, cwd)
    idle = DEFAULT_IDLE_TIMEOUT_S if idle_timeout_s is None else float(idle_timeout_s)

    cluster_name = cfg.render(raw.get("cluster_name", "{{ cluster_name }}"),
                              {"cluster_name": cfg.default_cluster_name(first_commit(repo_root), config)})
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,59}", cluster_name):
        raise UsageError(f"Invalid cluster_name {cluster_name!r}.",
                         "Use letters, digits, '-', '_' and '.', 60 characters at most.")
    token_path = repo_state / "clusters" / f"{cluster_name}.token"
    own_requirements = (repo_root / "requirements.txt").is_file()
    requirements = repo_root / "requirements.txt" if own_requirements \
        else repo_state / "clusters" / f"{cluster_name}.requirements.txt"
    values = {
        "cluster_name": cluster_name,
        "ray_version": _ray_version(),
        "auth_token_file": str(token_path),
        "requirements_file": str(requirements),
        "head_instance_profile": cfg.iam_name(cluster_name, "head"),
        "worker_instance_profile": cfg.iam_name(cluster_name, "worker"),
        "idle_timeout_seconds": f"{int(idle)}",
    }
    rendered = cfg.render(copy.deepcopy(raw), values)
    rendered["cluster_name"] = cluster_name
    head_type = rendered["head_node_type"]
    managed: dict[str, bool] = {}
    for type_name, node_type in rendered["available_node_types"].items():
        node_config = node_type.setdefault("node_config", {})
        placeholder = "head_instance_profile" if type_name == head_type else "worker_instance_profile"
        raw_config = (raw["available_node_types"][type_name] or {}).get("node_config") or {}
        if "IamInstanceProfile" not in raw_config:
            # No profile of the user's own: dvcray's, never Ray's default (EC2 and S3 full access).
            node_config["IamInstanceProfile"] = {"Name": values[placeholder]}
            managed[type_name] = True
        else:
            managed[type_name] = cfg.uses(raw_config.get("IamInstanceProfile"), "head_instance_profile") \
                or cfg.uses(raw_config.get("IamInstanceProfile"), "worker_instance_profile")
    from dvcray_cli import __version__
    from dvcray_cli.clusters.launcher import wheel

    rendered = launcher_config.with_additions(rendered, token_path=str(token_path),
                                              wheel_path=str(wheel.default_path()), ray_version=values["ray_version"],
                                              dvcray_version=__version__, idle_timeout_s=idle)
    prepared = cfg.validate_with_ray(rendered, source)

    region = str(prepared["provider"]["region"])
    nodes = cfg.node_type_plans(prepared, managed)
    checks: list[Check] = []
    account_id = account.check_account(region, nodes, bucket, checks)
    cost = _cost(region, prepared, nodes)
    head_role, worker_role = cfg.iam_name(cluster_name, "head"), cfg.iam_name(cluster_name, "worker")
    iam = {"managed": any(managed.values()), "head_role": head_role, "worker_role": worker_role,
           "policies": cfg.node_policies(cluster_name, region, bucket, account_id or "ACCOUNT", worker_role,
                                         prefix=store_url[len("s3://"):].partition("/")[2],
                                         instance_types=[n.instance_type for n in nodes])}
    return Plan(config_label=config.strip(), source=str(source), cluster_name=cluster_name, region=region,
                account=account_id, repo_root=str(repo_root), state_dir=str(repo_state), store_url=store_url,
                store_bucket=bucket, idle_timeout_s=idle, token_path=str(token_path),
                requirements_path=str(requirements), project_requirements=own_requirements,
                node_types=nodes, max_workers=int(prepared.get("max_workers", 0)), iam=iam, cost=cost,
                checks=checks, config=rendered)


def _repo_root(cwd: Path) -> Path:
    from dvcray_cli.gitutil import git_root

    root = git_root(Path(cwd))
    if root is None:
        raise UsageError(f"{cwd} is not inside a git repository.",
                         "Run `dvcray cluster up aws` from inside your project: the cluster belongs to it.")
    return root


def first_commit(repo_root: Path) -> str:
    """The project's first commit: what every clone of it shares (the oldest root
    when histories were merged; the same in every clone).

    Raises:
        UsageError: the repository has no commit.
    """
    from dvcray_cli.gitutil import git

    roots = sorted(git("rev-list", "--max-parents=0", "HEAD", cwd=repo_root, check=False).split())
    if not roots:
        raise UsageError("The repository has no commit yet: a cluster is named after the project's first commit.",
                         "Commit your project first: git add -A && git commit -m 'start'")
    return roots[0]


def is_projects(name: str, repo_root: Path) -> bool:
    """Whether the cluster ``name`` is this project's: a config's default name
    (``dvcray-<first commit>-<config>``, the same in every clone; built-ins and files alike)."""
    try:
        return name.startswith(cfg.default_cluster_name(first_commit(repo_root), "x")[:-1])
    except UsageError:
        return False


def _store_bucket(repo_root: Path, cwd: Path) -> tuple[str, str]:
    """The project's store (its DVC default remote) and its bucket: the nodes'
    instance profiles may use this bucket and nothing else."""
    from dvcray_cli import store as store_mod

    url = None
    try:
        from dvc.repo import Repo

        with Repo(str(cwd)) as repo:
            url = store_mod.resolve(None, repo).url
    except DvcrayError:
        raise
    except Exception:  # noqa: BLE001 - not a DVC project: same message as a local store
        url = None
    if not url or not url.startswith("s3://"):
        raise UsageError("An AWS cluster needs an S3 store, and this project's DVC default remote is "
                         f"{'not on S3' if url else 'not set'}.",
                         "Set one: dvc remote add -d store s3://BUCKET/PREFIX (the nodes may use that bucket only).")
    bucket = url[len("s3://"):].split("/", 1)[0]
    if not bucket:
        raise UsageError(f"The store URL {url} names no bucket.")
    return url, bucket


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def _cost(region: str, prepared: dict[str, Any], nodes: list[NodeTypePlan]) -> dict[str, Any]:
    """The hourly range: the head and every type's minimum, up to the head and as
    many of the dearest workers as ``max_workers`` allows."""
    from dvcray_cli.clusters.aws import pricing

    counts = [pricing.NodeCount(n.instance_type, n.spot, n.min_count, n.max_count) for n in nodes]
    budget = int(prepared.get("max_workers", 0))
    workers = sorted((c for c, n in zip(counts, nodes) if n.role == "worker"),
                     key=lambda c: -((pricing.hourly(region, c.instance_type, c.spot) or (0, 0))[1]))
    for c in workers:
        c.max_count = max(c.min_count, min(c.max_count, budget))
        budget = max(0, budget - c.max_count)
    return pricing.estimate(region, counts).to_json()


def bootstrap(p: Plan, iam_wait_s: float = IAM_PROPAGATION_S) -> Bootstrapped:
    """Create what the cluster needs before any instance: the token, dvcray's IAM
    roles and instance profiles, and (through Ray's ``bootstrap_config``) the key
    pair and security group. Creates no instance.

    Args:
        p: the plan (``plan``).
        iam_wait_s: seconds to let a new instance profile propagate to EC2.
    """
    from dvcray_cli.clusters.launcher import wheel

    folder = state.repo_clusters_dir(Path(p.repo_root), create=True)
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


def launch(p: Plan, boot: Bootstrapped, forward_timeout: float = 300.0) -> AwsCluster:
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
                        key_path=boot.key_path, started_at=_now(), idle_timeout_s=p.idle_timeout_s,
                        node_types=[dataclasses.asdict(n) for n in p.node_types], known_hosts=str(known_hosts))
    records.write_record(record, Path(p.state_dir))
    ssh.wait_job_api(record, forward_timeout)
    return record


def up(config: str, cwd: Path, idle_timeout_s: float | None = None) -> tuple[Plan, Bootstrapped, AwsCluster]:
    """``plan``, ``bootstrap``, ``launch``."""
    p = plan(config, cwd, idle_timeout_s)
    account.refuse_fake_endpoint()
    boot = bootstrap(p)
    return p, boot, launch(p, boot)


def down(config: str, cwd: Path, yes: bool = False) -> AwsDown:
    """Terminate every instance of the cluster, stop its port-forward, remove its record.

    Works without a record too (it was lost, or the idle watcher already took
    the cluster down): the instances are found by their cluster tag.

    Raises:
        UsageError: dvcray runs are in progress and ``yes`` is False.
    """
    raw, source = cfg.load_config(config)
    cfg.check_structure(raw, source)
    repo_root = _repo_root(cwd)
    cluster_name = cfg.render(raw.get("cluster_name", "{{ cluster_name }}"),
                              {"cluster_name": cfg.default_cluster_name(first_commit(repo_root), config)})
    provider_config = raw["provider"]
    repo_state = state.repo_dir(repo_root, create=False)
    record = records.load(repo_state / "clusters" / f"{cluster_name}.json")
    stopped: list[str] = []
    if record is not None:
        opened = ssh.ensure_forward(record, lambda r: records.write_record(r, repo_state))
        stopped = launcher.stop_runs(opened, yes, config, lambda r: records.write_record(r, repo_state))
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


def recorded_address(cwd: Path) -> str | None:
    """The job API of this project's AWS cluster (through its port-forward), or None:
    one recorded in this clone, else one another clone of the project recorded
    on this machine (clusters are named after the project's first commit)."""
    from dvcray_cli.gitutil import git_root

    root = git_root(Path(cwd))
    if root is None:
        return None
    found = records.repo_records(cwd)
    if found:
        repo_state = state.repo_dir(root, create=False)
        return ssh.ensure_forward(found[0], lambda r: records.write_record(r, repo_state)).dashboard_url
    for record, path in sorted(records.records(), key=lambda item: item[0].started_at, reverse=True):
        if is_projects(record.name, root):
            return ssh.ensure_forward(record, lambda r, where=path.parent.parent: records.write_record(r, where)).dashboard_url
    return None


def _at(address: str) -> tuple[AwsCluster, Path] | None:
    url = ray_api.normalize(address)
    return next(((r, p) for r, p in records.records() if r.dashboard_url == url), None)


def recorded_at(address: str) -> bool:
    return _at(address) is not None


def service_url(address: str, head_port: int) -> str | None:
    """The runner service on ``head_port`` of the recorded AWS cluster at ``address``,
    through its port-forward (``ssh.ensure_service_forward``); None when none is recorded there."""
    found = _at(address)
    if found is None:
        return None
    record, path = found
    return launcher.service_reach(record, lambda r: records.write_record(r, path.parent.parent),
                                  lambda: records.load(path))(head_port)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
