"""Clusters from any Ray cluster-launcher YAML (DESIGN.md, "Clusters").

``dvcray cluster up FILE.yaml`` for a provider other than AWS (which has its own
module, built on this one): Ray's on-prem provider (``provider: {type: local,
head_ip, worker_ips}``, machines reached over SSH) is tested end to end on a bed
of namespaces; other providers (gcp, azure, vsphere, ...) pass through Ray's
launcher with dvcray's additions, untested here.

1. ``plan``: read the YAML, check it with Ray's own schema, name the cluster
   (``<cluster_name>-<first commit[:8]>``, the same in every clone), add dvcray's
   additions (``config.with_additions``: token, dvcray's wheel, dashboard on the
   head's 127.0.0.1, idle watcher) and, for on-prem machines, log in to each one
   and check its Ray version (``ssh.probe``). Creates nothing: ``--dry-run`` stops here.
2. ``up``: the token and the wheel on this machine, Ray's ``create_or_update_cluster``
   in a process of its own (``launch``), the SSH port-forward to the head's job API,
   the record (``records``), and for on-prem machines a wait until every worker joined.
3. ``down``: stop dvcray runs (with ``--yes``); on-prem, Ray on every node (the head
   stops its workers over SSH, then itself: ``idle launcher --down-now``) and the
   machines marked free in Ray's state file; elsewhere Ray's teardown; the forward
   and the record.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from dvcray_cli import ray_api, state
from dvcray_cli.clusters import procs
from dvcray_cli.clusters.launcher import config as cfg, launch, records, ssh
from dvcray_cli.clusters.launcher.records import LauncherCluster
from dvcray_cli.errors import ClusterError, DvcrayError, UsageError

__all__ = ["Check", "LauncherCluster", "LauncherDown", "Plan", "down", "plan", "recorded_address", "status",
           "stop_runs", "up"]

# Your own machines cost nothing idle; a cloud's do (as on AWS).
DEFAULT_IDLE_TIMEOUT_S = {"local": 0.0}
CLOUD_IDLE_TIMEOUT_S = 3600.0
# How long `up` waits for on-prem workers to join (each runs the setup commands first).
WORKERS_TIMEOUT_S = float(os.environ.get("DVCRAY_WORKERS_TIMEOUT_S", "600"))
LOCAL = "local"

Say = Callable[[str], None]


@dataclass
class Check:
    """One check of the plan."""

    name: str
    ok: bool
    detail: str


@dataclass
class Plan:
    """What ``up`` would do. Nothing in it has been created."""

    config_label: str          # what the user typed (the YAML's path)
    source: str                # the YAML file
    cluster_name: str          # <cluster_name>-<first commit[:8]>
    provider: str              # provider.type
    project: str               # the project's first commit
    repo_root: str
    head_ip: str               # on-prem: the head's address ("" when the provider makes machines)
    worker_ips: list[str]
    ssh_user: str
    key_path: str
    idle_timeout_s: float
    token_path: str
    wheel_path: str
    ray_version: str
    min_workers: int
    max_workers: int
    additions: list[str]
    checks: list[Check]
    config: dict[str, Any] = field(repr=False)   # the config as it will be launched
    kind: str = "launcher"

    @property
    def on_prem(self) -> bool:
        return self.provider == LOCAL


@dataclass
class LauncherDown:
    """What ``down`` did."""

    name: str
    provider: str
    recorded: bool
    stopped_runs: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)        # where Ray was stopped
    unreachable: list[str] = field(default_factory=list)  # nodes SSH did not reach


# --------------------------------------------------------------------------- plan


def plan(config: str, cwd: Path, idle_timeout_s: float | None = None, probe: bool = True) -> Plan:
    """Everything ``up`` would do, checked. Creates nothing; for on-prem machines it
    logs in to each one (read-only) unless ``probe`` is False.

    Raises:
        UsageError: the file, its YAML or Ray's schema refuse it, the key file is
            missing, or ``cwd`` is not in a git repository with a commit.
        ClusterError: a machine cannot be reached, refuses the key, or runs
            another Ray version than this client.
    """
    from importlib.metadata import version

    from dvcray_cli import __version__
    from dvcray_cli.clusters.launcher import wheel

    source = Path(config.strip()).expanduser()
    if not source.is_file():
        raise UsageError(f"No cluster config at {source}.", "Pass the path of a Ray cluster YAML.")
    raw = cfg.read_yaml(source)
    provider = cfg.provider_type(raw)
    if provider == "fake_multinode":
        raise UsageError(f"{source}: the fake_multinode provider runs only as the built-in cluster.",
                         "Use: dvcray cluster up local-multinode")
    repo_root, project = _project(cwd)
    name = cfg.check_name(f"{str(raw.get('cluster_name') or 'default')[:51]}-{project[:8]}")
    raw = {**raw, "cluster_name": name}
    prepared = cfg.validate_with_ray(raw, source)
    auth = prepared.get("auth") or {}
    key = str(auth.get("ssh_private_key") or "")
    if not key:
        raise UsageError(f"{source}: auth.ssh_private_key is not set.",
                         "dvcray reaches the head over SSH with that key: name it in the config's auth section.")
    if not Path(key).expanduser().is_file():
        raise UsageError(f"{source}: the SSH key {key} (auth.ssh_private_key) does not exist.",
                         "Point auth.ssh_private_key at the private key the machines accept.")
    idle = DEFAULT_IDLE_TIMEOUT_S.get(provider, CLOUD_IDLE_TIMEOUT_S) if idle_timeout_s is None \
        else float(idle_timeout_s)
    ray_version = version("ray")
    # dvcray's additions go into the config as written (Ray merges setup_commands into the
    # head's and workers' own when it prepares a config), with Ray's default start commands
    # filled in where the config has none, so that they get token auth too.
    base = {**raw, **{key: prepared[key] for key in ("head_start_ray_commands", "worker_start_ray_commands")}}
    launched = cfg.with_additions(base, token_path=str(records.token_path(name)),
                                  wheel_path=str(wheel.default_path()), ray_version=ray_version,
                                  dvcray_version=__version__, idle_timeout_s=idle)
    cfg.validate_with_ray(launched, source)
    provider_config = prepared["provider"]
    head_ip = str(provider_config.get("head_ip") or "") if provider == LOCAL else ""
    workers = [str(ip) for ip in provider_config.get("worker_ips") or []] if provider == LOCAL else []
    types = prepared.get("available_node_types") or {}
    head_type = prepared.get("head_node_type")
    # On-prem, Ray's one node type serves the head and the workers alike.
    min_workers = sum(int(t.get("min_workers") or 0) for n, t in types.items() if n != head_type or provider == LOCAL)
    p = Plan(config_label=config.strip(), source=str(source.resolve()), cluster_name=name, provider=provider,
             project=project, repo_root=str(repo_root), head_ip=head_ip, worker_ips=workers,
             ssh_user=str(auth.get("ssh_user") or ""), key_path=key, idle_timeout_s=idle,
             token_path=str(records.token_path(name)), wheel_path=str(wheel.default_path()),
             ray_version=ray_version, min_workers=min_workers, max_workers=int(prepared.get("max_workers") or 0),
             additions=cfg.additions_summary(launched), checks=[], config=launched)
    if probe and p.on_prem:
        p.checks = check_machines(p)
    return p


def _project(cwd: Path) -> tuple[Path, str]:
    from dvcray_cli.gitutil import git_root, root_commit

    root = git_root(Path(cwd))
    if root is None:
        raise UsageError(f"{cwd} is not inside a git repository.",
                         "Run `dvcray cluster up` from inside your project: the cluster belongs to it.")
    first = root_commit(root)
    if not first:
        raise UsageError(f"The git repository at {root} has no commit yet.",
                         "Commit once (git commit): clusters are named after the project's first commit.")
    return root, first


def check_machines(p: Plan) -> list[Check]:
    """Log in to every machine (read-only) and check the Ray version its login shell has.

    Raises:
        ClusterError: a machine is unreachable, refuses the key, or runs another Ray.
    """
    nodes = [(p.head_ip, "head")] + [(ip, "worker") for ip in p.worker_ips]
    found = ssh.probe_all(nodes, p.ssh_user, p.key_path)
    checks = []
    for probe in found:
        where = f"{probe.role} {probe.host}"
        if probe.auth_refused:
            raise ClusterError(f"The {where} refused the SSH key {p.key_path} for user {p.ssh_user!r}: "
                               f"{probe.error}", "Fix auth.ssh_user / auth.ssh_private_key, or add the key's public "
                               "half to that machine's ~/.ssh/authorized_keys. Nothing was started.")
        if not probe.reachable:
            raise ClusterError(f"Cannot reach the {where} over SSH: {probe.error}",
                               "Check the address in the config, that the machine is on and that sshd runs "
                               "there. Nothing was started.")
        if probe.ray_version and probe.ray_version != p.ray_version:
            raise ClusterError(f"The {where} runs Ray {probe.ray_version} (Python {probe.python_version}); this "
                               f"client runs Ray {p.ray_version}. Ray needs the same version on every node and "
                               "the client.", f"Install ray=={p.ray_version} there (or in setup_commands), or "
                               f"use Ray {probe.ray_version} here. Nothing was started.")
        if probe.ray_version:
            checks.append(Check(where, True, f"SSH ok, Ray {probe.ray_version}, Python {probe.python_version}"))
        else:
            checks.append(Check(where, False, "SSH ok, no Python with Ray in its login shell yet: the config's "
                                              f"setup_commands must install ray=={p.ray_version}"))
    return checks


# --------------------------------------------------------------------------- up


def up(p: Plan, say: Say = lambda _m: None) -> LauncherCluster:
    """Start the planned cluster (or update it), open the port-forward, record it,
    and for on-prem machines wait until every worker has joined.

    Raises:
        ClusterError: Ray's launcher failed (the head, with its log), the job API
            did not answer, or workers did not join (naming them and why).
    """
    from dvcray_cli.clusters.launcher import wheel

    _refuse_restart_under_runs(p)
    state.private_dir(records.folder())
    ray_api.ensure_token(Path(p.token_path))
    os.chmod(p.token_path, 0o600)
    wheel.build(Path(p.wheel_path))
    config_path = records.config_path(p.cluster_name)
    write_config(config_path, p.config)
    env = {"RAY_UP_enable_autoscaler_v2": "0"} if p.on_prem else {}
    log = records.log_path(p.cluster_name, "up")
    where = f"the head {p.head_ip}" if p.head_ip else "the head"
    say(f"Starting Ray on {where} through Ray's cluster launcher (its log: {log})...")
    try:
        launch.run("up", config_path, log, env=env, say=say)
    except ClusterError as exc:
        raise ClusterError(f"Ray's cluster launcher could not set up {where}. {exc.message}",
                           f"No worker was started. Whatever started on the head stops with: "
                           f"dvcray cluster down {p.config_label}") from None
    head_ip = p.head_ip or launch.head_ip_from(launch.run("head-ip", config_path, records.log_path(
        p.cluster_name, "head-ip"), env=env)) or ""
    if not head_ip:
        raise ClusterError("Ray's launcher started the cluster but reports no head address.",
                           f"Stop it: dvcray cluster down {p.config_label}")
    previous = records.load(p.cluster_name)
    if previous is not None:
        ssh.stop_forward(previous)
    port = procs.pick_port(None)
    known_hosts = records.known_hosts_path(p.cluster_name)
    ssh.forget_host(head_ip, known_hosts)
    record = LauncherCluster(
        name=p.cluster_name, provider=p.provider, project=p.project, config_label=p.config_label,
        config_path=str(config_path), token_path=p.token_path, dashboard_url=f"http://127.0.0.1:{port}",
        forward_port=port, forward_pid=ssh.start_forward(head_ip, p.ssh_user, p.key_path, port, known_hosts),
        head_ip=head_ip, ssh_user=p.ssh_user, key_path=str(Path(p.key_path).expanduser()), started_at=_now(),
        idle_timeout_s=p.idle_timeout_s, worker_ips=list(p.worker_ips), known_hosts=str(known_hosts))
    records.write(record)
    ssh.wait_job_api(record, 120, hint=f"Stop it: dvcray cluster down {p.config_label}")
    if p.on_prem and p.min_workers:
        wait_workers(record, p.min_workers, WORKERS_TIMEOUT_S, say)
    return record


def _refuse_restart_under_runs(p: Plan) -> None:
    """``up`` of a running cluster restarts Ray on its head (Ray's launcher always does):
    refused while dvcray runs are in progress there.

    Raises:
        UsageError: runs are in progress.
    """
    record = records.load(p.cluster_name)
    if record is None:
        return
    try:
        ssh.ensure_forward(record, records.write)
        if not ssh.head_answers(record, settle_s=2):
            return
        runs = ray_api.active_runs(ray_api.client(record.dashboard_url, record.token()),
                                   service_reach(record, records.write))
    except (ClusterError, OSError):
        return
    if runs:
        raise UsageError(f"Cluster {p.cluster_name!r} runs {len(runs)} dvcray run(s) "
                         f"({', '.join(r['run_id'] for r in runs)}): `up` would restart Ray on its head and "
                         "stop them.", "Let them finish (dvcray runs), then run `dvcray cluster up` again.")


def write_config(path: Path, data: dict[str, Any]) -> None:
    import yaml

    state.write_bytes(path, ("# Written by `dvcray cluster up`: the config as launched.\n"
                             + yaml.safe_dump(data, sort_keys=False)).encode())


def wait_workers(record: LauncherCluster, want: int, timeout: float, say: Say) -> list[str]:
    """Wait until ``want`` workers have joined; returns their addresses.

    Raises:
        ClusterError: they did not within ``timeout``: names the missing machines and
            what the head's autoscaler logged about them.
    """
    deadline = time.monotonic() + timeout
    joined: list[str] = []
    while True:
        try:
            nodes = ray_api.list_nodes(record.dashboard_url, record.token())
        except ClusterError:
            nodes = []
        now = sorted({str(n["ip"]) for n in nodes if n["alive"] and not n["is_head"]})
        for ip in now:
            if ip not in joined:
                say(f"  worker {ip} joined")
        joined = now
        if len(joined) >= want:
            return joined
        if time.monotonic() > deadline:
            missing = [ip for ip in record.worker_ips if ip not in joined] or ["(unknown)"]
            why = _autoscaler_says(record, missing)
            raise ClusterError(
                f"The head {record.head_ip} is up, but worker(s) {', '.join(missing)} did not join within "
                f"{timeout:.0f} s." + (f" The head's autoscaler logged:\n{why}" if why else ""),
                f"The cluster is up with {len(joined)} worker(s): use it, or stop it with "
                f"dvcray cluster down {record.config_label}")
        time.sleep(2)


def _autoscaler_says(record: LauncherCluster, hosts: list[str]) -> str:
    """The head's autoscaler log lines about ``hosts`` (its NodeUpdater's failures)."""
    pattern = "|".join(h.replace(".", "[.]") for h in hosts)
    command = (f"grep -h -E '{pattern}' /tmp/ray/session_latest/logs/monitor.log "
               "/tmp/ray/session_latest/logs/monitor.out 2>/dev/null | grep -v VVINFO | "
               "grep -i -E 'fail|error|dvcray|version' | tail -n 6")
    proc = ssh.run(record.head_ip, record.ssh_user, record.key_path, command, timeout=30)
    return "\n".join(launch.clean(ln) for ln in proc.stdout.splitlines() if ln.strip())


# --------------------------------------------------------------------------- down


def service_reach(record: Any, save: Callable[[Any], Any],
                  reload: Callable[[], Any] = lambda: None) -> Callable[[int], str]:
    """Where this machine reaches a port of the head of ``record`` where a runner service
    listens: through the service's port-forward (``ssh.ensure_service_forward``; ``save``
    records it, ``reload`` reads the record again), for ``ray_api.active_runs`` and
    ``service_url``."""
    return lambda port: f"http://127.0.0.1:{ssh.ensure_service_forward(record, port, save, reload)}"


def stop_runs(record: Any, yes: bool, config_label: str, save: Callable[[Any], Any] = records.write) -> list[str]:
    """dvcray runs in progress on the cluster: a reason to refuse ``down`` unless
    ``yes``, then stopped (their runners get SIGTERM and time to save). The runs of its
    runner service are asked through a port-forward of its own (``save`` records it).

    Raises:
        UsageError: runs are in progress and ``yes`` is False.
    """
    try:
        ssh.wait_job_api(record, timeout=10, reopen=False)
        client = ray_api.client(record.dashboard_url, record.token())
        runs = ray_api.active_runs(client, service_reach(record, save))
    except (ClusterError, OSError):
        return []  # the head does not answer (gone, or unreachable): down goes on
    if runs and not yes:
        ids = ", ".join(r["run_id"] for r in runs)
        raise UsageError(f"Cluster {record.name!r} has {len(runs)} run(s) in progress: {ids}.",
                         f"Let them finish, or stop them with the cluster: dvcray cluster down {config_label} --yes")
    return ray_api.stop_runs(client, runs, ray_api.stop_grace_s() + 10)


def down(config: str, cwd: Path, yes: bool = False) -> LauncherDown:
    """Stop the cluster ``config`` names: its runs (with ``yes``), Ray on every node
    (on-prem machines keep running), Ray's teardown, the port-forward, the record.

    Raises:
        UsageError: dvcray runs are in progress and ``yes`` is False.
    """
    p = plan(config, cwd, probe=False)
    record = records.load(p.cluster_name)
    result = LauncherDown(p.cluster_name, p.provider, record is not None)
    config_path = Path(record.config_path) if record is not None else records.config_path(p.cluster_name)
    if record is not None:
        result.stopped_runs = stop_runs(ssh.ensure_forward(record, records.write), yes, config)
    if not config_path.is_file():
        write_config(config_path, p.config)
    if p.on_prem:
        from dvcray_cli.clusters.launcher.provider import terminate_cluster

        result.nodes, result.unreachable = stop_machines(p, record)
        # What Ray's teardown would do next on-prem: mark the machines free in the
        # launcher's state file here (without its ``ray stop`` on the head again, and
        # without the resolved-config cache it leaves under /tmp).
        terminate_cluster(p.config["provider"], p.cluster_name)
    else:
        launch.run("down", config_path, records.log_path(p.cluster_name, "down"), what="Ray's teardown",
                   timeout=900)
    if record is not None:
        ssh.stop_forward(record)
    records.remove(p.cluster_name)
    return result


DOWN_NOW = (f"{cfg.FIND_PYTHON}\"$DVCRAY_PY\" -m {cfg.IDLE_MARKER} launcher --config ~/ray_bootstrap_config.yaml "
            "--down-now")


def stop_machines(p: Plan, record: LauncherCluster | None) -> tuple[list[str], list[str]]:
    """Ray stopped on every on-prem machine: the head stops its idle watcher and its
    workers over SSH (it reaches them, this machine may not), then itself. When the
    head cannot do it (unreachable, or dvcray never got installed), this machine
    runs ``ray stop`` on each one it reaches.

    Returns:
        ``(stopped, unreachable)`` addresses.
    """
    # What was started (the record) wins over what the YAML says now.
    head = record.head_ip if record is not None else p.head_ip
    workers = record.worker_ips if record is not None else p.worker_ips
    done = ssh.run(head, p.ssh_user, p.key_path, DOWN_NOW, timeout=300)
    if done.returncode == 0:
        lines = [ln.split("=", 1)[1] for ln in done.stdout.splitlines() if ln.startswith("dvcray-unreachable=")]
        unreachable = [ip for ln in lines for ip in ln.split(",") if ip]
        return [ip for ip in [head, *workers] if ip not in unreachable], unreachable
    from concurrent.futures import ThreadPoolExecutor

    hosts = [*workers, head]
    with ThreadPoolExecutor(max(1, len(hosts))) as pool:
        answers = list(pool.map(lambda ip: ssh.run(ip, p.ssh_user, p.key_path, "ray stop", timeout=120), hosts))
    stopped = [ip for ip, a in zip(hosts, answers) if a.returncode == 0]
    return stopped, [ip for ip, a in zip(hosts, answers) if a.returncode == 255 or a.returncode == 124]


# --------------------------------------------------------------------------- status


def status() -> list[dict[str, Any]]:
    """Every recorded launcher cluster: its nodes and runs in progress. A cluster whose
    head SSH reaches but where Ray no longer runs (its idle watcher took it down, or
    someone stopped it) is reported once as gone, and its record and forward removed."""
    entries = []
    for record in records.records():
        entry: dict[str, Any] = {
            "name": record.name, "kind": "launcher", "provider": record.provider, "config": record.config_label,
            "head_ip": record.head_ip, "worker_ips": record.worker_ips, "alive": None,
            "dashboard_url": record.dashboard_url, "started_at": record.started_at,
            "idle_timeout_s": record.idle_timeout_s, "nodes": [], "cpus": None, "runs": [], "error": None,
        }
        ssh.ensure_forward(record, records.write)
        answers = ssh.head_answers(record)
        if answers is None:
            entry["error"] = f"the head {record.head_ip} does not answer over SSH"
        elif answers is False:
            entry["alive"] = False
            entry["state"] = "gone"
            ssh.stop_forward(record)
            records.remove(record.name)
        else:
            try:
                nodes = [n for n in ray_api.list_nodes(record.dashboard_url, record.token()) if n["alive"]]
                entry.update(alive=True, nodes=nodes, cpus=sum(n["resources"].get("CPU", 0) for n in nodes))
                entry["runs"] = ray_api.active_runs(ray_api.client(record.dashboard_url, record.token()),
                                                    service_reach(record, records.write))
            except DvcrayError as exc:
                entry["error"] = exc.message
        entries.append(entry)
    return entries


# --------------------------------------------------------------------------- where runs go


def recorded_address(cwd: Path) -> str | None:
    """The job API (through its port-forward, reopened if it died) of the newest
    launcher cluster of the project around ``cwd``, in any clone of it."""
    from dvcray_cli.gitutil import git_root, root_commit

    if not any(True for _ in records.records()):
        return None
    root = git_root(Path(cwd))
    found = records.for_project(root_commit(root) if root else None)
    if not found:
        return None
    return ssh.ensure_forward(found[0], records.write).dashboard_url


def ensure_reachable(address: str) -> None:
    """Reopen the port-forward of the recorded cluster at ``address``, if it is one and it died."""
    record = records.at_address(address)
    if record is not None:
        ssh.ensure_forward(record, records.write)
        ssh.wait_job_api(record, 15, hint="Is the cluster up? dvcray cluster status")


def recorded_at(address: str) -> bool:
    return records.at_address(address) is not None


def service_url(address: str, head_port: int) -> str | None:
    """The runner service on ``head_port`` of the recorded cluster at ``address``, through
    its port-forward (``ssh.ensure_service_forward``); None when no cluster is recorded there."""
    record = records.at_address(address)
    if record is None:
        return None
    return service_reach(record, records.write, lambda: records.load(record.name))(head_port)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

