"""The workspace reaches the cluster exactly as a local ``dvc exp run`` sees it,
whatever the user's git settings (issue 10, item 6).

Each case runs the same workspace twice: through ``dvcray run`` and through a
local ``dvc exp run``. The stage records every file it sees (name, and content
with line endings folded; symbolic links by target), so the two experiments
must agree on ``seen.json`` and on their whole git tree. What cannot be
reproduced (a merge in progress, submodules) is refused before anything runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import run_dvcray, sh

SNAP = r'''
import hashlib, json, os
seen = {}
for dirpath, dirnames, filenames in os.walk("."):
    dirnames[:] = [d for d in dirnames if d not in (".git", ".dvc", ".dvcray")]  # .dvcray: dvcray's own, never sent
    for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path)
        if rel in ("seen.json", "dvc.lock"):
            continue
        key = os.fsencode(rel).hex()
        if os.path.islink(path):
            seen[key] = "link:" + os.readlink(path)
        else:
            seen[key] = hashlib.sha256(b"\n".join(open(path, "rb").read().splitlines())).hexdigest()
json.dump(seen, open("seen.json", "w"), sort_keys=True, indent=1)
'''
SPEC = {
    "snap.py": SNAP,
    "params.yaml": "lr: 0.1\n",
    "src/params.yaml": "lr: 0.5\n",
    "config.txt": "original\n",
    "dvc.yaml": "stages:\n  snap:\n    cmd: python snap.py\n    deps: [snap.py]\n    outs:\n"
                "      - seen.json:\n          cache: false\n",
}


def exp_ref(root: Path, name: str) -> str:
    head = sh("git", "rev-parse", "HEAD", cwd=root)
    return f"refs/exps/{head[:2]}/{head[2:]}/{name}"


def remote_equals_local(root: Path, store: Path) -> dict:
    """Run the workspace remotely and locally; assert both experiments agree; return what the stage saw."""
    proc = run_dvcray("run", "-n", "remote", "--store", str(store), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sh("dvc", "exp", "run", "-q", "-n", "local", cwd=root)
    remote = json.loads(sh("git", "show", f"{exp_ref(root, 'remote')}:seen.json", cwd=root))
    local = json.loads(sh("git", "show", f"{exp_ref(root, 'local')}:seen.json", cwd=root))
    assert remote == local
    assert sh("git", "rev-parse", f"{exp_ref(root, 'remote')}^{{tree}}", cwd=root) == \
        sh("git", "rev-parse", f"{exp_ref(root, 'local')}^{{tree}}", cwd=root)
    return {bytes.fromhex(k).decode(errors="surrogateescape"): v for k, v in remote.items()}


def digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(b"\n".join(text.encode().splitlines())).hexdigest()


@pytest.mark.parametrize("setting", ["diff.noprefix=true", "diff.mnemonicPrefix=true",
                                     "diff.srcPrefix=x/", "diff.relative=true"])
def test_diff_settings_do_not_move_an_edit_to_another_file(ray_cluster, make_dvc_project, tmp_path, setting):
    root = make_dvc_project(SPEC)
    key, value = setting.split("=")
    sh("git", "config", key, value, cwd=root)
    if key == "diff.srcPrefix":
        sh("git", "config", "diff.dstPrefix", "y/", cwd=root)
    (root / "src" / "params.yaml").write_text("lr: 0.9\n")
    seen = remote_equals_local(root, tmp_path / "store")
    assert seen["src/params.yaml"] == digest("lr: 0.9\n") and seen["params.yaml"] == digest("lr: 0.1\n")


def test_external_diff_drivers_and_textconv_are_not_used(ray_cluster, make_dvc_project, tmp_path):
    root = make_dvc_project({**SPEC, ".gitattributes": "*.txt diff=shout\n"})
    sh("git", "config", "diff.shout.textconv", "tr a-z A-Z <", cwd=root)
    sh("git", "config", "diff.external", "false", cwd=root)
    (root / "config.txt").write_text("edited\n")
    seen = remote_equals_local(root, tmp_path / "store")
    assert seen["config.txt"] == digest("edited\n")


def test_line_ending_conversion(ray_cluster, make_dvc_project, tmp_path):
    root = make_dvc_project(SPEC)
    sh("git", "config", "core.autocrlf", "true", cwd=root)
    (root / "config.txt").write_bytes(b"edited\r\nwith crlf\r\n")
    seen = remote_equals_local(root, tmp_path / "store")
    assert seen["config.txt"] == digest("edited\nwith crlf\n")


@pytest.mark.parametrize("flag", ["--assume-unchanged", "--skip-worktree"])
def test_files_git_stops_looking_at_travel_as_they_are(ray_cluster, make_dvc_project, tmp_path, flag):
    root = make_dvc_project(SPEC)
    sh("git", "update-index", flag, "config.txt", cwd=root)
    (root / "config.txt").write_text("edited behind git's back\n")
    assert sh("git", "diff", "HEAD", cwd=root) == ""  # git diff does not see it
    # What DVC makes of such a file (it keeps a skip-worktree edit, and its own
    # stash undoes an assume-unchanged one) is the same on the cluster as here.
    remote_equals_local(root, tmp_path / "store")
    assert sh("git", "show", f"{exp_ref(root, 'remote')}:config.txt", cwd=root) == \
        sh("git", "show", f"{exp_ref(root, 'local')}:config.txt", cwd=root)


def test_symlinks_and_file_names_that_are_not_utf8(ray_cluster, make_dvc_project, tmp_path):
    root = make_dvc_project(SPEC)
    secret = tmp_path / "outside-secret.txt"
    secret.write_text("never shipped\n")
    os.symlink(secret, root / "outside-link")
    os.symlink("config.txt", root / "inside-link")
    with open(os.path.join(os.fsencode(root), b"caf\xe9.txt"), "wb") as f:
        f.write(b"latin-1 name\n")
    seen = remote_equals_local(root, tmp_path / "store")
    assert seen["outside-link"] == f"link:{secret}" and seen["inside-link"] == "link:config.txt"
    assert seen[os.fsdecode(b"caf\xe9.txt")] == digest("latin-1 name\n")


def test_lfs_pointers_stay_pointers(ray_cluster, make_dvc_project, tmp_path):
    pointer = ("version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 12\n")
    root = make_dvc_project({**SPEC, ".gitattributes": "*.bin filter=lfs diff=lfs merge=lfs -text\n",
                             "data.bin": pointer})
    seen = remote_equals_local(root, tmp_path / "store")
    assert seen["data.bin"] == digest(pointer)


def test_a_merge_in_progress_or_submodules_are_refused_before_anything_runs(ray_cluster, make_dvc_project,
                                                                            tmp_path):
    root = make_dvc_project(SPEC)
    sh("git", "checkout", "-q", "-b", "other", cwd=root)
    (root / "config.txt").write_text("theirs\n")
    sh("git", "commit", "-qam", "theirs", cwd=root)
    sh("git", "checkout", "-q", "main", cwd=root)
    (root / "config.txt").write_text("ours\n")
    sh("git", "commit", "-qam", "ours", cwd=root)
    sh("git", "merge", "other", cwd=root, check=False)
    store = tmp_path / "store"
    proc = run_dvcray("run", "--store", str(store), cwd=root)
    assert proc.returncode == 2, proc.stderr
    assert "in the middle of a merge" in proc.stderr and not store.exists()
    sh("git", "merge", "--abort", cwd=root)

    sub = make_dvc_project({"x.txt": "x\n"}, name="sub")
    sh("git", "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(sub), "vendored", cwd=root)
    sh("git", "commit", "-qm", "a submodule", cwd=root)
    proc = run_dvcray("run", "--store", str(store), cwd=root)
    assert proc.returncode == 2, proc.stderr
    assert "submodules (vendored)" in proc.stderr and not store.exists()
