"""Pin accounting: the simulator's FleetView counts the KV of pinned conversations as the live router does.

One policy, two drivers: orchestrator/router/ reports a decoder's used KV as the larger of what the engine
reports and what the conversations pinned there hold (prompt while a turn runs, prompt + output between
turns), so a decoder that evicted cached histories of its pinned conversations does not look emptier. The
simulator must report the same (capped at capacity). Here the same small scenario runs through both drivers:
the live Router over engines that report no resident KV at all (the extreme of eviction), and the simulator,
where one decoder really evicts part of a pinned conversation's history. The policy must see the same views
and make the same placements.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from simkit import Inst, agentic, colocated, disagg, small_gpu_model

from energy.records import PinRecord, TurnRecord
from orchestrator.engines.base import EngineObservation, EngineRequest, PrefillResult, RequestKind
from orchestrator.engines.sse import ChunkNative
from orchestrator.router import Router, RouterConfig, TurnInput
from orchestrator.sim import SimOptions, run_simulation
from orchestrator.workload import ConversationSpec, TurnSpec
from placement.base import Role
from placement.policies import make_policy

TM = small_gpu_model()  # ~4.5k KV tokens per instance: a 3,200-token turn evicts a pinned history
CAP = int(TM.kv_capacity_tokens)

# A (on d0) and B (on d1) stay pinned across a long tool gap; the one-turn C lands on d0 (the emptier) and
# its admission evicts part of A's cached history; D (one turn) comes after C has ended. Turns never overlap,
# so at every decision nothing is in flight and both drivers' views are pure accounting.
CONVS = [
    ConversationSpec("A", 0.0, (TurnSpec(1700, 40), TurnSpec(100, 40, 20.0))),
    ConversationSpec("B", 1.0, (TurnSpec(1800, 40), TurnSpec(100, 40, 20.0))),
    ConversationSpec("C", 5.0, (TurnSpec(2600, 600),)),
    ConversationSpec("D", 15.0, (TurnSpec(500, 40),)),
]


def _simulate(policy: str = "conserve"):  # type: ignore[no-untyped-def]
    insts = [Inst(f"d{i}", "a40", Role.DECODE, TM) for i in range(2)]
    return run_simulation(
        insts, CONVS, make_policy(policy), options=SimOptions(record_views=True), energy_window_s=None
    )


class EvictedEngine(ChunkNative):
    """A decoder that streams `conserve_output` tokens and reports no resident KV (everything evicted)."""

    role = Role.DECODE
    tier = "a40"
    kv_capacity_tokens = CAP

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id

    async def stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        n = int(req.body["conserve_output"])
        for k in range(n):
            fin = "length" if k == n - 1 else None
            yield {"choices": [{"index": 0, "text": "x", "finish_reason": fin}]}
        usage = {"prompt_tokens": req.prompt_tokens, "completion_tokens": n}
        yield {"choices": [], "usage": usage}

    async def prefill(self, req: EngineRequest) -> PrefillResult:  # pragma: no cover - no prefiller here
        raise AssertionError("no remote prefill in this scenario")

    async def complete(self, req: EngineRequest) -> dict[str, Any]:  # pragma: no cover
        raise AssertionError("the router streams")

    async def observe(self) -> EngineObservation:
        return EngineObservation(healthy=True, kv_usage_frac=0.0, kv_capacity_tokens=CAP)



    async def aclose(self) -> None:
        return None


class Sink:
    """Collects the router's turn records (which decoder served each turn)."""

    def __init__(self) -> None:
        self.turns: list[TurnRecord] = []

    def turn(self, rec: TurnRecord) -> None:
        self.turns.append(rec)

    def pin(self, rec: PinRecord) -> None:
        return None


