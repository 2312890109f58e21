"""What tests share that is not a fixture: running ``dvcray`` and git, reading what a run
left (refs, metrics, a store's log, a bucket), small servers on 127.0.0.1, a test Ray head.

Fixtures live in ``conftest.py`` and ``ray_fixtures.py``; tests import these helpers from
here (``from helpers import run_dvcray, sh``), never from a conftest or another test module
(tests/unit/test_structure.py keeps it so).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Set by .ci/run: a test that needs a machine-level facility (the namespace test bed, a
# loopback-only network namespace) fails instead of skipping when it cannot have it.
REQUIRE_BED_ENV = "DVCRAY_TEST_REQUIRE_BED"
# Set inside the loopback-only namespace that tests/func/test_aws.py runs its AWS tests in.
IN_NETNS_ENV = "DVCRAY_TEST_LOOPBACK_NETNS"

# What a client or a test head with a HOME of its own must not inherit from the outer
# environment: another cluster's address or token, a Studio token, CI's own flag (and
# credentials, dropped by prefix: jobs see the head's environment).
FOREIGN_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                   "RAY_AUTH_MODE", "DVC_STUDIO_TOKEN", "CI")


def bed_required() -> bool:
    """True under CI (``.ci/run``): the bed's tests must run, and fail when they cannot."""
    return os.environ.get(REQUIRE_BED_ENV, "") not in ("", "0")


def unavailable(reason: str) -> None:
    """Skip a test whose machine facility this host cannot give, or fail it under CI.

    Raises:
        pytest.skip.Exception, or pytest.fail.Exception when ``bed_required()``.
    """
    import pytest

    if bed_required():
        pytest.fail(f"bed unavailable: {reason} ({REQUIRE_BED_ENV} is set: this run must test it)",
                    pytrace=False)
    pytest.skip(f"bed unavailable: {reason}")


def build_bed(count: int, **options):
    """A namespace test bed of ``count`` machines (``testbed.build``), or the test skips
    (fails under CI) with "bed unavailable: <why>" when this host cannot hold one."""
    import testbed

    try:
        return testbed.build(count, **options)
    except testbed.BedUnavailable as exc:
        unavailable(str(exc))


# --------------------------------------------------------------------------- processes


def run_dvcray(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
               check: bool = False, inherit: bool = True) -> subprocess.CompletedProcess:
    """Run the real ``dvcray`` command line in a subprocess.

    ``env`` adds to this process's environment, or, with ``inherit=False``, is the whole
    environment (one made by ``home_env``)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvcray_cli", *args], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, **(env or {})} if inherit else env, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"dvcray {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# PID 1 of a loopback-only namespace: brings ``lo`` up, runs the command, reaps every
# orphan (Ray daemonizes), and exits with the command; the kernel then kills whatever
# else still runs in the namespace. Run with -I -S: it needs only the standard library.
_NAMESPACE_INIT = r"""
import os, signal, subprocess, sys
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
command = subprocess.Popen(sys.argv[1:])
while True:
    pid, status = os.wait()
    if pid == command.pid:
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
"""


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the process that started it dies."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def loopback_namespace_cmd(argv: list[str]) -> list[str]:
    """``argv`` in network, PID and mount namespaces of its own with nothing but ``lo``:
    when the command ends, times out or its starter dies, every process it started dies
    with the namespace (moto servers, Ray heads). Needs root and util-linux's unshare."""
    return ["unshare", "--kill-child=SIGKILL", "--net", "--pid", "--fork", "--mount-proc",
            os.path.realpath(sys.executable), "-I", "-S", "-c", _NAMESPACE_INIT, *argv]


def run_in_loopback_namespace(argv: list[str], timeout: float, **options) -> subprocess.CompletedProcess:
    """Run ``argv`` as ``loopback_namespace_cmd`` makes it, and wait at most ``timeout``:
    a timeout (or this process dying) takes the whole namespace with it, not only ``argv``."""
    return subprocess.run(loopback_namespace_cmd(argv), timeout=timeout, preexec_fn=_die_with_parent,
                          capture_output=True, text=True, **options)


