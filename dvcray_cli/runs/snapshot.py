"""The workspace as ``dvc exp run`` would see it, packed to travel to a cluster.

Ray's ``working_dir`` packaging drops ``.git`` (DESIGN.md), so the repo travels
as files: a git bundle of HEAD's history, the binary diff of tracked changes
(staged and unstaged) against HEAD, and a tar of the untracked files git does
not ignore. Never ``.dvc/cache``, ``.dvc/tmp``, ``.dvc/config.local``, ``.dvcray/``
or ignored files.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from dvcray_cli.errors import GitError
from dvcray_cli.gitutil import git
from dvcray_cli.runs.model import Manifest

BUNDLE = "repo.bundle"
PATCH = "changes.patch"
UNTRACKED = "untracked.tar"

# Relative to the DVC root. These never travel, even when git does not ignore them.
NEVER = (".dvc/cache", ".dvc/tmp", ".dvc/config.local", ".dvcray")


def _excluded(rel_to_dvc_root: str) -> bool:
    return any(rel_to_dvc_root == n or rel_to_dvc_root.startswith(n + "/") for n in NEVER)


def create(git_root: Path, dvc_root: Path, out: Path, copy_paths: list[str] = ()) -> dict[str, int]:
    """Write the snapshot of the workspace at ``git_root`` into folder ``out``.

    ``copy_paths`` (relative to the DVC root) travel even when git ignores them,
    as with ``dvc exp run -C``.

    Returns:
        Sizes in bytes of the parts, for reporting.
    """
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    git("bundle", "create", "-q", os.fspath(out / BUNDLE), "HEAD", cwd=git_root)
    diff = _run_bytes(["git", "diff", "--binary", "--full-index", "--no-ext-diff", "--no-color",
                       "HEAD"], git_root)
    (out / PATCH).write_bytes(diff)

    prefix = dvc_root.relative_to(git_root).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    listed = _run_bytes(["git", "ls-files", "--others", "--exclude-standard", "-z"], git_root)
    untracked = [p for p in listed.decode().split("\0") if p]
    with tarfile.open(out / UNTRACKED, "w") as tar:
        for rel in untracked:
            inner = rel[len(prefix):] if rel.startswith(prefix) else None
            if inner is not None and _excluded(inner):
                continue
            tar.add(git_root / rel, arcname=rel, recursive=False)
        for extra in copy_paths:
            path = (dvc_root / extra)
            if not path.exists():
                continue
            tar.add(path, arcname=prefix + Path(extra).as_posix())
    return {name: (out / name).stat().st_size for name in (BUNDLE, PATCH, UNTRACKED)}


def restore(folder: Path, dest: Path, manifest: Manifest) -> Path:
    """Rebuild the workspace from a snapshot: clone, check out the baseline,
    apply the changes without committing. Returns the DVC root in ``dest``."""
    import subprocess

    subprocess.run(["git", "clone", "-q", "--no-checkout", os.fspath(folder / BUNDLE), os.fspath(dest)],
                   check=True, capture_output=True)
    git("checkout", "-q", "--detach", manifest.baseline, cwd=dest)
    # The clone must commit as the user: DVC's experiment commit uses it.
    git("config", "user.name", manifest.git_name, cwd=dest)
    git("config", "user.email", manifest.git_email, cwd=dest)
    # The bundle's remote is of no use on the cluster, and DVC would try to fetch from it.
    git("remote", "remove", "origin", cwd=dest, check=False)
    patch = folder / PATCH
    if patch.stat().st_size:
        git("apply", "--binary", "--whitespace=nowarn", os.fspath(patch), cwd=dest)
    with tarfile.open(folder / UNTRACKED) as tar:
        tar.extractall(dest, filter="tar")
    return dest / manifest.subdir if manifest.subdir else dest


def _run_bytes(cmd: list[str], cwd: Path) -> bytes:
    import subprocess

    proc = subprocess.run(cmd, cwd=cwd, capture_output=True)
    if proc.returncode != 0:
        raise GitError(f"{' '.join(cmd)} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout
