"""``plan`` of an AWS cluster: load the YAML (``aws``, ``aws-gpu`` or a path), check it
against Ray's own schema, fill in dvcray's ``{{ placeholders }}`` and make read-only
checks in the account (credentials, region, instance types offered, images, store
bucket). It creates nothing, anywhere: ``--dry-run`` stops here and prints the plan
with a cost range from the shipped price table.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvcray_cli import files
from dvcray_cli.clusters.aws import account, config as cfg
from dvcray_cli.clusters.aws.config import BUILT_INS, NodeTypePlan
from dvcray_cli.clusters.launcher import Check, config as launcher_config
from dvcray_cli.errors import DvcrayError, UsageError

DEFAULT_IDLE_TIMEOUT_S = 3600.0


@dataclass
class AwsPlan:
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


def plan(config: str, cwd: Path, idle_timeout_s: float | None = None) -> AwsPlan:
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
    repo_root = find_repo_root(cwd)
    repo_state = files.repo_dir(repo_root, create=False)
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
    return AwsPlan(config_label=config.strip(), source=str(source), cluster_name=cluster_name, region=region,
                   account=account_id, repo_root=str(repo_root), state_dir=str(repo_state), store_url=store_url,
                   store_bucket=bucket, idle_timeout_s=idle, token_path=str(token_path),
                   requirements_path=str(requirements), project_requirements=own_requirements,
                   node_types=nodes, max_workers=int(prepared.get("max_workers", 0)), iam=iam, cost=cost,
                   checks=checks, config=rendered)


def find_repo_root(cwd: Path) -> Path:
    """The git repository around ``cwd``: the project the cluster belongs to.

    Raises:
        UsageError: ``cwd`` is not inside a git repository.
    """
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
