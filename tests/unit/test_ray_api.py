"""ray_api.py without a cluster: addresses, tokens, and the errors people read."""

from __future__ import annotations

import stat

from dvcray_cli import ray_api


def test_addresses_are_normalized():
    assert ray_api.normalize("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert ray_api.normalize(" http://h:1/ ") == "http://h:1"
    assert ray_api.normalize("https://h") == "https://h"


def test_terminal_statuses_are_rays():
    assert [s for s in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED") if ray_api.job_state(s).is_terminal()] == \
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


class _Job:
    def __init__(self, job_id: str, status: str, end: int, meta: dict | None):
        self.submission_id, self.status, self.end_time, self.start_time, self.metadata = job_id, status, end, end, meta


class _Jobs:
    """A job API that keeps jobs in memory (no cluster)."""

    def __init__(self, jobs: list[_Job]) -> None:
        self.jobs = {j.submission_id: j for j in jobs}

    def list_jobs(self):
        return list(self.jobs.values())

    def delete_job(self, job_id: str) -> bool:
        return self.jobs.pop(job_id, None) is not None


def test_finished_job_records_beyond_those_kept_are_deleted_once_saved():
    ours = {"dvcray_version": "0.1.0"}
    jobs = _Jobs([_Job("old-1", "SUCCEEDED", 1, ours), _Job("old-2", "FAILED", 2, ours),
                  _Job("unsaved", "STOPPED", 3, ours), _Job("new-1", "SUCCEEDED", 10, ours),
                  _Job("new-2", "SUCCEEDED", 11, ours), _Job("going", "RUNNING", 0, ours),
                  _Job("theirs", "SUCCEEDED", 0, {"owner": "someone"}), _Job("bare", "SUCCEEDED", 0, None),
                  _Job("service", "STOPPED", 4, {"dvcray_service": "0.1.0"})])
    deleted = ray_api.prune_jobs(jobs, 2, saved=lambda job: job.submission_id != "unsaved")
    assert sorted(deleted) == ["old-1", "old-2", "service"]
    # The 2 newest finished ones stay, and so do a job whose results are not in the store,
    # a job that has not ended, and jobs that are not dvcray's.
    assert sorted(jobs.jobs) == ["bare", "going", "new-1", "new-2", "theirs", "unsaved"]
    assert ray_api.prune_jobs(jobs, 2, saved=lambda job: True) == ["unsaved"]


def test_keep_jobs_is_a_number(monkeypatch):
    import pytest

    from dvcray_cli.errors import UsageError

    assert ray_api.keep_jobs() == 100
    monkeypatch.setenv("DVCRAY_KEEP_JOBS", "5")
    assert ray_api.keep_jobs() == 5
    monkeypatch.setenv("DVCRAY_KEEP_JOBS", "lots")
    with pytest.raises(UsageError, match="DVCRAY_KEEP_JOBS"):
        ray_api.keep_jobs()
