"""The built wheel carries the templates and cluster configs, and works installed.

Builds the wheel the way a release would (``python -m build --wheel``),
installs it into a fresh virtual environment, and runs ``dvcray`` from there,
from a folder outside this repository, so that nothing can come from the
source tree. The venv sees the test environment's packages (ray, dvc, ...)
through a .pth file instead of installing them again: what is under test is
dvcray's own wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow


def run(*args: str | Path, cwd: Path, env: dict | None = None, timeout: float = 600) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def source_files(folder: str) -> list[str]:
    """Files git would ship from a top-level folder (no caches)."""
    root = REPO / folder
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--wheel", "--outdir", out, REPO, cwd=REPO)
    (built,) = out.glob("dvcray-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; other packages come from this one's."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    run(sys.executable, "-m", "venv", root, cwd=root.parent)
    python = root / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=root.parent).strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    # Plain path lines: this venv's .pth files (the editable install of dvcray
    # among them) are not processed, so dvcray_cli can only come from the wheel.
    (site / "zz_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", wheel, cwd=root.parent)
    return root


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **extra}


def test_wheel_ships_templates_and_cluster_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "dvcray_cli/templates/minimal/template.yaml" in names
    for rel in source_files("templates"):
        assert f"dvcray_cli/templates/{rel}" in names, rel
    configs = source_files("cluster-configs")
    for rel in configs:
        assert f"dvcray_cli/cluster_configs/{rel}" in names, rel
    if not configs:
        pytest.skip("cluster-configs/ has no files yet")  # after the templates were checked


def test_wheel_has_no_caches_or_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.startswith("tests/")]


def test_installed_wheel_uses_its_own_files(venv, tmp_path):
    python = venv / "bin" / "python"
    out = run(python, "-c",
              "import dvcray_cli, dvcray_cli.packaged as r; "
              "print(dvcray_cli.__file__); print(r.templates_dir()); print(r.cluster_configs_dir())",
              cwd=tmp_path, env=clean_env()).splitlines()
    for line in out:
        assert Path(line).resolve().is_relative_to(venv.resolve()), out
    assert Path(out[1], "minimal", "template.yaml").is_file()


def test_installed_dvcray_lists_and_scaffolds(venv, tmp_path):
    dvcray = venv / "bin" / "dvcray"
    env = clean_env()
    assert run(dvcray, "--version", cwd=tmp_path, env=env).startswith("dvcray ")

    listed = run(dvcray, "scaffold", "--list", cwd=tmp_path, env=env)
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    expected = sorted(p.parent.name for p in (REPO / "templates").glob("*/template.yaml"))
    assert sorted(names) == expected

    run(dvcray, "scaffold", "minimal", "proj", "--set", "estimate.tasks=3", cwd=tmp_path, env=env)
    proj = tmp_path / "proj"
    assert (proj / ".dvc").is_dir()
    assert (proj / "src" / "estimate.py").read_bytes() == \
        (REPO / "templates" / "minimal" / "src" / "estimate.py").read_bytes()
    assert "tasks: 3" in (proj / "params.yaml").read_text()
    assert run("git", "rev-list", "--count", "HEAD", cwd=proj, env=env).strip() == "1"
    assert run("git", "status", "--porcelain", cwd=proj, env=env) == ""