# conserve pins; the others do not (the router must then hold nothing for a conversation between turns)
@pytest.mark.parametrize("policy", ["conserve", "round-robin", "kv-aware", "per-turn"])
async def test_router_and_simulator_show_the_policy_the_same_views_and_placements(policy: str) -> None:
    res = _simulate(policy)
    decisions = sorted(res.decisions, key=lambda d: d.time_s)
    sink = Sink()
    engines = {i: EvictedEngine(i) for i in ("d0", "d1")}
    router = Router(engines, make_policy(policy), RouterConfig("m", 32_000), sink=sink)
    sim_views, router_views = [], []
    for dec in decisions:
        conv = next(c for c in CONVS if c.conversation_id == dec.turn.conversation_id)
        spec = conv.turns[dec.turn.turn - 1]
        await router.poll()
        router_views.append(router.fleet_view().instances)  # capped at capacity by the router itself
        assert dec.view is not None
        sim_views.append(dec.view.instances)
        inp = TurnInput(
            RequestKind.COMPLETION,
            {"model": "m", "prompt": "p", "conserve_output": spec.output_tokens},
            conv.conversation_id,
            client_final=dec.turn.turn == len(conv.turns),
            prompt_tokens=dec.turn.input_tokens,
        )
        await router.complete(inp)
    if policy != "conserve":
        # nothing pinned: the router's used KV is only what the engines report, which these engines do not
        # (the simulator's is its prefix caches); everything else must match, and nothing may be held
        assert all(v.kv_used_tokens == 0 and v.pinned_conversations == 0 for vs in router_views for v in vs)
        sim_views = [tuple(replace(v, kv_used_tokens=0) for v in vs) for vs in sim_views]
    # identical observations at every decision (pinned tokens counted, capped at capacity) ...
    assert sim_views == router_views
    # ... including decisions where the pinned accounting is what shows (the engines report nothing)
    assert any(v.kv_used_tokens > 0 for vs in router_views for v in vs) == (policy == "conserve")
    # ... and identical placements (kv-aware and per-turn read the used KV, which differs here by design)
    if policy in ("conserve", "round-robin"):
        assert [r.instance_id for r in sink.turns] == [d.placement.decode_instance for d in decisions]
    assert len(sink.turns) == 6


def test_evicted_but_pinned_history_still_counts() -> None:
    res = _simulate()
    turns = {(t.conversation_id, t.turn): t for t in res.turns}
    a1, a2, c1 = turns[("A", 1)], turns[("A", 2)], turns[("C", 1)]
    assert a1.decode_instance == c1.decode_instance == a2.decode_instance == "d0"
    a_context = a1.input_tokens + a1.output_tokens
    # C's admission really evicted part of A's cached history: A's turn 2 finds less than its context
    assert a2.cached_tokens < a_context - a1.output_tokens
    # yet the decision placing A's turn 2 still sees A's whole context counted on d0 (C and D are gone)
    (dec,) = [d for d in res.decisions if (d.turn.conversation_id, d.turn.turn) == ("A", 2)]
    d0 = dec.view.get("d0")
    assert d0 is not None and d0.pinned_conversations == 1
    assert d0.kv_used_tokens == a_context > a2.cached_tokens


@pytest.mark.parametrize("name", ["conserve", "colocated"])
def test_views_stay_within_capacity_and_count_a_later_turns_own_history(name: str) -> None:
    """Property over a loaded run: every view is within capacity, and a later turn's decision sees at least
    its own conversation's history counted on its pinned decoder."""
    insts = colocated(TM, 3) if name == "colocated" else disagg(TM, 1, 2)
    convs = agentic(12, gap_s=0.5, first=1500, turns=3, spacing_s=0.3)
    res = run_simulation(
        insts, convs, make_policy(name), options=SimOptions(record_views=True), energy_window_s=None
    )
    for d in res.decisions:
        for v in d.view.instances:
            assert 0 <= v.kv_used_tokens <= v.kv_capacity_tokens
    for d in res.decisions:
        if d.turn.turn > 1:
            pinned = d.view.pins.get(d.turn.conversation_id)
            assert pinned is not None
            v = d.view.get(pinned)
            assert v is not None and v.kv_used_tokens >= min(
                v.kv_capacity_tokens, d.turn.input_tokens - d.turn.new_tokens
            )
