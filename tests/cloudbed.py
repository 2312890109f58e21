"""A cloud made on this machine: moto's EC2, whose instances become test-bed machines.

On top of a bed of ``tests/testbed.py`` (a private bridge ``10.213.X.0/24`` that nothing
routes off the machine; the build refuses unless ``ip_forward`` and proxy ARP are off):

- **moto** (a server process, ``MOTO_IAM_LOAD_MANAGED_POLICIES=true`` because Ray's
  bootstrap attaches ``AmazonEC2FullAccess``) on the bridge's host address ``.1``, knowing
  the images the shipped configs pin (``MOTO_AMIS_PATH``); a VPC ``X.0/24``, a subnet
  ``X.0/25`` (moto hands out ``.4``, ``.5``, ... in order) and a security group in it.
  moto has no EC2 quotas: the server here adds one, and says so (``VCPU_QUOTAS``: new
  accounts get 0 vCPUs of G and P instances; asking for one is refused with AWS's own
  ``VcpuLimitExceeded``). That refusal is the only behaviour made up here.
- **a watcher** (a thread of the process that built the cloud) that polls moto every
  half second and makes every instance of the subnet that moto reports pending or
  running into a bed machine at the instance's private IP: its own network, mount and PID
  namespaces, the bed's Python image (Ray and DVC, no dvcray), sshd that accepts the
  instance's key pair (moto's key pairs are real) and the bed's own key (the test's
  console, standing in for EC2 Instance Connect), and ``~/.aws/config`` + credentials
  that point boto3 at moto, standing in for the instance profile. When moto reports the
  instance stopping or stopped, the machine dies (it boots again, disk kept, if the
  instance starts again); shutting-down or terminated, the machine dies and leaves the
  bed (its disk stays, for a post-mortem, until the bed goes).
- **a client namespace** on the bridge (``.200``, outside the subnet; an on-link default
  route, no gateway, no name server): the client side (``dvcray``, Ray's launcher, boto3,
  ssh) runs there with ``ip netns exec``, so an address moto or Ray makes up reaches
  nothing, even by mistake. From there moto is another machine's address, so ``cluster
  up``'s guard against a fake AWS on the user's own machine does not trip.
- ``reclaim``: a spot reclaim as AWS does it (the instance is terminated and its machine
  dies at once). AWS's two-minute interruption notice (instance metadata
  ``spot/instance-action``, EventBridge) is not modelled: nothing on the bed reads it.

Everything is torn down by pid (moto, every node's init, every process left in the client
namespace) and by the names the bed gave (namespaces, links, folders), also after a killed
test run: ``testbed.sweep_stale`` tears down beds whose owner died (moto also dies with its
owner: parent-death signal). Run as a script to try it by hand::

    python tests/cloudbed.py up [CONFIG.yaml]   # the bed until Ctrl-C (or SIGTERM); writes the bed's cluster config
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import testbed

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "cluster-configs" / "aws.yaml"
REGION = "us-east-1"
CLIENT_HOST = 200                    # the client's address in the bridge's /24 (the subnet is .0/25)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
# vCPUs allowed per instance bucket (AWS's "Running On-Demand G and VT instances", "... P
# instances"): 0, as new accounts often have. Other buckets: unlimited.
VCPU_QUOTAS = {"G": 0, "P": 0}
BedUnavailable = testbed.BedUnavailable


# --------------------------------------------------------------------------- the cloud


@dataclass
class Cloud:
    bed: testbed.Bed
    endpoint: str              # moto, on the bridge's host address
    vpc: str
    subnet: str
    security_group: str
    client_netns: str
    client_ip: str
    watcher: Watcher | None = field(default=None, repr=False)

    def ec2(self):
        """An EC2 client of moto for the test itself (from the host, over the bridge)."""
        import boto3

        return boto3.client("ec2", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def client(self, service: str):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    # ------------------------------------------------------------------ the client's side

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` (a HOME of its own, PATH, ...) with the AWS of this cloud: moto's
        endpoint, test credentials, no shared config files, no instance metadata."""
        home = Path(base["HOME"])
        env = {k: v for k, v in base.items() if not k.startswith("AWS_")}
        env.update(CREDENTIALS)
        env.update({"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": REGION,
                    "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(home / ".aws" / "config"),
                    "AWS_SHARED_CREDENTIALS_FILE": str(home / ".aws" / "credentials")})
        return env

    def command(self, args: list[str]) -> list[str]:
        """``args`` run in the client's namespace."""
        return ["ip", "netns", "exec", self.client_netns, *args]

    def run(self, args: list[str], env: dict[str, str], cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(args), env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def popen(self, args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        return subprocess.Popen(self.command(args), env=env, cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    # ------------------------------------------------------------------ instances and machines

    def instances(self, states: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """The instances of the bed's subnet, as moto lists them (optionally only in ``states``)."""
        filters = [{"Name": "subnet-id", "Values": [self.subnet]}]
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        pages = self.ec2().get_paginator("describe_instances").paginate(Filters=filters)
        return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]

    def machine(self, instance_id: str) -> testbed.Node | None:
        return next((n for n in list(self.bed.nodes) if n.instance == instance_id), None)

    def machines(self) -> list[testbed.Node]:
        return [n for n in list(self.bed.nodes) if n.instance]

    def wait_machine(self, instance_id: str, timeout: float = 60) -> testbed.Node:
        deadline = time.monotonic() + timeout
        while True:
            node = self.machine(instance_id)
            if node is not None and node.init_pid:
                return node
            if time.monotonic() > deadline:
                raise RuntimeError(f"instance {instance_id} did not become a machine: {self.problems()}")
            time.sleep(0.2)

    def reclaim(self, instance_id: str, timeout: float = 60) -> None:
        """Take a spot instance back, as AWS does: terminate it; its machine dies at once
        (the two-minute notice is not modelled). Returns once the machine is gone."""
        self.ec2().terminate_instances(InstanceIds=[instance_id])
        deadline = time.monotonic() + timeout
        while self.machine(instance_id) is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the machine of instance {instance_id} outlived it: {self.problems()}")
            time.sleep(0.1)

    def wait_no_machine(self, timeout: float = 60) -> list[str]:
        """Wait until no instance is a machine any more; returns the ones still alive."""
        deadline = time.monotonic() + timeout
        while self.machines() and time.monotonic() < deadline:
            time.sleep(0.2)
        return [n.instance for n in self.machines()]

    def problems(self) -> list[str]:
        return list(self.watcher.errors) if self.watcher else []

    def events(self) -> list[dict[str, Any]]:
        """What the watcher did: ``{"t": monotonic time, "instance", "ip", "event": up|gone|off|on}``."""
        return list(self.watcher.events) if self.watcher else []

    # ------------------------------------------------------------------ teardown

    def teardown(self) -> list[str]:
        """Stop the watcher, then tear the bed down: machines, moto, the client's namespace
        and whatever still runs in it (port-forwards). Returns what could not be removed."""
        problems = []
        if self.watcher is not None:
            self.watcher.stopping.set()
            self.watcher.join(120)
            if self.watcher.is_alive():
                problems.append("the watcher did not stop")
        return problems + self.bed.teardown()


def build(venv: str | None = None, quotas: dict[str, int] | None = None, poll: float = 0.5) -> Cloud:
    """Build the cloud: a bed without machines, moto on its bridge, a VPC, subnet and
    security group, the client's namespace and the watcher.

    Raises:
        BedUnavailable: see ``testbed.check_host`` (root, tools, no forwarding, no proxy ARP).
    """
    bed = testbed.empty(venv)
    try:
        endpoint = _start_moto(bed, VCPU_QUOTAS if quotas is None else quotas)
        cloud = Cloud(bed=bed, endpoint=endpoint, vpc="", subnet="", security_group="", client_netns="",
                      client_ip=f"{bed.subnet}.{CLIENT_HOST}")
        ec2 = cloud.ec2()
        cloud.vpc = ec2.create_vpc(CidrBlock=f"{bed.subnet}.0/24")["Vpc"]["VpcId"]
        cloud.subnet = ec2.create_subnet(VpcId=cloud.vpc, CidrBlock=f"{bed.subnet}.0/25",
                                         AvailabilityZone=f"{REGION}a")["Subnet"]["SubnetId"]
        cloud.security_group = ec2.create_security_group(
            GroupName="cloudbed", Description="the cloud bed's nodes", VpcId=cloud.vpc)["GroupId"]
        cloud.client_netns = testbed.add_namespace(bed, "client", cloud.client_ip)
        cloud.watcher = Watcher(cloud, poll)
        cloud.watcher.start()
        return cloud
    except BaseException:
        bed.teardown()
        raise


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def _start_moto(bed: testbed.Bed, quotas: dict[str, int]) -> str:
    folder = Path(bed.dir)
    amis = [{"ami_id": image, "name": f"pinned image {image}", "description": "an image the shipped configs pin",
             "owner_id": "099720109477", "public": True, "virtualization_type": "hvm", "architecture": "x86_64",
             "state": "available", "platform": None, "root_device_type": "ebs", "root_device_name": "/dev/sda1",
             "sriov": "simple"} for image in pinned_images()]
    (folder / "amis.json").write_text(json.dumps(amis))
    port = _free_port(bed.host_ip)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"MOTO_IAM_LOAD_MANAGED_POLICIES": "true", "MOTO_AMIS_PATH": str(folder / "amis.json"),
                "CLOUDBED_VCPU_QUOTAS": json.dumps(quotas)})
    with open(folder / "moto.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "moto", bed.host_ip, str(port)],
                                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                preexec_fn=_die_with_parent)
    bed.servers.append(testbed.server_entry(proc.pid))
    bed.save()
    url = f"http://{bed.host_ip}:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
            return url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto did not start: {(folder / 'moto.log').read_text()[-2000:]}") from None
            time.sleep(0.1)


def pinned_images() -> list[str]:
    """The images the shipped AWS configs pin (moto knows no real AMI: it is told these)."""
    import yaml

    images = set()
    for path in (REPO / "cluster-configs").glob("aws*.yaml"):
        for node_type in yaml.safe_load(path.read_text())["available_node_types"].values():
            images.add(node_type["node_config"]["ImageId"])
    return sorted(images)


# --------------------------------------------------------------------------- the watcher


class Watcher(threading.Thread):
    """Instances of the subnet become machines; stopped or terminated ones die."""

    def __init__(self, cloud: Cloud, poll: float):
        super().__init__(name="cloudbed-watcher", daemon=True)
        self.cloud = cloud
        self.poll = poll
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.off: set[str] = set()          # instances stopped: their machine is down, its disk kept
        self.attempts: dict[str, int] = {}
        self.count = 0

    def run(self) -> None:
        ec2 = self.cloud.ec2()
        while not self.stopping.is_set():
            try:
                self.sync(ec2)
            except Exception as exc:  # noqa: BLE001 - keep watching; the tests see the errors
                self.note(f"{type(exc).__name__}: {exc}")
            self.stopping.wait(self.poll)

    def note(self, error: str) -> None:
        if not self.errors or self.errors[-1] != error:
            self.errors.append(error)

    def sync(self, ec2) -> None:
        pages = ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "subnet-id", "Values": [self.cloud.subnet]}])
        for inst in [i for page in pages for r in page["Reservations"] for i in r["Instances"]]:
            if self.stopping.is_set():
                return
            iid, state = inst["InstanceId"], inst["State"]["Name"]
            node = self.cloud.machine(iid)
            if state in ("pending", "running"):
                if node is None:
                    self.make(ec2, inst)
                elif iid in self.off:
                    self.cloud.bed.start(node)
                    self.off.discard(iid)
                    self.event(iid, node.ip, "on")
            elif node is not None and state in ("shutting-down", "terminated"):
                testbed.forget_machine(self.cloud.bed, node, keep_disk=True)   # its logs, for the tests
                self.off.discard(iid)
                self.event(iid, node.ip, "gone")
            elif node is not None and state in ("stopping", "stopped") and iid not in self.off:
                self.cloud.bed.kill(node)
                self.off.add(iid)
                self.event(iid, node.ip, "off")

    def event(self, instance: str, ip: str, what: str) -> None:
        self.events.append({"t": time.monotonic(), "instance": instance, "ip": ip, "event": what})

    def make(self, ec2, inst: dict[str, Any]) -> None:
        iid, ip = inst["InstanceId"], inst.get("PrivateIpAddress") or ""
        if self.attempts.get(iid, 0) >= 3:
            return
        if not ip.startswith(f"{self.cloud.bed.subnet}."):
            self.note(f"instance {iid} has the address {ip!r}, outside the bed: it stays no machine")
            self.attempts[iid] = 3
            return
        self.attempts[iid] = self.attempts.get(iid, 0) + 1
        public = ""
        if inst.get("KeyName"):
            pairs = ec2.describe_key_pairs(KeyNames=[inst["KeyName"]], IncludePublicKey=True)["KeyPairs"]
            public = pairs[0].get("PublicKey", "") if pairs else ""
        # What an instance profile gives a real instance: credentials, and here the endpoint.
        files = {".aws/config": f"[default]\nregion = {REGION}\nendpoint_url = {self.cloud.endpoint}\n",
                 ".aws/credentials": "[default]\naws_access_key_id = instance-profile\n"
                                     "aws_secret_access_key = instance-profile\n"}
        name = f"i{self.count}"
        self.count += 1
        try:
            testbed.add_machine(self.cloud.bed, name, ip, f"ip-{ip.replace('.', '-')}", public, files, instance=iid)
        except Exception as exc:  # noqa: BLE001 - remove what was made; tried again at the next poll
            self.note(f"instance {iid} did not become a machine: {exc}")
            node = self.cloud.machine(iid)
            if node is not None:
                testbed.forget_machine(self.cloud.bed, node)
            return
        self.event(iid, ip, "up")


