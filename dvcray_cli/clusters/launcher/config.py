"""Ray cluster-launcher YAMLs, for any provider: loading, Ray's own schema check,
dvcray's ``{{ placeholders }}``, and dvcray's additions to every config.

dvcray's additions (``with_additions``), the same on every provider:

- the cluster's auth token, made on the user's machine, shipped by ``file_mounts``
  to ``~/.dvcray/auth_token``, and ``RAY_AUTH_MODE=token`` with that file on every
  ``ray start`` (Ray's launcher does neither, and workers do not turn auth on by
  themselves);
- dvcray itself: a wheel of the client's own dvcray, shipped by ``file_mounts`` and
  installed by a setup command, after the Python that runs Ray is checked to have
  the client's Ray version (Ray requires the same version everywhere). No package
  index is ever asked for dvcray;
- the head's dashboard and job API on its 127.0.0.1 only (reached through an SSH
  port-forward), and a ``dvcray-version`` label on the head;
- the idle watcher (``python -m dvcray_cli.clusters.idle launcher ...``) on the head.

What the user's config already says is kept: an addition is skipped when the
config has it (the built-in AWS configs spell some of them out).
Nothing here runs Ray's launcher or opens a connection.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import shlex
from pathlib import Path
from typing import Any

from dvcray_cli.clusters.common import IDLE_MARKER, VERSION_LABEL
from dvcray_cli.errors import UsageError

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,59}")
TOKEN_REMOTE = "~/.dvcray/auth_token"
DIST_REMOTE = "~/.dvcray/dist"
DOCS = "https://docs.ray.io/en/latest/cluster/vms/references/ray-cluster-configuration.html"

# The Python that runs Ray on the node (the first of python, python3 that imports ray):
# dvcray goes into the same environment, and its runner and idle watcher run from it.
FIND_PYTHON = ('DVCRAY_PY=""; for p in python python3; do if "$p" -c "import ray" >/dev/null 2>&1; '
               'then DVCRAY_PY=$p; break; fi; done; ')
AUTH_ENV = "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.dvcray/auth_token; "


# --------------------------------------------------------------------------- loading


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``.

    Raises:
        UsageError: it cannot be read, is not YAML, or is not a mapping.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"Cannot read the cluster config {path}: {exc.strerror}.") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"The cluster config {path} is not valid YAML: {exc}",
                         "Fix the file (a YAML linter shows where).") from None
    if not isinstance(data, dict):
        raise UsageError(f"The cluster config {path} is not a YAML mapping.",
                         "A Ray cluster config starts with keys such as cluster_name, provider, auth.")
    return data


def provider_type(raw: dict[str, Any]) -> str:
    """``raw``'s ``provider.type`` (lower case), "" when missing."""
    provider = raw.get("provider")
    return str(provider.get("type", "")).lower() if isinstance(provider, dict) else ""


def validate_with_ray(config: dict[str, Any], source: Path | str) -> dict[str, Any]:
    """Ray's own schema check (``ray/autoscaler/ray-schema.json``) on the config
    with Ray's defaults filled in, as ``ray up`` does it.

    Returns:
        The prepared config (defaults filled in; for ``provider: local``, Ray's one
        node type).

    Raises:
        UsageError: the schema or Ray's provider checks refuse it; names the key.
    """
    import logging

    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    # Ray logs "setting max workers for head node type to 0" at INFO on every call.
    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)
    if not isinstance(config.get("provider"), dict) or not config["provider"].get("type"):
        raise UsageError(f"{source} has no provider.type.",
                         "Name the provider, e.g. provider: {type: local, head_ip: ..., worker_ips: [...]}.")
    try:
        # The schema first, on the config as written: Ray's provider code (on-prem's
        # min/max workers) reads it before its own schema check.
        jsonschema.validate(config, _ray_schema())
        # Ray's launcher prints its notes (a file mount that is not a folder, min_workers
        # capped at the machines listed) and its refusals; what refuses a config raises too.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            prepared = prepare_config(copy.deepcopy(config))
            validate_config(prepared)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise UsageError(f"{source} does not pass Ray's cluster config schema at {where}: {exc.message}",
                         f"See {DOCS}") from None
    except click.ClickException as exc:
        raise UsageError(f"{source} is not a valid Ray cluster config: {exc.format_message()}",
                         f"See {DOCS}") from None
    except (ValueError, KeyError, TypeError, AssertionError, NotImplementedError) as exc:
        raise UsageError(f"{source} is not a valid Ray cluster config: {exc}") from None
    return prepared


def _ray_schema() -> dict[str, Any]:
    import json

    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def check_name(name: str) -> str:
    if not CLUSTER_NAME.fullmatch(name):
        raise UsageError(f"Invalid cluster_name {name!r}.",
                         "Use letters, digits, '-', '_' and '.', 60 characters at most.")
    return name


# --------------------------------------------------------------------------- placeholders


def render(value: Any, values: dict[str, str], known: tuple[str, ...] | None = None) -> Any:
    """``value`` with every ``{{ name }}`` replaced.

    Raises:
        UsageError: a placeholder dvcray does not know.
    """
    if isinstance(value, dict):
        return {render(k, values, known): render(v, values, known) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, values, known) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise UsageError(f"Unknown placeholder {{{{ {key} }}}} in the cluster config.",
                             f"dvcray fills in: {', '.join(known or tuple(values))}.")
        return str(values[key])

    return PLACEHOLDER.sub(sub, value)


