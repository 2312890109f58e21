"""AWS clusters, as far as this machine allows: up to bootstrap, against moto.

Only loopback traffic is allowed here, and a mistake must not leak: the tests
that talk to AWS run inside a network namespace that has nothing but loopback
(``unshare -n``, ``ip link set lo up``), with their own moto server started
inside it. Plain ``pytest`` gets there through ``test_aws_suite_in_a_loopback_only_namespace``,
which re-runs this module's tests marked ``loopback_namespace`` under ``unshare`` (as
root; CI runs as root) and asserts that they passed; outside the namespace conftest
deselects them.

Never launch instances through Ray's launcher against moto: moto gives them
public IP addresses and Ray then opens SSH connections to them. The tests stop
after ``aws.bootstrap`` (which creates no instance and asserts so), and check
that ``up`` refuses to launch when ``AWS_ENDPOINT_URL`` points at this machine.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import IN_NETNS_ENV, REPO, free_port, run_dvcray, run_in_loopback_namespace, sh, unavailable
from dvcray_cli.errors import ClusterError, UsageError

CONFIGS = REPO / "cluster-configs"


def _only_loopback() -> bool:
    """This process's network namespace has no interface but ``lo``
    (``if_nameindex`` asks the kernel for the current namespace; /sys may show the host's)."""
    return [name for _i, name in socket.if_nameindex()] == ["lo"]


IN_NETNS = os.environ.get(IN_NETNS_ENV) == "1" and _only_loopback()


# --------------------------------------------------------------------------- outside: the launcher


@pytest.mark.skipif(IN_NETNS, reason="the launcher runs outside the namespace")
def test_aws_suite_in_a_loopback_only_namespace():
    """Run this module's AWS tests in a loopback-only namespace with moto inside; they must
    pass. The namespace has a PID namespace too: a timeout, or this run being killed,
    ends every process the inner run started (moto, a Ray head), not only its pytest."""
    try:
        probe = run_in_loopback_namespace(["true"], timeout=60)
    except FileNotFoundError as exc:
        unavailable(f"cannot create a network namespace: {exc.filename} is missing (util-linux)")
    if probe.returncode != 0:
        unavailable("cannot create a loopback-only namespace (`unshare` needs root and util-linux, "
                    f"`ip` iproute2): {probe.stderr.strip()}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "PYTEST_ADDOPTS"}
    env[IN_NETNS_ENV] = "1"
    started = time.monotonic()
    proc = run_in_loopback_namespace([sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p",
                                      "no:cacheprovider", "-o", "addopts=-ra --strict-markers",
                                      "-m", "loopback_namespace"],
                                     timeout=600, cwd=REPO, env=env)
    took = time.monotonic() - started
    summary = (proc.stdout + proc.stderr).strip().splitlines()[-40:]
    print("\n".join(summary), f"\n(namespace run took {took:.1f} s)")
    assert proc.returncode == 0, "AWS tests failed inside the namespace:\n" + "\n".join(summary)
    assert " skipped" not in summary[-1], "AWS tests skipped inside the namespace:\n" + "\n".join(summary)
    assert " passed" in summary[-1]


# --------------------------------------------------------------------------- inside: no AWS needed


@pytest.mark.parametrize("name", ["aws", "aws-gpu"])
def test_builtin_configs_pass_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert prepared["provider"]["cache_stopped_nodes"] is False
    workers = [t for n, t in prepared["available_node_types"].items() if n != prepared["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in workers)
    for node_type in prepared["available_node_types"].values():
        assert node_type["node_config"]["ImageId"].startswith("ami-")
        assert "IamInstanceProfile" in node_type["node_config"]
    starts = prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH" in c
                                        for c in ray_starts)
    assert "--dashboard-host=127.0.0.1" in ray_starts[0]
    assert any("dvcray_cli.clusters.idle aws" in c for c in prepared["head_start_ray_commands"])
    assert "~/.dvcray/auth_token" in prepared["file_mounts"]


def test_loopback_endpoint_guard(monkeypatch):
    from dvcray_cli.clusters.aws import account

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5000")
    assert account.fake_endpoint() == "http://127.0.0.1:5000"
    with pytest.raises(ClusterError, match="Refusing to launch"):
        account.refuse_fake_endpoint()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://ec2.example.com")
    assert account.fake_endpoint() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", "http://localhost:4566")
    assert account.fake_endpoint() == "http://localhost:4566"


# --------------------------------------------------------------------------- inside: fixtures


def _aws_skip_reason() -> str | None:
    if not IN_NETNS:
        return ("talks to a fake AWS: runs only inside a loopback-only network namespace, "
                "through test_aws_suite_in_a_loopback_only_namespace")
    return None


def _pinned_images() -> list[str]:
    images = set()
    for path in CONFIGS.glob("aws*.yaml"):
        raw = yaml.safe_load(path.read_text())
        for node_type in raw["available_node_types"].values():
            images.add(node_type["node_config"]["ImageId"])
    return sorted(images)


@pytest.fixture(scope="session")
def moto_aws(tmp_path_factory):
    """A moto server on 127.0.0.1 inside the namespace, knowing the pinned images.

    moto knows no real AMI ids; ``MOTO_AMIS_PATH`` gives it ours (in every region).
    """
    reason = _aws_skip_reason()
    if reason:
        pytest.fail(reason)   # never reached: conftest deselects these tests outside the namespace
    folder = tmp_path_factory.mktemp("moto")
    amis = [{"ami_id": image, "name": f"pinned image {image}", "description": "dvcray test image",
             "owner_id": "099720109477", "public": True, "virtualization_type": "hvm",
             "architecture": "x86_64", "state": "available", "platform": None,
             "root_device_type": "ebs", "root_device_name": "/dev/sda1", "sriov": "simple"}
            for image in _pinned_images()]
    (folder / "amis.json").write_text(json.dumps(amis))
    port = free_port()
    env = {**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true", "MOTO_AMIS_PATH": str(folder / "amis.json")}
    log = open(folder / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto did not start: {(folder / 'moto.log').read_text()}")
            time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def aws_env(moto_aws, monkeypatch, tmp_path):
    """Fake credentials pointed at moto; nothing that could reach a real endpoint.

    moto is not reset between tests (with IAM's managed policies loaded a reset
    costs 2 s): tests compare counts before and after, and each test's project
    (its own path) gets a cluster name, roles and security group of its own.
    """
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_aws)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return moto_aws


BUCKET = "dvcray-test-store"


@pytest.fixture(scope="session")
def _project_template(moto_aws, tmp_path_factory):
    """A committed DVC project whose default remote is an S3 bucket in moto (built once)."""
    root = tmp_path_factory.mktemp("template") / "project"
    root.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "DVC_NO_ANALYTICS": "1"}
    sh("git", "init", "-q", "-b", "main", cwd=root, env=env)
    sh(str(Path(sys.executable).parent / "dvc"), "init", "-q", cwd=root, env=env)
    (root / "params.yaml").write_text("lr: 0.1\n")
    (root / "dvc.yaml").write_text("stages:\n  train:\n    cmd: echo hi\n")
    with open(root / ".dvc" / "config", "a") as f:
        f.write(f"[core]\n    remote = store\n['remote \"store\"']\n    url = s3://{BUCKET}/store\n"
                f"    endpointurl = {moto_aws}\n")
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-qm", "initial", cwd=root, env=env)
    return root


@pytest.fixture
def aws_project(aws_env, _project_template, tmp_path):
    """A fresh copy of the project template, its store bucket present in moto."""
    import boto3

    s3 = boto3.client("s3", region_name="us-east-1")
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    root = tmp_path / "project"
    shutil.copytree(_project_template, root, symlinks=True)
    return root


def inventory() -> dict[str, list[str]]:
    """Everything the tests could create, counted in moto."""
    import boto3

    iam = boto3.client("iam", region_name="us-east-1")
    ec2 = boto3.client("ec2", region_name="us-east-1")
    reservations = ec2.describe_instances()["Reservations"]
    return {
        "roles": sorted(r["RoleName"] for r in iam.list_roles()["Roles"]),
        "instance_profiles": sorted(p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]),
        "key_pairs": sorted(k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]),
        "security_groups": sorted(g["GroupName"] for g in ec2.describe_security_groups()["SecurityGroups"]),
        "instances": sorted(i["InstanceId"] for r in reservations for i in r["Instances"]
                            if i["State"]["Name"] != "terminated"),
    }


def _ray_caches() -> set[str]:
    return {p.name for p in Path("/tmp").glob("ray-config-*")}


def _write_config(tmp_path: Path, edit, name: str = "custom.yaml") -> Path:
    raw = yaml.safe_load((CONFIGS / "aws.yaml").read_text())
    edit(raw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


# --------------------------------------------------------------------------- inside: the tests


@pytest.mark.loopback_namespace
def test_dry_run_creates_nothing_and_prints_the_plan_with_its_cost(aws_project):
    before, caches = inventory(), _ray_caches()
    proc = run_dvcray("cluster", "up", "aws", "--dry-run", cwd=aws_project)
    assert proc.returncode == 0, proc.stderr
    assert inventory() == before
    assert _ray_caches() == caches
    assert not (aws_project / ".dvcray").exists()
    assert not (Path.home() / ".ssh").exists()
    text = proc.stdout
    for expected in ("us-east-1", "m5.large", "m5.xlarge", "spot", "0-4", "on-demand", "per hour", "4 vCPUs, 16 GiB",
                     "estimate", "price table of 2026-11-26", "ami-025d99823a4caad37",
                     "s3://dvcray-test-store/store", "Idle timeout:  1h", "port-forward", "Would create"):
        assert expected in text, f"{expected!r} not in the plan:\n{text}"
    # m5.large on demand + 0 workers ... + 4 x m5.xlarge on demand, from the shipped table.
    assert "$0.096 to $0.86 per hour" in text, text
    assert "nothing was created" in proc.stderr


@pytest.mark.loopback_namespace
def test_dry_run_gpu_config(aws_project):
    proc = run_dvcray("cluster", "up", "aws-gpu", "--dry-run", "--idle-timeout", "30m", cwd=aws_project)
    assert proc.returncode == 0, proc.stderr
    assert "g4dn.xlarge" in proc.stdout and "30m" in proc.stdout
    assert "NVIDIA T4" in proc.stdout, proc.stdout
    assert "$0.096 to $1.15 per hour" in proc.stdout, proc.stdout


@pytest.mark.loopback_namespace
def test_bootstrap_creates_roles_profiles_key_pair_security_group_and_no_instance(aws_project, monkeypatch):
    from dvcray_cli.clusters import aws

    before, caches = inventory(), _ray_caches()
    plan = aws.plan("aws", aws_project, idle_timeout_s=900)
    assert inventory() == before
    slept: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: slept.append(s) or real_sleep(min(s, 0.01)))
    boot = aws.bootstrap(plan, iam_wait_s=0)
    monkeypatch.setattr(time, "sleep", real_sleep)
    assert not [s for s in slept if s >= 5], f"bootstrap waited {slept}: Ray's IAM path (2 x 15 s sleeps) ran"
    after = inventory()

    assert after["instances"] == [], "bootstrap must never create an instance"
    head, worker = plan.iam["head_role"], plan.iam["worker_role"]
    assert set(after["roles"]) - set(before["roles"]) == {head, worker}
    assert set(after["instance_profiles"]) - set(before["instance_profiles"]) == {head, worker}
    assert "ray-autoscaler-v1" not in after["roles"], "Ray's broad default role must not be created"
    assert set(after["key_pairs"]) - set(before["key_pairs"]) == {"ray-autoscaler_us-east-1"}
    assert set(after["security_groups"]) - set(before["security_groups"]) == {f"ray-autoscaler-{plan.cluster_name}"}
    assert _ray_caches() == caches, "no_config_cache: nothing under /tmp/ray-config-*"
    assert Path(boot.key_path).expanduser().is_file()

    import boto3

    iam = boto3.client("iam")
    for role in (head, worker):
        profile = iam.get_instance_profile(InstanceProfileName=role)["InstanceProfile"]
        assert [r["RoleName"] for r in profile["Roles"]] == [role]
    worker_policy = iam.get_role_policy(RoleName=worker, PolicyName="dvcray-node")["PolicyDocument"]
    head_policy = iam.get_role_policy(RoleName=head, PolicyName="dvcray-node")["PolicyDocument"]
    s3_resources = {r for doc in (worker_policy, head_policy) for s in doc["Statement"]
                    if any(a.startswith("s3:") for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"]))
                    for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])}
    # The store's prefix (s3://dvcray-test-store/store), not the whole bucket.
    assert s3_resources == {"arn:aws:s3:::dvcray-test-store", "arn:aws:s3:::dvcray-test-store/store/*"}
    assert not any(a.startswith(("ec2:", "iam:")) for s in worker_policy["Statement"]
                   for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"]))
    terminate = [s for s in head_policy["Statement"] if "ec2:TerminateInstances" in s["Action"]]
    assert terminate[0]["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": plan.cluster_name}}

    ec2 = boto3.client("ec2", region_name="us-east-1")
    group = ec2.describe_security_groups(GroupNames=[f"ray-autoscaler-{plan.cluster_name}"])["SecurityGroups"][0]
    open_to_world = [(r.get("FromPort"), r.get("ToPort")) for r in group["IpPermissions"]
                     if any(ip.get("CidrIp") == "0.0.0.0/0" for ip in r.get("IpRanges", []))]
    assert open_to_world == [(22, 22)], "only SSH is open; the job API is reached through the port-forward"

    # The token: made here, 0600, shipped through file_mounts, used by every ray start.
    token = Path(plan.token_path)
    assert token.is_file() and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert token.parent == aws_project / ".dvcray" / "clusters"
    assert sh("git", "status", "--porcelain", cwd=aws_project) == ""
    resolved = boot.resolved
    assert resolved["file_mounts"]["~/.dvcray/auth_token"] == str(token)
    for node_type in resolved["available_node_types"].values():
        assert node_type["node_config"]["IamInstanceProfile"]["Name"] in (head, worker)
    assert "--timeout 900" in " ".join(resolved["head_start_ray_commands"])
    # dvcray on the nodes: the wheel of this dvcray (built by bootstrap), shipped and installed
    # after the config's own setup; never a package of that name from an index.
    from dvcray_cli.clusters.launcher import wheel

    assert wheel.default_path().is_file()
    assert resolved["file_mounts"]["~/.dvcray/dist"] == str(wheel.default_path().parent)
    assert f"install -q ~/.dvcray/dist/{wheel.wheel_name()}" in resolved["setup_commands"][-1]
    assert not any("dvcray==" in c for c in resolved["setup_commands"])
    written = yaml.safe_load(Path(boot.config_path).read_text())
    assert written["cluster_name"] == plan.cluster_name and "{{" not in json.dumps(written)

    # A second bootstrap finds everything and creates nothing new.
    again = aws.bootstrap(plan, iam_wait_s=0)
    assert again.created == [] and inventory() == after

    # Launching is the step after bootstrap: it refuses against this machine's fake AWS.
    with pytest.raises(ClusterError, match="Refusing to launch"):
        aws.launch(plan, boot)
    assert inventory()["instances"] == []


