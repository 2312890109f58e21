"""SSH to a cluster's nodes: the port-forwards to the head's job API and runner service, commands on
nodes, and the read-only probe ``plan`` makes of each node before ``up``.

The dashboard and job API of every launcher cluster (AWS included) listen on the
head's 127.0.0.1 only: ``ssh -N -L 127.0.0.1:PORT:127.0.0.1:8265``, as ``ray
dashboard`` does, is how the client reaches them. A record (``LauncherCluster``,
``AwsCluster``) names the head, user, key, port and the forward's pid.

Every ssh dvcray runs checks the nodes' host keys against the cluster's own known_hosts
file (pinned on first contact), and a forward counts only once the ssh dvcray started
is itself what listens on its port: after a laptop's sleep another local user may hold
the port a forward had, and would get the token (issue 20, points 5 and 6).
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
OPTIONS = ("-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR")
KEY_CHANGED = "Host key verification failed"


def pinned(known_hosts: Path) -> tuple[str, ...]:
    """Options that check host keys against ``known_hosts``, pinning a key on first contact."""
    files.private_dir(known_hosts.parent)
    return ("-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={known_hosts}")


def base_command(host: str, user: str, key_path: str, known_hosts: Path, connect_timeout: float = 10) -> list[str]:
    return ["ssh", "-i", os.path.expanduser(key_path), *pinned(known_hosts), *OPTIONS,
            "-o", f"ConnectTimeout={int(connect_timeout)}", f"{user}@{host}"]


class HostKeyChanged(ClusterError):
    """A node's SSH host key is not the one pinned for the cluster: nothing goes to it."""


def key_changed(host: str, known_hosts: Path, said: str) -> HostKeyChanged | None:
    """The error for ssh's ``said`` when ``host``'s key is not the one pinned; else None."""
    if KEY_CHANGED not in said and "REMOTE HOST IDENTIFICATION HAS CHANGED" not in said:
        return None
    return HostKeyChanged(f"The SSH host key of {host} is not the one dvcray pinned for this cluster in {known_hosts}: "
                        "someone may stand in for the machine, so nothing was sent to it.",
                        f"If the machine or its keys were replaced on purpose, accept the new key knowingly: "
                        f"ssh-keygen -R {host} -f {known_hosts}, then rerun.")


def run(host: str, user: str, key_path: str, command: str, known_hosts: Path, timeout: float = 120,
        connect_timeout: float = 10) -> subprocess.CompletedProcess:
    """``command`` on ``host`` in a login shell (as Ray's launcher runs commands, so the
    node's PATH and environment are the ones Ray gets); its host key checked against the
    cluster's ``known_hosts``."""
    import shlex

    cmd = base_command(host, user, key_path, known_hosts, connect_timeout) + \
        [f"bash --login -c {shlex.quote(command)}"]
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


def probe(host: str, role: str, user: str, key_path: str, known_hosts: Path, timeout: float = 60) -> Probe:
    """Log in to ``host`` and ask which Ray and Python its login shell has. Read-only.

    Raises:
        ClusterError: its host key is not the one pinned in ``known_hosts``.
    """
    proc = run(host, user, key_path, PROBE, known_hosts, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("dvcray-probe ")), None)
    if line is None:
        changed = key_changed(host, known_hosts, proc.stderr or "")
        if changed is not None:
            raise changed
        text = (proc.stderr or proc.stdout).strip().splitlines()
        reason = text[-1] if text else f"ssh exited {proc.returncode}"
        refused = "Permission denied" in (proc.stderr or "") or "publickey" in (proc.stderr or "")
        return Probe(host, role, False, reason, auth_refused=refused)
    fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
    return Probe(host, role, True, ray_version=fields.get("ray", ""), python_version=fields.get("python", ""))


def probe_all(nodes: list[tuple[str, str]], user: str, key_path: str, known_hosts: Path) -> list[Probe]:
    """``probe`` each ``(host, role)`` at once.

    Raises:
        ClusterError: a node's host key is not the one pinned.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(16, len(nodes)))) as pool:
        return list(pool.map(lambda n: probe(n[0], n[1], user, key_path, known_hosts), nodes))


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
    errors to ``log``, if given); returns its pid. Nothing listens for it yet: ``open_forward``
    waits until this very ssh does."""
    known_hosts = known_hosts or known_hosts_file()
    files.private_dir(known_hosts.parent)
    with open(log, "ab") if log is not None else open(os.devnull, "wb") as errors:
        proc = subprocess.Popen(forward_command(head_ip, ssh_user, key_path, port, known_hosts, remote_port),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=errors, start_new_session=True)
    return proc.pid


