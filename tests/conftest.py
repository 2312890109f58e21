"""Shared fixtures: an isolated environment, real git, real DVC projects.

Every test runs with its own HOME (Ray 2.60 keeps its auth token in
~/.ray/auth_token, and DVC and git read config from HOME), a git identity in
the environment, and DVC Studio kept offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# tests/ray_fixtures.py: ray_head, ray_cluster, and cleanup of clusters tests start.
pytest_plugins = ["ray_fixtures"]

REPO = Path(__file__).resolve().parent.parent
UNIT = Path(__file__).resolve().parent / "unit"


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
    and pids the bed recorded. Beds of sessions that were killed go at the next build."""
    yield
    if "testbed" in sys.modules:
        sys.modules["testbed"].sweep_stale(owner=os.getpid())


@pytest.fixture(autouse=True)
def _unit_tests_start_nothing(request, monkeypatch):
    """tests/unit is the fast level: no Ray cluster, no subprocess, no network. A
    unit test that tries either fails at once, so the level stays what it says."""
    if UNIT not in Path(request.node.path).parents:
        return
    import socket

    def refuse_process(*args, **kwargs):
        raise AssertionError("a unit test started a process: move it to tests/func")

    def refuse_connect(self, address):
        raise AssertionError(f"a unit test opened a connection to {address}: move it to tests/func")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse_process)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse_connect)


def run_dvcray(*args: str, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real ``dvcray`` command line in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvcray_cli", *args], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"dvcray {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def sh(*args: str, cwd: Path, check: bool = True, env: dict | None = None) -> str:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout.strip()


def store_log(run_dir: Path) -> str:
    """A run's log as a local store holds it: ``log.txt`` once the runner finished
    it, else the pieces uploaded so far (``log.parts/``), in order."""
    whole = run_dir / "log.txt"
    if whole.exists():
        return whole.read_text(errors="replace")
    parts = sorted((run_dir / "log.parts").glob("[0-9]*")) if (run_dir / "log.parts").is_dir() else []
    return b"".join(p.read_bytes() for p in parts).decode(errors="replace")


def build_file_tree(root: Path, spec: dict[str, str]) -> None:
    """Write ``{relative path: text}`` under ``root`` (text is dedented)."""
    for rel, text in spec.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


class CaptureServer:
    """An HTTP server on 127.0.0.1 that answers 200 ``{}`` to everything and keeps
    what it was sent: it stands in for any address a test must not reach
    (a foreign cluster named by a store, DVC Studio)."""

    def __init__(self, port: int = 0) -> None:
        """``port``: a port of this machine's 127.0.0.1 to take (a thief's), else any free one."""
        import http.server
        import threading

        self.requests: list[dict] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                owner.requests.append({"method": self.command, "path": self.path,
                                       "headers": dict(self.headers), "body": body})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def capture_server():
    server = CaptureServer()
    try:
        yield server
    finally:
        server.close()


class StudioCapture(CaptureServer):
    """A stand-in for DVC Studio's ``api/live`` on 127.0.0.1: it keeps every post."""

    @property
    def posts(self) -> list[dict]:
        """``{"path", "authorization", "body"}`` of each POST, in order."""
        import json

        return [{"path": r["path"], "authorization": r["headers"].get("Authorization"), "body": json.loads(r["body"])}
                for r in list(self.requests) if r["method"] == "POST"]

    def env(self, token: str) -> dict[str, str]:
        """What makes DVC, DVCLive and dvcray post here with ``token`` (never to a real Studio)."""
        return {"DVC_STUDIO_TOKEN": token, "DVC_STUDIO_URL": self.url, "DVC_STUDIO_OFFLINE": "false"}

    def take(self) -> list[dict]:
        taken = self.posts
        self.requests.clear()
        return taken


@pytest.fixture
def studio_capture():
    capture = StudioCapture()
    try:
        yield capture
    finally:
        capture.close()
