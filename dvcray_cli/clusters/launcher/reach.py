"""Where runs reach a launcher cluster: its job API and its runner service, each
through an SSH port-forward of its own to the head's 127.0.0.1 (reopened when its
ssh died, and recorded so later clients reuse it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from dvcray_cli.clusters.launcher import records, ssh


def service_reach(record: Any, save: Callable[[Any], Any],
                  reload: Callable[[], Any] = lambda: None) -> Callable[[int], str]:
    """Where this machine reaches a port of the head of ``record`` where a runner service
    listens: through the service's port-forward (``ssh.ensure_service_forward``; ``save``
    records it, ``reload`` reads the record again), for ``ray_api.active_runs`` and
    ``service_url``."""
    return lambda port: f"http://127.0.0.1:{ssh.ensure_service_forward(record, port, save, reload)}"


def recorded_address(cwd: Path) -> str | None:
    """The address of the newest launcher cluster of the project around ``cwd``, in any clone
    of it (``job_api`` gives where its job API answers now, through its port-forward)."""
    from dvcray_cli.gitutil import git_root, root_commit

    if not any(True for _ in records.records()):
        return None
    root = git_root(Path(cwd))
    found = records.for_project(root_commit(root) if root else None)
    if not found:
        return None
    return found[0].dashboard_url


def forward_url(address: str) -> str | None:
    """Where the job API of the recorded cluster at ``address`` answers now: this machine's end
    of its port-forward, reopened (and verified: ``ssh.ensure_forward``) when its ssh died;
    None when no launcher cluster is recorded there.

    Raises:
        ClusterError: the forward could not be opened (the head's host key changed...).
    """
    record = records.at_address(address)
    return ssh.ensure_forward(record, records.write).api_url if record is not None else None


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