def sh(*args: str, cwd: Path, check: bool = True, env: dict | None = None) -> str:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout.strip()


def out(proc: subprocess.CompletedProcess) -> str:
    """A finished command's exit code and the ends of its output, for an assertion message."""
    return f"exit {proc.returncode}\nstdout:\n{(proc.stdout or '')[-6000:]}\nstderr:\n{(proc.stderr or '')[-6000:]}"


def home_env(home: Path, **extra: str) -> dict[str, str]:
    """A whole environment for a client with a HOME of its own (its clusters' records and
    tokens live there): nothing of another cluster, no AWS credentials unless ``extra``
    gives some, no telemetry, this interpreter's scripts first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV and not k.startswith("AWS_")}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache"),
        "RAY_USAGE_STATS_ENABLED": "0", "DVC_NO_ANALYTICS": "1", "DVC_STUDIO_OFFLINE": "true",
        "GIT_CONFIG_NOSYSTEM": "1", **extra,
    })
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def venv_with_these_packages(root: Path) -> Path:
    """A fresh virtual environment at ``root`` that sees every package this one has but
    dvcray (a folder of links on its path), so what it installs of dvcray is what it gets.
    Returns its ``bin`` folder."""
    import sysconfig

    # Without the pip and setuptools venv bundles: this environment's (newer ones, which
    # what it has was installed with) are on the path with the rest.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    deps = root / "these-packages"
    deps.mkdir()
    for folder in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        for entry in Path(folder).iterdir():
            name = entry.name.lower()
            if name.startswith(("dvcray", "_dvcray", "__editable__", "_editable_impl")) or name.endswith(".pth"):
                continue
            if not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry)
    (site / "zz_these_packages.pth").write_text(f"{deps}\n")
    for name in ("pip", "pip3"):   # pip of this environment, installing into the new one
        script = root / "bin" / name
        script.write_text(f"#!{python}\nimport sys\nfrom pip._internal.cli.main import main\nsys.exit(main())\n")
        script.chmod(0o755)
    return root / "bin"


# --------------------------------------------------------------------------- projects


def build_file_tree(root: Path, spec: dict[str, str]) -> None:
    """Write ``{relative path: text}`` under ``root`` (text is dedented)."""
    for rel, text in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


TRAIN_PY = """\
import json, sys, yaml
from pathlib import Path
p = yaml.safe_load(open("params.yaml"))["train"]
extra = Path("extra.txt").read_text().strip() if Path("extra.txt").exists() else "none"
ignored = Path("secret.ignored").exists()
print(f"training with lr={p['lr']} epochs={p['epochs']}", flush=True)
score = round(p["lr"] * p["epochs"] * FACTOR, 6)
Path("model.txt").write_text(f"model {score}\\n")
json.dump({"score": score, "extra": extra, "ignored_travelled": ignored}, open("metrics.json", "w"))
"""

TRAIN_DVC_YAML = """\
stages:
  train:
    cmd: python train.py
    deps: [train.py]
    params: [train]
    outs: [model.txt]
    metrics:
      - metrics.json:
          cache: false
