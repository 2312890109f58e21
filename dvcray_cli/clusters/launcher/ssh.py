"""SSH to a cluster's nodes: the port-forwards to the head's job API and runner service, commands on
nodes, and the read-only probe ``plan`` makes of each node before ``up``.

The dashboard and job API of every launcher cluster (AWS included) listen on the
head's 127.0.0.1 only: ``ssh -N -L 127.0.0.1:PORT:127.0.0.1:8265``, as ``ray
dashboard`` does, is how the client reaches them. A record (``LauncherCluster``,
``AwsCluster``) names the head, user, key, port and the forward's pid.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dvcray_cli import files
from dvcray_cli.clusters import procs
from dvcray_cli.errors import ClusterError

HEAD_DASHBOARD_PORT = 8265
OPTIONS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
           "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR")


def base_command(host: str, user: str, key_path: str, connect_timeout: float = 10) -> list[str]:
    return ["ssh", "-i", os.path.expanduser(key_path), *OPTIONS, "-o", f"ConnectTimeout={int(connect_timeout)}",
            f"{user}@{host}"]


def run(host: str, user: str, key_path: str, command: str, timeout: float = 120,
        connect_timeout: float = 10) -> subprocess.CompletedProcess:
    """``command`` on ``host`` in a login shell (as Ray's launcher runs commands, so the
    node's PATH and environment are the ones Ray gets)."""
    import shlex

    cmd = base_command(host, user, key_path, connect_timeout) + [f"bash --login -c {shlex.quote(command)}"]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, 124, exc.stdout or "", f"timed out after {timeout:.0f} s")


# --------------------------------------------------------------------------- the probe


PROBE = ('for p in python python3; do if "$p" -c "import ray" >/dev/null 2>&1; then '
         '"$p" -c "import ray, sys; print(\'dvcray-probe ray=\' + ray.__version__ + \' python=\' + '
         'sys.version.split()[0])"; exit 0; fi; done; echo "dvcray-probe ray= python="')


@dataclass
class Probe:
    """What a node said to the probe (or why it could not be asked)."""

    host: str
    role: str                  # "head" or "worker"
    reachable: bool
    error: str = ""            # why not, in words
    auth_refused: bool = False
    ray_version: str = ""      # "" when no Python there imports ray
    python_version: str = ""


def probe(host: str, role: str, user: str, key_path: str, timeout: float = 60) -> Probe:
    """Log in to ``host`` and ask which Ray and Python its login shell has. Read-only."""
    proc = run(host, user, key_path, PROBE, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("dvcray-probe ")), None)
    if line is None:
        text = (proc.stderr or proc.stdout).strip().splitlines()
        reason = text[-1] if text else f"ssh exited {proc.returncode}"
        refused = "Permission denied" in (proc.stderr or "") or "publickey" in (proc.stderr or "")
        return Probe(host, role, False, reason, auth_refused=refused)
    fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
    return Probe(host, role, True, ray_version=fields.get("ray", ""), python_version=fields.get("python", ""))


