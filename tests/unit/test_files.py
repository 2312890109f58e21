"""dvcray's own files (files.py): atomic writes, tolerant reads, the folders' places."""

from __future__ import annotations

import dataclasses
import os
import stat

import pytest

from dvcray_cli import files


def test_write_is_atomic_private_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "deep" / "record.json"
    files.write_json(path, {"a": 1})
    assert files.read_json(path) == {"a": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    files.write_json(path, {"a": 2}, mode=0o644)
    assert files.read_json(path) == {"a": 2} and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "record.json"
    files.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        files.write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert files.read_json(path) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


@pytest.mark.parametrize("content", [None, b"", b'{"a": 1', b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_reads_of_missing_torn_or_non_object_files_are_none(tmp_path, content):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)
    assert files.read_json(path) is None
    if content is not None:
        assert files.parse_json_object(content) is None


def test_repo_dir_hides_itself_from_git(tmp_path):
    path = files.repo_dir(tmp_path)
    assert path == tmp_path / ".dvcray"
    assert (path / ".gitignore").read_text().splitlines()[-1] == "*"
    assert files.runs_dir(tmp_path, create=True) == path / "runs" and (path / "runs").is_dir()
    clusters = files.repo_clusters_dir(tmp_path, create=True)
    assert stat.S_IMODE(clusters.stat().st_mode) == 0o700
    assert not files.repo_dir(tmp_path / "elsewhere", create=False).exists()


def test_home_folders_live_under_this_users_home(isolated_env):
    assert files.home() == isolated_env / ".dvcray"
    assert files.clusters_dir().parent == files.home() == files.default_store_dir().parent
    folder = files.private_dir(files.clusters_dir())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(files.home().stat().st_mode) == 0o700
    assert os.path.isdir(folder)


def test_from_json_ignores_unknown_keys_and_refuses_what_does_not_fit():
    @dataclasses.dataclass
    class Point:
        x: int
        y: int = 0

    assert files.from_json(Point, {"x": 1, "z": 3}) == Point(1, 0)
    assert files.from_json(Point, {"y": 1}) is None
    assert files.from_json(Point, ["x"]) is None


@pytest.mark.parametrize("raw, expected", [("", 60.0), ("12", 12.0), ("0.5", 0.5)])
def test_durations_from_the_environment(monkeypatch, raw, expected):
    monkeypatch.setenv("DVCRAY_TEST_S", raw)
    assert files.env_seconds("DVCRAY_TEST_S", 60) == expected


@pytest.mark.parametrize("raw", ["abc", "-1", "inf", "nan", "1s"])
def test_a_bad_duration_in_the_environment_is_a_usage_error(monkeypatch, raw):
    from dvcray_cli.errors import UsageError

    monkeypatch.setenv("DVCRAY_TEST_S", raw)
    with pytest.raises(UsageError, match=f"DVCRAY_TEST_S={raw} is not a number of seconds"):
        files.env_seconds("DVCRAY_TEST_S", 60)
