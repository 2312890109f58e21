"""A project's dvcray settings: ``[tool.dvcray]`` in the project's ``pyproject.toml``.

Why there: ``[tool.NAME]`` is where Python tools keep a project's settings (pytest,
ruff, mypy, black), it is committed, so every clone and every CI job sees the same
values; DVC's own ``.dvc/config`` refuses sections it does not know, and
``params.yaml`` holds the experiment's parameters (a setting there would change
the experiments). The file is looked for at the DVC project's root, then at the
git root (a project made with ``dvc init --subdir``).

Example::

    [tool.dvcray]
    env = ["PYTHONHASHSEED", "OMP_NUM_THREADS"]   # passed to every run's stage and its Ray workers
    retries = 2                                   # runs lost with their machine are submitted again

Unknown keys and wrong types are refused by name: a typo must not be silently ignored.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dvcray_cli.errors import UsageError

FILE = "pyproject.toml"
TABLE = "tool.dvcray"


@dataclass
class Settings:
    """What ``[tool.dvcray]`` says (None or empty where it says nothing)."""

    env: list[str] = field(default_factory=list)  # names of variables every run carries
    retries: int | None = None                    # how often a run lost with its machine is retried
    path: Path | None = None                      # the file they came from


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib

        with open(path, "rb") as handle:
            return tomllib.load(handle)
    import tomlkit  # DVC's own dependency: Python 3.10 has no tomllib

    return tomlkit.parse(path.read_text()).unwrap()


def find(dvc_root: Path, git_root: Path | None = None) -> Path | None:
    """The ``pyproject.toml`` whose ``[tool.dvcray]`` applies, or None."""
    for folder in dict.fromkeys(p for p in (dvc_root, git_root) if p is not None):
        candidate = Path(folder) / FILE
        if candidate.is_file():
            return candidate
    return None


def read(dvc_root: Path, git_root: Path | None = None) -> Settings:
    """The project's settings; empty when there is no ``[tool.dvcray]``.

    Raises:
        UsageError: the file does not parse, or the table has an unknown key or a
            value of the wrong type (each named, with what is expected).
    """
    path = find(dvc_root, git_root)
    if path is None:
        return Settings()
    try:
        data = _load_toml(path)
    except Exception as exc:  # tomllib.TOMLDecodeError, tomlkit's ParseError
        raise UsageError(f"{path} is not valid TOML: {exc}", f"Fix it; dvcray reads [{TABLE}] from it.") from None
    table = (data.get("tool") or {}).get("dvcray")
    if table is None:
        return Settings(path=path)
    if not isinstance(table, dict):
        raise UsageError(f"[{TABLE}] in {path} must be a table.", _EXAMPLE)
    known = [f.name for f in fields(Settings) if f.name != "path"]
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise UsageError(f"Unknown key(s) in [{TABLE}] of {path}: {', '.join(unknown)}.",
                         f"Known keys: {', '.join(known)}. {_EXAMPLE}")
    settings = Settings(path=path)
    env = table.get("env", [])
    if not isinstance(env, list) or not all(isinstance(n, str) and n for n in env):
        raise UsageError(f"[{TABLE}] env in {path} must be a list of variable names.", _EXAMPLE)
    settings.env = list(env)
    if "retries" in table:
        retries = table["retries"]
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise UsageError(f"[{TABLE}] retries in {path} must be a whole number, 0 or more (not {retries!r}).",
                             _EXAMPLE)
        settings.retries = retries
    return settings


_EXAMPLE = 'Example: [tool.dvcray] env = ["OMP_NUM_THREADS"], retries = 3'
