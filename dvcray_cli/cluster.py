"""The local Ray cluster's lifecycle: start, find, record, stop (DESIGN.md, "Clusters").

A local cluster is one ``ray start --head`` on this machine with its own Ray
``--temp-dir``, token authentication on, the job API on 127.0.0.1. It is
machine-wide, so its record lives in ``~/.dvcray/clusters/<name>.json``.

Several Ray clusters may run on one machine at once (other users, other
checkouts, tests), so a cluster is only ever stopped by the pids that belong to
it (``find_pids``), never with ``ray stop``, which kills every Ray on the machine.

Ray is imported inside the functions that need it: ``dvcray --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from dvcray_cli.errors import ClusterError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import psutil
    from ray.job_submission import JobSubmissionClient

SUPPORTED = ("local", "local-multinode")
BUILT_INS = ("local", "local-multinode", "aws", "aws-gpu")
DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
# The metadata key that marks a Ray job as a dvcray run (DESIGN.md, "Submit").
RUN_MARKER = "dvcray_version"
ACTIVE_JOB_STATES = ("PENDING", "RUNNING")
START_TIMEOUT_S = 120.0
# How long `up` waits for an autoscaling cluster's min_workers to join (a fake
# node joins in about 4 s on an idle machine).
WORKERS_TIMEOUT_S = 120.0
UP_HINT = "Start one with: dvcray cluster up local (or check --address / RAY_ADDRESS)."


@dataclass
class LocalCluster:
    """A Ray head started by dvcray on this machine."""

    name: str
    gcs_address: str          # Ray's bootstrap address, "IP:PORT" (what RAY_ADDRESS takes for drivers)
    dashboard_url: str        # "http://127.0.0.1:PORT": the job API
    temp_dir: str             # the cluster's own Ray --temp-dir: logs, sockets, session dirs
    token_path: str           # the auth token file the cluster was started with
    started_at: str           # ISO 8601, UTC
    num_cpus: float | None    # CPUs of the head as Ray counts them
    session_id: int = 0       # the Unix session its core processes run in (the `ray start` pid)
    autoscaling_config: str | None = None  # the config the autoscaler runs (local-multinode), in temp_dir

    @property
    def gcs_port(self) -> int:
        return int(self.gcs_address.rsplit(":", 1)[1])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LocalCluster:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def token(self) -> str:
        return _read_token(Path(self.token_path)) or ""


@dataclass
class DownResult:
    """What ``down`` did."""

    name: str
    cluster: LocalCluster | None      # None: there was nothing to stop
    pids: list[int]
    stopped_runs: list[str]


# --------------------------------------------------------------------------- paths


def records_dir() -> Path:
    return Path.home() / ".dvcray" / "clusters"


def record_path(name: str) -> Path:
    return records_dir() / f"{name}.json"


def default_token_path() -> Path:
    """Where Ray itself keeps the token (``ray/_private/authentication/authentication_token_setup.py``)."""
    return Path.home() / ".ray" / "auth_token"


def default_temp_dir(name: str) -> Path:
    """A short per-cluster Ray temp dir.

    Ray puts Unix sockets under ``<temp_dir>/session_<date>_<pid>/sockets/``, and
    a socket path must stay under 107 bytes, so this stays near 30 characters.
    The hash of user and HOME keeps two users' (or two tests') clusters apart.
    """
    key = f"{os.getuid()}:{Path.home()}:{name}"
    return Path("/tmp") / f"dvcray-{name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def state_dir(start: Path) -> Path:
    """``<git root>/.dvcray``: dvcray's per-repo state, hidden from git.

    Holds a ``.gitignore`` of ``*`` (as ``.pytest_cache`` does), so it never shows in
    ``git status`` and never travels in a snapshot.

    Raises:
        UsageError: ``start`` is not inside a git work tree.
    """
    from dvcray_cli.gitutil import git_root

    root = git_root(Path(start))
    if root is None:
        raise UsageError(f"{start} is not inside a git repository.",
                         "Run dvcray from inside your project's git repository.")
    path = root / ".dvcray"
    path.mkdir(exist_ok=True)
    ignore = path / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# Created by dvcray: its state never goes into git.\n*\n")
    return path


# --------------------------------------------------------------------------- token


def _read_token(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text or None


def ensure_token(path: Path | None = None) -> Path:
    """Make sure an auth token file exists (mode 0600) and return its path.

    Ray generates tokens as ``secrets.token_hex(32)``
    (``ray/_private/authentication/authentication_token_generator.py``); dvcray
    does the same so that ``ray get-auth-token`` and Ray's own clients read it.
    """
    path = Path(path) if path else default_token_path()
    if _read_token(path):
        return path
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path


def client_token(address: str | None = None) -> str | None:
    """The token a client sends, in Ray's own order of precedence.

    ``RAY_AUTH_TOKEN``, then the file named by ``RAY_AUTH_TOKEN_PATH``, then the
    token file of a recorded cluster at ``address`` (local, or AWS through its
    port-forward), then ``~/.ray/auth_token``.
    """
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = _read_token(Path(os.environ["RAY_AUTH_TOKEN_PATH"]))
        if token:
            return token
    if address:
        for cluster in _records():
            if _same_address(address, cluster):
                token = _read_token(Path(cluster.token_path))
                if token:
                    return token
        from dvcray_cli.aws import token_for_address  # an AWS cluster's forwarded job API

        token = token_for_address(address)
        if token:
            return token
    return _read_token(default_token_path())


# --------------------------------------------------------------------------- ports


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _pick_port(preferred: int | None = None, taken: set[int] = frozenset()) -> int:
    if preferred and preferred not in taken and _port_free(preferred):
        return preferred
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


# --------------------------------------------------------------------------- start


def start_head(name: str, *, num_cpus: float | None = None, temp_dir: str | Path | None = None,
               gcs_port: int | None = None, dashboard_port: int | None = None,
               env: dict[str, str] | None = None, token_path: str | Path | None = None,
               timeout: float = START_TIMEOUT_S,
               autoscaling_config: str | Path | None = None) -> LocalCluster:
    """Start a Ray head on this machine with token auth and wait until its job API answers.

    Args:
        name: the cluster's name (``local``).
        num_cpus: CPUs the head offers; Ray's count of this machine's when None.
        temp_dir: Ray's ``--temp-dir`` for this cluster (``default_temp_dir(name)``).
        gcs_port, dashboard_port: fixed ports; when None, 6379 and 8265 if free,
            else free ones.
        env: extra environment for the head's processes (and so for its jobs).
        token_path: the auth token file (``~/.ray/auth_token``); created if missing.
        timeout: seconds to wait for the job API.
        autoscaling_config: a Ray autoscaler YAML for the head's autoscaler
            (``local-multinode``: the ``fake_multinode`` provider, whose fake
            nodes are started by the autoscaler on this machine).

    Returns:
        The running cluster (not yet recorded: ``up`` records it).

    Raises:
        ClusterError: ``ray start`` failed, or the job API did not answer in time,
            or it answered without asking for the token. Names the log folder.
    """
    temp = Path(temp_dir) if temp_dir else default_temp_dir(name)
    temp.mkdir(parents=True, exist_ok=True)
    token_file = ensure_token(Path(token_path) if token_path else None)
    attempts = 1 if (gcs_port and dashboard_port) else 2
    for attempt in range(attempts):
        try:
            return _start_once(name, temp, token_file, num_cpus, gcs_port, dashboard_port, env,
                               timeout, prefer_defaults=attempt == 0, autoscaling_config=autoscaling_config)
        except _PortClash:
            # Another cluster took a port between our check and Ray's bind: pick fresh ones.
            continue
    raise ClusterError(f"Could not start Ray: its ports were taken. Logs: {temp}/session_latest/logs",
                       "Pass free ports, or stop the other Ray cluster.")


class _PortClash(Exception):
    pass


def _start_once(name: str, temp: Path, token_file: Path, num_cpus: float | None,
                gcs_port: int | None, dashboard_port: int | None, env: dict[str, str] | None,
                timeout: float, prefer_defaults: bool,
                autoscaling_config: str | Path | None = None) -> LocalCluster:
    taken: set[int] = set()
    gcs = gcs_port or _pick_port(DEFAULT_GCS_PORT if prefer_defaults else None)
    taken.add(gcs)
    dash = dashboard_port or _pick_port(DEFAULT_DASHBOARD_PORT if prefer_defaults else None, taken)
    taken.add(dash)
    # Ray's defaults for these are fixed ports (10001, 52365): two clusters on one
    # machine would fight over them, and the job API needs the agent's port.
    client_port = _pick_port(None, taken)
    taken.add(client_port)
    agent_port = _pick_port(None, taken)

    bindir = str(Path(sys.executable).parent)
    head_env = {**os.environ, **(env or {})}
    # Jobs run `python ...` from the head's PATH: make it the interpreter dvcray runs in.
    head_env["PATH"] = bindir + os.pathsep + head_env.get("PATH", "")
    # Token auth on, explicitly, with this cluster's token file. Every process of the
    # cluster inherits both, drivers inside Ray Jobs included, so their plain
    # `ray.init()` authenticates. A RAY_AUTH_TOKEN meant for another cluster must not
    # override the file.
    head_env["RAY_AUTH_MODE"] = "token"
    head_env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    for var in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        head_env.pop(var, None)

    ray_bin = Path(bindir) / "ray"
    cmd = [str(ray_bin) if ray_bin.exists() else "ray", "start", "--head",
           "--port", str(gcs), "--node-ip-address", "127.0.0.1",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent_port),
           "--ray-client-server-port", str(client_port), "--temp-dir", str(temp)]
    resolved_config = None
    if autoscaling_config:
        resolved_config, fake = _resolve_autoscaling_config(Path(autoscaling_config), temp, gcs)
        cmd += ["--autoscaling-config", str(resolved_config)]
        if fake:
            # Ray's switch for the fake_multinode provider (ray/scripts/scripts.py).
            head_env["RAY_FAKE_CLUSTER"] = "1"
        if num_cpus is None:
            num_cpus = _head_type_cpus(resolved_config)
    if num_cpus is not None:
        cmd += ["--num-cpus", f"{num_cpus:g}"]

    logs = temp / "session_latest" / "logs"
    start_log = temp / "dvcray-ray-start.log"
    with open(start_log, "w") as log:
        # A new session: the head's core processes share it, and no one else does
        # (find_pids). cwd: a job inherits the raylet's cwd; in /tmp a stray /tmp/ray
        # folder (Ray's default temp dir) would shadow the `ray` package.
        proc = subprocess.Popen(cmd, cwd=temp, env=head_env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
    session_id = proc.pid
    text = start_log.read_text(errors="replace")
    if rc != 0:
        partial = LocalCluster(name, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", str(temp),
                               str(token_file), _now(), num_cpus, session_id)
        stop_head(partial, timeout=5)
        if re.search(r"already (in use|running)|Address already in use|is already running", text) \
                and not (gcs_port and dashboard_port):
            raise _PortClash()
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise ClusterError(f"`ray start` failed (exit {rc}). Output: {start_log}; logs: {logs}\n{tail}",
                           "Look at the logs named above; `dvcray cluster up` again once fixed.")

    gcs_address = _bootstrap_address(temp) or f"127.0.0.1:{gcs}"
    cluster = LocalCluster(name=name, gcs_address=gcs_address, dashboard_url=f"http://127.0.0.1:{dash}",
                           temp_dir=str(temp), token_path=str(token_file), started_at=_now(),
                           num_cpus=num_cpus, session_id=session_id,
                           autoscaling_config=str(resolved_config) if resolved_config else None)
    try:
        _wait_for_job_api(cluster, timeout, logs)
        cluster.num_cpus = _head_cpus(cluster, default=num_cpus)
    except BaseException:
        stop_head(cluster, timeout=5)
        raise
    return cluster


def _resolve_autoscaling_config(source: Path, temp: Path, gcs_port: int) -> tuple[Path, bool]:
    """The autoscaler config as the head will run it, written into the cluster's temp dir.

    For the ``fake_multinode`` provider the fake nodes join ``provider.gcs_address``,
    or port 6379 of this machine when it is empty, which may be another cluster's
    (``ray/autoscaler/_private/fake_multi_node/node_provider.py``): it is set to
    this cluster's own GCS.

    Returns:
        ``(path, fake)``: ``fake`` when the provider is ``fake_multinode``.

    Raises:
        UsageError: the YAML cannot be read or is not a mapping with a provider.
    """
    import yaml

    try:
        config = yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"Cannot read the cluster config {source}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("provider"), dict):
        raise UsageError(f"The cluster config {source} has no provider section.")
    fake = config["provider"].get("type") == "fake_multinode"
    if fake and not config["provider"].get("gcs_address"):
        config["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"
    path = temp / "autoscaling-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, fake


def _read_config(path: str | Path | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _head_type_cpus(config_path: Path) -> float | None:
    """The CPUs the config gives the head's node type (``ray start --num-cpus`` must match)."""
    config = _read_config(config_path)
    head = (config.get("available_node_types") or {}).get(config.get("head_node_type") or "", {})
    cpus = (head.get("resources") or {}).get("CPU")
    return float(cpus) if cpus is not None else None


