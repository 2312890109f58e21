"""The local clusters recorded on this machine: ``LocalCluster`` (what ``up`` writes to
``~/.dvcray/clusters/<name>.json``) and the lookups over those records.

A record whose GCS is gone is stale: ``recorded`` stops what is left of it and
removes the record; ``dead_cluster_at`` finds such a record for an address.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from dvcray_cli import ray_api, files
from dvcray_cli.clusters import procs
from dvcray_cli.clusters.common import LOCAL

NAMES = LOCAL


@dataclass
class LocalCluster:
    """A Ray head started by dvcray on this machine."""

    name: str
    gcs_address: str          # Ray's bootstrap address, "IP:PORT" (what RAY_ADDRESS takes for drivers)
    dashboard_url: str        # "http://127.0.0.1:PORT": the job API
    temp_dir: str             # the cluster's own Ray --temp-dir: logs, sockets, session dirs
    token_path: str           # the auth token file the cluster was started with
    started_at: str           # ISO 8601, UTC
    num_cpus: float | None    # CPUs of the head as Ray counts them
    session_id: int = 0       # the Unix session its core processes run in (the `ray start` pid)
    autoscaling_config: str | None = None  # the config the autoscaler runs (local-multinode), in temp_dir

    @property
    def gcs_port(self) -> int:
        return int(self.gcs_address.rsplit(":", 1)[1])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> LocalCluster | None:
        return files.from_json(cls, data)

    def token(self) -> str:
        return ray_api.read_token(self.token_path) or ""

    def pids(self) -> list[int]:
        """Every live process of this cluster (``procs.cluster_pids``)."""
        return procs.cluster_pids(self.temp_dir, self.session_id, self.gcs_address)

    def is_alive(self) -> bool:
        """Its GCS runs (a head without its GCS is gone, whatever is left)."""
        return procs.gcs_running(self.temp_dir, self.session_id)

    def stop(self, timeout: float = 15) -> list[int]:
        """Stop every process of this cluster, by pid (``procs.stop_cluster``)."""
        return procs.stop_cluster(self.name, self.temp_dir, self.session_id, self.gcs_address, timeout)

    def same_address(self, address: str) -> bool:
        """``address`` is this cluster's job API or its GCS."""
        return ray_api.normalize(address) == self.dashboard_url or address.strip() == self.gcs_address


def record_path(name: str) -> Path:
    return files.clusters_dir() / f"{name}.json"


def default_temp_dir(name: str) -> Path:
    """A short per-cluster Ray temp dir.

    Ray puts Unix sockets under ``<temp_dir>/session_<date>_<pid>/sockets/``, and
    a socket path must stay under 107 bytes, so this stays near 30 characters.
    The hash of user and HOME keeps two users' (or two tests') clusters apart.
    """
    key = f"{os.getuid()}:{Path.home()}:{name}"
    return Path("/tmp") / f"dvcray-{name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def records() -> list[LocalCluster]:
    """Every local cluster recorded on this machine (running or not)."""
    folder = files.clusters_dir()
    if not folder.is_dir():
        return []
    found = (LocalCluster.from_json(files.read_json(p)) for p in sorted(folder.glob("*.json")))
    return [c for c in found if c is not None]


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """One ``up`` or ``down`` of a cluster at a time: two ``dvcray run`` started at
    once with no cluster must not start two heads."""
    with open(files.private_dir(files.clusters_dir()) / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_record(cluster: LocalCluster) -> Path:
    files.private_dir(files.clusters_dir())
    return files.write_json(record_path(cluster.name), cluster.to_json())


def remove_record(name: str) -> None:
    record_path(name).unlink(missing_ok=True)


def load(name: str) -> LocalCluster | None:
    """The record of ``name`` as written, running or not (None: none, or unreadable)."""
    return LocalCluster.from_json(files.read_json(record_path(name)))


def recorded(name: str = "local") -> LocalCluster | None:
    """The recorded cluster ``name`` if it is running, else None.

    A record whose GCS is gone is stale: whatever is left of its processes is
    stopped, and the record removed.
    """
    path = record_path(name)
    if not path.exists():
        return None
    cluster = load(name)
    if cluster is None:
        path.unlink(missing_ok=True)
        return None
    if cluster.is_alive():
        return cluster
    cluster.stop(timeout=5)
    remove_record(name)
    return None


def current() -> LocalCluster | None:
    """The cluster on this machine that runs go to by default: of the running
    clusters ``cluster up`` recorded (``local``, ``local-multinode``), the one
    started last."""
    running = [c for c in (recorded(r.name) for r in records() if r.name in NAMES) if c is not None]
    return max(running, key=lambda c: c.started_at) if running else None


def recorded_at(address: str) -> LocalCluster | None:
    """The running cluster recorded on this machine whose job API or GCS is ``address``."""
    for record in records():
        if record.same_address(address):
            return recorded(record.name)
    return None


def dead_cluster_at(address: str) -> LocalCluster | None:
    """The cluster recorded on this machine at ``address`` if its GCS is gone (it
    died, or was stopped by hand); None if it runs or is not one of dvcray's."""
    for record in records():
        if record.same_address(address) and not record.is_alive():
            return record
    return None