@pytest.mark.loopback_namespace
def test_up_refuses_to_launch_against_this_machine(aws_project):
    before = inventory()
    proc = run_dvcray("cluster", "up", "aws", "--yes", cwd=aws_project)
    assert proc.returncode == 3, proc.stderr
    assert "Refusing to launch" in proc.stderr
    assert inventory() == before
    assert not (aws_project / ".dvcray").exists()


@pytest.mark.loopback_namespace
def test_the_cluster_api_refuses_too_before_it_says_or_creates_anything(aws_project):
    """AWS's up sequence (refuse a fake endpoint, bootstrap, launch) is ``aws.up``'s own:
    ``clusters.up`` of a plan refuses without the command line's check first."""
    from dvcray_cli import clusters

    before = inventory()
    planned = clusters.plan("aws", aws_project)
    said: list[str] = []
    with pytest.raises(ClusterError, match="Refusing to launch"):
        clusters.up(planned, say=said.append)
    assert said == []
    assert inventory() == before
    assert not (aws_project / ".dvcray").exists()


@pytest.mark.loopback_namespace
def test_clear_errors_from_the_command_line_and_nothing_created(aws_project, tmp_path, monkeypatch):
    before = inventory()
    no_head = _write_config(tmp_path, lambda c: c.pop("head_node_type"))
    proc = run_dvcray("cluster", "up", str(no_head), "--dry-run", cwd=aws_project)
    assert proc.returncode == 2, proc.stderr
    assert "no head_node_type" in proc.stderr and "Traceback" not in proc.stderr

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    proc = run_dvcray("cluster", "up", "aws", "--yes", cwd=aws_project)
    assert proc.returncode == 3, proc.stderr
    assert "No AWS credentials found" in proc.stderr and "Nothing was created" in proc.stderr
    assert "Traceback" not in proc.stderr
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    assert inventory() == before
    assert not (aws_project / ".dvcray").exists()


