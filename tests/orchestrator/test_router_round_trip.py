"""The live router honours every Placement field as the driver core defines it (orchestrator/core/turns.py),
including a KV round trip (``history_tokens``), which only the simulator honoured before (issue 12 item 5)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conserve.clock import VirtualClock
from orchestrator.engines.base import EngineObservation, EngineRequest, PrefillResult, RequestKind
from orchestrator.engines.sim import SimClock, SimEngine, SimKvFabric
from orchestrator.engines.sse import ChunkNative
from orchestrator.errors import EngineError
from orchestrator.router import Router, RouterConfig, TurnInput
from placement.base import Role
from placement.policies import make_policy
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel


class Engine(ChunkNative):
    """Prefills (recording each request and the queued prefill work the router shows meanwhile) and streams
    `out` tokens."""

    tier = "a40"
    kv_capacity_tokens = 100_000

    def __init__(self, instance_id: str, role: Role, out: int = 5) -> None:
        self.instance_id, self.role, self.out = instance_id, role, out
        self.prefills: list[tuple[EngineRequest, int]] = []
        self.router: Router | None = None

    async def prefill(self, req: EngineRequest) -> PrefillResult:
        assert self.router is not None
        view = self.router.fleet_view().get(self.instance_id)
        assert view is not None
        self.prefills.append((req, view.queued_prefill_tokens))
        return PrefillResult({"x": 1}, req.prompt_tokens)

    async def stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        for k in range(self.out):
            yield {
                "choices": [
                    {"index": 0, "text": "t", "finish_reason": "length" if k == self.out - 1 else None}
                ]
            }
        yield {"choices": [], "usage": {"prompt_tokens": req.prompt_tokens, "completion_tokens": self.out}}

    async def complete(self, req: EngineRequest) -> dict[str, Any]:  # pragma: no cover - the router streams
        raise AssertionError

    async def observe(self) -> EngineObservation:
        return EngineObservation(healthy=True, kv_capacity_tokens=self.kv_capacity_tokens)



    async def aclose(self) -> None:
        return None


def _turn(cid: str, prompt_tokens: int, final: bool = False) -> TurnInput:
    return TurnInput(
        RequestKind.COMPLETION, {"model": "m", "prompt": "p"}, cid, final, prompt_tokens=prompt_tokens
    )


async def test_a_round_trip_ships_the_history_and_queues_only_the_rest_on_the_prefiller() -> None:
    pre, dec = Engine("p0", Role.PREFILL), Engine("d0", Role.DECODE)
    # every follow-up turn is "mispredicted" into a KV round trip via the prefiller (the paper's emulation)
    router = Router(
        {"p0": pre, "d0": dec}, make_policy("per-turn", mispredict_rate=1.0), RouterConfig("m", 10**6)
    )
    pre.router = router
    await router.complete(_turn("c", 1000))  # turn 1: remote prefill of the whole prompt
    await router.complete(_turn("c", 1000 + 5 + 60, final=True))  # history = 1,005 tokens, 60 appended
    (r1, q1), (r2, q2) = pre.prefills
    assert (r1.history_tokens, r1.history_source, q1) == (0, None, 1000)
    assert (r2.history_tokens, r2.history_source) == (1005, "d0")
    assert q2 == 60  # the prefiller queues only what it computes
    assert router.fleet_view().get("p0").queued_prefill_tokens == 0  # type: ignore[union-attr]


# modelled time advanced by sleeps (a single-task test needs no event loop time): the project's virtual clock
_Clock = VirtualClock


async def test_the_simulated_prefiller_pulls_the_history_instead_of_computing_it() -> None:
    tm = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    times = []
    for history in (0, 15_000):
        clock: SimClock = _Clock()
        eng = SimEngine("p0", Role.PREFILL, "a40", tm, model_name="m", clock=clock)
        body = {"model": "m", "prompt": "p"}
        req = EngineRequest(RequestKind.COMPLETION, body, "r", "c", 16_000, history_tokens=history)
        await eng.prefill(req)
        obs = await eng.observe()
        times.append(clock.now_s())
        assert obs.kv_transfer_bytes == history * tm.model.kv_bytes_per_token
        await eng.aclose()
    # pulling 15k tokens' KV and computing 1k is far cheaper than computing 16k (modelled)
    assert times[1] < 0.5 * times[0]


async def test_the_simulated_model_decodes_at_least_min_tokens() -> None:
    """vLLM's ``min_tokens``: no end of sequence before that many tokens; a replayed trace's output length
    reaches the simulated engine without a ``max_tokens`` the router would count as the client's cap."""
    tm = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    eng = SimEngine("d0", Role.DECODE, "a40", tm, model_name="m", clock=_Clock(), natural_output_tokens=3)
    got = []
    for body in ({}, {"min_tokens": 7}, {"min_tokens": 7, "max_tokens": 5}, {"min_tokens": 1}):
        req = EngineRequest(RequestKind.COMPLETION, {"model": "m", "prompt": "p", **body}, "r", "c", 10)
        chunks = [ch async for ch in eng.stream(req)]
        got.append((chunks[-1]["usage"]["completion_tokens"], chunks[-2]["choices"][0]["finish_reason"]))
    await eng.aclose()
    assert got == [(3, "stop"), (7, "stop"), (5, "length"), (3, "stop")]


async def test_a_simulated_decoder_receives_only_the_kv_it_does_not_hold() -> None:
    """orchestrator.core.turns.kv_shipped_tokens: a remote prefill for a decoder that holds the conversation's
    history ships the rest only (whole blocks), as the simulator models it."""
    tm = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    clock, fabric = _Clock(), SimKvFabric()
    kw: dict[str, Any] = {"model_name": "m", "clock": clock, "fabric": fabric, "natural_output_tokens": 1}
    pre = SimEngine("p0", Role.PREFILL, "a40", tm, **kw)
    dec = SimEngine("d0", Role.DECODE, "a40", tm, **kw)
    body = {"model": "m", "prompt": "p", "min_tokens": 20}
    t1 = EngineRequest(RequestKind.COMPLETION, body, "r1", "c", 1000)
    _ = [ch async for ch in dec.stream(t1)]  # turn 1 decoded locally: d0 caches 1,020 tokens
    res = await pre.prefill(EngineRequest(RequestKind.COMPLETION, body, "r2-p", "c", 1100))
    t2 = EngineRequest(
        RequestKind.COMPLETION, body, "r2", "c", 1100, kv_transfer_params=res.kv_transfer_params
    )
    _ = [ch async for ch in dec.stream(t2)]
    assert (await dec.observe()).kv_transfer_bytes == (1100 - 1008) * tm.model.kv_bytes_per_token
    await pre.aclose()
    await dec.aclose()


async def test_a_simulated_engine_whose_loop_crashes_fails_its_requests() -> None:
    """A clock that cannot tell the time (not a conserve.clock.Clock) crashes the engine's batching loop: the
    request fails with EngineError naming the crash instead of waiting for ever."""

    class NoTime:
        async def sleep(self, seconds: float) -> None:
            return None

    tm = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    eng = SimEngine("p0", Role.PREFILL, "a40", tm, model_name="m", clock=NoTime())  # type: ignore[arg-type]
    req = EngineRequest(RequestKind.COMPLETION, {"model": "m", "prompt": "p"}, "r", "c", 100)
    with pytest.raises(EngineError, match="crashed"):
        await asyncio.wait_for(eng.prefill(req), timeout=30)
    await eng.aclose()
