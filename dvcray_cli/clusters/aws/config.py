"""AWS cluster configs: Ray cluster-launcher YAMLs with dvcray's ``{{ placeholders }}``.

Loading, the structure dvcray needs, the names dvcray gives clusters and IAM
roles, and the least-privilege policies of the nodes' roles. Reading YAML, Ray's
own schema check and rendering placeholders are the launcher's, shared with every
provider (``dvcray_cli.clusters.launcher.config``). Nothing here talks to AWS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvcray_cli.clusters.launcher.config import read_yaml, render as render_any, uses, validate_with_ray
from dvcray_cli.errors import UsageError

__all__ = ["BUILT_INS", "CLUSTER_TAG", "NodeTypePlan", "PLACEHOLDERS", "TRUST_POLICY", "check_structure",
           "default_cluster_name", "iam_name", "is_aws_config", "load_config", "node_policies",
           "node_type_plans", "profile_name", "read_yaml", "render", "uses", "validate_with_ray"]

BUILT_INS = ("aws", "aws-gpu")
CLUSTER_TAG = "ray-cluster-name"          # Ray tags every node with it (ray/autoscaler/tags.py)
PLACEHOLDERS = ("cluster_name", "ray_version", "auth_token_file",
                "requirements_file", "head_instance_profile", "worker_instance_profile",
                "idle_timeout_seconds")
TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                   "Action": "sts:AssumeRole"}],
}


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
    subnets: list[str] = field(default_factory=list)          # SubnetIds the config names
    security_groups: list[str] = field(default_factory=list)  # SecurityGroupIds the config names


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
        raw = read_yaml(path)
        return str((raw.get("provider") or {}).get("type", "")).lower() == "aws"
    return False


def load_config(config: str) -> tuple[dict[str, Any], Path]:
    """The raw config named ``config`` and the file it came from."""
    from dvcray_cli.packaged import cluster_configs_dir

    name = config.strip()
    path = cluster_configs_dir() / f"{name}.yaml" if name in BUILT_INS else Path(name).expanduser()
    if not path.is_file():
        raise UsageError(f"No cluster config at {path}.", "Pass aws, aws-gpu or the path of a YAML file.")
    return read_yaml(path), path.resolve()


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


def default_cluster_name(first_commit: str, config_label: str) -> str:
    """``dvcray-<first commit>-<config>``: what every clone of the project shares
    (a second clone, a moved repo, a teammate's checkout name the same cluster),
    and two configs of one project never share one."""
    label = re.sub(r"[^a-z0-9-]+", "-", Path(config_label).stem.lower()).strip("-")[:24] or "cluster"
    return f"dvcray-{first_commit[:10]}-{label}"


def iam_name(cluster_name: str, role: str) -> str:
    """The IAM role and instance profile name dvcray uses for ``role`` (head, worker)."""
    base = cluster_name if cluster_name.startswith("dvcray") else f"dvcray-{cluster_name}"
    base = re.sub(r"[^\w+=,.@-]", "-", base)
    return f"{base[:64 - len(role) - 1]}-{role}"


def render(value: Any, values: dict[str, str]) -> Any:
    """``value`` with every ``{{ name }}`` replaced (``launcher.config.render``).

    Raises:
        UsageError: a placeholder dvcray does not know.
    """
    return render_any(value, values, PLACEHOLDERS)


def profile_name(node_config: dict[str, Any]) -> str:
    profile = node_config.get("IamInstanceProfile") or {}
    return str(profile.get("Name") or profile.get("Arn") or "")


def node_type_plans(prepared: dict[str, Any], managed: dict[str, bool]) -> list[NodeTypePlan]:
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
            instance_profile=profile_name(node_config), managed_profile=managed.get(name, False),
            subnets=[str(i) for i in node_config.get("SubnetIds") or []],
            security_groups=[str(i) for i in node_config.get("SecurityGroupIds") or []]))
    plans.sort(key=lambda p: p.role != "head")
    return plans


def node_policies(cluster_name: str, region: str, bucket: str, account: str, worker_role: str,
                  prefix: str = "", instance_types: list[str] | None = None) -> dict[str, Any]:
    """The inline policies of dvcray's node roles: least privilege.

    - Both: the store's prefix in its bucket and nothing else in S3.
    - The head, for Ray's autoscaler: describe EC2; launch instances only when
      they carry this cluster's tag and are of the config's instance types, in
      the cluster's region; tag them at launch or when they already carry the
      cluster's tag; stop, start and terminate only instances tagged with this
      cluster's name (the idle watcher terminates the head itself this way);
      pass the worker role to the workers it launches; create EC2's spot
      service-linked role (the first spot request of an account needs it).
    """
    bucket_arn = f"arn:aws:s3:::{bucket}"
    prefix = prefix.strip("/")
    objects = f"{bucket_arn}/{prefix}/*" if prefix else f"{bucket_arn}/*"
    listing: dict[str, Any] = {"Sid": "StoreList", "Effect": "Allow", "Action": "s3:ListBucket",
                               "Resource": bucket_arn}
    if prefix:
        listing["Condition"] = {"StringLike": {"s3:prefix": [prefix, f"{prefix}/*"]}}
    s3 = [
        {"Sid": "StoreBucket", "Effect": "Allow",
         "Action": ["s3:GetBucketLocation", "s3:ListBucketMultipartUploads"], "Resource": bucket_arn},
        listing,
        {"Sid": "StoreObjects", "Effect": "Allow",
         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                    "s3:ListMultipartUploadParts"],
         "Resource": objects},
    ]
    own_cluster = {"StringEquals": {f"ec2:ResourceTag/{CLUSTER_TAG}": cluster_name}}
    launch_own: dict[str, Any] = {f"aws:RequestTag/{CLUSTER_TAG}": cluster_name}
    if instance_types:
        launch_own["ec2:InstanceType"] = sorted(set(instance_types))
    ec2 = [
        {"Sid": "AutoscalerDescribe", "Effect": "Allow",
         "Action": ["ec2:DescribeInstances", "ec2:DescribeInstanceStatus", "ec2:DescribeInstanceTypes",
                    "ec2:DescribeImages", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups",
                    "ec2:DescribeKeyPairs", "ec2:DescribeVpcs", "ec2:DescribeAvailabilityZones"],
         "Resource": "*"},
        # The instance itself: only with this cluster's tag, of the config's types.
        {"Sid": "AutoscalerLaunchOwn", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": f"arn:aws:ec2:{region}:{account}:instance/*", "Condition": {"StringEquals": launch_own}},
        # What a launch also touches, in this region only.
        {"Sid": "AutoscalerLaunchWith", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": [f"arn:aws:ec2:{region}:{account}:{kind}/*" for kind in
                      ("volume", "network-interface", "subnet", "security-group", "key-pair",
                       "spot-instances-request")] + [f"arn:aws:ec2:{region}::image/*"]},
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
