"""Abuse acceptance (issue 13 item 2): body size, header/body timeouts, connection and request limits,
per-tenant rate and token limits, and prompts no instance can hold -- against a real uvicorn server
running the connection-level protocol `serve` uses (api/server.py), over simulated engines."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.limits import Admission, BodyError, Edge
from api.settings import ApiSettings
from energy.api_keys import KeyStore
from energy.ledger import Ledger
from orchestrator.config import FleetConfig
from orchestrator.fleet import tier_model
from orchestrator.runtime import SimInstance
from placement.base import Role

MODEL = "Qwen3-0.6B"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_response(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def test_an_oversized_body_is_413_and_memory_comes_back(server_factory: Any, tmp_path: Path) -> None:
    s = server_factory(tmp_path, speedup=1000.0)
    assert httpx.post(s.base_url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
    gc.collect()
    before = _rss_bytes()
    block = b"x" * (1 << 20)
    # 300 MB announced with Content-Length: refused before a byte of it is read
    sock = _connect(s.base_url)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: 300000000\r\n\r\n" + block
    )
    answer = _read_response(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"max_body_bytes" in answer
    # 64 MB chunked (no length announced): the server stops reading at the limit (8 MiB by default)
    sock = _connect(s.base_url)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    sent = 0
    try:
        for _ in range(64):
            sock.sendall(b"100000\r\n" + block + b"\r\n")
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = _read_response(sock, 5)
    sock.close()
    assert sent < 64 or answer.startswith(b"HTTP/1.1 413"), (sent, answer[:200])
    gc.collect()
    after = _rss_bytes()
    assert after <= before * 1.10, f"RSS {before / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB after"
    assert httpx.post(s.base_url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
    assert s.app.state.metrics.requests[("chat", "413")] >= 1  # counted like every other answer


def test_a_chunked_body_is_never_held_beyond_the_limit() -> None:
    """Edge.read_body stops at the limit: it asks for no chunk after the one that crossed it."""
    edge = Edge(ApiSettings(max_body_bytes=4096), None, None, None)  # type: ignore[arg-type]
    asked = 0

    async def receive() -> dict[str, Any]:
        nonlocal asked
        asked += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}  # endless

    with pytest.raises(BodyError) as err:
        asyncio.run(edge.read_body(receive, None))
    assert err.value.err.status == 413 and asked == 5


def test_slow_headers_and_slow_bodies_are_cut_after_their_timeouts(
    server_factory: Any, tmp_path: Path
) -> None:
    s = server_factory(
        tmp_path, speedup=1000.0, api_settings=ApiSettings(header_timeout_s=0.5, body_timeout_s=0.5)
    )
    silent = _connect(s.base_url)  # sends nothing at all
    slow = _connect(s.base_url)  # sends half its headers, then nothing
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n")
    t0 = time.monotonic()
    answers = [_read_response(silent, 5), _read_response(slow, 5)]
    took = time.monotonic() - t0
    assert took < 3.0, f"connections held {took:.1f} s"
    assert all(a == b"" or a.startswith(b"HTTP/1.1 408") for a in answers), answers
    assert answers[1].startswith(b"HTTP/1.1 408")
    # headers complete, body trickles: 408 from the body deadline
    body = _connect(s.base_url)
    body.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b'content-length: 100\r\n\r\n{"model":'
    )
    answer = _read_response(body, 5)
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in answer, answer[:300]
    for sock in (silent, slow, body):
        sock.close()
    # a normal client is not affected
    assert httpx.post(s.base_url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def test_connections_over_the_limit_get_503_with_retry_after(server_factory: Any, tmp_path: Path) -> None:
    s = server_factory(tmp_path, speedup=1000.0, api_settings=ApiSettings(max_connections=3))
    held = [_connect(s.base_url) for _ in range(3)]
    time.sleep(0.2)
    extra = _connect(s.base_url)
    answer = _read_response(extra, 5)
    assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer.lower(), answer[:300]
    for sock in held:
        sock.close()
    time.sleep(0.2)
    assert httpx.get(s.base_url + "/health", timeout=10).status_code == 200


def _stream_open(url: str, headers: dict[str, str] | None = None) -> tuple[httpx.Client, Any]:
    client = httpx.Client(timeout=30)
    body = dict(CHAT, max_tokens=400, stream=True)
    resp = client.send(
        client.build_request("POST", url + "/v1/chat/completions", json=body, headers=headers), stream=True
    )
    assert resp.status_code == 200
    chunks = resp.iter_raw()
    next(chunks)  # the first token: the stream is in flight
    resp.chunks = chunks  # keep the generator: collected, it would close the response
    return client, resp


def test_requests_over_the_concurrency_limit_get_503_with_retry_after(
    server_factory: Any, tmp_path: Path
) -> None:
    s = server_factory(tmp_path, speedup=1.0, api_settings=ApiSettings(max_concurrent_requests=2))
    streams = [_stream_open(s.base_url) for _ in range(2)]
    assert s.app.state.admission.inflight == 2
    r = httpx.post(s.base_url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["code"] == "server_overloaded"
    for client, resp in streams:
        resp.close()
        client.close()
    deadline = time.monotonic() + 10
    while s.app.state.admission.inflight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.post(s.base_url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def test_per_tenant_limits_answer_429_with_retry_after_for_that_tenant_only(
    server_factory: Any, tmp_path: Path
) -> None:
    s = server_factory(
        tmp_path,
        speedup=1000.0,
        api_settings=ApiSettings(
            auth="on", tenant_requests_per_s=0.2, tenant_burst=2, tenant_tokens_per_min=40_000
        ),
    )
    store = KeyStore.open(s.db_url)
    a, b, c = store.create("acme")[0], store.create("bravo")[0], store.create("charlie")[0]
    store.close()

    def post(key: str, **extra: Any) -> httpx.Response:
        return httpx.post(
            s.base_url + "/v1/chat/completions",
            json=dict(CHAT, **extra),
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

    assert [post(a).status_code for _ in range(2)] == [200, 200]  # the burst
    r = post(a)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 5  # one request every 5 s refills
    assert post(b).status_code == 200  # another tenant is not limited by acme's traffic
    # tokens per minute: charlie's budget is 40k; a request that does not fit what is left is a 429
    big = "word " * 20_000  # ~25k tokens estimated
    assert post(c, messages=[{"role": "user", "content": big}], max_tokens=1).status_code == 200
    r = post(c, messages=[{"role": "user", "content": big}], max_tokens=1)
    assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) >= 1


def test_per_tenant_concurrency_limit(server_factory: Any, tmp_path: Path) -> None:
    s = server_factory(tmp_path, speedup=1.0, api_settings=ApiSettings(tenant_max_concurrent_requests=1))
    client, resp = _stream_open(s.base_url)
    r = httpx.post(s.base_url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 429 and "retry-after" in r.headers
    resp.close()
    client.close()


def _small_kv_instances(cfg: FleetConfig) -> list[SimInstance]:
    """1 prefiller holding ~16k KV tokens, 3 decoders holding ~30k (the model's context is 40,960)."""
    tm = tier_model(cfg, "a40")
    # free KV bytes = 48 GB * u - 1.19 GB weights - 6.68 GB reserve (tiers/perf.py); 114,688 B per token
    pre = dataclasses.replace(tm, gpu_memory_utilization=0.2035)
    dec = dataclasses.replace(tm, gpu_memory_utilization=0.2356)
    return [SimInstance("a40-prefill-0", "a40", Role.PREFILL, pre)] + [
        SimInstance(f"a40-decode-{i}", "a40", Role.DECODE, dec) for i in range(3)
    ]


def test_a_prompt_no_instance_can_hold_is_a_400_and_no_engine_goes_down(
    server_factory: Any, tmp_path: Path
) -> None:
    s = server_factory(tmp_path, speedup=1000.0, instances=_small_kv_instances)
    caps = {i["instance_id"]: i["kv_capacity_tokens"] for i in s.call(s.runtime.router.instance_status)}
    largest = max(caps.values())
    assert caps["a40-prefill-0"] < 20_000 < largest < 36_000 < 40_960
    url = s.base_url + "/v1/chat/completions"
    too_big = {
        "role": "user",
        "content": "x" * (4 * 36_000),
    }  # ~36k tokens: inside the context, no KV holds it
    for _ in range(3):
        r = httpx.post(
            url, json=dict(CHAT, messages=[too_big]), headers={"X-Conversation-Id": "big"}, timeout=30
        )
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and str(largest) in err["message"]
    # fits the decoders, not the prefiller the policy sends turn 1 to: the engine refuses it as a request
    # error (HTTP 400 from vLLM), it is not an engine fault
    mid = {"role": "user", "content": "x" * (4 * 22_000)}
    r = httpx.post(url, json=dict(CHAT, messages=[mid]), timeout=30)
    assert r.status_code == 400, r.text
    status = s.call(s.runtime.router.instance_status)
    assert all(i["healthy"] for i in status), [(i["instance_id"], i["down_reason"]) for i in status]
    assert httpx.post(url, json=CHAT, headers={"X-Conversation-Id": "big"}, timeout=30).status_code == 200
    assert s.runtime.writer.flush()
    turns = [t for _, t in Ledger(s.db_url).turns() if t.conversation_id == "big"]
    assert [t.turn for t in turns] == [1]  # the refused turns used no turn number


def test_admission_buckets_refill_with_time() -> None:
    now = [0.0]
    adm = Admission(ApiSettings(tenant_requests_per_s=2.0, tenant_burst=1), clock=lambda: now[0])
    adm.enter("t")
    adm.leave("t")
    with pytest.raises(Exception) as err:
        adm.enter("t")
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "1"  # type: ignore[attr-defined]
    now[0] += 0.5
    adm.enter("t")
    assert adm.inflight == 1 and adm.tenant_inflight == {"t": 1}
    adm.leave("t")
    assert adm.inflight == 0 and adm.tenant_inflight == {}
