"""The runner service's protocol, as both ends speak it: its paths, the proof that a
service knows the cluster's token, the messages, and the states of a run.

The runner service is one long-lived Ray Job per cluster that imports DVC once and
forks a process per experiment (DESIGN.md, "Warm runners"): an experiment costs
no Ray Job supervisor, no interpreter and no import of DVC. It listens on the
head's 127.0.0.1 only, on a port it picks and names in its job log. The cluster's
Ray auth token never travels to it: every request but ``hello`` is signed with it
(``SIGNATURE``: an HMAC over method, path, time, a nonce and the body's sha256),
and every answer too (``ANSWER_SIGNATURE``: over the request's nonce, the status and
the body's sha256). Whoever holds the port after the service died (another local
user, another process on the head) learns nothing it could use, and cannot answer
in the service's name (issue 20, point 4). ``hello`` proves the service knows the
token (an HMAC of a nonce the client picked) and gives its clock, which signed
requests then use.

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
# The most runs one poll may name (to watch, and to read logs of).
MAX_POLL_RUNS = 10000


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


# --------------------------------------------------------------------------- signatures

SIGNATURE = "X-Dvcray-Signature"          # a request's: t=TIME,n=NONCE,b=BODY_SHA256,s=HMAC
ANSWER_SIGNATURE = "X-Dvcray-Answer"      # an answer's: HMAC
# How far a signed request's time may be from the service's clock (the client uses the
# service's clock, from hello); a nonce is taken once within it.
WINDOW_S = 120.0
_SIGNED = re.compile(r"t=(\d{1,12}),n=([0-9a-f]{32}),b=([0-9a-f]{64}),s=([0-9a-f]{64})")


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _mac(token: str, text: str) -> str:
    return hmac.new(token.encode(), text.encode(), hashlib.sha256).hexdigest()


def sign_request(token: str, method: str, target: str, when: int, nonce: str, digest: str) -> str:
    """The ``SIGNATURE`` header of a request to ``target`` (its path and query, as sent)."""
    mac = _mac(token, f"request\n{method.upper()}\n{target}\n{when}\n{nonce}\n{digest}")
    return f"t={when},n={nonce},b={digest},s={mac}"


@dataclass(frozen=True)
class Signed:
    """A request's signature, read: its time, nonce and the sha256 of its body."""

    when: int
    nonce: str
    digest: str


def check_request(token: str, method: str, target: str, header: str | None, now: float) -> Signed | str:
    """The request's signature when ``header`` signs it with ``token`` within ``WINDOW_S`` of
    ``now``; else why not, in words (the nonce is for the caller to take only once)."""
    found = _SIGNED.fullmatch(header or "")
    if found is None:
        return "the request is not signed with this cluster's token"
    when, nonce, digest, mac = int(found[1]), found[2], found[3], found[4]
    expected = sign_request(token, method, target, when, nonce, digest).rsplit("=", 1)[1]
    if not hmac.compare_digest(mac, expected):
        return "the request is not signed with this cluster's token"
    if abs(now - when) > WINDOW_S:
        return f"the request's signature is {abs(now - when):.0f} s off this service's clock"
    return Signed(when, nonce, digest)


def sign_answer(token: str, nonce: str, status: int, body: bytes) -> str:
    """The ``ANSWER_SIGNATURE`` of an answer to the request with ``nonce``."""
    return _mac(token, f"answer\n{nonce}\n{status}\n{body_digest(body)}")


def answer_signed(token: str, nonce: str, status: int, body: bytes, header: str | None) -> bool:
    """The answer is the service's own, to this very request."""
    return bool(header) and hmac.compare_digest(header, sign_answer(token, nonce, status, body))


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
    time: float = 0.0       # its clock: signed requests are timed by it
    signs: bool = False     # it takes signed requests (a service from before them does not)

    def to_json(self) -> dict[str, Any]:
        return {"service_id": self.service_id, "version": self.version, "proof": self.proof, "node": self.node,
                "draining": self.draining, "time": self.time, "signs": self.signs}

    @classmethod
    def from_json(cls, data: Any) -> Hello:
        data = data if isinstance(data, dict) else {}
        return cls(str(data.get("service_id") or ""), str(data.get("version") or ""), str(data.get("proof") or ""),
                   str(data.get("node") or ""), bool(data.get("draining")), _number(data.get("time")) or 0.0,
                   data.get("signs") is True)


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
        """The request in ``data``.

        Raises:
            ValueError: it is not one (names the field): the service answers 400.
        """
        if not isinstance(data, dict):
            raise ValueError("a poll is a JSON object")
        after, wait = data.get("after", 0), data.get("wait", 0)
        watch, logs = data.get("watch") or [], data.get("logs") or {}
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ValueError("after: not a sequence number")
        if _number(wait) is None or not 0 <= wait <= 3600:  # NaN and infinities fail this too
            raise ValueError("wait: not a number of seconds between 0 and 3600")
        if not isinstance(watch, list) or len(watch) > MAX_POLL_RUNS or not all(isinstance(r, str) for r in watch):
            raise ValueError(f"watch: not a list of at most {MAX_POLL_RUNS} run ids")
        if not isinstance(logs, dict) or len(logs) > MAX_POLL_RUNS or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in logs.values()):
            raise ValueError(f"logs: not at most {MAX_POLL_RUNS} run ids with their offsets")
        return cls(after, list(watch), dict(logs), float(wait))


@dataclass
class PollAnswer:
    """The answer to a poll: the sequence number its changes were read at (the next
    poll's ``after``), the runs that changed, new log bytes (``{run_id: (offset, data)}``)
    and the watched runs the service does not know."""

    seq: int = 0
    runs: dict[str, ServiceRun] = field(default_factory=dict)
    logs: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)  # runs whose logs were not read: the answer was full

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "runs": {r: run.to_json() for r, run in self.runs.items()},
                "logs": {r: {"offset": offset, "data": base64.b64encode(data).decode()}
                         for r, (offset, data) in self.logs.items()},
                "unknown": list(self.unknown), "cut": list(self.cut)}

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
        return cls(int(data.get("seq") or after), runs, logs, [str(r) for r in data.get("unknown") or []],
                   [str(r) for r in data.get("cut") or []])