# --------------------------------------------------------------------------- the cluster config


# The lines of the shipped cluster-configs/aws.yaml that the bed changes, and why (the README
# lists them; tests/func/test_cloudbed.py checks that nothing else differs).
SETUP_DROPPED = ("apt-get", "python3 -m venv", "~/venv/bin/activate", "download.pytorch.org", "ray[default]")
SETUP_REQUIREMENTS = "pip install -q -r ~/.dvcray/requirements.txt"
SETUP_REQUIREMENTS_BED = "pip install -q --find-links ~/.dvcray/dist -r ~/.dvcray/requirements.txt"


def bed_config(cloud: Cloud, dest: Path, edit=None) -> Path:
    """The shipped ``cluster-configs/aws.yaml`` with the fewest changes that run it on the bed:

    - ``provider.use_internal_ips: true``: instances have private addresses only;
    - ``auth.ssh_user: root``: the machines' only user;
    - ``SubnetIds`` and ``SecurityGroupIds`` of every node type: the bed's;
    - setup commands: those that download (apt-get, a venv, torch, Ray) go, the image has
      it all; the project's requirements install finds dvcray in the shipped wheel's
      folder (the bed has no package index; its nodes' pip has ``no-index``).

    ``edit(raw)`` changes it further (a bad-input test's mistake).
    """
    import yaml

    raw = yaml.safe_load(SHIPPED.read_text())
    raw["provider"]["use_internal_ips"] = True
    raw["auth"]["ssh_user"] = "root"
    for node_type in raw["available_node_types"].values():
        node_type["node_config"]["SubnetIds"] = [cloud.subnet]
        node_type["node_config"]["SecurityGroupIds"] = [cloud.security_group]
    setup = [c for c in raw["setup_commands"] if not any(d in c for d in SETUP_DROPPED)]
    raw["setup_commands"] = [SETUP_REQUIREMENTS_BED if c == SETUP_REQUIREMENTS else c for c in setup]
    if edit is not None:
        edit(raw)
    dest.write_text("# cluster-configs/aws.yaml with the cloud bed's changes (tests/cloudbed.py: bed_config)\n"
                    + yaml.safe_dump(raw, sort_keys=False))
    return dest


