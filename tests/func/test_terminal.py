"""What ``dvcray run`` shows in a real terminal (a pseudo-terminal) and elsewhere: the live
table of a sweep, colour as ``NO_COLOR``/``FORCE_COLOR``/``CI`` say, and a fast DVCLive
loop that does not flood the screen (README, "Live in DVC Studio, and in your terminal"
and "Use in CI")."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

# DVCLive as fast as it goes: a step each iteration, no pause. x=2 fails at the end.
TRAIN = """\
import sys, yaml
from dvclive import Live
p = yaml.safe_load(open("params.yaml"))
with Live("dvclive", dvcyaml=None, report=None) as live:
    for i in range(p["steps"]):
        live.log_metric("acc", round((i + 1) / p["steps"], 6))
        live.next_step()
if p["x"] == 2:
    sys.exit("the planned failure")
"""

# An SGR sequence that sets a colour (foreground or background, 16, 256 or true colour).
COLOUR = re.compile(r"\x1b\[(?:[0-9]+;)*(?:3[0-9]|4[0-9]|9[0-7]|10[0-7])(?:;[0-9]+)*m")
# The live table's header (the summary table at the end has other columns).
HEADER = re.compile(r"experiment\s*┃\s*state\s*┃\s*elapsed\s*┃\s*latest")
_FOREIGN = ("NO_COLOR", "FORCE_COLOR", "CI", "COLUMNS", "LINES", "TERM")


@pytest.fixture
def project(make_dvc_project) -> Path:
    return make_dvc_project({
        "params.yaml": "x: 0\nsteps: 300\n", "train.py": TRAIN,
        "dvc.yaml": "stages:\n  train:\n    cmd: python train.py\n    deps: [train.py]\n    params: [x, steps]\n"
                    "    outs: [{dvclive: {cache: false}}]\nmetrics: [dvclive/metrics.json]\n",
    })


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
    return {**env, "TERM": "xterm-256color", **extra}


def in_a_terminal(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> tuple[int, str, float]:
    """Run ``dvcray ARGS`` with a pseudo-terminal (160 x 50) as its stdin, stdout and stderr.

    Returns:
        Its exit code, everything it wrote, and how long it ran (s).
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "dvcray_cli", *args], cwd=cwd, env=env, stdin=slave,
                            stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    chunks = []
    deadline = started + timeout   # a hang guard
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:   # EIO: the terminal's last writer closed it
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace"), time.monotonic() - started


def _plain(text: str) -> str:
    """``text`` without terminal control sequences."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def _sweep(values: str, store: Path) -> list[str]:
    return ["run", "-n", "term", "-S", f"x={values}", "--store", str(store)]


def test_a_sweep_in_a_terminal_draws_its_table_in_colour_a_few_times_a_second(project, ray_cluster, tmp_path):
    code, text, took = in_a_terminal(_sweep("1,2", tmp_path / "store"), project, _env())
    assert code == 1, text[-3000:]
    plain = _plain(text)
    draws = len(HEADER.findall(plain))
    assert draws >= 1, plain[-3000:]
    assert re.search(r"term-1\s*│\s*SUCCEEDED", plain) and re.search(r"term-2\s*│\s*FAILED", plain), plain[-3000:]
    # Rich redraws the table at most 4 times a second, however fast the loop logs steps
    # (two loops of 300 steps here): never once per step.
    assert draws <= 4 * took + 4, (draws, took)
    assert COLOUR.search(text), "an error is red in a terminal"
    assert "[term-1]" not in plain, "no plain [NAME] lines where there is a live table"


def test_no_color_in_a_terminal_keeps_the_table_without_colour(project, ray_cluster, tmp_path):
    code, text, _ = in_a_terminal(_sweep("1,2", tmp_path / "store"), project, _env(NO_COLOR="1"))
    assert code == 1, text[-3000:]
    assert HEADER.search(_plain(text)), text[-3000:]
    # DVC's own warnings (a link to its docs, which DVC colours whatever NO_COLOR says,
    # e.g. "Waiting to acquire lock ... <https://man.dvc.org/...>") are DVC's, not dvcray's.
    ours = "\n".join(ln for ln in text.splitlines() if ".dvc.org/" not in ln)
    found = COLOUR.search(ours)
    assert "Error:" in ours and not found, repr(ours[max(0, found.start() - 400):found.end() + 200])


def test_a_single_run_in_a_terminal_shows_its_latest_step_at_most_once_a_second(project, ray_cluster, tmp_path):
    code, text, took = in_a_terminal(["run", "-n", "single", "-S", "x=1", "-S", "steps=2000", "--store",
                                      str(tmp_path / "store")], project, _env())
    assert code == 0, text[-3000:]
    lines = [ln for ln in _plain(text).splitlines() if "live: " in ln]
    assert lines, text[-3000:]
    assert len(lines) <= took + 1, (took, lines)
    assert lines[-1].strip().startswith("live: dvclive step 1999"), lines[-1]


@pytest.mark.parametrize("env, colour", [
    ({}, False),                                        # not a terminal: plain lines, no colour
    ({"FORCE_COLOR": "1"}, True),                       # ... unless FORCE_COLOR
    ({"CI": "true"}, False),
    ({"CI": "true", "FORCE_COLOR": "1"}, True),
])
def test_elsewhere_plain_lines_and_colour_only_when_forced(project, ray_cluster, tmp_path, env, colour):
    proc = subprocess.run([sys.executable, "-m", "dvcray_cli", *_sweep("1,2", tmp_path / "store")], cwd=project,
                          env=_env(**env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert bool(COLOUR.search(text)) == colour, text[-2000:]
    plain = _plain(text)
    assert "[term-1] SUCCEEDED" in plain and "[term-2] FAILED" in plain, plain[-3000:]
    assert not HEADER.search(plain), "no live table where there is no terminal"
