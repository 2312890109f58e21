"""Free ports, and finding and stopping processes by pid.

Several Ray clusters may run on one machine at once (other users, other
checkouts, tests), so a cluster is only ever stopped by the pids that belong to
it, never with ``ray stop``, which kills every Ray on the machine. What belongs
to a cluster: the processes that name its Ray temp dir, those in the Unix
session its ``ray start`` ran in, the descendants of both, and its Ray Jobs'
processes (found by the environment Ray gave them).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dvcray_cli.errors import ClusterError

if TYPE_CHECKING:  # pragma: no cover
    import psutil


# --------------------------------------------------------------------------- ports


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def pick_port(preferred: int | None = None, taken: set[int] = frozenset()) -> int:
    """``preferred`` when it is free and not ``taken``, else a free port the kernel picks."""
    if preferred and preferred not in taken and port_free(preferred):
        return preferred
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


# --------------------------------------------------------------------------- one pid


def cmdline(pid: int) -> str:
    """The command line of ``pid`` as one string, "" when it is gone (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else ""
    return "" if state == "Z" else raw.replace(b"\0", b" ").decode(errors="replace")


def is_ours(pid: int, marker: str) -> bool:
    """``pid`` runs and its command line holds ``marker`` (pids get recycled: never
    signal a stranger)."""
    return bool(pid) and marker in cmdline(pid)


def stop_pid(pid: int, marker: str, timeout: float = 5.0) -> None:
    """SIGTERM ``pid`` if it is still ours (``is_ours``), SIGKILL after ``timeout``."""
    if not is_ours(pid, marker):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while is_ours(pid, marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if is_ours(pid, marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- a cluster's processes


def process_iter() -> list[psutil.Process]:
    import psutil

    return list(psutil.process_iter(["pid", "cmdline"]))


def _names_dir(temp_dir: str) -> re.Pattern[str]:
    # The temp dir as a whole path component: /tmp/dvcray-local-ab12 must not match
    # /tmp/dvcray-local-ab123.
    return re.compile(re.escape(temp_dir.rstrip("/")) + r"(?=/|\s|$|['\",])")


def core_pids(temp_dir: str, session_id: int = 0, procs: list | None = None) -> set[int]:
    """A cluster's core processes: those that name its temp dir, and those in its session.

    The session is the one ``ray start`` ran in (``start_new_session``): GCS,
    raylet, dashboard, monitor, client server and their helpers. It counts only
    while some process that names the temp dir is in it, so a recycled session id
    never matches strangers.
    """
    import psutil

    procs = process_iter() if procs is None else procs
    match = _names_dir(temp_dir)
    core: set[int] = set()
    for p in procs:
        cmd = " ".join(p.info.get("cmdline") or [])
        if cmd and match.search(cmd):
            core.add(p.info["pid"])
    if session_id and core:
        in_session = set()
        for p in procs:
            try:
                if os.getsid(p.info["pid"]) == session_id:
                    in_session.add(p.info["pid"])
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        if in_session & core:
            core |= in_session
    return core


def job_pids(gcs_address: str, procs: list | None = None) -> set[int]:
    """Processes of a cluster's Ray Jobs, by their environment: Ray gives a job's
    entrypoint ``RAY_JOB_CONFIG_JSON_ENV_VAR`` and ``RAY_ADDRESS`` (this cluster's
    GCS), and its children inherit both. Both are needed: a user's shell may
    well export ``RAY_ADDRESS``, but only Ray's jobs carry the job config. This
    finds a job's entrypoint whose supervisor died with its raylet (a node that
    died): it is no one's descendant any more."""
    if not gcs_address or gcs_address.endswith(":0"):
        return set()
    procs = process_iter() if procs is None else procs
    address = f"RAY_ADDRESS={gcs_address}\0".encode()
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


def cluster_pids(temp_dir: str, session_id: int = 0, gcs_address: str = "") -> list[int]:
    """Every live process of a cluster: its core processes, its jobs' processes,
    and all their descendants.

    Workers rename themselves (``ray::IDLE``, ``ray::JobSupervisor``) and a job's
    entrypoint runs in a session of its own, so descendants are found through the
    process tree, not by name. Processes of other Ray clusters never match: they
    name another temp dir and run in another session.
    """
    import psutil

    procs = process_iter()
    found = core_pids(temp_dir, session_id, procs) | job_pids(gcs_address, procs)
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


def gcs_running(temp_dir: str, session_id: int = 0) -> bool:
    """The cluster's GCS process runs (a head without its GCS is gone, whatever is left)."""
    import psutil

    for pid in core_pids(temp_dir, session_id):
        try:
            p = psutil.Process(pid)
            if p.name() == "gcs_server" and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            continue
    return False


def named_running(pids: set[int] | list[int], suffix: str) -> bool:
    """Some process among ``pids`` has an argument ending in ``suffix`` (e.g. Ray's monitor.py)."""
    import psutil

    for pid in pids:
        try:
            if any(part.endswith(suffix) for part in psutil.Process(pid).cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def stop_cluster(label: str, temp_dir: str, session_id: int = 0, gcs_address: str = "",
                 timeout: float = 15) -> list[int]:
    """Stop every process of a cluster, by pid: SIGTERM, wait, then SIGKILL.

    Returns:
        The pids that were stopped. Afterwards ``cluster_pids`` is empty.

    Raises:
        ClusterError: a process survived SIGKILL (not ours to kill, or stuck in the kernel).
    """
    import psutil

    stopped: dict[int, psutil.Process] = {}

    def targets(include_gcs: bool) -> dict[int, psutil.Process]:
        # Processes signalled before stay on the list: once their parents are gone,
        # orphans (a job's entrypoint, workers) are no longer in the cluster's tree.
        found = {p.pid: p for p in stopped.values() if _running(p)}
        for pid in cluster_pids(temp_dir, session_id, gcs_address):
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
    left = sorted(set(cluster_pids(temp_dir, session_id, gcs_address))
                  | {p.pid for p in stopped.values() if _running(p)})
    if left:
        raise ClusterError(f"Could not stop processes {left} of cluster {label!r}.",
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
