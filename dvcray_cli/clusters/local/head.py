"""Starting a Ray head on this machine: ``ray start --head`` with its own ``--temp-dir``,
token authentication on, the dashboard and job API on 127.0.0.1, then a wait until
the job API answers and refuses a request without the token.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from dvcray_cli import __version__, ray_api
from dvcray_cli.clusters import procs
from dvcray_cli.clusters.common import VERSION_LABEL, utc_now
from dvcray_cli.clusters.local.environment import head_environment
from dvcray_cli.clusters.local.multinode import head_type_cpus, resolve_autoscaling_config
from dvcray_cli.clusters.local.registry import LocalCluster, default_temp_dir
from dvcray_cli.errors import ClusterError

DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
START_TIMEOUT_S = 120.0


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
        env: variables set on purpose for the head's processes (and so for its jobs),
            over what it keeps of this one's (``environment.head_environment``).
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
    # Built from an allowlist, never the whole environment of this shell (environment.py).
    head_env = head_environment(os.environ, token_file, env)
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
            num_cpus = head_type_cpus(resolved_config)
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
                               str(token_file), utc_now(), num_cpus, session_id)
        partial.stop(timeout=5)
        if re.search(r"already (in use|running|occupied)|Address already in use|is already running", text) \
                and not (gcs_port and dashboard_port):
            raise _PortClash()
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise ClusterError(f"`ray start` failed (exit {rc}). Output: {start_log}; logs: {logs}\n{tail}",
                           "Look at the logs named above; `dvcray cluster up` again once fixed.")

    gcs_address = _bootstrap_address(temp) or f"127.0.0.1:{gcs}"
    cluster = LocalCluster(name=name, gcs_address=gcs_address, dashboard_url=f"http://127.0.0.1:{dash}",
                           temp_dir=str(temp), token_path=str(token_file), started_at=utc_now(),
                           num_cpus=num_cpus, session_id=session_id,
                           autoscaling_config=str(resolved_config) if resolved_config else None)
    try:
        _wait_for_job_api(cluster, timeout, logs)
        cluster.num_cpus = _head_cpus(cluster, default=num_cpus)
    except BaseException:
        cluster.stop(timeout=5)
        raise
    return cluster


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
