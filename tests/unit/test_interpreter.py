"""The interpreter (issue 20, point 11): the runner service unpacks snapshots with tarfile's
extraction filters and forks runs from multiprocessing's forkserver; both are safe only from
Python 3.10.12 / 3.11.4 on. The package says so, and the service refuses to start on less."""

from __future__ import annotations

import tarfile
import tomllib

from packaging.specifiers import SpecifierSet

from helpers import REPO
from dvcray_cli.runs.snapshot import interpreter_problem
from dvcray_cli.service import server


def test_the_package_requires_the_patch_levels_with_extraction_filters():
    spec = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    for refused in ("3.9.18", "3.10.0", "3.10.8", "3.10.11", "3.11.0", "3.11.3"):
        assert refused not in spec, refused
    for taken in ("3.10.12", "3.10.14", "3.11.4", "3.11.7", "3.12.0", "3.13.1"):
        assert taken in spec, taken


def test_an_old_interpreter_is_named_with_what_to_do():
    assert interpreter_problem((3, 11, 7), True) is None
    assert interpreter_problem((3, 12, 0), True) is None
    for old in ((3, 10, 11), (3, 11, 3), (3, 9, 18)):
        said = interpreter_problem(old, True)
        assert said and ".".join(map(str, old)) in said and "3.10.12, 3.11.4 or later" in said, said
    said = interpreter_problem((3, 11, 7), False)
    assert said and "without tarfile's extraction filters" in said


def test_the_service_refuses_to_start_without_extraction_filters(monkeypatch, capsys):
    """An interpreter without ``tarfile.data_filter`` (what 3.10.11 and 3.11.3 lack): the service
    says why and exits 3 before it listens, instead of failing every submission with TypeError."""
    monkeypatch.delattr(tarfile, "data_filter")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")
    assert server.main(["--id", "dvcray-service-test"]) == 3
    out = capsys.readouterr().out
    assert "needs Python 3.10.12, 3.11.4 or later" in out and "listening" not in out
