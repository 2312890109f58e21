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


def restore(folder: Path, dest: Path, manifest: Manifest, patch: str = "") -> Path:
    """Rebuild the workspace from a snapshot: clone, check out the baseline,
    apply the changes (``patch``: another file of the snapshot than the workspace's,
    e.g. a queued experiment's) without committing. Returns the DVC root in ``dest``."""
    import subprocess

    subprocess.run(["git", "clone", "-q", "--no-checkout", os.fspath(folder / BUNDLE), os.fspath(dest)],
                   check=True, capture_output=True)
    git("checkout", "-q", "--detach", manifest.baseline, cwd=dest)
    # The clone must commit as the user: DVC's experiment commit uses it.
    git("config", "user.name", manifest.git_name, cwd=dest)
    git("config", "user.email", manifest.git_email, cwd=dest)
    # The bundle's remote is of no use on the cluster, and DVC would try to fetch from it.
    git("remote", "remove", "origin", cwd=dest, check=False)
    changes = folder / (patch or PATCH)
    if changes.stat().st_size:
        git("apply", "--binary", "--whitespace=nowarn", os.fspath(changes), cwd=dest)
    with tarfile.open(folder / UNTRACKED) as tar:
        tar.extractall(dest, filter="tar")
    return dest / manifest.subdir if manifest.subdir else dest


def _run_bytes(cmd: list[str], cwd: Path) -> bytes:
    import subprocess

    proc = subprocess.run(cmd, cwd=cwd, capture_output=True)
    if proc.returncode != 0:
        raise GitError(f"{' '.join(cmd)} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def create_queued(git_root: Path, dvc_root: Path, out: Path, entries: list[tuple[str, str, str]]) -> dict[str, int]:
    """Write a snapshot of experiments queued with ``dvc exp run --queue`` into ``out``.

    Each entry ``(patch file, baseline, stash commit)`` travels as the changes of
    its stash commit against its baseline: the workspace it was queued with
    (uncommitted edits and ``-S`` values included), never DVC's internal stash
    commit itself, and never ``.dvc/tmp`` (where ``repro.dat`` holds DVC's pickled
    run variables, a Studio token included). The bundle holds HEAD and every
    baseline; the workspace's own changes and untracked files do not travel (as
    with DVC's queue).

    Returns:
        Sizes in bytes of the parts, for reporting.
    """
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    bases = sorted({base for _, base, _ in entries})
    git("bundle", "create", "-q", os.fspath(out / BUNDLE), "HEAD", *bases, cwd=git_root)
    (out / PATCH).write_bytes(b"")
    with tarfile.open(out / UNTRACKED, "w"):
        pass
    prefix = dvc_root.relative_to(git_root).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    never = [f":(exclude){prefix}{n}" for n in NEVER] + [":(exclude,glob)**/.dvc/tmp/**"]
    sizes = {name: (out / name).stat().st_size for name in (BUNDLE, PATCH, UNTRACKED)}
    for name, base, rev in entries:
        # diff-tree is plumbing: no diff.noprefix, external drivers or textconv can change it.
        diff = _run_bytes(["git", "diff-tree", "-r", "-p", "--binary", "--full-index", "--no-color",
                           "--no-renames", base, rev, "--", ".", *never], git_root)
        (out / name).write_bytes(diff)
        sizes[name] = len(diff)
    return sizes
