"""Where runs go, and how this machine reaches them: the address of the cluster a run
goes to, the token that belongs to an address, the job API (through a port-forward
for a cluster elsewhere), the runner service, and what a cluster has (for placement).

Over every kind of record: local clusters on this machine, AWS clusters and other
launcher clusters (on-prem, other clouds) reached through their SSH port-forwards.
A token goes only to an address the user configured (DESIGN.md, "Trust").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvcray_cli import ray_api
from dvcray_cli.clusters import aws, launcher, local
from dvcray_cli.clusters.aws.records import records as aws_records, token_for_address
from dvcray_cli.clusters.common import Say, quiet
from dvcray_cli.clusters.launcher import records as launcher_records

if TYPE_CHECKING:  # pragma: no cover
    from ray.job_submission import JobSubmissionClient


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
        for cluster in local.records():
            if cluster.same_address(address):
                token = cluster.token()
                if token:
                    return token
        # A cluster reached through a port-forward: its token only to where this machine's own
        # ssh listens now, and nothing else (never the default token) to a port of its.
        token = token_for_address(address)
        if token is not None:
            return token or None
        record = launcher_records.at_address(address)
        if record is not None:
            return record.token_at(address)
    return ray_api.read_token(ray_api.default_token_path())


def job_api(address: str) -> str:
    """The job API of ``address``: a recorded local cluster's GCS address maps to its dashboard,
    a launcher or AWS cluster's address to where its port-forward answers now (reopened when
    its ssh died: ``ssh.ensure_forward``).

    Raises:
        ClusterError: the port-forward of a cluster recorded there could not be opened.
    """
    for cluster in local.records():
        if address.strip() == cluster.gcs_address:
            return cluster.dashboard_url
    return launcher.forward_url(address) or aws.forward_url(address) or ray_api.normalize(address)


def connect(address: str) -> JobSubmissionClient:
    """A job client for ``address`` that sends the token that belongs to it (the
    port-forward of a recorded launcher cluster is reopened first if it died).

    Raises:
        ClusterError: nothing answers there, or it refused the token.
    """
    launcher.ensure_reachable(job_api(address))
    url = job_api(address)  # where its job API answers now (a reopened forward may have moved)
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
    in_aws = aws.recorded_address(cwd or Path.cwd())
    if in_aws:
        return in_aws
    launched = launcher.recorded_address(cwd or Path.cwd())
    if launched:
        return launched
    current = local.current()
    return current.dashboard_url if current else None


def ensure_address(explicit: str | None, cwd: Path | None = None, say: Say = quiet) -> tuple[str, bool]:
    """``known_address``, else a local cluster started now (the embedded default).

    Returns:
        ``(address, started)``.
    """
    known = known_address(explicit, cwd)
    if known:
        return known, False
    say("No cluster configured: starting a local Ray cluster on this machine "
        "(stop it with: dvcray cluster down local).")
    cluster, _ = local.up("local")
    return cluster.dashboard_url, True


def fallback_addresses() -> list[str]:
    """Where a run this clone has no record of may be: ``RAY_ADDRESS``, the local cluster."""
    found = []
    if os.environ.get("RAY_ADDRESS"):
        found.append(os.environ["RAY_ADDRESS"])
    try:
        current = local.current()
    except Exception:  # noqa: BLE001 - only a hint of where to look
        current = None
    if current is not None:
        found.append(current.dashboard_url)
    return found


def on_this_machine(address: str) -> bool:
    """Whether the cluster at ``address`` runs on this machine (so a folder here is
    a store its runners reach). A cluster reached through a port-forward (AWS, any
    launcher cluster) is elsewhere, although its job API answers on 127.0.0.1."""
    import ipaddress
    import socket
    from urllib.parse import urlparse

    if launcher_records.at_address(address) is not None or any(r.answers_at(address) for r, _ in aws_records()):
        return False  # known without opening its forward
    url = job_api(address)
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
    return launcher.recorded_at(address) or aws.recorded_at(address)


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
    url = job_api(address)
    return launcher.service_url(url, head_port) or aws.service_url(url, head_port)


def dead_cluster_name(address: str) -> str | None:
    """The name of the cluster recorded on this machine at ``address`` if its GCS
    is gone (it died, or was stopped by hand); None if it runs or is not dvcray's."""
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
    url = job_api(address)
    nodes = [n for n in ray_api.list_nodes(url, token_for(url)) if n["alive"]]
    launched = launcher_records.at_address(url)
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