def probe_all(nodes: list[tuple[str, str]], user: str, key_path: str) -> list[Probe]:
    """``probe`` each ``(host, role)`` at once."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(16, len(nodes)))) as pool:
        return list(pool.map(lambda n: probe(n[0], n[1], user, key_path), nodes))


# --------------------------------------------------------------------------- the port-forward


def known_hosts_file(record_known_hosts: str = "") -> Path:
    """Where a head's SSH host key is pinned: the record's file, else ``~/.dvcray/known_hosts``."""
    return Path(record_known_hosts) if record_known_hosts else files.home() / "known_hosts"


def forward_command(head_ip: str, ssh_user: str, key_path: str, port: int, known_hosts: Path,
                    remote_port: int = HEAD_DASHBOARD_PORT) -> list[str]:
    """``ssh -N -L 127.0.0.1:PORT:127.0.0.1:REMOTE_PORT``, as ``ray dashboard`` does: the
    job API (8265) and the runner service listen on the head's 127.0.0.1 and are never
    open to the network. The token travels through this tunnel, so the head's host key
    is pinned on first contact (``accept-new``) and checked on every later one."""
    return ["ssh", "-N", "-i", os.path.expanduser(key_path),
            "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
            "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=30", "-o", "ConnectTimeout=15",
            "-L", f"127.0.0.1:{port}:127.0.0.1:{remote_port}", f"{ssh_user}@{head_ip}"]


def start_forward(head_ip: str, ssh_user: str, key_path: str, port: int, known_hosts: Path | None = None,
                  remote_port: int = HEAD_DASHBOARD_PORT, log: Path | None = None) -> int:
    """Start the port-forward of the head's ``remote_port`` in the background (ssh's
    errors to ``log``, if given); returns its pid."""
    known_hosts = known_hosts or known_hosts_file()
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") if log is not None else open(os.devnull, "wb") as errors:
        proc = subprocess.Popen(forward_command(head_ip, ssh_user, key_path, port, known_hosts, remote_port),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=errors, start_new_session=True)
    return proc.pid


def forget_host(head_ip: str, known_hosts: Path) -> None:
    """Drop a pinned key for ``head_ip``: a freshly started head may be a new machine
    with a new key at an address an old one had (``up`` calls this, nothing else)."""
    if known_hosts.exists():
        subprocess.run(["ssh-keygen", "-R", head_ip, "-f", os.fspath(known_hosts)], capture_output=True)


def _reopen(record: Any) -> int:
    return start_forward(record.head_ip, record.ssh_user, record.key_path, record.forward_port,
                         known_hosts_file(getattr(record, "known_hosts", "")))


def _marker(local_port: int, remote_port: int | None = None) -> str:
    return f"127.0.0.1:{local_port}:" + (f"127.0.0.1:{remote_port}" if remote_port else "")


def _alive(pid: int, marker: str) -> bool:
    cmdline = procs.cmdline(pid) if pid else ""
    return "ssh" in cmdline and marker in cmdline


def forward_alive(record: Any) -> bool:
    """The recorded ssh process runs and forwards the recorded port."""
    return _alive(record.forward_pid, _marker(record.forward_port))


def stop_forward(record: Any) -> None:
    """Stop the record's port-forwards: the job API's, the runner service's if it has one,
    and any other this machine runs to the cluster's head (one whose record was lost to
    two clients writing it at once): ``up``, ``down`` and a cluster found gone call this."""
    if forward_alive(record):
        procs.stop_pid(record.forward_pid, _marker(record.forward_port), timeout=2)
    stop_service_forward(record)
    for pid, marker in _forwards_to(record):
        procs.stop_pid(pid, marker, timeout=2)


def _forwards_to(record: Any) -> list[tuple[int, str]]:
    """``(pid, marker)`` of every ``forward_command`` ssh to the head of ``record``: its
    user, head and pinned host-key file name the cluster."""
    pinned = f"UserKnownHostsFile={known_hosts_file(getattr(record, 'known_hosts', ''))}"
    target = f"{record.ssh_user}@{record.head_ip}"
    found = []
    for proc in procs.process_iter():
        args = list(proc.info.get("cmdline") or [])
        if args[:2] == ["ssh", "-N"] and pinned in args and args[-1] == target and "-L" in args:
            found.append((proc.pid, pinned))
    return found


def ensure_forward(record: Any, save: Callable[[Any], Any]) -> Any:
    """Reopen the port-forward when it died (the laptop slept, the network changed);
    ``save`` writes the record with its new pid."""
    if forward_alive(record):
        return record
    record.forward_pid = _reopen(record)
    save(record)
    return record


# The runner service (``dvcray_cli.service``) listens on the head's 127.0.0.1 too, on a
# port it picks: a forward of its own, recorded (``service_port``, ``service_forward_port``,
# ``service_forward_pid``) so later clients reuse it, stopped with the cluster's.


def service_forward_alive(record: Any) -> bool:
    """The record's forward to the runner service runs and forwards what the record says."""
    port, local = getattr(record, "service_port", 0), getattr(record, "service_forward_port", 0)
    return bool(port and local) and _alive(getattr(record, "service_forward_pid", 0), _marker(local, port))


