"""Real machines, made of namespaces: ``dvcray cluster up lab.yaml`` with Ray's on-prem
provider over SSH, end to end (``tests/testbed.py``: what a node is, how the bed is built
and torn down).

Five nodes on a private bridge, each with its own address, disk (/root, /tmp, its own
writable copy of a Python image with Ray and DVC but no dvcray), processes and sshd. The
lab cluster is n0 (head) and n1, n2 (workers); n3 and n4 stand in for machines that are
refused (down, a wrong key, another Ray) and are never part of a cluster. S3 is a moto server on the host's bridge address; each node has credentials
of its own for it, as an instance profile would give it. The client (this process and the
``dvcray`` commands it runs) reaches nodes only through SSH and the port-forward that
``cluster up`` opens, as a laptop would.

Everything runs through the real ``dvcray`` command line, Ray's real launcher, real SSH
and rsync, real ``dvc exp run`` on the nodes. Each test states what it needs (the bed, the
lab cluster up and whole, or down) and gets it from module-scoped fixtures, so any subset
in any order passes (``-k``, ``-x``, another order); in file order the cluster comes up
once and the last two tests take it down (``cluster down``, then ``--idle-timeout``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from helpers import (REPO, RETRY_PIPELINE, RETRY_STAGES, SRC_LAYOUT, CaptureServer, bucket_objects, build_bed, exp_metrics, exp_refs,
                     free_port, laptop_env, out,
                     retry_count, retry_events, retry_starts, seen_by, sh, wait_stage_started)

pytestmark = pytest.mark.slow

BUCKET = "lab-store"
TIMES: dict[str, float] = {}
LAB_NODES = ("n0", "n1", "n2")      # the lab cluster's head and workers
SPARE = ("n3", "n4")                # refused machines; never part of a cluster


def _dvcray(*args: str, env: dict, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dvcray_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    print(f"dvcray {' '.join(args)}: exit {proc.returncode} in {time.monotonic() - started:.1f} s")
    return proc


_out = out


# --------------------------------------------------------------------------- the bed


@pytest.fixture(scope="module")
def bed():
    """Five machines; torn down (by pid and namespace name) whatever happens."""
    started = time.monotonic()
    made = build_bed(5)
    TIMES["bed build"] = time.monotonic() - started
    print(f"\ntest bed {made.id} built in {made.built_s:.1f} s: host {made.host_ip}, nodes "
          f"{', '.join(n.ip for n in made.nodes)}")
    try:
        for node in made.nodes:
            aws = node.root / ".aws"
            aws.mkdir()
            (aws / "credentials").write_text("[default]\naws_access_key_id = node-key\n"
                                             "aws_secret_access_key = node-secret\n")
            (aws / "config").write_text("[default]\nregion = us-east-1\n")
        yield made
    finally:
        problems = made.teardown()
        print("test bed times: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMES.items()))
        assert not problems, problems


@pytest.fixture(scope="module")
def s3(bed):
    """S3 on the host's bridge address (where the nodes reach it), with the store's bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address=bed.host_ip, port=port, verbose=False)
    server.start()
    url = f"http://{bed.host_ip}:{port}"
    try:
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.stop()


