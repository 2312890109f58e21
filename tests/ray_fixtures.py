"""Ray fixtures (a pytest plugin, loaded by conftest.py): one real local head for
the session, the environment that reaches it, and cleanup of clusters a test started.

Other Ray clusters run on this machine at the same time (other checkouts, other
test runs), so everything here starts and stops Ray only by pid, through
``dvcray_cli.clusters.local``; never ``ray stop``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import running_head


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """One real Ray head (2 CPUs, token auth on) shared by the session; stopped by pid at the end.

    It has a HOME and token of its own: tests run with a fresh HOME each
    (conftest.isolated_env), so clients reach it through ``ray_cluster``.
    """
    with running_head(tmp_path_factory.mktemp("ray-head-home"), "pytest-session") as head:
        yield head


@pytest.fixture
def ray_cluster(ray_head, isolated_env, monkeypatch):
    """The session head, reachable from this test's ``dvcray`` subprocesses and Python clients.

    ``RAY_ADDRESS`` is its job API (what ``dvcray run`` reads) and ``RAY_AUTH_TOKEN``
    its token (what ``clusters.connect`` sends first, as Ray's own clients do).
    """
    monkeypatch.setenv("RAY_ADDRESS", ray_head.dashboard_url)
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token())
    return ray_head


@pytest.fixture(autouse=True)
def _stop_clusters_started_by_the_test(isolated_env, monkeypatch):
    """Whatever cluster a test recorded in its HOME (``dvcray cluster up``, the
    embedded default of ``dvcray run``) is stopped by pid when the test ends."""
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    yield
    from dvcray_cli.clusters import local

    temp_dirs = []
    for c in local.records():  # this test's HOME
        if c.temp_dir:
            c.stop(timeout=5)
            temp_dirs.append(Path(c.temp_dir))
    # A test's local cluster lives in a temp dir of its own (the hash of its HOME):
    # nothing else can use it once its processes are gone.
    for temp in {*temp_dirs, local.default_temp_dir("local"), local.default_temp_dir("local-multinode")}:
        if temp.is_dir() and not local.LocalCluster("", "0:0", "", str(temp), "", "", None).pids():
            shutil.rmtree(temp, ignore_errors=True)