def uses(value: Any, placeholder: str) -> bool:
    """``value`` mentions ``{{ placeholder }}`` somewhere."""
    if isinstance(value, dict):
        return any(uses(v, placeholder) for v in value.values())
    if isinstance(value, list):
        return any(uses(v, placeholder) for v in value)
    return isinstance(value, str) and any(m.group(1) == placeholder for m in PLACEHOLDER.finditer(value))


# --------------------------------------------------------------------------- dvcray's additions


def wheel_remote(wheel_name: str) -> str:
    return f"{DIST_REMOTE}/{wheel_name}"


def node_setup_command(wheel_name: str, ray_version: str) -> str:
    """The setup command dvcray adds on every node, after the config's own: find the
    Python that runs Ray, refuse another Ray version than the client's, install the
    shipped wheel (its dependencies only if missing; dvcray itself from the file)."""
    wheel = wheel_remote(wheel_name)
    check = ("import ray, socket, sys; v = ray.__version__; "
             f"sys.exit(0 if v == {ray_version!r} else 'dvcray: node %s runs Ray %s, the client runs Ray "
             f"{ray_version}: Ray needs the same version on every node and the client' % (socket.gethostname(), v))")
    return (f"mkdir -p ~/.dvcray && chmod 700 ~/.dvcray && chmod 600 {TOKEN_REMOTE}; {FIND_PYTHON}"
            'if [ -z "$DVCRAY_PY" ]; then echo "dvcray: no Python with Ray on $(hostname): install '
            f'ray=={ray_version} in setup_commands" >&2; exit 1; fi; '
            f'"$DVCRAY_PY" -c {shlex.quote(check)} && '
            f'"$DVCRAY_PY" -m pip install -q {wheel} && '
            f'"$DVCRAY_PY" -m pip install -q --no-deps --force-reinstall {wheel}')


def idle_command(idle_timeout_s: float) -> str:
    """The head start command that (re)starts dvcray's idle watcher (0: only stops the previous one)."""
    return (f"export RAY_AUTH_TOKEN_PATH=$HOME/.dvcray/auth_token; {FIND_PYTHON}"
            f'"$DVCRAY_PY" -m {IDLE_MARKER} launcher --config ~/ray_bootstrap_config.yaml '
            f"--timeout {int(idle_timeout_s)} --background")


_RAY_START = re.compile(r"\bray start\b")


def start_command(command: str, head: bool, dvcray_version: str) -> str:
    """A ``ray start`` command with token auth on; the head's with its dashboard on
    127.0.0.1 and dvcray's version label. Other commands as they are."""
    if not _RAY_START.search(command):
        return command
    extra = []
    if head and "--dashboard-host" not in command:
        extra.append("--dashboard-host=127.0.0.1")
    if head and "--labels" not in command:
        extra.append(f"--labels={VERSION_LABEL}={dvcray_version}")
    if extra:
        command = _RAY_START.sub("ray start " + " ".join(extra), command, count=1)
    if "RAY_AUTH_MODE" not in command:
        command = AUTH_ENV + command
    return command


def with_additions(raw: dict[str, Any], *, token_path: str, wheel_path: str, ray_version: str,
                   dvcray_version: str, idle_timeout_s: float) -> dict[str, Any]:
    """``raw`` (a config as written: Ray has not merged its setup commands yet) with
    dvcray's additions. Start commands missing from ``raw`` get none: fill in Ray's
    defaults first (``launcher.plan`` does).

    Args:
        token_path: the cluster's token file on this machine.
        wheel_path: where the wheel of this dvcray is on this machine (``wheel.build``
            writes it there before the launcher runs).
        ray_version, dvcray_version: this client's.
        idle_timeout_s: the idle watcher's timeout (0: off).
    """
    config = copy.deepcopy(raw)
    wheel_name = Path(wheel_path).name
    mounts = dict(config.get("file_mounts") or {})
    mounts.setdefault(TOKEN_REMOTE, token_path)
    # The folder, not the file: Ray hashes a folder's contents, so new code of the same
    # version reaches the nodes on the next `up` (and Ray warns about file mounts).
    mounts[DIST_REMOTE] = str(Path(wheel_path).parent)
    config["file_mounts"] = mounts
    setup = list(config.get("setup_commands") or [])
    setup.append(node_setup_command(wheel_name, ray_version))
    config["setup_commands"] = setup
    config["head_start_ray_commands"] = [start_command(c, True, dvcray_version)
                                         for c in config.get("head_start_ray_commands") or []]
    config["worker_start_ray_commands"] = [start_command(c, False, dvcray_version)
                                           for c in config.get("worker_start_ray_commands") or []]
    if not any(IDLE_MARKER in c for c in config["head_start_ray_commands"]):
        config["head_start_ray_commands"].append(idle_command(idle_timeout_s))
    return config


def additions_summary(config: dict[str, Any]) -> list[str]:
    """What dvcray added, in words (for the plan)."""
    return [
        f"auth token: shipped to {TOKEN_REMOTE} on every node; every `ray start` runs with RAY_AUTH_MODE=token",
        "dvcray: the wheel of this dvcray, shipped to " + DIST_REMOTE + "/ and installed on every node "
        "after the config's setup commands (never from a package index)",
        "the head's dashboard and job API on its 127.0.0.1 only, reached through an SSH port-forward",
        "idle watcher on the head (python -m dvcray_cli.clusters.idle)",
    ]
