"""``up``, ``down`` and ``status`` of a launcher cluster.

- ``up``: the token and the wheel on this machine, Ray's ``create_or_update_cluster``
  in a process of its own (``launch``), the SSH port-forward to the head's job API,
  the record (``records``), and for on-prem machines a wait until every worker joined.
- ``down``: stop dvcray runs (with ``--yes``); on-prem, Ray on every node (the head
  stops its workers over SSH, then itself: ``idle launcher --down-now``) and the
  machines marked free in Ray's state file; elsewhere Ray's teardown; the forward
  and the record.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dvcray_cli import ray_api, files
from dvcray_cli.clusters.common import Say, quiet, utc_now
from dvcray_cli.clusters.launcher import config as cfg, launch, records, ssh
from dvcray_cli.clusters.launcher.planning import LauncherPlan, plan
from dvcray_cli.clusters.launcher.reach import service_reach
from dvcray_cli.clusters.launcher.records import LauncherCluster
from dvcray_cli.errors import ClusterError, DvcrayError, UsageError

# How long `up` waits for on-prem workers to join (each runs the setup commands first).
WORKERS_TIMEOUT_S = float(os.environ.get("DVCRAY_WORKERS_TIMEOUT_S", "600"))


@dataclass
class LauncherDown:
    """What ``down`` did."""

    name: str
    provider: str
    recorded: bool
    stopped_runs: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)        # where Ray was stopped
    unreachable: list[str] = field(default_factory=list)  # nodes SSH did not reach


# --------------------------------------------------------------------------- up


def up(p: LauncherPlan, say: Say = quiet) -> LauncherCluster:
    """Start the planned cluster (or update it), open the port-forward, record it,
    and for on-prem machines wait until every worker has joined.

    Raises:
        ClusterError: Ray's launcher failed (the head, with its log), the job API
            did not answer, or workers did not join (naming them and why).
    """
    from dvcray_cli.clusters.launcher import wheel

    _refuse_restart_under_runs(p)
    files.private_dir(records.folder())
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
    known_hosts = records.known_hosts_path(p.cluster_name)
    if not p.on_prem:
        # A cloud's head may be a new machine with a new key at an old address. An on-prem
        # head is a fixed machine: its pinned key holds, and a changed one is refused.
        ssh.forget_host(head_ip, known_hosts)
    pid, port = ssh.open_forward(head_ip, p.ssh_user, p.key_path, known_hosts, timeout=120)
    record = LauncherCluster(
        name=p.cluster_name, provider=p.provider, project=p.project, config_label=p.config_label,
        config_path=str(config_path), token_path=p.token_path, dashboard_url=f"http://127.0.0.1:{port}",
        forward_port=port, forward_pid=pid,
        head_ip=head_ip, ssh_user=p.ssh_user, key_path=str(Path(p.key_path).expanduser()), started_at=utc_now(),
        idle_timeout_s=p.idle_timeout_s, worker_ips=list(p.worker_ips), known_hosts=str(known_hosts))
    records.write(record)
    ssh.wait_job_api(record, 120, hint=f"Stop it: dvcray cluster down {p.config_label}")
    if p.on_prem and p.min_workers:
        wait_workers(record, p.min_workers, WORKERS_TIMEOUT_S, say)
    return record


def _refuse_restart_under_runs(p: LauncherPlan) -> None:
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
        runs = ray_api.active_runs(ray_api.client(record.api_url, record.token()),
                                   service_reach(record, records.write))
    except (ClusterError, OSError):
        return
    if runs:
        raise UsageError(f"Cluster {p.cluster_name!r} runs {len(runs)} dvcray run(s) "
                         f"({', '.join(r['run_id'] for r in runs)}): `up` would restart Ray on its head and "
                         "stop them.", "Let them finish (dvcray runs), then run `dvcray cluster up` again.")


def write_config(path: Path, data: dict[str, Any]) -> None:
    import yaml

    files.write_bytes(path, ("# Written by `dvcray cluster up`: the config as launched.\n"
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
            nodes = ray_api.list_nodes(record.api_url, record.token())
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
    proc = ssh.run(record.head_ip, record.ssh_user, record.key_path, command, Path(record.known_hosts), timeout=30)
    return "\n".join(launch.clean(ln) for ln in proc.stdout.splitlines() if ln.strip())


# --------------------------------------------------------------------------- down


def stop_runs(record: Any, yes: bool, config_label: str, save: Callable[[Any], Any] = records.write) -> list[str]:
    """dvcray runs in progress on the cluster: a reason to refuse ``down`` unless
    ``yes``, then stopped (their runners get SIGTERM and time to save). The runs of its
    runner service are asked through a port-forward of its own (``save`` records it).

    Raises:
        UsageError: runs are in progress and ``yes`` is False.
    """
    try:
        ssh.wait_job_api(record, timeout=10, reopen=False)
        client = ray_api.client(record.api_url, record.token())
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
        try:
            opened = ssh.ensure_forward(record, records.write)
        except ssh.HostKeyChanged:
            raise
        except ClusterError:
            opened = None  # the head does not answer: down goes on
        if opened is not None:
            result.stopped_runs = stop_runs(opened, yes, config)
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


def stop_machines(p: LauncherPlan, record: LauncherCluster | None) -> tuple[list[str], list[str]]:
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
    known_hosts = records.known_hosts_path(p.cluster_name)
    done = ssh.run(head, p.ssh_user, p.key_path, DOWN_NOW, known_hosts, timeout=300)
    if done.returncode == 0:
        lines = [ln.split("=", 1)[1] for ln in done.stdout.splitlines() if ln.startswith("dvcray-unreachable=")]
        unreachable = [ip for ln in lines for ip in ln.split(",") if ip]
        return [ip for ip in [head, *workers] if ip not in unreachable], unreachable
    from concurrent.futures import ThreadPoolExecutor

    hosts = [*workers, head]
    with ThreadPoolExecutor(max(1, len(hosts))) as pool:
        answers = list(pool.map(lambda ip: ssh.run(ip, p.ssh_user, p.key_path, "ray stop", known_hosts, timeout=120),
                                hosts))
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
            "dashboard_url": record.api_url, "started_at": record.started_at,
            "idle_timeout_s": record.idle_timeout_s, "nodes": [], "cpus": None, "runs": [], "error": None,
        }
        try:
            ssh.ensure_forward(record, records.write)
        except ssh.HostKeyChanged as exc:
            entry["error"] = f"{exc.message} {exc.hint}"
            entries.append(entry)
            continue
        except ClusterError:
            pass  # head_answers tells what reaches the head
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
                nodes = [n for n in ray_api.list_nodes(record.api_url, record.token()) if n["alive"]]
                entry.update(alive=True, nodes=nodes, cpus=sum(n["resources"].get("CPU", 0) for n in nodes))
                entry["runs"] = ray_api.active_runs(ray_api.client(record.api_url, record.token()),
                                                    service_reach(record, records.write))
            except DvcrayError as exc:
                entry["error"] = exc.message
        entries.append(entry)
    return entries
