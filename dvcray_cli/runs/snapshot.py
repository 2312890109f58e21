"""The workspace as ``dvc exp run`` would see it, packed to travel to a cluster.

Ray's ``working_dir`` packaging drops ``.git`` (DESIGN.md), so the repo travels
as files: a git bundle of HEAD's history, the binary diff of tracked changes
(staged and unstaged) against HEAD, and a tar of the untracked files git does
not ignore. Never ``.dvc/cache``, ``.dvc/tmp``, ``.dvc/config.local``, ``.dvcray/``
or ignored files.

The snapshot does not depend on the user's git settings: the diff is made with
git's defaults forced (prefixes, no external diff drivers or textconv, no
renames, no colour) and applied on the cluster with the node's settings kept
out (autocrlf, LFS filters). Files marked assume-unchanged or skip-worktree,
which ``git diff`` does not see, travel with their flags, so DVC's commit
treats them on the cluster as it would locally. What cannot be reproduced
(submodules, a merge or rebase in progress) is refused with a message.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dvcray_cli import files
from dvcray_cli.errors import GitError, UsageError
from dvcray_cli.gitutil import git
from dvcray_cli.runs.model import Manifest

BUNDLE = "repo.bundle"
PATCH = "changes.patch"
UNTRACKED = "untracked.tar"

# Relative to the DVC root. These never travel, even when git does not ignore them.
NEVER = (".dvc/cache", ".dvc/tmp", ".dvc/config.local", ".dvcray")

# git's defaults, whatever the user's config says: a patch made with other
# prefixes (diff.noprefix, mnemonicPrefix, src/dstPrefix) can apply to the
# wrong file without an error (DESIGN.md, Facts).
_DIFF_CONFIG = ("diff.noprefix=false", "diff.mnemonicPrefix=false", "diff.relative=false",
                "diff.suppressBlankEmpty=false", "core.quotePath=true", "diff.external=")
_DIFF_ARGS = ("diff", "--binary", "--full-index", "--no-ext-diff", "--no-textconv", "--no-color", "--no-renames",
              "--src-prefix=a/", "--dst-prefix=b/", "--ignore-submodules=all", "HEAD", "--")
# What git's state files say is going on; a workspace in the middle of one is refused.
_IN_PROGRESS = {"MERGE_HEAD": "a merge", "rebase-merge": "a rebase", "rebase-apply": "a rebase or git am",
                "CHERRY_PICK_HEAD": "a cherry-pick", "REVERT_HEAD": "a revert"}


@dataclass
class Snapshot:
    """What was packed: the parts' sizes and the worktree flags the runner restores."""

    sizes: dict[str, int]
    flags: dict[str, list[str]] = field(default_factory=dict)  # assume_unchanged, skip_worktree, absent

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


def _excluded(rel_to_dvc_root: str) -> bool:
    return any(rel_to_dvc_root == n or rel_to_dvc_root.startswith(n + "/") for n in NEVER)


