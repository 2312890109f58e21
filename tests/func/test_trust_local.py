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

RUN = "dvcray-20260103-120000-abcdef"


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def answer(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection."""
    got = b""
    while True:
        chunk = sock.recv(65536)
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