"""


def project_spec(factor: str = "1") -> dict[str, str]:
    """A one-stage project: ``train.py`` scores ``train.lr * train.epochs * factor`` into
    ``metrics.json`` and writes the output ``model.txt``; ``*.ignored`` is git-ignored."""
    return {
        "params.yaml": "train:\n  lr: 0.5\n  epochs: 3\n",
        "train.py": TRAIN_PY.replace("FACTOR", factor),
        "dvc.yaml": TRAIN_DVC_YAML,
        ".gitignore": "*.ignored\n",
    }


def exp_refs(root: Path) -> dict[str, str]:
    """``{experiment ref: sha}`` of every ref under ``refs/exps/`` in ``root``."""
    listed = sh("git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/", cwd=root)
    refs = {}
    for line in listed.splitlines():
        ref, sha = line.split()
        refs[ref] = sha
    return refs


def exp_metrics(root: Path, name: str, file: str = "metrics.json") -> dict:
    """Metrics of experiment ``name`` as ``dvc exp show --json`` reports them."""
    data = json.loads(sh("dvc", "exp", "show", "--json", cwd=root))
    for baseline in data:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                if rev.get("name") == name:
                    return rev["data"]["metrics"][file]["data"]
    raise AssertionError(f"experiment {name} not in dvc exp show")


# --------------------------------------------------------------------------- stores


def store_log(run_dir: Path) -> str:
    """A run's log as a local store holds it: ``log.txt`` once the runner finished
    it, else the pieces uploaded so far (``log.parts/``), in order."""
    whole = run_dir / "log.txt"
    if whole.exists():
        return whole.read_text(errors="replace")
    parts = sorted((run_dir / "log.parts").glob("[0-9]*")) if (run_dir / "log.parts").is_dir() else []
    return b"".join(p.read_bytes() for p in parts).decode(errors="replace")


def s3_default_remote(root: Path, endpoint: str, bucket: str) -> None:
    """Make ``s3://BUCKET/dvc`` at ``endpoint`` (a moto server) the project's DVC default remote."""
    sh("dvc", "remote", "add", "-d", "storage", f"s3://{bucket}/dvc", cwd=root)
    sh("dvc", "remote", "modify", "storage", "endpointurl", endpoint, cwd=root)


def bucket_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    """Every object of an S3 bucket (a moto server's), by key."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="x", aws_secret_access_key="x")
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return found


# --------------------------------------------------------------------------- servers on 127.0.0.1


class CaptureServer:
    """An HTTP server on 127.0.0.1 that answers 200 ``{}`` to everything and keeps
    what it was sent: it stands in for any address a test must not reach
    (a foreign cluster named by a store, DVC Studio)."""

    def __init__(self, port: int = 0) -> None:
        """``port``: a port of this machine's 127.0.0.1 to take (a thief's), else any free one."""
        import http.server
        import threading

        self.requests: list[dict] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                owner.requests.append({"method": self.command, "path": self.path,
                                       "headers": dict(self.headers), "body": body})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class StudioCapture(CaptureServer):
    """A stand-in for DVC Studio's ``api/live`` on 127.0.0.1: it keeps every post."""

    @property
    def posts(self) -> list[dict]:
        """``{"path", "authorization", "body"}`` of each POST, in order."""
        return [{"path": r["path"], "authorization": r["headers"].get("Authorization"), "body": json.loads(r["body"])}
                for r in list(self.requests) if r["method"] == "POST"]

    def env(self, token: str) -> dict[str, str]:
        """What makes DVC, DVCLive and dvcray post here with ``token`` (never to a real Studio)."""
        return {"DVC_STUDIO_TOKEN": token, "DVC_STUDIO_URL": self.url, "DVC_STUDIO_OFFLINE": "false"}

    def take(self) -> list[dict]:
        taken = self.posts
        self.requests.clear()
        return taken


# --------------------------------------------------------------------------- Ray heads

def start_test_head(home: Path, name: str, env: dict[str, str] | None = None, num_cpus: int = 2,
                    **options):
    """A real head with a HOME and token of its own and nothing inherited from the
    outer environment but what ``env`` adds (e.g. a node's own AWS credentials).
    Returns it and its temp dir; stop it with ``head.stop()``."""
    import pytest

    from dvcray_cli.clusters import local

    head_env = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "DVC_NO_ANALYTICS": "1",
        "DVC_STUDIO_OFFLINE": "true",
        "GIT_CONFIG_NOSYSTEM": "1",
        **(env or {}),
    }
    temp_dir = Path("/tmp") / f"dvcray-test-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp:
        for var in list(os.environ):
            if var in FOREIGN_ENV or var.startswith("AWS_"):
                mp.delenv(var)
        head = local.start_head(name, num_cpus=num_cpus, temp_dir=temp_dir, env=head_env,
                                token_path=home / ".ray" / "auth_token", **options)
    return head, temp_dir


