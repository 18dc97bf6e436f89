"""Decoders are not charged for prefill they did not compute (issue 14 item 1.2): the model meter's activity
is the engine's prompt-token counter minus its prefix-cache hits and its external (KV-transfer) hits, and
Activity.cached_tokens carries the hits."""

from __future__ import annotations

import asyncio
from pathlib import Path

from energy.accounting import EnergyAccountant, LedgerTurnSource
from energy.ledger import Ledger
from energy.meters import EXTERNAL_HITS_TOTAL, GENERATION_TOKENS_TOTAL, PROMPT_TOKENS_TOTAL
from orchestrator.engines.base import EngineObservation, EngineRequest, RequestKind
from orchestrator.engines.sim import SimEngine, SimKvFabric, WallClock
from placement.base import Role
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel


def obs(prompt: float, hits: float = 0.0, external: float = 0.0, gen: float = 0.0) -> EngineObservation:
    return EngineObservation(
        healthy=True,
        prefix_cache_hits_tokens=hits,
        extra={PROMPT_TOKENS_TOTAL: prompt, GENERATION_TOKENS_TOTAL: gen, EXTERNAL_HITS_TOTAL: external},
    )


async def _activity(tmp_path: Path, answers: list[EngineObservation]):
    async def observe():
        return {"d0": answers.pop(0)}

    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    ledger.upgrade()
    acct = EnergyAccountant(ledger, {}, [], LedgerTurnSource(ledger), observe=observe)
    out = []
    while answers:
        await acct.observe_engines()
        out.append(acct.activity.get("d0"))
    ledger.close()
    return out[1:]


async def test_kv_received_and_prefix_hits_are_not_prefill_work(tmp_path: Path) -> None:
    # turn 1 arrives by KV transfer (16,000 tokens), turn 2 hits 16,100 in the prefix cache and computes 90
    got = await _activity(
        tmp_path, [obs(0), obs(16_000, external=16_000, gen=100), obs(32_190, 16_100, 16_000, 150)]
    )
    assert (got[0].prefill_tokens, got[0].cached_tokens, got[0].decode_tokens) == (0, 16_000, 100)
    assert (got[1].prefill_tokens, got[1].cached_tokens, got[1].decode_tokens) == (90, 16_100, 50)


async def test_hits_counted_before_the_prompt_are_not_lost(tmp_path: Path) -> None:
    # vLLM counts hits at scheduling, prompt tokens when the prefill ends: the dip is made up later
    got = await _activity(tmp_path, [obs(0), obs(0, hits=500), obs(1000, hits=500)])
    assert got[0].prefill_tokens == 0 and got[1].prefill_tokens == 500


async def test_sim_decoder_counts_received_kv_as_external_hits() -> None:
    tm = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    fabric = SimKvFabric()
    clock = WallClock(100.0)
    pre = SimEngine("p0", Role.PREFILL, "a40", tm, model_name="m", clock=clock, fabric=fabric)
    dec = SimEngine("d0", Role.DECODE, "a40", tm, model_name="m", clock=clock, fabric=fabric)
    body = {"model": "m", "prompt": [1] * 3000, "max_tokens": 4}
    res = await pre.prefill(EngineRequest(RequestKind.COMPLETION, body, "r-p", "c", 3000))
    out = await dec.complete(
        EngineRequest(RequestKind.COMPLETION, body, "r", "c", 3000, kv_transfer_params=res.kv_transfer_params)
    )
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 3000
    o_pre, o_dec = await pre.observe(), await dec.observe()
    computed_dec = (
        o_dec.extra[PROMPT_TOKENS_TOTAL] - o_dec.prefix_cache_hits_tokens - o_dec.extra[EXTERNAL_HITS_TOTAL]
    )
    computed_pre = (
        o_pre.extra[PROMPT_TOKENS_TOTAL] - o_pre.prefix_cache_hits_tokens - o_pre.extra[EXTERNAL_HITS_TOTAL]
    )
    assert computed_dec == 0 and computed_pre == 3000
    await asyncio.gather(pre.aclose(), dec.aclose())


async def test_decode_batch_is_tokens_per_engine_step_over_the_interval(tmp_path: Path) -> None:
    """A scrape's running count is one instant's; the interval's mean batch is decode tokens per step."""
    from energy.meters import ENGINE_STEPS_TOTAL

    def o(gen: float, steps: float, running: int) -> EngineObservation:
        return EngineObservation(
            healthy=True,
            running=running,
            extra={PROMPT_TOKENS_TOTAL: 0.0, GENERATION_TOKENS_TOTAL: gen, ENGINE_STEPS_TOTAL: steps},
        )

    got = await _activity(tmp_path, [o(0, 0, 0), o(400, 100, 1)])  # 4 decoding; 1 left at the scrape
    assert got[0].decode_tokens == 400 and got[0].decode_batch == 4.0


def test_launched_vllm_engines_report_cached_tokens(tmp_path: Path) -> None:
    """vLLM leaves usage.prompt_tokens_details null unless started with --enable-prompt-tokens-details."""
    from orchestrator.engines.launcher import EngineSpec, LaunchSettings, engine_command

    spec = EngineSpec("d", Role.DECODE, port=8123, side_channel_port=5611)
    argv, _ = engine_command(spec, LaunchSettings(python=Path("/py"), model_dir=tmp_path, log_dir=tmp_path))
    assert "--enable-prompt-tokens-details" in argv


async def test_a_remote_turn_without_prompt_tokens_details_records_the_kv_as_cached() -> None:
    """An engine whose answer has no prompt_tokens_details (real vLLM by default): the decoder of a remote
    prefill received the KV, so the turn's cached tokens are the prompt (they were recorded as 0, charging
    the decoder for the whole prefill)."""
    from orchestrator.router import Router, RouterConfig, TurnInput
    from placement.policies import make_policy

    class NoDetails(SimEngine):
        async def stream(self, req):  # type: ignore[no-untyped-def,override]
            async for ch in super().stream(req):
                if ch.get("usage"):
                    ch = {**ch, "usage": {**ch["usage"], "prompt_tokens_details": None}}
                yield ch

    tm = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    fabric, clock = SimKvFabric(), WallClock(100.0)
    engines = {
        "p0": NoDetails("p0", Role.PREFILL, "a40", tm, model_name="m", clock=clock, fabric=fabric),
        "d0": NoDetails("d0", Role.DECODE, "a40", tm, model_name="m", clock=clock, fabric=fabric),
    }
    recs = []

    class Sink:
        def turn(self, rec):  # type: ignore[no-untyped-def]
            recs.append(rec)

        def pin(self, rec):  # type: ignore[no-untyped-def]
            pass

    router = Router(engines, make_policy("conserve"), RouterConfig("m", 100_000), sink=Sink())
    body = {"model": "m", "prompt": [3] * 4000, "max_tokens": 4}
    await router.complete(TurnInput(RequestKind.COMPLETION, body, "c1", prompt_tokens=4000))
    (rec,) = recs
    assert rec.remote_prefill and rec.cached_tokens == rec.prompt_tokens == 4000
    await router.aclose()
