"""``dvcray scaffold`` through the real command line, with real git and DVC.

Every refusal is checked for its exit code (2, DESIGN.md), a message that names
the problem, and that nothing was written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from helpers import REPO, build_file_tree, run_dvcray, sh

TEMPLATES = REPO / "templates"


def templates() -> dict[str, str]:
    """Every template in the source tree: name -> description (template.yaml)."""
    found = {}
    for meta in sorted(TEMPLATES.glob("*/template.yaml")):
        found[meta.parent.name] = (yaml.safe_load(meta.read_text()) or {}).get("description", "")
    return found


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (outside .git) and its content."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and ".git" not in p.relative_to(root).parts}


def scaffold_ok(*args: str, cwd: Path) -> Path:
    proc = run_dvcray("scaffold", *args, cwd=cwd, check=True)
    # Results go to stdout, messages to stderr; scaffold has no results, and
    # DVC's own "Initialized DVC repository" banner must not leak out.
    assert proc.stdout == ""
    assert "Next steps" in proc.stderr
    return cwd


def refused(*args: str, cwd: Path, env: dict | None = None) -> str:
    proc = run_dvcray("scaffold", *args, cwd=cwd, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


# --- --list --------------------------------------------------------------------------

def test_list_shows_each_template_with_its_description(tmp_path):
    known = templates()
    assert "minimal" in known
    proc = run_dvcray("scaffold", "--list", cwd=tmp_path, check=True)
    lines = proc.stdout.splitlines()
    for name, description in known.items():
        assert description, f"templates/{name}/template.yaml has no description"
        assert any(line.split()[0] == name and description in line for line in lines), proc.stdout
    assert len(lines) == len(known)


# --- a new project ---------------------------------------------------------------------

def test_minimal_makes_a_committed_project_whose_pipeline_runs(tmp_path):
    scaffold_ok("minimal", "pi", cwd=tmp_path)
    project = tmp_path / "pi"

    assert (project / ".dvc").is_dir()
    assert sh("git", "rev-list", "--count", "HEAD", cwd=project) == "1"
    assert sh("git", "status", "--porcelain", cwd=project) == ""
    committed = sh("git", "ls-files", cwd=project).splitlines()
    assert {"dvc.yaml", "params.yaml", ".gitignore", ".dvc/config", ".dvcignore",
            "src/estimate.py", "src/work.py", "requirements.txt", "README.md"} <= set(committed)
    assert ".dvcray/" in (project / ".gitignore").read_text().splitlines()

    # A plain ray.init() connects to the last cluster `ray start` made on this
    # machine (/tmp/ray/ray_current_cluster); "local" always starts its own.
    sh("dvc", "exp", "run", cwd=project, env={"RAY_ADDRESS": "local"})
    metrics = json.loads((project / "metrics.json").read_text())
    assert metrics["pi"] == pytest.approx(3.1416, abs=0.01)
    assert metrics["samples"] == 4 * 200000
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project))
    assert shown, "dvc exp show lists nothing"


@pytest.mark.parametrize("name", sorted(templates()))
def test_every_template_makes_a_clean_project_with_a_pipeline(tmp_path, name):
    scaffold_ok(name, "p", cwd=tmp_path)
    project = tmp_path / "p"
    assert sh("git", "status", "--porcelain", cwd=project) == ""
    assert ".dvcray/" in (project / ".gitignore").read_text().splitlines()
    for rel in ("README.md", "requirements.txt", "dvc.yaml", "params.yaml"):
        assert (project / rel).is_file(), rel
    assert "{{" not in (project / "README.md").read_text()  # rendered
    assert sh("dvc", "stage", "list", cwd=project), "no stages"


def test_default_dest_is_a_folder_named_after_the_template(tmp_path):
    scaffold_ok("minimal", cwd=tmp_path)
    assert (tmp_path / "minimal" / "dvc.yaml").is_file()
    assert (tmp_path / "minimal" / ".git").is_dir()


def test_files_already_in_a_new_folder_are_kept_and_not_committed(tmp_path):
    dest = tmp_path / "proj"
    build_file_tree(dest, {"notes.txt": "mine\n"})
    scaffold_ok("minimal", str(dest), cwd=tmp_path)
    assert (dest / "notes.txt").read_text() == "mine\n"
    assert "notes.txt" not in sh("git", "ls-files", cwd=dest).splitlines()
    assert sh("git", "status", "--porcelain", cwd=dest) == "?? notes.txt"


# --- --set -----------------------------------------------------------------------------

def test_set_changes_values_and_types_and_keeps_comments(tmp_path):
    scaffold_ok("minimal", "p", "--set", "estimate.tasks=8", "-s", "estimate.seed=1.5",
                "--set", "+estimate.note=hello", cwd=tmp_path)
    text = (tmp_path / "p" / "params.yaml").read_text()
    values = yaml.safe_load(text)["estimate"]
    assert values["tasks"] == 8 and isinstance(values["tasks"], int)
    assert values["seed"] == 1.5 and isinstance(values["seed"], float)
    assert values["note"] == "hello"
    assert values["samples"] == 200000
    assert "# points per task" in text
    # The overridden file is the one committed.
    assert sh("git", "show", "HEAD:params.yaml", cwd=tmp_path / "p") == text.strip()


def test_set_unknown_key_names_it_and_writes_nothing(tmp_path):
    stderr = refused("minimal", "p", "--set", "estimate.nope=1", cwd=tmp_path)
    assert "estimate.nope" in stderr
    assert "estimate.tasks" in stderr  # the known keys, to pick from
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("value", ["estimate.tasks", "estimate.tasks=[1", "=3"])
def test_set_bad_syntax_is_refused(tmp_path, value):
    stderr = refused("minimal", "p", "--set", value, cwd=tmp_path)
    assert "--set" in stderr
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("value", ["estimate.tasks=1,2", "estimate.tasks=range(1,3)"])
def test_set_sweep_is_refused(tmp_path, value):
    stderr = refused("minimal", "p", "--set", value, cwd=tmp_path)
    assert "sweep" in stderr
    assert not (tmp_path / "p").exists()


def test_set_unknown_params_file_names_the_template(tmp_path):
    stderr = refused("minimal", "p", "--set", "other.yaml:a=1", cwd=tmp_path)
    assert "other.yaml" in stderr and "minimal template" in stderr
    assert "/tmp" not in stderr.split("other.yaml", 1)[1]  # not the scratch folder
    assert not (tmp_path / "p").exists()


# --- templates -------------------------------------------------------------------------

def test_unknown_template_lists_the_known_ones(tmp_path):
    stderr = refused("nope", cwd=tmp_path)
    assert "nope" in stderr
    for name in templates():
        assert name in stderr
    assert not (tmp_path / "nope").exists()


def test_no_template_is_refused(tmp_path):
    stderr = refused(cwd=tmp_path)
    assert "minimal" in stderr
    assert os.listdir(tmp_path) == []


# --- never lose a file -----------------------------------------------------------------

def test_existing_files_are_listed_and_left_alone(tmp_path):
    dest = tmp_path / "p"
    build_file_tree(dest, {"params.yaml": "mine: 1\n", "dvc.yaml": "stages: {}\n"})
    before = snapshot(dest)
    stderr = refused("minimal", str(dest), cwd=tmp_path)
    assert "params.yaml" in stderr and "dvc.yaml" in stderr
    assert "--force" in stderr
    assert snapshot(dest) == before  # nothing else written either
    assert not (dest / ".git").exists()


def test_force_overwrites(tmp_path):
    dest = tmp_path / "p"
    build_file_tree(dest, {"params.yaml": "mine: 1\n", "keep.txt": "keep\n"})
    scaffold_ok("minimal", str(dest), "--force", cwd=tmp_path)
    assert "estimate" in yaml.safe_load((dest / "params.yaml").read_text())
    assert (dest / "keep.txt").read_text() == "keep\n"


def test_a_folder_in_the_way_is_refused_even_with_force(tmp_path):
    dest = tmp_path / "p"
    (dest / "params.yaml").mkdir(parents=True)
    build_file_tree(dest, {"src": "a file where the template has a folder\n"})
    before = snapshot(dest)
    stderr = refused("minimal", str(dest), "--force", cwd=tmp_path)
    assert "params.yaml" in stderr and "src/" in stderr
    assert snapshot(dest) == before
    assert sorted(os.listdir(dest)) == ["params.yaml", "src"]


def test_dest_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "p"
    target.write_text("a file\n")
    stderr = refused("minimal", str(target), cwd=tmp_path)
    assert "not a folder" in stderr
    assert target.read_text() == "a file\n"


# --- inside an existing repo -----------------------------------------------------------

@pytest.fixture
def git_repo(tmp_path):
    root = tmp_path / "repo"
    build_file_tree(root, {"a.txt": "a\n"})
    sh("git", "init", "-q", "-b", "main", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-q", "-m", "initial", cwd=root)
    return root


def test_in_a_git_repo_root_it_adds_files_inits_dvc_and_commits_nothing(git_repo):
    head = sh("git", "rev-parse", "HEAD", cwd=git_repo)
    scaffold_ok("minimal", ".", cwd=git_repo)
    assert sh("git", "rev-parse", "HEAD", cwd=git_repo) == head
    assert (git_repo / "dvc.yaml").is_file()
    assert (git_repo / ".dvc").is_dir()
    assert "?? dvc.yaml" in sh("git", "status", "--porcelain", cwd=git_repo).splitlines()


def test_below_a_git_root_it_inits_a_dvc_subdir_repo(git_repo):
    head = sh("git", "rev-parse", "HEAD", cwd=git_repo)
    scaffold_ok("minimal", "ml/pi", cwd=git_repo)
    project = git_repo / "ml" / "pi"
    assert sh("git", "rev-parse", "HEAD", cwd=git_repo) == head
    assert (project / ".dvc").is_dir()
    assert not (git_repo / ".dvc").exists()
    assert not (project / ".git").exists()
    assert sh("dvc", "root", cwd=project) == "."


def test_in_a_dvc_repo_it_uses_that_repo(make_dvc_project):
    root = make_dvc_project({"a.txt": "a\n"})
    head = sh("git", "rev-parse", "HEAD", cwd=root)
    config = (root / ".dvc" / "config").read_bytes()
    scaffold_ok("minimal", "pi", cwd=root)
    assert sh("git", "rev-parse", "HEAD", cwd=root) == head
    assert not (root / "pi" / ".dvc").exists()
    assert (root / ".dvc" / "config").read_bytes() == config
    assert (root / "pi" / "dvc.yaml").is_file()


# --- no git identity -------------------------------------------------------------------

def test_no_git_identity_names_the_fix_and_writes_nothing(tmp_path, monkeypatch):
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME",
                "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(var, raising=False)
    empty_home = tmp_path / "empty-home"
    empty_home.mkdir()
    monkeypatch.setenv("HOME", str(empty_home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(empty_home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    stderr = refused("minimal", "p", cwd=tmp_path)
    assert "git config --global user.name" in stderr
    assert not (tmp_path / "p").exists()
