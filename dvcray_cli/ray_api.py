"""Ray's job API and dashboard, as every part of dvcray talks to them.

One place for: the address form (``http://HOST:PORT``), auth token files, a
``JobSubmissionClient`` that sends the token, the nodes and the autoscaler's
report of a cluster (one HTTP request each, no driver), dvcray's runs among a
cluster's jobs, and stopping jobs with their grace period.

Nothing here knows which clusters dvcray started: finding the token for an
address is ``dvcray_cli.clusters.connect``'s job. Ray is imported inside the
functions that need it: ``dvcray --help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dvcray_cli.errors import ClusterError
from dvcray_cli.service.protocol import SERVICE_MARKER, RunState

if TYPE_CHECKING:  # pragma: no cover
    from ray.job_submission import JobSubmissionClient

# The metadata key that marks a Ray job as a dvcray run (DESIGN.md, "Submit").
RUN_MARKER = "dvcray_version"
UP_HINT = "Start one with: dvcray cluster up local (or check --address / RAY_ADDRESS)."
HTTP_TIMEOUT_S = 10.0


def stop_grace_s() -> int:
    """Seconds a stopped runner gets to save its work before Ray kills it
    (``DVCRAY_STOP_GRACE_S``, default 60; given to Ray as ``RAY_JOB_STOP_WAIT_TIME_S``).

    Raises:
        UsageError: the variable is not a number of seconds.
    """
    from dvcray_cli import files

    return int(files.env_seconds("DVCRAY_STOP_GRACE_S", 60))


# --------------------------------------------------------------------------- addresses


def normalize(address: str) -> str:
    """``127.0.0.1:8265`` -> ``http://127.0.0.1:8265`` (no trailing slash)."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    return address


# --------------------------------------------------------------------------- tokens


def default_token_path() -> Path:
    """Where Ray itself keeps the token (``ray/_private/authentication/authentication_token_setup.py``)."""
    return Path.home() / ".ray" / "auth_token"


