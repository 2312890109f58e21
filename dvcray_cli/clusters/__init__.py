"""The one cluster API that commands and runs call (DESIGN.md, "Clusters").

Each operation is declared here once and routed by the kind of cluster: the
built-ins ``local`` and ``local-multinode`` go to ``local``, ``aws``,
``aws-gpu`` and YAML files whose provider is aws go to ``aws``, any other Ray
cluster-launcher YAML (on-prem machines over SSH, other clouds) to ``launcher``,
whose shared pieces ``aws`` builds on. Around them this module arms and disarms
the idle watchers of local clusters (``idle``), finds the cluster a run goes to,
and finds the token for an address over every kind of record. ``local`` and
``aws`` never import each other, and ``launcher`` imports neither (a test keeps it so).

Importing this package imports nothing heavy: ``dvcray --help`` stays fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dvcray_cli import ray_api
from dvcray_cli.clusters.local import LocalPlan
from dvcray_cli.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from ray.job_submission import JobSubmissionClient

LOCAL = ("local", "local-multinode")
AWS = ("aws", "aws-gpu")
BUILT_INS = LOCAL + AWS
UP_HINT = "Use: dvcray cluster up local"

Say = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


# --------------------------------------------------------------------------- which kind


def kind_of(config: str) -> str:
    """``"local"``, ``"aws"`` or ``"launcher"``: who handles the cluster ``config`` names.

    Raises:
        UsageError: an unknown name, or a YAML file that does not exist or cannot be read.
    """
    from dvcray_cli.clusters.aws.config import is_aws_config

    name = config.strip()
    if name in LOCAL:
        return "local"
    if is_aws_config(name):
        return "aws"
    if name.endswith((".yaml", ".yml")) and not Path(name).expanduser().exists():
        raise UsageError(f"No cluster config at {name}.",
                         f"Pass a built-in ({', '.join(BUILT_INS)}) or the path of a Ray cluster YAML.")
    if name.endswith((".yaml", ".yml")) or os.sep in name or Path(name).exists():
        if not Path(name).expanduser().is_file():
            raise UsageError(f"No cluster config at {name}.", "Pass the path of a Ray cluster YAML.")
        return "launcher"
    raise UsageError(f"Unknown cluster {name!r}. Built-ins: {', '.join(BUILT_INS)}, or a YAML path.", UP_HINT)


def parse_duration(text: str | float | int | None) -> float:
    """Seconds in ``90s``, ``30m``, ``1h``, ``1h30m`` or a number; 0 (``off``) turns a watcher off."""
    from dvcray_cli.clusters.common import parse_duration as parse

    return parse(text)


def format_duration(seconds: float) -> str:
    from dvcray_cli.clusters.common import format_duration as fmt

    return fmt(seconds)


# --------------------------------------------------------------------------- up


@dataclass
class UpResult:
    """A cluster after ``up``."""

    name: str
    kind: str
    started: bool                  # False: it was already running
    dashboard_url: str
    started_at: str
    num_cpus: float | None = None
    autoscaling: bool = False
    idle_timeout_s: float | None = None  # the watcher armed now (None: none)
    head_ip: str = ""
    config_label: str = ""         # launcher clusters: the YAML's path, as typed
    workers: list[str] = field(default_factory=list)   # launcher clusters: workers that joined


def plan(config: str, cwd: Path, idle_timeout_s: float | None = None) -> Any:
    """What ``up`` would do, checked; creates nothing. An AWS plan is checked
    read-only against the account and priced (``dvcray_cli.clusters.aws.AwsPlan``); an
    on-prem plan logs in to each machine and checks its Ray
    (``dvcray_cli.clusters.launcher.LauncherPlan``).

    Raises:
        UsageError: a bad config name or file, or a project unfit for the cluster.
        ClusterError: AWS credentials missing or refused; a machine unreachable,
            refusing the key, or running another Ray version.
    """
    kind = kind_of(config)
    if kind == "local":
        return LocalPlan(config.strip(), idle_timeout_s)
    if kind == "launcher":
        from dvcray_cli.clusters import launcher

        return launcher.plan(config, cwd, idle_timeout_s)
    from dvcray_cli.clusters import aws

    return aws.plan(config, cwd, idle_timeout_s)


def up(planned: Any, say: Say = _quiet) -> UpResult:
    """Start the planned cluster unless it runs, record it, arm its idle watcher.

    Raises:
        ClusterError: it did not start (names the log to read).
    """
    if planned.kind == "local":
        from dvcray_cli.clusters import idle, local

        cluster, started = local.up(planned.name)
        watcher = None
        if planned.idle_timeout_s is not None:
            watcher = idle.arm(cluster.name, planned.idle_timeout_s)
        return UpResult(cluster.name, "local", started, cluster.dashboard_url, cluster.started_at,
                        cluster.num_cpus, bool(cluster.autoscaling_config),
                        watcher["timeout_s"] if watcher else None)
    if planned.kind == "launcher":
        from dvcray_cli.clusters import launcher

        record = launcher.up(planned, say)
        workers = [n["ip"] for n in ray_api.list_nodes(record.dashboard_url, record.token())
                   if n["alive"] and not n["is_head"]]
        return UpResult(record.name, "launcher", True, record.dashboard_url, record.started_at,
                        idle_timeout_s=record.idle_timeout_s or None, head_ip=record.head_ip,
                        config_label=record.config_label, workers=sorted(workers))
    from dvcray_cli.clusters import aws

    record = aws.up(planned, say)
    return UpResult(record.name, "aws", True, record.dashboard_url, record.started_at,
                    idle_timeout_s=record.idle_timeout_s or None, head_ip=record.head_ip)


def refuse_fake_endpoint() -> None:
    """Never launch instances against a fake AWS on this machine (moto): ClusterError."""
    from dvcray_cli.clusters.aws.account import refuse_fake_endpoint as refuse

    refuse()


# --------------------------------------------------------------------------- down


@dataclass
class DownResult:
    """What ``down`` did."""

    name: str
    kind: str
    was_running: bool
    stopped_runs: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)        # local: processes stopped
    terminated: list[str] = field(default_factory=list)  # aws: instances terminated
    region: str = ""
    nodes: list[str] = field(default_factory=list)        # launcher (on-prem): machines Ray stopped on
    unreachable: list[str] = field(default_factory=list)  # launcher (on-prem): machines SSH did not reach
    provider: str = ""


def down(config: str, cwd: Path, yes: bool = False) -> DownResult:
    """Stop the cluster ``config`` names, and its idle watcher; remove its record.

    Runs still going on it are a reason to refuse, unless ``yes``: then they are
    stopped first (their runners get SIGTERM and a grace period to save).

    Raises:
        UsageError: dvcray runs are in progress and ``yes`` is False.
    """
    kind = kind_of(config)
    if kind == "local":
        from dvcray_cli.clusters import idle, local

        name = config.strip()
        result = local.down(name, yes=yes)
        idle.disarm(name)
        return DownResult(name, "local", result.cluster is not None, result.stopped_runs, result.pids)
    if kind == "launcher":
        from dvcray_cli.clusters import launcher

        gone = launcher.down(config, cwd, yes=yes)
        return DownResult(gone.name, "launcher", gone.recorded or bool(gone.nodes), gone.stopped_runs,
                          nodes=gone.nodes, unreachable=gone.unreachable, provider=gone.provider)
    from dvcray_cli.clusters import aws

    done = aws.down(config, cwd, yes=yes)
    return DownResult(done.name, "aws", bool(done.terminated), done.stopped_runs,
                      terminated=done.terminated, region=done.region)


# --------------------------------------------------------------------------- status


@dataclass
class Status:
    """Every cluster dvcray knows of, as ``cluster status`` shows them."""

    local: list[dict[str, Any]]
    aws: list[dict[str, Any]]
    auto_downs: list[dict[str, Any]]   # local clusters their idle watcher took down
    launcher: list[dict[str, Any]] = field(default_factory=list)   # clusters from any other YAML

    def to_json(self) -> list[dict[str, Any]]:
        return self.local + self.aws + self.launcher


def status() -> Status:
    """The recorded clusters with their nodes, runs in progress and idle timeouts;
    AWS clusters with their instances and estimated cost so far; launcher clusters
    (on-prem, other clouds) with their nodes."""
    from dvcray_cli.clusters import aws, idle, launcher, local

    found = local.status()
    for entry in found:
        watcher = idle.watcher(entry["name"])
        entry["idle_timeout_s"] = watcher["timeout_s"] if watcher else None
    running = {c["name"] for c in found}
    notes = [n for n in idle.auto_downs() if n.get("name") not in running]
    return Status(found, aws.status(), notes, launcher.status())


# --------------------------------------------------------------------------- where runs go


def token_for(address: str | None = None) -> str | None:
    """The token a client sends to ``address``, in Ray's own order of precedence.

    ``RAY_AUTH_TOKEN``, then the file named by ``RAY_AUTH_TOKEN_PATH``, then the
    token file of a cluster recorded at ``address`` (local, or AWS or another
    launcher cluster through its port-forward), then ``~/.ray/auth_token``.
    """
    token = ray_api.env_token()
    if token:
        return token
    if address:
        from dvcray_cli.clusters import local
        from dvcray_cli.clusters.aws.records import token_for_address

        for cluster in local.records():
            if cluster.same_address(address):
                token = cluster.token()
                if token:
                    return token
        token = token_for_address(address)
        if token:
            return token
        from dvcray_cli.clusters.launcher import records

        record = records.at_address(address)
        token = record.token() if record is not None else None
        if token:
            return token
    return ray_api.read_token(ray_api.default_token_path())


def job_api(address: str) -> str:
    """The job API of ``address``: a recorded local cluster's GCS address maps to its dashboard."""
    from dvcray_cli.clusters import local

    for cluster in local.records():
        if address.strip() == cluster.gcs_address:
            return cluster.dashboard_url
    return ray_api.normalize(address)


