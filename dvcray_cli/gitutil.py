"""Small wrappers around the git command line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from dvcray_cli.errors import GitError, UsageError

IDENTITY_HINT = (
    'Set one with: git config --global user.name "Your Name" && '
    'git config --global user.email "you@example.com"'
)


def git(*args: str, cwd: Path | str, check: bool = True, env: dict | None = None,
        input: bytes | None = None) -> str:
    """Run git and return its stdout (stripped).

    Raises:
        GitError: git failed and ``check`` is set (exit 2: the repository is not
            in a state the command can use).
    """
    proc = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, input=input,
        env={**os.environ, **env} if env else None,
    )
    if check and proc.returncode != 0:
        raise GitError(
            f"git {' '.join(args)} failed: {proc.stderr.decode(errors='replace').strip()}"
        )
    return proc.stdout.decode(errors="replace").strip()


def git_root(path: Path) -> Path | None:
    """The top of the git work tree that holds ``path``, or None."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    proc = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=probe, capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None
    return Path(proc.stdout.strip()).resolve()


def root_commit(path: Path) -> str | None:
    """The first commit of the repository around ``path`` (the oldest root, when
    there are several): the same in every clone of a project. None without one."""
    proc = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=path, capture_output=True,
                          text=True)
    roots = sorted(proc.stdout.split()) if proc.returncode == 0 else []
    if not roots:
        return None
    if len(roots) == 1:
        return roots[0]
    dated = subprocess.run(["git", "log", "--no-walk", "--format=%ct %H", *roots], cwd=path,
                           capture_output=True, text=True).stdout.split("\n")
    return min((line.split() for line in dated if line.strip()), key=lambda p: (int(p[0]), p[1]))[1]


def identity(cwd: Path) -> tuple[str, str]:
    """The user's git name and email, as a commit made in ``cwd`` would use.

    Raises:
        UsageError: none is configured (git's guess from the host name is not
            used: a fresh clone on a cluster node could not make the same guess).
    """
    values = []
    for key, envs in (("user.name", ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME")),
                      ("user.email", ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"))):
        value = next((os.environ[e] for e in envs if os.environ.get(e)), "")
        if not value:
            value = git("config", "--get", key, cwd=cwd, check=False)
        if not value:
            raise UsageError("No git identity: git needs a name and email to commit.", IDENTITY_HINT)
        values.append(value)
    return values[0], values[1]


def dvc_root(start: Path, git_top: Path) -> Path | None:
    """The nearest folder at or above ``start`` (not above ``git_top``) that holds ``.dvc/``."""
    probe = start
    while True:
        if (probe / ".dvc").is_dir():
            return probe
        if probe == git_top or probe.parent == probe:
            return None
        probe = probe.parent