def _lab_yaml(bed, path: Path, workers: list[str], key: Path | None = None, name: str = "lab",
              head: str = "n0") -> Path:
    """Ray's on-prem config, as a user writes it: nothing dvcray-specific in it."""
    config = {
        "cluster_name": name,
        "provider": {"type": "local", "head_ip": bed.node(head).ip, "worker_ips": [bed.node(w).ip for w in workers]},
        "auth": {"ssh_user": "root", "ssh_private_key": str(key or bed.key)},
        "head_start_ray_commands": [
            "ray stop",
            "ray start --head --port=6379 --num-cpus=0 --autoscaling-config=~/ray_bootstrap_config.yaml "
            "--object-store-memory=200000000 --disable-usage-stats"],
        # Two CPUs each, whatever this machine has: placement is the same on every CI host.
        "worker_start_ray_commands": [
            "ray stop",
            "ray start --address=$RAY_HEAD_IP:6379 --num-cpus=2 --object-store-memory=200000000 "
            "--disable-usage-stats"],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def client(bed, s3, tmp_path_factory):
    """This machine as a user's laptop: a HOME of its own, a project (first commit shared by
    every clone) whose DVC default remote is the bucket, credentials for it."""
    home = tmp_path_factory.mktemp("lab-home")
    env = laptop_env(home, "Lab User", "lab@example.com", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                     AWS_DEFAULT_REGION="us-east-1")
    root = tmp_path_factory.mktemp("lab-projects")
    origin = root / "origin"
    origin.mkdir()
    sh("git", "init", "-q", "-b", "main", cwd=origin, env=env)
    sh("git", "commit", "-q", "--allow-empty", "-m", "the project's first commit", cwd=origin, env=env)
    return SimpleNamespace(home=home, env=env, root=root, origin=origin, s3=s3)


def _clone(client, name: str) -> Path:
    """A clone of the project: it shares the first commit, so it finds the project's cluster."""
    dest = client.root / name
    sh("git", "clone", "-q", str(client.origin), str(dest), cwd=client.root, env=client.env)
    return dest


def _with_store(client, project: Path) -> None:
    sh("dvc", "remote", "add", "-q", "-d", "store", f"s3://{BUCKET}/dvc", cwd=project, env=client.env)
    sh("dvc", "remote", "modify", "store", "endpointurl", client.s3, cwd=project, env=client.env)


def _no_ray_anywhere(bed, nodes=LAB_NODES + SPARE) -> dict[str, list[str]]:
    return {n: bed.ray_processes(n) for n in nodes if bed.ray_processes(n)}


def _launcher_records(client) -> set[str]:
    return {p.name for p in (client.home / ".dvcray" / "launcher").glob("*.json")}


# --------------------------------------------------------------------------- before any cluster


def test_the_nodes_are_machines_of_their_own_without_dvcray(bed):
    """What makes a node a machine. The image has no dvcray: only a node's own disk gets it
    (``cluster up`` installs it there), so a node has it exactly when its layer does."""
    marker = f"marker-{os.getpid()}-{time.monotonic_ns()}"
    assert bed.ssh("n0", f"touch /tmp/{marker} /root/{marker}").returncode == 0
    for node in bed.nodes:
        proc = bed.ssh(node, "hostname; ip -4 -o addr show dev eth0; ip route show default; "
                             f"ls /tmp/{marker} /root/{marker} 2>/dev/null; ls {REPO} | wc -l; "
                             "python -c 'import ray, dvc; print(ray.__version__)'; "
                             "python -c 'import dvcray_cli' 2>&1 | tail -1; tr '\\0' ' ' < /proc/1/cmdline")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == node.hostname
        assert f"inet {node.ip}/24" in lines[1]
        assert lines[2].startswith("default dev eth0") and " via " not in lines[2], "on-link, no gateway"
        sees_marker = any(marker in ln for ln in lines)
        assert sees_marker == (node.name == "n0"), "/tmp and /root are each node's own"
        assert "0" in lines, "this checkout is hidden from nodes"
        assert any(ln.startswith("2.") for ln in lines), "the image has Ray"
        installed = any(node.upper.glob("**/site-packages/dvcray-*.dist-info"))
        assert any("No module named 'dvcray_cli'" in ln for ln in lines) == (not installed), \
            f"{node.name}: dvcray only where its own disk has it ({installed})"
        assert "/run/dvcray-bed/init.log" in lines[-1], "a PID namespace of its own: PID 1 is the node's init"


def test_bad_config_files_are_usage_errors_and_start_nothing(bed, client, tmp_path):
    project = _clone(client, "bad-configs")
    records = _launcher_records(client)
    cases = {
        "not yaml": ("cluster_name: [lab\n", "is not valid YAML"),
        "schema": (yaml.safe_dump({"cluster_name": "lab", "max_workers": "many",
                                   "provider": {"type": "local", "head_ip": bed.node("n3").ip, "worker_ips": []},
                                   "auth": {"ssh_user": "root", "ssh_private_key": str(bed.key)}}),
                   "does not pass Ray's cluster config schema at max_workers"),
        "no key file": (yaml.safe_dump({"cluster_name": "lab",
                                        "provider": {"type": "local", "head_ip": bed.node("n3").ip,
                                                     "worker_ips": []},
                                        "auth": {"ssh_user": "root", "ssh_private_key": str(tmp_path / "nokey")}}),
                        "does not exist"),
        "no head": (yaml.safe_dump({"cluster_name": "lab", "provider": {"type": "local", "worker_ips": []},
                                    "auth": {"ssh_user": "root", "ssh_private_key": str(bed.key)}}),
                    "head_ip"),
    }
    for case, (text, message) in cases.items():
        config = tmp_path / f"{case.replace(' ', '-')}.yaml"
        config.write_text(text)
        proc = _dvcray("cluster", "up", str(config), env=client.env, cwd=project)
        assert proc.returncode == 2, f"{case}: {_out(proc)}"
        assert message in proc.stderr and "Traceback" not in proc.stderr, f"{case}: {_out(proc)}"
    assert _launcher_records(client) == records, "no cluster was recorded"
    assert _no_ray_anywhere(bed, SPARE) == {}


def test_unreachable_machine_wrong_key_and_other_ray_are_refused_naming_the_node(bed, client, tmp_path):
    project = _clone(client, "refusals")
    records = _launcher_records(client)
    n4 = bed.node("n4")

    def config(name: str, **options) -> str:
        return str(_lab_yaml(bed, tmp_path / f"{name}.yaml", ["n4"], head="n3", name="other", **options))

    other_key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
    proc = _dvcray("cluster", "up", config("key", key=other_key), env=client.env, cwd=project)
    assert proc.returncode == 3, _out(proc)
    assert f"refused the SSH key {other_key}" in proc.stderr and "Nothing was started" in proc.stderr

    bed.kill(n4)    # the machine is off
    # While it is off, its own disk gets another Ray version (the others keep theirs); its
    # image's layers change only while the machine is off.
    version_py = next(Path(bed.venv).glob("lib/python3*/site-packages/ray/_version.py"))
    target = n4.upper / version_py.relative_to(bed.venv)
    try:
        proc = _dvcray("cluster", "up", config("down"), env=client.env, cwd=project)
        assert proc.returncode == 3, _out(proc)
        assert f"Cannot reach the worker {n4.ip} over SSH" in proc.stderr, _out(proc)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(version_py.read_text().replace('version = "', 'version = "0.', 1))
        bed.start(n4)
        proc = _dvcray("cluster", "up", config("ray"), env=client.env, cwd=project)
        assert proc.returncode == 3, _out(proc)
        assert f"The worker {n4.ip} runs Ray 0.2" in proc.stderr and "the same version" in proc.stderr, _out(proc)
    finally:
        bed.kill(n4)    # its disk as it was, for the tests after this one
        target.unlink(missing_ok=True)
        for cached in (target.parent / "__pycache__").glob("_version.*"):
            cached.unlink()
        bed.start(n4)

    assert _no_ray_anywhere(bed, SPARE) == {}, "nothing started on any machine"
    assert _launcher_records(client) == records, "no cluster was recorded"


def test_dry_run_prints_what_runs_where_and_starts_nothing(bed, client, tmp_path):
    project = _clone(client, "dry-run")
    records = _launcher_records(client)
    config = _lab_yaml(bed, tmp_path / "other.yaml", ["n4"], head="n3", name="other")
    proc = _dvcray("cluster", "up", str(config), "--dry-run", env=client.env, cwd=project)
    assert proc.returncode == 0, _out(proc)
    text = proc.stdout
    for expected in (f"Head:          {bed.node('n3').ip}", f"{bed.node('n4').ip}",
                     "RAY_AUTH_MODE=token", "--dashboard-host=127.0.0.1", "dvcray-0.1.0-py3-none-any.whl",
                     "pip install", f"Check head {bed.node('n3').ip}: ok: SSH ok, Ray 2.", "SSH port-forward",
                     "-> ~/.dvcray/auth_token"):
        assert expected in text, f"{expected!r} not in the plan:\n{text}"
    assert "nothing was started" in proc.stderr
    assert _no_ray_anywhere(bed, SPARE) == {}
    assert _launcher_records(client) == records


# --------------------------------------------------------------------------- the lab cluster


class Lab:
    """The lab cluster (``lab.yaml`` from a clone of the project: head n0, workers n1 and n2),
    brought to the state a test asks for: up and whole, or down."""

    def __init__(self, bed, client) -> None:
        self.bed, self.client = bed, client
        self.project = _clone(client, "lab")
        self.config = _lab_yaml(bed, client.root / "lab.yaml", ["n1", "n2"])
        self.up = None          # the last `cluster up`, its output
        self.name = ""
        self.record: dict = {}

    @property
    def record_path(self) -> Path:
        return self.client.home / ".dvcray" / "launcher" / f"{self.name}.json"

    def is_up(self) -> bool:
        return bool(self.name) and self.record_path.exists() and \
            any("gcs_server" in p for p in self.bed.ray_processes("n0"))

    def whole(self) -> bool:
        """Up, with both workers joined (their 4 CPUs)."""
        entries = _status(self.client) if self.is_up() else []
        return len(entries) == 1 and entries[0]["alive"] and len(entries[0]["nodes"]) == 3 and entries[0]["cpus"] == 4

    def bring_up(self, *options: str) -> subprocess.CompletedProcess:
        started = time.monotonic()
        self.up = _dvcray("cluster", "up", str(self.config), *options, env=self.client.env, cwd=self.project,
                          timeout=900)
        TIMES["cluster up" if not options else "cluster up " + " ".join(options)] = time.monotonic() - started
        records = sorted((self.client.home / ".dvcray" / "launcher").glob("lab-*.json"))
        self.record = json.loads(records[0].read_text()) if records else {}
        self.name = self.record.get("name", "")
        return self.up

    def ensure_whole(self) -> None:
        """Up and whole: a worker a test killed rejoins (Ray's autoscaler takes it back when
        it answers again); a cluster a test took down comes up again."""
        if self.is_up():
            deadline = time.monotonic() + 300   # a hang guard
            while not self.whole() and time.monotonic() < deadline:
                time.sleep(5)
        else:
            proc = self.bring_up()
            assert proc.returncode == 0, _out(proc)
        assert self.whole(), f"the lab cluster is not whole: {_status(self.client)}"

    def ensure_down(self) -> None:
        if self.is_up():
            proc = _dvcray("cluster", "down", str(self.config), "--yes", env=self.client.env, cwd=self.project)
            assert proc.returncode == 0, _out(proc)
        assert _no_ray_anywhere(self.bed, LAB_NODES) == {}

    def clean_up(self) -> dict[str, list[str]]:
        """Whatever happened: down, no port-forward, no Ray anywhere. Returns what was left."""
        latest = json.loads(self.record_path.read_text()) if self.name and self.record_path.exists() \
            else self.record   # with its service forward
        if self.name and self.record_path.exists():
            _dvcray("cluster", "down", str(self.config), "--yes", env=self.client.env, cwd=self.project)
        if latest.get("forward_pid"):
            from dvcray_cli.clusters.launcher import ssh

            ssh.stop_forward(SimpleNamespace(**latest))
        for name in ("state", "lock"):
            Path(f"/tmp/ray/cluster-{self.name}.{name}").unlink(missing_ok=True)
        left = _no_ray_anywhere(self.bed)
        for node in left:   # never leave Ray running for the bed's teardown to find
            self.bed.kill(node)
        return left


@pytest.fixture(scope="module")
def the_lab(bed, client):
    """The module's lab cluster, in whatever state the last test left it; taken down at the
    end whatever happened, and checked to leave no Ray process anywhere."""
    made = Lab(bed, client)
    try:
        yield made
    finally:
        left = made.clean_up()
        assert left == {}, f"Ray processes left behind: {left}"


@pytest.fixture
def lab(the_lab):
    """The lab cluster, up and whole."""
    the_lab.ensure_whole()
    return the_lab


def _record(client, lab) -> dict:
    return json.loads((client.home / ".dvcray" / "launcher" / f"{lab.name}.json").read_text())


def _jobs(client, lab) -> list[dict]:
    """The cluster's Ray Jobs, through the job API's port-forward."""
    import requests

    record = _record(client, lab)
    token = Path(record["token_path"]).read_text().strip()
    # Where its forward listens now (it moves to a fresh port when its port was taken meanwhile).
    answer = requests.get(f"http://127.0.0.1:{record['forward_port']}/api/jobs/",
                          headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _manifest(client, exp_name: str) -> dict:
    """The manifest of the run of ``exp_name``, as the store keeps it."""
    found = [json.loads(v) for k, v in bucket_objects(client.s3, BUCKET).items() if k.endswith("/manifest.json")]
    [manifest] = [m for m in found if m.get("exp_name") == exp_name]
    return manifest


def _our_ssh_to(ip: str) -> list[str]:
    """This machine's ssh port-forwards to ``ip``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if cmd.startswith("ssh ") and " -N " in cmd and f"@{ip}" in cmd:
            found.append(f"{proc.pid}: {cmd.split(' -L ', 1)[-1]}")
    return found


def _running_services(client, lab) -> list[dict]:
    return [j for j in _jobs(client, lab) if str(j.get("submission_id")).startswith("dvcray-service-")
            and j["status"] == "RUNNING"]


def _head_has(bed, project: Path, commit: str) -> bool:
    """The head's copy of the project (the runner service's repository cache) holds ``commit``."""
    root = sh("git", "rev-list", "--max-parents=0", "HEAD", cwd=project)
    cache = bed.node("n0").root / ".cache" / "dvcray" / "repos" / f"{root}.git"
    return cache.is_dir() and subprocess.run(["git", "--git-dir", str(cache), "cat-file", "-e", f"{commit}^{{commit}}"],
                                             capture_output=True).returncode == 0


def _status(client) -> list[dict]:
    proc = _dvcray("cluster", "status", "--json", env=client.env)
    assert proc.returncode == 0, _out(proc)
    return [c for c in json.loads(proc.stdout) if c.get("kind") == "launcher"]


def test_up_starts_the_head_and_workers_and_installs_this_dvcray_on_each(bed, client, lab):
    assert f"worker {bed.node('n1').ip} joined" in lab.up.stderr and f"worker {bed.node('n2').ip} joined" in \
        lab.up.stderr, _out(lab.up)
    assert lab.name.startswith("lab-") and lab.name.endswith(sh("git", "rev-list", "--max-parents=0", "HEAD",
                                                                   cwd=lab.project)[:8])
    mine = hashlib.sha256((REPO / "dvcray_cli" / "runner.py").read_bytes()).hexdigest()
    for name in ("n0", "n1", "n2"):
        proc = bed.ssh(name, "python -c 'import dvcray_cli, hashlib, pathlib, importlib.metadata as m; "
                             "print(dvcray_cli.__file__); "
                             "print(hashlib.sha256((pathlib.Path(dvcray_cli.__file__).parent / \"runner.py\")"
                             ".read_bytes()).hexdigest()); print(m.distribution(\"dvcray\").read_text(\"direct_url.json\"))'")
        assert proc.returncode == 0, proc.stderr
        where, digest, origin = proc.stdout.splitlines()[:3]
        assert where.startswith(bed.venv) and "site-packages" in where, where
        assert digest == mine, f"{name} runs other dvcray code"
        assert "/root/.dvcray/dist/dvcray-0.1.0-py3-none-any.whl" in origin, origin
    [entry] = _status(client)
    assert entry["alive"] and len(entry["nodes"]) == 3 and entry["cpus"] == 4, entry
    heads = [n for n in entry["nodes"] if n["is_head"]]
    assert [n["ip"] for n in heads] == [bed.node("n0").ip]
    assert heads[0]["labels"].get("dvcray-version") == "0.1.0"
    # The job API answers through the forward only with the cluster's token.
    import requests

    assert requests.get(f"{entry['dashboard_url']}/api/jobs/", timeout=10).status_code == 401


STAGE = """\
import json, socket, ray
import extra
ray.init()
@ray.remote(num_cpus=2)   # more than the runner's node has left: it runs on the other worker
def probe():
    import helper
    return {"value": helper.VALUE, "task_host": socket.gethostname()}
got = ray.get(probe.remote())
json.dump({**got, "extra": extra.EXTRA, "driver_host": socket.gethostname()}, open("out.json", "w"))
open("result.txt", "w").write(f"made by {got['value']} on {got['task_host']}\\n")
"""


def test_run_puts_its_runner_on_a_worker_and_its_tasks_on_the_other(bed, client, lab):
    project = _clone(client, "first-run")
    sh("dvc", "init", "-q", cwd=project, env=client.env)
    _with_store(client, project)
    (project / "src").mkdir()
    (project / "src" / "helper.py").write_text('VALUE = "committed"\n')
    (project / "src" / "stage.py").write_text(STAGE)
    (project / "dvc.yaml").write_text("stages:\n  s:\n    cmd: python src/stage.py\n    deps: [src]\n"
                                      "    outs: [result.txt]\n    metrics: [{out.json: {cache: false}}]\n")
    sh("git", "add", "-A", cwd=project, env=client.env)
    sh("git", "commit", "-qm", "a stage that starts Ray tasks", cwd=project, env=client.env)
    (project / "src" / "helper.py").write_text('VALUE = "edited"\n')      # uncommitted
    (project / "src" / "extra.py").write_text('EXTRA = "untracked"\n')    # untracked
    service_before = _running_services(client, lab)
    root_commit = sh("git", "rev-list", "--max-parents=0", "HEAD", cwd=project)
    had_root = _head_has(bed, project, root_commit)   # from an earlier run of any clone (another test's)

    started = time.monotonic()
    proc = _dvcray("run", "-n", "onbed", "--cpus-per-exp", "1", env=client.env, cwd=project)
    TIMES["dvcray run"] = time.monotonic() - started
    assert proc.returncode == 0, _out(proc)
    out = exp_metrics(project, "onbed", "out.json")
    workers = {bed.node("n1").hostname, bed.node("n2").hostname}
    assert out["value"] == "edited" and out["extra"] == "untracked", "the exact workspace ran"
    assert out["driver_host"] in workers, "the runner (and the stage) ran on a worker"
    assert out["task_host"] in workers and out["task_host"] != out["driver_host"], "the task ran on the other"
    assert any(r.endswith("/onbed") for r in exp_refs(project)), "the experiment is home"
    # The first run on the cluster starts dvcray's runner service on the head (later ones
    # use it), reached through a port-forward of its own, and the run went to it (not a Ray
    # Job of its own).
    assert ("Starting dvcray's runner service" in proc.stderr) == (not service_before), _out(proc)
    jobs = _jobs(client, lab)
    assert len(_running_services(client, lab)) == 1, jobs
    assert not [j for j in jobs if (j.get("metadata") or {}).get("dvcray_version")], "no run is a Ray Job"
    record = _record(client, lab)
    assert record["service_port"] and record["service_forward_port"] and _our_ssh_to(bed.node("n0").ip)
    manifest = _manifest(client, "onbed")
    assert manifest["repo_root"] == sh("git", "rev-list", "--max-parents=0", "HEAD", cwd=project)
    # Only the commits the cluster's copy lacked travelled: both when it had none of the project.
    assert manifest["bundle_commits"] == (1 if had_root else 2), (had_root, manifest)
    objects = bucket_objects(client.s3, BUCKET)
    assert any(k.startswith("dvc/files/md5/") for k in objects), "outputs are in the S3 store"
    [result] = [r for r in (json.loads(v) for k, v in objects.items() if k.endswith("/result.json"))
                if r.get("exp_name") == "onbed"]
    assert result["node"] == out["driver_host"] and result["status"] == "SUCCEEDED"

    # A folder on this machine cannot be the store of machines elsewhere: refused before anything runs.
    proc = _dvcray("run", "-n", "nowhere", "--store", str(client.root / "local-store"), env=client.env, cwd=project)
    assert proc.returncode == 2 and "is a folder on this machine" in proc.stderr, _out(proc)

    assert not (project / "result.txt").exists()
    proc = _dvcray("pull", "onbed", env=client.env, cwd=project)
    assert proc.returncode == 0, _out(proc)
    sh("dvc", "exp", "apply", "onbed", cwd=project, env=client.env)
    assert (project / "result.txt").read_text() == f"made by edited on {out['task_host']}\n"


def test_a_src_layout_with_pythonpath_runs_its_own_copy_on_the_machines(bed, client, lab):
    """``export PYTHONPATH=$PWD`` (issue 17): the stage on a worker, a Ray task on the other and a Ray
    Train worker import ``src.*`` from the run's copy; ``--env`` and the project's list reach them all."""
    project = _clone(client, "src-layout")
    sh("dvc", "init", "-q", cwd=project, env=client.env)
    _with_store(client, project)
    for rel, text in SRC_LAYOUT.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(text)
    sh("git", "add", "-A", cwd=project, env=client.env)
    sh("git", "commit", "-qm", "a src/ layout", cwd=project, env=client.env)
    env = {**client.env, "PYTHONPATH": str(project), "SEED": "seed-bed", "LISTED": "listed-bed"}
    proc = _dvcray("run", "-n", "srcbed", "--cpus-per-exp", "1", "--env", "MODE=bed-mode", "--env", "SEED",
                   "--env", "TRAIN=1", "--env", "TASK_CPUS=2", env=env, cwd=project, timeout=900)
    assert proc.returncode == 0, _out(proc)
    seen = seen_by(project, "srcbed")
    workers = {bed.node("n1").hostname, bed.node("n2").hostname}
    for who in ("stage", "task", "train"):
        view = seen[who]
        assert view["value"] == 1 and view["host"] in workers, (who, view)
        assert (view["MODE"], view["SEED"], view["LISTED"]) == ("bed-mode", "seed-bed", "listed-bed"), (who, view)
    assert seen["task"]["host"] != seen["stage"]["host"], "the task ran on the other machine"
    assert str(project) not in seen["stage"]["pythonpath"], "never this machine's working copy"
    assert _manifest(client, "srcbed")["pythonpath"] == ["."]


def test_mnist_across_the_machines_keeps_ray_train_checkpoints_in_the_store(bed, client, lab):
    project = _clone(client, "mnist")
    proc = _dvcray("scaffold", "mnist", str(project), "--set", "data.source=digits", env=client.env,
                   cwd=client.root)
    assert proc.returncode == 0, _out(proc)
    assert yaml.safe_load((project / "params.yaml").read_text())["ray"]["storage_path"] == "", \
        "the template leaves storage_path to dvcray"
    _with_store(client, project)
    sh("git", "add", "-A", cwd=project, env=client.env)
    sh("git", "commit", "-qm", "mnist", cwd=project, env=client.env)
    started = time.monotonic()
    proc = _dvcray("run", "-n", "mnist", "-S", "tune.num_samples=2", "-S", "tune.max_epochs=2",
                   "-S", "tune.grace_period=1", "-S", "train.epochs=2", env=client.env, cwd=project, timeout=900)
    TIMES["mnist run"] = time.monotonic() - started
    assert proc.returncode == 0, _out(proc)
    ref = next(r for r in exp_refs(project) if r.endswith("/mnist"))

    # Tune's trials and Train's workers ran on the workers; the driver's DVCLive callbacks
    # wrote every epoch into the experiment, and the model came from the checkpoint in S3.
    trials = sh("git", "show", f"{ref}:tune/trials.csv", cwd=project).splitlines()
    assert len(trials) == 3, trials
    train = sh("git", "show", f"{ref}:dvclive/train/plots/metrics/accuracy.tsv", cwd=project).splitlines()
    assert [line.split("\t")[0] for line in train[1:]] == ["1", "2"], train
    assert exp_metrics(project, "mnist", "dvclive/evaluate/metrics.json")["test_accuracy"] > 0.5
    keys = list(bucket_objects(client.s3, BUCKET))
    checkpoints = [k for k in keys if k.startswith("dvc/dvcray/ray/train-") and "/checkpoint_" in k]
    assert checkpoints, "Ray Train's checkpoints are in the store"
    assert any(k.startswith("dvc/dvcray/ray/tune-") for k in keys), "Ray Tune's results are in the store"
    proc = _dvcray("pull", "mnist", env=client.env, cwd=project)
    assert proc.returncode == 0, _out(proc)


SWEEP_STAGE = """\
import json, socket, time, yaml, ray
x = yaml.safe_load(open("params.yaml"))["x"]
ray.init()
@ray.remote(num_cpus=1)
def times_ten(v):
    time.sleep(3)
    return v * 10
json.dump({"z": ray.get(times_ten.remote(x)), "host": socket.gethostname()}, open("m.json", "w"))
"""


def _metric_project(client, name: str, stage: str, x: int) -> Path:
    """A clone with the S3 store: one stage ``stage.py`` that depends on the param ``x``
    and writes the metric ``m.json``; committed."""
    project = _clone(client, name)
    sh("dvc", "init", "-q", cwd=project, env=client.env)
    _with_store(client, project)
    (project / "params.yaml").write_text(f"x: {x}\n")
    (project / "stage.py").write_text(stage)
    (project / "dvc.yaml").write_text("stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n"
                                      "    params: [x]\n    metrics: [{m.json: {cache: false}}]\n")
    sh("git", "add", "-A", cwd=project, env=client.env)
    sh("git", "commit", "-qm", f"{name}: a stage", cwd=project, env=client.env)
    return project


def test_sweep_spreads_its_runners_over_both_workers(bed, client, lab):
    project = _metric_project(client, "sweep", SWEEP_STAGE, x=0)
    started = time.monotonic()
    proc = _dvcray("run", "-n", "sw", "-S", "x=101,102,103,104", "--cpus-per-exp", "1", env=client.env,
                   cwd=project)
    TIMES["sweep of 4"] = time.monotonic() - started
    assert proc.returncode == 0, _out(proc)
    # 4 CPUs on the workers, 1 per runner plus 1 per stage's task: at most 3 at once.
    assert "At most 3 experiment(s) at once" in proc.stderr, _out(proc)
    results = [exp_metrics(project, f"sw-{i}", "m.json") for i in range(1, 5)]
    assert [r["z"] for r in results] == [1010, 1020, 1030, 1040]
    hosts = {r["host"] for r in results}
    assert hosts == {bed.node("n1").hostname, bed.node("n2").hostname}, hosts


THIN_STAGE = """\
import json, socket, yaml
json.dump({"x": yaml.safe_load(open("params.yaml"))["x"], "host": socket.gethostname()}, open("m.json", "w"))
"""


def test_a_second_run_sends_the_runner_service_only_the_commits_it_lacks(bed, client, lab):
    project = _metric_project(client, "thin", THIN_STAGE, x=1)
    workers = {bed.node("n1").hostname, bed.node("n2").hostname}
    root_commit = sh("git", "rev-list", "--max-parents=0", "HEAD", cwd=project)
    had_root = _head_has(bed, project, root_commit)
    proc = _dvcray("run", "-n", "thin1", "--cpus-per-exp", "1", env=client.env, cwd=project)
    assert proc.returncode == 0, _out(proc)
    assert exp_metrics(project, "thin1", "m.json")["host"] in workers
    # Every clone shares the first commit: when the cluster's copy has it (an earlier run
    # of any clone), only this clone's own commit travels.
    assert _manifest(client, "thin1")["bundle_commits"] == (1 if had_root else 2)

    (project / "params.yaml").write_text("x: 2\n")
    sh("git", "commit", "-qam", "x is 2", cwd=project, env=client.env)
    started = time.monotonic()
    proc = _dvcray("run", "-n", "thin2", "--cpus-per-exp", "1", env=client.env, cwd=project)
    TIMES["second run through the service"] = time.monotonic() - started
    assert proc.returncode == 0, _out(proc)
    assert "Starting dvcray's runner service" not in proc.stderr, "the running service is reused"
    out = exp_metrics(project, "thin2", "m.json")
    assert out["x"] == 2 and out["host"] in workers, out
    manifest = _manifest(client, "thin2")
    assert sh("git", "rev-list", "--count", "HEAD", cwd=project) == "3"
    assert manifest["bundle_commits"] == 1, "only the new commit travelled"
    assert manifest["repo_root"] == sh("git", "rev-list", "--max-parents=0", "HEAD", cwd=project)


DOOMED_STAGE = """\
import socket, time
print("STAGE-STARTED on", socket.gethostname(), flush=True)
time.sleep(600)
"""


@pytest.mark.extended   # --retries 0 gives LOST: test_warm; a machine lost on the bed: the killed-machine test
def test_with_retries_off_a_lost_worker_ends_its_run_lost_with_its_log_and_the_next_run_works(bed, client, lab):
    """``--retries 0``: the run ends LOST, exit 3, as before retries (with them, the run goes on
    on the other worker: test_a_killed_machine_mid_stage_is_retried_elsewhere_and_resumes)."""
    project = _clone(client, "doomed")
    sh("dvc", "init", "-q", cwd=project, env=client.env)
    _with_store(client, project)
    (project / "stage.py").write_text(DOOMED_STAGE)
    (project / "dvc.yaml").write_text("stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n")
    sh("git", "add", "-A", cwd=project, env=client.env)
    sh("git", "commit", "-qm", "a long stage", cwd=project, env=client.env)
    run = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "-n", "doomed", "--cpus-per-exp", "1",
                            "--retries", "0"],
                           cwd=project, env=client.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        host, run_id = wait_stage_started(client.s3, BUCKET, run, 180)
        victim = bed.node(host)
        assert victim.name in ("n1", "n2"), "the stage did not start on a worker"
        # The runner service's run counts: `down` without --yes is refused, naming it.
        refused = _dvcray("cluster", "down", str(lab.config), env=client.env, cwd=lab.project)
        assert refused.returncode == 2 and run_id in refused.stderr, _out(refused)
        started = time.monotonic()
        bed.kill(victim)          # the machine dies: every process on it, at once
        stdout, stderr = run.communicate(timeout=300)
        TIMES["run ends after its worker died"] = time.monotonic() - started
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 3, f"exit {run.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    assert "LOST" in stderr and f"its node {victim.ip} died" in stderr, stderr[-3000:]
    assert not [j for j in _jobs(client, lab) if j.get("submission_id") == run_id], \
        "the run went to the runner service, not as a Ray Job of its own"
    runs = json.loads(_dvcray("runs", "--json", env=client.env, cwd=project).stdout)
    mine = next(r for r in runs if r["run_id"] == run_id)
    assert mine["state"] == "LOST", mine
    logs = _dvcray("logs", run_id, env=client.env, cwd=project)
    assert logs.returncode == 0, _out(logs)
    assert f"STAGE-STARTED on {victim.hostname}" in logs.stdout, "the log is kept (in the store)"

    # The machine comes back (a reboot: its disk stays, its /tmp is empty); the next run works.
    bed.start(victim)
    (project / "stage.py").write_text('import json, socket\njson.dump({"host": socket.gethostname()}, '
                                      'open("after.json", "w"))\n')
    (project / "dvc.yaml").write_text("stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n"
                                      "    metrics: [{after.json: {cache: false}}]\n")
    proc = _dvcray("run", "-n", "after", "--cpus-per-exp", "1", env=client.env, cwd=project)
    assert proc.returncode == 0, _out(proc)
    assert exp_metrics(project, "after", "after.json")["host"] in {bed.node("n1").hostname, bed.node("n2").hostname}
    # Ray's autoscaler takes the machine back now that it answers again.
    deadline = time.monotonic() + 300   # a hang guard
    while not lab.whole() and time.monotonic() < deadline:
        time.sleep(5)
    assert lab.whole(), _status(client)


# --------------------------------------------------------------------------- a machine lost mid-stage
# A three-stage pipeline whose middle stage checkpoints each epoch where dvcray tells Ray to
# keep checkpoints (the S3 store), under a name the same for every attempt of the run. The
# machine the middle stage runs on is killed (every process of it at once) after its second
# epoch: the run still exits 0 and comes home, the first stage is not run again (its outputs
# were saved as it finished), the middle one resumes after its last checkpoint, the last runs
# once. Each stage counts itself in the bucket (a machine's own disk dies with it).
#
# Set ``DVCRAY_BENCH_OUT`` to a file and the test writes what it measured there (work redone,
# time from the loss to the retry's first line): ``benchmarks/retry_onprem.py``.


class Lines:
    """A process's stdout, line by line as it comes, each with the time it came."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append((time.monotonic(), line))

    def first(self, text: str, after: float = 0.0) -> float | None:
        return next((t for t, line in self.lines if t >= after and text in line), None)

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def _reboot(bed, node, timeout: float = 240) -> None:
    """The machine comes back, and Ray's autoscaler starts Ray there again (over SSH, from the
    head): wait for that, so that the lab's ``cluster down`` does not race it."""
    bed.start(node)
    deadline = time.monotonic() + timeout
    while not any(" raylet" in p or "/raylet " in p for p in bed.ray_processes(node)) \
            and time.monotonic() < deadline:
        time.sleep(2)


def test_a_killed_machine_mid_stage_is_retried_elsewhere_and_resumes(bed, client, lab):
    project = _clone(client, "resumed")
    sh("dvc", "init", "-q", cwd=project, env=client.env)
    _with_store(client, project)
    salt = uuid.uuid4().hex
    (project / "params.yaml").write_text(json.dumps({"salt": salt, "epochs": 6, "sleep": 2}))
    (project / "stages.py").write_text(RETRY_STAGES)
    (project / "dvc.yaml").write_text(RETRY_PIPELINE)
    sh("git", "add", "-A", cwd=project, env=client.env)
    sh("git", "commit", "-qm", "three stages, the middle one checkpoints", cwd=project, env=client.env)
    workers = {bed.node("n1").hostname, bed.node("n2").hostname}

    run = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "-n", "survivor", "--cpus-per-exp", "1"],
                           cwd=project, env=client.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(run)
    victim = None
    try:
        deadline = time.monotonic() + 300
        while victim is None and time.monotonic() < deadline:
            assert run.poll() is None, (lines.text[-3000:], run.stderr.read()[-3000:])
            found = retry_events(client.s3, BUCKET, salt)
            if retry_count(found, "b-epoch") >= 2:
                victim = bed.node(retry_starts(found)[0][1])
            time.sleep(0.5)
        assert victim is not None and victim.hostname in workers, "stage b did not reach epoch 2 on a worker"
        bed.kill(victim)          # the machine dies: every process on it, at once
        lost_at = time.monotonic()
        epochs_before = retry_count(retry_events(client.s3, BUCKET, salt), "b-epoch")
        stderr = run.stderr.read()
        run.wait(timeout=600)
        lines.thread.join(timeout=10)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if victim is not None:
            _reboot(bed, victim)
    out = lines.text
    assert run.returncode == 0, f"exit {run.returncode}\n{out[-4000:]}\n{stderr[-4000:]}"
    found = retry_events(client.s3, BUCKET, salt)
    begun = retry_starts(found)
    assert retry_count(found, "a") == 1, f"stage a ran again: {sorted(found)}"
    assert retry_count(found, "c") == 1, sorted(found)
    assert begun[0][0] == 0 and len(begun) == 2 and begun[1][0] >= 2, f"stage b did not resume: {sorted(found)}"
    resumed, retry_host = begun[1][0], begun[1][1]
    assert retry_host in workers - {victim.hostname}, "the retry ran on the other worker"
    assert any(r.endswith("/survivor") for r in exp_refs(project)), "the experiment is home"
    assert exp_metrics(project, "survivor", "c.json") == {"b": f"b resumed from {resumed}"}
    assert f"machine {victim.hostname} lost (its node {victim.ip} died" in out, out[-4000:]
    assert f"retry 1/3 runs on {retry_host}" in out and "Stage 'a' is cached - skipping run" in out, out[-4000:]

    runs = json.loads(_dvcray("runs", "--json", env=client.env, cwd=project).stdout)
    [mine] = [r for r in runs if r["exp_name"] == "survivor"]
    assert [(a["node"], a["state"]) for a in mine["attempts"]] == [(victim.hostname, "LOST"),
                                                                   (retry_host, "SUCCEEDED")], mine
    logs = _dvcray("logs", mine["run_id"], env=client.env, cwd=project)
    assert logs.returncode == 0, _out(logs)
    assert logs.stdout.index(f"STAGE-B on {victim.hostname} from epoch 0") < logs.stdout.index(
        f"STAGE-B on {retry_host} from epoch {resumed}"), logs.stdout[-4000:]

    measured = {
        "stages_rerun": retry_count(found, "a") - 1,
        "epochs_before_loss": epochs_before,
        "resumed_after_epoch": resumed,
        "epochs_redone": max(0, epochs_before - resumed),
        "loss_to_lost_line_s": (lines.first("lost (its node", lost_at) or lost_at) - lost_at,
        "loss_to_retry_first_line_s": (lines.first("attempt 2 of at most", lost_at) or lost_at) - lost_at,
        "loss_to_stage_resumed_s": (lines.first("STAGE-B on", lost_at) or lost_at) - lost_at,
    }
    print(f"\nretry on the bed: {measured}")
    if os.environ.get("DVCRAY_BENCH_OUT"):
        Path(os.environ["DVCRAY_BENCH_OUT"]).write_text(json.dumps(measured))


