"""Runs lost with their machine, tried again by the runner service (where the run lives, so a
``--detach``ed run, or one whose client died, is retried too).

A placed experiment (``placed.py``) whose node died, whose spot instance was reclaimed, or
whose node's warm runner went away is LOST, never FAILED: the user's code did not fail.
Unless it was stopped, the service is leaving, or its retries are spent
(``protocol.retry``), the service submits it again from the snapshot it keeps: a fresh
reservation, which Ray places on a live node (the autoscaler adds one where it can), and the
same run id, so exactly one experiment comes home. The retry resumes (``runs/resume.py``):
stages that finished are restored from the store, a Ray Train stage resumes from its
checkpoint. An experiment on the head is lost with the head, and the service with it:
nothing is left there to retry it.

What the person sees: the run's log (as the service keeps it) says which machine was lost
and where the retry runs; its attempts are in every report (``ServiceRun.attempts``) and, once
it was retried or lost, in the store (``attempts.json``), with a final ``result.json`` naming
each loss when the retries are spent and no runner could write one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from dvcray_cli.runs.model import ATTEMPTS, RESULT, Manifest, RunResult
from dvcray_cli.service.protocol import Attempt, RunState, losses_text
from dvcray_cli.store import Store


def lost_line(lost: Attempt, retry: int, retries: int) -> str:
    """The log line when ``lost`` was lost and retry ``retry`` of ``retries`` follows."""
    machine = f"machine {lost.node}" if lost.node else "its machine"
    return f"dvcray: {machine} lost ({lost.lost}); retrying ({retry}/{retries})\n"


def placed_line(retry: int, retries: int, node: str) -> str:
    """The log line once the retry has a machine."""
    return f"dvcray: retry {retry}/{retries} runs on {node}\n"


def append(path: Path | None, data: str | bytes) -> int:
    """Add ``data`` to the run's log as the service keeps it; its size then."""
    if path is None:
        return 0
    try:
        with open(path, "ab") as log:
            log.write(data.encode() if isinstance(data, str) else data)
        return path.stat().st_size
    except OSError:
        return 0


def record(manifest: Manifest, run_id: str, exp_name: str | None, attempts: list[Attempt],
           ended: RunState | None = None) -> str:
    """Write the run's attempts to the store (``attempts.json``); once it has ``ended`` LOST
    (or STOPPED while it waited for a retry), also a ``result.json`` that says so when no
    runner could write one (its machine died with it). Returns what went wrong, or "" (the
    store is never why a run fails)."""
    try:
        store = Store.from_json(manifest.store)
        store.write(store.run_path(run_id, ATTEMPTS),
                    json.dumps({"attempts": [a.to_json() for a in attempts]}).encode())
        if ended in (RunState.LOST, RunState.STOPPED) and attempts \
                and store.read_json(store.run_path(run_id, RESULT)) is None:
            result = final_result(manifest, run_id, exp_name, attempts, ended)
            store.write(store.run_path(run_id, RESULT), json.dumps(result.to_json(), indent=2).encode())
    except Exception as exc:  # noqa: BLE001 - said in the service's log
        return f"{type(exc).__name__}: {exc}"
    return ""


def final_result(manifest: Manifest, run_id: str, exp_name: str | None, attempts: list[Attempt],
                 state: RunState) -> RunResult:
    """The final word on a run whose last attempt was lost, by the service: every loss named."""
    spec: dict[str, Any] = next((s for s in manifest.experiments if s.get("run_id") == run_id), {})
    last = attempts[-1]
    losses = losses_text(attempts) or "its machine was lost"
    error = losses if state == RunState.LOST else f"stopped while it waited for a retry ({losses})"
    return RunResult(run_id=run_id, status=state, exp_name=exp_name,
                     baseline=str(spec.get("baseline") or manifest.baseline),
                     overrides=list(spec.get("overrides") or manifest.overrides), node=last.node,
                     started=attempts[0].started, ended=last.ended or time.time(),
                     dvcray_version=manifest.dvcray_version, error=error, attempt=last.number,
                     attempts=list(attempts))