def read_token(path: Path | str) -> str | None:
    """The token in ``path``, or None when it is missing or empty."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return text or None


def ensure_token(path: Path | None = None) -> Path:
    """Make sure an auth token file exists (mode 0600) and return its path.

    Ray generates tokens as ``secrets.token_hex(32)``
    (``ray/_private/authentication/authentication_token_generator.py``); dvcray
    does the same so that ``ray get-auth-token`` and Ray's own clients read it.
    """
    path = Path(path) if path else default_token_path()
    if read_token(path):
        return path
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path


def env_token() -> str | None:
    """The token this process's environment names: ``RAY_AUTH_TOKEN``, else the
    file ``RAY_AUTH_TOKEN_PATH`` (Ray's own order of precedence)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return read_token(Path(os.environ["RAY_AUTH_TOKEN_PATH"]))
    return None


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def http_error(url: str, status: int, token: str | None = None) -> ClusterError:
    """The error for an HTTP status the job API answered with."""
    if status == 401:
        return ClusterError(f"The Ray cluster at {url} requires an auth token and none was found.",
                            "Set RAY_AUTH_TOKEN, or put the cluster's token in ~/.ray/auth_token.")
    if status == 403:
        return ClusterError(f"The Ray cluster at {url} refused the auth token.",
                            "Set RAY_AUTH_TOKEN to the token the cluster was started with.")
    return ClusterError(f"The Ray job API at {url} answered HTTP {status}.", UP_HINT)


def _get(url: str, path: str, token: str | None, params: dict | None = None) -> Any:
    import requests

    try:
        r = requests.get(f"{url}{path}", params=params, headers=_headers(token), timeout=HTTP_TIMEOUT_S)
    except requests.RequestException as exc:
        raise ClusterError(f"No Ray cluster answers at {url} ({type(exc).__name__}).", UP_HINT) from None
    if r.status_code != 200:
        raise http_error(url, r.status_code, token)
    try:
        return r.json()
    except ValueError:
        raise ClusterError(f"The Ray job API at {url} answered with something that is not JSON.",
                           UP_HINT) from None


# --------------------------------------------------------------------------- the job client


def quiet_ray_logs() -> None:
    """Ray's SDK logs each package upload and websocket close at INFO."""
    for name in ["ray", *(n for n in logging.root.manager.loggerDict if n.startswith("ray."))]:
        logging.getLogger(name).setLevel(logging.WARNING)


def client(address: str, token: str | None) -> JobSubmissionClient:
    """A Ray ``JobSubmissionClient`` for the job API at ``address`` that sends ``token``.

    Ray's SDK adds ``Authorization: Bearer <token>`` by itself only when this process
    has ``RAY_AUTH_MODE=token`` (``ray/_private/authentication/http_token_authentication.py``);
    dvcray passes the header explicitly instead, so nothing in this process's
    environment changes.

    Raises:
        ClusterError: nothing answers at ``address``, or it refused the token.
    """
    url = normalize(address)
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Ray's SDK lets RAY_API_SERVER_ADDRESS or RAY_ADDRESS override the address it is
    # given (ray/dashboard/utils.py: get_address_for_submission_client); the client
    # must talk to `url` (a run's recorded cluster, --address), whatever the env says.
    hidden = {v: os.environ.pop(v) for v in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if v in os.environ}
    try:
        made = JobSubmissionClient(url, headers=_headers(token))
    except AuthenticationError as exc:
        raise http_error(url, 401 if "required" in str(exc).split(":", 1)[0] else 403, token) from None
    except requests.HTTPError as exc:
        raise http_error(url, exc.response.status_code if exc.response is not None else 0, token) from None
    except (ConnectionError, requests.RequestException, RuntimeError) as exc:
        raise ClusterError(f"No Ray cluster answers at {url} ({type(exc).__name__}).", UP_HINT) from None
    finally:
        os.environ.update(hidden)
    quiet_ray_logs()
    return made


def job_status(job_client: JobSubmissionClient, job_id: str) -> str:
    """A job's status as Ray spells it: ``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``, ``STOPPED``."""
    return status_text(job_client.get_job_status(job_id))


def status_text(status: Any) -> str:
    """Ray's ``JobStatus`` (or a job's ``.status``) as its string value."""
    return str(getattr(status, "value", status))


def job_state(status: Any) -> RunState:
    """A job's status (Ray's ``JobStatus`` or its string) as a RunState (``is_terminal``...)."""
    return RunState.parse(status, RunState.PENDING)


def node_died(job_client: JobSubmissionClient, job_id: str) -> str | None:
    """Why a FAILED job ended, when the reason is that its node died (a machine lost,
    its raylet killed), not its entrypoint: Ray's own message, in one line; else None."""
    try:
        info = job_client.get_job_info(job_id)
    except Exception:  # noqa: BLE001 - the cluster forgot it, or does not answer
        return None
    return node_died_of(info)


def node_died_of(info: Any) -> str | None:
    """``node_died`` for a job's info (``JobDetails``) already at hand."""
    if status_text(getattr(info, "status", "")) != "FAILED":
        return None
    message = str(getattr(info, "message", "") or "")
    error_type = str(getattr(info, "error_type", "") or "")
    if "node has died" in message or "node was terminated" in message or error_type == "JOB_SUPERVISOR_ACTOR_DIED":
        lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
        ip = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("ip:")), "")
        return f"its node{(' ' + ip) if ip else ''} died (Ray: {lines[0] if lines else error_type})"
    return None


def active_runs(job_client: JobSubmissionClient,
                service_url: Callable[[int], str | None] | None = None) -> list[dict[str, Any]]:
    """dvcray's runs that are pending or running on the cluster: jobs tagged
    ``dvcray_version``, and the runs of its runner service (``service_api``).

    A runner service that cannot be asked from here counts as a run itself: it may
    have some, and no answer is no proof of idleness. ``service_url(port)``: where this
    machine reaches the service listening on that port of the head (a port-forward);
    without it, a job API on loopback means the service is on this machine.

    Returns:
        ``[{"run_id", "status", "exp_name", "job_id"}]``: ``job_id`` is the Ray Job to stop
        to stop the run (the service's, for its runs: they save their work when it stops).
    """
    from dvcray_cli.service.client import active_runs as service_runs

    runs = []
    for job in job_client.list_jobs():
        status = status_text(job.status)
        meta = job.metadata or {}
        if job_state(status).is_terminal() or not job.submission_id:
            continue
        if SERVICE_MARKER in meta:
            token = (getattr(job_client, "_headers", None) or {}).get("Authorization", "").removeprefix("Bearer ")
            found = service_runs(job_client.get_address(), token or None, job.submission_id,
                                 job_client.get_job_logs(job.submission_id), service_url)
            runs += found if found is not None else [{"run_id": job.submission_id, "status": status,
                                                      "exp_name": "(dvcray's runner service)",
                                                      "job_id": job.submission_id}]
        elif RUN_MARKER in meta:
            runs.append({"run_id": job.submission_id, "status": status, "job_id": job.submission_id,
                         "exp_name": meta.get("exp_name") or meta.get("dvcray_exp_name")})
    return runs


