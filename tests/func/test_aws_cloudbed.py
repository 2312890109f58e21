"""AWS end to end, on a cloud made on this machine (``tests/cloudbed.py``): moto's EC2,
whose instances become test-bed machines at their private addresses.

The cluster is the shipped ``cluster-configs/aws.yaml`` with the bed's few changes
(``cloudbed.bed_config``: the bed's subnet and security group, private addresses, root,
no downloads in the setup commands). ``dvcray cluster up`` runs it through Ray's real
launcher over SSH; the head's real autoscaler asks moto for spot workers, which become
machines; the head's idle watcher terminates instances in moto, and their machines die.
The client side (every ``dvcray`` command, Ray's launcher, boto3, ssh) runs in the bed's
client namespace, whose only route is on-link to the bridge: nothing it does can leave
the machine. The store is an S3 bucket in the same moto.

One cluster serves the module (``cluster``); tests that need workers get them from the
autoscaler as a user's runs would. The last tests take it down (``cluster down``, then
``--idle-timeout`` on a new ``up``). Spot reclaims: ``Cloud.reclaim`` (AWS's two-minute
notice is not modelled: the instance is terminated and its machine dies at once).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import cloudbed
import testbed
from helpers import REPO, bucket_objects, exp_metrics, exp_refs, laptop_env, sh, wait_stage_started

pytestmark = pytest.mark.slow

BUCKET = "cloud-store"
TIMES: dict[str, float] = {}
LIVE = ("pending", "running")


def _out(proc) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"


# --------------------------------------------------------------------------- the cloud and the client


@pytest.fixture(scope="module")
def cloud():
    """The cloud bed; torn down (by pid and by name) whatever happens, and checked."""
    started = time.monotonic()
    try:
        made = cloudbed.build()
    except cloudbed.BedUnavailable as exc:
        pytest.skip(str(exc))
    TIMES["cloud bed build"] = time.monotonic() - started
    print(f"\ncloud bed {made.bed.id}: moto {made.endpoint}, subnet {made.subnet}, client {made.client_ip}")
    try:
        yield made
    finally:
        problems = made.teardown()
        print("cloud bed times: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMES.items()))
        assert not problems, problems
        assert made.bed.id not in " ".join(testbed._netns_names()), "no namespace of the bed is left"


@pytest.fixture(scope="module")
def client(cloud, tmp_path_factory):
    """A user's laptop in the client namespace: a HOME of its own, the project's origin (a
    DVC project whose default remote is the store's bucket in moto; every clone shares its
    first commit, so every clone finds the project's cluster), the bed's cluster config."""
    home = tmp_path_factory.mktemp("cloud-home")
    base = laptop_env(home, "Cloud User", "cloud@example.com")
    cloud.client("s3").create_bucket(Bucket=BUCKET)
    root = tmp_path_factory.mktemp("cloud-projects")
    origin = root / "origin"
    origin.mkdir()
    env = cloud.env(base)
    sh("git", "init", "-q", "-b", "main", cwd=origin, env=env)
    sh("dvc", "init", "-q", cwd=origin, env=env)
    sh("dvc", "remote", "add", "-q", "-d", "store", f"s3://{BUCKET}/dvc", cwd=origin, env=env)
    sh("dvc", "remote", "modify", "store", "endpointurl", cloud.endpoint, cwd=origin, env=env)
    sh("git", "add", "-A", cwd=origin, env=env)
    sh("git", "commit", "-q", "-m", "the project's first commit: DVC, its store in S3", cwd=origin, env=env)
    return SimpleNamespace(home=home, env=env, root=root, origin=origin,
                           config=cloudbed.bed_config(cloud, root / "aws-bed.yaml"))


def _dvcray(cloud, client, *args: str, cwd: Path, timeout: float = 600):
    """The real ``dvcray`` command line, in the client's namespace."""
    started = time.monotonic()
    proc = cloud.run([sys.executable, "-m", "dvcray_cli", *args], client.env, cwd=cwd, timeout=timeout)
    print(f"dvcray {' '.join(args)}: exit {proc.returncode} in {time.monotonic() - started:.1f} s")
    return proc


def _clone(client, name: str) -> Path:
    dest = client.root / name
    sh("git", "clone", "-q", str(client.origin), str(dest), cwd=client.root, env=client.env)
    return dest


def _dvc_project(cloud, client, name: str, files: dict[str, str]) -> Path:
    """A clone (with the S3 store) and ``files``, committed."""
    project = _clone(client, name)
    for rel, text in files.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(text)
    sh("git", "add", "-A", cwd=project, env=client.env)
    sh("git", "commit", "-q", "--allow-empty", "-m", f"{name}: a stage", cwd=project, env=client.env)
    return project


def _of_cluster(cloud, name: str, states: tuple[str, ...] = LIVE, kind: str | None = None) -> list[dict]:
    """The cluster's instances as moto lists them (by Ray's cluster tag)."""
    found = []
    for inst in cloud.instances(states):
        tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
        if tags.get("ray-cluster-name") == name and (kind is None or tags.get("ray-node-type") == kind):
            found.append(inst)
    return found


def _instance_of_host(cloud, hostname: str) -> dict:
    """The instance whose machine has ``hostname`` (``ip-10-213-X-Y``)."""
    ip = hostname.removeprefix("ip-").replace("-", ".")
    [inst] = [i for i in cloud.instances() if i.get("PrivateIpAddress") == ip]
    return inst


def _client_python(cloud, client, code: str) -> str:
    """Python run in the client's namespace (where the port-forwards listen); its stdout."""
    proc = cloud.run([sys.executable, "-c", code], client.env, timeout=60)
    assert proc.returncode == 0, _out(proc)
    return proc.stdout


def _jobs(cloud, client, record: dict) -> list[dict]:
    """The cluster's Ray Jobs, through the job API's port-forward."""
    code = ("import json, requests, sys; r = requests.get(sys.argv[1] + '/api/jobs/', timeout=10, "
            "headers={'Authorization': 'Bearer ' + open(sys.argv[2]).read().strip()}); "
            "print(json.dumps(r.json()) if r.status_code == 200 else 'HTTP %d' % r.status_code)")
    proc = cloud.run([sys.executable, "-c", code, record["dashboard_url"], record["token_path"]], client.env,
                     timeout=60)
    assert proc.returncode == 0 and not proc.stdout.startswith("HTTP"), _out(proc)
    return json.loads(proc.stdout)


def _status(cloud, client, cwd: Path) -> list[dict]:
    proc = _dvcray(cloud, client, "cluster", "status", "--json", cwd=cwd)
    assert proc.returncode == 0, _out(proc)
    return [c for c in json.loads(proc.stdout) if c.get("kind") == "aws"]


def _now() -> datetime:
    """Now, to the second (EC2's LaunchTime has no fraction)."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def _terminate_all(cloud) -> None:
    """Safety net after a failure: every live instance of the bed terminated, its machine gone."""
    live = [i["InstanceId"] for i in cloud.instances(LIVE + ("stopping", "stopped"))]
    if live:
        cloud.ec2().terminate_instances(InstanceIds=live)
    left = cloud.wait_no_machine(60)
    assert not left, f"machines of instances {left} outlived them"


# --------------------------------------------------------------------------- the bed itself


def test_the_bed_runs_the_shipped_config_with_only_the_lines_the_readme_lists(tmp_path):
    """``bed_config`` changes the shipped ``aws.yaml`` in the lines the README's table names,
    and nowhere else: what the bed tests is what users get."""
    shipped = yaml.safe_load(cloudbed.SHIPPED.read_text())
    bed = yaml.safe_load(cloudbed.bed_config(SimpleNamespace(subnet="subnet-1", security_group="sg-1"),
                                             tmp_path / "bed.yaml").read_text())
    assert bed["provider"] == {**shipped["provider"], "use_internal_ips": True}
    assert bed["auth"] == {**shipped["auth"], "ssh_user": "root"}
    for name, node_type in shipped["available_node_types"].items():
        expected = {**node_type["node_config"], "SubnetIds": ["subnet-1"], "SecurityGroupIds": ["sg-1"]}
        assert bed["available_node_types"][name] == {**node_type, "node_config": expected}
    kept = [c for c in shipped["setup_commands"] if not any(d in c for d in cloudbed.SETUP_DROPPED)]
    assert len(shipped["setup_commands"]) - len(kept) == 5, "apt-get, venv, .bashrc, torch, ray"
    assert bed["setup_commands"] == [cloudbed.SETUP_REQUIREMENTS_BED if c == cloudbed.SETUP_REQUIREMENTS else c
                                     for c in kept]
    assert cloudbed.SETUP_REQUIREMENTS in shipped["setup_commands"]
    changed = ("provider", "auth", "available_node_types", "setup_commands")
    assert {k: v for k, v in bed.items() if k not in changed} == {k: v for k, v in shipped.items()
                                                                  if k not in changed}


def test_instances_become_machines_at_their_private_ip_and_die_with_them(cloud, client):
    """What the rest stands on: an instance moto reports running is a machine at its private
    IP that accepts its key pair and reaches moto with its stand-in instance profile; stopped
    it is off, started again it is back, terminated (a spot reclaim) it is gone. The client's
    namespace has one route, on-link to the bridge, and no name server."""
    ec2 = cloud.ec2()
    key = ec2.create_key_pair(KeyName=f"probe-{os.getpid()}")
    key_file = client.root / "probe.pem"
    key_file.write_text(key["KeyMaterial"])
    key_file.chmod(0o600)
    reply = ec2.run_instances(ImageId=cloudbed.pinned_images()[0], MinCount=2, MaxCount=2, InstanceType="m5.large",
                              KeyName=key["KeyName"], SubnetId=cloud.subnet,
                              InstanceMarketOptions={"MarketType": "spot"})
    ids = [i["InstanceId"] for i in reply["Instances"]]
    try:
        ips = [i["PrivateIpAddress"] for i in reply["Instances"]]
        assert all(ip.startswith(f"{cloud.bed.subnet}.") for ip in ips), ips
        nodes = [cloud.wait_machine(i) for i in ids]
        assert [n.ip for n in nodes] == ips
        script = ("hostname; ip -4 -o addr show dev eth0; ip route show default; "
                  "python -c 'import dvcray_cli' 2>&1 | tail -1; "
                  "python -c \"import boto3; print('instances seen:', len(boto3.client('ec2').describe_instances("
                  "InstanceIds=[\\\"%s\\\"])['Reservations']))\"" % ids[0])
        proc = cloud.run(["ssh", *testbed.SSH_OPTIONS, "-i", str(key_file), f"root@{ips[0]}",
                          f"bash --login -c {testbed._quote(script)}"], client.env, timeout=120)
        assert proc.returncode == 0, _out(proc)
        lines = proc.stdout.splitlines()
        assert lines[0] == f"ip-{ips[0].replace('.', '-')}"
        assert f"inet {ips[0]}/24" in lines[1]
        assert lines[2].startswith("default dev eth0") and " via " not in lines[2], "on-link, no gateway"
        assert "No module named 'dvcray_cli'" in lines[3], "the image has no dvcray"
        assert lines[4] == "instances seen: 1", "boto3 on the instance reaches moto"

        routes = cloud.run(["ip", "-4", "route", "show"], client.env).stdout.splitlines()
        assert sorted(r.split(" proto")[0].strip() for r in routes) == \
            [f"{cloud.bed.subnet}.0/24 dev eth0", "default dev eth0 scope link"], routes
        assert "nameserver" not in cloud.run(["cat", "/etc/resolv.conf"], client.env).stdout
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0"

        def events_of(instance: str) -> list[str]:
            return [e["event"] for e in cloud.events() if e["instance"] == instance]

        def wait_event(instance: str, count: int) -> None:
            deadline = time.monotonic() + 60
            while len(events_of(instance)) < count and time.monotonic() < deadline:
                time.sleep(0.2)

        ec2.stop_instances(InstanceIds=[ids[1]])
        wait_event(ids[1], 2)
        assert events_of(ids[1]) == ["up", "off"] and not cloud.bed.pids(nodes[1]), "stopped, its machine is off"
        ec2.start_instances(InstanceIds=[ids[1]])
        wait_event(ids[1], 3)
        assert cloud.bed.ssh(nodes[1], "true").returncode == 0, "started again, it boots (its sshd answers)"

        started = time.monotonic()
        cloud.reclaim(ids[0])
        TIMES["reclaim to machine gone"] = time.monotonic() - started
        assert cloud.machine(ids[0]) is None and nodes[0].netns not in testbed._netns_names()
        assert cloud.machine(ids[1]) is not None, "only the reclaimed instance's machine died"
        assert events_of(ids[1]) == ["up", "off", "on"]
    finally:
        ec2.terminate_instances(InstanceIds=ids)
        assert cloud.wait_no_machine(60) == []


def test_a_killed_run_leaves_nothing_that_the_next_build_does_not_sweep():
    """A test run killed with SIGKILL: moto dies with it (parent-death signal); its machines,
    namespaces, links and folder are swept by pid and name at the next build (``sweep_stale``)."""
    try:
        testbed.check_host()
    except testbed.BedUnavailable as exc:
        pytest.skip(str(exc))
    owner = subprocess.Popen([sys.executable, str(Path(cloudbed.__file__)), "up"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = owner.stdout.readline()
        assert first.startswith("cloud bed "), first + owner.stdout.read(2000)
        bed = testbed.Bed.load(testbed.BEDS / first.split()[2].rstrip(":"))
        endpoint = first.split("moto ", 1)[1].split(",")[0]
        cloud = cloudbed.Cloud(bed=bed, endpoint=endpoint, vpc="", subnet=first.split(", ")[2], security_group="",
                               client_netns="", client_ip="")
        [inst] = cloud.ec2().run_instances(ImageId=cloudbed.pinned_images()[0], MinCount=1, MaxCount=1,
                                           InstanceType="m5.large", SubnetId=cloud.subnet)["Instances"]
        deadline = time.monotonic() + 60
        while not [n for n in testbed.Bed.load(Path(bed.dir)).nodes if n.instance == inst["InstanceId"]
                   and n.init_pid] and time.monotonic() < deadline:
            time.sleep(0.2)
        bed = testbed.Bed.load(Path(bed.dir))
        [machine] = bed.nodes
        moto_pid = bed.servers[0][0]
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 10
    while testbed._alive(moto_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not testbed._alive(moto_pid), "moto died with its owner"
    assert bed.pids(machine), "the machine outlived its owner (until the sweep)"
    assert bed.id in testbed.sweep_stale()
    assert not bed.pids(machine) and not Path(bed.dir).exists()
    assert not [n for n in testbed._netns_names() if n.startswith(f"dvcray-{bed.id}-")]
    assert not testbed._link_exists(bed.bridge)


# --------------------------------------------------------------------------- bad input


def _no_subnet(raw: dict) -> None:
    for node_type in raw["available_node_types"].values():
        node_type["node_config"]["SubnetIds"] = ["subnet-0123456789abcdef0"]


def _type_not_in_region(raw: dict) -> None:
    raw["available_node_types"]["cpu-worker"]["node_config"]["InstanceType"] = "hpc6a.48xlarge"


def _gpu_head(raw: dict) -> None:
    raw["available_node_types"]["head"]["node_config"]["InstanceType"] = "g4dn.xlarge"


@pytest.mark.parametrize("case, edit, code, message", [
    ("no-subnet", _no_subnet, 2,
     "Subnet subnet-0123456789abcdef0 (SubnetIds of node type head, cpu-worker) does not exist in us-east-1"),
    ("type-not-in-region", _type_not_in_region, 2,
     "Instance type 'hpc6a.48xlarge' (node type 'cpu-worker') is not offered in us-east-1"),
    # moto has no EC2 quotas: the bed's moto adds one (0 vCPUs of G instances, as new accounts often have).
    ("quota", _gpu_head, 3, "the cloud refused to launch a node: VcpuLimitExceeded: You have requested more "
                            "vCPU capacity than your current vCPU limit of 0 allows"),
])
def test_bad_input_is_one_clear_error_and_nothing_runs(cloud, client, case, edit, code, message):
    project = _dvc_project(cloud, client, f"bad-{case}", {})
    config = cloudbed.bed_config(cloud, client.root / f"bad-{case}.yaml", edit)
    proc = _dvcray(cloud, client, "cluster", "up", str(config), "--yes", cwd=project)
    assert proc.returncode == code, _out(proc)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], _out(proc)
    assert "Traceback" not in proc.stderr, _out(proc)
    name = f"dvcray-{sh('git', 'rev-list', '--max-parents=0', 'HEAD', cwd=project)[:10]}-bad-{case}"
    assert _of_cluster(cloud, name, LIVE + ("stopping", "stopped")) == [], "no instance runs, none is billed"
    made = {i["InstanceId"] for i in _of_cluster(cloud, name, ())}
    assert not [n for n in cloud.machines() if n.instance in made], "no machine was made for it"
    assert not list((project / ".dvcray").glob("clusters/*.json")), "no cluster is recorded"


def test_up_refuses_a_fake_aws_on_this_machine(cloud, client):
    """The guard for users stays: run where moto is an address of this machine (the host,
    which holds the bridge), ``up`` refuses before anything is created. In the client's
    namespace the same endpoint is another machine's, and the other tests launch."""
    project = _dvc_project(cloud, client, "host-side", {})
    proc = subprocess.run([sys.executable, "-m", "dvcray_cli", "cluster", "up", str(client.config), "--yes"],
                          cwd=project, env=client.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, _out(proc)
    assert f"Refusing to launch instances: AWS_ENDPOINT_URL points at this machine ({cloud.endpoint})" \
        in proc.stderr, _out(proc)
    assert not (project / ".dvcray").exists(), "nothing was created"


# --------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def cluster(cloud, client):
    """``dvcray cluster up aws-bed.yaml`` from a clone of the project. Taken down at the
    end whatever happened; then no instance may run and no machine may be left."""
    project = _clone(client, "up")
    started = time.monotonic()
    up = _dvcray(cloud, client, "cluster", "up", str(client.config), "--yes", cwd=project, timeout=900)
    TIMES["cluster up"] = time.monotonic() - started
    records = list((project / ".dvcray" / "clusters").glob("*.json"))
    record = json.loads(records[0].read_text()) if records else {}
    try:
        assert up.returncode == 0, _out(up)
        yield SimpleNamespace(project=project, up=up, name=record["name"], record_path=records[0])
    finally:
        if records and records[0].exists():
            _dvcray(cloud, client, "cluster", "down", str(client.config), "--yes", cwd=project)
        _terminate_all(cloud)


def _record(cluster) -> dict:
    return json.loads(cluster.record_path.read_text())


def test_up_makes_the_head_instance_a_machine_running_this_dvcray(cloud, client, cluster):
    [head] = _of_cluster(cloud, cluster.name, kind="head")
    record = _record(cluster)
    assert record["head_ip"] == head["PrivateIpAddress"], "reached at its private address"
    assert head["InstanceType"] == "m5.large" and head.get("InstanceLifecycle") != "spot"
    assert head["IamInstanceProfile"]["Arn"].endswith(f"/{cluster.name}-head"), "dvcray's own profile"
    node = cloud.machine(head["InstanceId"])
    assert node is not None
    mine = hashlib.sha256((REPO / "dvcray_cli" / "runner.py").read_bytes()).hexdigest()
    proc = cloud.bed.ssh(node, "python -c 'import dvcray_cli, hashlib, pathlib, importlib.metadata as m; "
                               "print(hashlib.sha256((pathlib.Path(dvcray_cli.__file__).parent / \"runner.py\")"
                               ".read_bytes()).hexdigest()); print(m.distribution(\"dvcray\").read_text(\"direct_url.json\"))'")
    assert proc.returncode == 0, proc.stderr
    digest, origin = proc.stdout.splitlines()[:2]
    assert digest == mine, "the head runs this dvcray's code"
    assert "/root/.dvcray/dist/dvcray-" in origin, "installed from the shipped wheel"

    [entry] = _status(cloud, client, cluster.project)
    assert entry["alive"] and entry["name"] == cluster.name, entry
    listed = {i["id"]: i for i in entry["instances"]}
    assert listed[head["InstanceId"]]["instance_type"] == "m5.large"
    assert listed[head["InstanceId"]]["usd_per_hour"] == [0.096, 0.096], "m5.large on demand, from the table"
    human = _dvcray(cloud, client, "cluster", "status", cwd=cluster.project)
    assert f"AWS cluster {cluster.name} costs" in human.stderr and "m5.large $0.096/h" in human.stderr, _out(human)
    # The job API answers through the forward, and only with the cluster's token.
    code = ("import requests, sys; print(requests.get(sys.argv[1] + '/api/jobs/', timeout=10).status_code)")
    proc = cloud.run([sys.executable, "-c", code, record["dashboard_url"]], client.env, timeout=60)
    assert proc.stdout.strip() == "401", _out(proc)


STAGE = """\
import json, socket, ray
import extra
ray.init()
@ray.remote(num_cpus=1)
def probe():
    import helper
    return {"value": helper.VALUE, "task_host": socket.gethostname()}
got = ray.get(probe.remote())
json.dump({**got, "extra": extra.EXTRA, "driver_host": socket.gethostname()}, open("out.json", "w"))
open("result.txt", "w").write(f"made by {got['value']} on {got['task_host']}\\n")
"""


def _manifest(exp_name: str, endpoint: str) -> dict:
    found = [json.loads(v) for k, v in bucket_objects(endpoint, BUCKET).items() if k.endswith("/manifest.json")]
    [manifest] = [m for m in found if m.get("exp_name") == exp_name]
    return manifest


def test_run_gets_a_spot_worker_from_ec2_and_runs_the_exact_workspace_there(cloud, client, cluster):
    project = _dvc_project(cloud, client, "first-run", {
        "src/helper.py": 'VALUE = "committed"\n', "src/stage.py": STAGE,
        "dvc.yaml": "stages:\n  s:\n    cmd: python src/stage.py\n    deps: [src]\n"
                    "    outs: [result.txt]\n    metrics: [{out.json: {cache: false}}]\n"})
    (project / "src" / "helper.py").write_text('VALUE = "edited"\n')      # uncommitted
    (project / "src" / "extra.py").write_text('EXTRA = "untracked"\n')    # untracked
    before = {i["InstanceId"] for i in _of_cluster(cloud, cluster.name, kind="worker")}
    submitted_at = _now()
    started = time.monotonic()
    proc = _dvcray(cloud, client, "run", "-n", "onbed", "--cpus-per-exp", "1", cwd=project)
    TIMES["first run" + ("" if before else ", a worker launched for it")] = time.monotonic() - started
    assert proc.returncode == 0, _out(proc)
    out = exp_metrics(project, "onbed", "out.json")
    assert out["value"] == "edited" and out["extra"] == "untracked", "the exact workspace ran"
    worker = _instance_of_host(cloud, out["driver_host"])
    tags = {t["Key"]: t["Value"] for t in worker["Tags"]}
    assert tags["ray-cluster-name"] == cluster.name and tags["ray-node-type"] == "worker", tags
    assert worker["InstanceLifecycle"] == "spot" and worker["InstanceType"] == "m5.xlarge"
    if not before:
        assert worker["LaunchTime"] >= submitted_at, "the head's autoscaler asked EC2 for it"
    assert cloud.machine(worker["InstanceId"]) is not None
    assert any(r.endswith("/onbed") for r in exp_refs(project)), "the experiment is home"

    # The runner service (started by the project's first run), through a port-forward of its own.
    assert "Starting dvcray's runner service" in proc.stderr, _out(proc)
    record = _record(cluster)
    assert record["service_port"] and record["service_forward_port"], record
    jobs = _jobs(cloud, client, record)
    assert [j for j in jobs if str(j.get("submission_id")).startswith("dvcray-service-") and j["status"] == "RUNNING"]
    assert not [j for j in jobs if (j.get("metadata") or {}).get("dvcray_version")], "no run is a Ray Job"
    objects = bucket_objects(cloud.endpoint, BUCKET)
    assert any(k.startswith("dvc/files/md5/") for k in objects), "outputs are in S3"
    result = next(json.loads(v) for k, v in objects.items() if k.endswith("/result.json")
                  and json.loads(v).get("exp_name") == "onbed")
    assert result["node"] == out["driver_host"] and result["status"] == "SUCCEEDED"
    assert _manifest("onbed", cloud.endpoint)["bundle_commits"] == 2

    assert not (project / "result.txt").exists()
    proc = _dvcray(cloud, client, "pull", "onbed", cwd=project)
    assert proc.returncode == 0, _out(proc)
    sh("dvc", "exp", "apply", "onbed", cwd=project, env=client.env)
    assert (project / "result.txt").read_text() == f"made by edited on {out['task_host']}\n"


# The first attempt marks itself in the bucket (the node's boto3 reaches S3 as an instance
# profile would) and sleeps until its machine is reclaimed; the retry finds the mark and ends.
DOOMED_STAGE = """\
import json, socket, time, boto3
host = socket.gethostname()
s3 = boto3.client("s3")
try:
    s3.head_object(Bucket="BUCKET", Key="doomed/first-attempt")
    first = False
except Exception:
    s3.put_object(Bucket="BUCKET", Key="doomed/first-attempt", Body=host.encode())
    first = True
print("STAGE-STARTED on", host, flush=True)
if first:
    time.sleep(600)
json.dump({"host": host}, open("after.json", "w"))
""".replace("BUCKET", BUCKET)


def test_a_reclaimed_spot_worker_is_lost_not_failed_and_the_run_is_retried_on_another(cloud, client, cluster):
    """Issue 19: a reclaim is a loss (never the user's failure), retried from the same snapshot
    on a worker that lives (another, or the one the autoscaler launches in its place)."""
    project = _dvc_project(cloud, client, "doomed", {
        "stage.py": DOOMED_STAGE, "dvc.yaml": "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n"
                                              "    metrics: [{after.json: {cache: false}}]\n"})
    run = cloud.popen([sys.executable, "-m", "dvcray_cli", "run", "-n", "doomed", "--cpus-per-exp", "1"],
                      client.env, cwd=project)
    try:
        host, run_id = wait_stage_started(cloud.endpoint, BUCKET, run, 400)
        victim = _instance_of_host(cloud, host)
        assert victim.get("InstanceLifecycle") == "spot"
        others = [i["InstanceId"] for i in _of_cluster(cloud, cluster.name, kind="worker")
                  if i["InstanceId"] != victim["InstanceId"]]
        reclaimed_at = _now()
        started = time.monotonic()
        cloud.reclaim(victim["InstanceId"])
        stdout, stderr = run.communicate(timeout=600)
        TIMES["reclaim to the retry's end"] = time.monotonic() - started
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, f"exit {run.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    printed = stdout + stderr
    assert f"machine {host} lost (its node {victim['PrivateIpAddress']} died" in printed, printed[-3000:]
    assert "The experiment failed" not in printed
    retry_host = exp_metrics(project, "doomed", "after.json")["host"]
    assert f"retry 1/3 runs on {retry_host}" in printed, printed[-3000:]
    worker = _instance_of_host(cloud, retry_host)
    assert worker["InstanceId"] != victim["InstanceId"] and worker["InstanceLifecycle"] == "spot"
    if not others:
        assert worker["LaunchTime"] >= reclaimed_at, "a replacement, launched after the reclaim"
    assert [i["State"]["Name"] for i in cloud.instances() if i["InstanceId"] == victim["InstanceId"]] == ["terminated"]

    runs = json.loads(_dvcray(cloud, client, "runs", "--json", cwd=project).stdout)
    mine = next(r for r in runs if r["run_id"] == run_id)
    assert mine["state"] == "SUCCEEDED", mine
    assert [(a["node"], a["state"]) for a in mine["attempts"]] == [(host, "LOST"), (retry_host, "SUCCEEDED")], mine
    logs = _dvcray(cloud, client, "logs", run_id, cwd=project)
    assert logs.returncode == 0, _out(logs)
    assert logs.stdout.index(f"STAGE-STARTED on {host}") < logs.stdout.index(f"STAGE-STARTED on {retry_host}"), \
        "every attempt's log, in order"


# Each experiment waits until all four run at once (a named actor counts them): their four
# runners, 2 CPUs each, need two m5.xlarge workers at the same time.
SWEEP_STAGE = """\
import json, socket, time, yaml, ray
x = yaml.safe_load(open("params.yaml"))["x"]
ray.init()
@ray.remote(num_cpus=0)
class Barrier:
    def __init__(self):
        self.seen = set()
    def arrive(self, who):
        self.seen.add(who)
        return len(self.seen)
barrier = Barrier.options(name="sweep-barrier", namespace="cloudbed-test", lifetime="detached",
                          get_if_exists=True).remote()
deadline = time.time() + 500
while ray.get(barrier.arrive.remote(x)) < 4:
    if time.time() > deadline:
        raise SystemExit("the four experiments never ran at once")
    time.sleep(1)
json.dump({"z": x * 10, "host": socket.gethostname()}, open("m.json", "w"))
"""


def test_sweep_spreads_its_runners_over_two_worker_instances(cloud, client, cluster):
    project = _dvc_project(cloud, client, "sweep", {
        "params.yaml": "x: 0\n", "stage.py": SWEEP_STAGE,
        "dvc.yaml": "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n    params: [x]\n"
                    "    metrics: [{m.json: {cache: false}}]\n"})
    # Each runner reserves 2 of an m5.xlarge's 4 CPUs: four at once need two instances.
    started = time.monotonic()
    proc = _dvcray(cloud, client, "run", "-n", "sw", "-S", "x=201,202,203,204", "--cpus-per-exp", "2",
                   "--jobs", "4", cwd=project, timeout=800)
    TIMES["sweep of 4 over two workers"] = time.monotonic() - started
    assert proc.returncode == 0, _out(proc)
    results = [exp_metrics(project, f"sw-{i}", "m.json") for i in range(1, 5)]
    assert sorted(r["z"] for r in results) == [2010, 2020, 2030, 2040]
    workers = {_instance_of_host(cloud, r["host"])["InstanceId"] for r in results}
    assert len(workers) == 2, f"the runners ran on {workers}"
    for inst in cloud.instances():
        if inst["InstanceId"] in workers:
            assert inst["InstanceLifecycle"] == "spot" and inst["InstanceType"] == "m5.xlarge"


def test_mnist_keeps_ray_train_checkpoints_in_s3(cloud, client, cluster):
    project = _clone(client, "mnist")
    proc = _dvcray(cloud, client, "scaffold", "mnist", str(project), "--set", "data.source=digits", cwd=client.root)
    assert proc.returncode == 0, _out(proc)
    sh("git", "add", "-A", cwd=project, env=client.env)
    sh("git", "commit", "-qm", "mnist", cwd=project, env=client.env)
    started = time.monotonic()
    proc = _dvcray(cloud, client, "run", "-n", "mnist", "-S", "tune.num_samples=2", "-S", "tune.max_epochs=2",
                   "-S", "tune.grace_period=1", "-S", "train.epochs=2", cwd=project, timeout=850)
    TIMES["mnist run"] = time.monotonic() - started
    assert proc.returncode == 0, _out(proc)
    ref = next(r for r in exp_refs(project) if r.endswith("/mnist"))
    train = sh("git", "show", f"{ref}:dvclive/train/plots/metrics/accuracy.tsv", cwd=project).splitlines()
    assert [line.split("\t")[0] for line in train[1:]] == ["1", "2"], train
    assert exp_metrics(project, "mnist", "dvclive/evaluate/metrics.json")["test_accuracy"] > 0.5
    keys = list(bucket_objects(cloud.endpoint, BUCKET))
    assert [k for k in keys if k.startswith("dvc/dvcray/ray/train-") and "/checkpoint_" in k], \
        "Ray Train's checkpoints are in S3"
    assert any(k.startswith("dvc/dvcray/ray/tune-") for k in keys), "Ray Tune's results are in S3"
    proc = _dvcray(cloud, client, "pull", "mnist", cwd=project)
    assert proc.returncode == 0, _out(proc)


# --------------------------------------------------------------------------- down


def test_down_terminates_every_instance_and_leaves_no_machine(cloud, client, cluster):
    ids = [i["InstanceId"] for i in _of_cluster(cloud, cluster.name)]
    assert ids, "the cluster runs"
    started = time.monotonic()
    proc = _dvcray(cloud, client, "cluster", "down", str(client.config), cwd=cluster.project)
    TIMES["cluster down"] = time.monotonic() - started
    assert proc.returncode == 0, _out(proc)
    assert f"Terminated {len(ids)} instance(s)" in proc.stderr, _out(proc)
    states = {i["InstanceId"]: i["State"]["Name"] for i in cloud.instances() if i["InstanceId"] in ids}
    assert set(states.values()) == {"terminated"}, states
    assert cloud.wait_no_machine(60) == [], "every machine died with its instance"
    assert not cluster.record_path.exists()
    assert testbed.kill_netns_processes(cloud.client_netns, timeout=0) == [], "no port-forward is left"


def test_idle_timeout_terminates_the_whole_cluster_by_itself(cloud, client):
    project = _clone(client, "idle")
    proc = _dvcray(cloud, client, "cluster", "up", str(client.config), "--yes", "--idle-timeout", "20s",
                   cwd=project, timeout=900)
    up_done = time.monotonic()
    name = json.loads(next((project / ".dvcray" / "clusters").glob("*.json")).read_text())["name"]
    try:
        assert proc.returncode == 0, _out(proc)
        [head] = _of_cluster(cloud, name, kind="head")
        disk = cloud.machine(head["InstanceId"]).root      # it stays after the machine is gone
        deadline = up_done + 20 + 120
        while _of_cluster(cloud, name) and time.monotonic() < deadline:
            time.sleep(1)
        TIMES["idle down after up"] = time.monotonic() - up_done
        assert _of_cluster(cloud, name) == [], "the head's idle watcher terminated every instance"
        said = (disk / ".dvcray" / "idle.log").read_text()
        idle_s = [float(ln.split("idle for ", 1)[1].split("s", 1)[0]) for ln in said.splitlines() if "idle for " in ln]
        assert idle_s and idle_s[-1] >= 20, f"taken down after its idle timeout, not before: {said}"
        assert {i["State"]["Name"] for i in _of_cluster(cloud, name, ())} == {"terminated"}
        assert cloud.wait_no_machine(60) == [], "no machine is left"
        [entry] = [c for c in _status(cloud, client, project) if c["name"] == name]
        assert entry["alive"] is False and entry["instances"] == [], entry
    finally:
        _dvcray(cloud, client, "cluster", "down", str(client.config), "--yes", cwd=project)
        _terminate_all(cloud)
