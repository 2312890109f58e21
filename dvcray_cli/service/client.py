"""A client of the runner service (``protocol.py``): one request at a time, typed answers.

Plain HTTP (``http.client``): a client of the service imports neither Ray nor
``requests``. Finding a cluster's service, starting one and following its runs is
``dvcray_cli.runs.backends.service``'s job; this module only speaks the protocol.
"""

from __future__ import annotations

import hmac
import http.client
import io
import json
import secrets
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode, urlparse

from dvcray_cli.errors import ClusterError
from dvcray_cli.service.protocol import (HAVE, HELLO, POLL, RUNS, TIMEOUT_S, Hello, PollAnswer, PollRequest, ServiceRun,
                                         listening_port, loopback, proof)


class ServiceError(ClusterError):
    """The service did not answer, or answered with an error."""

    def __init__(self, message: str, hint: str | None = None, status: int = 0,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message, hint)
        self.status = status
        self.body = body or {}


class MissingCommits(Exception):
    """The cluster's repository cache lacks commits a thin bundle needs."""


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

    def hello(self, expect_id: str = "") -> Hello:
        """Ask the service who it is and check that it knows the token (before the token is sent).

        Raises:
            ServiceError: it does not answer, is another service than ``expect_id``, or cannot
                prove that it knows the token.
        """
        nonce = secrets.token_hex(16)
        status, data = self.request("GET", HELLO, params={"nonce": nonce}, auth=False, timeout=5)
        answer = Hello.from_json(data)
        if status != 200 or not answer.service_id or (expect_id and answer.service_id != expect_id) or \
                not hmac.compare_digest(answer.proof, proof(self.token, nonce, answer.service_id)):
            raise ServiceError(f"What answers at {self.url} is not this cluster's dvcray runner service.")
        self.service_id, self.version = answer.service_id, answer.version
        return answer

    def have(self, root: str, shas: list[str]) -> list[str]:
        """Which of ``shas`` the cluster's repository cache of project ``root`` holds."""
        return list(self.call("POST", HAVE, {"root": root, "shas": shas}).get("have") or [])

    def send(self, folder: Path, placement: str = "") -> dict[str, Any]:
        """Send the snapshot in ``folder`` (its manifest names the experiments) to the service.

        Raises:
            MissingCommits: the cluster lacks commits the snapshot's bundle needs.
            ServiceError: the service refused it or did not answer.
        """
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path in sorted(folder.iterdir()):
                tar.add(path, arcname=path.name)
        params = {"placement": placement} if placement else None
        status, answer = self.request("POST", RUNS, buffer.getvalue(), params=params, timeout=120)
        answer = answer if isinstance(answer, dict) else {}
        if status == 409 and answer.get("missing"):
            raise MissingCommits(", ".join(map(str, answer["missing"]))[:200])
        if status != 200:
            raise ServiceError(f"The dvcray runner service refused the run (HTTP {status}): "
                               f"{answer.get('error') or '(no reason given)'}", status=status, body=answer)
        return answer

    def runs(self) -> dict[str, ServiceRun]:
        """Every run the service knows."""
        found = (ServiceRun.from_json(r) for r in self.call("GET", RUNS).get("runs") or [])
        return {r.run_id: r for r in found if r is not None}

    def poll(self, request: PollRequest, timeout: float) -> PollAnswer:
        """One long poll (``PollRequest``)."""
        return PollAnswer.from_json(self.call("POST", POLL, request.to_json(), timeout=timeout), request.after)

    def stop(self, run_id: str) -> None:
        """Ask the service to stop a run (SIGTERM, the grace to save, SIGKILL)."""
        self.call("POST", f"{RUNS}/{run_id}/stop")


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
        url = f"http://127.0.0.1:{found[0]}" if loopback((urlparse(job_api).hostname or "").lower()) else None
    if url is None:
        return None
    service = Service(url, token)
    try:
        service.hello(found[1])
        runs = service.runs()
    except ServiceError:
        return None
    return [{"run_id": r.run_id, "status": r.state.value, "exp_name": r.exp_name, "job_id": job_id}
            for r in runs.values() if r.state.is_active()]

