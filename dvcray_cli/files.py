"""dvcray's own files on this machine: where they live, how they are written and read.

Two places, each spelled here only:

- ``~/.dvcray/`` (``home()``): machine-wide state of this user: the clusters
  dvcray started on this machine (``clusters/``), pointers to AWS clusters
  (``aws/``), clusters started through Ray's launcher from any YAML, with their
  tokens (``launcher/``: any clone of a project finds its clusters there), the
  wheel of this dvcray that nodes install (``dist/``), the default local store
  (``store/``), cached cluster facts.
- ``<git root>/.dvcray/`` (``repo_dir()``): state of one project: the runs this
  clone submitted (``runs/``) and the clusters it started in the cloud
  (``clusters/``). It holds a ``.gitignore`` of ``*`` (as ``.pytest_cache``
  does), so it never shows in ``git status`` and never travels in a snapshot.

Every write is atomic (a temp file in the same folder, then ``os.replace``): a
reader never sees half a record. Every read is tolerant: a missing, torn or
invalid file, or JSON that is not an object, reads as ``None``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dvcray_cli.errors import UsageError

DIR_NAME = ".dvcray"
IGNORE_ALL = "# Created by dvcray: its state never goes into git.\n*\n"


# --------------------------------------------------------------------------- ~/.dvcray


def home() -> Path:
    """``~/.dvcray``: this user's machine-wide dvcray state."""
    return Path.home() / DIR_NAME


def clusters_dir() -> Path:
    """``~/.dvcray/clusters``: the clusters dvcray started on this machine."""
    return home() / "clusters"


def aws_index_dir() -> Path:
    """``~/.dvcray/aws``: pointers to the records of AWS clusters, wherever their repo is."""
    return home() / "aws"


def launcher_dir() -> Path:
    """``~/.dvcray/launcher``: clusters started through Ray's cluster launcher from a YAML,
    keyed by a name every clone of their project computes alike."""
    return home() / "launcher"


def dist_dir() -> Path:
    """``~/.dvcray/dist``: the wheel of this dvcray that ``cluster up`` ships to nodes."""
    return home() / "dist"


def default_store_dir() -> Path:
    """``~/.dvcray/store``: the store when the project names none."""
    return home() / "store"


def sha256_of(path: Path) -> str:
    """The sha256 of the file at ``path``, in hex."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def private_dir(path: Path) -> Path:
    """Create ``path`` (and ``~/.dvcray``) readable by this user only; return it."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    if path.parent == home():
        os.chmod(home(), 0o700)
    return path


# --------------------------------------------------------------------------- <repo>/.dvcray


def repo_dir(git_root: Path, create: bool = True) -> Path:
    """``<git root>/.dvcray``, made with its ``.gitignore`` of ``*`` when ``create``."""
    path = Path(git_root) / DIR_NAME
    if create:
        path.mkdir(exist_ok=True)
        ignore = path / ".gitignore"
        if not ignore.exists():
            ignore.write_text(IGNORE_ALL)
    return path


def repo_dir_of(start: Path, create: bool = True) -> Path:
    """``repo_dir`` of the git repository around ``start``.

    Raises:
        UsageError: ``start`` is not inside a git work tree.
    """
    from dvcray_cli.gitutil import git_root

    root = git_root(Path(start))
    if root is None:
        raise UsageError(f"{start} is not inside a git repository.",
                         "Run dvcray from inside your project's git repository.")
    return repo_dir(root, create)


def runs_dir(git_root: Path, create: bool = False) -> Path:
    """``<repo>/.dvcray/runs``: one record per run this clone submitted."""
    path = repo_dir(git_root, create) / "runs"
    if create:
        path.mkdir(exist_ok=True)
    return path


def repo_clusters_dir(git_root: Path, create: bool = False) -> Path:
    """``<repo>/.dvcray/clusters``: clusters this project started through a launcher."""
    path = repo_dir(git_root, create) / "clusters"
    if create:
        private_dir(path)
    return path


# --------------------------------------------------------------------------- atomic I/O


def write_bytes(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """Write ``data`` to ``path`` atomically, with ``mode``; folders are made as needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_json(path: Path, data: Any, mode: int = 0o600) -> Path:
    """Write ``data`` as JSON to ``path`` atomically."""
    return write_bytes(path, json.dumps(data, indent=2, default=str).encode(), mode)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable, torn, or not an object."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def parse_json_object(data: bytes | str) -> dict[str, Any] | None:
    """``data`` as a JSON object, or None when it is not one (torn, invalid, a list...)."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def env_seconds(name: str, default: float) -> float:
    """A duration in seconds from the environment variable ``name``.

    Raises:
        UsageError: it is set to something that is not a number of seconds.
    """
    return env_number(name, default, "seconds")


def env_number(name: str, default: float, unit: str) -> float:
    """A number of ``unit`` (0 or more) from the environment variable ``name``.

    Raises:
        UsageError: it is set to something that is not such a number.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise UsageError(f"{name}={raw} is not a number of {unit}.", f"Set it to e.g. {name}={default:g}, or unset it.")
    return value


def from_json(cls: type, data: Any) -> Any:
    """An instance of dataclass ``cls`` from ``data``: unknown keys are ignored,
    and anything that is not a mapping with the required keys gives None."""
    import dataclasses

    if not isinstance(data, dict):
        return None
    known = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError:
        return None
