"""Helpers the stages share: parameters, Ray start-up, where Ray keeps results, the data."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import yaml

PREPARED = Path("data/prepared/data.npz")
MODEL = Path("models/model.pt")


def load_params(section: str | None = None) -> dict:
    """params.yaml (DVC runs every stage from the project's root), or one section of it."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    return params[section] if section else params


def start_ray() -> None:
    """Start Ray on this machine, or join the cluster that RAY_ADDRESS names (as under dvcray).

    Workers get DVC's variables (DVC_EXP_NAME, ...; never DVC_STUDIO_TOKEN or other secrets).
    """
    # Ray 2.x warns at every worker start that it will stop hiding GPUs from
    # tasks that ask for none; asking for the future behaviour now silences it.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import ray
    from dvcray_cli.integrations.dvclive import dvc_runtime_env

    if not ray.is_initialized():
        ray.init(runtime_env=dvc_runtime_env())


def storage_path(path: str | None) -> str:
    """Ray's storage_path (params.yaml: ray.storage_path), after start_ray().

    A URL (s3://...) as it is. Empty: under `dvcray run` with an S3 store, the run's
    store; otherwise .ray_results in the project. A folder is made absolute, and
    refused when the cluster's nodes are several machines that share no disk.
    """
    from dvcray_cli.integrations.storage import storage_path as resolve

    return resolve(path or None, default=".ray_results")


def run_name(stage: str) -> str:
    """A fresh name per run, so a rerun never resumes (Ray Train) or mixes with an older one."""
    return f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def load_data() -> dict[str, np.ndarray]:
    """The arrays the prepare stage wrote: x_* (uint8, N x 28 x 28) and y_* (int64) for train, val, test."""
    with np.load(PREPARED) as data:
        return {key: data[key] for key in data.files}
