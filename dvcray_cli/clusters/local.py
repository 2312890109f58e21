"""Local clusters: a Ray head on this machine, alone (``local``) or with the
autoscaler's fake nodes (``local-multinode``).

A local cluster is one ``ray start --head`` on this machine with its own Ray
``--temp-dir``, token authentication on, the job API on 127.0.0.1. It is
machine-wide, so its record lives in ``~/.dvcray/clusters/<name>.json``. It is
stopped by its pids only (``procs``), never with ``ray stop``.

Ray is imported inside the functions that need it: ``dvcray --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from dvcray_cli import __version__, ray_api, state
from dvcray_cli.clusters import procs
from dvcray_cli.errors import ClusterError, UsageError

NAMES = ("local", "local-multinode")
DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
START_TIMEOUT_S = 120.0
# How long `up` waits for an autoscaling cluster's min_workers to join (a fake
# node joins in about 4 s on an idle machine).
WORKERS_TIMEOUT_S = 120.0
# The head's label that says which dvcray runs there (read by ``clusters.check_version``).
VERSION_LABEL = "dvcray-version"


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
    def from_json(cls, data: Any) -> LocalCluster | None:
        return state.from_json(cls, data)

    def token(self) -> str:
        return ray_api.read_token(self.token_path) or ""

    def pids(self) -> list[int]:
        """Every live process of this cluster (``procs.cluster_pids``)."""
        return procs.cluster_pids(self.temp_dir, self.session_id, self.gcs_address)

    def is_alive(self) -> bool:
        """Its GCS runs (a head without its GCS is gone, whatever is left)."""
        return procs.gcs_running(self.temp_dir, self.session_id)

    def stop(self, timeout: float = 15) -> list[int]:
        """Stop every process of this cluster, by pid (``procs.stop_cluster``)."""
        return procs.stop_cluster(self.name, self.temp_dir, self.session_id, self.gcs_address, timeout)

    def same_address(self, address: str) -> bool:
        """``address`` is this cluster's job API or its GCS."""
        return ray_api.normalize(address) == self.dashboard_url or address.strip() == self.gcs_address


@dataclass
class DownResult:
    """What ``down`` did."""

    name: str
    cluster: LocalCluster | None      # None: there was nothing to stop
    pids: list[int]
    stopped_runs: list[str]


def record_path(name: str) -> Path:
    return state.clusters_dir() / f"{name}.json"


def default_temp_dir(name: str) -> Path:
    """A short per-cluster Ray temp dir.

    Ray puts Unix sockets under ``<temp_dir>/session_<date>_<pid>/sockets/``, and
    a socket path must stay under 107 bytes, so this stays near 30 characters.
    The hash of user and HOME keeps two users' (or two tests') clusters apart.
    """
    key = f"{os.getuid()}:{Path.home()}:{name}"
    return Path("/tmp") / f"dvcray-{name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


# --------------------------------------------------------------------------- start


