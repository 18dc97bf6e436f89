"""The paper-fidelity mechanisms wired into the simulator (issue 12 item 1, round 2: W1-W7 of
docs/paper-reproduction.md), each an option that is off by default; small scenarios, no shared data needed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from simkit import a40, agentic, colocated, disagg

from orchestrator.metrics import Convention, StandaloneCache, conversation_metrics, summarize
from orchestrator.sim import run_simulation
from orchestrator.sim.core import SimOptions
from placement.policies import make_policy

# ---- W1: the per-token last-turn TBT statistic -------------------------------------------------------


def test_final_turn_gaps_are_recorded_on_request_and_add_up() -> None:
    tm = a40()
    convs = agentic(12, spacing_s=0.2, turns=3)
    opts = SimOptions(max_batched_tokens=2944, record_tbt_gaps=True)
    res = run_simulation(colocated(tm, 2), convs, make_policy("colocated"), options=opts)
    last = {t.conversation_id: t for t in res.turns if t.turn == 3}
    for c in res.conversations:
        gaps = c.last_turn_gaps_s
        t = last[c.conversation_id]
        assert gaps is not None and len(gaps) == t.output_tokens - 1
        assert float(np.sum(gaps)) == pytest.approx(t.last_token_s - t.first_token_s, rel=1e-9)
        assert float(np.mean(gaps)) == pytest.approx(c.last_turn_tbt_mean_s, rel=1e-9)
    plain = run_simulation(
        colocated(tm, 2), convs, make_policy("colocated"), options=replace(opts, record_tbt_gaps=False)
    )
    assert all(c.last_turn_gaps_s is None for c in plain.conversations)
    # recording changes no simulated figure
    assert [c.ttfet_s for c in plain.conversations] == [c.ttfet_s for c in res.conversations]


def test_per_token_tbt_pools_every_gap_over_its_standalone_mean() -> None:
    tm = a40()
    convs = agentic(20, spacing_s=0.1, turns=2)
    opts = SimOptions(max_batched_tokens=2944, record_tbt_gaps=True)
    res = run_simulation(disagg(tm, 1, 2), convs, make_policy("conserve"), options=opts)
    sa = StandaloneCache(tm, opts)
    ms = conversation_metrics(res, convs, sa)
    s = summarize(res, ms, Convention.ARTIFACT)
    spec = {c.conversation_id: c for c in convs}
    pooled = np.concatenate(
        [c.last_turn_gaps_s / sa.get(spec[c.conversation_id]).tbt_mean_s for c in res.conversations]
    )
    assert s.tbt_token_slowdown["p95"] == pytest.approx(float(np.percentile(pooled, 95)), rel=1e-12)
    assert s.tbt_token_slowdown["mean"] == pytest.approx(float(np.mean(pooled)), rel=1e-12)
    assert "tbt_token_slowdown" in s.to_dict()
    # without the option the summary has no per-token statistic and its dict is as before
    res0 = run_simulation(
        disagg(tm, 1, 2), convs, make_policy("conserve"), options=replace(opts, record_tbt_gaps=False)
    )
    s0 = summarize(res0, conversation_metrics(res0, convs, sa))
    assert s0.tbt_token_slowdown == {} and "tbt_token_slowdown" not in s0.to_dict()


# ---- W5: the serving path's per-step overhead ------------------------------------------------------


def test_serving_overhead_adds_the_measured_constant_to_every_decode_step_with_two_or_more() -> None:
    from orchestrator.workload import ConversationSpec, TurnSpec
    from tiers.serving import SERVING_STEP_OVERHEAD_S

    tm = a40()
    twins = [ConversationSpec(f"c{i}", 0.0, (TurnSpec(3000, 40), TurnSpec(67, 50))) for i in range(2)]
    opts = SimOptions(max_batched_tokens=8192, record_tbt_gaps=True)
    runs = {
        on: run_simulation(
            colocated(tm, 1), twins, make_policy("colocated"), options=replace(opts, serving_step_overhead=on)
        )
        for on in (False, True)
    }
    off, on = (runs[k].conversations[0].last_turn_gaps_s for k in (False, True))
    assert off is not None and on is not None and len(on) == len(off) == 49
    # once both twins decode (batch 2) every gap is longer by exactly the measured overhead; the first gap
    # is the step that prefills the other twin's turn next to this one's decode (batch 1): unchanged
    diff = on - off
    assert np.allclose(diff[1:], SERVING_STEP_OVERHEAD_S, rtol=0, atol=1e-12)
    assert diff[0] == pytest.approx(0.0, abs=1e-12)
    # alone (batch 1) nothing changes: the standalone normaliser is unaffected
    alone = twins[:1]
    a0, a1 = (
        run_simulation(
            colocated(tm, 1), alone, make_policy("colocated"), options=replace(opts, serving_step_overhead=on)
        ).conversations[0]
        for on in (False, True)
    )
    assert a0.e2e_s == a1.e2e_s
    # the tier model itself is unchanged unless asked (tiers' contract and tests)
    assert tm.serving_overhead_s == 0.0


# ---- W3: prefix caching off on the run under test, the normaliser keeps the reference engine's ----------


def test_the_normaliser_keeps_the_reference_engines_prefix_cache() -> None:
    tm = a40()
    conv = agentic(1, turns=4)[0]
    ref = StandaloneCache(tm, SimOptions(max_batched_tokens=2944)).get(conv)
    assert StandaloneCache(tm, SimOptions(max_batched_tokens=2944, prefix_cache=False)).get(conv) == ref
    # asked explicitly, a normaliser without a prefix cache re-prefills every turn's whole history
    cold = StandaloneCache(tm, SimOptions(max_batched_tokens=2944), reference_prefix_cache=False).get(conv)
    assert cold.ttft_s[0] == ref.ttft_s[0]
    assert all(c > 5 * r for c, r in zip(cold.ttft_s[1:], ref.ttft_s[1:], strict=True))


def test_full_disaggregation_without_prefix_cache_reprefills_and_ships_every_turn() -> None:
    tm = a40()
    convs = agentic(3, spacing_s=50.0, turns=3)
    opts = SimOptions(max_batched_tokens=2944, prefix_cache=False)
    res = run_simulation(disagg(tm, 1, 1), convs, make_policy("full-disagg"), options=opts)
    for t in res.turns:
        assert t.remote_prefill and t.cached_tokens == 0
        assert t.prefilled_tokens == t.input_tokens and t.transfer_tokens == t.input_tokens
    # through run_simulation's own metrics the normaliser keeps its cache, so each conversation (alone on
    # the fleet) shows the re-prefills as a slowdown; a normaliser that also lost its cache would hide them
    res_m = run_simulation(
        disagg(tm, 1, 1), convs, make_policy("full-disagg"), options=opts, reference_tier_model=tm
    )
    assert min(m.ttfet_slowdown for m in res_m.metrics) > 1.15
    cold = StandaloneCache(tm, opts, reference_prefix_cache=False)
    hidden = conversation_metrics(res, convs, cold)
    assert max(m.ttfet_slowdown for m in hidden) < min(m.ttfet_slowdown for m in res_m.metrics)
