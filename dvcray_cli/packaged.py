"""Files that ship inside the package: templates and cluster configs."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _packaged(name: str, top_level: str) -> Path:
    """The folder ``name`` inside the installed package.

    In a wheel, templates/ and cluster-configs/ are copied into the package
    (pyproject.toml, force-include). An editable install points at the source
    tree instead, where they sit beside the package at the top of the repo.
    """
    inside = Path(str(files("dvcray_cli") / name))
    if inside.is_dir():
        return inside
    return Path(__file__).resolve().parent.parent / top_level


def templates_dir() -> Path:
    return _packaged("templates", "templates")


def cluster_configs_dir() -> Path:
    return _packaged("cluster_configs", "cluster-configs")
