"""The cluster configs that ship with dvcray, read without starting anything:
the local-multinode config, and AWS configs rendered into what Ray's launcher gets,
with the least-privilege policies of the nodes' roles."""

from __future__ import annotations

import copy

import pytest
import yaml

from helpers import REPO
from dvcray_cli.clusters import local
from dvcray_cli.clusters.aws import config as aws_config
from dvcray_cli.clusters.aws import pricing
from dvcray_cli.clusters.launcher import config as launcher_config
from dvcray_cli.errors import UsageError

CONFIGS = REPO / "cluster-configs"


def test_max_resources_of_the_built_in_multinode_config(tmp_path):
    from dvcray_cli.packaged import cluster_configs_dir

    record = local.LocalCluster("m", "", "", str(tmp_path), "", "", None,
                                autoscaling_config=str(cluster_configs_dir() / "local-multinode.yaml"))
    assert local.max_resources(record)["CPU"] == 3
    types = local.node_types(record)
    assert types == {"ray.worker.cpu": {"resources": {"CPU": 1, "object_store_memory": 200000000},
                                        "min_workers": 1, "max_workers": 3}}


def test_the_built_in_multinode_config_has_every_key_the_provider_needs(tmp_path):
    """Ray's wheel lacks fake_multinode's defaults: a missing key kills its autoscaler."""
    import yaml

    from dvcray_cli.packaged import cluster_configs_dir

    config = yaml.safe_load((cluster_configs_dir() / "local-multinode.yaml").read_text())
    for key in ("cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes", "provider", "auth",
                "docker", "available_node_types", "head_node_type", "file_mounts", "cluster_synced_files",
                "file_mounts_sync_continuously", "rsync_exclude", "rsync_filter", "initialization_commands",
                "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in config, key
    provider = config["provider"]
    assert provider["type"] == "fake_multinode"
    for key in ("disable_node_updaters", "use_node_id_as_ip", "disable_launch_config_check",
                "foreground_node_launch"):
        assert provider[key] is True, key
    assert config["available_node_types"][config["head_node_type"]]["resources"]["CPU"] == 0
    # dvcray gives the fake nodes this cluster's own GCS (else they join port 6379, whoever has it).
    path, fake = local.resolve_autoscaling_config(cluster_configs_dir() / "local-multinode.yaml", tmp_path, 5555)
    assert fake and yaml.safe_load(path.read_text())["provider"]["gcs_address"] == "127.0.0.1:5555"


# --------------------------------------------------------------------------- AWS configs, offline


def _aws(name: str = "aws") -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", ["aws", "aws-gpu"])
def test_builtin_aws_configs_have_what_dvcray_needs(name):
    raw = _aws(name)
    aws_config.check_structure(raw, CONFIGS / f"{name}.yaml")
    text = yaml.safe_dump(raw)
    placeholders = {m.group(1) for m in launcher_config.PLACEHOLDER.finditer(text)}
    assert placeholders <= set(aws_config.PLACEHOLDERS)
    assert {"cluster_name", "auth_token_file", "idle_timeout_seconds"} <= placeholders
    # dvcray comes from the client's own wheel (launcher_config.with_additions), never from an index.
    assert "dvcray==" not in text and "dvcray_requirement" not in text
    assert aws_config.is_aws_config(name)


def test_render_fills_every_placeholder_and_refuses_unknown_ones():
    values = {k: f"<{k}>" for k in aws_config.PLACEHOLDERS}
    rendered = aws_config.render(copy.deepcopy(_aws()), values)
    assert "{{" not in yaml.safe_dump(rendered)
    assert rendered["file_mounts"]["~/.dvcray/auth_token"] == "<auth_token_file>"
    with pytest.raises(UsageError, match="Unknown placeholder {{ nope }}"):
        aws_config.render({"a": ["{{ nope }}"]}, values)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["provider"].update(type="gcp"), "provider.type is not aws"),
    (lambda c: c["provider"].pop("region"), "provider.region is missing"),
    (lambda c: c.pop("head_node_type"), "no head_node_type"),
    (lambda c: c.update(head_node_type="boss"), "head_node_type 'boss' is not one of"),
    (lambda c: c.update(available_node_types={}), "available_node_types is missing"),
])
def test_structure_errors_name_the_key(edit, message, tmp_path):
    raw = _aws()
    edit(raw)
    with pytest.raises(UsageError, match=message):
        aws_config.check_structure(raw, tmp_path / "c.yaml")


