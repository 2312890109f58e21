"""The runner service's front door (issue 20, points 4 and 9).

The service listens on the head's 127.0.0.1, which every local user and every Ray job of
the cluster can reach. Before a request reaches the run table (``server.py``):

- a connection gets ``HEADER_TIMEOUT_S`` to send its request line and headers, and at
  most ``MAX_CONNECTIONS`` are open at once (more are closed as they come): half-sent
  requests hold nothing for long;
- every request but ``hello`` must be signed with the cluster's token
  (``protocol.check_request``), its nonce not seen before, checked from its headers
  alone, before a byte of its body is read; its body then comes within
  ``BODY_TIMEOUT_S`` per read, up to ``MAX_JSON_BYTES`` (a snapshot: ``MAX_SNAPSHOT_BYTES``),
  and must be the one signed;
- every answer is signed (``protocol.sign_answer``), and the connection closed after it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from dvcray_cli.service import protocol

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 64
MAX_JSON_BYTES = 4 << 20
MAX_SNAPSHOT_BYTES = 16 << 30
MAX_NONCES = 200_000


class Connections:
    """A protocol factory around aiohttp's (``runner.server``): the connection cap and the
    header timeout of every connection."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], limit: int = MAX_CONNECTIONS,
                 header_timeout: float = HEADER_TIMEOUT_S) -> None:
        self.factory, self.limit, self.header_timeout = factory, limit, header_timeout
        self.open: dict[Any, _Guarded] = {}

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self, self.factory())

    def started(self, transport: Any) -> None:
        """The request on ``transport`` has its headers: its header timeout is over."""
        guarded = self.open.get(transport)
        if guarded is not None and guarded.timer is not None:
            guarded.timer.cancel()
            guarded.timer = None


class _Guarded(asyncio.Protocol):
    def __init__(self, connections: Connections, inner: Any) -> None:
        self.connections, self.inner = connections, inner
        self.transport: Any = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        if len(self.connections.open) >= self.connections.limit:
            transport.abort()  # at the cap: never handed to aiohttp
            return
        self.transport = transport
        self.connections.open[transport] = self
        self.timer = asyncio.get_running_loop().call_later(self.connections.header_timeout, transport.abort)
        self.inner.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.transport is None:
            return
        if self.timer is not None:
            self.timer.cancel()
        self.connections.open.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class Nonces:
    """Nonces of signed requests seen within the signature window: each is taken once."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    def take(self, nonce: str, now: float) -> bool:
        if len(self.seen) > MAX_NONCES // 2:
            self.seen = {n: t for n, t in self.seen.items() if now - t <= 2 * protocol.WINDOW_S}
        if nonce in self.seen or len(self.seen) >= MAX_NONCES:
            return False
        self.seen[nonce] = now
        return True


class Refused(Exception):
    """A request the service answers with ``status`` and ``reason`` (never a 500)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


async def chunks(request, limit: int):
    """The body of ``request`` as it comes, checked against its Content-Length and ``limit``,
    each read within ``BODY_TIMEOUT_S``.

    Raises:
        Refused: no length, too long, or too slow.
    """
    length = request.content_length
    if length is None and request.method == "POST":
        raise Refused(411, "a body needs its Content-Length")
    if (length or 0) > limit:
        raise Refused(413, f"the body is over {limit} bytes")
    got = 0
    while got < (length or 0):
        try:
            chunk = await asyncio.wait_for(request.content.readany(), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise Refused(408, f"no part of the body came within {BODY_TIMEOUT_S:.0f} s") from None
        if not chunk:
            raise Refused(400, "the body ended before its Content-Length")
        got += len(chunk)
        if got > limit:
            raise Refused(413, f"the body is over {limit} bytes")
        yield chunk


async def read_body(request, limit: int = MAX_JSON_BYTES) -> bytes:
    return b"".join([chunk async for chunk in chunks(request, limit)])


def middleware(token: str, connections: Connections, nonces: Nonces, streamed: set[tuple[str, str]]):
    """The aiohttp middleware of the front door. ``streamed``: ``(method, path)`` of requests
    whose handler reads the body itself (``chunks``), checking its sha256 against
    ``request["digest"]``; any other body is read here (``request["body"]``)."""
    import hashlib

    from aiohttp import web

    @web.middleware
    async def front(request, handler):
        connections.started(request.transport)
        nonce = ""
        try:
            if request.path == protocol.HELLO and request.method == "GET":
                nonce = request.query.get("nonce", "")[:64]
            else:
                checked = protocol.check_request(token, request.method, request.raw_path,
                                                 request.headers.get(protocol.SIGNATURE), time.time())
                if isinstance(checked, str):
                    raise Refused(401, checked)
                nonce = checked.nonce
                if not nonces.take(checked.nonce, time.time()):
                    raise Refused(401, "the request's nonce was used before (a replay?)")
                request["digest"] = checked.digest
                if (request.method, request.path) not in streamed:
                    body = await read_body(request)
                    if hashlib.sha256(body).hexdigest() != checked.digest:
                        raise Refused(400, "the body is not the one the request's signature covers")
                    request["body"] = body
            response = await handler(request)
        except Refused as exc:
            response = web.json_response({"error": exc.reason}, status=exc.status)
        except web.HTTPException as exc:
            response = web.json_response({"error": exc.reason}, status=exc.status)
        except Exception as exc:  # noqa: BLE001 - said in the service's log; the client gets a signed 500
            print(f"dvcray-service: {request.method} {request.path} failed: {type(exc).__name__}: {exc}", flush=True)
            response = web.json_response({"error": f"the service failed: {type(exc).__name__}"}, status=500)
        response.headers[protocol.ANSWER_SIGNATURE] = protocol.sign_answer(token, nonce, response.status,
                                                                           response.body or b"")
        response.force_close()
        return response

    return front