# --------------------------------------------------------------------------- moto with a quota


def serve_moto(host: str, port: int) -> None:
    """moto's server, with the one thing it lacks here: EC2 vCPU quotas per instance
    bucket (``CLOUDBED_VCPU_QUOTAS``, e.g. ``{"G": 0}``); a launch over one is refused
    as AWS refuses it (``VcpuLimitExceeded``)."""
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models.instance_types import INSTANCE_TYPES
    from moto.ec2.models.instances import InstanceBackend
    from moto.server import main

    quotas = json.loads(os.environ.get("CLOUDBED_VCPU_QUOTAS") or "{}")
    original = InstanceBackend.run_instances

    def bucket(instance_type: str) -> str:
        family = instance_type.split(".")[0].lower()
        return "G" if family.startswith(("g", "vt")) else "P" if family.startswith("p") else "Standard"

    def vcpus(instance_type: str) -> int:
        return int((INSTANCE_TYPES.get(instance_type) or {}).get("VCpuInfo", {}).get("DefaultVCpus", 1))

    def run_instances(self, image_id, count, user_data, security_group_names, **kwargs):
        wanted = kwargs.get("instance_type") or "m1.small"
        limit = quotas.get(bucket(wanted))
        if limit is not None:
            used = sum(vcpus(i.instance_type) for i in self.all_instances()
                       if i.state in ("pending", "running") and bucket(i.instance_type) == bucket(wanted))
            if used + count * vcpus(wanted) > int(limit):
                raise EC2ClientError(
                    "VcpuLimitExceeded",
                    f"You have requested more vCPU capacity than your current vCPU limit of {limit} allows for "
                    "the instance bucket that the specified instance type belongs to. Please visit "
                    "http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit.")
        return original(self, image_id, count, user_data, security_group_names, **kwargs)

    InstanceBackend.run_instances = run_instances
    main(["-H", host, "-p", str(port)])


def _main(argv: list[str]) -> None:
    if argv[:1] == ["moto"]:
        serve_moto(argv[1], int(argv[2]))
        return
    if argv[:1] != ["up"]:
        print(__doc__)
        return
    def stop(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)            # kill PID tears it down too
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cloud = build()
    try:
        print(f"cloud bed {cloud.bed.id}: moto {cloud.endpoint}, {cloud.vpc}, {cloud.subnet}, "
              f"{cloud.security_group}; client namespace {cloud.client_netns} ({cloud.client_ip})")
        if len(argv) > 1:
            print("cluster config:", bed_config(cloud, Path(argv[1]).resolve()))
        print(f"run the client there: ip netns exec {cloud.client_netns} env AWS_ENDPOINT_URL={cloud.endpoint} "
              "AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1 bash")
        print("Ctrl-C tears it down.", flush=True)
        seen = 0
        while True:
            time.sleep(1)
            for event in cloud.events()[seen:]:
                print(f"{event['event']:>5} {event['instance']} {event['ip']}", flush=True)
            seen = len(cloud.events())
    except KeyboardInterrupt:
        pass
    finally:
        print("down:", cloud.teardown() or "everything removed")


if __name__ == "__main__":
    _main(sys.argv[1:])
