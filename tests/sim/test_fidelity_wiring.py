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
