"""Live updates of a run: what DVC and DVCLive report while a stage goes, on the cluster and home.

A local ``dvc exp run`` with a DVC Studio token posts to Studio's ``api/live``: DVC a
``start`` and a ``done``, DVCLive one ``data`` per step (DESIGN.md). On the cluster
there is no token (secrets never travel), so the runner gives the stage a Studio
of its own instead: a ``Capture`` server on the node's 127.0.0.1, with a key made
for the run, that DVC and DVCLive post to exactly as they would post to Studio.
It keeps each post's body, as sent, and writes them to the store in batches
(``live/000001.json``, ...) at most once a second, so a fast loop costs the store
one write a second, not one a step.

At home, ``Feed`` reads the batches as they appear and hands each event on: to
the terminal (the latest step and metrics) and, with the user's own token, to
DVC Studio (``runs/studio.py``).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from dvcray_cli.store import Store

LIVE = "live"
FLUSH_EVERY_S = 1.0
# The repo_url DVC and DVCLive put in their posts on the cluster, where the clone has
# no git remote; the client puts the user's own in its place.
RELAY_REPO_URL = "dvcray://relay"
# What a post may carry, as DVC Studio's api/live takes it (dvc_studio_client.schema).
EVENT_KEYS = ("type", "repo_url", "baseline_sha", "name", "client", "step", "metrics", "params", "plots",
              "message", "subdir", "experiment_rev", "machine")


def batch_path(store: Store, run_id: str, seq: int) -> str:
    return store.run_path(run_id, f"{LIVE}/{seq:06d}.json")


def clean_event(body: Any) -> dict[str, Any] | None:
    """A post's body as an event: Studio's keys only; None when it is not a post DVC or
    DVCLive would make (the store is data, never trusted)."""
    if not isinstance(body, dict) or body.get("type") not in ("start", "data", "done"):
        return None
    if not isinstance(body.get("baseline_sha"), str) or not isinstance(body.get("name"), str):
        return None
    if body.get("client") not in ("dvc", "dvclive"):
        return None
    return {k: body[k] for k in EVENT_KEYS if k in body}


# --------------------------------------------------------------------------- on the cluster


class Capture:
    """Studio's ``api/live`` for one experiment, on the node's 127.0.0.1.

    Use ``env()`` as the stage's environment (DVC and DVCLive read it), then
    ``close()`` once the experiment has ended: it writes the last batch.
    """

    def __init__(self, store: Store, run_id: str, resume: bool = False) -> None:
        """``resume``: a retry of the run, whose batches follow those of its earlier attempts."""
        import socketserver
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.store, self.run_id = store, run_id
        self.key = secrets.token_urlsafe(24)  # not the user's token: it never leaves the node
        self.pending: list[dict[str, Any]] = []
        self.seq = 0
        if resume:
            names = store.list(store.run_path(run_id, LIVE))
            self.seq = max((int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()), default=0)
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.headers.get("Authorization") != f"token {capture.key}":
                    self.send_response(403)
                    self.end_headers()
                    return
                try:
                    event = clean_event(json.loads(body))
                except ValueError:
                    event = None
                if event is not None:
                    with capture.lock:
                        capture.pending.append(event)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the stage's log is the user's: no access lines in it

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def server_bind(self) -> None:
                # HTTPServer's own asks DNS for the host's full name (socket.getfqdn):
                # half a second here, for a name nobody reads.
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

        self.server = Server(("127.0.0.1", 0), Handler)
        self.stopped = threading.Event()
        # A short poll interval: shutdown() waits for the loop's next turn.
        self.threads = [threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True),
                        threading.Thread(target=self._flush_loop, daemon=True)]
        for thread in self.threads:
            thread.start()

    def env(self) -> dict[str, str]:
        """The variables that make DVC and DVCLive post here (and nowhere else)."""
        return {"DVC_STUDIO_TOKEN": self.key, "DVC_STUDIO_URL": f"http://127.0.0.1:{self.server.server_port}",
                "DVC_STUDIO_REPO_URL": RELAY_REPO_URL, "DVC_STUDIO_OFFLINE": "false"}

    def flush(self) -> None:
        """Write what arrived since the last batch as the next batch."""
        with self.write_lock:
            with self.lock:
                events, self.pending = self.pending, []
            if not events:
                return
            self.seq += 1
            self.store.write(batch_path(self.store, self.run_id, self.seq), json.dumps({"events": events}).encode())

    def _flush_loop(self) -> None:
        while not self.stopped.wait(FLUSH_EVERY_S):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the final flush reports
                pass

    def close(self) -> None:
        self.abandon()
        self.flush()

    def abandon(self) -> None:
        """Stop taking posts, and write no more batches: a lost attempt's retry carries on."""
        if not self.stopped.is_set():
            self.stopped.set()
            self.server.shutdown()
            self.server.server_close()


