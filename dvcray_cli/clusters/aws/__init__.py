"""AWS clusters through Ray's cluster launcher (DESIGN.md, "Clusters").

``up`` is three steps, each a function of its own:

1. ``plan`` (``planning``): load the YAML, check it against Ray's own schema, fill
   in dvcray's ``{{ placeholders }}``, make read-only checks in the account and price
   it. It creates nothing, anywhere: ``--dry-run`` stops here.
2. ``bootstrap`` (``cluster``): the auth token, dvcray's IAM roles and instance
   profiles (the store bucket only), then Ray's ``bootstrap_config``: key pair,
   subnets, security group. No instance is created here.
3. ``launch`` (``cluster``): Ray's launcher in a process of its own, the SSH
   port-forward to the head's job API, and the record in ``.dvcray/``.

``up`` runs 2 and 3 after refusing a fake endpoint on this machine (moto hands out
public IP addresses, and Ray would open SSH connections to them); ``down`` terminates
the instances through Ray's node provider. Where runs reach it: ``reach``.

What every launcher cluster gets (the token, dvcray's own wheel installed on every
node, the dashboard on the head's 127.0.0.1, the idle watcher) comes from
``dvcray_cli.clusters.launcher.config.with_additions``; the built-in AWS configs
spell some of it out themselves.

Other modules: ``config`` (the structure AWS needs, names, policies), ``account``
(boto3, IAM, instances), ``records``, ``pricing``; the launcher's ``config`` (YAML,
schema, placeholders, additions), ``ssh`` (the port-forward) and ``launch``.
boto3 and Ray are imported inside the functions that need them.
"""

from dvcray_cli.clusters.aws.cluster import IAM_PROPAGATION_S, AwsDown, Bootstrapped, bootstrap, down, launch, \
    status, up
from dvcray_cli.clusters.aws.config import BUILT_INS, NodeTypePlan, is_aws_config
from dvcray_cli.clusters.aws.planning import DEFAULT_IDLE_TIMEOUT_S, AwsPlan, first_commit, plan, \
    is_projects
from dvcray_cli.clusters.aws.reach import recorded_address, recorded_at, service_url
from dvcray_cli.clusters.aws.records import AwsCluster
from dvcray_cli.clusters.launcher import Check

__all__ = ["BUILT_INS", "DEFAULT_IDLE_TIMEOUT_S", "IAM_PROPAGATION_S", "AwsCluster", "AwsDown", "AwsPlan",
           "Bootstrapped", "Check", "NodeTypePlan", "bootstrap", "down", "first_commit", "is_aws_config", "launch",
           "plan", "is_projects", "recorded_address", "recorded_at", "service_url", "status", "up"]
