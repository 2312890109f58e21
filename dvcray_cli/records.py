"""What the client remembers about runs it submitted: ``.dvcray/runs/RUN_ID.json``.

``.dvcray/`` holds a ``.gitignore`` of ``*`` so it never shows in ``git status``
and never travels in a snapshot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _runs(git_root: Path) -> Path:
    from dvcray_cli.cluster import state_dir

    folder = state_dir(git_root) / "runs"
    folder.mkdir(exist_ok=True)
    return folder


def save(git_root: Path, record: dict[str, Any]) -> None:
    (_runs(git_root) / f"{record['run_id']}.json").write_text(json.dumps(record, indent=2))


def load(git_root: Path, run_id: str) -> dict[str, Any] | None:
    path = git_root / ".dvcray" / "runs" / f"{run_id}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def update(git_root: Path, run_id: str, **changes: Any) -> None:
    record = load(git_root, run_id)
    if record is not None:
        record.update({k: v for k, v in changes.items() if v is not None})
        save(git_root, record)


def all_records(git_root: Path) -> list[dict[str, Any]]:
    folder = git_root / ".dvcray" / "runs"
    if not folder.is_dir():
        return []
    found = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    return sorted(found, key=lambda r: r.get("submitted", 0), reverse=True)
