"""Records of AWS clusters: ``<repo>/.dvcray/clusters/<cluster>.json``, and a
pointer to each in ``~/.dvcray/aws/`` so ``cluster status`` lists them from anywhere."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from dvcray_cli import files
from dvcray_cli.clusters.launcher.records import Record


@dataclass
class AwsCluster(Record):
    """A recorded AWS cluster (``.dvcray/clusters/<cluster_name>.json``)."""

    region: str
    node_types: list[dict[str, Any]]
    kind: str = "aws"


def write_record(record: AwsCluster, repo_state: Path) -> Path:
    """``<repo>/.dvcray/clusters/<name>.json`` (``repo_state`` is ``<repo>/.dvcray``),
    and a pointer to it in ``~/.dvcray/aws/`` so ``cluster status`` lists it from anywhere."""
    folder = files.private_dir(Path(repo_state) / "clusters")
    path = files.write_json(folder / f"{record.name}.json", record.to_json())
    files.write_json(files.private_dir(files.aws_index_dir()) / f"{record.name}.json", {"record": str(path)})
    return path


def load(path: Path) -> AwsCluster | None:
    return AwsCluster.from_json(files.read_json(path))


def _pointed(pointer: Path) -> Path | None:
    target = (files.read_json(pointer) or {}).get("record")
    return Path(target) if isinstance(target, str) and target else None


def remove_record(name: str, repo_state: Path | None) -> None:
    pointer = files.aws_index_dir() / f"{name}.json"
    path = _pointed(pointer)
    if repo_state is not None:
        (Path(repo_state) / "clusters" / f"{name}.json").unlink(missing_ok=True)
    if path is not None:
        path.unlink(missing_ok=True)
    pointer.unlink(missing_ok=True)


def records() -> Iterator[tuple[AwsCluster, Path]]:
    """Every recorded AWS cluster of this user, with its record's path."""
    index = files.aws_index_dir()
    if not index.is_dir():
        return
    for pointer in sorted(index.glob("*.json")):
        path = _pointed(pointer)
        record = load(path) if path is not None else None
        if record is not None:
            yield record, path


def repo_records(cwd: Path) -> list[AwsCluster]:
    """The AWS clusters recorded in the repo around ``cwd``, newest first."""
    from dvcray_cli.gitutil import git_root

    root = git_root(Path(cwd))
    folder = files.repo_clusters_dir(root, create=False) if root else None
    if folder is None or not folder.is_dir():
        return []
    found = [r for r in (load(p) for p in folder.glob("*.json")) if r is not None and r.kind == "aws"]
    return sorted(found, key=lambda r: r.started_at, reverse=True)


def token_for_address(address: str) -> str | None:
    """The token of the recorded AWS cluster whose forwarded job API is ``address``."""
    for record, _path in records():
        if record.answers_at(address):
            return record.token_at(address) or ""  # "": its cluster's, but not to be sent there now
    return None