TICKS = """\
import json, time
for i in range(24):
    print(f"TICK {i:02d}", flush=True)
    time.sleep(1)
json.dump({"ticks": 24}, open("m.json", "w"))
"""


def _kill_forwards(bed) -> list[int]:
    """The client's SSH port-forwards to the head die at once (a laptop's sleep, a network change)."""
    import signal

    import psutil

    pids = [int(line.split(":", 1)[0]) for line in _our_ssh_to(bed.node("n0").ip)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    psutil.wait_procs([p for p in map(_process, pids) if p is not None], timeout=30)  # their ports are free now
    return pids


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def test_forwards_killed_mid_run_twice_are_reopened_and_the_run_comes_home(bed, client, lab):
    """Issue 19, item 5: the client follows a run through its SSH port-forwards; they die twice
    while the stage runs. The client reopens them (fresh ssh, pinned host key, each one's own
    port checked) and goes on: every line of the log once, in order, and the run home."""
    import threading

    project = _metric_project(client, "forwards", TICKS, x=3)
    run = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", "-n", "through"], cwd=project,
                           env=client.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    killed: list[list[int]] = []

    def read() -> None:
        for line in run.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(("TICK 03", "TICK 12")):
                killed.append(_kill_forwards(bed))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        err = run.stderr.read()
        run.wait(timeout=600)
        reader.join(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, f"exit {run.returncode}\n" + "\n".join(lines[-30:]) + "\n" + err[-3000:]
    assert len(killed) == 2 and all(killed), f"forwards killed: {killed}"
    ticks = [ln for ln in lines if ln.startswith("TICK ")]
    assert ticks == [f"TICK {i:02d}" for i in range(24)], ticks
    assert any(r.endswith("/through") for r in exp_refs(project)), "the experiment is home"
    assert _our_ssh_to(bed.node("n0").ip), "the forwards run again"


def test_a_port_taken_while_its_forward_was_gone_never_gets_the_token(bed, client, lab):
    """Issue 20, point 5: the forwards' ssh died (a laptop's sleep) and another local user took
    their ports. The next commands reopen each forward on a fresh port, checked to be the new
    ssh's own: the thief gets nothing, the run works, the cluster's address stays the same."""
    before = _record(client, lab)
    _kill_forwards(bed)
    thieves = [CaptureServer(before["forward_port"]), CaptureServer(before["service_forward_port"])]
    try:
        [entry] = _status(client)
        assert entry["alive"], entry
        project = _metric_project(client, "thief", THIN_STAGE, x=5)
        proc = _dvcray("run", "-n", "past-thief", env=client.env, cwd=project)
        assert proc.returncode == 0, _out(proc)
        assert exp_metrics(project, "past-thief", "m.json")["x"] == 5
    finally:
        for thief in thieves:
            thief.close()
    token = Path(before["token_path"]).read_text().strip()
    for thief in thieves:
        assert not [r for r in thief.requests if token.encode() in f"{r['headers']}".encode() + r["body"]], \
            thief.requests
    after = _record(client, lab)
    assert after["dashboard_url"] == before["dashboard_url"], "the cluster's address stays"
    assert after["forward_port"] != before["forward_port"]
    assert after["service_forward_port"] != before["service_forward_port"]


def test_a_changed_host_key_is_refused_with_how_to_accept_it(bed, client, lab, tmp_path):
    """Issue 20, point 6: the head's SSH host key changes (someone stands in for it, or it was
    reinstalled). Every ssh dvcray runs checks it against the key pinned for the cluster: the
    forward is not reopened, `cluster up` does not log in, and both say how to accept the new
    key knowingly; with the old key back, everything works again."""
    record = _record(client, lab)
    known_hosts = Path(record["known_hosts"])
    original = known_hosts.read_text()
    assert bed.ssh("n0", "cp /run/dvcray-bed/host_key /run/dvcray-bed/host_key.orig && rm -f /tmp/newkey* && "
                         "ssh-keygen -q -t ed25519 -N '' -f /tmp/newkey && "
                         "cp /tmp/newkey /run/dvcray-bed/host_key").returncode == 0
    try:
        _kill_forwards(bed)
        [entry] = _status(client)
        assert "host key" in (entry["error"] or "") and "ssh-keygen -R" in entry["error"], entry
        up = _dvcray("cluster", "up", str(lab.config), env=client.env, cwd=lab.project, timeout=300)
        assert up.returncode == 3, _out(up)
        assert "is not the one dvcray pinned" in up.stderr and f"ssh-keygen -R {bed.node('n0').ip}" in up.stderr
        assert known_hosts.read_text() == original, "the pinned key stays"
        assert not _our_ssh_to(bed.node("n0").ip), "no forward to a head whose key changed"
    finally:
        assert bed.ssh("n0", "cp /run/dvcray-bed/host_key.orig /run/dvcray-bed/host_key").returncode == 0
    [entry] = _status(client)
    assert entry["alive"] and not entry["error"], entry


def test_down_leaves_no_ray_process_on_any_node(bed, client, lab):
    caches = set(Path("/tmp").glob("ray-config-*"))
    # An idle runner service is no reason to refuse `down` (asked through its forward).
    if not _running_services(client, lab):   # no run yet on this cluster: one starts the service
        project = _metric_project(client, "before-down", THIN_STAGE, x=41)
        proc = _dvcray("run", "-n", "before-down", env=client.env, cwd=project)
        assert proc.returncode == 0, _out(proc)
    assert _running_services(client, lab), "the runner service runs"
    before = (_record(client, lab), _our_ssh_to(bed.node("n0").ip))
    started = time.monotonic()
    proc = _dvcray("cluster", "down", str(lab.config), env=client.env, cwd=lab.project)
    TIMES["cluster down"] = time.monotonic() - started
    assert proc.returncode == 0, _out(proc)
    assert _our_ssh_to(bed.node("n0").ip) == [], f"no port-forward (job API, runner service) is left; before: {before}"
    assert f"Ray stopped on {bed.node('n0').ip}" in proc.stderr, _out(proc)
    assert _no_ray_anywhere(bed) == {}
    assert not (client.home / ".dvcray" / "launcher" / f"{lab.name}.json").exists()
    assert set(Path("/tmp").glob("ray-config-*")) == caches, "no resolved-config cache left under /tmp"
    state = json.loads(Path(f"/tmp/ray/cluster-{lab.name}.state").read_text())
    assert {ip: s["state"] for ip, s in state.items()} == {bed.node(n).ip: "terminated" for n in ("n0", "n1", "n2")}


def test_idle_timeout_takes_the_cluster_down(bed, client, the_lab):
    the_lab.ensure_down()
    started = time.monotonic()
    watcher_log = bed.node("n0").root / ".dvcray" / "idle.log"
    logged = watcher_log.read_text() if watcher_log.exists() else ""
    proc = the_lab.bring_up("--idle-timeout", "20s")
    assert proc.returncode == 0, _out(proc)
    assert "Idle timeout: 20s" in proc.stderr
    up_done = time.monotonic()
    assert not _no_ray_anywhere(bed, ("n0",)) == {}, "the head runs"
    deadline = up_done + 20 + 180   # a hang guard
    while _no_ray_anywhere(bed, LAB_NODES) and time.monotonic() < deadline:
        time.sleep(2)
    TIMES["idle down after up"] = time.monotonic() - up_done
    assert _no_ray_anywhere(bed) == {}, "the idle watcher stopped Ray on every node"
    # It went down because it had been idle for its whole timeout, by its own clock.
    decisions = re.findall(r"idle for (\d+)s \(timeout (\d+)s\): taking the cluster down",
                           watcher_log.read_text()[len(logged):])
    assert decisions and int(decisions[-1][0]) >= int(decisions[-1][1]) == 20, watcher_log.read_text()[len(logged):]
    [entry] = _status(client)
    assert entry["state"] == "gone", entry
    assert _status(client) == []
    TIMES["idle test"] = time.monotonic() - started
