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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode, urlparse

from dvcray_cli.errors import ClusterError
from dvcray_cli.service.protocol import (ANSWER_SIGNATURE, HAVE, HELLO, POLL, RUNS, SIGNATURE, TIMEOUT_S, Hello,
                                         PollAnswer, PollRequest, ServiceRun, answer_signed, body_digest,
                                         listening_port, loopback, proof, sign_request)


class ServiceError(ClusterError):
    """The service did not answer, or answered with an error."""

    def __init__(self, message: str, hint: str | None = None, status: int = 0,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message, hint)
        self.status = status
        self.body = body or {}


class MissingCommits(Exception):
    """The cluster's repository cache lacks commits a thin bundle needs."""


def exchange(url: str, method: str, target: str, body: bytes | None, headers: dict[str, str],
             timeout: float) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request to ``url`` (``target``: path and query): ``(status, headers, body)``.

    Raises:
        ServiceError: no answer (connection refused, timeout).
    """
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ServiceError(f"Nothing answers at {url} ({type(exc).__name__}).") from None
    finally:
        conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def decoded(headers: dict[str, str], data: bytes) -> dict[str, Any] | bytes:
    """A JSON answer as an object ({} when it is torn); anything else as its bytes."""
    if (headers.get("content-type") or "").startswith("application/json"):
        try:
            return json.loads(data)
        except ValueError:
            return {}
    return data


def bearer_request(url: str, token: str | None, method: str, path: str, body: dict | None = None,
                   timeout: float = TIMEOUT_S) -> tuple[int, dict[str, Any] | bytes]:
    """A request to Ray's own job API, which takes its token as ``Authorization: Bearer``
    (Ray's protocol; only ever to an address the user configured, through a verified
    port-forward for a cluster elsewhere)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    status, answer_headers, raw = exchange(url, method, path, data, headers, timeout)
    return status, decoded(answer_headers, raw)


@dataclass
class Service:
    """A runner service a client talks to: its URL (reachable from here), id and version.

    The token never goes to it: each request is signed with it, and each answer must be
    signed by it (``protocol.sign_request``, ``protocol.sign_answer``)."""

    url: str            # http://127.0.0.1:PORT (directly, or through a port-forward)
    token: str
    service_id: str = ""
    version: str = ""
    job_api: str = ""   # the cluster's job API, where its Ray Job is recorded
    head_port: int = 0  # the port it listens on, on its head's 127.0.0.1
    skew: float = 0.0   # its clock minus this machine's (from hello)

    def request(self, method: str, path: str, body: bytes | dict | None = None,
                params: dict[str, Any] | None = None, timeout: float = TIMEOUT_S,
                nonce: str | None = None) -> tuple[int, dict[str, Any] | bytes]:
        """One signed request, whose answer must be signed by the service; JSON in and out
        (raw bytes in for a tar, raw bytes out when not JSON). ``nonce``: hello's own (its
        query names it); other requests get a fresh one.

        Raises:
            ServiceError: no answer (connection refused, timeout), or an answer the service
                did not sign (whoever answers there does not know the token).
        """
        headers = {}
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif body is not None:
            headers["Content-Type"] = "application/x-tar"
        target = f"{path}?{urlencode(params)}" if params else path
        if nonce is None:
            nonce = secrets.token_hex(16)
            headers[SIGNATURE] = sign_request(self.token, method, target, int(time.time() + self.skew), nonce,
                                              body_digest(body or b""))
        status, answer_headers, data = exchange(self.url, method, target, body, headers, timeout)
        if not answer_signed(self.token, nonce, status, data, answer_headers.get(ANSWER_SIGNATURE.lower())):
            raise ServiceError(f"What answers at {self.url} did not sign its answer with this cluster's token: it "
                               "is not this cluster's dvcray runner service (nothing was sent that it could use).")
        return status, decoded(answer_headers, data)

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
        asked = time.time()
        try:
            status, data = self.request("GET", HELLO, params={"nonce": nonce}, timeout=5, nonce=nonce)
        except ServiceError as exc:
            raise ServiceError(f"What answers at {self.url} is not this cluster's dvcray runner service "
                               f"({exc.message})") from None
        answer = Hello.from_json(data)
        if status != 200 or not answer.service_id or (expect_id and answer.service_id != expect_id) or \
                not hmac.compare_digest(answer.proof, proof(self.token, nonce, answer.service_id)):
            raise ServiceError(f"What answers at {self.url} is not this cluster's dvcray runner service.")
        self.service_id, self.version = answer.service_id, answer.version
        if answer.time:
            self.skew = answer.time - (asked + time.time()) / 2
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