def _run_bytes(args: list[str], cwd: Path, config: tuple[str, ...] = ()) -> bytes:
    cmd = ["git"] + [part for c in config for part in ("-c", c)] + args
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True)
    if proc.returncode != 0:
        raise GitError(f"{' '.join(['git', *args])} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _paths(raw: bytes) -> list[str]:
    """NUL-separated paths from git, as the file system names them (non-UTF-8 names kept)."""
    return [os.fsdecode(p) for p in raw.split(b"\0") if p]


def check_workspace(git_root: Path) -> None:
    """Refuse what a snapshot cannot reproduce on a cluster.

    Raises:
        UsageError: a merge, rebase, cherry-pick or revert in progress; submodules.
    """
    git_dir = Path(git("rev-parse", "--absolute-git-dir", cwd=git_root))
    for name, what in _IN_PROGRESS.items():
        if (git_dir / name).exists():
            raise UsageError(f"The repository is in the middle of {what}: the workspace is not one an experiment "
                             "can start from.", "Finish or abort it first (git status says how), then rerun.")
    gitlinks = [line.split("\t", 1)[1] for line in
                _run_bytes(["ls-files", "-s"], git_root).decode(errors="replace").splitlines()
                if line.startswith("160000 ")]
    if gitlinks:
        raise UsageError(f"The repository has git submodules ({', '.join(gitlinks[:5])}), which dvcray cannot "
                         "ship to a cluster.", "Run the experiment locally with dvc exp run, or vendor the submodules.")


def check_copy_paths(dvc_root: Path, copy_paths: list[str]) -> None:
    """``-C`` paths must exist inside the DVC project and be none of what never travels.

    Raises:
        UsageError: naming the path and why.
    """
    root = dvc_root.resolve()
    for extra in copy_paths:
        path = dvc_root / extra
        if not path.exists() and not path.is_symlink():
            raise UsageError(f"-C {extra}: no such file or folder in {dvc_root}.",
                             "Give a path relative to the DVC project's root.")
        resolved = path.parent.resolve() / path.name
        if resolved != root and root not in resolved.parents:
            raise UsageError(f"-C {extra} is outside the DVC project ({dvc_root}).",
                             "Only files inside the project travel to the cluster.")
        rel = resolved.relative_to(root).as_posix() if resolved != root else "."
        if rel == "." or _excluded(rel):
            raise UsageError(f"-C {extra} is never sent to a cluster: it is DVC's or dvcray's own state "
                             "(cache, tmp, config.local with its credentials).",
                             "Name the files the stage needs instead.")


def _flagged(git_root: Path) -> dict[str, list[str]]:
    """Tracked files git stops looking at: assume-unchanged (``h``), skip-worktree (``S``)."""
    flags: dict[str, list[str]] = {"assume_unchanged": [], "skip_worktree": [], "absent": []}
    for entry in _paths(_run_bytes(["ls-files", "-v", "-z"], git_root)):
        tag, path = entry[:1], entry[2:]
        if tag == "S":
            flags["skip_worktree"].append(path)
        elif tag.islower():
            flags["assume_unchanged"].append(path)
        else:
            continue
        if not os.path.lexists(git_root / path):
            flags["absent"].append(path)  # e.g. outside a sparse checkout's cone
    return {k: v for k, v in flags.items() if v}


def create(git_root: Path, dvc_root: Path, out: Path, copy_paths: list[str] = (),
           against: list[str] | None = None) -> Snapshot:
    """Write the snapshot of the workspace at ``git_root`` into folder ``out``.

    ``copy_paths`` (relative to the DVC root) travel even when git ignores them,
    as with ``dvc exp run -C``; symbolic links travel as links, never followed.
    ``against``: commits the cluster has (its repository cache, ``cache_has``): the
    bundle then holds only what it lacks, and none at all when it has HEAD.
    None: the whole history.

    Returns:
        The parts' sizes, for reporting, and the worktree flags for the manifest.

    Raises:
        UsageError: the workspace cannot be reproduced (``check_workspace``,
            ``check_copy_paths``).
    """
    check_workspace(git_root)
    check_copy_paths(dvc_root, list(copy_paths))
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    write_bundle(git_root, out / BUNDLE, against)
    (out / PATCH).write_bytes(_run_bytes(list(_DIFF_ARGS), git_root, _DIFF_CONFIG))

    prefix = dvc_root.relative_to(git_root).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    untracked = _paths(_run_bytes(["ls-files", "--others", "--exclude-standard", "-z"], git_root))
    check_untracked_sizes(git_root, untracked)
    flags = _flagged(git_root)
    # git diff does not see edits to flagged files: their content travels as is.
    present = [p for p in flags.get("assume_unchanged", []) + flags.get("skip_worktree", [])
               if p not in flags.get("absent", [])]

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        inner = info.name[len(prefix):] if info.name.startswith(prefix) else None
        return None if inner is not None and _excluded(inner) else info

    with tarfile.open(out / UNTRACKED, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in untracked + present:
            info = keep(tar.gettarinfo(git_root / rel, arcname=rel))
            if info is None:
                continue
            if info.isreg():
                with open(git_root / rel, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
        for extra in copy_paths:
            path = dvc_root / extra
            tar.add(path, arcname=prefix + Path(extra).as_posix(), filter=keep)
    sizes = {name: (out / name).stat().st_size for name in (BUNDLE, PATCH, UNTRACKED) if (out / name).exists()}
    return Snapshot(sizes, flags)


def write_bundle(git_root: Path, path: Path, against: list[str] | None = None) -> bool:
    """A git bundle of HEAD at ``path``, without what ``against`` commits already hold
    (a thin bundle); none when HEAD is one of them. Returns whether one was written."""
    head = git("rev-parse", "HEAD", cwd=git_root)
    path.unlink(missing_ok=True)
    if against and head in against:
        return False
    git("bundle", "create", "-q", os.fspath(path), "HEAD", *(f"^{sha}" for sha in against or ()), cwd=git_root)
    return True


def via_store_bytes() -> int:
    """A snapshot larger than this goes to a Ray Job's runner through the store, not as
    the job's package (``DVCRAY_SNAPSHOT_VIA_STORE_MB``, default 10: Ray warns about a
    package file from 10 MiB and refuses a package of 512 MiB)."""
    from dvcray_cli.files import env_number

    return int(env_number("DVCRAY_SNAPSHOT_VIA_STORE_MB", 10, "MiB") * 2**20)


def max_untracked_bytes() -> int:
    """The largest untracked file a snapshot takes (``DVCRAY_MAX_UNTRACKED_MB``, default 50)."""
    from dvcray_cli.files import env_number

    return int(env_number("DVCRAY_MAX_UNTRACKED_MB", 50, "MiB") * 2**20)


def check_untracked(git_root: Path) -> None:
    """``check_untracked_sizes`` of the workspace's untracked files (preflight).

    Raises:
        UsageError: one is too big.
    """
    check_untracked_sizes(git_root, _paths(_run_bytes(["ls-files", "--others", "--exclude-standard", "-z"],
                                                      git_root)))


def check_untracked_sizes(git_root: Path, untracked: list[str]) -> None:
    """Untracked files travel with every run: a big one is almost always data that
    belongs in DVC or in ``.gitignore``, and is refused by name.

    Raises:
        UsageError: an untracked file is larger than ``max_untracked_bytes()``.
    """
    limit = max_untracked_bytes()
    for rel in untracked:
        try:
            info = os.lstat(git_root / rel)
        except OSError:
            continue
        if info.st_size > limit and not os.path.islink(git_root / rel):
            raise UsageError(
                f"The untracked file {rel} is {info.st_size / 2**20:.0f} MiB: untracked files travel to the cluster "
                f"with every run, and this one is over dvcray's limit of {limit / 2**20:.0f} MiB.",
                f"Track it with DVC (dvc add {rel}) or ignore it (.gitignore), then rerun "
                "(or raise the limit: DVCRAY_MAX_UNTRACKED_MB).")


# --------------------------------------------------------------------------- the cluster's repository cache

# Every commit a cache was sent stays reachable from a ref of its own, so nothing it
# holds is ever pruned; a commit the cache has comes with its whole history (git
# fetch checks that).
_KEEP = "refs/dvcray/have/"


def bundle_commits(git_root: Path, against: list[str] | None = None) -> int:
    """How many commits ``write_bundle`` puts in a bundle of HEAD made against ``against``."""
    head = git("rev-parse", "HEAD", cwd=git_root)
    if against and head in against:
        return 0
    return int(git("rev-list", "--count", "HEAD", *(f"^{sha}" for sha in against or ()), cwd=git_root) or 0)


def history(git_root: Path, depth: int = 16) -> tuple[str, list[str]]:
    """``(root, samples)``: the first commit of HEAD's first-parent history (the key of the
    project's repository cache on the nodes, which every clone shares), and HEAD with its
    first-parent ancestors 1, 2, 4, ... commits back: what a client asks a cluster about
    (a commit it has is a base the bundle can leave out). One walk of the history."""
    out = subprocess.run(["git", "rev-list", "--first-parent", "HEAD"], cwd=git_root, capture_output=True,
                         text=True).stdout.split()
    if not out:
        raise GitError("git rev-list HEAD found no commit")
    return out[-1], [out[i] for i in [0] + [2 ** k for k in range(depth)] if i < len(out)]


def cache_path(base: Path, root: str) -> Path:
    return base / "repos" / f"{root}.git"


def _cache_lock(cache: Path):
    import fcntl

    files.private_dir(cache.parent)  # the project's history: this user's alone on a shared node
    handle = open(cache.parent / f"{cache.name}.lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def cache_has(cache: Path, shas: list[str]) -> list[str]:
    """The commits among ``shas`` the cache holds (each with its whole history)."""
    shas = [s for s in shas if isinstance(s, str) and len(s) == 40 and all(c in "0123456789abcdef" for c in s)]
    if not shas or not (cache / "objects").is_dir():
        return []
    proc = subprocess.run(["git", "cat-file", "--batch-check"], cwd=cache, capture_output=True,
                          input="".join(f"{s}^{{commit}}\n" for s in shas).encode())
    lines = proc.stdout.decode(errors="replace").splitlines()
    return [sha for sha, line in zip(shas, lines) if " commit " in line]


def cache_fetch(cache: Path, bundle: Path | None, head: str) -> list[str]:
    """Bring a snapshot's bundle into the cache (made when missing).

    Returns:
        The commits the bundle needs that the cache lacks (it was wiped, or the
        client guessed wrong): then nothing was fetched and a full bundle is needed.
        Empty when the cache now holds ``head``.
    """
    with _cache_lock(cache):
        if not (cache / "objects").is_dir():
            subprocess.run(["git", "init", "-q", "--bare", os.fspath(cache)], check=True, capture_output=True)
            git("config", "gc.auto", "0", cwd=cache)
        if bundle is not None and bundle.exists():
            # The client's bundle names HEAD; one made from another node's cache, its kept ref.
            heads = subprocess.run(["git", "bundle", "list-heads", os.fspath(bundle)], cwd=cache,
                                   capture_output=True, text=True).stdout.split()
            ref = "HEAD" if "HEAD" in heads or len(heads) < 2 else heads[1]
            proc = subprocess.run(["git", "fetch", "-q", "--no-write-fetch-head", os.fspath(bundle),
                                   f"+{ref}:{_KEEP}{head}"], cwd=cache, capture_output=True, text=True)
            if proc.returncode != 0:
                missing = [w for w in proc.stderr.split() if len(w) == 40 and not cache_has(cache, [w])]
                if missing or "prerequisite" in proc.stderr:
                    return missing or ["(unknown)"]
                raise GitError(f"git fetch of the snapshot's bundle failed: {proc.stderr.strip()}")
        if not cache_has(cache, [head]):
            return [head]
        if bundle is None:
            git("update-ref", f"{_KEEP}{head}", head, cwd=cache)
    return []


def cache_bundle(cache: Path, head: str) -> bytes:
    """A bundle of ``head``'s whole history from a cache (for a node whose cache lacks it)."""
    with tempfile.TemporaryDirectory(prefix="dvcray-bundle-") as tmp:
        out = Path(tmp) / BUNDLE
        git("bundle", "create", "-q", os.fspath(out), f"{_KEEP}{head}", cwd=cache)
        return out.read_bytes()


def queued_files(patch: str) -> str:
    """The tar of a queued experiment's ``--copy-paths``, named after its patch file."""
    return f"{Path(patch).stem}.tar"


def restore(folder: Path, dest: Path, manifest: Manifest, patch: str = "", cache: Path | None = None) -> Path:
    """Rebuild the workspace from a snapshot: clone, check out the baseline,
    apply the changes (``patch``: another file of the snapshot than the workspace's,
    e.g. a queued experiment's) without committing. Returns the DVC root in ``dest``.

    ``cache``: the node's repository cache of the project (which the snapshot's
    bundle went into): the clone borrows its objects (``--shared``), so a long
    history costs nothing per run.

    The node's own git settings stay out: no line-ending conversion, and no LFS
    filter (the files are what git has, as locally without git-lfs)."""
    neutral = ["-c", "core.autocrlf=false", "-c", "core.eol=lf", "-c", "filter.lfs.smudge=cat",
               "-c", "filter.lfs.process=", "-c", "filter.lfs.required=false"]
    source = ["--shared", os.fspath(cache)] if cache is not None else [os.fspath(folder / BUNDLE)]
    subprocess.run(["git", *neutral, "clone", "-q", "--no-checkout", *source, os.fspath(dest)],
                   check=True, capture_output=True)
    for setting in neutral[1::2]:
        key, value = setting.split("=", 1)
        git("config", key, value, cwd=dest)
    git("checkout", "-q", "--detach", manifest.baseline, cwd=dest)
    # The clone must commit as the user: DVC's experiment commit uses it.
    git("config", "user.name", manifest.git_name, cwd=dest)
    git("config", "user.email", manifest.git_email, cwd=dest)
    # The bundle's remote is of no use on the cluster, and DVC would try to fetch from it.
    git("remote", "remove", "origin", cwd=dest, check=False)
    changes = folder / (patch or PATCH)
    if changes.stat().st_size:
        git("-c", "apply.whitespace=nowarn", "apply", "--binary", "--whitespace=nowarn", "-p1",
            os.fspath(changes), cwd=dest)
    with tarfile.open(folder / UNTRACKED) as tar:
        tar.extractall(dest, filter="tar")
    extra = folder / queued_files(patch) if patch else None
    if extra is not None and extra.is_file():  # a queued experiment's --copy-paths
        with tarfile.open(extra) as tar:
            tar.extractall(dest, filter="tar")
    flags = manifest.worktree_flags or {}
    for rel in flags.get("absent", []):
        (dest / rel).unlink(missing_ok=True)
    for flag, option in (("assume_unchanged", "--assume-unchanged"), ("skip_worktree", "--skip-worktree")):
        paths = flags.get(flag, [])
        if paths:
            git("update-index", option, "-z", "--stdin", cwd=dest,
                input=b"".join(os.fsencode(p) + b"\0" for p in paths))
    return dest / manifest.subdir if manifest.subdir else dest


def create_queued(git_root: Path, dvc_root: Path, out: Path,
                  entries: list[tuple[str, str, str, list[str]]]) -> Snapshot:
    """Write a snapshot of experiments queued with ``dvc exp run --queue`` into ``out``.

    Each entry ``(patch file, baseline, stash commit, copy paths)`` travels as the
    changes of its stash commit against its baseline: the workspace it was queued with
    (uncommitted edits and ``-S`` values included), never DVC's internal stash
    commit itself, and never ``.dvc/tmp`` (where ``repro.dat`` holds DVC's pickled
    run variables, a Studio token included). Its ``--copy-paths`` (relative to the DVC
    root) travel as they are in the workspace now, in a tar named as its patch
    (``queued-1.patch``: ``queued-1.tar``), as DVC copies them when it runs one. The
    bundle holds HEAD and every baseline; the workspace's own changes and untracked
    files do not travel (as with DVC's queue).

    Returns:
        The parts' sizes, for reporting.
    """
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    bases = sorted({entry[1] for entry in entries})
    git("bundle", "create", "-q", os.fspath(out / BUNDLE), "HEAD", *bases, cwd=git_root)
    (out / PATCH).write_bytes(b"")
    with tarfile.open(out / UNTRACKED, "w"):
        pass
    prefix = dvc_root.relative_to(git_root).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    never = [f":(exclude){prefix}{n}" for n in NEVER] + [":(exclude,glob)**/.dvc/tmp/**"]
    sizes = {name: (out / name).stat().st_size for name in (BUNDLE, PATCH, UNTRACKED)}
    for name, base, rev, copy_paths in entries:
        if copy_paths:
            check_copy_paths(dvc_root, copy_paths)
            with tarfile.open(out / queued_files(name), "w", format=tarfile.PAX_FORMAT) as tar:
                for extra in copy_paths:
                    tar.add(dvc_root / extra, arcname=prefix + Path(extra).as_posix(),
                            filter=lambda info: None if _excluded(info.name[len(prefix):]) else info)
            sizes[queued_files(name)] = (out / queued_files(name)).stat().st_size
        # diff-tree is plumbing: no diff.noprefix, external drivers or textconv can change it.
        diff = _run_bytes(["diff-tree", "-r", "-p", "--binary", "--full-index", "--no-color", "--no-renames",
                           "--src-prefix=a/", "--dst-prefix=b/", base, rev, "--", ".", *never], git_root)
        (out / name).write_bytes(diff)
        sizes[name] = len(diff)
    return Snapshot(sizes)


# The oldest patch levels whose tarfile has extraction filters (snapshots are unpacked with
# ``filter="data"``) and whose forkserver socket only its user can reach (CVE-2022-42919).
PYTHON_NEEDED = {(3, 10): 12, (3, 11): 4}


def interpreter_problem(version: tuple[int, ...] | None = None, has_filters: bool | None = None) -> str | None:
    """What is wrong with this Python for running experiments (the runner service, the runner),
    in one line; None when nothing.

    ``version`` and ``has_filters`` default to this interpreter's (``sys.version_info``,
    ``tarfile.data_filter``)."""
    import tarfile

    version = tuple(version or sys.version_info[:3])
    has_filters = hasattr(tarfile, "data_filter") if has_filters is None else has_filters
    needed = PYTHON_NEEDED.get(version[:2])
    too_old = version[:2] < (3, 10) or (needed is not None and version[2] < needed)
    if too_old or not has_filters:
        shown = ".".join(map(str, version))
        return (f"dvcray on a cluster needs Python 3.10.12, 3.11.4 or later (tarfile's extraction filters, "
                f"a private forkserver socket: CVE-2022-42919); this node runs Python {shown}"
                + ("" if has_filters else " without tarfile's extraction filters")
                + ". Install a newer Python on the cluster's nodes.")
    return None
