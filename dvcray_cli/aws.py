"""AWS clusters through Ray's cluster launcher (DESIGN.md, "Clusters").

``up`` is three steps, each a function of its own:

1. ``plan``: load the YAML (``aws``, ``aws-gpu`` or a path), check it against
   Ray's own schema, fill in dvcray's ``{{ placeholders }}`` and make read-only
   checks in the account (credentials, region, instance types offered, images,
   store bucket). It creates nothing, anywhere: ``--dry-run`` stops here and
   prints the plan with a cost range from the shipped price table.
2. ``bootstrap``: the auth token (``.dvcray/clusters/<cluster>.token``, 0600),
   dvcray's IAM roles and instance profiles (the store bucket only; see
   ``node_policies``), then Ray's ``bootstrap_config(no_config_cache=True)``,
   which makes the key pair, picks subnets and makes the security group.
   No instance is created here.
3. ``launch``: Ray's ``create_or_update_cluster(no_config_cache=True)``, the
   SSH port-forward to the head's job API, and the record in ``.dvcray/``.
   Refuses to run when ``AWS_ENDPOINT_URL`` points at this machine: a fake
   endpoint (moto) hands out public IP addresses, and Ray would open SSH
   connections to them.

``no_config_cache`` everywhere: Ray otherwise caches the resolved config
(subnet, security group and key ids) under ``/tmp/ray-config-<hash>`` whatever
the endpoint, and a run against a fake endpoint would poison a later real one.
For the same reason ``down`` does not use ``sdk.teardown_cluster`` (which
bootstraps with the cache on) but Ray's node provider directly.

boto3 and Ray are imported inside the functions that need them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from dvcray_cli.errors import ClusterError, DvcrayError, UsageError

BUILT_INS = ("aws", "aws-gpu")
CLUSTER_TAG = "ray-cluster-name"          # Ray tags every node with it (ray/autoscaler/tags.py)
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
PLACEHOLDERS = ("cluster_name", "dvcray_requirement", "ray_version", "auth_token_file",
                "requirements_file", "head_instance_profile", "worker_instance_profile",
                "idle_timeout_seconds")
HEAD_DASHBOARD_PORT = 8265
# Real AWS needs a few seconds before EC2 accepts a new instance profile (Ray waits 15 s).
IAM_PROPAGATION_S = 10.0
DEFAULT_IDLE_TIMEOUT_S = 3600.0
TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                   "Action": "sts:AssumeRole"}],
}


# --------------------------------------------------------------------------- data


@dataclass
class NodeTypePlan:
    """One node type of the plan."""

    name: str
    role: str                  # "head" or "worker"
    instance_type: str
    image_id: str
    spot: bool
    min_count: int
    max_count: int
    instance_profile: str      # the profile's name (or ARN) the nodes get
    managed_profile: bool      # dvcray creates it
    shape: str = ""            # "2 vCPUs, 8 GiB" (+ GPUs), from EC2


@dataclass
class Check:
    """One read-only check of the plan."""

    name: str
    ok: bool
    detail: str


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
class AwsCluster:
    """A recorded AWS cluster (``.dvcray/clusters/<cluster_name>.json``)."""

    name: str                  # Ray's cluster_name
    config_label: str
    config_path: str           # the rendered config, as launched
    region: str
    token_path: str
    dashboard_url: str         # http://127.0.0.1:<forwarded port>
    forward_port: int
    forward_pid: int
    head_ip: str
    ssh_user: str
    key_path: str
    started_at: str
    idle_timeout_s: float
    node_types: list[dict[str, Any]]
    kind: str = "aws"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AwsCluster:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class AwsDown:
    """What ``down`` did."""

    name: str
    region: str
    terminated: list[str]
    stopped_runs: list[str]
    recorded: bool


# --------------------------------------------------------------------------- config


def is_aws_config(config: str) -> bool:
    """``config`` names an AWS cluster: ``aws``, ``aws-gpu``, or a YAML file whose
    provider is ``aws``.

    Raises:
        UsageError: a YAML file that cannot be read or parsed.
    """
    name = config.strip()
    if name in BUILT_INS:
        return True
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        raw = _read_yaml(path)
        return str((raw.get("provider") or {}).get("type", "")).lower() == "aws"
    return False


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UsageError(f"Cannot read the cluster config {path}: {exc.strerror}.") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"The cluster config {path} is not valid YAML: {exc}",
                         "Fix the file (a YAML linter shows where).") from None
    if not isinstance(data, dict):
        raise UsageError(f"The cluster config {path} is not a YAML mapping.",
                         "Start from a built-in: dvcray_cli/cluster_configs/aws.yaml.")
    return data


def load_config(config: str) -> tuple[dict[str, Any], Path]:
    """The raw config named ``config`` and the file it came from."""
    from dvcray_cli.resources import cluster_configs_dir

    name = config.strip()
    path = cluster_configs_dir() / f"{name}.yaml" if name in BUILT_INS else Path(name).expanduser()
    if not path.is_file():
        raise UsageError(f"No cluster config at {path}.", "Pass aws, aws-gpu or the path of a YAML file.")
    return _read_yaml(path), path.resolve()


def check_structure(raw: dict[str, Any], source: Path) -> None:
    """What Ray's schema lets through but dvcray needs: an AWS provider with a
    region, and a head node type that names one of ``available_node_types``.

    (Without ``head_node_type``, Ray fills in ``ray.head.default`` from its
    defaults, and the error comes later and says less.)
    """
    provider = raw.get("provider")
    if not isinstance(provider, dict) or str(provider.get("type", "")).lower() != "aws":
        raise UsageError(f"{source}: provider.type is not aws.", "An AWS cluster config needs provider: {type: aws, region: ...}.")
    if not provider.get("region"):
        raise UsageError(f"{source}: provider.region is missing.", "Add e.g. provider: {region: us-east-1}.")
    types = raw.get("available_node_types")
    if not isinstance(types, dict) or not types:
        raise UsageError(f"{source}: available_node_types is missing or empty.",
                         "List a head and worker node types, as aws.yaml does.")
    head = raw.get("head_node_type")
    if not head:
        raise UsageError(f"{source}: the config has no head_node_type.",
                         f"Add head_node_type: with one of: {', '.join(types)}.")
    if head not in types:
        raise UsageError(f"{source}: head_node_type {head!r} is not one of available_node_types "
                         f"({', '.join(types)}).", "Name the head's node type exactly as listed.")


def validate_with_ray(config: dict[str, Any], source: Path) -> dict[str, Any]:
    """Ray's own schema check (``ray/autoscaler/ray-schema.json``) on the config
    with Ray's defaults filled in, as ``ray up`` does it.

    Returns:
        The prepared config (defaults filled in).

    Raises:
        UsageError: the schema refuses it; names the key.
    """
    import logging

    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    # Ray logs "setting max workers for head node type to 0" at INFO on every call.
    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise UsageError(f"{source} does not pass Ray's cluster config schema at {where}: {exc.message}",
                         "See https://docs.ray.io/en/latest/cluster/vms/references/ray-cluster-configuration.html") from None
    except (ValueError, KeyError, AssertionError) as exc:
        raise UsageError(f"{source} is not a valid Ray cluster config: {exc}") from None
    return prepared


def default_cluster_name(repo_root: Path) -> str:
    """``dvcray-<folder>-<hash>``: one cluster per project, and two projects of
    the same folder name never share one."""
    slug = re.sub(r"[^a-z0-9-]+", "-", repo_root.name.lower()).strip("-")[:20] or "project"
    digest = hashlib.sha256(str(repo_root.resolve()).encode()).hexdigest()[:6]
    return f"dvcray-{slug}-{digest}"


def iam_name(cluster_name: str, role: str) -> str:
    """The IAM role and instance profile name dvcray uses for ``role`` (head, worker)."""
    base = cluster_name if cluster_name.startswith("dvcray") else f"dvcray-{cluster_name}"
    base = re.sub(r"[^\w+=,.@-]", "-", base)
    return f"{base[:64 - len(role) - 1]}-{role}"


def render(value: Any, values: dict[str, str]) -> Any:
    """``value`` with every ``{{ name }}`` replaced.

    Raises:
        UsageError: a placeholder dvcray does not know.
    """
    if isinstance(value, dict):
        return {render(k, values): render(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, values) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise UsageError(f"Unknown placeholder {{{{ {key} }}}} in the cluster config.",
                             f"dvcray fills in: {', '.join(PLACEHOLDERS)}.")
        return str(values[key])

    return PLACEHOLDER.sub(sub, value)


def _uses(value: Any, placeholder: str) -> bool:
    if isinstance(value, dict):
        return any(_uses(v, placeholder) for v in value.values())
    if isinstance(value, list):
        return any(_uses(v, placeholder) for v in value)
    return isinstance(value, str) and any(m.group(1) == placeholder for m in PLACEHOLDER.finditer(value))


def _profile_name(node_config: dict[str, Any]) -> str:
    profile = node_config.get("IamInstanceProfile") or {}
    return str(profile.get("Name") or profile.get("Arn") or "")


# --------------------------------------------------------------------------- AWS access


def _aws_error(exc: Exception, what: str) -> DvcrayError:
    """A person's message for a botocore error."""
    from botocore.exceptions import (ClientError, EndpointConnectionError, NoCredentialsError,
                                     NoRegionError, PartialCredentialsError)

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ClusterError("No AWS credentials found.",
                            "Configure them (aws configure, AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY), then run the command again. Nothing was created.")
    if isinstance(exc, EndpointConnectionError):
        return ClusterError(f"Could not reach AWS to {what}: {exc}", "Check your network. Nothing was created.")
    if isinstance(exc, NoRegionError):
        return UsageError("No AWS region: the config's provider.region is empty.")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        message = exc.response.get("Error", {}).get("Message", str(exc))
        if code in ("InvalidClientTokenId", "SignatureDoesNotMatch", "ExpiredToken", "AuthFailure",
                    "UnrecognizedClientException", "InvalidAccessKeyId"):
            return ClusterError(f"AWS refused your credentials ({code}): {message}",
                                "Refresh or fix your AWS credentials. Nothing was created.")
        if code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation"):
            return ClusterError(f"Your AWS identity may not {what} ({code}): {message}",
                                "Use an identity allowed to manage EC2 and IAM, or ask your AWS admin.")
        return ClusterError(f"AWS refused to {what} ({code}): {message}")
    return ClusterError(f"Could not {what}: {type(exc).__name__}: {exc}")