def stop_runs(job_client: JobSubmissionClient, runs: list[dict[str, Any]], timeout: float) -> list[str]:
    """Stop the Ray Jobs that run ``runs`` (``active_runs``) and wait until each has ended.

    Returns:
        The run ids that were asked to stop.
    """
    jobs = list(dict.fromkeys(r.get("job_id") or r["run_id"] for r in runs))
    stopped = set(stop_and_wait(job_client, jobs, timeout))
    return [r["run_id"] for r in runs if (r.get("job_id") or r["run_id"]) in stopped]


def stop_and_wait(job_client: JobSubmissionClient, job_ids: list[str], timeout: float) -> list[str]:
    """Stop jobs and wait (up to ``timeout`` in all) until each has ended.

    Ray sends the entrypoint SIGTERM and kills it after ``RAY_JOB_STOP_WAIT_TIME_S``;
    runners save their work in that grace period.

    Returns:
        The jobs that were asked to stop (those that had not ended already).
    """
    stopped = []
    for job_id in job_ids:
        try:
            job_client.stop_job(job_id)
            stopped.append(job_id)
        except Exception:  # noqa: BLE001 - it ended meanwhile, or the cluster went
            continue
    deadline = time.monotonic() + timeout
    pending = set(job_ids)
    while pending and time.monotonic() < deadline:
        for job_id in list(pending):
            try:
                if job_state(job_status(job_client, job_id)).is_terminal():
                    pending.discard(job_id)
            except Exception:  # noqa: BLE001 - nothing answers any more: nothing left to wait for
                pending.discard(job_id)
        if pending:
            time.sleep(0.3)
    return stopped


def keep_jobs() -> int:
    """How many of dvcray's finished Ray Jobs a cluster keeps on record (``DVCRAY_KEEP_JOBS``,
    default 100): Ray keeps every job forever (ray-project/ray#35202), and its dashboard
    and job API slow down, then fail, after hundreds.

    Raises:
        UsageError: the variable is not a number.
    """
    from dvcray_cli import files

    return int(files.env_number("DVCRAY_KEEP_JOBS", 100, "jobs"))


def prune_jobs(job_client: JobSubmissionClient, keep: int, saved: Callable[[Any], bool]) -> list[str]:
    """Delete the records of dvcray's finished Ray Jobs beyond the ``keep`` newest, each
    only once ``saved(job)`` says its runs' results are in the store (their logs live on
    there). Never a job that has not ended, never one that is not dvcray's.

    Returns:
        The deleted jobs' ids.
    """
    ours = [j for j in job_client.list_jobs()
            if j.submission_id and job_state(j.status).is_terminal()
            and ({RUN_MARKER, SERVICE_MARKER, "dvcray_probe"} & set(j.metadata or {}))]
    ours.sort(key=lambda j: j.end_time or j.start_time or 0, reverse=True)
    deleted = []
    for job in ours[keep:]:
        try:
            if saved(job) and job_client.delete_job(job.submission_id):
                deleted.append(job.submission_id)
        except Exception:  # noqa: BLE001 - left for the next time
            continue
    return deleted


# --------------------------------------------------------------------------- the dashboard


def cluster_version(address: str, token: str | None) -> dict[str, Any]:
    """What the job API says of itself: ``{"ray_version", "session_name", ...}``."""
    return _get(normalize(address), "/api/version", token) or {}


