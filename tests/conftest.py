"""Shared fixtures: an isolated environment, real git, real DVC projects, servers on
127.0.0.1. Helpers that are not fixtures live in ``helpers.py``.

Every test runs with its own HOME (Ray 2.60 keeps its auth token in
~/.ray/auth_token, and DVC and git read config from HOME), a git identity in
the environment, and DVC Studio kept offline.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import IN_NETNS_ENV, CaptureServer, StudioCapture, build_file_tree, free_port, sh

# tests/ray_fixtures.py: ray_head, ray_cluster, and cleanup of clusters tests start.
pytest_plugins = ["ray_fixtures"]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``loopback_namespace`` talk to a fake AWS and run only inside the
    loopback-only namespace that test_aws_suite_in_a_loopback_only_namespace makes (which
    fails unless they all pass there): elsewhere they are deselected, not skipped.
    Tests marked ``extended`` repeat what other tests cover, at a cost CI's budget cannot
    take (README, Development): they run only with ``DVCRAY_TEST_EXTENDED=1``."""
    left_out = []
    if os.environ.get(IN_NETNS_ENV) != "1":
        left_out += [item for item in items if item.get_closest_marker("loopback_namespace")]
    if os.environ.get("DVCRAY_TEST_EXTENDED") != "1":
        left_out += [item for item in items if item.get_closest_marker("extended")]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """With ``--durations`` (as .ci/run gives), also the time of each test file, slowest
    first: what the CI budget is spent on."""
    if config.option.durations is None:
        return
    per_file: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if hasattr(report, "duration") and hasattr(report, "nodeid") and report.nodeid:
                path = report.nodeid.split("::", 1)[0]
                per_file[path] = per_file.get(path, 0.0) + report.duration
    if not per_file:
        return
    terminalreporter.write_sep("=", "time by test file")
    for path, seconds in sorted(per_file.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f}s {path}")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    # The venv's dvc, ray and git helpers, even when the venv is not activated.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Test User")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "test@example.com")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "Test User")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "test@example.com")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_STUDIO_OFFLINE", "true")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    for var in ("RAY_ADDRESS", "DVC_STUDIO_TOKEN", "CI"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session", autouse=True)
def _no_test_bed_outlives_the_session():
    """The namespace test bed (tests/testbed.py) is torn down by the module that builds
    it; whatever a failed teardown left of this session's beds goes here, by the names
    and pids the bed recorded. Beds of sessions that were killed go when the next session
    starts (and at every build)."""
    import testbed

    if os.geteuid() == 0 and testbed.BEDS.is_dir():
        testbed.sweep_stale()
    yield
    if "testbed" in sys.modules:
        sys.modules["testbed"].sweep_stale(owner=os.getpid())


@pytest.fixture
def make_dvc_project(tmp_path):
    """A committed git + DVC project built from a file tree."""

    def make(spec: dict[str, str], name: str = "project", commit: bool = True) -> Path:
        root = tmp_path / name
        root.mkdir()
        sh("git", "init", "-q", "-b", "main", cwd=root)
        sh("dvc", "init", "-q", cwd=root)
        build_file_tree(root, spec)
        if commit:
            sh("git", "add", "-A", cwd=root)
            sh("git", "commit", "-q", "-m", "initial", cwd=root)
        return root

    return make


@pytest.fixture(scope="session")
def moto_server():
    """An S3 endpoint on 127.0.0.1, as dvc-s3's own tests use (moto's threaded server)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_server, monkeypatch):
    """A fresh bucket; returns (endpoint, bucket name). Fake credentials only."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"dvcray-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=name)
    return moto_server, name


@pytest.fixture
def capture_server():
    server = CaptureServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def studio_capture():
    capture = StudioCapture()
    try:
        yield capture
    finally:
        capture.close()