@pytest.mark.loopback_namespace
@pytest.mark.parametrize("case, message", [
    ("unknown region", "Unknown AWS region 'mars-east-1'"),
    ("unknown instance type", "Instance type 'm5.enormous' (node type 'cpu-worker') is not offered"),
    ("head type not listed", "head_node_type 'boss' is not one of"),
    ("unknown image", "Image ami-0000000000000dead (node type head) does not exist"),
    ("not an S3 store", "needs an S3 store"),
    ("schema", "does not pass Ray's cluster config schema at max_workers"),
])
def test_clear_errors_and_nothing_created(aws_project, tmp_path, case, message):
    from dvcray_cli.clusters import aws

    edits = {
        "unknown region": lambda c: c["provider"].update(region="mars-east-1"),
        "unknown instance type": lambda c: c["available_node_types"]["cpu-worker"]["node_config"]
        .update(InstanceType="m5.enormous"),
        "head type not listed": lambda c: c.update(head_node_type="boss"),
        "unknown image": lambda c: c["available_node_types"]["head"]["node_config"]
        .update(ImageId="ami-0000000000000dead"),
        "schema": lambda c: c.update(max_workers="many"),
    }
    config = str(_write_config(tmp_path, edits[case])) if case in edits else "aws"
    if case == "not an S3 store":
        sh("dvc", "remote", "add", "-f", "-d", "store", str(tmp_path / "local-store"), cwd=aws_project)
    before = inventory()
    with pytest.raises(UsageError) as exc:
        aws.plan(config, aws_project)
    assert message in str(exc.value)
    assert inventory() == before
    assert not (aws_project / ".dvcray").exists()


