"""Runs through the cluster's runner service (``dvcray_cli.service``): find it or start
it, send it snapshots, follow its experiments, stop them.

The service is a Ray Job of the cluster that imports DVC once and forks one process
per experiment, so an experiment costs no Ray Job of its own (DESIGN.md, "Warm
runners"). The client reaches it over plain HTTP (no import of Ray) where the
cluster lets it (``clusters.service_url``: directly on this machine, through an SSH
port-forward to a launcher or AWS cluster's head); elsewhere, or with ``DVCRAY_SERVICE=0``,
or when the service does not start, runs go as Ray Jobs of their own as before.
"""

from __future__ import annotations

import base64
import codecs
import fcntl
import io
import os
import secrets
import tarfile
import time
from pathlib import Path
from typing import Any, Callable

from dvcray_cli import __version__, clusters, compatible, ray_api, state
from dvcray_cli.errors import ClusterError, Interrupted
from dvcray_cli.runs.model import RunState
from dvcray_cli.service_api import ENTRYPOINT, POLL, RUNS, SERVICE_MARKER, Service, ServiceError, listening_port

# How long the first run waits for a service to start (a Ray Job importing DVC).
START_TIMEOUT_S = 120.0
POLL_WAIT_S = 5.0
# How often a client following a local cluster's service checks that the cluster lives.
CHECK_EVERY_S = 5.0
# How long the client keeps trying to reach a cluster that stopped answering.
RECONNECT_TIMEOUT_S = float(os.environ.get("DVCRAY_RECONNECT_TIMEOUT_S", "60"))


class MissingCommits(Exception):
    """The cluster's repository cache lacks commits a thin bundle needs."""


