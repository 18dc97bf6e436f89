"""Router-side KV admission (SimOptions.router_admission; orchestrator.sim.admission), the artifact's tracker.

Properties: reservations never exceed an engine's capacity at admission (conversation rule); the per-turn rule
reserves turn 1 only (a conversation the conversation rule makes wait is admitted at once); the conversation
clock conventions differ by exactly the admission wait (plus turn 1's prefiller queue where the rule excludes
it); decisions still replay through placement.base.Policy; the default is off and the standalone normaliser
never uses it.
"""

from __future__ import annotations

import pytest
from simkit import a40, agentic, colocated, disagg, small_gpu_model
from test_parity import replay

from orchestrator.errors import SimulationError
from orchestrator.metrics import Convention, conversation_metrics
from orchestrator.sim import SimOptions, run_simulation
from orchestrator.sim.admission import RULES, Reserve, rule_for
from orchestrator.sim.standalone import StandaloneCache
from orchestrator.workload import ConversationSpec, TurnSpec
from placement.policies import make_policy

ADMIT = SimOptions(router_admission=True, record_views=True)


def crowd() -> list[ConversationSpec]:
    # ~1.2k-2.4k-token final contexts arriving within 0.6 s on engines of ~4.5k KV tokens: admission binds
    return agentic(12, first=800, turns=3, spacing_s=0.05, out=60)


def fleet(policy: str):  # type: ignore[no-untyped-def]
    tm = small_gpu_model()
    return colocated(tm, 2) if policy == "colocated" else disagg(tm, 1, 2)


@pytest.mark.parametrize("policy", sorted(RULES))
def test_decisions_replay_through_the_policy_interface(policy: str) -> None:
    convs = crowd()
    opts = {"mispredict_rate": 0.2, "seed": 3} if policy == "per-turn" else {}
    pol = make_policy(policy, **opts)
    res = run_simulation(fleet(policy), convs, pol, options=ADMIT, energy_window_s=None)
    assert res.router_admission
    assert any(c.admission_wait_s > 0 for c in res.conversations)  # admission really engaged
    assert replay(make_policy(policy, **opts), res.decisions, res.feedback) == [
        d.placement for d in res.decisions
    ]


@pytest.mark.parametrize("policy", ["conserve", "colocated"])
def test_whole_conversation_reservations_fit_at_every_admission(policy: str) -> None:
    convs = crowd()
    insts = fleet(policy)
    res = run_simulation(insts, convs, make_policy(policy), options=ADMIT, energy_window_s=None)
    cap = {i.instance_id: i.tier_model.kv_capacity_tokens for i in insts}
    spec = {c.conversation_id: c for c in convs}
    ends = {}
    for t in res.turns:
        ends[t.conversation_id] = max(ends.get(t.conversation_id, 0.0), t.last_token_s)
    held = []  # (admitted, end, decoder, final context tokens)
    for c in res.conversations:
        s = spec[c.conversation_id]
        final = sum(t.appended_tokens + t.output_tokens for t in s.turns)
        held.append((c.arrival_s + c.admission_wait_s, ends[c.conversation_id], c.decoders[0], final))
        assert len(set(c.decoders)) == 1  # pinned for the whole conversation
    for adm, _, dec, _ in held:
        live = sum(f for a, e, d, f in held if d == dec and a <= adm + 1e-9 and e > adm + 1e-9)
        assert live <= cap[dec]


def test_per_turn_reserves_turn_one_only() -> None:
    """Two conversations whose final contexts do not fit one decoder together but whose first turns do."""
    tm = small_gpu_model()
    turns = (TurnSpec(1500, 500), TurnSpec(67, 500), TurnSpec(67, 500))  # final context 3,134 tokens
    convs = [ConversationSpec("a", 0.0, turns), ConversationSpec("b", 0.01, turns)]
    assert 2 * 3134 > tm.kv_capacity_tokens >= 2 * 2000
    insts = disagg(tm, 1, 1)
    cons = run_simulation(insts, convs, make_policy("conserve"), options=ADMIT, energy_window_s=None)
    a_end = max(t.last_token_s for t in cons.turns if t.conversation_id == "a")
    b = cons.conversations[1]
    assert b.admission_wait_s == pytest.approx(a_end - 0.01)  # admitted when "a" released its reservation
    per = run_simulation(insts, convs, make_policy("per-turn"), options=ADMIT, energy_window_s=None)
    assert [c.admission_wait_s for c in per.conversations] == [0.0, 0.0]


@pytest.mark.parametrize("policy", sorted(RULES))
def test_conventions_differ_by_the_admission_wait(policy: str) -> None:
    convs = crowd()
    res = run_simulation(fleet(policy), convs, make_policy(policy), options=ADMIT, energy_window_s=None)
    honest = conversation_metrics(res, convs, None, convention=Convention.HONEST)
    art = conversation_metrics(res, convs, None, convention=Convention.ARTIFACT)
    first = {t.conversation_id: t for t in res.turns if t.turn == 1}
    rule = rule_for(policy)
    for c, h, a in zip(res.conversations, honest, art, strict=True):
        t1 = first[c.conversation_id]
        skipped = c.admission_wait_s
        if rule.exclude_turn1_prefill_queue and t1.remote_prefill:
            skipped = max(skipped, t1.prefill_start_s - c.arrival_s)
        assert h.ttfet_s - a.ttfet_s == pytest.approx(skipped, abs=1e-9)
        assert h.e2e_s - a.e2e_s == pytest.approx(skipped, abs=1e-9)
    if rule.reserve is Reserve.TURN:  # later turns wait too, inside both clocks
        assert any(t.turn > 1 and t.ttft_s > 0.5 for t in res.turns)


def test_default_is_off_and_the_standalone_normaliser_never_admits() -> None:
    tm = a40()
    convs = agentic(6, turns=2, spacing_s=0.1)
    res = run_simulation(disagg(tm, 1, 2), convs, make_policy("conserve"), energy_window_s=None)
    assert not res.router_admission and all(c.admission_wait_s == 0.0 for c in res.conversations)
    with_adm = StandaloneCache(tm, SimOptions(router_admission=True))
    assert not with_adm.options.router_admission
    assert with_adm.get(convs[0]) == StandaloneCache(tm, SimOptions()).get(convs[0])


def test_a_reservation_no_engine_can_hold_is_an_error() -> None:
    tm = small_gpu_model()
    big = [ConversationSpec("big", 0.0, (TurnSpec(3000, 100), TurnSpec(67, 2000)))]
    with pytest.raises(SimulationError, match="router-side KV reservation of .* turn router admission off"):
        run_simulation(disagg(tm, 1, 1), big, make_policy("conserve"), options=ADMIT)