def _fake_nodes(cluster_name: str, kinds: list[str]) -> list[str]:
    """Instances that look like Ray's nodes (created directly in moto: never through Ray's launcher)."""
    import boto3

    ec2 = boto3.client("ec2", region_name="us-east-1")
    ids = []
    for kind in kinds:
        market = {"InstanceMarketOptions": {"MarketType": "spot"}} if kind == "worker" else {}
        reply = ec2.run_instances(ImageId="ami-025d99823a4caad37", MinCount=1, MaxCount=1,
                                  InstanceType="m5.large" if kind == "head" else "m5.xlarge", **market,
                                  TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                      {"Key": "ray-cluster-name", "Value": cluster_name},
                                      {"Key": "ray-node-type", "Value": kind}]}])
        ids.append(reply["Instances"][0]["InstanceId"])
    return ids


@pytest.mark.loopback_namespace
def test_terminate_cluster_takes_only_its_own_instances(aws_env):
    from dvcray_cli.clusters.aws import account

    mine = _fake_nodes("dvcray-mine", ["head", "worker", "worker"])
    other = _fake_nodes("someone-else", ["head"])
    done = account.terminate_cluster({"type": "aws", "region": "us-east-1", "cache_stopped_nodes": True}, "dvcray-mine")
    assert sorted(done) == sorted(mine)
    assert done[-1] == mine[0], "the head goes last"
    running = inventory()["instances"]
    assert other[0] in running and not set(mine) & set(running)


