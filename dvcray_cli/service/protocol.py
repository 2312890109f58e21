"""The runner service's protocol, as both ends speak it: its paths, the proof that a
service knows the cluster's token, the messages, and the states of a run.

The runner service is one long-lived Ray Job per cluster that imports DVC once and
forks a process per experiment (DESIGN.md, "Warm runners"): an experiment costs
no Ray Job supervisor, no interpreter and no import of DVC. It listens on the
head's 127.0.0.1 only, on a port it picks and names in its job log, and every
request but ``hello`` carries the cluster's Ray auth token (``Authorization:
Bearer``). ``hello`` proves the service knows the token before a client sends
it (an HMAC of a nonce the client picked): a port remembered from an earlier
service may belong to another process now.

As Ray keeps a job's wire types in one module for its client and its server
(``ray/dashboard/modules/job/common.py``), the messages are typed here once:
``client.py`` and ``server.py`` both read and write them. The wire format is JSON
and stays what it is within a minor version (``dvcray_cli.compatible``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

# The metadata key that marks a Ray Job as a runner service (never a run: ``active_runs``
# asks the service for its runs instead).
SERVICE_MARKER = "dvcray_service"
ENTRYPOINT = "python -m dvcray_cli.service"
# The line the service writes to its job log once it listens.
LISTENING = re.compile(r"dvcray-service: listening on 127\.0\.0\.1:(\d+) as (\S+)")
HELLO, HAVE, RUNS, POLL = "/v1/hello", "/v1/have", "/v1/runs", "/v1/poll"
TIMEOUT_S = 10.0


class RunState(str, Enum):
    """Where a run is: one enum for the runner service, Ray Jobs, the store's records and
    this clone's. The five from PENDING on are also Ray's job statuses."""

    WAITING = "WAITING"      # a sweep's experiment not submitted yet (the client's own)
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    LOST = "LOST"            # no final result, and its cluster is gone or forgot it

    def __str__(self) -> str:
        return self.value

    def is_terminal(self) -> bool:
        """It has ended: nothing more comes from where it ran (as Ray's
        ``JobStatus.is_terminal()``). LOST included: following, waiting and stopping end
        there."""
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED, RunState.LOST)

    def has_outcome(self) -> bool:
        """It ended with an outcome of its own: terminal, and not LOST (a lost run's
        cluster may still come back and tell otherwise)."""
        return self.is_terminal() and self != RunState.LOST

    def is_active(self) -> bool:
        """Submitted and not ended."""
        return self in (RunState.PENDING, RunState.RUNNING)

    @classmethod
    def parse(cls, value: Any, default: RunState | None = None) -> RunState | None:
        """``value`` as a RunState (Ray's ``JobStatus`` too); ``default`` when it is none."""
        text = str(getattr(value, "value", value) or "").upper()
        try:
            return cls(text)
        except ValueError:
            return default


def proof(token: str, nonce: str, service_id: str) -> str:
    """What a service that knows ``token`` answers to ``nonce``."""
    return hmac.new(token.encode(), f"{nonce}:{service_id}".encode(), hashlib.sha256).hexdigest()


def authorized(header: str | None, token: str) -> bool:
    """``header`` is ``Bearer <token>`` (compared in constant time)."""
    return bool(header) and hmac.compare_digest(header.encode(), f"Bearer {token}".encode())


def listening_port(log: str) -> tuple[int, str] | None:
    """``(port, service_id)`` from a service's job log, once it listens."""
    found = LISTENING.findall(log or "")
    return (int(found[-1][0]), found[-1][1]) if found else None


def loopback(host: str) -> bool:
    """``host`` names this machine's loopback."""
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


# What a placed experiment may reserve: CPUs, GPUs, and the head pin a local store needs.
PLACEABLE = ("CPU", "GPU", "node:__internal_head__")


def placement_text(resources: dict[str, float | None]) -> str:
    """``{"CPU": 1, "GPU": 0.5}`` -> ``CPU=1,GPU=0.5``: a submission's ``placement`` parameter
    (what each of its experiments reserves; none given are left out)."""
    return ",".join(f"{k}={v:g}" for k, v in resources.items() if v is not None)


def parse_placement(text: str | None) -> dict[str, float]:
    """``CPU=1,GPU=0.5`` -> ``{"CPU": 1.0, "GPU": 0.5}``: what each placed experiment
    reserves; anything but ``PLACEABLE`` resources of a positive amount is dropped."""
    found: dict[str, float] = {}
    for part in (text or "").split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            try:
                found[key.strip()] = float(value)
            except ValueError:
                continue
    return {k: v for k, v in found.items() if k in PLACEABLE and v > 0}


# --------------------------------------------------------------------------- attempts and retries

# The runner's exit code for a run it saved as LOST (the process it ran under went away, or
# its cluster died under it): not the stage's failure, which is exit 1.
LOST_EXIT = 75
# What multiprocessing reports for a forked runner whose forkserver died under it (``forks``):
# the runner got SIGTERM with it and saved its run as LOST.
FORKSERVER_GONE = 255
# How often a run lost with its machine is submitted again, unless the run or the project says.
DEFAULT_RETRIES = 3


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class Attempt:
    """One try of an experiment: where it ran and how it ended (a store record too, in
    ``attempts.json``: read tolerantly)."""

    number: int
    node: str = ""            # the machine (host name) it ran on; "" before it was placed
    started: float | None = None
    ended: float | None = None
    state: RunState = RunState.RUNNING  # how it ended: LOST for a lost one
    lost: str = ""            # why it was lost

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "node": self.node, "started": self.started, "ended": self.ended,
                "state": self.state.value, "lost": self.lost}

    @classmethod
    def from_json(cls, data: Any) -> Attempt | None:
        if not isinstance(data, dict) or not isinstance(data.get("number"), int) or data["number"] < 1:
            return None
        return cls(data["number"], str(data.get("node") or ""), _number(data.get("started")),
                   _number(data.get("ended")), RunState.parse(data.get("state"), RunState.RUNNING) or RunState.RUNNING,
                   str(data.get("lost") or ""))

    def text(self) -> str:
        """``attempt 1 on n1: its node 10.0.0.1 died`` (how a loss is named)."""
        where = f" on {self.node}" if self.node else ""
        return f"attempt {self.number}{where}: {self.lost or self.state.value.lower()}"


