"""Ray runtime-env hook that ships the run's workspace to the workers of a stage.

Tasks and actors that a stage starts inherit the Ray *job's* runtime env, i.e.
dvcray's snapshot package, not the run's clone: a remote function that imports
the project's own module would fail there (DESIGN.md). The runner points
``RAY_RUNTIME_ENV_HOOK`` here, so a stage's plain ``ray.init()`` ships the
clone as ``working_dir`` (Ray follows its .gitignore, so DVC outputs and data
stay behind) and DVC's variables as ``env_vars`` (without secrets:
``dvcray_cli.integrations.dvclive.dvc_env_vars``; with the store's S3 endpoint when
it has its own), with no change to the user's script. The run's own stage environment
(``dvcray_cli.runs.stage_env``) goes with them: the variables it names (``--env``, the
project's ``env`` list; never secret-like names, which the client refuses) and its
``PYTHONPATH`` entries inside the project, relative to the workers' copy of it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

WORKSPACE_VAR = "DVCRAY_WORKSPACE"
# Set by the runner for the stage: the names of the variables the run carries (comma-separated)
# and its PYTHONPATH entries inside the project, relative to the workspace (os.pathsep-separated).
ENV_VAR = "DVCRAY_ENV"
PYTHONPATH_VAR = "DVCRAY_PYTHONPATH"

# What Ray's packaging says when it ships a working_dir: that it skips .git, follows
# the .gitignore files, zips and pushes. Shipping the run's clone is dvcray's doing,
# not the user's: their stage's log should not carry it (Ray's loggers, Ray 2.60).
_SHIPPING_LOGGERS = ("ray._private.worker", "ray._private.runtime_env.packaging",
                     "ray._private.runtime_env.working_dir")
_SHIPPING_LINES = ("Ignoring upload to cluster for these files", "Creating a file package for local module",
                   "Pushing file package", "Successfully pushed file package",
                   "Directory '.git' is now ignored by default")


class _QuietShipping(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_SHIPPING_LINES)


def _quiet_shipping() -> None:
    for name in _SHIPPING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietShipping) for f in logger.filters):
            logger.addFilter(_QuietShipping())


def _job_working_dir() -> Any:
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return (json.loads(raw).get("runtime_env") or {}).get("working_dir")
    except ValueError:
        return None


def hook(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """Called by ``ray.init()`` with the driver's runtime env (merged with the job's)."""
    env = dict(runtime_env or {})
    # DVC's variables (DVC_EXP_NAME, ...) for the workers, secrets left out; the
    # stage's own env_vars win.
    from dvcray_cli.integrations.dvclive import dvc_env_vars

    dvc_vars = dvc_env_vars()
    # The store's own S3 endpoint (set by the runner): Ray Train's workers write
    # checkpoints there from other machines. A URL, not a credential: it travels in
    # the run's manifest already.
    if os.environ.get("AWS_ENDPOINT_URL_S3"):
        dvc_vars["AWS_ENDPOINT_URL_S3"] = os.environ["AWS_ENDPOINT_URL_S3"]
    # The run's own variables, by the names the runner set (values are the stage's).
    for name in filter(None, os.environ.get(ENV_VAR, "").split(",")):
        if name in os.environ:
            dvc_vars[name] = os.environ[name]
    if dvc_vars:
        env["env_vars"] = {**dvc_vars, **(env.get("env_vars") or {})}
    root = os.environ.get(WORKSPACE_VAR)
    if not root:
        return env
    if env.get("working_dir") in (None, _job_working_dir()):
        env["working_dir"] = root
        _quiet_shipping()
        # Folders of the workspace on the driver's sys.path (python src/train.py
        # puts src/ there) go on the workers' path too, relative to their copy; so do the
        # run's PYTHONPATH entries (the workspace itself is their working_dir, first on it).
        extra = []
        for entry in sys.path:
            entry = os.path.abspath(entry or os.getcwd())
            if entry.startswith(root + os.sep):
                rel = os.path.relpath(entry, root)
                if rel not in extra:
                    extra.append(rel)
        for rel in os.environ.get(PYTHONPATH_VAR, "").split(os.pathsep):
            if rel and rel != "." and rel not in extra:
                extra.append(rel)
        if extra:
            env_vars = dict(env.get("env_vars") or {})
            current = env_vars.get("PYTHONPATH")
            env_vars["PYTHONPATH"] = os.pathsep.join(extra + ([current] if current else []))
            env["env_vars"] = env_vars
    return env
