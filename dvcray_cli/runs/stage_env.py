"""A run's stage environment: what dvcray sets on purpose over the node's own (DESIGN.md,
"The stage's environment").

On the client (``resolve``, at preflight, before anything runs):

- ``PYTHONPATH`` follows the project. Entries of this machine's ``PYTHONPATH`` inside
  the DVC project (``export PYTHONPATH=$PWD`` at its root is the common case) are
  carried as paths relative to the DVC root, and on the cluster they name the run's own
  clone, never this working copy. Relative to the DVC root because that folder is what
  the stage runs in and what Ray workers get as their ``working_dir``: an entry above it
  would reach the stage but not its workers. Entries elsewhere are not carried, and the
  run says so in one line (install that code on the cluster, or ``-C`` it into the
  project). A relative entry is taken from the folder ``dvcray run`` runs in.
- Other variables by name: ``dvcray run --env NAME=VALUE`` / ``--env NAME`` (this
  machine's value), and ``env = [...]`` in ``[tool.dvcray]`` of the project's
  ``pyproject.toml`` (``settings.py``). Values travel in the run's manifest, which is
  written to the store: names that look like secrets are refused, and so are the ones
  dvcray, DVC or Ray set for each run.

On the cluster (``for_stage``, in the runner): the variables to set before ``dvc exp
run``. The stage inherits them; the runtime-env hook
(``dvcray_cli.integrations.runtime_env``) passes the named variables and the carried
``PYTHONPATH`` entries on to the Ray tasks, actors and Train/Tune workers the stage starts.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence

from dvcray_cli.errors import UsageError
from dvcray_cli.integrations.runtime_env import ENV_VAR, PYTHONPATH_VAR

# Names a run never carries, because they look like credentials: the manifest that would
# carry the value goes to the store, and Ray shows a stage's runtime env on its dashboard.
SECRET_LIKE = ("*TOKEN*", "*SECRET*", "*PASSWORD*", "*PASSWD*", "*API_KEY*", "*ACCESS_KEY*", "*PRIVATE_KEY*",
               "*CREDENTIAL*", "AWS_*", "DVC_STUDIO_*")
# Names dvcray, DVC or Ray set for each run, or the node's own: carrying them would break the run.
RESERVED = frozenset({"PATH", "HOME", "PWD", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "RAY_ADDRESS",
                      "RAY_RUNTIME_ENV_HOOK", "RAY_OVERRIDE_JOB_RUNTIME_ENV"})
RESERVED_PREFIXES = ("DVCRAY_", "DVC_", "RAY_JOB_", "RAY_AUTH_")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

CREDENTIALS_HINT = ("Nodes get credentials their own way: a local cluster has those of the shell that started it "
                    "(AWS_* variables, ~/.aws), other machines their own (~/.aws on each node, an AWS instance "
                    "profile). See README, \"What dvcray trusts\".")


def refusal(name: str) -> str | None:
    """Why variable ``name`` cannot travel with a run, or None when it can."""
    upper = name.upper()
    if any(fnmatch.fnmatchcase(upper, pattern) for pattern in SECRET_LIKE):
        return "looks like a secret, and a run's variables are written to its manifest in the store"
    if name == "PYTHONPATH":
        return "follows the project: entries of your PYTHONPATH inside the project travel by themselves"
    if name in RESERVED or upper.startswith(RESERVED_PREFIXES):
        return "is set on each node or for each run by dvcray, DVC or Ray"
    return None


def parse(specs: Sequence[str], listed: Sequence[str] = (), environ: Mapping[str, str] | None = None,
          listed_in: Path | str | None = None) -> dict[str, str]:
    """The variables a run carries: ``listed`` (the project's ``env``, names only) then
    ``specs`` (``--env NAME=VALUE`` or ``--env NAME``; a later one wins).

    Args:
        environ: this machine's environment, where a bare ``NAME`` takes its value.
        listed_in: the file ``listed`` comes from, for messages.

    Raises:
        UsageError: a name that is not a variable name, looks like a secret, is reserved,
            or (given without a value) is not set here; each named, with what to do.
    """
    environ = os.environ if environ is None else environ
    where = f"env of [tool.dvcray] in {listed_in}" if listed_in else "the project's env list"
    found: dict[str, str] = {}
    for origin, spec in [*((where, n) for n in listed), *(("--env", s) for s in specs)]:
        # Never the value in a message: it may be what the refusal is about.
        name, eq, value = spec.partition("=")
        if eq and origin != "--env":
            raise UsageError(f"{name}=... ({origin}): the list names variables; their values come from "
                             "the machine that runs dvcray.", f'Write "{name}" there, and set {name} here.')
        if not _NAME.fullmatch(name):
            raise UsageError(f"{name!r} ({origin}) is not a variable name.",
                             "Give --env NAME=VALUE, or --env NAME to take this machine's value.")
        why = refusal(name)
        if why:
            raise UsageError(f"{name} ({origin}) {why}; dvcray does not carry it.",
                             CREDENTIALS_HINT if "secret" in why else "Leave it out.")
        if not eq:
            if name not in environ:
                raise UsageError(f"{name} ({origin}) is not set here, so there is no value to send.",
                                 f"Set it first (export {name}=...), or give one: --env {name}=VALUE.")
            value = environ[name]
        if "\0" in value:
            raise UsageError(f"{name} ({origin}): its value holds a NUL character.")
        found[name] = value
    return found


@dataclass
class Carried:
    """``PYTHONPATH`` entries as a run carries them."""

    entries: list[str] = field(default_factory=list)   # relative to the DVC root, POSIX ("." for itself)
    left_out: list[str] = field(default_factory=list)  # entries as given here, not carried


def carry_pythonpath(value: str | None, dvc_root: Path, cwd: Path) -> Carried:
    """Which entries of ``PYTHONPATH`` (``value``) lie inside the DVC project at ``dvc_root``,
    as paths relative to it; the others are left out. Relative entries are taken from
    ``cwd``; symbolic links are resolved on both sides."""
    root = Path(os.path.realpath(dvc_root))
    carried = Carried()
    for raw in (value or "").split(os.pathsep):
        if not raw:
            continue
        path = Path(os.path.realpath(Path(cwd) / raw))
        if path != root and root not in path.parents:
            if raw not in carried.left_out:
                carried.left_out.append(raw)
            continue
        rel = path.relative_to(root).as_posix() if path != root else "."
        if rel not in carried.entries:
            carried.entries.append(rel)
    return carried


def safe_entry(rel: object) -> bool:
    """A carried entry the runner may use: a relative POSIX path that stays in the project."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return False
    path = PurePosixPath(rel)
    return not path.is_absolute() and ".." not in path.parts


@dataclass
class StageEnv:
    """What a run carries for its stage, decided at preflight."""

    env: dict[str, str] = field(default_factory=dict)
    pythonpath: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # one line each, for the person


def resolve(specs: Sequence[str], listed: Sequence[str], listed_in: Path | None, dvc_root: Path, cwd: Path,
            copy_paths: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> StageEnv:
    """The stage environment of a run from ``cwd`` in the project at ``dvc_root``.

    Raises:
        UsageError: as ``parse``.
    """
    environ = os.environ if environ is None else environ
    stage = StageEnv(env=parse(specs, listed, environ, listed_in))
    carried = carry_pythonpath(environ.get("PYTHONPATH"), dvc_root, cwd)
    stage.pythonpath = carried.entries
    if carried.left_out:
        stage.notes.append(f"PYTHONPATH entries outside the project do not travel to the cluster: "
                           f"{', '.join(carried.left_out)} (install that code on the cluster, or -C it into "
                           "the project).")
    ignored = _ignored(dvc_root, [e for e in carried.entries if e != "."], copy_paths)
    if ignored:
        stage.notes.append(f"PYTHONPATH entries that git ignores do not travel unless -C names them: "
                           f"{', '.join(ignored)}.")
    return stage


def _ignored(dvc_root: Path, entries: list[str], copy_paths: Sequence[str]) -> list[str]:
    """The carried entries git ignores that no ``-C`` path covers (their files stay here)."""
    from dvcray_cli import gitutil

    if not entries:
        return []
    out = gitutil.git("check-ignore", "--", *entries, cwd=dvc_root, check=False)
    copied = [PurePosixPath(c.rstrip("/")) for c in copy_paths]
    found = []
    for line in out.splitlines():
        rel = PurePosixPath(line.strip().rstrip("/"))
        if not any(rel == c or c in rel.parents for c in copied):
            found.append(rel.as_posix())
    return found


def for_stage(env: Mapping[str, object], pythonpath: Sequence[object], dvc_root: Path,
              environ: Mapping[str, str], job_dir: Path | None = None) -> tuple[dict[str, str], list[str]]:
    """The variables the runner sets for the stage (and what it unsets), from a run's
    manifest: its named variables, ``PYTHONPATH`` with the carried entries first (as
    folders of the run's clone at ``dvc_root``) then the node's own, and the names and
    entries the runtime-env hook passes on to Ray workers. A manifest is data: a name the
    client would have refused, or an entry that leaves the project, is dropped.

    Args:
        environ: the runner's environment (the node's ``PYTHONPATH``).
        job_dir: the Ray Job's package folder, which Ray put on the runner's
            ``PYTHONPATH``: the runner's, not the stage's.

    Returns:
        ``(to_set, to_unset)``.
    """
    named = {k: v for k, v in env.items()
             if isinstance(k, str) and _NAME.fullmatch(k) and isinstance(v, str) and refusal(k) is None
             and "\0" not in v}
    rels = [str(r) for r in pythonpath if safe_entry(r)]
    skip = os.path.realpath(job_dir) if job_dir else None
    node = [p for p in (environ.get("PYTHONPATH") or "").split(os.pathsep)
            if p and (skip is None or os.path.realpath(p) != skip)]
    paths = [os.fspath(dvc_root if r == "." else dvc_root / r) for r in rels]
    to_set = {**named, ENV_VAR: ",".join(sorted(named)), PYTHONPATH_VAR: os.pathsep.join(rels)}
    full = list(dict.fromkeys(paths + node))
    if full:
        to_set["PYTHONPATH"] = os.pathsep.join(full)
    return to_set, ([] if full else ["PYTHONPATH"])
