"""Ray fixtures (a pytest plugin, loaded by conftest.py): one real local head for
the session, the environment that reaches it, and cleanup of clusters a test started.

Other Ray clusters run on this machine at the same time (other checkouts, other
test runs), so everything here starts and stops Ray only by pid, through
``dvcray_cli.clusters.local``; never ``ray stop``.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

# What the session head's processes must not inherit from the outer environment:
# another cluster's address or token, and credentials (jobs see the head's env).
_HEAD_ENV_DROP = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                  "RAY_AUTH_MODE", "DVC_STUDIO_TOKEN", "CI")


def start_test_head(home: Path, name: str, env: dict[str, str] | None = None, num_cpus: int = 2,
                    **options):
    """A real head with a HOME and token of its own and nothing inherited from the
    outer environment but what ``env`` adds (e.g. a node's own AWS credentials).
    Returns it and its temp dir; stop it with ``head.stop()``."""
    import os

    from dvcray_cli.clusters import local

    head_env = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "DVC_NO_ANALYTICS": "1",
        "DVC_STUDIO_OFFLINE": "true",
        "GIT_CONFIG_NOSYSTEM": "1",
        **(env or {}),
    }
    temp_dir = Path("/tmp") / f"dvcray-test-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp:
        for var in list(os.environ):
            if var in _HEAD_ENV_DROP or var.startswith("AWS_"):
                mp.delenv(var)
        head = local.start_head(name, num_cpus=num_cpus, temp_dir=temp_dir, env=head_env,
                                token_path=home / ".ray" / "auth_token", **options)
    return head, temp_dir


def node_files(head) -> list[Path]:
    """Every file the head's node keeps of what runs brought: Ray's session (job packages
    as unpacked, logs) and dvcray's runner folder (the runner service's snapshots and
    its logs of each run) in the head's HOME."""
    home = Path(head.token_path).parents[1]
    found = [*Path(head.temp_dir).rglob("*"), *(home / ".cache" / "dvcray").rglob("*")]
    return [p for p in found if p.is_file() and not p.is_symlink()]


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """One real Ray head (2 CPUs, token auth on) shared by the session; stopped by pid at the end.

    It has a HOME and token of its own: tests run with a fresh HOME each
    (conftest.isolated_env), so clients reach it through ``ray_cluster``.
    """
    head, temp_dir = start_test_head(tmp_path_factory.mktemp("ray-head-home"), "pytest-session")
    try:
        yield head
    finally:
        head.stop()
        assert head.pids() == [], "the session's Ray head left processes behind"
        shutil.rmtree(temp_dir, ignore_errors=True)


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
