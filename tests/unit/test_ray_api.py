"""ray_api.py without a cluster: addresses, tokens, and the errors people read."""

from __future__ import annotations

import stat

from dvcray_cli import ray_api


def test_addresses_are_normalized():
    assert ray_api.normalize("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert ray_api.normalize(" http://h:1/ ") == "http://h:1"
    assert ray_api.normalize("https://h") == "https://h"


def test_terminal_statuses_are_rays():
    assert [s for s in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED") if ray_api.is_terminal(s)] == \
        ["SUCCEEDED", "FAILED", "STOPPED"]


def test_token_files(isolated_env, monkeypatch, tmp_path):
    path = ray_api.ensure_token()
    assert path == isolated_env / ".ray" / "auth_token" and stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text()
    assert len(token) == 64 and ray_api.ensure_token() == path and path.read_text() == token
    assert ray_api.read_token(tmp_path / "missing") is None
    (tmp_path / "empty").write_text("  \n")
    assert ray_api.read_token(tmp_path / "empty") is None
    assert ray_api.env_token() is None
    (tmp_path / "tok").write_text("from-path\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert ray_api.env_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", " from-env ")
    assert ray_api.env_token() == "from-env"


def test_http_errors_say_what_to_do():
    missing = ray_api.http_error("http://h:1", 401)
    assert missing.exit_code == 3 and "requires an auth token" in missing.message and "RAY_AUTH_TOKEN" in missing.hint
    assert "refused the auth token" in ray_api.http_error("http://h:1", 403).message
    other = ray_api.http_error("http://h:1", 500)
    assert "HTTP 500" in other.message and "dvcray cluster up" in other.hint