@pytest.mark.loopback_namespace
def test_status_shows_instances_age_and_cost_then_down_terminates(aws_project):
    from dvcray_cli.clusters import aws
    from dvcray_cli.clusters.aws import records

    plan = aws.plan("aws", aws_project)
    nodes = _fake_nodes(plan.cluster_name, ["head", "worker"])
    record = aws.AwsCluster(name=plan.cluster_name, config_label="aws", config_path="", region="us-east-1",
                            token_path=plan.token_path, dashboard_url="http://127.0.0.1:9", forward_port=9,
                            forward_pid=0, head_ip="203.0.113.1", ssh_user="ubuntu", key_path="",
                            started_at="2026-01-01T00:00:00+00:00", idle_timeout_s=3600, node_types=[])
    records.write_record(record, aws_project / ".dvcray")

    proc = run_dvcray("cluster", "status", "--json", cwd=aws_project)
    assert proc.returncode == 0, proc.stderr
    [entry] = [c for c in json.loads(proc.stdout) if c.get("kind") == "aws"]
    assert entry["alive"] is True
    assert sorted(i["instance_type"] for i in entry["instances"]) == ["m5.large", "m5.xlarge"]
    assert entry["cost_so_far_usd"]["as_of"] == "2026-11-26"
    assert entry["age_s"] > 3600
    human = run_dvcray("cluster", "status", cwd=aws_project)
    assert "m5.large" in human.stdout and "spot" in human.stdout, human.stdout

    proc = run_dvcray("cluster", "down", "aws", "--yes", cwd=aws_project)
    assert proc.returncode == 0, proc.stderr
    assert "Terminated 2 instance(s)" in proc.stderr
    assert not set(nodes) & set(inventory()["instances"])
    assert not (aws_project / ".dvcray" / "clusters" / f"{plan.cluster_name}.json").exists()
    assert run_dvcray("cluster", "status", "--json", cwd=aws_project).stdout.strip() == "[]"