# --------------------------------------------------------------------------- at home


@dataclass
class Progress:
    """The latest DVCLive step of an experiment, for the terminal: which DVCLive folder
    (a stage may log several, e.g. one per Tune trial), its step and metrics."""

    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    folder: str = ""

    def text(self, limit: int = 4) -> str:
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in list(self.metrics.items())[:limit])
        return " ".join(p for p in (self.folder, f"step {self.step}", shown) if p)


def progress_of(event: dict[str, Any]) -> Progress | None:
    """The step and scalar metrics of a ``data`` event (DVCLive's), else None (a post
    of plots alone, too: dvc-studio-client sends them apart from the metrics)."""
    if event.get("type") != "data" or not isinstance(event.get("step"), int) or not event.get("metrics"):
        return None
    metrics: dict[str, float] = {}
    folders = []
    for path, entry in event["metrics"].items():
        data = entry.get("data") if isinstance(entry, dict) else None
        _scalars("", data if isinstance(data, dict) else {}, metrics)
        folders.append(str(path).rsplit("/", 2)[-2] if "/" in str(path) else "")
    return Progress(event["step"], metrics, folders[0] if len(folders) == 1 else "")


def _scalars(prefix: str, data: dict[str, Any], into: dict[str, float]) -> None:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _scalars(f"{name}.", value, into)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            into[name] = value


class Feed:
    """Read runs' live batches from the store as they appear, and hand on each event.

    A thread of its own looks once a second at every run ``watch()`` names (one read
    per run: the next batch, or nothing yet). ``close()`` reads what is left, so
    every event of a finished run is handed on, then waits for ``on_events``.
    """

    def __init__(self, store: Store, watch: Callable[[], list[str]],
                 on_events: Callable[[str, list[dict[str, Any]]], None], every_s: float = FLUSH_EVERY_S) -> None:
        self.store, self.watch, self.on_events, self.every_s = store, watch, on_events, every_s
        self.next: dict[str, int] = {}
        self.seen: set[str] = set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def read(self, run_id: str) -> None:
        """Hand on every batch of ``run_id`` that is complete in the store now."""
        self.seen.add(run_id)
        while True:
            seq = self.next.get(run_id, 1)
            try:
                data = self.store.read_json(batch_path(self.store, run_id, seq))
            except Exception:  # noqa: BLE001 - the store does not answer: try again later
                return
            if data is None:
                return  # not yet (missing or torn)
            self.next[run_id] = seq + 1
            events = [e for e in (clean_event(x) for x in data.get("events") or []) if e is not None]
            if events:
                self.on_events(run_id, events)

    def _loop(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                for run_id in self.watch():
                    self.read(run_id)
            except Exception:  # noqa: BLE001 - a display aid: never the reason a run fails
                pass

    def close(self, run_ids: list[str] | None = None) -> None:
        """Stop, after reading the last batches of ``run_ids`` (default: every run seen)."""
        self.stopped.set()
        self.thread.join(timeout=10)
        for run_id in run_ids if run_ids is not None else sorted(self.seen):
            self.read(run_id)



class Relay:
    """Runs' live events, home: the latest step of each to ``on_progress`` (at most
    once a second each), and every event to DVC Studio when this project would post
    there (``studio.config``: the user's own token, URL and offline setting)."""

    def __init__(self, store: Store, project, watch: Callable[[], list[str]],
                 on_progress: Callable[[str, Progress], None] | None = None) -> None:
        from dvc.exceptions import DvcException

        from dvcray_cli.runs import studio

        try:
            settings = studio.config(project)
        except DvcException:
            settings = {}  # DVC read this project's config before the run: nothing to add here
        self.poster = studio.Poster(settings) if settings else None
        self.on_progress = on_progress
        self.feed = Feed(store, watch, self._on_events)

    def _on_events(self, run_id: str, events: list[dict[str, Any]]) -> None:
        if self.poster is not None:
            self.poster.put(events)
        latest = None
        for event in events:
            latest = progress_of(event) or latest
        if latest is not None and self.on_progress is not None:
            self.on_progress(run_id, latest)

    def close(self, run_ids: list[str]) -> None:
        """Hand on the last events of ``run_ids`` (their runners wrote them before their
        results), and send what is left for Studio."""
        self.feed.close(run_ids)
        if self.poster is not None:
            self.poster.close()


@contextlib.contextmanager
def relayed(store: Store, project, run_ids: list[str],
            on_progress: Callable[[str, Progress], None] | None = None) -> Iterator[Relay]:
    """A ``Relay`` of ``run_ids`` while the block follows them; their last events when it ends."""
    relay = Relay(store, project, lambda: run_ids, on_progress)
    try:
        yield relay
    finally:
        relay.close(run_ids)
