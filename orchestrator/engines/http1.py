"""A minimal HTTP/1.1 client for the router's hot path: POST a body, stream the response body back.

Why not aiohttp here: on the 2-core dev box a trivial aiohttp-client proxy under uvicorn costs ~270-320 us
of CPU per streamed request and the same proxy's server side alone ~50 us (benchmarks/bench_router.py
context, BENCHMARKS.md router section); per-request ClientRequest/ClientResponse objects, tracing hooks,
cookie and timeout machinery are most of it. This client is an asyncio Protocol per keep-alive connection
with httptools' C parser (already a dependency of uvicorn's fast path): one ``transport.write`` for the
request, body bytes (chunked encoding decoded by the parser) handed to the consumer as they arrive.

Scope, deliberately small: plain HTTP (no TLS, no proxies, no redirects, no compression: the request
sends no Accept-Encoding), one origin per :class:`Http1Pool`. A request that fails on a *reused*
connection before any response byte arrived is retried once on a new connection (the server may close an
idle keep-alive connection just as we reuse it). Errors are OSError subclasses (ConnectionError,
TimeoutError), which the router treats as engine failures.

Must not import fastapi or sqlalchemy.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httptools

__all__ = ["Http1Pool", "Http1Response"]

_HIGH_WATER_BYTES = 256 * 1024  # pause reading when the consumer lags this far behind


class _Conn(asyncio.Protocol):
    __slots__ = (
        "transport", "parser", "status", "headers", "chunks", "complete", "error", "waiter", "got_bytes",
        "buffered", "paused", "loop", "keep_alive", "return_to", "timer",
    )  # fmt: skip

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.error: BaseException | None = None
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.complete = False
        self.waiter: asyncio.Future[None] | None = None
        self.got_bytes = False
        self.buffered = 0
        self.paused = False
        self.keep_alive = False
        self.return_to: Http1Pool | None = None  # released before the message ended: pool it when it does
        self.timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            self._fail(ConnectionError(f"malformed HTTP response: {err}"))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.complete:
            self._fail(exc or ConnectionResetError("engine closed the connection"))
        if self.timer is not None:  # it was draining: nothing left to time out
            self.timer.cancel()
        self.transport = None

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.return_to is not None:
            return  # the consumer is gone; the rest of the body is drained and dropped
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        pool = self.return_to
        if pool is not None:  # a drained connection goes back to the pool (after the parser returns)
            self.return_to = None
            if self.timer is not None:
                self.timer.cancel()
            self.loop.call_soon(pool._put, self)
        self._wake()

    # helpers
    def _fail(self, exc: BaseException) -> None:
        if self.error is None:  # the first cause wins (a timeout, then the close it causes)
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self) -> None:
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def take(self) -> bytes:
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data


class _Blocks:
    __slots__ = ("_conn",)

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn

    def __aiter__(self) -> _Blocks:
        return self

    async def __anext__(self) -> bytes:
        c = self._conn
        while True:
            if c.chunks:
                return c.take()
            if c.complete:
                raise StopAsyncIteration
            if c.error is not None:
                raise c.error
            await c.wait()


class Http1Response:
    """Status, headers, and the body as an async iterator of byte blocks (use as an async context manager:
    leaving early closes the connection instead of returning it to the pool)."""

    def __init__(self, pool: Http1Pool, conn: _Conn, timer: asyncio.TimerHandle) -> None:
        self._pool = pool
        self._conn = conn
        self._timer = timer
        self.status = conn.status
        self.headers = conn.headers

    async def __aenter__(self) -> Http1Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def iter_blocks(self) -> AsyncIterator[bytes]:
        """The body's blocks as they arrive. An iterator object, not an async generator: a consumer that
        stops early (the router at an SSE ``[DONE]``) would leave an unfinished generator whose finalizer
        makes the event loop schedule an ``aclose()`` task through ``call_soon_threadsafe`` (an eventfd
        write and wake-up per request, seen with strace)."""
        return _Blocks(self._conn)

    async def read(self) -> bytes:
        return b"".join([b async for b in self.iter_blocks()])

    def abort(self) -> None:
        """Close the connection now (the consumer went away mid-response): the server sees the disconnect
        and stops the request (vLLM aborts a generation whose client disconnected)."""
        c = self._conn
        self._timer.cancel()
        if c.error is None:
            c.error = ConnectionAbortedError("response abandoned by the consumer")
        if c.transport is not None:
            c.transport.close()

    def release(self) -> None:
        """Back to the pool: at once when the whole response was parsed (also when the consumer stopped
        reading early, e.g. at an SSE ``[DONE]``); otherwise once the rest has arrived and been dropped
        (the request timer still bounds that); on an error, the connection is closed."""
        c = self._conn
        if c.error is not None or c.transport is None:
            self._timer.cancel()
            if c.transport is not None:
                c.transport.close()
        elif c.complete:
            self._timer.cancel()
            if c.keep_alive:
                self._pool._put(c)
            else:
                c.transport.close()
        else:
            c.chunks.clear()
            c.timer = self._timer
            c.return_to = self._pool
            if c.paused:
                c.paused = False
                c.transport.resume_reading()


class Http1Pool:
    """Keep-alive connections to one ``host:port`` (at most `limit` idle ones kept)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        limit: int = 256,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 600.0,
    ) -> None:
        self.host = host
        self.port = port
        self.limit = limit
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self._idle: list[_Conn] = []
        self._host_header = f"{host}:{port}".encode()
        self._closed = False

    def _put(self, conn: _Conn) -> None:
        if conn.transport is None or conn.error is not None:
            return
        if self._closed or len(self._idle) >= self.limit or not conn.keep_alive:
            if conn.transport is not None:
                conn.transport.close()
            return
        conn._reset()
        self._idle.append(conn)

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout_s):
            _, conn = await loop.create_connection(lambda: _Conn(loop), self.host, self.port)
        return conn

    def _request_bytes(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        head = [b"POST ", path.encode(), b" HTTP/1.1\r\nHost: ", self._host_header, b"\r\nContent-Length: "]
        head.append(str(len(body)).encode())
        for k, v in headers.items():
            head += (b"\r\n", k.encode("latin-1"), b": ", v.encode("latin-1"))
        head.append(b"\r\n\r\n")
        head.append(body)
        return b"".join(head)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Http1Response:
        """Send the request and wait for the response headers."""
        if self._closed:
            raise ConnectionError("the HTTP pool is closed")
        data = self._request_bytes(path, body, headers)
        loop = asyncio.get_running_loop()
        for attempt in (0, 1):
            conn = None
            while self._idle:
                c = self._idle.pop()
                if c.transport is not None and not c.transport.is_closing():
                    conn = c
                    break
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            assert conn.transport is not None
            conn.transport.write(data)
            timer = loop.call_later(self.request_timeout_s, _expire, conn)
            while not conn.status and conn.error is None and not conn.complete:
                await conn.wait()
            if conn.status:
                return Http1Response(self, conn, timer)
            timer.cancel()
            err = conn.error or ConnectionResetError("no response")
            if conn.transport is not None:
                conn.transport.close()
            if reused and not conn.got_bytes and attempt == 0:
                continue  # stale keep-alive connection: once more on a fresh one
            raise err
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for c in idle:
            if c.transport is not None:
                c.transport.close()


def _expire(conn: Any) -> None:
    conn._fail(TimeoutError("the engine did not finish the response in time"))
    if conn.transport is not None:
        conn.transport.close()