def test_node_policies_are_least_privilege():
    policies = aws_config.node_policies("dvcray-p-abc123", "us-east-1", "my-bucket", "123456789012",
                                        "dvcray-p-abc123-worker", prefix="team/store",
                                        instance_types=["m5.xlarge", "m5.large", "m5.xlarge"])

    def actions(doc):
        return {a for s in doc["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}

    def s3_resources(doc):
        return {s["Resource"] for s in doc["Statement"] if any(a.startswith("s3:") for a in
                ([s["Action"]] if isinstance(s["Action"], str) else s["Action"]))}

    worker, head = policies["worker"], policies["head"]
    assert {a.split(":")[0] for a in actions(worker)} == {"s3"}
    # The store's prefix, not the whole bucket (issue 10, item 15).
    assert s3_resources(worker) == s3_resources(head) == {"arn:aws:s3:::my-bucket",
                                                          "arn:aws:s3:::my-bucket/team/store/*"}
    listing = next(s for s in worker["Statement"] if s["Action"] == "s3:ListBucket")
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["team/store", "team/store/*"]}}
    # Launch only this cluster's instances, of the config's types.
    own = next(s for s in head["Statement"] if s["Sid"] == "AutoscalerLaunchOwn")
    assert own["Resource"] == "arn:aws:ec2:us-east-1:123456789012:instance/*"
    assert own["Condition"] == {"StringEquals": {"aws:RequestTag/ray-cluster-name": "dvcray-p-abc123",
                                                 "ec2:InstanceType": ["m5.large", "m5.xlarge"]}}
    launches = [s for s in head["Statement"] if s["Action"] == "ec2:RunInstances"]
    assert all("*" != s["Resource"] and "instance/*" not in str(s.get("Resource")) for s in launches
               if s["Sid"] != "AutoscalerLaunchOwn")
    terminate = next(s for s in head["Statement"] if "ec2:TerminateInstances" in s["Action"])
    assert terminate["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": "dvcray-p-abc123"}}
    passing = next(s for s in head["Statement"] if s["Action"] == "iam:PassRole")
    assert passing["Resource"] == "arn:aws:iam::123456789012:role/dvcray-p-abc123-worker"
    assert "*" not in actions(head) and "s3:*" not in actions(head)


def test_cluster_names_are_what_every_clone_shares():
    """The project's first commit and the config: not the repo's path, which a second
    clone or a moved repo does not share (issue 10, item 13)."""
    sha = "3f2a1b9c" + "0" * 32
    assert aws_config.default_cluster_name(sha, "aws") == "dvcray-3f2a1b9c00-aws"
    assert aws_config.default_cluster_name(sha, "/some/where/My Lab.yaml") == "dvcray-3f2a1b9c00-my-lab"
    assert aws_config.default_cluster_name(sha, "aws") != aws_config.default_cluster_name(sha, "aws-gpu")
    assert len(aws_config.default_cluster_name(sha, "x" * 100)) <= 60
    long = aws_config.iam_name("x" * 100, "worker")
    assert len(long) <= 64 and long.endswith("-worker")


def test_cost_estimate_from_the_shipped_table():
    assert pricing.table()["as_of"] == "2026-11-26"
    low, high = pricing.hourly("us-east-1", "m5.xlarge", spot=True)
    assert high == pricing.on_demand("us-east-1", "m5.xlarge") and low < high
    estimate = pricing.estimate("us-east-1", [pricing.NodeCount("m5.large", False, 1, 1),
                                              pricing.NodeCount("m5.xlarge", True, 0, 4),
                                              pricing.NodeCount("zz.huge", False, 0, 1)])
    assert estimate.low == pytest.approx(pricing.on_demand("us-east-1", "m5.large"))
    assert estimate.high == pytest.approx(pricing.on_demand("us-east-1", "m5.large")
                                          + 4 * pricing.on_demand("us-east-1", "m5.xlarge"))
    assert estimate.unpriced == ["zz.huge"]


def test_a_bucket_wide_store_gets_the_bucket():
    worker = aws_config.node_policies("c", "us-east-1", "b", "1", "c-worker")["worker"]
    objects = next(s for s in worker["Statement"] if s["Sid"] == "StoreObjects")
    assert objects["Resource"] == "arn:aws:s3:::b/*"
    assert "Condition" not in next(s for s in worker["Statement"] if s["Action"] == "s3:ListBucket")


def test_the_port_forward_pins_the_heads_host_key(tmp_path):
    from dvcray_cli.clusters.launcher import ssh

    cmd = ssh.forward_command("198.51.100.7", "ubuntu", "~/.ssh/k.pem", 4321, tmp_path / "known_hosts")
    options = [cmd[i + 1] for i, part in enumerate(cmd) if part == "-o"]
    assert "StrictHostKeyChecking=accept-new" in options
    assert f"UserKnownHostsFile={tmp_path / 'known_hosts'}" in options
    assert not any(o in ("StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null") for o in options)
    assert "127.0.0.1:4321:127.0.0.1:8265" in cmd and cmd[-1] == "ubuntu@198.51.100.7"
