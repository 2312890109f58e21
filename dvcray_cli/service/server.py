"""The runner service: one long-lived Ray Job per cluster that runs experiments
without a Ray Job, an interpreter and an import of DVC each (DESIGN.md, "Warm runners").

It imports DVC once, in a forkserver (``forks.py``), and forks one process per
experiment, as the runner of a shared sweep job does. It listens on the head's
127.0.0.1 only (``protocol.py``), every request but ``hello`` authenticated with
the cluster's Ray auth token. A client sends a snapshot (a tar of the folder a
Ray Job would get as its working_dir) and follows its experiments with one
long-poll for all of them: their states and the new bytes of their logs. Its
job log names every experiment's start and end (Ray's dashboard shows it).

Experiments belong to the service, not to the client: they run on when the
client goes, and save their work when the service is stopped (SIGTERM to each,
the stop grace, then SIGKILL), as a stopped Ray Job's runner does. Placed
experiments (``--cpus-per-exp``) run on the warm runner of the node Ray
reserves their resources on (``placed.py``). The run table itself is ``table.py``;
this module serves it over HTTP and leaves with its cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket

from dvcray_cli import __version__, ray_api
from dvcray_cli.runs import snapshot
from dvcray_cli.service import protocol
from dvcray_cli.service.protocol import Hello, PollRequest, RunState
from dvcray_cli.service.table import RunnerService, say

# --------------------------------------------------------------------------- HTTP


def make_app(service: RunnerService):
    from aiohttp import web

    @web.middleware
    async def auth(request, handler):
        if request.path != protocol.HELLO and not protocol.authorized(request.headers.get("Authorization"),
                                                                      service.token):
            return web.json_response({"error": "missing or wrong auth token"}, status=401)
        return await handler(request)

    async def hello(request):
        nonce = request.query.get("nonce", "")
        return web.json_response(Hello(service.service_id, __version__,
                                       protocol.proof(service.token, nonce, service.service_id),
                                       service.node, service.notice_upgrade()).to_json())

    async def have(request):
        body = await request.json()
        root = str(body.get("root") or "")
        if not re.fullmatch(r"[0-9a-f]{40}", root):
            return web.json_response({"error": "root is not a commit id"}, status=400)
        cache = snapshot.cache_path(service.base, root)
        found = await asyncio.to_thread(snapshot.cache_has, cache, list(body.get("shas") or []))
        return web.json_response({"have": found})

    async def submit(request):
        status, answer = await service.submit(request)
        return web.json_response(answer, status=status)

    async def runs(request):
        return web.json_response({"runs": [e.report().to_json() for e in service.entries.values()]})

    async def poll(request):
        answer = await service.poll(PollRequest.from_json(await request.json()))
        return web.json_response(answer.to_json())

    async def stop(request):
        entry = service.entries.get(request.match_info["run_id"])
        if entry is None:
            return web.json_response({"error": "no such run"}, status=404)
        service.stop_entry(entry)
        return web.json_response(entry.report().to_json())

    app = web.Application(middlewares=[auth], client_max_size=4 << 30)
    app.add_routes([web.get(protocol.HELLO, hello), web.post(protocol.HAVE, have),
                    web.post(protocol.RUNS, submit), web.get(protocol.RUNS, runs),
                    web.post(protocol.POLL, poll), web.post(protocol.RUNS + "/{run_id}/stop", stop)])
    return app


async def serve(service: RunnerService, port: int) -> None:
    from aiohttp import web

    app = make_app(service)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    await web.SockSite(runner, sock).start()
    done = asyncio.Event()

    async def stop(lost: str | None = None) -> None:
        await service.shutdown(lost)
        done.set()

    async def stopped() -> None:
        """SIGTERM: Ray stopping the service's job (``cluster down``), or the head's Ray
        dying under it; the GCS tells which."""
        answers = await _gcs_answers()
        await stop(CLUSTER_DIED if answers is False else None)  # None: no address to ask

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(stopped()))
    ticker = asyncio.create_task(service.tick())
    watchdog = asyncio.create_task(_watch_cluster(stop))
    say(f"listening on 127.0.0.1:{sock.getsockname()[1]} as {service.service_id} (dvcray {__version__}, pid "
        f"{os.getpid()})")
    try:
        while not done.is_set():
            await asyncio.sleep(1.0)
            if service.draining and not any(e.state == RunState.RUNNING for e in service.entries.values()):
                break
    finally:
        ticker.cancel()
        watchdog.cancel()
        await runner.cleanup()


CLUSTER_DIED = "its cluster died mid-run (the head's GCS stopped answering)"


async def _gcs_answers(timeout_s: float = 3.0) -> bool | None:
    """Whether the cluster's GCS takes a connection (None: no address to ask)."""
    host, _, port = (os.environ.get("RAY_ADDRESS") or "").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
        writer.close()
        return True
    except (OSError, asyncio.TimeoutError):
        return False


async def _watch_cluster(stop, every_s: float = 5.0, misses: int = 3) -> None:
    """Leave with the cluster: a head whose GCS is gone (killed, crashed) may leave this
    process behind, still answering, its runs' cluster gone."""
    missed = 0
    while True:
        await asyncio.sleep(every_s)
        answers = await _gcs_answers(5)
        if answers is None:
            return
        missed = 0 if answers else missed + 1
        if missed >= misses:
            say("the cluster's GCS does not answer: its runs are lost; stopping")
            await stop(CLUSTER_DIED)
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dvcray_cli.service")
    parser.add_argument("--id", required=True, help="the service's id (its Ray Job's submission id)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    token = ray_api.env_token() or ray_api.read_token(ray_api.default_token_path())
    if not token:
        say("this cluster has no Ray auth token: the service does not run without one")
        return 3
    from dvcray_cli.runner import runner_dir

    service = RunnerService(token, args.id, runner_dir())
    asyncio.run(serve(service, args.port))
    say("stopped")
    return 0