def _client(service: str, region: str | None = None):
    """A boto3 client; without ``region``, the user's default region (or us-east-1)."""
    import boto3

    session = boto3.session.Session()
    return session.client(service, region_name=region or session.region_name or "us-east-1")


def _call(what: str, func, *args, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return func(*args, **kwargs)
    except (BotoCoreError, ClientError) as exc:
        raise _aws_error(exc, what) from None


def fake_endpoint() -> str | None:
    """The AWS endpoint override when it points at this machine (a fake AWS such as moto)."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2"):
        url = os.environ.get(var, "").strip()
        if not url:
            continue
        host = (urlparse(url if "://" in url else f"http://{url}").hostname or "").lower()
        if host in ("localhost", "::1", "0.0.0.0") or host.startswith("127.") or host.endswith(".localhost"):
            return url
    return None


# --------------------------------------------------------------------------- plan


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
    raw, source = load_config(config)
    check_structure(raw, source)
    validate_with_ray(raw, source)
    repo_root = _repo_root(cwd)
    state = repo_root / ".dvcray"
    store_url, bucket = _store_bucket(repo_root, cwd)
    idle = DEFAULT_IDLE_TIMEOUT_S if idle_timeout_s is None else float(idle_timeout_s)

    cluster_name = render(raw.get("cluster_name", "{{ cluster_name }}"),
                          {"cluster_name": default_cluster_name(repo_root)})
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,59}", cluster_name):
        raise UsageError(f"Invalid cluster_name {cluster_name!r}.",
                         "Use letters, digits, '-', '_' and '.', 60 characters at most.")
    token_path = state / "clusters" / f"{cluster_name}.token"
    own_requirements = (repo_root / "requirements.txt").is_file()
    requirements = repo_root / "requirements.txt" if own_requirements \
        else state / "clusters" / f"{cluster_name}.requirements.txt"
    values = {
        "cluster_name": cluster_name,
        "dvcray_requirement": _dvcray_requirement(),
        "ray_version": _ray_version(),
        "auth_token_file": str(token_path),
        "requirements_file": str(requirements),
        "head_instance_profile": iam_name(cluster_name, "head"),
        "worker_instance_profile": iam_name(cluster_name, "worker"),
        "idle_timeout_seconds": f"{int(idle)}",
    }
    rendered = render(copy.deepcopy(raw), values)
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
            managed[type_name] = _uses(raw_config.get("IamInstanceProfile"), "head_instance_profile") \
                or _uses(raw_config.get("IamInstanceProfile"), "worker_instance_profile")
    prepared = validate_with_ray(rendered, source)

    region = str(prepared["provider"]["region"])
    nodes = _node_type_plans(prepared, managed)
    checks: list[Check] = []
    account = _check_account(region, nodes, bucket, checks)
    cost = _cost(region, prepared, nodes)
    head_role, worker_role = iam_name(cluster_name, "head"), iam_name(cluster_name, "worker")
    iam = {"managed": any(managed.values()), "head_role": head_role, "worker_role": worker_role,
           "policies": node_policies(cluster_name, region, bucket, account or "ACCOUNT", worker_role)}
    return Plan(config_label=config.strip(), source=str(source), cluster_name=cluster_name, region=region,
                account=account, repo_root=str(repo_root), state_dir=str(state), store_url=store_url,
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


def _dvcray_requirement() -> str:
    from dvcray_cli import __version__

    return os.environ.get("DVCRAY_NODE_REQUIREMENT", "").strip() or f"dvcray=={__version__}"


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def _node_type_plans(prepared: dict[str, Any], managed: dict[str, bool]) -> list[NodeTypePlan]:
    head = prepared["head_node_type"]
    plans = []
    for name, node_type in prepared["available_node_types"].items():
        node_config = node_type.get("node_config") or {}
        market = (node_config.get("InstanceMarketOptions") or {}).get("MarketType", "")
        is_head = name == head
        plans.append(NodeTypePlan(
            name=name, role="head" if is_head else "worker",
            instance_type=str(node_config.get("InstanceType", "")),
            image_id=str(node_config.get("ImageId", "")),
            spot=str(market).lower() == "spot",
            min_count=1 if is_head else int(node_type.get("min_workers", 0)),
            max_count=1 if is_head else int(node_type.get("max_workers", prepared.get("max_workers", 0))),
            instance_profile=_profile_name(node_config), managed_profile=managed.get(name, False)))
    plans.sort(key=lambda p: p.role != "head")
    return plans


def _cost(region: str, prepared: dict[str, Any], nodes: list[NodeTypePlan]) -> dict[str, Any]:
    """The hourly range: the head and every type's minimum, up to the head and as
    many of the dearest workers as ``max_workers`` allows."""
    from dvcray_cli import pricing

    counts = [pricing.NodeCount(n.instance_type, n.spot, n.min_count, n.max_count) for n in nodes]
    budget = int(prepared.get("max_workers", 0))
    workers = sorted((c for c, n in zip(counts, nodes) if n.role == "worker"),
                     key=lambda c: -((pricing.hourly(region, c.instance_type, c.spot) or (0, 0))[1]))
    for c in workers:
        c.max_count = max(c.min_count, min(c.max_count, budget))
        budget = max(0, budget - c.max_count)
    return pricing.estimate(region, counts).to_json()


def _check_account(region: str, nodes: list[NodeTypePlan], bucket: str, checks: list[Check]) -> str | None:
    """Read-only checks, in the order a person would fix them. Each failure raises."""
    from botocore.exceptions import ClientError

    sts = _client("sts")
    ident = _call("check your AWS credentials", sts.get_caller_identity)
    account = ident.get("Account")
    checks.append(Check("credentials", True, f"account {account} as {ident.get('Arn')}"))

    # The region first, through a region that always exists: a client for a
    # region that does not exist fails with a connection error, not a message.
    regions = _call("list AWS regions", _client("ec2").describe_regions, AllRegions=True)
    status = {r["RegionName"]: r.get("OptInStatus", "opt-in-not-required") for r in regions["Regions"]}
    if region not in status:
        raise UsageError(f"Unknown AWS region {region!r} (provider.region).",
                         f"Use one of: {', '.join(sorted(status))}.")
    if status[region] == "not-opted-in":
        raise UsageError(f"The AWS region {region} is not enabled for account {account}.",
                         "Enable it in the AWS console (Account > AWS Regions) or pick another region.")
    checks.append(Check("region", True, region))

    ec2 = _client("ec2", region)
    wanted = sorted({n.instance_type for n in nodes})
    offered = _call(f"list the instance types offered in {region}", ec2.describe_instance_type_offerings,
                    LocationType="region", Filters=[{"Name": "instance-type", "Values": wanted}])
    have = {o["InstanceType"] for o in offered.get("InstanceTypeOfferings", [])}
    for node in nodes:
        if node.instance_type not in have:
            raise UsageError(f"Instance type {node.instance_type!r} (node type {node.name!r}) is not offered "
                             f"in {region}.", "Fix InstanceType in the config, or pick a region that offers it.")
    checks.append(Check("instance types", True, f"{', '.join(wanted)} offered in {region}"))
    described = _call("describe instance types", ec2.describe_instance_types, InstanceTypes=wanted)
    shapes = {d["InstanceType"]: _shape(d) for d in described.get("InstanceTypes", [])}
    for node in nodes:
        node.shape = shapes.get(node.instance_type, "")

    for image in sorted({n.image_id for n in nodes}):
        users = ", ".join(n.name for n in nodes if n.image_id == image)
        if not image:
            raise UsageError(f"Node type {users} has no ImageId.",
                             "Pin an image (dvcray never falls back to Ray's old default AMI).")
        try:
            found = ec2.describe_images(ImageIds=[image]).get("Images", [])
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code.startswith("InvalidAMIID"):
                found = []
            else:
                raise _aws_error(exc, "look up images") from None
        except Exception as exc:  # noqa: BLE001
            raise _aws_error(exc, "look up images") from None
        if not found or found[0].get("State", "available") != "available":
            raise UsageError(f"Image {image} (node type {users}) does not exist in {region}.",
                             "AMI ids differ per region: see the Images comment in the config for how to "
                             "find the current one.")
        checks.append(Check("image", True, f"{image} ({found[0].get('Name', '?')})"))

    s3 = _client("s3", region)
    try:
        s3.head_bucket(Bucket=bucket)
        checks.append(Check("store bucket", True, f"s3://{bucket} reachable"))
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise UsageError(f"The store bucket s3://{bucket} does not exist.",
                             "Create it, or point the project's DVC default remote at one that does.") from None
        checks.append(Check("store bucket", False, f"s3://{bucket}: {code or exc} with your credentials"))
    except Exception as exc:  # noqa: BLE001
        raise _aws_error(exc, f"reach the store bucket {bucket}") from None
    return account


def _shape(described: dict[str, Any]) -> str:
    """``4 vCPUs, 16 GiB, 1 x NVIDIA T4`` from ``describe_instance_types``."""
    cpus = described.get("VCpuInfo", {}).get("DefaultVCpus")
    mem = described.get("MemoryInfo", {}).get("SizeInMiB")
    parts = [f"{cpus} vCPUs" if cpus else "", f"{mem / 1024:g} GiB" if mem else ""]
    for gpu in described.get("GpuInfo", {}).get("Gpus", []):
        parts.append(f"{gpu.get('Count', 1)} x {gpu.get('Manufacturer', '')} {gpu.get('Name', 'GPU')}".replace("  ", " "))
    return ", ".join(p for p in parts if p)


def node_policies(cluster_name: str, region: str, bucket: str, account: str, worker_role: str) -> dict[str, Any]:
    """The inline policies of dvcray's node roles: least privilege.

    - Both: the store bucket and nothing else in S3.
    - The head, for Ray's autoscaler: describe EC2; launch instances in the
      cluster's region; tag them at launch or when they already carry the
      cluster's tag; stop, start and terminate only instances tagged with this
      cluster's name (the idle watcher terminates the head itself this way);
      pass the worker role to the workers it launches; create EC2's spot
      service-linked role (the first spot request of an account needs it).
    """
    bucket_arn = f"arn:aws:s3:::{bucket}"
    s3 = [
        {"Sid": "StoreBucket", "Effect": "Allow",
         "Action": ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"],
         "Resource": bucket_arn},
        {"Sid": "StoreObjects", "Effect": "Allow",
         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                    "s3:ListMultipartUploadParts"],
         "Resource": f"{bucket_arn}/*"},
    ]
    own_cluster = {"StringEquals": {f"ec2:ResourceTag/{CLUSTER_TAG}": cluster_name}}
    ec2 = [
        {"Sid": "AutoscalerDescribe", "Effect": "Allow",
         "Action": ["ec2:DescribeInstances", "ec2:DescribeInstanceStatus", "ec2:DescribeInstanceTypes",
                    "ec2:DescribeImages", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups",
                    "ec2:DescribeKeyPairs", "ec2:DescribeVpcs", "ec2:DescribeAvailabilityZones"],
         "Resource": "*"},
        {"Sid": "AutoscalerLaunch", "Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*",
         "Condition": {"StringEquals": {"aws:RequestedRegion": region}}},
        {"Sid": "AutoscalerTagAtLaunch", "Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "*",
         "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}}},
        {"Sid": "AutoscalerTagOwn", "Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "*",
         "Condition": own_cluster},
        {"Sid": "AutoscalerStopOwn", "Effect": "Allow",
         "Action": ["ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"],
         "Resource": "*", "Condition": own_cluster},
        {"Sid": "PassWorkerRole", "Effect": "Allow", "Action": "iam:PassRole",
         "Resource": f"arn:aws:iam::{account}:role/{worker_role}"},
        # The first spot instance of an account creates EC2's spot service-linked role.
        {"Sid": "SpotServiceLinkedRole", "Effect": "Allow", "Action": "iam:CreateServiceLinkedRole",
         "Resource": f"arn:aws:iam::{account}:role/aws-service-role/spot.amazonaws.com/AWSServiceRoleForEC2Spot",
         "Condition": {"StringLike": {"iam:AWSServiceName": "spot.amazonaws.com"}}},
    ]
    return {"head": {"Version": "2012-10-17", "Statement": s3 + ec2},
            "worker": {"Version": "2012-10-17", "Statement": s3}}


# --------------------------------------------------------------------------- bootstrap


def bootstrap(p: Plan, iam_wait_s: float = IAM_PROPAGATION_S) -> Bootstrapped:
    """Create what the cluster needs before any instance: the token, dvcray's IAM
    roles and instance profiles, and (through Ray's ``bootstrap_config``) the key
    pair and security group. Creates no instance.

    Args:
        p: the plan (``plan``).
        iam_wait_s: seconds to let a new instance profile propagate to EC2.
    """
    from dvcray_cli import cluster as local

    state = local.state_dir(Path(p.repo_root))
    folder = state / "clusters"
    folder.mkdir(exist_ok=True)
    os.chmod(folder, 0o700)
    local.ensure_token(Path(p.token_path))
    os.chmod(p.token_path, 0o600)
    if not p.project_requirements and not Path(p.requirements_path).exists():
        Path(p.requirements_path).write_text("# This project has no requirements.txt.\n")

    created: list[str] = []
    existing: list[str] = []
    if p.iam["managed"]:
        new_profiles = _ensure_iam(p, created, existing)
        if new_profiles and iam_wait_s > 0:
            time.sleep(iam_wait_s)

    config_path = folder / f"{p.cluster_name}.yaml"
    _write_yaml(config_path, p.config)
    resolved = _ray_bootstrap(p.config)
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


def _ray_bootstrap(config: dict[str, Any]) -> dict[str, Any]:
    from botocore.exceptions import BotoCoreError, ClientError
    from ray.autoscaler import sdk

    try:
        return sdk.bootstrap_config(copy.deepcopy(config), no_config_cache=True)
    except (BotoCoreError, ClientError) as exc:
        raise _aws_error(exc, "prepare the cluster (key pair, subnets, security group)") from None
    except Exception as exc:
        # Ray's cli_logger.abort raises click exceptions, doassert AssertionError.
        if not _is_ray_abort(exc):
            raise
        raise ClusterError(f"Ray's cluster launcher stopped while preparing the cluster: {exc}",
                           "Nothing was launched; fix the cause and run the command again.") from None


def _is_ray_abort(exc: BaseException) -> bool:
    """Ray's launcher reports with ``cli_logger.abort`` (a click exception) or
    ``doassert`` (AssertionError); its message is already printed."""
    import click

    return isinstance(exc, (click.ClickException, AssertionError))


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    path.write_text("# Written by `dvcray cluster up`: the config as launched.\n"
                    + yaml.safe_dump(data, sort_keys=False))


def _ensure_iam(p: Plan, created: list[str], existing: list[str]) -> bool:
    """dvcray's two roles and instance profiles, with their inline policies
    brought up to date. Returns True when a profile is new (or got its role)."""
    from botocore.exceptions import ClientError

    iam = _client("iam", p.region)
    changed = False
    for role in ("worker", "head"):        # the head's policy names the worker role
        name = p.iam[f"{role}_role"]
        tags = [{"Key": "dvcray-cluster", "Value": p.cluster_name}]
        try:
            iam.get_role(RoleName=name)
            existing.append(f"IAM role {name}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchEntity":
                raise _aws_error(exc, f"look up the IAM role {name}") from None
            _call(f"create the IAM role {name}", iam.create_role, RoleName=name,
                  AssumeRolePolicyDocument=json.dumps(TRUST_POLICY), Tags=tags,
                  Description=f"dvcray cluster {p.cluster_name}: {role} nodes (store bucket {p.store_bucket})")
            created.append(f"IAM role {name}")
        _call(f"set the policy of the IAM role {name}", iam.put_role_policy, RoleName=name,
              PolicyName="dvcray-node", PolicyDocument=json.dumps(p.iam["policies"][role]))
        try:
            profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
            existing.append(f"instance profile {name}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchEntity":
                raise _aws_error(exc, f"look up the instance profile {name}") from None
            profile = _call(f"create the instance profile {name}", iam.create_instance_profile,
                            InstanceProfileName=name, Tags=tags)["InstanceProfile"]
            created.append(f"instance profile {name}")
            changed = True
        if name not in [r["RoleName"] for r in profile.get("Roles", [])]:
            _call(f"add the role {name} to its instance profile", iam.add_role_to_instance_profile,
                  InstanceProfileName=name, RoleName=name)
            changed = True
    return changed


# --------------------------------------------------------------------------- launch


def refuse_fake_endpoint() -> None:
    """The safety net: never launch instances against a fake AWS on this machine."""
    url = fake_endpoint()
    if url:
        raise ClusterError(f"Refusing to launch instances: AWS_ENDPOINT_URL points at this machine ({url}).",
                           "A fake AWS (moto) gives instances public IP addresses and Ray would open SSH "
                           "connections to them. `--dry-run` and the bootstrap step are what can be tested "
                           "against it.")


def launch(p: Plan, boot: Bootstrapped, forward_timeout: float = 300.0) -> AwsCluster:
    """Start the head through Ray's launcher (the autoscaler on the head starts
    workers), open the port-forward to its job API and record the cluster."""
    refuse_fake_endpoint()
    from ray.autoscaler import sdk

    try:
        sdk.create_or_update_cluster(copy.deepcopy(p.config), no_config_cache=True)
    except Exception as exc:
        if not _is_ray_abort(exc):
            raise
        raise ClusterError(f"Ray's cluster launcher failed: {exc}",
                           f"Inspect: ray attach {boot.config_path}; stop everything: "
                           f"dvcray cluster down {p.config_label} --yes") from None
    head_ip = _head_ip(p.config)
    if not head_ip:
        raise ClusterError("The head node has no public IP address.",
                           f"Stop it: dvcray cluster down {p.config_label} --yes")
    ssh_user = str(boot.resolved.get("auth", {}).get("ssh_user", "ubuntu"))
    from dvcray_cli import cluster as local

    port = local._pick_port(None)
    pid = start_forward(head_ip, ssh_user, boot.key_path, port)
    record = AwsCluster(name=p.cluster_name, config_label=p.config_label, config_path=boot.config_path,
                        region=p.region, token_path=p.token_path, dashboard_url=f"http://127.0.0.1:{port}",
                        forward_port=port, forward_pid=pid, head_ip=head_ip, ssh_user=ssh_user,
                        key_path=boot.key_path, started_at=_now(), idle_timeout_s=p.idle_timeout_s,
                        node_types=[dataclasses.asdict(n) for n in p.node_types])
    write_record(record, Path(p.state_dir))
    _wait_job_api(record, forward_timeout)
    return record


def up(config: str, cwd: Path, idle_timeout_s: float | None = None) -> tuple[Plan, Bootstrapped, AwsCluster]:
    """``plan``, ``bootstrap``, ``launch``."""
    p = plan(config, cwd, idle_timeout_s)
    refuse_fake_endpoint()
    boot = bootstrap(p)
    return p, boot, launch(p, boot)


def _head_ip(config: dict[str, Any]) -> str | None:
    from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND

    provider = _provider(config["provider"], config["cluster_name"])
    heads = provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD})
    if not heads:
        return None
    if config["provider"].get("use_internal_ips"):
        return provider.internal_ip(heads[0])
    return provider.external_ip(heads[0])


def start_forward(head_ip: str, ssh_user: str, key_path: str, port: int) -> int:
    """``ssh -N -L 127.0.0.1:PORT:127.0.0.1:8265`` in the background, as ``ray
    dashboard`` does: the job API is never open to the internet."""
    cmd = ["ssh", "-N", "-i", os.path.expanduser(key_path),
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=30", "-o", "BatchMode=yes",
           "-o", "LogLevel=ERROR",
           "-L", f"127.0.0.1:{port}:127.0.0.1:{HEAD_DASHBOARD_PORT}", f"{ssh_user}@{head_ip}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    return proc.pid


def _forward_alive(record: AwsCluster) -> bool:
    try:
        cmdline = Path(f"/proc/{record.forward_pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return "ssh" in cmdline and f"127.0.0.1:{record.forward_port}:" in cmdline


def stop_forward(record: AwsCluster) -> None:
    if _forward_alive(record):
        try:
            os.kill(record.forward_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def ensure_forward(record: AwsCluster, state_dir: Path) -> AwsCluster:
    """Reopen the port-forward when it died (the laptop slept, the network changed)."""
    if _forward_alive(record):
        return record
    record.forward_pid = start_forward(record.head_ip, record.ssh_user, record.key_path, record.forward_port)
    write_record(record, state_dir)
    return record


def _wait_job_api(record: AwsCluster, timeout: float, reopen: bool = True) -> None:
    import requests

    token = Path(record.token_path).read_text().strip()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{record.dashboard_url}/api/version",
                             headers={"Authorization": f"Bearer {token}"}, timeout=5)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        if not _forward_alive(record):
            if not reopen:
                break
            time.sleep(2)
            record.forward_pid = start_forward(record.head_ip, record.ssh_user, record.key_path,
                                               record.forward_port)
        time.sleep(2)
    raise ClusterError(f"The head's job API did not answer through the port-forward at {record.dashboard_url}.",
                       f"Look at the head: ray attach {record.config_path}")


# --------------------------------------------------------------------------- records


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _index_dir() -> Path:
    return Path.home() / ".dvcray" / "aws"


def write_record(record: AwsCluster, state_dir: Path) -> Path:
    """``<repo>/.dvcray/clusters/<name>.json``, and a pointer to it in
    ``~/.dvcray/aws/`` so ``cluster status`` lists it from anywhere."""
    folder = Path(state_dir) / "clusters"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record.name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2))
    os.replace(tmp, path)
    index = _index_dir()
    index.mkdir(parents=True, exist_ok=True)
    (index / f"{record.name}.json").write_text(json.dumps({"record": str(path)}))
    return path


def _load(path: Path) -> AwsCluster | None:
    try:
        return AwsCluster.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def remove_record(name: str, state_dir: Path | None) -> None:
    pointer = _index_dir() / f"{name}.json"
    try:
        path = Path(json.loads(pointer.read_text())["record"])
    except (OSError, ValueError, KeyError):
        path = None
    if state_dir is not None:
        (Path(state_dir) / "clusters" / f"{name}.json").unlink(missing_ok=True)
    if path is not None:
        path.unlink(missing_ok=True)
    pointer.unlink(missing_ok=True)


def records() -> Iterator[tuple[AwsCluster, Path]]:
    """Every recorded AWS cluster of this user, with its record's path."""
    index = _index_dir()
    if not index.is_dir():
        return
    for pointer in sorted(index.glob("*.json")):
        try:
            path = Path(json.loads(pointer.read_text())["record"])
        except (OSError, ValueError, KeyError):
            continue
        record = _load(path)
        if record is not None:
            yield record, path


def repo_records(cwd: Path) -> list[AwsCluster]:
    """The AWS clusters recorded in the repo around ``cwd``, newest first."""
    from dvcray_cli.gitutil import git_root

    root = git_root(Path(cwd))
    folder = root / ".dvcray" / "clusters" if root else None
    if folder is None or not folder.is_dir():
        return []
    found = [r for r in (_load(p) for p in folder.glob("*.json")) if r is not None and r.kind == "aws"]
    return sorted(found, key=lambda r: r.started_at, reverse=True)


def recorded_address(cwd: Path) -> str | None:
    """The job API of this repo's AWS cluster (through its port-forward), or None."""
    found = repo_records(cwd)
    if not found:
        return None
    from dvcray_cli.gitutil import git_root

    record = ensure_forward(found[0], git_root(Path(cwd)) / ".dvcray")
    return record.dashboard_url


def token_for_address(address: str) -> str | None:
    """The token of the recorded AWS cluster whose forwarded job API is ``address``."""
    url = address.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    for record, _path in records():
        if record.dashboard_url == url:
            try:
                return Path(record.token_path).read_text().strip() or None
            except OSError:
                return None
    return None


# --------------------------------------------------------------------------- down


def _provider(provider_config: dict[str, Any], cluster_name: str):
    from ray.autoscaler._private.providers import _get_node_provider

    return _get_node_provider(provider_config, cluster_name, use_cache=False)


def terminate_cluster(provider_config: dict[str, Any], cluster_name: str) -> list[str]:
    """Terminate every instance tagged with ``cluster_name``, workers first and
    the head last, as Ray's teardown does, through Ray's node provider.

    ``cache_stopped_nodes`` is forced off: down means terminate (a stopped
    instance still bills its disk). Skips Ray's ``ray stop`` over SSH: the
    instances go anyway.

    Returns:
        The instance ids it asked to terminate.
    """
    from botocore.exceptions import BotoCoreError, ClientError
    from ray.autoscaler.tags import NODE_KIND_HEAD, NODE_KIND_WORKER, TAG_RAY_NODE_KIND

    provider_config = {**provider_config, "cache_stopped_nodes": False}
    try:
        provider = _provider(provider_config, cluster_name)
        done: list[str] = []
        for kind in (NODE_KIND_WORKER, NODE_KIND_HEAD, None):
            for _attempt in range(3):
                nodes = provider.non_terminated_nodes({TAG_RAY_NODE_KIND: kind} if kind else {})
                nodes = [n for n in nodes if n not in done] if kind is None else nodes
                if not nodes:
                    break
                provider.terminate_nodes(nodes)
                done.extend(n for n in nodes if n not in done)
    except (BotoCoreError, ClientError) as exc:
        raise _aws_error(exc, f"terminate the instances of cluster {cluster_name}") from None
    return done


def down(config: str, cwd: Path, yes: bool = False) -> AwsDown:
    """Terminate every instance of the cluster, stop its port-forward, remove its record.

    Works without a record too (it was lost, or the idle watcher already took
    the cluster down): the instances are found by their cluster tag.

    Raises:
        UsageError: dvcray runs are in progress and ``yes`` is False.
    """
    raw, source = load_config(config)
    check_structure(raw, source)
    repo_root = _repo_root(cwd)
    cluster_name = render(raw.get("cluster_name", "{{ cluster_name }}"),
                          {"cluster_name": default_cluster_name(repo_root)})
    provider_config = raw["provider"]
    state = repo_root / ".dvcray"
    record = _load(state / "clusters" / f"{cluster_name}.json")
    stopped: list[str] = []
    if record is not None:
        stopped = _stop_runs(ensure_forward(record, state), yes, config)
    ids = terminate_cluster(provider_config, cluster_name)
    if record is not None:
        stop_forward(record)
    remove_record(cluster_name, state)
    return AwsDown(name=cluster_name, region=str(provider_config["region"]), terminated=ids,
                   stopped_runs=stopped, recorded=record is not None)


def _stop_runs(record: AwsCluster, yes: bool, config: str) -> list[str]:
    from dvcray_cli import cluster as local

    try:
        _wait_job_api(record, timeout=10, reopen=False)
        client = local.job_client(record.dashboard_url, token=Path(record.token_path).read_text().strip())
        runs = local.active_runs(client)
    except (ClusterError, OSError):
        return []  # the head does not answer (gone, or unreachable): its instances go anyway
    if runs and not yes:
        ids = ", ".join(r["run_id"] for r in runs)
        raise UsageError(f"Cluster {record.name!r} has {len(runs)} run(s) in progress: {ids}.",
                         f"Let them finish, or stop them with the cluster: dvcray cluster down {config} --yes")
    stopped = []
    for run in runs:
        try:
            client.stop_job(run["run_id"])
            stopped.append(run["run_id"])
        except Exception:  # noqa: BLE001 - it ended meanwhile
            continue
    local._wait_jobs_end(client, stopped, timeout=10)
    return stopped


# --------------------------------------------------------------------------- status


def status() -> list[dict[str, Any]]:
    """Every recorded AWS cluster: its instances (type, spot, age), the cluster's
    age and estimated cost so far. A cluster whose instances are all gone (its
    idle watcher took it down, or someone terminated them) is reported once as
    gone, and its record and port-forward removed."""
    from dvcray_cli import pricing

    entries = []
    for record, path in records():
        entry: dict[str, Any] = {
            "name": record.name, "kind": "aws", "config": record.config_label, "region": record.region,
            "alive": None, "dashboard_url": record.dashboard_url, "started_at": record.started_at,
            "age_s": _age_s(record.started_at), "idle_timeout_s": record.idle_timeout_s,
            "instances": [], "cost_so_far_usd": None, "error": None,
        }
        try:
            instances = _instances(record.region, record.name)
        except DvcrayError as exc:
            entry["error"] = exc.message
            entries.append(entry)
            continue
        entry["instances"] = instances
        entry["alive"] = bool(instances)
        if instances:
            low, high, unpriced = pricing.cost_so_far(record.region, [
                {"instance_type": i["instance_type"], "spot": i["spot"], "hours": i["age_s"] / 3600}
                for i in instances])
            entry["cost_so_far_usd"] = {"low": round(low, 2), "high": round(high, 2), "unpriced": unpriced,
                                        "as_of": pricing.table()["as_of"]}
        else:
            entry["state"] = "gone"
            stop_forward(record)
            remove_record(record.name, path.parent.parent)
        entries.append(entry)
    return entries


def _age_s(started_at: str) -> float:
    try:
        start = datetime.fromisoformat(started_at)
    except ValueError:
        return 0.0
    return max(0.0, (datetime.now(timezone.utc) - start).total_seconds())


def _instances(region: str, cluster_name: str) -> list[dict[str, Any]]:
    ec2 = _client("ec2", region)
    pages = _call("list the cluster's instances", ec2.get_paginator("describe_instances").paginate,
                  Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster_name]},
                           {"Name": "instance-state-name", "Values": ["pending", "running"]}])
    now = datetime.now(timezone.utc)
    found = []
    try:
        for page in pages:
            for reservation in page.get("Reservations", []):
                for inst in reservation.get("Instances", []):
                    tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
                    launched = inst.get("LaunchTime") or now
                    found.append({"id": inst["InstanceId"], "instance_type": inst.get("InstanceType"),
                                  "spot": inst.get("InstanceLifecycle") == "spot",
                                  "kind": tags.get("ray-node-type", "?"), "state": inst["State"]["Name"],
                                  "age_s": max(0.0, (now - launched).total_seconds())})
    except Exception as exc:  # noqa: BLE001 - paginators raise lazily
        raise _aws_error(exc, "list the cluster's instances") from None
    return found
