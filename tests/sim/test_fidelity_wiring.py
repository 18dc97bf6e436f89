"""The paper-fidelity mechanisms wired into the simulator (issue 12 item 1, round 2: W1-W7 of
docs/paper-reproduction.md), each an option that is off by default; small scenarios, no shared data needed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from simkit import a40, agentic, colocated, disagg

from orchestrator.metrics import Convention, conversation_metrics, summarize
from orchestrator.sim import run_simulation
from orchestrator.sim.core import SimOptions
from orchestrator.sim.standalone import StandaloneCache
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


# ---- W4: a client-side wait before a later turn (the artifact's AMPD emulation plugs in here) ----------


class _Delay:
    """Delays one turn by a fixed wait and offsets one conversation's clock (a core.TurnDelay)."""

    def __init__(self, key: tuple[str, int], wait_s: float, offset: tuple[str, float]) -> None:
        self.key, self.wait_s, self.offset = key, wait_s, offset
        self.calls: list[tuple[str, int, float]] = []

    def delay_s(self, conversation_id: str, turn: int, t: float) -> float:
        self.calls.append((conversation_id, turn, t))
        return self.wait_s if (conversation_id, turn) == self.key else 0.0

    def conversation_offset_s(self, conversation_id: str) -> float:
        return self.offset[1] if conversation_id == self.offset[0] else 0.0


def test_turn_delay_holds_a_later_turn_back_and_its_clocks_count_it() -> None:
    tm = a40()
    convs = agentic(2, spacing_s=30.0, turns=3)
    opts = SimOptions(max_batched_tokens=2944)
    base = run_simulation(disagg(tm, 1, 1), convs, make_policy("conserve"), options=opts)
    hook = _Delay(("conv-0", 2), 3.0, ("conv-1", 0.25))
    res = run_simulation(disagg(tm, 1, 1), convs, make_policy("conserve"), options=opts, turn_delay=hook)
    # asked once per later turn, in event order, never for turn 1
    assert sorted((c, k) for c, k, _ in hook.calls) == [(f"conv-{i}", k) for i in range(2) for k in (2, 3)]
    assert [t for *_, t in hook.calls] == sorted(t for *_, t in hook.calls)
    t0 = {(t.conversation_id, t.turn): t for t in base.turns}
    t1 = {(t.conversation_id, t.turn): t for t in res.turns}
    delayed = t1[("conv-0", 2)]
    assert delayed.arrival_s == pytest.approx(t0[("conv-0", 2)].arrival_s)  # issued when it was
    assert delayed.ttft_s == pytest.approx(t0[("conv-0", 2)].ttft_s + 3.0, abs=1e-6)
    c0, c1 = res.conversations
    b0, b1 = base.conversations
    assert c0.ttfet_s == pytest.approx(b0.ttfet_s + 3.0, abs=1e-6)
    assert c1.ttfet_s == pytest.approx(b1.ttfet_s + 0.25, abs=1e-9)  # the offset, on both clocks
    assert c1.ttfet_admission_s == pytest.approx(b1.ttfet_admission_s + 0.25, abs=1e-9)


# ---- W6: the artifact's energy window ----------------------------------------------------------------


def test_split_energy_window_replaces_the_prefillers_energy_under_the_artifact_convention_only() -> None:
    from orchestrator.errors import SimulationError
    from orchestrator.metrics import SplitEnergyWindow

    tm = a40()
    convs = agentic(6, spacing_s=1.0, turns=2)
    res = run_simulation(disagg(tm, 1, 2), convs, make_policy("conserve"), options=SimOptions())
    ms = conversation_metrics(res, convs, None, convention=Convention.ARTIFACT)
    win = SplitEnergyWindow(
        prefiller_busy_energy_j=500.0, prefiller_busy_s=2.0, prefiller_window_s=10.0, prefiller_idle_w=77.0
    )
    s = summarize(res, ms, Convention.ARTIFACT, split_window=win)
    dec = sum(i.energy_j for i in res.instances if i.role != "prefill")
    assert s.energy_j == pytest.approx(dec + 500.0 + 77.0 * 8.0)
    assert s.tokens_per_j == pytest.approx(res.tokens / s.energy_j)
    assert s.energy_by_role_j["prefill"] == pytest.approx(500.0 + 77.0 * 8.0)
    assert summarize(res, ms, Convention.ARTIFACT).energy_j == pytest.approx(res.energy_j)
    with pytest.raises(SimulationError, match="artifact convention only"):
        summarize(res, ms, Convention.HONEST, split_window=win)
