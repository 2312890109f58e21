"""The client checks the cluster's dvcray before it submits anything.

A head dvcray started carries a ``dvcray-version`` label; any other head is
asked once per session with a one-line Ray Job. A cluster whose dvcray cannot
run this client's runs (another major.minor version, or none) is refused with
exit 3 before a run is submitted or recorded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import REPO, run_dvcray, running_head
from dvcray_cli import __version__, clusters, compatible, ray_api

SPEC = {"params.yaml": "x: 1\n", "dvc.yaml": "stages:\n  s:\n    cmd: echo ran > out.txt\n    outs: [out.txt]\n"}


def test_compatible_versions_share_major_and_minor():
    assert compatible(__version__)
    assert compatible("0.1.7", "0.1.0") and not compatible("0.2.0", "0.1.0") and not compatible("1.1.0", "0.1.0")
    assert not compatible(None) and not compatible("")


def test_the_session_heads_label_is_read_and_remembered(ray_cluster):
    assert clusters.cluster_dvcray_version(ray_cluster.dashboard_url) == __version__
    cache = json.loads((Path.home() / ".dvcray" / "clusters" / "versions.json").read_text())
    assert list(cache.values()) == [__version__]
    client = ray_api.client(ray_cluster.dashboard_url, ray_cluster.token())
    assert not [j for j in client.list_jobs() if (j.metadata or {}).get("dvcray_probe")], \
        "a labelled head needs no probe job"


@pytest.fixture(scope="module")
def other_dvcray_head(tmp_path_factory):
    """A head started without dvcray's label whose Python imports a dvcray 9.9.0
    (a copy of this package with another version, first on its PYTHONPATH)."""
    site = tmp_path_factory.mktemp("other-dvcray")
    shutil.copytree(REPO / "dvcray_cli", site / "dvcray_cli", ignore=shutil.ignore_patterns("__pycache__"))
    init = site / "dvcray_cli" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{__version__}"', '__version__ = "9.9.0"'))
    with running_head(tmp_path_factory.mktemp("other-home"), "other-version", env={"PYTHONPATH": str(site)},
                      num_cpus=1, dvcray_version=None) as head:
        yield head


def test_a_cluster_with_another_dvcray_is_refused_before_anything_is_submitted(other_dvcray_head, make_dvc_project,
                                                                                 monkeypatch):
    head = other_dvcray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token())
    root = make_dvc_project(SPEC)
    proc = run_dvcray("run", "-n", "nope", "--address", head.dashboard_url, "--store", str(root.parent / "store"),
                      cwd=root)
    assert proc.returncode == 3, proc.stderr
    assert "runs dvcray 9.9.0" in proc.stderr and f"this client is dvcray {__version__}" in proc.stderr
    assert "Traceback" not in proc.stderr
    client = ray_api.client(head.dashboard_url, head.token())
    assert [j for j in client.list_jobs()] == [], "the probe's record is deleted and no run was submitted"
    assert not (root / ".dvcray" / "runs").exists()
    assert not (root.parent / "store" / "dvcray" / "runs").exists() or \
        not any((root.parent / "store" / "dvcray" / "runs").iterdir())