def start_head(name: str, *, num_cpus: float | None = None, temp_dir: str | Path | None = None,
               gcs_port: int | None = None, dashboard_port: int | None = None,
               env: dict[str, str] | None = None, token_path: str | Path | None = None,
               timeout: float = START_TIMEOUT_S,
               autoscaling_config: str | Path | None = None,
               dvcray_version: str | None = __version__) -> LocalCluster:
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
        dvcray_version: the dvcray its runners run with, as the head's
            ``dvcray-version`` label (this one's; None: no label, and clients
            ask the head itself).

    Returns:
        The running cluster (not yet recorded: ``up`` records it).

    Raises:
        ClusterError: ``ray start`` failed, or the job API did not answer in time,
            or it answered without asking for the token. Names the log folder.
    """
    temp = Path(temp_dir) if temp_dir else default_temp_dir(name)
    temp.mkdir(parents=True, exist_ok=True)
    token_file = ray_api.ensure_token(Path(token_path) if token_path else None)
    attempts = 1 if (gcs_port and dashboard_port) else 2
    for attempt in range(attempts):
        try:
            return _start_once(name, temp, token_file, num_cpus, gcs_port, dashboard_port, env,
                               timeout, prefer_defaults=attempt == 0, autoscaling_config=autoscaling_config,
                               dvcray_version=dvcray_version)
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
                autoscaling_config: str | Path | None = None,
                dvcray_version: str | None = __version__) -> LocalCluster:
    taken: set[int] = set()
    gcs = gcs_port or procs.pick_port(DEFAULT_GCS_PORT if prefer_defaults else None)
    taken.add(gcs)
    dash = dashboard_port or procs.pick_port(DEFAULT_DASHBOARD_PORT if prefer_defaults else None, taken)
    taken.add(dash)
    # Ray's defaults for these are fixed ports (10001, 52365): two clusters on one
    # machine would fight over them, and the job API needs the agent's port.
    client_port = procs.pick_port(None, taken)
    taken.add(client_port)
    agent_port = procs.pick_port(None, taken)

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
    # A DVC Studio token stays with the client, which relays runs' live updates itself
    # (runs/studio.py): no process of the cluster, runners included, ever has it.
    for var in ("DVC_STUDIO_TOKEN", "STUDIO_TOKEN"):
        head_env.pop(var, None)

    ray_bin = Path(bindir) / "ray"
    cmd = [str(ray_bin) if ray_bin.exists() else "ray", "start", "--head",
           "--port", str(gcs), "--node-ip-address", "127.0.0.1",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent_port),
           "--ray-client-server-port", str(client_port), "--temp-dir", str(temp)]
    if dvcray_version:
        # Which dvcray runs runners here: the client checks it before it submits.
        cmd += ["--labels", f"{VERSION_LABEL}={dvcray_version}"]
    resolved_config = None
    if autoscaling_config:
        resolved_config, fake = resolve_autoscaling_config(Path(autoscaling_config), temp, gcs)
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
        partial.stop(timeout=5)
        if re.search(r"already (in use|running|occupied)|Address already in use|is already running", text) \
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
        cluster.stop(timeout=5)
        raise
    return cluster


def resolve_autoscaling_config(source: Path, temp: Path, gcs_port: int) -> tuple[Path, bool]:
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
        if not procs.core_pids(cluster.temp_dir, cluster.session_id):
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
        nodes = ray_api.list_nodes(cluster.dashboard_url, cluster.token())
    except ClusterError:
        return default
    total = sum(n["resources"].get("CPU", 0) for n in nodes if n["alive"])
    return total or default


# --------------------------------------------------------------------------- records


def records() -> list[LocalCluster]:
    """Every local cluster recorded on this machine (running or not)."""
    folder = state.clusters_dir()
    if not folder.is_dir():
        return []
    found = (LocalCluster.from_json(state.read_json(p)) for p in sorted(folder.glob("*.json")))
    return [c for c in found if c is not None]


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """One ``up`` or ``down`` of a cluster at a time: two ``dvcray run`` started at
    once with no cluster must not start two heads."""
    with open(state.private_dir(state.clusters_dir()) / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_record(cluster: LocalCluster) -> Path:
    state.private_dir(state.clusters_dir())
    return state.write_json(record_path(cluster.name), cluster.to_json())


def _remove_record(name: str) -> None:
    record_path(name).unlink(missing_ok=True)


def _load(name: str) -> LocalCluster | None:
    return LocalCluster.from_json(state.read_json(record_path(name)))


def recorded(name: str = "local") -> LocalCluster | None:
    """The recorded cluster ``name`` if it is running, else None.

    A record whose GCS is gone is stale: whatever is left of its processes is
    stopped, and the record removed.
    """
    path = record_path(name)
    if not path.exists():
        return None
    cluster = _load(name)
    if cluster is None:
        path.unlink(missing_ok=True)
        return None
    if cluster.is_alive():
        return cluster
    cluster.stop(timeout=5)
    _remove_record(name)
    return None


def current() -> LocalCluster | None:
    """The cluster on this machine that runs go to by default: of the running
    clusters ``cluster up`` recorded (``local``, ``local-multinode``), the one
    started last."""
    running = [c for c in (recorded(r.name) for r in records() if r.name in NAMES) if c is not None]
    return max(running, key=lambda c: c.started_at) if running else None


def recorded_at(address: str) -> LocalCluster | None:
    """The running cluster recorded on this machine whose job API or GCS is ``address``."""
    for record in records():
        if record.same_address(address):
            return recorded(record.name)
    return None


def dead_at(address: str) -> LocalCluster | None:
    """The cluster recorded on this machine at ``address`` if its GCS is gone (it
    died, or was stopped by hand); None if it runs or is not one of dvcray's."""
    for record in records():
        if record.same_address(address) and not record.is_alive():
            return record
    return None