def attempts_of(data: Any) -> list[Attempt]:
    """A list of attempts from JSON (anything unusable left out), in order."""
    found = [a for a in (Attempt.from_json(x) for x in (data if isinstance(data, list) else [])) if a is not None]
    return sorted(found, key=lambda a: a.number)


def ended_as(code: int | None, lost: str, stop_requested: bool) -> RunState:
    """How an experiment's process ended, from its exit code: SUCCEEDED on 0; LOST when it
    went with its machine or runner (``lost`` says so, or the runner saved it as LOST);
    STOPPED when stopped; else FAILED: its stage failed (exit 1), the user's code."""
    if code == 0:
        return RunState.SUCCEEDED
    if lost or code in (LOST_EXIT, FORKSERVER_GONE):
        return RunState.LOST
    if code == 143 or stop_requested:
        return RunState.STOPPED
    return RunState.FAILED


def retry(state: RunState, attempt: int, retries: int, stop_requested: bool = False, draining: bool = False) -> bool:
    """Whether attempt ``attempt`` (from 1) of an experiment that ended ``state`` is followed by
    another: only a loss (its machine died, was reclaimed, its runner went away), never a
    failure of its stage, a stop, or a run whose service is leaving; at most ``retries`` times."""
    return state == RunState.LOST and not stop_requested and not draining and attempt <= retries


def losses_text(attempts: list[Attempt]) -> str:
    """Every loss named, for the error of a run that ended LOST."""
    lost = [a for a in attempts if a.state == RunState.LOST]
    if len(lost) <= 1:
        return lost[0].lost if lost else ""
    return f"lost {len(lost)} times: " + "; ".join(a.text() for a in lost)


# --------------------------------------------------------------------------- messages


