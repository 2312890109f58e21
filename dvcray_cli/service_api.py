"""The runner service's protocol, as both ends speak it (``dvcray_cli.service`` serves it).

The runner service is one long-lived Ray Job per cluster that imports DVC once and
forks a process per experiment (DESIGN.md, "Warm runners"): an experiment costs
no Ray Job supervisor, no interpreter and no import of DVC. It listens on the
head's 127.0.0.1 only, on a port it picks and names in its job log, and every
request but ``hello`` carries the cluster's Ray auth token (``Authorization:
Bearer``). ``hello`` proves the service knows the token before a client sends
it (an HMAC of a nonce the client picked): a port remembered from an earlier
service may belong to another process now.

Plain HTTP (``http.client``): a client of the service imports neither Ray nor
``requests``.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlencode, urlparse

from dvcray_cli.errors import ClusterError

# The metadata key that marks a Ray Job as a runner service (never a run: ``active_runs``
# asks the service for its runs instead).
SERVICE_MARKER = "dvcray_service"
ENTRYPOINT = "python -m dvcray_cli.service"
# The line the service writes to its job log once it listens.
LISTENING = re.compile(r"dvcray-service: listening on 127\.0\.0\.1:(\d+) as (\S+)")
HELLO, HAVE, RUNS, POLL = "/v1/hello", "/v1/have", "/v1/runs", "/v1/poll"
TIMEOUT_S = 10.0


class ServiceError(ClusterError):
    """The service did not answer, or answered with an error."""

    def __init__(self, message: str, hint: str | None = None, status: int = 0,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message, hint)
        self.status = status
        self.body = body or {}


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


@dataclass
class Service:
    """A runner service a client talks to: its URL (reachable from here), id and version."""

    url: str            # http://127.0.0.1:PORT (directly, or through a port-forward)
    token: str
    service_id: str = ""
    version: str = ""
    job_api: str = ""   # the cluster's job API, where its Ray Job is recorded
    head_port: int = 0  # the port it listens on, on its head's 127.0.0.1

    def request(self, method: str, path: str, body: bytes | dict | None = None,
                params: dict[str, Any] | None = None, timeout: float = TIMEOUT_S,
                auth: bool = True) -> tuple[int, dict[str, Any] | bytes]:
        """One request; JSON in and out (raw bytes in for a tar, raw bytes out when not JSON).

        Raises:
            ServiceError: no answer (connection refused, timeout).
        """
        parsed = urlparse(self.url)
        headers = {}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif body is not None:
            headers["Content-Type"] = "application/x-tar"
        if params:
            path = f"{path}?{urlencode(params)}"
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ServiceError(f"The dvcray runner service at {self.url} does not answer "
                               f"({type(exc).__name__}).") from None
        finally:
            conn.close()
        if (response.getheader("Content-Type") or "").startswith("application/json"):
            try:
                return response.status, json.loads(data)
            except ValueError:
                return response.status, {}
        return response.status, data

    def call(self, method: str, path: str, body: bytes | dict | None = None, timeout: float = TIMEOUT_S,
             **params: Any) -> dict[str, Any]:
        """A request that must answer 200 with a JSON object.

        Raises:
            ServiceError: no answer, or another status (``status`` and ``body`` say which).
        """
        status, data = self.request(method, path, body, params or None, timeout)
        answer = data if isinstance(data, dict) else {}
        if status != 200:
            raise ServiceError(f"The dvcray runner service at {self.url} answered HTTP {status}: "
                               f"{answer.get('error') or '(no reason given)'}", status=status, body=answer)
        return answer

    def hello(self, expect_id: str = "") -> dict[str, Any]:
        """Ask the service who it is and check that it knows the token (before the token is sent).

        Raises:
            ServiceError: it does not answer, is another service than ``expect_id``, or cannot
                prove that it knows the token.
        """
        nonce = secrets.token_hex(16)
        status, data = self.request("GET", HELLO, params={"nonce": nonce}, auth=False, timeout=5)
        answer = data if isinstance(data, dict) else {}
        service_id = str(answer.get("service_id") or "")
        if status != 200 or not service_id or (expect_id and service_id != expect_id) or \
                not hmac.compare_digest(str(answer.get("proof") or ""), proof(self.token, nonce, service_id)):
            raise ServiceError(f"What answers at {self.url} is not this cluster's dvcray runner service.")
        self.service_id, self.version = service_id, str(answer.get("version") or "")
        return answer


def active_runs(job_api: str, token: str | None, job_id: str, log: str,
                reach: Callable[[int], str | None] | None = None) -> list[dict[str, Any]] | None:
    """The runs a service (Ray Job ``job_id``, its job log ``log``) has pending or running,
    as ``ray_api.active_runs`` lists runs; None when it cannot be asked from here.

    It listens on its head's 127.0.0.1: ``reach(port)`` says where this machine reaches
    that port (a port-forward to the head: ``clusters.service_url``), None or an error
    where nothing does. Without ``reach``, a job API on loopback is taken to be on the
    service's own machine (a local cluster, or the head itself: its idle watcher).
    """
    found = listening_port(log)
    if found is None or not token:
        return None
    if reach is not None:
        try:
            url = reach(found[0])
        except ClusterError:
            return None
    else:
        url = f"http://127.0.0.1:{found[0]}" if _loopback((urlparse(job_api).hostname or "").lower()) else None
    if url is None:
        return None
    service = Service(url, token)
    try:
        service.hello(found[1])
        runs = service.call("GET", RUNS).get("runs") or []
    except ServiceError:
        return None
    return [{"run_id": r.get("run_id"), "status": r.get("state"), "exp_name": r.get("exp_name"), "job_id": job_id}
            for r in runs if isinstance(r, dict) and r.get("state") in ("PENDING", "RUNNING")]


def _loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")