def list_nodes(address: str, token: str | None) -> list[dict[str, Any]]:
    """The cluster's nodes from its dashboard (one HTTP request; no driver, no GCS client).

    Returns:
        ``[{"node_id", "ip", "is_head", "alive", "state", "resources", "labels"}]``.
    """
    body = _get(normalize(address), "/api/v0/nodes", token, params={"limit": 1000, "detail": "true"})
    rows = ((body.get("data") or {}).get("result") or {}).get("result") or []
    return [{
        "node_id": n.get("node_id"),
        "ip": n.get("node_ip"),
        "is_head": bool(n.get("is_head_node")),
        "alive": n.get("state") == "ALIVE",
        "state": n.get("state"),
        "resources": {k: v for k, v in (n.get("resources_total") or {}).items()
                      if not k.startswith("node:")},
        "labels": dict(n.get("labels") or {}),
    } for n in rows]


def autoscaler_status(address: str, token: str | None,
                      alive: list[dict[str, Any]] | None = None,
                      types: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """What the cluster's autoscaler last reported (one HTTP request to the dashboard,
    which reads it from the GCS; what ``ray status`` shows). None when the cluster
    has no autoscaler report (a head without ``--autoscaling-config``).

    Args:
        address: the job API.
        alive: the alive nodes (``list_nodes``), to tell launched nodes that have
            not joined yet from those that have.
        types: worker node types with their resources, to give pending nodes
            their resources.

    Returns:
        ``{"pending": [{"node_type", "state", "resources"}], "waiting": [{"resources",
        "count"}], "error": str | None}``: nodes launched or being launched that have
        not joined, and the resource shapes that tasks, actors and jobs wait for.
    """
    data = (_get(normalize(address), "/api/cluster_status", token) or {}).get("data") or {}
    status = data.get("clusterStatus") or {}
    report = status.get("autoscalerReport") or {}
    if not report and not data.get("autoscalingError"):
        return None
    types = types or {}
    joined = {str(n.get(k)) for n in (alive or []) for k in ("node_id", "ip") if n.get(k)}
    pending = []
    # Launched by the provider but not (yet) a node of Ray. For fake_multinode the
    # provider's "IP" is the node id (use_node_id_as_ip); elsewhere the node's IP.
    listed = {str(item[-3]) if len(item) >= 3 else "" for item in report.get("pendingNodes") or []}
    for ip, node_type in (report.get("nodeTypeMapping") or {}).items():
        if node_type in types and ip not in joined and ip not in listed:
            pending.append({"node_type": node_type, "state": "starting",
                            "resources": types[node_type]["resources"]})
    for item in report.get("pendingNodes") or []:
        node_type, state = item[-2], item[-1]
        pending.append({"node_type": node_type, "state": str(state),
                        "resources": types.get(node_type, {}).get("resources", {})})
    for node_type, count in (report.get("pendingLaunches") or {}).items():
        for _ in range(int(count)):
            pending.append({"node_type": node_type, "state": "launching",
                            "resources": types.get(node_type, {}).get("resources", {})})
    metrics = status.get("loadMetricsReport") or {}
    waiting = [{"resources": shape, "count": count}
               for shape, count in (metrics.get("resourceDemand") or []) if isinstance(shape, dict)]
    return {"pending": pending, "waiting": waiting, "error": data.get("autoscalingError")}


def probe(job_client: JobSubmissionClient, entrypoint: str, timeout: float = 120.0) -> tuple[str, str]:
    """Run a one-line Ray Job and return ``(status, log)``; its record is deleted after.

    Raises:
        ClusterError: the job could not be submitted, or did not end in time.
    """
    try:
        job_id = job_client.submit_job(entrypoint=entrypoint, metadata={"dvcray_probe": "1"})
    except Exception as exc:  # noqa: BLE001 - any refusal of the job API
        raise ClusterError(f"The cluster refused a one-line job: {exc}",
                           "Check the cluster: dvcray cluster status") from None
    deadline = time.monotonic() + timeout
    try:
        while True:
            status = job_status(job_client, job_id)
            if job_state(status).is_terminal():
                return status, job_client.get_job_logs(job_id)
            if time.monotonic() > deadline:
                job_client.stop_job(job_id)
                raise ClusterError(f"A one-line job did not finish on the cluster within {timeout:.0f} s.",
                                   "The cluster may be full or stuck: dvcray cluster status")
            time.sleep(0.1)
    finally:
        try:
            job_client.delete_job(job_id)
        except Exception:  # noqa: BLE001 - a record left behind is harmless
            pass
