"""Local endpoints that anyone on the machine can reach (issue 20, points 8 and 9).

A node's 127.0.0.1 is every local user's and every Ray job's: the runner's Studio endpoint
(``live.Capture``) and the runner service answer there. Each test plays a client that does
not hold the key, or holds it and misbehaves, and checks that the endpoint refuses early,
keeps its memory, threads and file descriptors bounded, and goes on serving its runs.
"""

from __future__ import annotations

import json
import socket
import threading

from dvcray_cli.runs import live
from dvcray_cli.store import Store
from helpers import cluster_service, service_pid

RUN = "dvcray-20260103-120000-abcdef"


# A hang guard, not a bound: the servers let go of a silent client after their own 10 s.
HANG_GUARD_S = 180.0


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S)


def answer(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (or resets it)."""
    got = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def test_the_runners_studio_endpoint_checks_its_key_first_and_bounds_what_it_holds(tmp_path):
    """Point 8: a 96 MiB body without the key is refused from its headers (the server never
    waits for the body); idle connections beyond a handful get no thread and are closed, and
    the rest are let go when they send nothing; the stage's own posts still arrive."""
    capture = live.Capture(Store(str(tmp_path / "store")), RUN)
    port = capture.server.server_port
    try:
        sock = connect(port)
        sock.sendall(b"POST /api/live HTTP/1.1\r\nHost: x\r\nAuthorization: token wrong\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (96 << 20) + b"{" * 1024)
        assert answer(sock).startswith(b"HTTP/1.0 403"), "the key is checked before the body is read"
        sock.close()

        before = threading.active_count()
        idle = [connect(port) for _ in range(100)]
        busy = threading.active_count() - before
        assert busy <= live.MAX_CONNECTIONS, f"{busy} threads for 100 idle connections"
        # Every idle connection ends: at once beyond the cap, after TIMEOUT_S for the others.
        for sock in idle:
            assert answer(sock) == b"", "an idle connection got an answer"
            sock.close()

        key = capture.env()["DVC_STUDIO_TOKEN"]
        body = json.dumps({"type": "start", "repo_url": live.RELAY_REPO_URL, "baseline_sha": "ab" * 20,
                           "name": "e", "client": "dvc"}).encode()
        sock = connect(port)
        sock.sendall(b"POST /api/live HTTP/1.1\r\nHost: x\r\nAuthorization: token %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (key.encode(), len(body))
                     + body)
        assert answer(sock).startswith(b"HTTP/1.0 200")
        sock.close()
    finally:
        capture.close()
    batch = json.loads((tmp_path / "store" / "dvcray" / "runs" / RUN / "live" / "000001.json").read_text())
    assert [e["type"] for e in batch["events"]] == ["start"]


def _fds(pid: int) -> int:
    import os

    return len(os.listdir(f"/proc/{pid}/fd"))


def test_the_runner_service_lets_go_of_half_sent_requests_and_bounds_what_clients_send(ray_cluster, tmp_path):
    """Point 9: 200 connections that send half a request and no token hold nothing for long
    (each is closed: at once beyond the connection cap, after the header timeout before it);
    a client with the token that sends a wait of NaN, JSON that is not JSON, a body over the
    cap, a poll of too many runs or a snapshot whose project lies outside its clone gets 400
    (or 413) with the reason, and the service goes on answering."""
    import io
    import tarfile
    import time

    from dvcray_cli.service import protocol
    from dvcray_cli.service.client import ServiceError

    address = ray_cluster.dashboard_url
    service = cluster_service(address)
    port = int(service.url.rsplit(":", 1)[1])
    pid = service_pid(address, service.service_id)
    before = _fds(pid)

    half = []
    for _ in range(200):
        sock = connect(port)
        sock.sendall(b"POST /v1/poll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n")
        half.append(sock)
    for sock in half:
        assert answer(sock) == b"", "a half-sent request got an answer"
        sock.close()
    # Each was closed by the service (above); its fds follow (the deadline only guards a hang).
    deadline = time.monotonic() + HANG_GUARD_S
    while _fds(pid) > before + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _fds(pid) <= before + 5, f"{_fds(pid)} fds, {before} before"

    def refused(body, status: int = 400, path: str = protocol.POLL, method: str = "POST") -> str:
        got, data = service.request(method, path, body, timeout=30)
        assert got == status, (got, data)
        return data["error"]

    assert "wait" in refused({"after": 0, "watch": [], "logs": {}, "wait": float("nan")})
    assert "wait" in refused({"after": 0, "watch": [], "logs": {}, "wait": float("inf")})
    assert "not JSON" in refused(b"{this is not json")
    assert "over" in refused({"watch": ["r" * 100] * 50000}, status=413)
    assert "watch" in refused({"watch": ["r"] * (protocol.MAX_POLL_RUNS + 1)})
    assert "shas" in refused({"root": "ab" * 20, "shas": ["cd" * 20] * 1001}, path=protocol.HAVE)

    buffer = io.BytesIO()
    manifest = json.dumps({"run_id": "dvcray-20260103-130000-abcdef", "baseline": "ab" * 20,
                           "subdir": "../../outside", "dvcray_version": "0.1.0"}).encode()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    assert "not a snapshot" in refused(buffer.getvalue(), path=protocol.RUNS)

    # Unsigned, or signed with another token: refused before the body is read.
    from dvcray_cli.service.client import exchange

    status, _, _ = exchange(service.url, "POST", protocol.POLL, b"{}", {"Content-Type": "application/json"}, 10)
    assert status == 401
    service.hello(service.service_id)
    assert service.runs() is not None
    try:
        type(service)(service.url, "another-token").runs()
    except ServiceError as exc:
        assert "did not sign" in exc.message
    else:
        raise AssertionError("a request signed with another token was answered as the service's own")
