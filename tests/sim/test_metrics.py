"""Metrics: standalone normaliser, slowdowns, SLO checks, tokens/J (pure; no mocks)."""

from __future__ import annotations

import math

import pytest
from simkit import Inst, a40, agentic, disagg

from orchestrator.metrics import (
    TOKENS_COUNTED,
    Convention,
    SloSpec,
    conversation_metrics,
    geomean,
    summarize,
)
from orchestrator.sim import run_simulation
from orchestrator.sim.standalone import StandaloneCache
from placement.base import Role
from placement.policies import make_policy


def test_alone_on_the_reference_instance_has_slowdown_one() -> None:
    tm = a40()
    convs = agentic(3, spacing_s=1000.0)  # far apart: each runs alone
    res = run_simulation([Inst("c0", "a40", Role.COLOCATED, tm)], convs, make_policy("colocated"))
    sa = StandaloneCache(tm)
    ms = conversation_metrics(res, convs, sa)
    for m in ms:
        assert m.ttfet_slowdown == pytest.approx(1.0, rel=1e-9)
        assert m.e2e_slowdown == pytest.approx(1.0, rel=1e-9)
        assert m.tbt_slowdown == pytest.approx(1.0, rel=1e-9)
        assert not m.violates
        assert len(m.ttft_s) == 4
    s = summarize(res, ms)
    assert s.slo_violation_pct == 0.0 and s.tokens_counted == TOKENS_COUNTED
    assert s.tokens == sum(c.total_tokens for c in convs)
    assert s.tokens_per_j == pytest.approx(s.tokens / res.energy_j)


def test_contention_gives_slowdowns_and_violations() -> None:
    tm = a40()
    convs = agentic(40, spacing_s=0.05, turns=3)
    res = run_simulation(disagg(tm, 1, 1), convs, make_policy("conserve"))
    sa = StandaloneCache(tm)
    ms = conversation_metrics(res, convs, sa, SloSpec(ttfet_slowdown=1.5))
    assert max(m.ttfet_slowdown for m in ms) > 1.5
    s = summarize(res, ms, unallocated_idle_w=100.0)
    assert 0 < s.slo_violation_pct <= 100
    assert s.slo_violation_pct_by["ttfet_slowdown"] == s.slo_violation_pct
    assert s.unallocated_idle_j == pytest.approx(100.0 * res.makespan_s)
    assert s.energy_j == pytest.approx(res.energy_j + s.unallocated_idle_j)
    assert s.ttfet_slowdown["p50"] <= s.ttfet_slowdown["p95"] <= s.ttfet_slowdown["p99"]
    # absolute SLOs are checked too
    ms_abs = conversation_metrics(res, convs, None, SloSpec(None, None, None, ttfet_s=0.001))
    assert all("ttfet_s" in m.violated for m in ms_abs)
    assert all(m.ttfet_slowdown is None for m in ms_abs)


def test_artifact_convention_excludes_turn1_prefiller_queueing_only() -> None:
    tm = a40()
    convs = agentic(30, spacing_s=0.05, turns=2)
    res = run_simulation(disagg(tm, 1, 3), convs, make_policy("conserve"))
    honest = conversation_metrics(res, convs, None, convention=Convention.HONEST)
    art = conversation_metrics(res, convs, None, convention=Convention.ARTIFACT)
    by = {t.conversation_id: t for t in res.turns if t.turn == 1}
    for h, a in zip(honest, art, strict=True):
        queue = by[h.conversation_id].prefill_start_s - by[h.conversation_id].arrival_s
        assert h.ttfet_s - a.ttfet_s == pytest.approx(queue, abs=1e-9)
    assert any(h.ttfet_s > a.ttfet_s for h, a in zip(honest, art, strict=True))


def test_conversation_energy_is_part_of_busy_energy() -> None:
    tm = a40()
    convs = agentic(10, spacing_s=0.3)
    res = run_simulation(disagg(tm, 1, 2), convs, make_policy("conserve"), energy_window_s=0.25)
    ms = conversation_metrics(res, convs, None)
    # the windows' energy above their idle row (issue 14: idle = idle draw x whole window, as serve does)
    busy = sum(w.energy_j - w.idle_energy_j for w in res.energy_windows)
    assert sum(m.energy_j for m in ms) == pytest.approx(busy, rel=1e-9)
    assert all(m.energy_j > 0 for m in ms)


def test_geomean() -> None:
    assert geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert math.isnan(geomean([]))


def test_run_simulation_with_reference_attaches_metrics() -> None:
    tm = a40()
    convs = agentic(12, spacing_s=0.1, turns=3)
    res = run_simulation(disagg(tm, 1, 2), convs, make_policy("conserve"), reference_tier_model=tm)
    assert len(res.metrics) == 12 and res.summary is not None
    assert res.summary.tokens_per_j == pytest.approx(res.tokens_per_j)
    # queueing behind others can only slow a conversation down relative to being alone
    assert all(m.ttfet_slowdown >= 0.99 for m in res.metrics)
    plain = run_simulation(disagg(tm, 1, 2), convs, make_policy("conserve"))
    assert plain.metrics == () and plain.turns == res.turns
