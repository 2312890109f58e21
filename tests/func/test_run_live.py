"""Live logs through a connection that drops, and the embedded local cluster."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

from helpers import run_dvcray, sh


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 that cuts connections in mid-flight when armed: the next
    answer the server sends on a connection that carried a request is passed on only in
    part, then both ends are closed. It keeps every connection's traffic and every cut,
    so a test can prove each cut broke an answer in two and the client came back."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.connections: list[dict] = []   # {"up": bytes client->server, "down": server->client}
        self.cuts: list[dict] = []           # {"connection": index, "request": bytes, "passed": n, "held": n}
        self.armed = 0
        self.closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            traffic = {"up": 0, "down": 0}
            with self.lock:
                index = len(self.connections)
                self.connections.append(traffic)
                self._sockets += [client, upstream]
            pair = (client, upstream)
            threading.Thread(target=self._pump, args=(client, upstream, traffic, "up", index, pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, traffic, "down", index, pair),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, traffic: dict, way: str, index: int, pair) -> None:
        try:
            while data := src.recv(65536):
                if way == "down" and traffic["up"] > 0:
                    with self.lock:
                        cut = self.armed > 0
                        if cut:
                            self.armed -= 1
                    if cut:
                        passed = max(1, len(data) // 2)
                        dst.sendall(data[:passed])
                        traffic[way] += passed
                        with self.lock:
                            self.cuts.append({"connection": index, "request": traffic["up"], "passed": passed,
                                              "held": len(data) - passed})
                        break
                traffic[way] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass

    def arm(self) -> None:
        """Cut the next answer in mid-flight."""
        with self.lock:
            self.armed += 1

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self.lock:
            found, self._sockets = self._sockets, []
        for conn in found:
            try:
                conn.close()
            except OSError:
                pass

    def assert_cut_mid_flight_and_resumed(self, cuts: int) -> None:
        """Each cut broke an answer to a request in two (part passed, part held back),
        and the client then connected again and got data through the new connection."""
        assert len(self.cuts) == cuts, self.cuts
        for i, cut in enumerate(self.cuts):
            assert cut["request"] > 0 and cut["passed"] > 0 and cut["held"] > 0, f"cut {i + 1}: {cut}"
            later = self.connections[cut["connection"] + 1:]
            assert any(t["down"] > 0 for t in later), f"no data came through a new connection after cut {i + 1}"


def talk(tag: str) -> dict[str, str]:
    """A stage that prints 20 numbered lines; ``tag`` makes it a stage no earlier run ran
    (the node's run-cache would restore its output without running it)."""
    return {
        "dvc.yaml": "stages:\n  talk:\n    cmd: python talk.py\n    deps: [talk.py]\n    outs: [done.txt]\n",
        "talk.py": (f"# {tag}\nimport time\nfor i in range(1, 21):\n    print(f'line {{i:02d}}', flush=True)\n"
                    "    time.sleep(0.4)\nopen('done.txt', 'w').write('ok')\n"),
    }


def _follow_through(proxy: CuttableProxy, root, args: list[str], env: dict | None = None) -> tuple[int, list, str]:
    """Run ``dvcray run ARGS`` and cut its connection twice mid-run, each time in the
    middle of an answer."""
    try:
        proc = subprocess.Popen([sys.executable, "-m", "dvcray_cli", "run", *args], cwd=root, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(("line 04", "line 12")):
                proxy.arm()  # mid-run, twice: the next answer is cut in two
        proc.wait(timeout=120)
        stderr = proc.stderr.read()
    finally:
        proxy.close()
    return proc.returncode, lines, stderr


def _numbered(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if re.fullmatch(r"line \d\d\n", line)]


def test_dropped_connection_resumes_without_lost_or_repeated_lines(ray_cluster, make_dvc_project, tmp_path):
    """A run as a Ray Job of its own: the job log through a proxy of the job API."""
    root = make_dvc_project(talk("job"))
    proxy = CuttableProxy(int(ray_cluster.dashboard_url.rsplit(":", 1)[1]))
    code, lines, stderr = _follow_through(
        proxy, root, ["-n", "cut", "--address", f"http://127.0.0.1:{proxy.port}", "--store", str(tmp_path / "store")],
        env={"DVCRAY_SERVICE": "0"})
    assert code == 0, "".join(lines) + stderr
    proxy.assert_cut_mid_flight_and_resumed(2)
    assert _numbered(lines) == [f"line {i:02d}" for i in range(1, 21)]


def test_dropped_connection_to_the_runner_service_resumes_without_lost_or_repeated_lines(
        ray_cluster, make_dvc_project, tmp_path):
    """A run of the runner service: its long polls through a proxy of the service."""
    root = make_dvc_project(talk("service"))
    store = tmp_path / "store"
    from dvcray_cli.runs.backends import service_reach

    assert service_reach.reach(ray_cluster.dashboard_url) is not None  # the service runs; this machine knows its port
    services = Path.home() / ".dvcray" / "clusters" / "services.json"
    known = json.loads(services.read_text())
    entry = known[ray_cluster.dashboard_url]
    proxy = CuttableProxy(entry["port"])
    services.write_text(json.dumps({**known, ray_cluster.dashboard_url: {**entry, "port": proxy.port}}))
    code, lines, stderr = _follow_through(proxy, root, ["-n", "cut", "--store", str(store)])
    assert code == 0, "".join(lines) + stderr
    proxy.assert_cut_mid_flight_and_resumed(2)
    assert _numbered(lines) == [f"line {i:02d}" for i in range(1, 21)]


def test_embedded_default_starts_a_local_cluster(make_dvc_project, isolated_env):
    root = make_dvc_project({
        "dvc.yaml": "stages:\n  s:\n    cmd: python s.py\n    deps: [s.py]\n    metrics: [{m.json: {cache: false}}]\n",
        "s.py": "import json\njson.dump({'ok': 1}, open('m.json', 'w'))\n",
    })
    assert "RAY_ADDRESS" not in os.environ
    proc = run_dvcray("run", "-n", "embedded", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "starting a local Ray cluster" in proc.stderr
    assert "dvcray cluster down local" in proc.stderr
    record = json.loads((isolated_env / ".dvcray" / "clusters" / "local.json").read_text())
    assert record["dashboard_url"].startswith("http://127.0.0.1:")
    runs = list((isolated_env / ".dvcray" / "store" / "dvcray" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "result.json").is_file()
    head = sh("git", "rev-parse", "HEAD", cwd=root)
    assert sh("git", "rev-parse", "-q", "--verify", f"refs/exps/{head[:2]}/{head[2:]}/embedded", cwd=root)
    # A second run finds the recorded cluster instead of starting another.
    again = run_dvcray("run", "-n", "embedded2", cwd=root)
    assert again.returncode == 0, again.stderr
    assert "starting a local Ray cluster" not in again.stderr
    assert Path(record["temp_dir"]).is_dir()