@contextlib.contextmanager
def running_head(home: Path, name: str, env: dict[str, str] | None = None, **options):
    """``start_test_head`` for a ``with`` block: stopped by pid at its end, whatever
    happened, and checked to leave no process behind."""
    head, temp_dir = start_test_head(home, name, env, **options)
    try:
        yield head
    finally:
        head.stop()
        left = head.pids()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert left == [], f"the test head {name} left processes behind: {left}"


def node_files(head) -> list[Path]:
    """Every file the head's node keeps of what runs brought: Ray's session (job packages
    as unpacked, logs) and dvcray's runner folder (the runner service's snapshots and
    its logs of each run) in the head's HOME."""
    home = Path(head.token_path).parents[1]
    found = [*Path(head.temp_dir).rglob("*"), *(home / ".cache" / "dvcray").rglob("*")]
    return [p for p in found if p.is_file() and not p.is_symlink()]


def laptop_env(home: Path, user: str, email: str, **extra: str) -> dict[str, str]:
    """This machine as a user's laptop, for tests that drive ``dvcray`` as its user would
    (``home_env`` with a git identity of its own, and no pytest options of this run)."""
    env = home_env(home, GIT_AUTHOR_NAME=user, GIT_AUTHOR_EMAIL=email, GIT_COMMITTER_NAME=user,
                   GIT_COMMITTER_EMAIL=email, **extra)
    env.pop("PYTEST_ADDOPTS", None)
    return env


def wait_stage_started(endpoint: str, bucket: str, run, timeout: float,
                       marker: bytes = b"STAGE-STARTED on") -> tuple[str, str]:
    """Wait until a running run's log in the S3 store has ``marker HOST`` (a stage's first
    line); returns ``(HOST, run id)``. ``run`` (the ``dvcray run`` process) must not end first."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()
        for key, data in bucket_objects(endpoint, bucket).items():
            # A running run's log is in the store as pieces (log.parts/NNNNNN); log.txt comes at its end.
            if ("/log.parts/" in key or key.endswith("/log.txt")) and marker in data:
                return data.split(marker + b" ", 1)[1].split()[0].decode(), key.split("/runs/", 1)[1].split("/")[0]
        time.sleep(1)
    raise AssertionError(f"no stage started within {timeout:.0f} s")


def queued(root: Path) -> list[str]:
    """The names DVC's queue lists as queued (DVC's own API, as dvc queue status reads it)."""
    from dvc.repo import Repo

    with Repo(os.fspath(root)) as repo:
        return [e.name for e in repo.experiments.celery_queue.iter_queued()]


# The stage: gated (when GATE is set) before it imports anything of the project, then
# what it, a Ray task and (when TRAIN is set) a Ray Train worker see.
SRC_LAYOUT_STAGE = """\
import json, os, sys, tempfile, time
from pathlib import Path

if os.environ.get("GATE"):
    Path(os.environ["GATE"] + ".started").write_text(str(os.getpid()))
    while not Path(os.environ["GATE"]).exists():
        time.sleep(0.2)

from src.model import VALUE
import ray


def view():
    import os, socket, sys
    from src.model import VALUE
    return {"value": VALUE, "host": socket.gethostname(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "stray": any("stray-shell" in p for p in sys.path),
            **{name: os.environ.get(name) for name in ("MODE", "SEED", "LISTED", "UNNAMED")}}


ray.init()


@ray.remote(num_cpus=int(os.environ.get("TASK_CPUS", "1")))
def task():
    return view()


out = {"stage": {**view(), "pythonpath": os.environ.get("PYTHONPATH", "")}, "task": ray.get(task.remote())}
if os.environ.get("TRAIN"):
    import ray.train
    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from dvcray_cli.integrations.storage import storage_path

    def loop(config):
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "seen").write_text("1")
            ray.train.report(view(), checkpoint=Checkpoint.from_directory(folder))

    result = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                          run_config=RunConfig(storage_path=storage_path(), name=f"train-{os.getpid()}")).fit()
    out["train"] = {k: result.metrics.get(k) for k in ("value", "host", "cuda", "stray", "MODE", "SEED", "LISTED",
                                                       "UNNAMED")}