def connect(address: str) -> JobSubmissionClient:
    """A job client for ``address`` that sends the token that belongs to it (the
    port-forward of a recorded launcher cluster is reopened first if it died).

    Raises:
        ClusterError: nothing answers there, or it refused the token.
    """
    url = job_api(address)
    from dvcray_cli.clusters import launcher

    launcher.ensure_reachable(url)
    return ray_api.client(url, token_for(url))


def known_address(explicit: str | None, cwd: Path | None = None) -> str | None:
    """Where runs go without starting anything: ``--address``, ``RAY_ADDRESS``,
    this repo's AWS cluster, this project's newest launcher cluster (on-prem or
    another cloud, recorded by any clone of the project; both through their
    port-forward, reopened if it died), or the recorded cluster on this machine
    (``local`` or ``local-multinode``, the one started last). None: a cluster
    would have to be started."""
    if explicit or os.environ.get("RAY_ADDRESS"):
        return explicit or os.environ["RAY_ADDRESS"]
    from dvcray_cli.clusters import aws, launcher, local

    in_aws = aws.recorded_address(cwd or Path.cwd())
    if in_aws:
        return in_aws
    launched = launcher.recorded_address(cwd or Path.cwd())
    if launched:
        return launched
    current = local.current()
    return current.dashboard_url if current else None


