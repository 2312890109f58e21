"""Ray's cluster launcher (``ray.autoscaler.sdk``) in a process of its own, its output in a log.

``python -m dvcray_cli.clusters.launcher.launch up|down|head-ip CONFIG`` runs
``create_or_update_cluster(no_config_cache=True)``, ``teardown_cluster`` or
``get_head_node_ip``. Ray's launcher prints to the terminal and runs ``ssh`` and
``rsync`` with the terminal's file descriptors; in a child process all of it goes to
one log file, and ``run`` passes its step lines (``[2/7] Processing file mounts``)
to the caller as progress. The last lines of the log are the error when it fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from dvcray_cli.errors import ClusterError

MODULE = "dvcray_cli.clusters.launcher.launch"
HEAD_IP_MARK = "dvcray-head-ip="
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_STEP = re.compile(r"\[(\d+)/(\d+)\]\s+(.*)")


def clean(line: str) -> str:
    return _ANSI.sub("", line).rstrip()


def tail(path: Path, lines: int = 12) -> str:
    """The last meaningful lines of a launcher log (no ANSI colours, no blank lines)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [clean(ln) for ln in text.splitlines() if clean(ln).strip()
            and "VVINFO" not in ln and not clean(ln).startswith("Shared connection")]
    return "\n".join(kept[-lines:])


def run(action: str, config_path: Path, log_path: Path, env: dict[str, str] | None = None,
        say: Callable[[str], None] = lambda _m: None, timeout: float = 3600,
        what: str = "Ray's cluster launcher") -> str:
    """Run ``action`` (up, down, head-ip) on ``config_path`` in a child process.

    Returns:
        The child's output (the log's text).

    Raises:
        ClusterError: the child failed or ran past ``timeout``; names the log.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, **(env or {})}
    # The launcher's ssh and rsync must not ask anything at a terminal.
    child_env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", MODULE, action, str(config_path)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
    seen = 0
    deadline = time.monotonic() + timeout
    try:
        while True:
            done = proc.poll() is not None
            seen = _progress(log_path, seen, say)
            if done:
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise ClusterError(f"{what} did not finish within {timeout:.0f} s. Its log: {log_path}")
            time.sleep(0.5)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        reason = refusal(text)
        if reason:
            raise ClusterError(f"{what} failed: {reason} (its log: {log_path})")
        raise ClusterError(f"{what} failed (exit {proc.returncode}). Its log: {log_path}\n{tail(log_path)}")
    return text


# What a cloud answered when it refused to make a node (a quota, capacity, a bad parameter):
# Ray ends with ``NodeLaunchException: Node Launch Exception (Code): message``.
_REFUSAL = re.compile(r"NodeLaunchException: (?:Node Launch Exception )?\((\w+)\):\s*(.+)")
REFUSED = "the cloud refused to launch a node"


def refusal(text: str) -> str | None:
    """The cloud's refusal that ended a launcher run, as ``Code: message``; None when none."""
    found = [m for m in (_REFUSAL.search(clean(ln)) for ln in text.splitlines()) if m]
    return f"{REFUSED}: {found[-1].group(1)}: {found[-1].group(2).strip()}" if found else None


def _progress(log_path: Path, seen: int, say: Callable[[str], None]) -> int:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return seen
    for line in lines[seen:]:
        match = _STEP.search(clean(line))
        if match and "VVINFO" not in line:
            say(f"  [{match.group(1)}/{match.group(2)}] {match.group(3).strip()}")
    return len(lines)


def head_ip_from(output: str) -> str | None:
    found = [ln.split(HEAD_IP_MARK, 1)[1].strip() for ln in output.splitlines() if HEAD_IP_MARK in ln]
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("up", "down", "head-ip"):
        print(f"usage: python -m {MODULE} up|down|head-ip CONFIG", file=sys.stderr)
        return 2
    action, config = args
    from ray.autoscaler import sdk

    if action == "up":
        sdk.create_or_update_cluster(config, no_config_cache=True)
    if action == "head-ip":
        print(HEAD_IP_MARK + sdk.get_head_node_ip(config), flush=True)
    if action == "down":
        sdk.teardown_cluster(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
