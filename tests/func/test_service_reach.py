"""How ``cluster down`` and the idle watcher ask a runner service for its runs when it is
not on this machine's 127.0.0.1 but reached through a port-forward (launcher and AWS
clusters): a small service on loopback that speaks the protocol (signed requests and
answers) stands in for the forward's end."""

from __future__ import annotations

from dvcray_cli.service import client, protocol


def _fake_service(token: str, service_id: str, runs: list[dict]):
    """A service on this machine's 127.0.0.1 that answers hello and the run table."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from urllib.parse import parse_qs, urlparse

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            import time

            url = urlparse(self.path)
            checked = protocol.check_request(token, "GET", self.path, self.headers.get(protocol.SIGNATURE),
                                             time.time())
            if url.path == protocol.HELLO:
                nonce = parse_qs(url.query)["nonce"][0]
                body = {"service_id": service_id, "proof": protocol.proof(token, nonce, service_id)}
            elif url.path == protocol.RUNS and not isinstance(checked, str):
                nonce, body = checked.nonce, {"runs": runs}
            else:
                self.send_response(401)
                self.end_headers()
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header(protocol.ANSWER_SIGNATURE, protocol.sign_answer(token, nonce, 200, data))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_forwarded_service_is_asked_through_its_forward_and_counts_busy_when_it_cannot_be():
    from dvcray_cli.errors import ClusterError

    log = "dvcray-service: listening on 127.0.0.1:40123 as dvcray-service-ab12 (dvcray 0.1.0, pid 7)\n"
    server = _fake_service("tok", "dvcray-service-ab12", [{"run_id": "r1", "state": "RUNNING", "exp_name": "a"},
                                                         {"run_id": "r0", "state": "SUCCEEDED"}])
    asked = []

    def reach(port: int) -> str:
        asked.append(port)
        return f"http://127.0.0.1:{server.server_port}"

    try:
        # A launcher cluster's job API is on loopback (its forward), its service on the head's port 40123.
        found = client.active_runs("http://127.0.0.1:45555", "tok", "dvcray-service-ab12", log, reach)
        assert asked == [40123]
        assert found == [{"run_id": "r1", "status": "RUNNING", "exp_name": "a", "job_id": "dvcray-service-ab12"}]
        idle = _fake_service("tok", "dvcray-service-ab12", [{"run_id": "r0", "state": "SUCCEEDED"}])
        try:
            assert client.active_runs("http://127.0.0.1:45555", "tok", "dvcray-service-ab12", log,
                                           lambda port: f"http://127.0.0.1:{idle.server_port}") == []
        finally:
            idle.shutdown()
        # Another service there, no forward, a forward that does not open: it cannot be asked.
        assert client.active_runs("http://127.0.0.1:45555", "tok", "dvcray-service-zz99",
                                       log.replace("ab12", "zz99"), reach) is None
        assert client.active_runs("http://127.0.0.1:45555", "tok", "dvcray-service-ab12", log,
                                       lambda port: None) is None

        def broken(port: int) -> str:
            raise ClusterError("the port-forward did not open")

        assert client.active_runs("http://127.0.0.1:45555", "tok", "dvcray-service-ab12", log, broken) is None
    finally:
        server.shutdown()
