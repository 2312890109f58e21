"""Find a cluster's runner service (``dvcray_cli.service``), or start it.

The service is a Ray Job of the cluster that imports DVC once and forks one process
per experiment, so an experiment costs no Ray Job of its own (DESIGN.md, "Warm
runners"). The client reaches it over plain HTTP (no import of Ray) where the
cluster lets it (``clusters.service_url``: directly on this machine, through an SSH
port-forward to a launcher or AWS cluster's head); elsewhere, or with ``DVCRAY_SERVICE=0``,
or when the service does not start, runs go as Ray Jobs of their own.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from dvcray_cli import __version__, clusters, compatible, ray_api, files
from dvcray_cli.errors import ClusterError
from dvcray_cli.service.client import Service, ServiceError, bearer_request
from dvcray_cli.service.protocol import ENTRYPOINT, SERVICE_MARKER, listening_port

# How long the first run waits for a service to start (a Ray Job importing DVC).
START_TIMEOUT_S = 120.0


def enabled() -> bool:
    """``DVCRAY_SERVICE=0`` sends every run as a Ray Job of its own."""
    return os.environ.get("DVCRAY_SERVICE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_path() -> Path:
    return files.clusters_dir() / "services.json"


def _job_api(url: str, token: str, method: str, path: str, body: dict | None = None) -> Any:
    """One request to Ray's job API (JSON), without importing Ray's SDK.

    Raises:
        ClusterError: no answer, or an error status.
    """
    try:
        status, data = bearer_request(url, token, method, path, body, timeout=ray_api.HTTP_TIMEOUT_S)
    except ServiceError:
        raise ClusterError(f"No Ray cluster answers at {url}.", ray_api.UP_HINT) from None
    if status != 200:
        raise ray_api.http_error(url, status, token)
    return data


def _service_jobs(url: str, token: str) -> list[dict[str, Any]]:
    """The cluster's runner services that run now, newest first."""
    jobs = _job_api(url, token, "GET", "/api/jobs/") or []
    found = [j for j in jobs if isinstance(j, dict) and j.get("status") == "RUNNING"
             and compatible(str((j.get("metadata") or {}).get(SERVICE_MARKER) or ""))]
    return sorted(found, key=lambda j: j.get("start_time") or 0, reverse=True)


def _job_log(url: str, token: str, job_id: str) -> str:
    return str((_job_api(url, token, "GET", f"/api/jobs/{job_id}/logs") or {}).get("logs") or "")


def reach(address: str, say: Callable[[str], None] = lambda m: None) -> Service | None:
    """The runner service of the cluster at ``address``, started when it runs none.

    Returns:
        None when runs go there as Ray Jobs instead: ``DVCRAY_SERVICE=0``, a cluster
        whose head this machine cannot reach (``clusters.reaches_service``), or a
        service that would not start (its log says why; the Ray Job path then
        reports what is wrong with the cluster).

    Raises:
        ClusterError: the cluster's job API does not answer or refuses the token, or the
            port-forward to its head's service did not open.
    """
    if not enabled() or not clusters.reaches_service(address):
        return None
    url = clusters.job_api(address)
    token = clusters.token_for(url)
    if not token:
        return None
    files.private_dir(files.clusters_dir())
    with open(files.clusters_dir() / "services.lock", "w") as lock:
        # One client at a time finds or starts a cluster's service: two runs started
        # together must not start two.
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = files.read_json(_cache_path()) or {}
        known = cache.get(url) if isinstance(cache.get(url), dict) else None
        if known:
            service = _hello(address, known.get("port"), token, str(known.get("service_id") or ""), url)
            if service is not None:
                return service
        service = None
        for job in _service_jobs(url, token):
            found = listening_port(_job_log(url, token, job.get("submission_id") or ""))
            if found:
                service = _hello(address, found[0], token, found[1], url)
            if service is not None:
                break
        if service is None:
            # A service runs the cluster's own dvcray: refuse another version before
            # anything starts there (the head's label; a probe job otherwise).
            clusters.check_version(address)
            service = _start(address, url, token, say)
        if service is not None:
            cache = {k: v for k, v in (files.read_json(_cache_path()) or {}).items() if k != url}
            cache[url] = {"port": service.head_port, "service_id": service.service_id}
            files.write_json(_cache_path(), cache)
        return service


def _hello(address: str, port: Any, token: str, service_id: str, url: str) -> Service | None:
    """The service on the head's ``port`` if it is ``service_id``, knows the token, takes
    runs and runs a dvcray this client can work with.

    Raises:
        ClusterError: the port-forward to the head did not open.
    """
    if not isinstance(port, int) or not service_id:
        return None
    where = clusters.service_url(address, port)
    if where is None:
        return None
    service = Service(where, token, job_api=url, head_port=port)
    try:
        answer = service.hello(service_id)
    except ServiceError:
        return None
    if answer.draining or not compatible(service.version):
        return None
    return service


def _start(address: str, url: str, token: str, say: Callable[[str], None]) -> Service | None:
    """Submit a runner service to the cluster and wait until it listens."""
    job_id = f"dvcray-service-{secrets.token_hex(4)}"
    say("Starting dvcray's runner service on the cluster (once per cluster: it imports DVC once and "
        "runs every experiment after this one without a Ray Job each)...")
    _job_api(url, token, "POST", "/api/jobs/", {
        "entrypoint": f"{ENTRYPOINT} --id {job_id}",
        "submission_id": job_id,
        "runtime_env": {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(ray_api.stop_grace_s() + 5),
                                     "PYTHONUNBUFFERED": "1"}},
        "metadata": {SERVICE_MARKER: __version__},
    })
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        log = _job_log(url, token, job_id)
        found = listening_port(log)
        if found:
            return _hello(address, found[0], token, found[1], url)
        status = str((_job_api(url, token, "GET", f"/api/jobs/{job_id}") or {}).get("status") or "")
        if ray_api.job_state(status).is_terminal():
            tail = " / ".join(log.strip().splitlines()[-2:])
            say(f"dvcray's runner service did not start ({status}{': ' + tail if tail else ''}); "
                "running as a Ray Job instead.")
            return None
        time.sleep(0.2)
    _job_api(url, token, "POST", f"/api/jobs/{job_id}/stop")
    say(f"dvcray's runner service did not start within {START_TIMEOUT_S:.0f} s; running as a Ray Job instead.")
    return None


def find(address: str) -> Service | None:
    """The runner service this machine knows for ``address`` (never starts one); None
    when there is none or it does not answer."""
    if not clusters.reaches_service(address):
        return None
    url = clusters.job_api(address)
    token = clusters.token_for(url)
    known = (files.read_json(_cache_path()) or {}).get(url)
    if not token or not isinstance(known, dict):
        return None
    try:
        return _hello(address, known.get("port"), token, str(known.get("service_id") or ""), url)
    except ClusterError:
        return None