json.dump(out, open("seen.json", "w"))
"""

# A project laid out as src/ imported from a stage in a subfolder (export PYTHONPATH=$PWD), issue 17.
SRC_LAYOUT = {
    "src/__init__.py": "",
    "src/model.py": "VALUE = 1\n",
    "src/stages/train.py": SRC_LAYOUT_STAGE,
    "dvc.yaml": "stages:\n  train:\n    cmd: python src/stages/train.py\n    deps: [src]\n"
                "    metrics: [{seen.json: {cache: false}}]\n",
    "pyproject.toml": '[tool.dvcray]\nenv = ["LISTED"]\n',
    ".gitignore": ".ray_results/\n",
}


def seen_by(root: Path, exp_name: str) -> dict:
    """What the stage and its workers saw, as the experiment's commit holds it (``dvc exp show``
    leaves out values that are no numbers)."""
    [ref] = [r for r in exp_refs(root) if r.endswith(f"/{exp_name}")]
    return json.loads(sh("git", "show", f"{ref}:seen.json", cwd=root))


CLUSTER_ENV_DROP = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
         "DVC_STUDIO_TOKEN", "CI")


def cluster_env(home: Path) -> dict[str, str]:
    """The environment ``dvcray cluster up`` of a local multi-node cluster runs with: HOME of its
    own, no Ray address or token of this shell's, the nodes' own AWS credentials."""
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV_DROP and not k.startswith("AWS_")}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache"),
        "RAY_USAGE_STATS_ENABLED": "0", "DVC_NO_ANALYTICS": "1", "DVC_STUDIO_OFFLINE": "true",
        "GIT_CONFIG_NOSYSTEM": "1",
        # The nodes' own credentials (an instance profile on AWS); the client's never travel.
        "AWS_ACCESS_KEY_ID": "node-key", "AWS_SECRET_ACCESS_KEY": "node-secret", "AWS_DEFAULT_REGION": "us-east-1",
    })
    return env


# Three stages; the middle one keeps its epoch where dvcray tells Ray to keep checkpoints (the
# store), under a name that is the same for every attempt of a run (``integrations.storage``),
# through pyarrow as Ray Train does. Each stage counts what it does in the bucket, an object per
# event (``counts/SALT/EVENT-UNIQUE``, holding ``HOST PID``): a machine's own disk dies with it.
RETRY_STAGES = """\
import json, os, socket, sys, time, uuid
from pathlib import Path
import pyarrow.fs, yaml
from dvcray_cli.integrations.storage import run_name, storage_path

params = yaml.safe_load(open("params.yaml"))
fs, root = pyarrow.fs.FileSystem.from_uri(storage_path(None))
bucket = root.split("/", 1)[0]

def mark(event):
    with fs.open_output_stream(f"{bucket}/counts/{params['salt']}/{event}-{uuid.uuid4().hex[:8]}") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}".encode())

stage = sys.argv[1]
if stage == "a":
    mark("a")
    Path("a.txt").write_text(f"a {params['salt']}\\n")
elif stage == "b":
    folder = f"{root}/{run_name('b')}"
    try:
        with fs.open_input_stream(f"{folder}/epoch.json") as f:
            start = json.loads(f.read())["epoch"]
    except (FileNotFoundError, OSError):
        start = 0
    mark(f"b-start-{start}")
    print(f"STAGE-B on {socket.gethostname()} from epoch {start}", flush=True)
    fs.create_dir(folder)
    for epoch in range(start + 1, params["epochs"] + 1):
        time.sleep(params["sleep"])
        with fs.open_output_stream(f"{folder}/epoch.json") as f:
            f.write(json.dumps({"epoch": epoch}).encode())
        mark(f"b-epoch-{epoch}")
        print(f"EPOCH {epoch}", flush=True)
    Path("b.txt").write_text(f"b resumed from {start}\\n")
