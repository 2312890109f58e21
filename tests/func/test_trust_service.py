"""The runner service on a shared head (issue 20: points 4, 9 and 10): the cluster's token
never goes to whoever holds its port, it stands up to clients that misbehave, and what it
keeps of runs is its user's alone.

Real Ray (the session head), the real service it runs as a Ray Job, real `dvc exp run`.
"""

from __future__ import annotations

import stat
from pathlib import Path

from helpers import CaptureServer, cluster_service, double_project as project, node_dir, run_double as run, \
    service_pid


def private(path: Path) -> bool:
    """Nobody but its owner can read or enter ``path``."""
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_run_logs_snapshots_and_workspaces_on_the_head_are_the_users_alone(ray_cluster, make_dvc_project, tmp_path,
                                                                            monkeypatch):
    """Point 10: on a head other users log in to, a run's log, its snapshot (the user's code and
    history) and its workspace are 0600/0700, through the runner service and as a Ray Job."""
    root = project(make_dvc_project)
    store = tmp_path / "store"
    run_id = run(root, "modes", 8101, store)
    base = node_dir(ray_cluster)
    log = base / "service" / "logs" / f"{run_id}.log"
    assert log.is_file(), sorted(p.name for p in (base / "service" / "logs").iterdir())
    assert private(log), oct(log.stat().st_mode)
    for folder in (base / "service", base / "service" / "logs", base / "service" / "snapshots", base / "runs",
                   base / "repos"):
        assert private(folder), f"{folder}: {oct(folder.stat().st_mode)}"
    snapshot = base / "service" / "snapshots" / run_id
    assert snapshot.is_dir() and private(snapshot.parent)

    monkeypatch.setenv("DVCRAY_SERVICE", "0")
    run(root, "modes-job", 8102, store)
    assert private(base / "runs")


def test_the_token_never_goes_to_whoever_holds_the_port_after_the_service_died(ray_cluster, monkeypatch):
    """Point 4: a client holds a service it proved (hello); the service dies, and another
    process takes its port on 127.0.0.1 (another local user; on a head, through the forward).
    Whatever the client sends there next (a poll, a stop, the run table) carries no token:
    requests are signed with it, never send it, and the thief's answers are refused."""
    import os
    import signal
    import time

    from dvcray_cli.runs.backends import base
    from dvcray_cli.runs.backends.service import ServiceBackend
    from dvcray_cli.errors import ClusterError
    from dvcray_cli.service.client import ServiceError
    from dvcray_cli.service.protocol import PollRequest

    address = ray_cluster.dashboard_url
    token = ray_cluster.token()
    service = cluster_service(address)
    port = int(service.url.rsplit(":", 1)[1])
    os.kill(service_pid(address, service.service_id), signal.SIGKILL)
    deadline = time.monotonic() + 180  # a hang guard: the killed service's port is freed
    while True:
        try:
            thief = CaptureServer(port)
            break
        except OSError:
            assert time.monotonic() < deadline, f"port {port} was not freed"
            time.sleep(0.1)
    try:
        for call in (lambda: service.poll(PollRequest(0, ["r1"], {"r1": 0}, 0), timeout=5),
                     lambda: service.stop("r1"), lambda: service.runs(), lambda: service.have("ab" * 20, ["cd" * 20])):
            try:
                call()
            except ServiceError as exc:
                assert "did not sign its answer" in exc.message
            else:
                raise AssertionError("the client took an answer its service did not sign")
        # A client following a run goes on asking (it may be a short outage), then gives up.
        monkeypatch.setattr(base, "RECONNECT_TIMEOUT_S", 3)
        backend = ServiceBackend(address, service)
        try:
            backend.follow("r1", lambda text: None)
        except ClusterError as exc:
            assert "Lost contact" in exc.message
        else:
            raise AssertionError("following ended on the thief's word")
        backend.stop({"r1": "r1"}, timeout=3)
    finally:
        thief.close()
    assert len(thief.requests) >= 5, thief.requests
    for request in thief.requests:
        seen = f"{request['path']} {request['headers']} ".encode() + request["body"]
        assert token.encode() not in seen, f"the token went to whoever held the port: {request}"
        assert "Authorization" not in request["headers"]
