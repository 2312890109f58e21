"""The command line's argument handling, in-process (Typer's CliRunner): what each
command accepts, refuses and says, with no Ray, no subprocess and no network
(the unit level's guard refuses them). End-to-end bad input, where a repo and a
cluster are needed, is tests/func/test_bad_input.py."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dvcray_cli import __version__
from dvcray_cli.cli import app

COMMANDS = ["scaffold", "run", "queue", "runs", "logs", "stop", "pull", "report", "cluster"]


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """``cli(*args)``: run ``dvcray ARGS`` in-process from an empty folder."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), prog_name="dvcray")

    return invoke


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"dvcray {__version__}"


def test_help_lists_every_command(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output, command


@pytest.mark.parametrize("args", [["scaffold"], ["run"], ["queue", "start"], ["runs"], ["logs"], ["stop"],
                                  ["pull"], ["report"], ["cluster", "up"], ["cluster", "down"],
                                  ["cluster", "status"]])
def test_every_command_has_help_with_an_example(cli, args):
    """As sqlite-utils' test_docs: a summary line and an Example block for every command."""
    result = cli(*args, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.output, f"dvcray {' '.join(args)} --help has no Example"


@pytest.mark.parametrize("args, message", [
    (["run", "--jobs", "0"], "--jobs must be at least 1"),
    (["queue", "start", "--jobs", "0"], "--jobs must be at least 1"),
    (["run", "-S", "train.lr=0.1,0.01", "--detach"], "--detach is not supported with a sweep"),
    (["run", "-S", "train.lr=0.1,0.01", "--apply"], "--apply takes one experiment"),
    (["cluster", "up", "nosuch"], "Unknown cluster 'nosuch'"),
    (["cluster", "up", "missing.yaml"], "No cluster config at missing.yaml"),
    (["cluster", "up", "--idle-timeout", "soon"], "Invalid duration 'soon'"),
    (["cluster", "up", "--idle-timeout", "-5m"], "Invalid duration"),
    (["scaffold"], "Name a template"),
])
def test_refused_with_one_message_and_exit_2(cli, tmp_path, args, message):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == [], "a refused command wrote something"


@pytest.mark.parametrize("args", [["run", "--no-such-option"], ["logs"], ["stop"], ["pull"],
                                  ["runs", "--limit", "-1"], ["run", "--jobs", "two"],
                                  ["run", "--cpus-per-exp", "many"], ["cluster", "nosuch"],
                                  ["run", "--cpus-per-exp", "-1"], ["run", "--gpus-per-exp", "-0.5"],
                                  ["queue", "start", "--cpus-per-exp", "-2"]])
def test_malformed_arguments_are_usage_errors(cli, args):
    """Typer/Click refuse what does not parse: exit 2 and a usage line, nothing run."""
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.output or "Error" in result.output
