"""Records of clusters started through Ray's launcher from a YAML: ``~/.dvcray/launcher/<cluster>.json``.

A cluster's name is the YAML's ``cluster_name`` and the first 8 characters of its
project's first commit, the same in every clone of the project: any clone on this
machine finds the cluster, its token and its port-forward (``for_project``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from dvcray_cli import ray_api, files


@dataclass
class Record:
    """What every record of a launcher cluster (``LauncherCluster``, ``AwsCluster``) holds
    and does: the head, the SSH user and key, the port-forward (``launcher.ssh``), the
    token; its JSON, read tolerantly."""

    name: str                  # Ray's cluster_name
    config_label: str          # what the user typed
    config_path: str           # the config as launched
    token_path: str
    dashboard_url: str         # http://127.0.0.1:<forwarded port>
    forward_port: int
    forward_pid: int
    head_ip: str
    ssh_user: str
    key_path: str
    started_at: str
    idle_timeout_s: float
    _: KW_ONLY
    known_hosts: str = ""      # where the head's SSH host key is pinned
    # The forward to the runner service on the head (``ssh.ensure_service_forward``): the
    # head's port it listens on, this machine's end of the forward, the ssh process.
    service_port: int = 0
    service_forward_port: int = 0
    service_forward_pid: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Any:
        return files.from_json(cls, data)

    def token(self) -> str | None:
        return ray_api.read_token(self.token_path)

    @property
    def api_url(self) -> str:
        """Where the job API answers now: this machine's end of the forward, which moves to a
        fresh port when the port it had is taken while its ssh was gone (``ssh.ensure_forward``).
        ``dashboard_url`` stays the cluster's address, in records and runs."""
        return f"http://127.0.0.1:{self.forward_port}"

    def token_at(self, address: str) -> str | None:
        """The token, for a request to ``address``: only where the job API answers now, through
        this machine's own ssh (``ssh.forward_alive``), never a port someone else may hold."""
        from dvcray_cli.clusters.launcher import ssh

        if ray_api.normalize(address) != self.api_url or not ssh.forward_alive(self):
            return None
        return self.token()

    def answers_at(self, address: str) -> bool:
        """``address`` is this cluster's: its address, or where its job API answers now."""
        return ray_api.normalize(address) in (self.dashboard_url, self.api_url)


@dataclass
class LauncherCluster(Record):
    """A cluster started through Ray's launcher (any provider but AWS): its name is
    <the YAML's cluster_name>-<first commit[:8]>, its config ``~/.dvcray/launcher/<name>.yaml``."""

    provider: str              # provider.type: local, gcp, azure, ...
    project: str               # the project's first commit
    worker_ips: list[str] = field(default_factory=list)   # provider local: the machines
    kind: str = "launcher"


def folder() -> Path:
    return files.launcher_dir()


def path_of(name: str) -> Path:
    return folder() / f"{name}.json"


def token_path(name: str) -> Path:
    return folder() / f"{name}.token"


def config_path(name: str) -> Path:
    return folder() / f"{name}.yaml"


def known_hosts_path(name: str) -> Path:
    return folder() / f"{name}.known_hosts"


def log_path(name: str, action: str) -> Path:
    return folder() / f"{name}.{action}.log"


def write(record: LauncherCluster) -> Path:
    return files.write_json(files.private_dir(folder()) / f"{record.name}.json", record.to_json())


def load(name: str) -> LauncherCluster | None:
    return LauncherCluster.from_json(files.read_json(path_of(name)))


def remove(name: str) -> None:
    path_of(name).unlink(missing_ok=True)


def records() -> Iterator[LauncherCluster]:
    """Every recorded launcher cluster of this user, oldest first."""
    if not folder().is_dir():
        return
    found = [r for r in (LauncherCluster.from_json(files.read_json(p)) for p in folder().glob("*.json")) if r]
    yield from sorted(found, key=lambda r: r.started_at)


def for_project(project: str | None) -> list[LauncherCluster]:
    """The recorded clusters of the project whose first commit is ``project``, newest first."""
    if not project:
        return []
    return sorted((r for r in records() if r.project == project), key=lambda r: r.started_at, reverse=True)


def at_address(address: str) -> LauncherCluster | None:
    """The recorded cluster whose forwarded job API is ``address``."""
    return next((r for r in records() if r.answers_at(address)), None)