def listens(pid: int, port: int) -> bool:
    """Process ``pid`` itself listens on this machine's 127.0.0.1:``port``: a connection there
    reaches it, and no one else (another user cannot share a port it holds)."""
    import psutil

    try:
        sockets = psutil.Process(pid).net_connections(kind="tcp4")
    except (psutil.Error, OSError):
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.ip == "127.0.0.1" and c.laddr.port == port
               for c in sockets)


def open_forward(head_ip: str, ssh_user: str, key_path: str, known_hosts: Path, remote_port: int = HEAD_DASHBOARD_PORT,
                 prefer: int | None = None, timeout: float = 60.0, log: Path | None = None) -> tuple[int, int]:
    """A forward of the head's ``remote_port`` to a port of this machine's 127.0.0.1: ``prefer``
    when it is free, else a fresh one. It counts once the ssh started here itself listens on
    it (``listens``): a port someone else took meanwhile is never used. An ssh that ends
    before it listens is started again (on a fresh port), three times at most.

    Returns:
        ``(pid, port)``.

    Raises:
        ClusterError: ssh did not open it (the head's host key changed, it is unreachable...).
    """
    log = log or Path(f"{known_hosts}.forward-{remote_port}.log")
    files.private_dir(log.parent)
    deadline = time.monotonic() + timeout
    for attempt in range(3):
        port = procs.pick_port(prefer if attempt == 0 else None)
        log.unlink(missing_ok=True)
        pid = start_forward(head_ip, ssh_user, key_path, port, known_hosts, remote_port, log)
        while time.monotonic() < deadline and _running(pid):
            if listens(pid, port):
                return pid, port
            time.sleep(0.1)
        procs.stop_pid(pid, _marker(port, remote_port), timeout=2)
        said = log.read_text(errors="replace") if log.exists() else ""
        changed = key_changed(head_ip, known_hosts, said)
        if changed is not None:
            raise changed
        if time.monotonic() >= deadline:
            break
    lines = said.strip().splitlines()
    raise ClusterError(f"The port-forward to port {remote_port} of the head {head_ip} did not open"
                       f"{': ' + lines[-1] if lines else ''}.", "Is the cluster up? dvcray cluster status")


def forget_host(head_ip: str, known_hosts: Path) -> None:
    """Drop a pinned key for ``head_ip``: a cloud's freshly started head is a new machine
    with a new key at an address an old one may have had (``up`` of a cloud cluster calls
    this; an on-prem head keeps its pin)."""
    if known_hosts.exists():
        subprocess.run(["ssh-keygen", "-R", head_ip, "-f", os.fspath(known_hosts)], capture_output=True)


def _marker(local_port: int, remote_port: int | None = None) -> str:
    return f"127.0.0.1:{local_port}:" + (f"127.0.0.1:{remote_port}" if remote_port else "")


def _running(pid: int) -> bool:
    """This process's own child ``pid`` (an ssh ``start_forward`` just started) has not exited.
    Not read from /proc: right after ``Popen`` returns, the new program's command line may not
    be set up yet (exec does that after the parent goes on), and a loaded machine widens that."""
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return False


def _alive(pid: int, marker: str) -> bool:
    cmdline = procs.cmdline(pid) if pid else ""
    return "ssh" in cmdline and marker in cmdline


def forward_alive(record: Any) -> bool:
    """The recorded ssh process runs, forwards the recorded port, and is what listens there."""
    return _alive(record.forward_pid, _marker(record.forward_port)) and listens(record.forward_pid,
                                                                                  record.forward_port)


def stop_forward(record: Any) -> None:
    """Stop the record's port-forwards: the job API's, the runner service's if it has one,
    and any other this machine runs to the cluster's head (one whose record was lost to
    two clients writing it at once): ``up``, ``down`` and a cluster found gone call this."""
    if _alive(record.forward_pid, _marker(record.forward_port)):
        procs.stop_pid(record.forward_pid, _marker(record.forward_port), timeout=2)
    stop_service_forward(record)
    for pid, marker in _forwards_to(record):
        procs.stop_pid(pid, marker, timeout=2)


def _forwards_to(record: Any) -> list[tuple[int, str]]:
    """``(pid, marker)`` of every ``forward_command`` ssh to the head of ``record``: its
    user, head and pinned host-key file name the cluster."""
    pinned_file = f"UserKnownHostsFile={known_hosts_file(getattr(record, 'known_hosts', ''))}"
    target = f"{record.ssh_user}@{record.head_ip}"
    found = []
    for proc in procs.process_iter():
        args = list(proc.info.get("cmdline") or [])
        if args[:2] == ["ssh", "-N"] and pinned_file in args and args[-1] == target and "-L" in args:
            found.append((proc.pid, pinned_file))
    return found


