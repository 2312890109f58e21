"""Where runs reach an AWS cluster: the job API and the runner service of the
project's recorded cluster, each through an SSH port-forward of its own (the
launcher's, ``launcher.reach``).
"""

from __future__ import annotations

from pathlib import Path

from dvcray_cli import ray_api, files
from dvcray_cli.clusters.aws import records
from dvcray_cli.clusters.aws.planning import is_projects
from dvcray_cli.clusters.aws.records import AwsCluster
from dvcray_cli.clusters.launcher import service_reach, ssh


def recorded_address(cwd: Path) -> str | None:
    """The job API of this project's AWS cluster (through its port-forward), or None:
    one recorded in this clone, else one another clone of the project recorded
    on this machine (clusters are named after the project's first commit)."""
    from dvcray_cli.gitutil import git_root

    root = git_root(Path(cwd))
    if root is None:
        return None
    found = records.repo_records(cwd)
    if found:
        repo_state = files.repo_dir(root, create=False)
        return ssh.ensure_forward(found[0], lambda r: records.write_record(r, repo_state)).dashboard_url
    for record, path in sorted(records.records(), key=lambda item: item[0].started_at, reverse=True):
        if is_projects(record.name, root):
            return ssh.ensure_forward(record, lambda r, where=path.parent.parent: records.write_record(r, where)).dashboard_url
    return None


def _at(address: str) -> tuple[AwsCluster, Path] | None:
    url = ray_api.normalize(address)
    return next(((r, p) for r, p in records.records() if r.dashboard_url == url), None)


def recorded_at(address: str) -> bool:
    return _at(address) is not None


def service_url(address: str, head_port: int) -> str | None:
    """The runner service on ``head_port`` of the recorded AWS cluster at ``address``,
    through its port-forward (``ssh.ensure_service_forward``); None when none is recorded there."""
    found = _at(address)
    if found is None:
        return None
    record, path = found
    return service_reach(record, lambda r: records.write_record(r, path.parent.parent),
                         lambda: records.load(path))(head_port)
