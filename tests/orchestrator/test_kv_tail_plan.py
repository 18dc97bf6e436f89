"""Constraint (4b) on the example fleets (placement/ilp/kvtail.py): a plan's decoders meet their KV full for
at most 1 - p/100 of the arrivals under the batch law of one instance, and the constraint binds only where
the mean (Little's law, constraint (4)) hid the tail."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.config import load_fleet
from orchestrator.planner.inputs import demand_from_stats
from orchestrator.planner.run import make_plan
from placement import ilp
from placement.ilp.batching import instance_steps_s
from placement.ilp.kvtail import kv_overflow_share

REPO = Path(__file__).resolve().parents[2]


def _decode_overflow_shares(name: str) -> tuple[float, list[tuple[float, float, float]]]:
    """(percentile, [(share at the planned load, capacity per instance, the same without (4b))] per decode
    pool of the plan)."""
    cfg = load_fleet(REPO / "examples" / f"{name}.yaml")
    run = make_plan(cfg)
    rate = run.plan.predictions.arrival_rate_per_s
    d = demand_from_stats(replace(run.stats, arrival_rate_per_s=rate))
    ctx = d.decode_context_tokens
    var = d.kv_decode_token2_steps / d.decode_tokens - ctx**2
    out = []
    for p in run.result.pools:
        o = p.option
        if not o.does_decode or p.instances == 0:
            continue
        law = ilp.batch_law(
            instance_steps_s(o, d), p.arrival_rate_per_s / p.instances, d.decode_tokens + d.later_turns, 1
        )
        share = kv_overflow_share(law.pi, law.per_instance, ctx, var, o.kv_capacity_tokens)
        s = ilp.Settings()
        out.append(
            (
                share,
                o.capacity_per_instance(d, s),
                replace(o, kv_tail_rate=math.inf).capacity_per_instance(d, s),
            )
        )
    return cfg.slo.percentile, out


def test_the_disaggregated_burst_plan_keeps_its_decoders_kv_tail_within_the_allowance(
    shared_data: Path,
) -> None:
    """examples/paper-a40-disagg.yaml: the plan at the burst rate (0.769 conv/s, hybrid) met constraint (4)
    at 38% mean KV while one decoder's law put 10.8% of the arrivals at a full KV (and one i.i.d. stream in
    three collapsed on it in simulation: docs/planning.md). With (4b) the KV cap is the tail's, below
    Little's law's, and the planned load stays within the 5% allowance."""
    pct, pools = _decode_overflow_shares("paper-a40-disagg")
    assert pools
    for share, cap, without in pools:
        assert share <= (1.0 - pct / 100.0) * (1 + 1e-6)
        assert cap < without  # the tail binds here


@pytest.mark.parametrize("name", ["fleet", "fleet-llama8b-a100-l40s", "fleet-single-turn", "fleet-mooncake"])
def test_where_the_tail_is_thin_it_does_not_bind(name: str, shared_data: Path) -> None:
    pct, pools = _decode_overflow_shares(name)
    assert pools
    for share, cap, without in pools:
        assert share < 1.0 - pct / 100.0
        assert cap == pytest.approx(without)