def ensure_forward(record: Any, save: Callable[[Any], Any]) -> Any:
    """Reopen the port-forward when it died (the laptop slept, the network changed): on the
    port it had when that is still free, else on a fresh one (``open_forward``: never a port
    someone else holds); ``save`` writes the record with its new pid and port. The record's
    address (``dashboard_url``) stays; ``api_url`` is where its job API answers now.

    Raises:
        ClusterError: the forward did not open (the host key changed, the head is gone...).
    """
    if forward_alive(record):
        return record
    if _alive(record.forward_pid, _marker(record.forward_port)):
        procs.stop_pid(record.forward_pid, _marker(record.forward_port), timeout=2)
    record.forward_pid, record.forward_port = open_forward(
        record.head_ip, record.ssh_user, record.key_path, known_hosts_file(getattr(record, "known_hosts", "")),
        prefer=record.forward_port, timeout=30)
    save(record)
    return record


# The runner service (``dvcray_cli.service``) listens on the head's 127.0.0.1 too, on a
# port it picks: a forward of its own, recorded (``service_port``, ``service_forward_port``,
# ``service_forward_pid``) so later clients reuse it, stopped with the cluster's.


def service_forward_alive(record: Any) -> bool:
    """The record's forward to the runner service runs, forwards what the record says, and is
    what listens on its port."""
    port, local = getattr(record, "service_port", 0), getattr(record, "service_forward_port", 0)
    pid = getattr(record, "service_forward_pid", 0)
    return bool(port and local) and _alive(pid, _marker(local, port)) and listens(pid, local)


def stop_service_forward(record: Any) -> None:
    port, local = getattr(record, "service_port", 0), getattr(record, "service_forward_port", 0)
    if port and local and _alive(getattr(record, "service_forward_pid", 0), _marker(local, port)):
        procs.stop_pid(record.service_forward_pid, _marker(local, port), timeout=2)


def ensure_service_forward(record: Any, head_port: int, save: Callable[[Any], Any],
                           reload: Callable[[], Any] = lambda: None, timeout: float = 60.0) -> int:
    """The local port of a forward to the head's ``head_port`` (where its runner service
    listens): the recorded one while its ssh runs and listens there, else one opened now
    (``open_forward``: on the recorded local port when it is free) and recorded with
    ``save``. ``reload`` reads the record again under the lock: another client may have
    opened it meanwhile.

    Raises:
        ClusterError: ssh did not open the forward (with ssh's last error).
    """
    import fcntl

    known_hosts = known_hosts_file(getattr(record, "known_hosts", ""))
    files.private_dir(files.home())
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
        try:
            pid, local = open_forward(record.head_ip, record.ssh_user, record.key_path, known_hosts, head_port,
                                      prefer=fresh.service_forward_port or None, timeout=timeout,
                                      log=Path(f"{known_hosts}.forward.log"))
        except HostKeyChanged:
            raise
        except ClusterError as exc:
            raise ClusterError(f"The port-forward to the runner service on the head {record.head_ip} (its port "
                               f"{head_port}) did not open: {exc.message}", exc.hint) from None
        for each in {id(fresh): fresh, id(record): record}.values():
            each.service_port, each.service_forward_port, each.service_forward_pid = head_port, local, pid
        save(fresh)
        return local


def wait_job_api(record: Any, timeout: float, reopen: bool = True, hint: str = "") -> None:
    """Wait until the head's job API answers through the forward (reopened when it dies).

    Raises:
        ClusterError: it did not answer within ``timeout``, or the forward could not be
            reopened (the head's host key changed).
    """
    import requests

    token = record.token()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not forward_alive(record):
            if not reopen:
                break
            time.sleep(2)
            try:
                record.forward_pid, record.forward_port = open_forward(
                    record.head_ip, record.ssh_user, record.key_path,
                    known_hosts_file(getattr(record, "known_hosts", "")), prefer=record.forward_port,
                    timeout=max(1.0, deadline - time.monotonic()))
            except HostKeyChanged:
                raise
            except ClusterError:
                continue
        try:
            # Only to this very ssh's port (``forward_alive`` checked who listens there).
            r = requests.get(f"{record.api_url}/api/version",
                             headers={"Authorization": f"Bearer {token}"}, timeout=5)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise ClusterError(f"The head's job API did not answer through the port-forward at {record.api_url} "
                       f"(head {record.head_ip}).", hint or f"Look at the head: ray attach {record.config_path}")


def head_answers(record: Any, settle_s: float = 3.0) -> bool | None:
    """Whether Ray's job API answers on the head: True; False when SSH reaches the
    head but nothing listens there (Ray is not running); None when SSH does not
    reach the head at all."""
    import requests

    deadline = time.monotonic() + settle_s
    while True:
        if forward_alive(record):
            try:
                requests.get(f"{record.api_url}/api/version", timeout=5)
                return True
            except requests.RequestException:
                pass
        if time.monotonic() >= deadline:
            return False if forward_alive(record) else None
        time.sleep(0.5)
