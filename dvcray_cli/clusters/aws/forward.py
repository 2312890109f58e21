"""The SSH port-forward to an AWS head's job API (``ssh -N -L``, as ``ray dashboard``
does): the dashboard and job API listen on the head's 127.0.0.1 only."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from dvcray_cli import state
from dvcray_cli.clusters import procs
from dvcray_cli.clusters.aws.records import AwsCluster, write_record
from dvcray_cli.errors import ClusterError

HEAD_DASHBOARD_PORT = 8265


def known_hosts_file(record_known_hosts: str = "") -> Path:
    """Where the heads' SSH host keys are pinned: the record's, else ``~/.dvcray/known_hosts``."""
    return Path(record_known_hosts) if record_known_hosts else state.home() / "known_hosts"


def forward_command(head_ip: str, ssh_user: str, key_path: str, port: int, known_hosts: Path) -> list[str]:
    """``ssh -N -L 127.0.0.1:PORT:127.0.0.1:8265``, as ``ray dashboard`` does: the job
    API is never open to the internet. The head's host key is pinned on first
    contact (``accept-new``) and checked on every later one."""
    return ["ssh", "-N", "-i", os.path.expanduser(key_path),
            "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=30", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR",
            "-L", f"127.0.0.1:{port}:127.0.0.1:{HEAD_DASHBOARD_PORT}", f"{ssh_user}@{head_ip}"]


def start_forward(head_ip: str, ssh_user: str, key_path: str, port: int, known_hosts: Path | None = None) -> int:
    """Start the port-forward in the background; returns its pid."""
    known_hosts = known_hosts or known_hosts_file()
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(forward_command(head_ip, ssh_user, key_path, port, known_hosts),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    return proc.pid


def forget_host(head_ip: str, known_hosts: Path) -> None:
    """Drop a pinned key for ``head_ip``: a freshly launched head is a new machine
    with a new key, even when AWS gives it an address an old one had."""
    if known_hosts.exists():
        subprocess.run(["ssh-keygen", "-R", head_ip, "-f", os.fspath(known_hosts)], capture_output=True)


def _marker(record: AwsCluster) -> str:
    return f"127.0.0.1:{record.forward_port}:"


def forward_alive(record: AwsCluster) -> bool:
    """The recorded ssh process runs and forwards the recorded port."""
    cmdline = procs.cmdline(record.forward_pid) if record.forward_pid else ""
    return "ssh" in cmdline and _marker(record) in cmdline


def stop_forward(record: AwsCluster) -> None:
    if forward_alive(record):
        procs.stop_pid(record.forward_pid, _marker(record), timeout=2)


def ensure_forward(record: AwsCluster, repo_state: Path) -> AwsCluster:
    """Reopen the port-forward when it died (the laptop slept, the network changed)."""
    if forward_alive(record):
        return record
    record.forward_pid = start_forward(record.head_ip, record.ssh_user, record.key_path, record.forward_port,
                                       known_hosts_file(record.known_hosts))
    write_record(record, repo_state)
    return record


def wait_job_api(record: AwsCluster, timeout: float, reopen: bool = True) -> None:
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
            record.forward_pid = start_forward(record.head_ip, record.ssh_user, record.key_path,
                                               record.forward_port, known_hosts_file(record.known_hosts))
        time.sleep(2)
    raise ClusterError(f"The head's job API did not answer through the port-forward at {record.dashboard_url}.",
                       f"Look at the head: ray attach {record.config_path}")