def ensure_address(explicit: str | None, cwd: Path | None = None, say: Say = _quiet) -> tuple[str, bool]:
    """``known_address``, else a local cluster started now (the embedded default).

    Returns:
        ``(address, started)``.
    """
    known = known_address(explicit, cwd)
    if known:
        return known, False
    from dvcray_cli.clusters import local

    say("No cluster configured: starting a local Ray cluster on this machine "
        "(stop it with: dvcray cluster down local).")
    cluster, _ = local.up("local")
    return cluster.dashboard_url, True


def fallback_addresses() -> list[str]:
    """Where a run this clone has no record of may be: ``RAY_ADDRESS``, the local cluster."""
    found = []
    if os.environ.get("RAY_ADDRESS"):
        found.append(os.environ["RAY_ADDRESS"])
    from dvcray_cli.clusters import local

    try:
        current = local.current()
    except Exception:  # noqa: BLE001 - only a hint of where to look
        current = None
    if current is not None:
        found.append(current.dashboard_url)
    return found


def on_this_machine(address: str) -> bool:
    """Whether the cluster at ``address`` runs on this machine (so a folder here is
    a store its runners reach). A cluster reached through a port-forward (AWS)
    (AWS, any launcher cluster) is elsewhere, although its job API answers on 127.0.0.1."""
    import ipaddress
    import socket
    from urllib.parse import urlparse

    from dvcray_cli.clusters import local
    from dvcray_cli.clusters.aws.records import records as aws_records
    from dvcray_cli.clusters.launcher import records as launcher_records

    url = job_api(address)
    if launcher_records.at_address(url) is not None or any(r.dashboard_url == url for r, _ in aws_records()):
        return False
    if any(cluster.same_address(address) for cluster in local.records()):
        return True
    host = (urlparse(url).hostname or "").lower()
    if host in ("localhost", socket.gethostname().lower()):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    import psutil

    mine = {a.address.split("%", 1)[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return str(ip) in mine


def is_remote(address: str) -> bool:
    """The cluster at ``address`` runs on other machines: a folder here is out of its nodes' reach."""
    return not on_this_machine(address)


def reaches_service(address: str) -> bool:
    """Whether this machine can reach the runner service of the cluster at ``address``
    (``service_url``); where it cannot, runs go there as Ray Jobs of their own."""
    if on_this_machine(address):
        return True
    from dvcray_cli.clusters import aws, launcher

    url = job_api(address)
    return launcher.recorded_at(url) or aws.recorded_at(url)


def service_url(address: str, head_port: int) -> str | None:
    """Where this machine reaches the runner service that listens on ``head_port`` of the
    head of the cluster at ``address`` (on the head's 127.0.0.1 only): directly for a
    cluster on this machine; through an SSH port-forward of its own for a recorded
    launcher or AWS cluster (opened, or reopened when its ssh died, and recorded). None
    where nothing reaches it (a cluster elsewhere that dvcray did not start): runs go
    there as Ray Jobs of their own.

    Raises:
        ClusterError: the port-forward did not open.
    """
    if on_this_machine(address):
        return f"http://127.0.0.1:{head_port}"
    from dvcray_cli.clusters import aws, launcher

    url = job_api(address)
    return launcher.service_url(url, head_port) or aws.service_url(url, head_port)


def dead_at(address: str) -> str | None:
    """The name of the cluster recorded on this machine at ``address`` if its GCS
    is gone (it died, or was stopped by hand); None if it runs or is not dvcray's."""
    from dvcray_cli.clusters import local

    dead = local.dead_cluster_at(address)
    return dead.name if dead is not None else None


@dataclass
class Shape:
    """What a cluster has now, and the most it can grow to when dvcray knows it."""

    nodes: list[dict[str, Any]]              # alive nodes (``ray_api.list_nodes``)
    most: dict[str, float] | None = None     # the most it can ever have (None: unknown)
    recorded: bool = False                   # a cluster dvcray started on this machine, or on-prem machines
    remote: bool = False                     # its nodes are other machines (nothing on this disk reaches them)


def shape(address: str) -> Shape:
    """The alive nodes of the cluster at ``address`` and, for an autoscaling cluster
    dvcray started, the resources it can grow to (for placement).

    Raises:
        ClusterError: the cluster does not answer.
    """
    from dvcray_cli.clusters import local
    from dvcray_cli.clusters.launcher import records

    url = job_api(address)
    nodes = [n for n in ray_api.list_nodes(url, token_for(url)) if n["alive"]]
    launched = records.at_address(url)
    if launched is not None:
        # On-prem machines are all there is (a worker that is down now may come back).
        return Shape(nodes, None, launched.provider == "local", remote=True)
    record = local.recorded_at(address)
    if record is None:
        return Shape(nodes, remote=is_remote(url))
    if record.autoscaling_config:
        most = local.max_resources(record) or {}
        return Shape(nodes, {"CPU": float(most.get("CPU", 0)), "GPU": float(most.get("GPU", 0))}, True)
    return Shape(nodes, None, True)


# --------------------------------------------------------------------------- the cluster's dvcray


_PROBE = ("python -c \"import dvcray_cli; print('dvcray-version=' + dvcray_cli.__version__)\"")


def cluster_dvcray_version(address: str, job_client: JobSubmissionClient | None = None) -> str | None:
    """The dvcray version the cluster at ``address`` runs its runners with.

    Asked once per cluster session and remembered (``~/.dvcray/clusters/versions.json``):
    the head's ``dvcray-version`` label when dvcray started it, else a one-line
    Ray Job on the head that imports dvcray and prints its version.

    Returns:
        The version, or None when the cluster's Python has no dvcray.

    Raises:
        ClusterError: the cluster does not answer.
    """
    from dvcray_cli import state
    from dvcray_cli.clusters.local import VERSION_LABEL

    url = job_api(address)
    token = token_for(url)
    session = str(ray_api.cluster_version(url, token).get("session_name") or "")
    cache_path = state.clusters_dir() / "versions.json"
    cache = state.read_json(cache_path) or {}
    key = f"{url} {session}"
    if session and isinstance(cache.get(key), str):
        return cache[key]
    found = None
    for node in ray_api.list_nodes(url, token):
        if node["is_head"] and node["alive"]:
            found = (node.get("labels") or {}).get(VERSION_LABEL)
    if found is None:
        status, log = ray_api.probe(job_client or ray_api.client(url, token), _PROBE)
        lines = [ln for ln in log.splitlines() if ln.startswith("dvcray-version=")]
        if status != "SUCCEEDED" or not lines:
            return None
        found = lines[-1].split("=", 1)[1].strip()
    if session:
        cache = {k: v for k, v in cache.items() if not k.startswith(f"{url} ")}
        cache[key] = found
        state.private_dir(state.clusters_dir())
        state.write_json(cache_path, cache)
    return found


def check_version(address: str, job_client: JobSubmissionClient | None = None) -> None:
    """Refuse a cluster whose dvcray cannot run this client's runs.

    Raises:
        ClusterError: the cluster has no dvcray, or one of another major.minor version.
    """
    from dvcray_cli import __version__, compatible
    from dvcray_cli.errors import ClusterError

    theirs = cluster_dvcray_version(address, job_client)
    if theirs is None:
        raise ClusterError(f"The Ray cluster at {job_api(address)} has no dvcray installed: its runner "
                           "cannot start.",
                           f"Install dvcray {__version__} on the cluster's nodes (dvcray cluster up does it).")
    if not compatible(theirs):
        raise ClusterError(f"The Ray cluster at {job_api(address)} runs dvcray {theirs}, this client is "
                           f"dvcray {__version__}: they cannot work together.",
                           f"Install dvcray {__version__} on the cluster, or use dvcray {theirs} here.")