def node_types(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    """The worker node types of an autoscaling cluster: ``{type: {resources, min_workers, max_workers}}``."""
    config = _read_config(cluster.autoscaling_config)
    head = config.get("head_node_type")
    return {name: {"resources": dict(t.get("resources") or {}), "min_workers": int(t.get("min_workers") or 0),
                   "max_workers": int(t.get("max_workers") or 0)}
            for name, t in (config.get("available_node_types") or {}).items() if name != head}


def max_resources(cluster: LocalCluster) -> dict[str, float] | None:
    """The resources an autoscaling cluster can grow to (head plus every worker at
    its maximum, capped by the cluster's ``max_workers``); None for a fixed cluster."""
    config = _read_config(cluster.autoscaling_config)
    if not config:
        return None
    types = config.get("available_node_types") or {}
    head = types.get(config.get("head_node_type") or "", {})
    total: dict[str, float] = {k: float(v) for k, v in (head.get("resources") or {}).items()
                               if isinstance(v, (int, float))}
    left = int(config.get("max_workers", 10 ** 6))
    for name, t in types.items():
        if name == config.get("head_node_type"):
            continue
        count = min(int(t.get("max_workers") or 0), left)
        left -= count
        for key, value in (t.get("resources") or {}).items():
            if isinstance(value, (int, float)):
                total[key] = total.get(key, 0.0) + count * float(value)
    return total


def _bootstrap_address(temp: Path) -> str | None:
    """The GCS address `ray start` wrote for this temp dir.

    Ray binds the machine's own interface address even with
    ``--node-ip-address=127.0.0.1`` (DESIGN.md, Facts); this is the address its
    processes and jobs use.
    """
    try:
        return (temp / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _wait_for_job_api(cluster: LocalCluster, timeout: float, logs: Path) -> None:
    import requests

    deadline = time.monotonic() + timeout
    last = ""
    headers = {"Authorization": f"Bearer {cluster.token()}"}
    while time.monotonic() < deadline:
        if not _core_pids(cluster):
            raise ClusterError(f"The Ray head exited while starting. Logs: {logs}",
                               "Look at gcs_server.out, raylet.out and dashboard.log there.")
        try:
            r = requests.get(f"{cluster.dashboard_url}/api/jobs/", headers=headers, timeout=5)
            if r.status_code == 200:
                break
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    else:
        raise ClusterError(
            f"The Ray head's job API at {cluster.dashboard_url} did not answer within "
            f"{timeout:.0f} s ({last}). Logs: {logs}",
            "Look at dashboard.log there; the machine may be overloaded.")
    # Token auth must be on: a request without the token is refused.
    r = requests.get(f"{cluster.dashboard_url}/api/jobs/", timeout=5)
    if r.status_code not in (401, 403):
        raise ClusterError(
            f"The Ray head at {cluster.dashboard_url} started without token authentication "
            f"(an unauthenticated request got HTTP {r.status_code}).",
            "Check that nothing sets RAY_AUTH_MODE=disabled for the head.")


def _head_cpus(cluster: LocalCluster, default: float | None) -> float | None:
    try:
        nodes = list_nodes(cluster.dashboard_url, token=cluster.token())
    except ClusterError:
        return default
    total = sum(n["resources"].get("CPU", 0) for n in nodes if n["alive"])
    return total or default


# --------------------------------------------------------------------------- processes


def _cmdline_matcher(cluster: LocalCluster) -> re.Pattern[str]:
    # The temp dir as a whole path component: /tmp/dvcray-local-ab12 must not match
    # /tmp/dvcray-local-ab123.
    return re.compile(re.escape(cluster.temp_dir.rstrip("/")) + r"(?=/|\s|$|['\",])")


def _process_iter() -> list[psutil.Process]:
    import psutil

    return list(psutil.process_iter(["pid", "cmdline"]))


def _core_pids(cluster: LocalCluster, procs: list | None = None) -> set[int]:
    """The cluster's core processes: those that name its temp dir, and those in its session.

    The session is the one ``ray start`` ran in (``start_new_session``): GCS,
    raylet, dashboard, monitor, client server and their helpers. It counts only
    while some process that names the temp dir is in it, so a recycled session id
    never matches strangers.
    """
    import psutil

    procs = _process_iter() if procs is None else procs
    match = _cmdline_matcher(cluster)
    core: set[int] = set()
    for p in procs:
        cmd = " ".join(p.info.get("cmdline") or [])
        if cmd and match.search(cmd):
            core.add(p.info["pid"])
    if cluster.session_id and core:
        in_session = set()
        for p in procs:
            try:
                if os.getsid(p.info["pid"]) == cluster.session_id:
                    in_session.add(p.info["pid"])
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        if in_session & core:
            core |= in_session
    return core


def find_pids(cluster: LocalCluster) -> list[int]:
    """Every live process of this cluster: its core processes and all their descendants.

    Workers rename themselves (``ray::IDLE``, ``ray::JobSupervisor``) and a job's
    entrypoint runs in a session of its own, so descendants are found through the
    process tree, not by name. Processes of other Ray clusters never match: they
    name another temp dir and run in another session.

    A job's entrypoint whose supervisor died with its raylet (a node that died)
    is no one's descendant any more: it is found by the environment Ray gave it
    (``_orphaned_jobs``).
    """
    import psutil

    procs = _process_iter()
    found = _core_pids(cluster, procs) | _orphaned_jobs(cluster, procs)
    for pid in list(found):
        try:
            found.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            continue
    found.discard(os.getpid())
    alive = []
    for pid in sorted(found):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            continue
    return alive


def _orphaned_jobs(cluster: LocalCluster, procs: list) -> set[int]:
    """Processes of this cluster's Ray Jobs, by their environment: Ray gives a job's
    entrypoint ``RAY_JOB_CONFIG_JSON_ENV_VAR`` and ``RAY_ADDRESS`` (this cluster's
    GCS), and its children inherit both. Both are needed: a user's shell may
    well export ``RAY_ADDRESS``, but only Ray's jobs carry the job config."""
    if not cluster.gcs_address or cluster.gcs_address.endswith(":0"):
        return set()
    address = f"RAY_ADDRESS={cluster.gcs_address}\0".encode()
    found = set()
    for p in procs:
        pid = p.info["pid"]
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = b"\0" + f.read()
        except OSError:
            continue
        if b"\0" + address in env and b"\0RAY_JOB_CONFIG_JSON_ENV_VAR=" in env:
            found.add(pid)
    return found


def is_alive(cluster: LocalCluster) -> bool:
    """The cluster's GCS is running (a head without its GCS is gone, whatever is left)."""
    import psutil

    for pid in _core_pids(cluster):
        try:
            p = psutil.Process(pid)
            if p.name() == "gcs_server" and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            continue
    return False


def stop_head(cluster: LocalCluster, timeout: float = 15) -> list[int]:
    """Stop every process of this cluster, by pid: SIGTERM, wait, then SIGKILL.

    Never ``ray stop``: that kills every Ray cluster on the machine.

    Returns:
        The pids that were stopped. Afterwards ``find_pids(cluster)`` is empty.

    Raises:
        ClusterError: a process survived SIGKILL (not ours to kill, or stuck in the kernel).
    """
    import psutil

    stopped: dict[int, psutil.Process] = {}

    def targets(include_gcs: bool) -> dict[int, psutil.Process]:
        # Processes signalled before stay on the list: once their parents are gone,
        # orphans (a job's entrypoint, workers) are no longer in the cluster's tree.
        found = {p.pid: p for p in stopped.values() if _running(p)}
        for pid in find_pids(cluster):
            if pid not in found:
                try:
                    found[pid] = psutil.Process(pid)
                except psutil.Error:
                    continue
        if not include_gcs:
            found = {pid: p for pid, p in found.items() if _name(p) != "gcs_server"}
        return found

    def signal_all(procs: dict[int, psutil.Process], sig: int) -> None:
        for pid, p in procs.items():
            try:
                p.send_signal(sig)
                stopped.setdefault(pid, p)
            except psutil.Error:
                continue

    deadline = time.monotonic() + timeout
    # The GCS goes last: the raylet's graceful exit talks to it. Stopped together,
    # the raylet and GCS ignore SIGTERM until SIGKILL (measured: 15 s, against
    # under 1 s in this order).
    for include_gcs in (False, True):
        for _round in range(5):
            procs = targets(include_gcs)
            if not procs:
                break
            signal_all(procs, signal.SIGTERM)
            # Loop again when all are gone: the raylet may have started workers meanwhile.
            if _wait_gone(list(procs.values()), max(0.5, deadline - time.monotonic())):
                break
    for _round in range(5):
        procs = targets(True)
        if not procs:
            return sorted(stopped)
        signal_all(procs, signal.SIGKILL)
        _wait_gone(list(procs.values()), 5)
    left = sorted(set(find_pids(cluster)) | {p.pid for p in stopped.values() if _running(p)})
    if left:
        raise ClusterError(f"Could not stop processes {left} of cluster {cluster.name!r}.",
                           "Kill them by pid (never `ray stop`, which stops every Ray cluster here).")
    return sorted(stopped)


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until the processes are gone or zombies (reaped by whoever is their parent now)."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _running(p)]
    return alive


def _name(p: psutil.Process) -> str:
    import psutil

    try:
        return p.name()
    except psutil.Error:
        return ""


def _running(p: psutil.Process) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --------------------------------------------------------------------------- job client


def _normalize(address: str) -> str:
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    return address


def _same_address(address: str, cluster: LocalCluster) -> bool:
    a = _normalize(address)
    return a == cluster.dashboard_url or address.strip() == cluster.gcs_address


def job_client(address: str, token: str | None = None) -> JobSubmissionClient:
    """A Ray ``JobSubmissionClient`` for the job API at ``address`` that sends the auth token.

    Ray's SDK adds ``Authorization: Bearer <token>`` by itself only when this process
    has ``RAY_AUTH_MODE=token`` (``ray/_private/authentication/http_token_authentication.py``);
    dvcray passes the header explicitly instead, so nothing in this process's
    environment changes. A GCS address of a recorded cluster is mapped to its job API.

    Args:
        address: the job API (``http://127.0.0.1:8265``, or ``127.0.0.1:8265``).
        token: the token; else ``client_token(address)``.

    Raises:
        ClusterError: nothing answers at ``address``, or it refused the token.
    """
    for cluster in _records():
        if address.strip() == cluster.gcs_address:
            address = cluster.dashboard_url
    url = _normalize(address)
    token = token or client_token(url)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Ray's SDK lets RAY_API_SERVER_ADDRESS or RAY_ADDRESS override the address it is
    # given (ray/dashboard/utils.py: get_address_for_submission_client); the client
    # must talk to `url` (a run's recorded cluster, --address), whatever the env says.
    hidden = {v: os.environ.pop(v) for v in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if v in os.environ}
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as exc:
        raise _http_error(url, 401 if "required" in str(exc).split(":", 1)[0] else 403, token) from None
    except requests.HTTPError as exc:
        raise _http_error(url, exc.response.status_code if exc.response is not None else 0, token) from None
    except (ConnectionError, requests.RequestException, RuntimeError) as exc:
        raise ClusterError(f"No Ray cluster answers at {url} ({type(exc).__name__}).", UP_HINT) from None
    finally:
        os.environ.update(hidden)


def _http_error(url: str, status: int, token: str | None) -> ClusterError:
    if status == 401:
        return ClusterError(f"The Ray cluster at {url} requires an auth token and none was found.",
                            "Set RAY_AUTH_TOKEN, or put the cluster's token in ~/.ray/auth_token.")
    if status == 403:
        return ClusterError(f"The Ray cluster at {url} refused the auth token.",
                            "Set RAY_AUTH_TOKEN to the token the cluster was started with.")
    return ClusterError(f"The Ray job API at {url} answered HTTP {status}.", UP_HINT)


def list_nodes(address: str, token: str | None = None) -> list[dict[str, Any]]:
    """The cluster's nodes from its dashboard (one HTTP request; no driver, no GCS client).

    Returns:
        ``[{"node_id", "ip", "is_head", "alive", "state", "resources"}]``.
    """
    import requests

    url = _normalize(address)
    token = token or client_token(url)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = requests.get(f"{url}/api/v0/nodes", params={"limit": 1000, "detail": "true"},
                         headers=headers, timeout=10)
    except requests.RequestException as exc:
        raise ClusterError(f"No Ray cluster answers at {url} ({type(exc).__name__}).", UP_HINT) from None
    if r.status_code != 200:
        raise _http_error(url, r.status_code, token)
    body = r.json()
    rows = ((body.get("data") or {}).get("result") or {}).get("result") or []
    return [{
        "node_id": n.get("node_id"),
        "ip": n.get("node_ip"),
        "is_head": bool(n.get("is_head_node")),
        "alive": n.get("state") == "ALIVE",
        "state": n.get("state"),
        "resources": {k: v for k, v in (n.get("resources_total") or {}).items()
                      if not k.startswith("node:")},
    } for n in rows]


def autoscaler_status(address: str, token: str | None = None,
                      alive: list[dict[str, Any]] | None = None,
                      types: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """What the cluster's autoscaler last reported (one HTTP request to the dashboard,
    which reads it from the GCS; what ``ray status`` shows). None when the cluster
    has no autoscaler report (a head without ``--autoscaling-config``).

    Args:
        address: the job API.
        alive: the alive nodes (``list_nodes``), to tell launched nodes that have
            not joined yet from those that have.
        types: worker node types with their resources (``node_types``), to give
            pending nodes their resources.

    Returns:
        ``{"pending": [{"node_type", "state", "resources"}], "waiting": [{"resources",
        "count"}], "error": str | None}``: nodes launched or being launched that have
        not joined, and the resource shapes that tasks, actors and jobs wait for.
    """
    import requests

    url = _normalize(address)
    token = token or client_token(url)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = requests.get(f"{url}/api/cluster_status", headers=headers, timeout=10)
    except requests.RequestException as exc:
        raise ClusterError(f"No Ray cluster answers at {url} ({type(exc).__name__}).", UP_HINT) from None
    if r.status_code != 200:
        raise _http_error(url, r.status_code, token)
    data = (r.json() or {}).get("data") or {}
    status = data.get("clusterStatus") or {}
    report = status.get("autoscalerReport") or {}
    if not report and not data.get("autoscalingError"):
        return None
    types = types or {}
    joined = {str(n.get(k)) for n in (alive or []) for k in ("node_id", "ip") if n.get(k)}
    pending = []
    # Launched by the provider but not (yet) a node of Ray. For fake_multinode the
    # provider's "IP" is the node id (use_node_id_as_ip); elsewhere the node's IP.
    listed = {str(item[-3]) if len(item) >= 3 else "" for item in report.get("pendingNodes") or []}
    for ip, node_type in (report.get("nodeTypeMapping") or {}).items():
        if node_type in types and ip not in joined and ip not in listed:
            pending.append({"node_type": node_type, "state": "starting",
                            "resources": types[node_type]["resources"]})
    for item in report.get("pendingNodes") or []:
        node_type, state = item[-2], item[-1]
        pending.append({"node_type": node_type, "state": str(state),
                        "resources": types.get(node_type, {}).get("resources", {})})
    for node_type, count in (report.get("pendingLaunches") or {}).items():
        for _ in range(int(count)):
            pending.append({"node_type": node_type, "state": "launching",
                            "resources": types.get(node_type, {}).get("resources", {})})
    metrics = status.get("loadMetricsReport") or {}
    waiting = [{"resources": shape, "count": count}
               for shape, count in (metrics.get("resourceDemand") or []) if isinstance(shape, dict)]
    return {"pending": pending, "waiting": waiting, "error": data.get("autoscalingError")}


def active_runs(client: JobSubmissionClient) -> list[dict[str, Any]]:
    """dvcray's runs that are pending or running on the cluster (jobs tagged ``dvcray_version``)."""
    runs = []
    for job in client.list_jobs():
        status = str(getattr(job.status, "value", job.status))
        meta = job.metadata or {}
        if RUN_MARKER in meta and status in ACTIVE_JOB_STATES and job.submission_id:
            runs.append({"run_id": job.submission_id, "status": status,
                         "exp_name": meta.get("exp_name") or meta.get("dvcray_exp_name")})
    return runs


# --------------------------------------------------------------------------- records


def _records() -> list[LocalCluster]:
    folder = records_dir()
    if not folder.is_dir():
        return []
    clusters = []
    for path in sorted(folder.glob("*.json")):
        try:
            clusters.append(LocalCluster.from_json(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return clusters


def _records_folder() -> Path:
    folder = records_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    os.chmod(folder.parent, 0o700)
    return folder


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """One ``up`` or ``down`` of a cluster at a time: two ``dvcray run`` started at
    once with no cluster must not start two heads."""
    with open(_records_folder() / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_record(cluster: LocalCluster) -> Path:
    _records_folder()
    path = record_path(cluster.name)
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cluster.to_json(), f, indent=2)
    os.replace(tmp, path)
    return path


def _remove_record(name: str) -> None:
    record_path(name).unlink(missing_ok=True)


def recorded(name: str = "local") -> LocalCluster | None:
    """The recorded cluster ``name`` if it is running, else None.

    A record whose GCS is gone is stale: whatever is left of its processes is
    stopped, and the record removed.
    """
    path = record_path(name)
    try:
        cluster = LocalCluster.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        path.unlink(missing_ok=True)
        return None
    if is_alive(cluster):
        return cluster
    stop_head(cluster, timeout=5)
    _remove_record(name)
    return None


def current() -> LocalCluster | None:
    """The cluster on this machine that runs go to by default: of the running
    clusters ``cluster up`` recorded (``local``, ``local-multinode``), the one
    started last."""
    running = [c for c in (recorded(r.name) for r in _records() if r.name in SUPPORTED) if c is not None]
    return max(running, key=lambda c: c.started_at) if running else None


def recorded_at(address: str) -> LocalCluster | None:
    """The running cluster recorded on this machine whose job API or GCS is ``address``."""
    for record in _records():
        if _same_address(address, record):
            return recorded(record.name)
    return None


def dead_at(address: str) -> LocalCluster | None:
    """The cluster recorded on this machine at ``address`` if its GCS is gone (it
    died, or was stopped by hand); None if it runs or is not one of dvcray's."""
    for record in _records():
        if _same_address(address, record) and not is_alive(record):
            return record
    return None


# --------------------------------------------------------------------------- up / down / status


def check_name(config: str) -> str:
    """The built-in cluster ``config`` names, if this version supports it.

    Raises:
        UsageError: a YAML path, a built-in that comes later, or an unknown name.
    """
    name = config.strip()
    if name in SUPPORTED:
        return name
    supported = ", ".join(SUPPORTED)
    if name in BUILT_INS:
        raise UsageError(f"Cluster {name!r} is not yet supported by this version of dvcray; "
                         f"supported: {supported}.", "Use: dvcray cluster up local")
    if name.endswith((".yaml", ".yml")) or os.sep in name or Path(name).exists():
        raise UsageError(f"Cluster configs from YAML files ({name}) are not yet supported; "
                         f"supported: {supported}.", "Use: dvcray cluster up local")
    raise UsageError(f"Unknown cluster {name!r}. Built-ins: {', '.join(BUILT_INS)} "
                     f"(supported so far: {supported}), or a YAML path.",
                     "Use: dvcray cluster up local")


def up(name: str = "local", **start_options: Any) -> tuple[LocalCluster, bool]:
    """Start the cluster ``name`` unless it already runs; record it.

    Returns:
        ``(cluster, started)``: ``started`` is False when it was already running.

    Raises:
        UsageError: an unsupported cluster name.
        ClusterError: the head did not start.
    """
    name = check_name(name)
    with _locked(name):
        cluster = recorded(name)
        if cluster is not None:
            return cluster, False
        cluster = start_head(name, **{**builtin_options(name), **start_options})
        try:
            if cluster.autoscaling_config:
                wait_for_workers(cluster)
            _write_record(cluster)
        except BaseException:
            stop_head(cluster, timeout=5)
            raise
    return cluster, True


def builtin_options(name: str) -> dict[str, Any]:
    """``start_head`` options of a built-in cluster."""
    if name == "local-multinode":
        from dvcray_cli.resources import cluster_configs_dir

        return {"autoscaling_config": cluster_configs_dir() / "local-multinode.yaml"}
    return {}


def _monitor_running(cluster: LocalCluster) -> bool:
    import psutil

    for pid in _core_pids(cluster):
        try:
            if any(part.endswith("autoscaler/_private/monitor.py") for part in psutil.Process(pid).cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def wait_for_workers(cluster: LocalCluster, timeout: float = WORKERS_TIMEOUT_S) -> list[dict[str, Any]]:
    """Wait until an autoscaling cluster's ``min_workers`` have joined; update ``num_cpus``.

    Returns:
        The alive nodes.

    Raises:
        ClusterError: the autoscaler died or reported an error (a key missing from
            its config kills it while ``ray start`` still succeeds), or the workers
            did not join in time. Names the autoscaler's log.
    """
    want = sum(t["min_workers"] for t in node_types(cluster).values())
    logs = Path(cluster.temp_dir) / "session_latest" / "logs"
    deadline = time.monotonic() + timeout
    alive: list[dict[str, Any]] = []
    while True:
        try:
            alive = [n for n in list_nodes(cluster.dashboard_url, token=cluster.token()) if n["alive"]]
        except ClusterError:
            alive = []
        if sum(not n["is_head"] for n in alive) >= want:
            cluster.num_cpus = sum(n["resources"].get("CPU", 0) for n in alive)
            return alive
        error = None
        if not _monitor_running(cluster):
            error = "Ray's autoscaler exited"
        else:
            error = (autoscaler_status(cluster.dashboard_url, token=cluster.token()) or {}).get("error")
        if error or time.monotonic() > deadline:
            tail = _tail(logs / "monitor.err", 3)
            raise ClusterError(
                f"{error or f'The autoscaler did not start {want} worker node(s) within {timeout:.0f} s'}"
                f" (cluster {cluster.name!r}). Its log: {logs / 'monitor.err'}" + (f"\n{tail}" if tail else ""),
                "A key missing from the cluster config stops the autoscaler: compare it with the built-in one.")
        time.sleep(1.0)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def down(name: str = "local", yes: bool = False) -> DownResult:
    """Stop the cluster ``name`` and remove its record.

    Runs still going on it are a reason to refuse, unless ``yes``: then they are
    stopped first (Ray sends their runners SIGTERM, so they save what they can).

    Raises:
        UsageError: dvcray runs are pending or running and ``yes`` is False.
    """
    name = check_name(name)
    with _locked(name):
        return _down(name, yes)


def _down(name: str, yes: bool) -> DownResult:
    try:
        record = LocalCluster.from_json(json.loads(record_path(name).read_text()))
    except (OSError, ValueError, TypeError):
        record = None
    if record is not None and not is_alive(record):
        # It died (its GCS is gone): what is left of it (dashboard, autoscaler,
        # workers, runners) is stopped all the same.
        pids = stop_head(record)
        _remove_record(name)
        return DownResult(name, record if pids else None, pids, [])
    cluster = recorded(name)
    if cluster is None:
        return DownResult(name, None, [], [])
    runs: list[dict[str, Any]] = []
    client = None
    try:
        client = job_client(cluster.dashboard_url, token=cluster.token())
        runs = active_runs(client)
    except ClusterError:
        client = None  # the job API is down; the processes still get stopped
    if runs and not yes:
        ids = ", ".join(r["run_id"] for r in runs)
        raise UsageError(f"Cluster {name!r} has {len(runs)} run(s) in progress: {ids}.",
                         f"Let them finish, or stop them with the cluster: dvcray cluster down {name} --yes")
    stopped_runs = []
    if client is not None:
        for run in runs:
            try:
                client.stop_job(run["run_id"])
                stopped_runs.append(run["run_id"])
            except Exception:  # noqa: BLE001 - the job ended meanwhile; stopping the head ends it anyway
                continue
        _wait_jobs_end(client, stopped_runs, timeout=10)
    pids = stop_head(cluster)
    _remove_record(name)
    return DownResult(name, cluster, pids, stopped_runs)


def _wait_jobs_end(client: JobSubmissionClient, ids: list[str], timeout: float) -> None:
    """Give stopped runners their grace period (Ray: SIGTERM, SIGKILL after 3 s)."""
    deadline = time.monotonic() + timeout
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        for run_id in list(pending):
            try:
                status = str(getattr(client.get_job_status(run_id), "value", ""))
            except Exception:  # noqa: BLE001
                status = "STOPPED"
            if status not in ACTIVE_JOB_STATES:
                pending.discard(run_id)
        if pending:
            time.sleep(0.3)


def status() -> list[dict[str, Any]]:
    """Every recorded cluster: addresses, nodes with their resources, and dvcray runs in progress.

    Stale records (their GCS is gone) are cleaned up and not listed.
    """
    result = []
    for record in _records():
        cluster = recorded(record.name)
        if cluster is None:
            continue
        entry: dict[str, Any] = {
            "name": cluster.name, "alive": True, "gcs_address": cluster.gcs_address,
            "dashboard_url": cluster.dashboard_url, "temp_dir": cluster.temp_dir,
            "started_at": cluster.started_at, "nodes": [], "cpus": None, "runs": [], "error": None,
            "autoscaling": bool(cluster.autoscaling_config), "pending": [], "waiting": [],
        }
        try:
            nodes = list_nodes(cluster.dashboard_url, token=cluster.token())
            entry["nodes"] = [n for n in nodes if n["alive"]]
            entry["cpus"] = sum(n["resources"].get("CPU", 0) for n in entry["nodes"])
            if cluster.autoscaling_config:
                entry["max_resources"] = max_resources(cluster)
                report = autoscaler_status(cluster.dashboard_url, token=cluster.token(),
                                           alive=entry["nodes"], types=node_types(cluster)) or {}
                entry["pending"], entry["waiting"] = report.get("pending", []), report.get("waiting", [])
                entry["autoscaler_error"] = report.get("error")
            entry["runs"] = active_runs(job_client(cluster.dashboard_url, token=cluster.token()))
        except ClusterError as exc:
            entry["error"] = exc.message
        result.append(entry)
    return result