# --------------------------------------------------------------------------- up / down / status


def up(name: str = "local", **start_options: Any) -> tuple[LocalCluster, bool]:
    """Start the cluster ``name`` unless it already runs; record it.

    Returns:
        ``(cluster, started)``: ``started`` is False when it was already running.

    Raises:
        ClusterError: the head did not start.
    """
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
            cluster.stop(timeout=5)
            raise
    return cluster, True


def builtin_options(name: str) -> dict[str, Any]:
    """``start_head`` options of a built-in cluster."""
    if name == "local-multinode":
        from dvcray_cli.resources import cluster_configs_dir

        return {"autoscaling_config": cluster_configs_dir() / "local-multinode.yaml"}
    return {}


def _monitor_running(cluster: LocalCluster) -> bool:
    return procs.named_running(procs.core_pids(cluster.temp_dir, cluster.session_id),
                               "autoscaler/_private/monitor.py")


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
            alive = [n for n in ray_api.list_nodes(cluster.dashboard_url, cluster.token()) if n["alive"]]
        except ClusterError:
            alive = []
        if sum(not n["is_head"] for n in alive) >= want:
            cluster.num_cpus = sum(n["resources"].get("CPU", 0) for n in alive)
            return alive
        error = None
        if not _monitor_running(cluster):
            error = "Ray's autoscaler exited"
        else:
            error = (ray_api.autoscaler_status(cluster.dashboard_url, cluster.token()) or {}).get("error")
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
    with _locked(name):
        return _down(name, yes)


def _down(name: str, yes: bool) -> DownResult:
    record = _load(name)
    if record is not None and not record.is_alive():
        # It died (its GCS is gone): what is left of it (dashboard, autoscaler,
        # workers, runners) is stopped all the same.
        pids = record.stop()
        _remove_record(name)
        return DownResult(name, record if pids else None, pids, [])
    cluster = recorded(name)
    if cluster is None:
        return DownResult(name, None, [], [])
    runs: list[dict[str, Any]] = []
    client = None
    try:
        client = ray_api.client(cluster.dashboard_url, cluster.token())
        runs = ray_api.active_runs(client)
    except ClusterError:
        client = None  # the job API is down; the processes still get stopped
    if runs and not yes:
        ids = ", ".join(r["run_id"] for r in runs)
        raise UsageError(f"Cluster {name!r} has {len(runs)} run(s) in progress: {ids}.",
                         f"Let them finish, or stop them with the cluster: dvcray cluster down {name} --yes")
    stopped_runs: list[str] = []
    if client is not None and runs:
        # Every runner gets the whole grace it was promised to save its work (and Ray's
        # kill after it), before the head's processes go.
        stopped_runs = ray_api.stop_runs(client, runs, ray_api.stop_grace_s() + 10)
    pids = cluster.stop()
    _remove_record(name)
    return DownResult(name, cluster, pids, stopped_runs)


def status() -> list[dict[str, Any]]:
    """Every recorded local cluster: addresses, nodes with their resources, and dvcray runs in progress.

    Stale records (their GCS is gone) are cleaned up and not listed.
    """
    result = []
    for record in records():
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
            nodes = ray_api.list_nodes(cluster.dashboard_url, cluster.token())
            entry["nodes"] = [n for n in nodes if n["alive"]]
            entry["cpus"] = sum(n["resources"].get("CPU", 0) for n in entry["nodes"])
            if cluster.autoscaling_config:
                entry["max_resources"] = max_resources(cluster)
                report = ray_api.autoscaler_status(cluster.dashboard_url, cluster.token(),
                                                   alive=entry["nodes"], types=node_types(cluster)) or {}
                entry["pending"], entry["waiting"] = report.get("pending", []), report.get("waiting", [])
                entry["autoscaler_error"] = report.get("error")
            entry["runs"] = ray_api.active_runs(ray_api.client(cluster.dashboard_url, cluster.token()))
        except ClusterError as exc:
            entry["error"] = exc.message
        result.append(entry)
    return result