elif stage == "c":
    mark("c")
    json.dump({"b": open("b.txt").read().strip()}, open("c.json", "w"))
"""

RETRY_PIPELINE = """\
stages:
  a:
    cmd: python stages.py a
    deps: [stages.py]
    params: [salt]
    outs: [a.txt]
  b:
    cmd: python stages.py b
    deps: [stages.py, a.txt]
    params: [epochs, sleep]
    outs: [b.txt]
  c:
    cmd: python stages.py c
    deps: [stages.py, b.txt]
    metrics: [{c.json: {cache: false}}]
"""

def retry_events(endpoint: str, bucket: str, salt: str) -> dict[str, str]:
    """``{EVENT-UNIQUE: "HOST PID"}`` of what the stages counted (``RETRY_STAGES``)."""
    import boto3

    api = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                       aws_secret_access_key="x")
    prefix = f"counts/{salt}/"
    found = {}
    for page in api.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            found[obj["Key"][len(prefix):]] = api.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
    return found


def retry_count(found: dict[str, str], name: str) -> int:
    """How often event ``name`` happened (``b-epoch``: any epoch of stage b)."""
    names = [key.rsplit("-", 1)[0] for key in found]     # the unique part off
    return sum(1 for n in names if n == name or n.startswith(name + "-"))


def retry_starts(found: dict[str, str]) -> list[tuple[int, str, int]]:
    """``(epoch, host, pid)`` of each start of stage b, in order."""
    begun = []
    for key, value in found.items():
        if key.startswith("b-start-"):
            host, pid = (value.split() + ["", "0"])[:2]
            begun.append((int(key.split("-")[2]), host, int(pid)))
    return sorted(begun)


# ----------------------------------------------------------------- the runner service on a test head

# A one-stage project whose metric is twice its parameter: m.json {"y": 2 * x}.
DOUBLE_SPEC = {
    "params.yaml": "x: 1\n",
    "stage.py": "import json, yaml\njson.dump({'y': yaml.safe_load(open('params.yaml'))['x'] * 2}, "
                "open('m.json', 'w'))\n",
    "dvc.yaml": "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n    params: [x]\n"
                "    metrics: [{m.json: {cache: false}}]\n",
}


def double_project(make_dvc_project, name: str = "project") -> Path:
    """A DOUBLE_SPEC project with a root commit of its own (a node's repository cache is keyed by it)."""
    return make_dvc_project({**DOUBLE_SPEC, "unique.txt": uuid.uuid4().hex}, name=name)


def run_double(root: Path, name: str, x: int, store: Path, *args: str) -> str:
    """``dvcray run`` of a DOUBLE_SPEC project with ``x``; checks its metric came home; its run id."""
    proc = run_dvcray("run", "-n", name, "-S", f"x={x}", "--store", str(store), "--json", *args, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert exp_metrics(root, name, "m.json") == {"y": 2 * x}
    return json.loads(proc.stdout)["run_id"]


def node_dir(head) -> Path:
    """The runner's folder on the head's node (its HOME's cache)."""
    return Path(head.token_path).parents[1] / ".cache" / "dvcray"


def cluster_service(address: str):
    """The cluster's runner service, as a client reaches it (started if it runs none)."""
    from dvcray_cli.runs.backends import service_reach

    service = service_reach.reach(address)
    assert service is not None and service.service_id
    return service


def service_pid(address: str, service_id: str) -> int:
    """The service's process (the head runs on this machine): its job log names it."""
    import re

    from dvcray_cli import clusters

    log = clusters.connect(address).get_job_logs(service_id)
    return int(re.findall(r"listening on 127\.0\.0\.1:\d+ as \S+ \(dvcray \S+, pid (\d+)\)", log)[-1])