@pytest.mark.loopback_namespace
def test_status_never_forgets_a_cluster_on_an_empty_answer(aws_project):
    """No instances in the answer (another AWS_PROFILE, another region, or the idle
    watcher took it down): the record stays until `down` (issue 10, item 14)."""
    from dvcray_cli.clusters import aws
    from dvcray_cli.clusters.aws import records

    plan = aws.plan("aws", aws_project)
    record = aws.AwsCluster(name=plan.cluster_name, config_label="aws", config_path="", region="us-east-1",
                            token_path=plan.token_path, dashboard_url="http://127.0.0.1:9", forward_port=9,
                            forward_pid=0, head_ip="203.0.113.1", ssh_user="ubuntu", key_path="",
                            started_at="2026-01-01T00:00:00+00:00", idle_timeout_s=3600, node_types=[])
    records.write_record(record, aws_project / ".dvcray")
    for _ in range(2):
        proc = run_dvcray("cluster", "status", cwd=aws_project)
        assert proc.returncode == 0
        assert "no running instances that your AWS identity can see" in proc.stderr and "idle watcher" in proc.stderr
        assert "record is kept until: dvcray cluster down aws" in proc.stderr
        assert [r.name for r in records.repo_records(aws_project)] == [plan.cluster_name]
    assert run_dvcray("cluster", "down", "aws", "--yes", cwd=aws_project).returncode == 0
    assert records.repo_records(aws_project) == []