def stop_service_forward(record: Any) -> None:
    if service_forward_alive(record):
        procs.stop_pid(record.service_forward_pid, _marker(record.service_forward_port, record.service_port),
                       timeout=2)


def ensure_service_forward(record: Any, head_port: int, save: Callable[[Any], Any],
                           reload: Callable[[], Any] = lambda: None, timeout: float = 60.0) -> int:
    """The local port of a forward to the head's ``head_port`` (where its runner service
    listens): the recorded one while it runs, else one opened now (on the recorded local
    port when it is free) and recorded with ``save``. ``reload`` reads the record again
    under the lock: another client may have opened it meanwhile. An ssh that exits before
    it listens is started again, up to three times within ``timeout``.

    Raises:
        ClusterError: ssh did not open the forward (with ssh's last error).
    """
    import fcntl

    known_hosts = known_hosts_file(getattr(record, "known_hosts", ""))
    log = Path(f"{known_hosts}.forward.log")
    files.private_dir(files.home())
    deadline = time.monotonic() + timeout
    with open(files.home() / "service-forwards.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fresh = reload() or record
        if fresh.service_port == head_port and service_forward_alive(fresh):
            record.service_port, record.service_forward_port = fresh.service_port, fresh.service_forward_port
            record.service_forward_pid = fresh.service_forward_pid
            return record.service_forward_port
        stop_service_forward(fresh)
        if fresh is not record:
            stop_service_forward(record)
        for attempt in range(3):
            local = procs.pick_port(fresh.service_forward_port or None if attempt == 0 else None)
            log.unlink(missing_ok=True)
            pid = start_forward(record.head_ip, record.ssh_user, record.key_path, local, known_hosts,
                                remote_port=head_port, log=log)
            for each in {id(fresh): fresh, id(record): record}.values():
                each.service_port, each.service_forward_port, each.service_forward_pid = head_port, local, pid
            save(fresh)
            while time.monotonic() < deadline and _alive(pid, _marker(local, head_port)):
                if _listening(local):
                    return local
                time.sleep(0.1)
            if time.monotonic() >= deadline:
                break
    stop_service_forward(record)
    said = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    raise ClusterError(f"The port-forward to the runner service on the head {record.head_ip} (its port {head_port}) "
                       f"did not open{': ' + said[-1] if said else ''}.", "Is the cluster up? dvcray cluster status")


def _listening(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_job_api(record: Any, timeout: float, reopen: bool = True, hint: str = "") -> None:
    """Wait until the head's job API answers through the forward (reopened when it dies).

    Raises:
        ClusterError: it did not answer within ``timeout``.
    """
    import requests

    token = record.token()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{record.dashboard_url}/api/version",
                             headers={"Authorization": f"Bearer {token}"}, timeout=5)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        if not forward_alive(record):
            if not reopen:
                break
            time.sleep(2)
            record.forward_pid = _reopen(record)
        time.sleep(1)
    raise ClusterError(f"The head's job API did not answer through the port-forward at {record.dashboard_url} "
                       f"(head {record.head_ip}).", hint or f"Look at the head: ray attach {record.config_path}")


def head_answers(record: Any, settle_s: float = 3.0) -> bool | None:
    """Whether Ray's job API answers on the head: True; False when SSH reaches the
    head but nothing listens there (Ray is not running); None when SSH does not
    reach the head at all."""
    import requests

    deadline = time.monotonic() + settle_s
    while True:
        try:
            requests.get(f"{record.dashboard_url}/api/version", timeout=5)
            return True
        except requests.RequestException:
            pass
        if time.monotonic() >= deadline:
            return False if forward_alive(record) else None
        time.sleep(0.5)
