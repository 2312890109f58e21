"""Guards that stay: ``dvcray --help`` is fast, and every command is documented.

Like DVC's tests/unit/test_imports.py, each check runs the real entry point in
a fresh interpreter and looks at ``sys.modules`` when it ends: importing Ray
alone costs 0.5 s (DESIGN.md), so heavy libraries belong inside command bodies.
The docs checks follow sqlite-utils' tests/test_docs.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer.main

from helpers import REPO

HEAVY = {"ray", "dvc", "dvclive", "boto3", "botocore", "s3fs", "torch", "pandas", "numpy",
         "sklearn", "matplotlib"}

# Runs the CLI as `python -m dvcray_cli ARGS` would, then reports which
# top-level modules were imported, whatever the exit status.
PROBE = """
import json, runpy, sys
sys.argv = ["dvcray", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_module("dvcray_cli", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
finally:
    sys.stdout.flush()
    sys.stderr.write("\\nMODULES=" + json.dumps(sorted({m.split(".")[0] for m in sys.modules})) + "\\n")
sys.exit(code)
"""


def commands() -> dict[tuple[str, ...], object]:
    """Every visible command and group of the app, by the words a user types."""
    from dvcray_cli.cli import app

    found: dict[tuple[str, ...], object] = {}

    def walk(cmd, path: tuple[str, ...]) -> None:
        found[path] = cmd
        for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
            if not sub.hidden:
                walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


COMMANDS = commands()
LEAVES = {path: cmd for path, cmd in COMMANDS.items() if path and not getattr(cmd, "commands", None)}


def ids(path: tuple[str, ...]) -> str:
    return " ".join(("dvcray", *path))


def imported(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("MODULES="))
    return proc, set(json.loads(line.removeprefix("MODULES=")))


def test_the_app_has_the_commands_the_design_lists():
    """DESIGN.md's command contract, exactly: a command added or dropped shows here."""
    assert set(LEAVES) == {("scaffold",), ("cluster", "up"), ("cluster", "down"), ("cluster", "status"), ("run",),
                           ("runs",), ("logs",), ("stop",), ("pull",), ("report",), ("queue", "start")}


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=ids)
def test_help_imports_no_heavy_library(path):
    proc, modules = imported([*path, "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
    assert not HEAVY & modules, f"`{ids(path)} --help` imported {sorted(HEAVY & modules)}"


def test_version_imports_no_heavy_library():
    proc, modules = imported(["--version"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("dvcray ")
    assert not HEAVY & modules


def test_scaffold_list_imports_no_heavy_library():
    proc, modules = imported(["scaffold", "--list"])
    assert proc.returncode == 0, proc.stderr
    assert not HEAVY & modules


def test_python_dash_m_help():
    """``python -m dvcray_cli --help`` lists every top-level command, each with its summary line."""
    proc = subprocess.run([sys.executable, "-m", "dvcray_cli", "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert proc.returncode == 0, proc.stderr
    listed = {}
    for line in proc.stdout.split("Commands", 1)[1].splitlines():
        words = line.strip("│ ").split(None, 1)
        if len(words) == 2 and words[0].isalpha():
            listed[words[0]] = words[1].strip()
    top = {path[0]: cmd for path, cmd in COMMANDS.items() if len(path) == 1}
    assert set(listed) == set(top), listed
    for name, cmd in top.items():
        summary = (cmd.short_help or cmd.help or "").strip().splitlines()[0]
        assert listed[name].startswith(summary[:40]), (name, listed[name], summary)


# --- docs (sqlite-utils' tests/test_docs.py) -------------------------------------------

@pytest.mark.parametrize("path", sorted(COMMANDS), ids=ids)
def test_every_command_has_help(path):
    help_text = COMMANDS[path].help or ""
    assert help_text.strip(), f"`{ids(path)}` has no help text (its docstring)"


@pytest.mark.parametrize("path", sorted(LEAVES), ids=ids)
def test_every_command_has_an_example(path):
    help_text = LEAVES[path].help or ""
    assert "Example:" in help_text, f"`{ids(path)}`'s docstring has no Example: block"
    example = help_text.split("Example:", 1)[1]
    assert ids(path) in example, f"`{ids(path)}`'s example does not show the command"


@pytest.mark.parametrize("path", sorted(LEAVES), ids=ids)
def test_every_command_is_in_the_readme(path):
    # A heading alone does not count: the command must be shown or described.
    body = [line for line in (REPO / "README.md").read_text().splitlines()
            if not line.lstrip().startswith("#")]
    assert any(ids(path) in line for line in body), f"README.md does not document `{ids(path)}`"


def test_readme_quickstart_matches_ci():
    """.ci/run installs and tests the way the README's Quickstart says."""
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for command in ("pip install --upgrade pip", "pip install torch==2.13.0", 'pip install -e ".[dev]"'):
        assert command in readme and command in ci, command
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = quickstart.split("```bash\n")[1:]
    assert len(blocks) == 2, "the Quickstart has exactly two commands: install+run, test"
    test_command = blocks[1].split("```", 1)[0].strip()
    assert test_command.startswith("pytest")
    assert any(line.strip().startswith(test_command) for line in ci.splitlines())
