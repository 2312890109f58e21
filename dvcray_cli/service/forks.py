"""Experiments forked from a process that imported DVC once.

multiprocessing's forkserver is that process: a fresh interpreter (no threads, no
sockets, no Ray) that imports DVC and dvcray's runner once (``preload.py``) and
forks one child per experiment in milliseconds. The runner service and the
per-node runner actors each start one. A child starts a session of its own (so
a stop reaches the stage's processes too, as Ray's ``stop_job`` does), writes
its output to the run's log file, and runs ``runner.run_experiment``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRELOAD = ["dvcray_cli.service.preload"]
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGTERM this process when its parent (the forkserver) goes: a runner whose
    service or actor died saves its work and ends, as a stopped Ray Job does."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the runner ends when its stage does


def _child(folder: str, spec: dict[str, Any], log_path: str, env: dict[str, str]) -> None:
    """The body of one experiment's process (in the forkserver's child)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.setsid()
    die_with_parent()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.update(env)
    os.chdir(folder)
    code = 1
    try:
        from dvcray_cli import runner
        from dvcray_cli.runs.model import ExpSpec, Manifest

        manifest = Manifest.read(Path(folder))
        parsed = ExpSpec.from_json(spec)
        if parsed is None:
            raise ValueError(f"not an experiment: {spec!r}")
        code = runner.run_experiment(Path(folder), manifest, parsed, forked=True)
    except BaseException as exc:  # noqa: BLE001 - said in the run's log; the exit code tells the service
        print(f"dvcray: the runner failed: {type(exc).__name__}: {exc}", flush=True)
    finally:
        os._exit(code)


@dataclass
class Fork:
    """One experiment's process."""

    process: Any
    started: float = field(default_factory=time.time)
    term_sent: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    def exitcode(self) -> int | None:
        """Its exit code once it ended (a negative signal number when killed), else None."""
        return self.process.exitcode if not self.process.is_alive() else None

    def terminate(self) -> None:
        """SIGTERM to its process group: the runner saves its work, the stage ends."""
        self.term_sent = self.term_sent or time.time()
        _signal_group(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        _signal_group(self.pid, signal.SIGKILL)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Launcher:
    """The forkserver, started (DVC imported) when this is made."""

    def __init__(self) -> None:
        import multiprocessing
        from multiprocessing import forkserver

        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()

    def start(self, folder: Path, spec: dict[str, Any], log_path: Path, env: dict[str, str] | None = None) -> Fork:
        """Fork one experiment: the runner of ``spec`` with the snapshot in ``folder``,
        its output appended to ``log_path``; ``env`` added to its environment."""
        process = self.ctx.Process(target=_child, args=(os.fspath(folder), spec, os.fspath(log_path), env or {}),
                                   daemon=False)
        process.start()
        return Fork(process)


def alive(pid: int) -> bool:
    """``pid`` runs (and is no zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
