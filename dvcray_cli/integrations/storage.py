"""Where Ray Tune and Ray Train keep results and checkpoints (``RunConfig(storage_path=...)``).

On a cluster of several machines this must be storage every node reaches: Ray
Train's workers write checkpoints there and the driver reads them back, and a
folder on one machine is not on the others (Ray's own default, ``~/ray_results``,
is such a folder). ``storage_path`` decides:

- a URL (``s3://...``) is used as given;
- nothing set: under ``dvcray run`` the run's store (``DVCRAY_STORAGE_PATH``, which
  dvcray's runner sets to ``<store>/dvcray/ray``), else the local ``default``;
- a folder: made absolute, and refused when the Ray cluster this process is
  connected to spans several machines, rather than lost silently.

``run_name`` names a Ray Train run (``RunConfig(name=...)``) so that a retry of the same
dvcray run (its machine was lost: the runner service submits it again) finds the run's
checkpoints and resumes from the latest (Ray Train restores it; ``ray.train.get_checkpoint()``),
while any other run starts afresh.

Standalone: users' stage scripts import it (``dvcray_cli.integrations``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STORE_VAR = "DVCRAY_STORAGE_PATH"
RUN_VAR = "DVCRAY_RUN_ID"   # the dvcray run a stage belongs to (the same for all its attempts)


def run_name(stage: str) -> str:
    """A Ray Train (or Tune) run name for ``stage``: under ``dvcray run``, the same for every
    attempt of the run (``STAGE-RUN_ID``), so a retry resumes from the run's checkpoints;
    elsewhere a fresh one (``STAGE-YYYYmmdd-HHMMSS-PID``), so a rerun never resumes an older run."""
    run_id = os.environ.get(RUN_VAR, "").strip()
    if run_id:
        return f"{stage}-{run_id}"
    return f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


class NodeLocalStorageError(RuntimeError):
    """A folder as Ray's storage on machines that share no disk."""


def storage_path(configured: str | None = None, default: str = ".ray_results") -> str:
    """Ray's ``storage_path`` for this stage (see the module's docstring).

    Call it after ``ray.init()``, so it can tell how many machines the cluster has.

    Raises:
        NodeLocalStorageError: a folder, while the cluster's nodes are several machines.
    """
    if configured and "://" in configured:
        return configured
    if not configured:
        store = os.environ.get(STORE_VAR, "").strip()
        if store:
            return store
        configured = default
    path = str(Path(configured).expanduser().resolve())
    machines = cluster_machines()
    if machines > 1:
        raise NodeLocalStorageError(
            f"Ray storage_path {path} is a folder on one machine, and this Ray cluster's nodes are {machines} "
            "machines that share no disk: checkpoints written on one would be missing on the others. Leave it "
            "unset (under dvcray run with an S3 store, the store is used) or set an s3:// URL.")
    return path


def cluster_machines() -> int:
    """How many machines (node addresses) the connected Ray cluster has; 1 when not connected."""
    try:
        import ray

        if not ray.is_initialized():
            return 1
        return max(1, len({n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}))
    except Exception:  # noqa: BLE001 - only a safety check
        return 1
