"""The dvcray a cluster runs its runners with, and the check that it can run this
client's runs (DESIGN.md, "The run lifecycle": preflight).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dvcray_cli import ray_api, files
from dvcray_cli.clusters.common import VERSION_LABEL
from dvcray_cli.clusters.reach import job_api, token_for
from dvcray_cli.errors import ClusterError

if TYPE_CHECKING:  # pragma: no cover
    from ray.job_submission import JobSubmissionClient

_PROBE = ("python -c \"import dvcray_cli; print('dvcray-version=' + dvcray_cli.__version__)\"")


def cluster_dvcray_version(address: str, job_client: JobSubmissionClient | None = None) -> str | None:
    """The dvcray version the cluster at ``address`` runs its runners with.

    Asked once per cluster session and remembered (``~/.dvcray/clusters/versions.json``):
    the head's ``dvcray-version`` label when dvcray started it, else a one-line
    Ray Job on the head that imports dvcray and prints its version.

    Returns:
        The version, or None when the cluster's Python has no dvcray.

    Raises:
        ClusterError: the cluster does not answer.
    """
    url = job_api(address)
    token = token_for(url)
    session = str(ray_api.cluster_version(url, token).get("session_name") or "")
    cache_path = files.clusters_dir() / "versions.json"
    cache = files.read_json(cache_path) or {}
    key = f"{url} {session}"
    if session and isinstance(cache.get(key), str):
        return cache[key]
    found = None
    for node in ray_api.list_nodes(url, token):
        if node["is_head"] and node["alive"]:
            found = (node.get("labels") or {}).get(VERSION_LABEL)
    if found is None:
        status, log = ray_api.probe(job_client or ray_api.client(url, token), _PROBE)
        lines = [ln for ln in log.splitlines() if ln.startswith("dvcray-version=")]
        if status != "SUCCEEDED" or not lines:
            return None
        found = lines[-1].split("=", 1)[1].strip()
    if session:
        cache = {k: v for k, v in cache.items() if not k.startswith(f"{url} ")}
        cache[key] = found
        files.private_dir(files.clusters_dir())
        files.write_json(cache_path, cache)
    return found


def check_version(address: str, job_client: JobSubmissionClient | None = None) -> None:
    """Refuse a cluster whose dvcray cannot run this client's runs.

    Raises:
        ClusterError: the cluster has no dvcray, or one of another major.minor version.
    """
    from dvcray_cli import __version__, compatible

    theirs = cluster_dvcray_version(address, job_client)
    if theirs is None:
        raise ClusterError(f"The Ray cluster at {job_api(address)} has no dvcray installed: its runner "
                           "cannot start.",
                           f"Install dvcray {__version__} on the cluster's nodes (dvcray cluster up does it).")
    if not compatible(theirs):
        raise ClusterError(f"The Ray cluster at {job_api(address)} runs dvcray {theirs}, this client is "
                           f"dvcray {__version__}: they cannot work together.",
                           f"Install dvcray {__version__} on the cluster, or use dvcray {theirs} here.")