@dataclass
class Hello:
    """The answer to ``hello``: who the service is, and its proof of the token."""

    service_id: str
    version: str = ""
    proof: str = ""
    node: str = ""
    draining: bool = False  # it takes no new runs (it stops once its runs have ended)

    def to_json(self) -> dict[str, Any]:
        return {"service_id": self.service_id, "version": self.version, "proof": self.proof, "node": self.node,
                "draining": self.draining}

    @classmethod
    def from_json(cls, data: Any) -> Hello:
        data = data if isinstance(data, dict) else {}
        return cls(str(data.get("service_id") or ""), str(data.get("version") or ""), str(data.get("proof") or ""),
                   str(data.get("node") or ""), bool(data.get("draining")))


@dataclass
class ServiceRun:
    """One experiment as the service reports it (``GET /v1/runs``, and each change in a poll)."""

    run_id: str
    job_id: str = ""          # the submission it came with (a sweep's experiments share one)
    exp_name: str | None = None
    state: RunState = RunState.PENDING  # PENDING again while a lost run waits for its retry
    node: str = ""
    pid: int = 0
    started: float | None = None
    ended: float | None = None
    code: int | None = None   # its exit code
    placed: bool = False      # on the warm runner of the node Ray placed it on (``--cpus-per-exp``)
    lost: str = ""            # why it is lost (its node died), when it is
    attempts: list[Attempt] = field(default_factory=list)  # every try so far, the current one last

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "job_id": self.job_id, "exp_name": self.exp_name, "state": self.state.value,
                "node": self.node, "pid": self.pid, "started": self.started, "ended": self.ended, "code": self.code,
                "placed": self.placed, "lost": self.lost, "attempts": [a.to_json() for a in self.attempts]}

    @classmethod
    def from_json(cls, data: Any) -> ServiceRun | None:
        if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
            return None
        code = data.get("code")
        return cls(data["run_id"], str(data.get("job_id") or ""),
                   data["exp_name"] if isinstance(data.get("exp_name"), str) else None,
                   RunState.parse(data.get("state"), RunState.PENDING), str(data.get("node") or ""),
                   int(_number(data.get("pid")) or 0), _number(data.get("started")), _number(data.get("ended")),
                   code if isinstance(code, int) and not isinstance(code, bool) else None, bool(data.get("placed")),
                   str(data.get("lost") or ""), attempts_of(data.get("attempts")))


@dataclass
class PollRequest:
    """``POST /v1/poll``: the changes after ``after`` of the runs in ``watch``, and the log
    bytes from ``logs[run_id]`` on; the service answers at once when there are some, else
    when some come, at most ``wait`` seconds later."""

    after: int = 0
    watch: list[str] = field(default_factory=list)
    logs: dict[str, int] = field(default_factory=dict)
    wait: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"after": self.after, "watch": list(self.watch), "logs": dict(self.logs), "wait": self.wait}

    @classmethod
    def from_json(cls, data: Any) -> PollRequest:
        data = data if isinstance(data, dict) else {}
        return cls(int(data.get("after") or 0), [str(r) for r in data.get("watch") or []],
                   {str(k): int(v) for k, v in (data.get("logs") or {}).items()}, float(data.get("wait") or 0))


@dataclass
class PollAnswer:
    """The answer to a poll: the sequence number its changes were read at (the next
    poll's ``after``), the runs that changed, new log bytes (``{run_id: (offset, data)}``)
    and the watched runs the service does not know."""

    seq: int = 0
    runs: dict[str, ServiceRun] = field(default_factory=dict)
    logs: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "runs": {r: run.to_json() for r, run in self.runs.items()},
                "logs": {r: {"offset": offset, "data": base64.b64encode(data).decode()}
                         for r, (offset, data) in self.logs.items()},
                "unknown": list(self.unknown)}

    @classmethod
    def from_json(cls, data: Any, after: int = 0) -> PollAnswer:
        """The answer in ``data``; ``after`` when it names no sequence number."""
        data = data if isinstance(data, dict) else {}
        runs = {}
        for run_id, info in (data.get("runs") or {}).items():
            run = ServiceRun.from_json({"run_id": run_id, **info}) if isinstance(info, dict) else None
            if run is not None:
                runs[run_id] = run
        logs = {}
        for run_id, piece in (data.get("logs") or {}).items():
            if isinstance(piece, dict):
                logs[run_id] = (int(piece.get("offset") or 0), base64.b64decode(piece.get("data") or ""))
        return cls(int(data.get("seq") or after), runs, logs, [str(r) for r in data.get("unknown") or []])
