"""orchestrator/engines/http1.py against a real local aiohttp server: streaming, keep-alive reuse (also when
the consumer stops early), a stale keep-alive connection, errors and timeouts. And VllmEngine.stream_raw
through it. No mocks."""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from orchestrator.engines.base import EngineRequest, RequestKind
from orchestrator.engines.http1 import Http1Pool
from orchestrator.engines.vllm import EngineHTTPError, VllmEngine
from orchestrator.errors import EngineError
from placement.base import Role


class Server:
    """Records the client port of every request (one port = one connection)."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.release = asyncio.Event()
        self.bodies: list[bytes] = []
        self.long_written = 0
        self.long_gone = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/stream", self.stream)
        app.router.add_post("/json", self.json)
        app.router.add_post("/slow", self.slow)
        app.router.add_post("/v1/chat/completions", self.stream)
        app.router.add_post("/bad", self.bad)
        app.router.add_post("/long/v1/chat/completions", self.long)
        return app

    async def long(self, request: web.Request) -> web.StreamResponse:
        """200 events 10 ms apart (a long generation); counts what it wrote until the client went away."""
        self._seen(request)
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(200):
                await resp.write(f'data: {{"i": {i}}}\n\n'.encode())
                self.long_written += 1
                await asyncio.sleep(0.01)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.long_gone.set()
            raise
        return resp

    def _seen(self, request: web.Request) -> None:
        self.ports.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        self.bodies.append(await request.read())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f'data: {{"i": {i}}}\n\n'.encode())
            await asyncio.sleep(0.01)
        await resp.write(b"data: [DONE]\n\n")
        await asyncio.sleep(0.02)  # the chunked terminator arrives in a later read
        await resp.write_eof()
        return resp

    async def json(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.json_response({"ok": True, "echo": (await request.read()).decode()})

    async def slow(self, request: web.Request) -> web.Response:
        self._seen(request)
        await asyncio.sleep(5)
        return web.json_response({})

    async def bad(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.json_response({"error": {"message": "nope"}}, status=400)


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, TestServer]]:
    s = Server()
    ts = TestServer(s.app(), host="127.0.0.1")
    await ts.start_server()
    try:
        yield s, ts
    finally:
        await ts.close()


async def test_streams_blocks_as_they_are_sent_and_reuses_the_connection(server: Any) -> None:
    s, ts = server
    pool = Http1Pool("127.0.0.1", ts.port)
    for _ in range(3):
        async with await pool.post("/stream", b'{"a": 1}', {"Content-Type": "application/json"}) as r:
            assert r.status == 200 and (b"content-type", b"text/event-stream") in r.headers
            blocks = [b async for b in r.iter_blocks()]
        assert len(blocks) >= 4  # one per write: nothing waits for the end of the response
        assert b"".join(blocks) == b'data: {"i": 0}\n\ndata: {"i": 1}\n\ndata: {"i": 2}\n\ndata: [DONE]\n\n'
    assert s.bodies == [b'{"a": 1}'] * 3
    assert len(set(s.ports)) == 1
    await pool.aclose()


async def test_stopping_early_leaves_nothing_for_the_loop_to_finalize(server: Any) -> None:
    """An abandoned async generator makes the loop schedule its aclose() via call_soon_threadsafe (an eventfd
    write and an extra wake-up per routed request, seen with strace); the block iterator must not need it."""
    _, ts = server
    loop = asyncio.get_running_loop()
    scheduled: list[Any] = []
    real = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
        scheduled.append(callback)
        return real(callback, *args, **kwargs)

    pool = Http1Pool("127.0.0.1", ts.port)
    loop.call_soon_threadsafe = counting  # type: ignore[method-assign,assignment]
    try:
        for _ in range(3):
            async with await pool.post("/stream", b"{}", {}) as r:
                async for b in r.iter_blocks():
                    if b.endswith(b"[DONE]\n\n"):
                        break
            gc.collect()
            await asyncio.sleep(0.05)
    finally:
        del loop.call_soon_threadsafe
    assert scheduled == []
    await pool.aclose()


async def test_consumer_stopping_at_done_still_returns_the_connection(server: Any) -> None:
    s, ts = server
    pool = Http1Pool("127.0.0.1", ts.port)
    for _ in range(3):
        async with await pool.post("/stream", b"{}", {}) as r:
            async for b in r.iter_blocks():
                if b.endswith(b"[DONE]\n\n"):
                    break  # like the router: stop at [DONE], before the chunked terminator arrived
        await asyncio.sleep(0.1)  # the terminator arrives; the drained connection goes back to the pool
    assert len(set(s.ports)) == 1
    r = await pool.post("/json", b"x", {})
    assert r.status == 200 and (await r.read()) == b'{"ok": true, "echo": "x"}'
    r.release()
    await pool.aclose()


async def test_stale_keepalive_connection_is_retried_on_a_new_one(server: Any) -> None:
    s, ts = server
    pool = Http1Pool("127.0.0.1", ts.port)
    r = await pool.post("/json", b"1", {})
    await r.read()
    r.release()
    (idle,) = pool._idle
    idle.transport.abort()  # the server side would see the same: the idle connection is gone
    idle.transport = None  # connection_lost runs on the next loop turn; look stale now
    pool._idle = [idle]
    r = await pool.post("/json", b"2", {})
    assert r.status == 200 and b'"echo": "2"' in await r.read()
    r.release()
    await pool.aclose()


async def test_errors_are_oserrors(server: Any) -> None:
    _, ts = server
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    with pytest.raises(OSError):
        await Http1Pool("127.0.0.1", dead_port).post("/json", b"", {})
    pool = Http1Pool("127.0.0.1", ts.port, request_timeout_s=0.2)
    with pytest.raises(TimeoutError):
        await pool.post("/slow", b"", {})
    await pool.aclose()


async def test_vllm_engine_stream_raw_uses_the_pool_and_maps_errors(server: Any) -> None:
    s, ts = server
    eng = VllmEngine("d0", Role.DECODE, "t", f"http://127.0.0.1:{ts.port}")
    req = EngineRequest(RequestKind.CHAT, {"model": "m", "messages": []}, "r1", "c1")
    for _ in range(2):
        data = b"".join([b async for b in eng.stream_raw(req)])
        assert data.endswith(b"data: [DONE]\n\n")
    assert len(set(s.ports)) == 1
    assert b'"stream_options":{"include_usage":true}' in s.bodies[0] and req.body == {
        "model": "m",
        "messages": [],
    }
    await eng.aclose()
    bad = VllmEngine("d1", Role.DECODE, "t", f"http://127.0.0.1:{ts.port}/bad-prefix")
    with pytest.raises(EngineError):
        [b async for b in bad.stream_raw(req)]  # 404 from the server: an HTTP error
    await bad.aclose()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    down = VllmEngine("d2", Role.DECODE, "t", f"http://127.0.0.1:{dead}")
    with pytest.raises(EngineError, match="check that the vLLM server is running"):
        [b async for b in down.stream_raw(req)]


async def test_http_error_body_is_kept(server: Any) -> None:
    _, ts = server
    pool = Http1Pool("127.0.0.1", ts.port)
    r = await pool.post("/bad", b"", {})
    assert r.status == 400 and b"nope" in await r.read()
    r.release()
    await pool.aclose()
    eng = VllmEngine("d0", Role.DECODE, "t", f"http://127.0.0.1:{ts.port}")
    err = eng._http_error_from(400, '{"error": {"message": "nope"}}')
    assert isinstance(err, EngineHTTPError) and err.status == 400 and "nope" in str(err)


async def test_vllm_engine_stream_raw_closed_early_disconnects_so_the_engine_stops(server: Any) -> None:
    """The router closes stream_raw when its client went away: the connection must be closed (vLLM aborts a
    request whose client disconnected), not drained and kept for reuse while the engine decodes the rest."""
    s, ts = server
    eng = VllmEngine("d0", Role.DECODE, "t", f"http://127.0.0.1:{ts.port}/long")
    req = EngineRequest(RequestKind.CHAT, {"model": "m", "messages": []}, "r1", "c1")
    gen = eng.stream_raw(req)
    assert (await gen.__anext__()).startswith(b'data: {"i": 0}')
    await gen.aclose()
    await asyncio.wait_for(s.long_gone.wait(), 2.0)  # the server saw the disconnect within 2 s ...
    assert s.long_written < 200  # ... long before it had written everything (200 x 10 ms)
    await eng.aclose()


class ClosingKeepAliveServer:
    """HTTP/1.1 server that answers one request per connection with keep-alive, then closes the connection
    without answering when a second request arrives on it: the race of reusing a keep-alive connection the
    server is closing (vLLM's uvicorn closes idle ones after 5 s)."""

    def __init__(self) -> None:
        self.connections = 0
        self.answered = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if served:  # a reused connection: drop it unanswered
                    writer.close()
                    return
                served += 1
                self.answered += 1
                path = head.split(b" ", 2)[1]
                body = b"# HELP x\n" if path == b"/metrics" else b'{"id": "x", "choices": []}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def test_vllm_engine_retries_once_when_a_reused_keepalive_connection_was_closed() -> None:
    srv = ClosingKeepAliveServer()
    server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    eng = VllmEngine("d0", Role.DECODE, "t", f"http://127.0.0.1:{port}")
    req = EngineRequest(RequestKind.COMPLETION, {"model": "m", "prompt": "p"}, "r1", "c1")
    try:
        assert (await eng.observe()).healthy
        out = await eng.complete(req)  # reuses the /metrics connection, which the server drops
        assert out == {"id": "x", "choices": []}
        assert (await eng.observe()).healthy
        assert srv.answered == 3 and srv.connections >= 3
    finally:
        await eng.aclose()
        server.close()
        await server.wait_closed()
