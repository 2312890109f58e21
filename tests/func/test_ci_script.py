""".ci/run before it installs anything: what it refuses and what it leaves behind when a
step fails (the whole script runs in CI; these run only its first steps, in seconds)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import REPO

CI = REPO / ".ci" / "run"


def _bin_without(tmp_path: Path, *absent: str, fakes: dict[str, str] | None = None) -> Path:
    """A PATH folder with every tool of /usr/bin and /usr/sbin but ``absent``, and ``fakes``
    (name: shell script)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for source in (Path("/usr/sbin"), Path("/usr/bin")):
        for tool in source.iterdir():
            if tool.name not in absent and not (folder / tool.name).exists():
                (folder / tool.name).symlink_to(tool)
    for name, script in (fakes or {}).items():
        (folder / name).unlink(missing_ok=True)
        (folder / name).write_text(f"#!/bin/sh\n{script}\n")
        (folder / name).chmod(0o755)
    return folder


def _temp(tmp_path: Path) -> Path:
    temp = tmp_path / "tmp"
    temp.mkdir(mode=0o777)
    temp.chmod(0o777)
    return temp


def test_a_ci_venv_that_is_not_a_venv_is_never_removed(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work\n")
    proc = subprocess.run(["bash", str(CI)], env={**os.environ, "CI_VENV": str(precious)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "is not a virtual environment; refusing to remove it" in proc.stderr
    assert (precious / "thesis.tex").read_text() == "years of work\n"


def test_a_failed_apt_get_leaves_no_policy_rc_d_and_no_venv(tmp_path):
    """In a mount namespace of its own, /usr/sbin is an empty folder: the script finds
    sshd and ip missing, writes /usr/sbin/policy-rc.d (so apt-get starts no service), and
    apt-get fails: the file goes anyway, as does the temporary venv."""
    if os.geteuid() != 0:
        pytest.skip("as root only: .ci/run installs with apt-get as root")
    calls = tmp_path / "apt-get.calls"
    tools = _bin_without(tmp_path, "ip", "sshd", fakes={"apt-get": f'echo "$@" >> {calls}; exit 100'})
    temp = _temp(tmp_path)
    script = f'mount -t tmpfs tmpfs /usr/sbin && bash {CI}; echo "rc=$?"; ls -A /usr/sbin'
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          env={**os.environ, "PATH": str(tools), "TMPDIR": str(temp), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    rc = next(line for line in lines if line.startswith("rc="))
    assert rc != "rc=0", proc.stdout + proc.stderr
    assert lines[-1] == rc, f"left in /usr/sbin: {lines[lines.index(rc) + 1:]}"
    assert calls.read_text().splitlines() == ["update -q"], "apt-get was asked, and failed"
    assert "== system packages: iproute2 openssh-server" in proc.stdout, proc.stdout
    assert list(temp.iterdir()) == [], "the temporary venv is removed"


@pytest.fixture
def open_folder():
    """A folder another user can reach (pytest's own are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="dvcray-ci-test-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_without_root_it_names_what_is_missing_and_stops(open_folder):
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    tools = _bin_without(open_folder, "rsync")
    temp = _temp(open_folder)
    proc = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "bash", str(CI)],
                          env={**os.environ, "PATH": str(tools), "TMPDIR": str(temp), "PYTHON": sys.executable,
                               "HOME": str(temp)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # (this machine's Python lives under /root, where the other user cannot run it: it
    # is named missing too)
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("CI FAILED: missing "))
    assert " rsync" in line.split(":")[1] and "apt-get install" in line, line
    assert list(temp.iterdir()) == [], "the temporary venv is removed"
