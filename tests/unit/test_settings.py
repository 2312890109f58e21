"""``[tool.dvcray]`` in pyproject.toml: read, looked for where the project is, refused when wrong."""

from __future__ import annotations

import pytest

from dvcray_cli.errors import UsageError
from dvcray_cli.runs import settings


def test_no_file_or_no_table_is_no_settings(tmp_path):
    assert settings.read(tmp_path) == settings.Settings()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    found = settings.read(tmp_path)
    assert (found.env, found.retries, found.path) == ([], None, tmp_path / "pyproject.toml")


def test_env_and_retries(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.dvcray]\nenv = ["OMP_NUM_THREADS", "SEED"]\nretries = 0\n')
    found = settings.read(tmp_path)
    assert found.env == ["OMP_NUM_THREADS", "SEED"] and found.retries == 0


def test_the_dvc_root_first_then_the_git_root(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "pyproject.toml").write_text('[tool.dvcray]\nretries = 1\n')
    assert settings.read(sub, tmp_path).retries == 1
    (sub / "pyproject.toml").write_text('[tool.dvcray]\nretries = 2\n')
    assert settings.read(sub, tmp_path).retries == 2


@pytest.mark.parametrize("text, message", [
    ('[tool.dvcray]\nenvs = ["A"]\n', "Unknown key(s) in [tool.dvcray]"),
    ('[tool.dvcray]\nenv = "A"\n', "env in"),
    ('[tool.dvcray]\nenv = [1]\n', "env in"),
    ('[tool.dvcray]\nretries = -1\n', "retries in"),
    ('[tool.dvcray]\nretries = true\n', "retries in"),
    ('[tool.dvcray]\nretries = "3"\n', "retries in"),
    ('[tool.dvcray\n', "is not valid TOML"),
    ('[tool]\ndvcray = 3\n', "must be a table"),
])
def test_refused_by_name(tmp_path, text, message):
    (tmp_path / "pyproject.toml").write_text(text)
    with pytest.raises(UsageError) as caught:
        settings.read(tmp_path)
    assert message in caught.value.message