def enabled() -> bool:
    """``DVCRAY_SERVICE=0`` sends every run as a Ray Job of its own."""
    return os.environ.get("DVCRAY_SERVICE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_path() -> Path:
    return state.clusters_dir() / "services.json"


# --------------------------------------------------------------------------- the job API, plainly


def _job_api(url: str, token: str, method: str, path: str, body: dict | None = None) -> Any:
    """One request to Ray's job API (JSON), without importing Ray's SDK.

    Raises:
        ClusterError: no answer, or an error status.
    """
    api = Service(url, token)
    try:
        status, data = api.request(method, path, body, timeout=ray_api.HTTP_TIMEOUT_S)
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


# --------------------------------------------------------------------------- reach it


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
    state.private_dir(state.clusters_dir())
    with open(state.clusters_dir() / "services.lock", "w") as lock:
        # One client at a time finds or starts a cluster's service: two runs started
        # together must not start two.
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = state.read_json(_cache_path()) or {}
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
            cache = {k: v for k, v in (state.read_json(_cache_path()) or {}).items() if k != url}
            cache[url] = {"port": service.head_port, "service_id": service.service_id}
            state.write_json(_cache_path(), cache)
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
    if answer.get("draining") or not compatible(service.version):
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
        if ray_api.is_terminal(status):
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
    known = (state.read_json(_cache_path()) or {}).get(url)
    if not token or not isinstance(known, dict):
        return None
    try:
        return _hello(address, known.get("port"), token, str(known.get("service_id") or ""), url)
    except ClusterError:
        return None


# --------------------------------------------------------------------------- submit


def have(service: Service, root: str, shas: list[str]) -> list[str]:
    """Which of ``shas`` the cluster's repository cache of project ``root`` holds."""
    return list(service.call("POST", "/v1/have", {"root": root, "shas": shas}).get("have") or [])


def send(service: Service, folder: Path, placement: str = "") -> dict[str, Any]:
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
    status, answer = service.request("POST", RUNS, buffer.getvalue(), params=params, timeout=120)
    answer = answer if isinstance(answer, dict) else {}
    if status == 409 and answer.get("missing"):
        raise MissingCommits(", ".join(map(str, answer["missing"]))[:200])
    if status != 200:
        raise ServiceError(f"The dvcray runner service refused the run (HTTP {status}): "
                           f"{answer.get('error') or '(no reason given)'}", status=status, body=answer)
    return answer


# --------------------------------------------------------------------------- follow


def lost_contact(address: str, run_ids: list[str], exc: BaseException, since: float) -> ClusterError | None:
    """The error to end on once the cluster stopped answering; None to keep trying.

    At once when ``address`` is a cluster dvcray started on this machine and its
    GCS is gone (it died: nothing will come back); otherwise after
    ``DVCRAY_RECONNECT_TIMEOUT_S`` (default 60) without an answer.
    """
    runs = ", ".join(run_ids)
    first = run_ids[0] if len(run_ids) == 1 else "RUN"
    where = f"Its log up to then is in the store: dvcray logs {first}; dvcray runs shows what became of it."
    dead = clusters.dead_at(address)
    if dead is not None:
        return ClusterError(f"The Ray cluster {dead!r} at {address} died during run {runs}: "
                            "its GCS process is gone, and the run with it.", where)
    if time.time() - since <= RECONNECT_TIMEOUT_S:
        return None
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
    return ClusterError(f"Lost contact with the Ray cluster at {address} for {RECONNECT_TIMEOUT_S:.0f} s "
                        f"while following run {runs} ({reason}). If the cluster died, the run is lost.",
                        f"The run may still be going if the cluster comes back. {where}")



class Watch:
    """Runs of one service followed with one long poll for all: their state changes, and
    the new bytes of the logs of those that go (resumed from their offsets after a
    dropped connection: nothing lost, nothing repeated)."""

    def __init__(self, service: Service, address: str, run_ids: list[str]) -> None:
        self.service, self.address = service, address
        self.after = 0
        self.offsets = {r: 0 for r in run_ids}
        self.states: dict[str, dict[str, Any]] = {}
        self.decoders = {r: codecs.getincrementaldecoder("utf-8")(errors="replace") for r in run_ids}
        self.lost_since: float | None = None
        self.checked = time.monotonic()

    def poll(self, watch: list[str], logs: list[str], wait: float = POLL_WAIT_S) -> tuple[dict, dict[str, str], list]:
        """``(changed states, new log text per run, runs the service does not know)``;
        empty while the service does not answer (until ``follow.lost_contact`` gives up).

        Raises:
            ClusterError: the service has not answered for too long, or its cluster died.
        """
        if time.monotonic() - self.checked > CHECK_EVERY_S:
            # The service may outlive its cluster a while (a head whose GCS died): look.
            self.checked = time.monotonic()
            dead = clusters.dead_at(self.address)
            if dead is not None:
                raise lost_contact(self.address, watch, ClusterError("its GCS process is gone"), 0.0)
        body = {"after": self.after, "watch": watch, "logs": {r: self.offsets.get(r, 0) for r in logs}, "wait": wait}
        try:
            answer = self.service.call("POST", POLL, body, timeout=wait + 15)
        except ServiceError as exc:
            self.lost_since = self.lost_since or time.time()
            error = lost_contact(self.address, watch, exc, self.lost_since)
            if error is not None:
                raise error from None
            time.sleep(1.0)
            return {}, {}, []
        self.lost_since = None
        self.after = int(answer.get("seq") or self.after)
        text: dict[str, str] = {}
        for run_id, piece in (answer.get("logs") or {}).items():
            data = base64.b64decode(piece.get("data") or "")
            start = int(piece.get("offset") or 0)
            if start != self.offsets.get(run_id, 0) or not data:
                continue
            self.offsets[run_id] = start + len(data)
            decoder = self.decoders.setdefault(run_id, codecs.getincrementaldecoder("utf-8")(errors="replace"))
            text[run_id] = decoder.decode(data)
        changed = {r: v for r, v in (answer.get("runs") or {}).items() if isinstance(v, dict)}
        self.states.update(changed)
        return changed, text, list(answer.get("unknown") or [])

    def state(self, run_id: str) -> str:
        return str((self.states.get(run_id) or {}).get("state") or "PENDING")


def follow(service: Service, address: str, run_id: str, emit: Callable[[str], None],
           stop_on_interrupt: bool = True) -> str:
    """Stream a service run's log until it ends; return its final state (as Ray's job
    statuses: SUCCEEDED, FAILED, STOPPED; LOST when the service forgot it).

    Ctrl-C (or SIGTERM) stops the run and raises Interrupted once it has ended; with
    ``stop_on_interrupt=False`` (``dvcray logs --follow``) it only stops following.
    """
    watch = Watch(service, address, [run_id])
    try:
        ended = False
        while True:
            changed, text, unknown = watch.poll([run_id], [run_id], wait=POLL_WAIT_S if not ended else 0)
            if text.get(run_id):
                emit(text[run_id])
            if unknown:
                return RunState.LOST.value
            if ended and not text:
                return watch.state(run_id)
            ended = ray_api.is_terminal(watch.state(run_id))
    except KeyboardInterrupt:
        if stop_on_interrupt:
            stop(service, [run_id])
        raise Interrupted.following(run_id, stopped=stop_on_interrupt) from None


def stop(service: Service, run_ids: list[str], timeout: float | None = None) -> dict[str, str]:
    """Stop runs and wait until each has ended (their runners save their work first).

    Returns:
        ``{run_id: state}`` as the service last said.
    """
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for run_id in run_ids:
            try:
                service.call("POST", f"{RUNS}/{run_id}/stop")
            except ServiceError:
                continue
        deadline = time.monotonic() + (timeout if timeout is not None else ray_api.stop_grace_s() + 10)
        found: dict[str, str] = {}
        after = 0
        while time.monotonic() < deadline:
            try:
                answer = service.call("POST", POLL, {"after": after, "watch": run_ids, "wait": 2}, timeout=20)
            except ServiceError:
                break
            after = int(answer.get("seq") or after)
            for run_id, info in (answer.get("runs") or {}).items():
                found[run_id] = str(info.get("state"))
            for run_id in answer.get("unknown") or []:
                found[run_id] = RunState.LOST.value
            if all(ray_api.is_terminal(found.get(r, "")) or found.get(r) == "LOST" for r in run_ids):
                break
        return found
    finally:
        signal.signal(signal.SIGINT, previous)


def runs_of(service: Service) -> dict[str, dict[str, Any]]:
    """Every run the service knows: ``{run_id: {"state", "node", "started", "ended", ...}}``."""
    runs = service.call("GET", RUNS).get("runs") or []
    return {r["run_id"]: r for r in runs if isinstance(r, dict) and isinstance(r.get("run_id"), str)}


def lost(service: Service, run_id: str) -> str | None:
    """Why the service counts ``run_id`` lost (its node died), or None."""
    try:
        return str((runs_of(service).get(run_id) or {}).get("lost") or "") or None
    except ServiceError:
        return None


def as_job(info: dict[str, Any] | None) -> Any:
    """A service run as ``dvcray runs`` reads a Ray job (``status``, ``start_time`` and
    ``end_time`` in ms); None for None."""
    from types import SimpleNamespace

    if not info:
        return None
    ms = {k: int(info[k] * 1000) if isinstance(info.get(k), (int, float)) else None for k in ("started", "ended")}
    return SimpleNamespace(status=str(info.get("state") or "PENDING"), start_time=ms["started"],
                           end_time=ms["ended"], node=info.get("node"), lost=str(info.get("lost") or ""))


def show_log(service: Service, address: str, run_id: str, emit: Callable[[str], None], follow_: bool) -> str:
    """Write a service run's log to ``emit``: what there is, or with ``follow_`` until it
    ends. Returns its state then."""
    if follow_:
        return follow(service, address, run_id, emit, stop_on_interrupt=False)
    watch = Watch(service, address, [run_id])
    while True:
        _, text, unknown = watch.poll([run_id], [run_id], wait=0)
        if unknown:
            return RunState.LOST.value
        if not text.get(run_id):
            return watch.state(run_id)
        emit(text[run_id])