@pytest.mark.loopback_namespace
def test_every_clone_names_and_finds_the_same_cluster(aws_project, tmp_path):
    """The cluster's name comes from the project's first commit and the config, not
    the repo's path: a second clone or a moved repo takes the same cluster down
    (issue 10, item 13)."""
    from dvcray_cli import clusters
    from dvcray_cli.clusters import aws
    from dvcray_cli.clusters.aws import records

    plan = aws.plan("aws", aws_project)
    clone = tmp_path / "second-clone"
    sh("git", "clone", "-q", str(aws_project), str(clone), cwd=tmp_path)
    moved = tmp_path / "moved"
    shutil.copytree(aws_project, moved, symlinks=True)
    assert aws.plan("aws", clone).cluster_name == aws.plan("aws", moved).cluster_name == plan.cluster_name
    assert aws.plan("aws-gpu", clone).cluster_name != plan.cluster_name

    # A cluster recorded by the first clone is found from the second (on this machine)...
    record = aws.AwsCluster(name=plan.cluster_name, config_label="aws", config_path="", region="us-east-1",
                            token_path=plan.token_path, dashboard_url="http://127.0.0.1:9", forward_port=9,
                            forward_pid=0, head_ip="127.0.0.1", ssh_user="nobody", key_path="/nonexistent",
                            started_at="2026-01-01T00:00:00+00:00", idle_timeout_s=3600, node_types=[])
    records.write_record(record, aws_project / ".dvcray")
    assert clusters.known_address(None, clone) == "http://127.0.0.1:9"
    # ...and its instances are taken down from there by their tag, record or not.
    nodes = _fake_nodes(plan.cluster_name, ["head", "worker"])
    proc = run_dvcray("cluster", "down", "aws", "--yes", cwd=clone)
    assert proc.returncode == 0, proc.stderr
    assert "Terminated 2 instance(s)" in proc.stderr
    assert not set(nodes) & set(inventory()["instances"])
    for record, _ in records.records():
        from dvcray_cli.clusters.launcher import ssh

        ssh.stop_forward(record)


