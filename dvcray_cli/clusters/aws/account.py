"""The AWS account: boto3 clients, read-only checks, dvcray's IAM roles, instances.

Every botocore error becomes a one-line message (``aws_error``). Ray's own AWS
pieces (``bootstrap_config``, the node provider) are called from here with
``no_config_cache``: Ray otherwise caches the resolved config under
``/tmp/ray-config-<hash>`` whatever the endpoint, and a run against a fake
endpoint would poison a later real one.
"""

from __future__ import annotations

import copy
import json
import os
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlparse

from dvcray_cli.clusters.aws.config import CLUSTER_TAG, TRUST_POLICY, NodeTypePlan
from dvcray_cli.clusters.launcher import Check
from dvcray_cli.errors import ClusterError, DvcrayError, UsageError


def aws_error(exc: Exception, what: str) -> DvcrayError:
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


def client(service: str, region: str | None = None):
    """A boto3 client; without ``region``, the user's default region (or us-east-1)."""
    import boto3

    session = boto3.session.Session()
    return session.client(service, region_name=region or session.region_name or "us-east-1")


def call(what: str, func, *args, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return func(*args, **kwargs)
    except (BotoCoreError, ClientError) as exc:
        raise aws_error(exc, what) from None


def fake_endpoint() -> str | None:
    """The AWS endpoint override when it points at this machine (a fake AWS such as moto):
    a loopback name or address, or an address of one of this machine's interfaces (seen
    from its network namespace: another namespace's address is another machine's)."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2"):
        url = os.environ.get(var, "").strip()
        if not url:
            continue
        host = (urlparse(url if "://" in url else f"http://{url}").hostname or "").lower()
        if host in ("localhost", "::1", "0.0.0.0") or host.startswith("127.") or host.endswith(".localhost"):
            return url
        if host in _own_addresses():
            return url
    return None


def _own_addresses() -> set[str]:
    import socket

    import psutil

    found = {socket.gethostname().lower()}
    for addresses in psutil.net_if_addrs().values():
        found.update(a.address.split("%", 1)[0].lower() for a in addresses)
    return found


def refuse_fake_endpoint() -> None:
    """The safety net: never launch instances against a fake AWS on this machine."""
    url = fake_endpoint()
    if url:
        raise ClusterError(f"Refusing to launch instances: AWS_ENDPOINT_URL points at this machine ({url}).",
                           "A fake AWS (moto) gives instances public IP addresses and Ray would open SSH "
                           "connections to them. `--dry-run` and the bootstrap step are what can be tested "
                           "against it.")


def check_account(region: str, nodes: list[NodeTypePlan], bucket: str, checks: list[Check]) -> str | None:
    """Read-only checks, in the order a person would fix them. Each failure raises."""
    from botocore.exceptions import ClientError

    sts = client("sts")
    ident = call("check your AWS credentials", sts.get_caller_identity)
    account = ident.get("Account")
    checks.append(Check("credentials", True, f"account {account} as {ident.get('Arn')}"))

    # The region first, through a region that always exists: a client for a
    # region that does not exist fails with a connection error, not a message.
    regions = call("list AWS regions", client("ec2").describe_regions, AllRegions=True)
    status = {r["RegionName"]: r.get("OptInStatus", "opt-in-not-required") for r in regions["Regions"]}
    if region not in status:
        raise UsageError(f"Unknown AWS region {region!r} (provider.region).",
                         f"Use one of: {', '.join(sorted(status))}.")
    if status[region] == "not-opted-in":
        raise UsageError(f"The AWS region {region} is not enabled for account {account}.",
                         "Enable it in the AWS console (Account > AWS Regions) or pick another region.")
    checks.append(Check("region", True, region))

    ec2 = client("ec2", region)
    wanted = sorted({n.instance_type for n in nodes})
    offered = call(f"list the instance types offered in {region}", ec2.describe_instance_type_offerings,
                    LocationType="region", Filters=[{"Name": "instance-type", "Values": wanted}])
    have = {o["InstanceType"] for o in offered.get("InstanceTypeOfferings", [])}
    for node in nodes:
        if node.instance_type not in have:
            raise UsageError(f"Instance type {node.instance_type!r} (node type {node.name!r}) is not offered "
                             f"in {region}.", "Fix InstanceType in the config, or pick a region that offers it.")
    checks.append(Check("instance types", True, f"{', '.join(wanted)} offered in {region}"))
    described = call("describe instance types", ec2.describe_instance_types, InstanceTypes=wanted)
    shapes = {d["InstanceType"]: shape(d) for d in described.get("InstanceTypes", [])}
    for node in nodes:
        node.shape = shapes.get(node.instance_type, "")

    _check_network(ec2, region, nodes, checks)

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
                raise aws_error(exc, "look up images") from None
        except Exception as exc:  # noqa: BLE001
            raise aws_error(exc, "look up images") from None
        if not found or found[0].get("State", "available") != "available":
            raise UsageError(f"Image {image} (node type {users}) does not exist in {region}.",
                             "AMI ids differ per region: see the Images comment in the config for how to "
                             "find the current one.")
        checks.append(Check("image", True, f"{image} ({found[0].get('Name', '?')})"))

    s3 = client("s3", region)
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
        raise aws_error(exc, f"reach the store bucket {bucket}") from None
    return account


def _check_network(ec2, region: str, nodes: list[NodeTypePlan], checks: list[Check]) -> None:
    """The subnets and security groups the config names exist (Ray's bootstrap would stop
    on a missing one only after dvcray's IAM roles were made, with a message of its own)."""
    for kind, key, describe, filter_name, listed in (
            ("Subnet", "subnets", ec2.describe_subnets, "subnet-id", "Subnets"),
            ("Security group", "security_groups", ec2.describe_security_groups, "group-id", "SecurityGroups")):
        wanted = sorted({i for n in nodes for i in getattr(n, key)})
        if not wanted:
            continue
        found = call(f"look up {kind.lower()}s", describe, Filters=[{"Name": filter_name, "Values": wanted}])
        have = {item.get("SubnetId") or item.get("GroupId") for item in found.get(listed, [])}
        for missing in (i for i in wanted if i not in have):
            users = ", ".join(n.name for n in nodes if missing in getattr(n, key))
            field = "SubnetIds" if key == "subnets" else "SecurityGroupIds"
            raise UsageError(f"{kind} {missing} ({field} of node type {users}) does not exist in {region}.",
                             f"Fix {field} in the config, or leave it out and Ray picks the default VPC's.")
        checks.append(Check(key.replace("_", " "), True, f"{', '.join(wanted)} in {region}"))


def shape(described: dict[str, Any]) -> str:
    """``4 vCPUs, 16 GiB, 1 x NVIDIA T4`` from ``describe_instance_types``."""
    cpus = described.get("VCpuInfo", {}).get("DefaultVCpus")
    mem = described.get("MemoryInfo", {}).get("SizeInMiB")
    parts = [f"{cpus} vCPUs" if cpus else "", f"{mem / 1024:g} GiB" if mem else ""]
    for gpu in described.get("GpuInfo", {}).get("Gpus", []):
        parts.append(f"{gpu.get('Count', 1)} x {gpu.get('Manufacturer', '')} {gpu.get('Name', 'GPU')}".replace("  ", " "))
    return ", ".join(p for p in parts if p)


def ensure_iam(p: Any, created: list[str], existing: list[str]) -> bool:
    """dvcray's two roles and instance profiles, with their inline policies
    brought up to date. Returns True when a profile is new (or got its role).

    Args:
        p: the plan (``dvcray_cli.clusters.aws.AwsPlan``): its region, cluster name,
            store bucket and ``iam`` section.
    """
    from botocore.exceptions import ClientError

    iam = client("iam", p.region)
    changed = False
    for role in ("worker", "head"):        # the head's policy names the worker role
        name = p.iam[f"{role}_role"]
        tags = [{"Key": "dvcray-cluster", "Value": p.cluster_name}]
        try:
            iam.get_role(RoleName=name)
            existing.append(f"IAM role {name}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchEntity":
                raise aws_error(exc, f"look up the IAM role {name}") from None
            call(f"create the IAM role {name}", iam.create_role, RoleName=name,
                  AssumeRolePolicyDocument=json.dumps(TRUST_POLICY), Tags=tags,
                  Description=f"dvcray cluster {p.cluster_name}: {role} nodes (store bucket {p.store_bucket})")
            created.append(f"IAM role {name}")
        call(f"set the policy of the IAM role {name}", iam.put_role_policy, RoleName=name,
              PolicyName="dvcray-node", PolicyDocument=json.dumps(p.iam["policies"][role]))
        try:
            profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
            existing.append(f"instance profile {name}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchEntity":
                raise aws_error(exc, f"look up the instance profile {name}") from None
            profile = call(f"create the instance profile {name}", iam.create_instance_profile,
                            InstanceProfileName=name, Tags=tags)["InstanceProfile"]
            created.append(f"instance profile {name}")
            changed = True
        if name not in [r["RoleName"] for r in profile.get("Roles", [])]:
            call(f"add the role {name} to its instance profile", iam.add_role_to_instance_profile,
                  InstanceProfileName=name, RoleName=name)
            changed = True
    return changed


def ray_bootstrap(config: dict[str, Any]) -> dict[str, Any]:
    from botocore.exceptions import BotoCoreError, ClientError
    from ray.autoscaler import sdk

    try:
        return sdk.bootstrap_config(copy.deepcopy(config), no_config_cache=True)
    except (BotoCoreError, ClientError) as exc:
        raise aws_error(exc, "prepare the cluster (key pair, subnets, security group)") from None
    except Exception as exc:
        # Ray's cli_logger.abort raises click exceptions, doassert AssertionError.
        if not is_ray_abort(exc):
            raise
        raise ClusterError(f"Ray's cluster launcher stopped while preparing the cluster: {exc}",
                           "Nothing was launched; fix the cause and run the command again.") from None


def is_ray_abort(exc: BaseException) -> bool:
    """Ray's launcher reports with ``cli_logger.abort`` (a click exception) or
    ``doassert`` (AssertionError); its message is already printed."""
    import click

    return isinstance(exc, (click.ClickException, AssertionError))


def head_ip(config: dict[str, Any]) -> str | None:
    from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND

    from dvcray_cli.clusters.launcher.provider import node_provider

    provider = node_provider(config["provider"], config["cluster_name"])
    heads = provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD})
    if not heads:
        return None
    if config["provider"].get("use_internal_ips"):
        return provider.internal_ip(heads[0])
    return provider.external_ip(heads[0])


def terminate_cluster(provider_config: dict[str, Any], cluster_name: str) -> list[str]:
    """Terminate every instance tagged with ``cluster_name``, workers first and the
    head last (``launcher.provider.terminate_cluster``), AWS errors as messages.

    Returns:
        The instance ids it asked to terminate.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from dvcray_cli.clusters.launcher.provider import terminate_cluster as terminate

    try:
        return terminate(provider_config, cluster_name)
    except (BotoCoreError, ClientError) as exc:
        raise aws_error(exc, f"terminate the instances of cluster {cluster_name}") from None


def instances(region: str, cluster_name: str) -> list[dict[str, Any]]:
    ec2 = client("ec2", region)
    pages = call("list the cluster's instances", ec2.get_paginator("describe_instances").paginate,
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
        raise aws_error(exc, "list the cluster's instances") from None
    return found
