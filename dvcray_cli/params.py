"""Parameter overrides (``-S`` / ``--set``), parsed and applied with DVC's own code.

DVC's ``dvc exp run -S`` uses Hydra's override grammar. An unknown key there
fails with a bare "Invalid `--set-param` value"; here it fails naming the key.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from dvcray_cli.errors import UsageError


def _has_key(data: Any, dotted: str) -> bool:
    node = data
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _leaf_keys(data: Any, prefix: str = "") -> list[str]:
    if not isinstance(data, dict) or not data:
        return [prefix] if prefix else []
    keys: list[str] = []
    for key, value in data.items():
        keys.extend(_leaf_keys(value, f"{prefix}.{key}" if prefix else str(key)))
    return keys


def group(sets: list[str]) -> dict[str, list[str]]:
    """``["a=1", "other.yaml:b=2"]`` -> ``{"params.yaml": ["a=1"], "other.yaml": ["b=2"]}``."""
    from dvc.utils.cli_parse import to_path_overrides

    return to_path_overrides(sets)


def keys(sets: list[str]) -> set[str]:
    """The parameter keys that overrides set or delete (``a.b=1``, ``other.yaml:c=2``,
    ``+new=1``, ``~old`` -> ``a.b``, ``c``, ``new``, ``old``), read with DVC's and Hydra's
    own parsers. Overrides ``check`` accepted.
    """
    if not sets:
        return set()
    from dvc.utils.hydra import to_hydra_overrides

    return {o.key_or_group for overrides in group(sets).values() for o in to_hydra_overrides(overrides)}


def check(root: Path, sets: list[str], flag: str = "-S", where: str | None = None) -> dict[str, list[str]]:
    """Validate overrides against the params files under ``root``.

    Applies them to throwaway copies, so every error DVC would hit shows up
    here, before anything is changed or submitted.

    Args:
        root: the folder that holds the params files.
        sets: the overrides as typed (``KEY=VALUE``, ``FILE:KEY=VALUE``).
        flag: the option's name, for messages.
        where: how messages name ``root`` (default: its path).

    Returns:
        The overrides grouped by params file (relative to ``root``).

    Raises:
        UsageError: a missing file, bad syntax, or an unknown key (named).
    """
    if not sets:
        return {}
    from dvc.utils.hydra import apply_overrides, to_hydra_overrides
    from dvc.utils.serialize import LOADERS

    grouped = group(sets)
    for path, overrides in grouped.items():
        file = root / path
        if not file.is_file():
            raise UsageError(f"{flag} names params file '{path}', which does not exist in {where or root}.")
        try:
            parsed = to_hydra_overrides(overrides)
        except Exception as exc:  # hydra's OverrideParseException and friends
            raise UsageError(
                f"Bad {flag} value {overrides}: {str(exc).splitlines()[0]}",
                "Use DVC's syntax: KEY=VALUE, +NEW_KEY=VALUE, ~KEY to delete.",
            ) from None
        data = LOADERS[file.suffix.lower()](file)
        for override in parsed:
            key = override.key_or_group
            if not key:  # hydra accepts "=3"; DVC would then fail without a word
                raise UsageError(f"Bad {flag} value {overrides}: a KEY is missing before '='.",
                                 "Use DVC's syntax: KEY=VALUE, +NEW_KEY=VALUE, ~KEY to delete.")
            if override.is_add() or override.is_force_add():
                continue
            if not _has_key(data, key):
                known = ", ".join(_leaf_keys(data)[:12]) or "(none)"
                raise UsageError(
                    f"Unknown parameter '{key}' in {path}.",
                    f"Known keys: {known}. To add a new key, write +{key}=VALUE.",
                )
        if any(o.is_sweep_override() for o in parsed):
            continue  # a sweep cannot be applied to one copy; its keys were checked
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / file.name
            shutil.copyfile(file, copy)
            try:
                apply_overrides(copy, overrides)
            except Exception as exc:
                cause = exc.__cause__ or exc
                raise UsageError(f"Bad {flag} value {overrides}: {str(cause).splitlines()[0]}") from None
    return grouped


def is_sweep(sets: list[str]) -> bool:
    """True when any override expands to several values (``a=1,2``, ``range(...)``).

    An override that does not parse is no sweep: ``check`` says what is wrong with it.
    """
    if not sets:
        return False
    from dvc.utils.hydra import to_hydra_overrides

    try:
        return any(o.is_sweep_override() for ov in group(sets).values() for o in to_hydra_overrides(ov))
    except Exception:  # noqa: BLE001 - hydra's parse errors: reported by check()
        return False


def apply(root: Path, grouped: dict[str, list[str]]) -> None:
    """Write checked overrides into the params files under ``root``."""
    from dvc.utils.hydra import apply_overrides

    for path, overrides in grouped.items():
        apply_overrides(root / path, overrides)