@pytest.mark.loopback_namespace
def test_run_finds_the_repos_aws_cluster_and_its_token(aws_project, monkeypatch):
    """``dvcray run`` (``clusters.known_address``) finds this repo's AWS cluster from its record;
    its job API and token are reached only through a port-forward of dvcray's own (a live one
    on the cloud bed: test_aws_cloudbed.py)."""
    from dvcray_cli import clusters, ray_api
    from dvcray_cli.clusters import aws
    from dvcray_cli.clusters.aws import records
    from dvcray_cli.clusters.launcher import ssh

    plan = aws.plan("aws", aws_project)
    token = ray_api.ensure_token(Path(plan.token_path))
    record = aws.AwsCluster(name=plan.cluster_name, config_label="aws", config_path="", region="us-east-1",
                            token_path=str(token), dashboard_url="http://127.0.0.1:9", forward_port=9,
                            forward_pid=0, head_ip="203.0.113.1", ssh_user="ubuntu", key_path="/nonexistent",
                            started_at="2026-01-01T00:00:00+00:00", idle_timeout_s=3600, node_types=[])
    records.write_record(record, aws_project / ".dvcray")
    monkeypatch.chdir(aws_project / "")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Found without opening its forward (issue 20: a forward counts only once dvcray's own
    # ssh listens on it, so finding the cluster must not depend on reaching it).
    assert clusters.known_address(None, aws_project) == "http://127.0.0.1:9"
    assert records.repo_records(aws_project)[0].forward_pid == 0
    # Its token goes only where dvcray's own ssh answers (issue 20, point 5): with the forward
    # dead, not to whoever holds the recorded port.
    assert clusters.token_for("http://127.0.0.1:9") != token.read_text()
    assert clusters.token_for("http://127.0.0.1:10") != token.read_text()
    # Its job API is reached through the forward, reopened: here an ssh that reaches nothing
    # in this namespace, so it is refused naming the forward, never sent to whoever listens.
    with pytest.raises(ClusterError, match="port-forward"):
        clusters.job_api("http://127.0.0.1:9")
    for left in records.repo_records(aws_project):
        ssh.stop_forward(left)


@pytest.mark.loopback_namespace
def test_idle_watcher_on_the_head_terminates_the_whole_cluster(aws_env, tmp_path, monkeypatch):
    """What ``head_start_ray_commands`` starts on the head: ``python -m dvcray_cli.clusters.idle
    aws --config ~/ray_bootstrap_config.yaml --timeout N --background``. It detaches,
    replaces a previous watcher, and once idle terminates every instance of the
    cluster, the head included. The head's job API is a real Ray head here, in the
    loopback-only namespace, on the port a head's dashboard has (8265): it answers
    that no dvcray run is going (one that does not answer never counts as idle)."""
    from dvcray_cli import ray_api
    from dvcray_cli.clusters import idle, local

    nodes = _fake_nodes("dvcray-idle-test", ["head", "worker"])
    other = _fake_nodes("dvcray-not-idle", ["head"])
    config = Path.home() / "ray_bootstrap_config.yaml"
    config.write_text(yaml.safe_dump({"cluster_name": "dvcray-idle-test",
                                      "provider": {"type": "aws", "region": "us-east-1"}}))
    token = ray_api.ensure_token(Path.home() / ".dvcray" / "auth_token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    import uuid

    temp = Path("/tmp") / f"dvcray-awshead-{uuid.uuid4().hex[:8]}"  # Ray's socket paths stay short
    head = local.start_head("aws-head", num_cpus=1, temp_dir=temp, token_path=token,
                            gcs_port=free_port(), dashboard_port=int(idle.HEAD_JOB_API.rsplit(":", 1)[1]))
    try:
        _watch_and_check(config, token, nodes, other)
    finally:
        watcher = json.loads((token.parent / "idle.json").read_text()) if (token.parent / "idle.json").exists() else {}
        if watcher.get("pid") and idle.is_watcher(int(watcher["pid"])):
            os.kill(int(watcher["pid"]), 9)  # a failed test leaves no watcher behind
        head.stop()
        shutil.rmtree(temp, ignore_errors=True)


def _watch_and_check(config: Path, token: Path, nodes: list[str], other: list[str]) -> None:
    from dvcray_cli.clusters import idle

    def start(timeout: str) -> int:
        proc = subprocess.run([sys.executable, "-m", "dvcray_cli.clusters.idle", "aws", "--config", str(config),
                               "--timeout", timeout, "--poll", "0.5", "--background"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return json.loads((token.parent / "idle.json").read_text())["pid"]

    first = start("1h")
    assert idle.is_watcher(first)
    second = start("2s")                      # a restart of Ray on the head replaces the watcher
    assert second != first and not idle.is_watcher(first)
    deadline = time.monotonic() + 60
    while set(nodes) & set(inventory()["instances"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    running = inventory()["instances"]
    assert not set(nodes) & set(running), (token.parent / "idle.log").read_text()
    assert other[0] in running
    while idle.is_watcher(second) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not idle.is_watcher(second), "the watcher exits once it took the cluster down"
    assert "terminated 2 instance(s)" in (token.parent / "idle.log").read_text()
