"""The capacity-planning ILP (placement/ilp/): optimality against brute force, diagnosis, status

handling.
"""

from __future__ import annotations

import itertools
import math

import pytest

from orchestrator.config import SyntheticWorkload, parse_fleet
from orchestrator.planner import demand_from_stats, tier_supplies
from orchestrator.workload import synthetic_conversations, workload_stats
from placement import ilp
from placement.errors import PlanningError

STATS = workload_stats(
    synthetic_conversations(SyntheticWorkload(turn1_input_tokens_median=12000, turns_mean=5), 300, seed=1),
    rate_per_s=1.0,
)


def _fleet(a40: int = 3, l40s: int = 2, caps: list[float] | None = None) -> list[ilp.TierSupply]:
    cfg = parse_fleet(
        {
            "model": "Qwen3-0.6B",
            "tiers": [
                {"name": "a40", "gpu": "A40", "count": a40, "power_caps_w": caps or [300, 200]},
                {"name": "l40s", "gpu": "L40S", "count": l40s},
            ],
        }
    )
    return tier_supplies(cfg)


def _demand(rate: float) -> ilp.Demand:
    from dataclasses import replace

    return replace(demand_from_stats(STATS), arrival_rate_per_s=rate)


def _brute_force(
    options: list[ilp.Option], tiers: list[ilp.TierSupply], demand: ilp.Demand, s: ilp.Settings
) -> float:
    """Enumerate every integer n; for each, the optimal load split is a fractional knapsack per side."""
    by_tier = {t.name: t for t in tiers}
    usable = [o for o in options if o.usable]
    ranges = [range(by_tier[o.tier].gpus // o.gpus + 1) for o in usable]
    best = math.inf
    for n in itertools.product(*ranges):
        used: dict[str, int] = {}
        for o, k in zip(usable, n, strict=True):
            used[o.tier] = used.get(o.tier, 0) + k * o.gpus
        if any(used.get(t.name, 0) > t.gpus for t in tiers):
            continue
        total = ilp.objective_constant(tiers, s)
        ok = True
        for side in ("prefill", "decode"):
            rows = [(o, k) for o, k in zip(usable, n, strict=True) if o.role == side]
            need = demand.arrival_rate_per_s
            for o, k in sorted(
                rows, key=lambda r: ilp.objective_coefficients(r[0], by_tier[r[0].tier], s)[1]
            ):
                cap = k * o.capacity_per_instance(demand, s)
                take = min(cap, need)
                total += ilp.objective_coefficients(o, by_tier[o.tier], s)[1] * take
                need -= take
            if need > 1e-9:
                ok = False
        if not ok:
            continue
        total += sum(
            ilp.objective_coefficients(o, by_tier[o.tier], s)[0] * k for o, k in zip(usable, n, strict=True)
        )
        best = min(best, total)
    return best


@pytest.mark.parametrize("objective", list(ilp.Objective)[:2], ids=lambda o: o.value)
@pytest.mark.parametrize("unallocated", ["idle", "off"])
@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_optimal_matches_brute_force(objective: ilp.Objective, unallocated: str, rate: float) -> None:
    tiers = _fleet()
    demand = _demand(rate)
    s = ilp.Settings(objective=objective, unallocated=unallocated)
    ref = ilp.reference_for(tiers, demand, None)
    tau = ilp.slo_targets(ilp.Slo(), ref)[1] * 0.6
    options = ilp.build_options(tiers, demand, ilp.Slo(), ref, tau, s)
    expected = _brute_force(options, tiers, demand, s)
    sol = ilp.solve(options, tiers, demand, s)
    if math.isinf(expected):
        assert sol.status == "infeasible"
        return
    assert sol.status == "optimal"
    assert sol.objective_value == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # the solution itself satisfies every constraint family and the GPU budget
    for o, k, load in zip(options, sol.counts, sol.loads, strict=True):
        assert isinstance(k, int)
        if k == 0:
            assert load <= 1e-7
            continue
        assert load <= k * o.capacity_per_instance(demand, s) * (1 + 1e-7)
    for t in tiers:
        assert sum(k * o.gpus for o, k in zip(options, sol.counts, strict=True) if o.tier == t.name) <= t.gpus


def test_highs_and_cbc_agree_and_inputs_untouched() -> None:
    tiers = _fleet(4, 3)
    demand = _demand(0.6)
    before = (tuple(tiers), demand)
    a = ilp.plan(tiers, demand, ilp.Slo(), ilp.Settings(solver="highs"))
    b = ilp.plan(tiers, demand, ilp.Slo(), ilp.Settings(solver="cbc"))
    assert a.solution.objective_value == pytest.approx(b.solution.objective_value, rel=1e-6)
    assert (tuple(tiers), demand) == before


def test_plan_properties() -> None:
    tiers = _fleet(4, 3)
    r = ilp.plan(tiers, _demand(0.6), ilp.Slo(), ilp.Settings())
    assert r.gpus_used <= r.gpus_available
    pre = sum(p.arrival_rate_per_s for p in r.pools if p.option.does_prefill)
    dec = sum(p.arrival_rate_per_s for p in r.pools if p.option.does_decode)
    assert pre == pytest.approx(0.6) and dec == pytest.approx(0.6)
    assert all(0 <= p.utilisation <= 1 + 1e-6 for p in r.pools)
    assert all(p.kv_occupancy <= 0.9 + 1e-6 for p in r.pools)  # kappa
    # the SLO is per conversation: the p-th percentile of each conversation's TTFET / its own standalone
    assert 0 < r.ttfet_slowdown_p <= ilp.Slo().ttfet_slowdown * (1 + 1e-6)
    assert r.tbt_mean_s <= r.tbt_target_s * (1 + 1e-6)
    assert 0 < r.tbt_slowdown_p <= ilp.Slo().tbt_slowdown * (1 + 1e-6)


def test_more_options_never_cost_more() -> None:
    demand = _demand(0.5)
    only_tdp = ilp.plan(_fleet(caps=[300]), demand, ilp.Slo(), ilp.Settings())
    with_caps = ilp.plan(_fleet(caps=[300, 200]), demand, ilp.Slo(), ilp.Settings())
    more_gpus = ilp.plan(_fleet(a40=6, caps=[300, 200]), demand, ilp.Slo(), ilp.Settings(unallocated="off"))
    fewer = ilp.plan(_fleet(a40=3, caps=[300, 200]), demand, ilp.Slo(), ilp.Settings(unallocated="off"))
    assert with_caps.solution.objective_value <= only_tdp.solution.objective_value + 1e-6
    assert more_gpus.solution.objective_value <= fewer.solution.objective_value + 1e-6


def test_infeasible_fleet_is_diagnosed_and_the_fix_works() -> None:
    import re
    from dataclasses import replace

    tiers = _fleet(a40=2, l40s=0)
    demand = _demand(1.0)
    with pytest.raises(PlanningError, match=r"binding: .*short by .*To fix: add \d+ \S+ to tier") as ei:
        ilp.plan(tiers, demand, ilp.Slo(), ilp.Settings())
    m = re.search(r"add (\d+) \S+ to tier '(\w+)'", str(ei.value))
    assert m is not None
    add, tier = int(m.group(1)), m.group(2)
    counts = {"a40": 2, "l40s": 0}
    counts[tier] += add
    assert ilp.plan(_fleet(counts["a40"], counts["l40s"]), demand, ilp.Slo(), ilp.Settings()).gpus_used > 0
    counts[tier] -= 1  # one GPU fewer than suggested is not enough
    with pytest.raises(PlanningError):
        ilp.plan(_fleet(counts["a40"], counts["l40s"]), demand, ilp.Slo(), ilp.Settings())
    ref = ilp.reference_for(tiers, demand, None)
    top = ilp.max_rate_per_s(tiers, demand, ilp.Slo(), ilp.Settings(), ref)
    assert 0 < top < 1.0
    ilp.plan(tiers, replace(demand, arrival_rate_per_s=top * 0.999), ilp.Slo(), ilp.Settings())
    with pytest.raises(PlanningError):
        ilp.plan(tiers, replace(demand, arrival_rate_per_s=top * 1.01), ilp.Slo(), ilp.Settings())


def test_slo_relaxation_is_suggested_when_it_helps() -> None:
    tiers = _fleet(a40=4, l40s=0)
    demand = _demand(0.5)
    tight = ilp.Slo(ttfet_slowdown=1.05, tbt_slowdown=5.0)
    with pytest.raises(PlanningError, match=r"relax TTFET p95 slowdown to ([\d.]+)x") as ei:
        ilp.plan(tiers, demand, tight, ilp.Settings())
    f = float(__import__("re").search(r"slowdown to ([\d.]+)x", str(ei.value)).group(1))
    ilp.plan(
        tiers, demand, ilp.Slo(ttfet_slowdown=f * 1.01, tbt_slowdown=5.0 * f / 1.05 * 1.01), ilp.Settings()
    )


def test_mg1_wait_model() -> None:
    s, s2 = 0.5, 0.3
    assert ilp.mg1_wait_quantile_s(0.03, s, s2, 95) == 0.0  # P(W > 0) = rho < 5%
    waits = [ilp.mg1_wait_quantile_s(r, s, s2, 95) for r in (0.2, 0.5, 0.8, 0.95)]
    assert waits == sorted(waits)
    assert math.isinf(ilp.mg1_wait_quantile_s(1.0, s, s2, 95))
    rho = ilp.rho_for_wait(2.0, s, s2, 95)
    assert ilp.mg1_wait_quantile_s(rho, s, s2, 95) == pytest.approx(2.0, rel=1e-6)
    assert ilp.rho_for_wait(-1.0, s, s2, 95) == 0.0


def test_unknown_solver_and_cost_without_prices() -> None:
    tiers = _fleet()
    with pytest.raises(PlanningError, match="unknown solver"):
        ilp.plan(tiers, _demand(0.3), ilp.Slo(), ilp.Settings(solver="gurobi"))
    with pytest.raises(PlanningError, match="cost_per_gpu_hour"):
        ilp.plan(tiers, _demand(0.3), ilp.Slo(), ilp.Settings(objective=ilp.Objective.COST))


def test_decoder_power_uses_the_planned_context_and_200w_caps_save_energy() -> None:
    """Decode draw is priced at the planned KV (active batch x mean context), not the tier model's no-KV
    default, with Poisson occupancy (no active sequence with probability exp(-B): idle draw); with it, a
    200 W decoder cap on the A40 lowers predicted watts while decode barely slows."""
    demand = _demand(0.5)
    tdp_only = ilp.plan(_fleet(a40=4, l40s=0, caps=[300]), demand, ilp.Slo(), ilp.Settings())
    dec = [p for p in tdp_only.pools if p.option.role == "decode"]
    assert dec
    for p in dec:
        m = p.option.model
        busy = 1.0 - math.exp(-p.batch)
        b_busy = p.batch / busy  # mean batch while the decoder has work
        no_kv = m.decode_power_w(max(1, round(b_busy)))
        with_kv = m.decode_power_w(max(1, round(b_busy)), int(b_busy * demand.decode_context_tokens))
        assert with_kv > no_kv  # memory traffic is most of decode power
        expected = busy * with_kv + (1.0 - busy) * m.idle_w
        assert p.watts / p.instances == pytest.approx(expected, rel=1e-9)
        assert p.option.fixed_w == pytest.approx(ilp.decode_power_at_w(m, demand, 1.0))
        assert with_kv > 200.0  # above the cap, so the cap has something to save
    capped = ilp.plan(_fleet(a40=4, l40s=0, caps=[300, 200]), demand, ilp.Slo(), ilp.Settings())
    cdec = [p for p in capped.pools if p.option.role == "decode"]
    assert {p.option.power_cap_w for p in cdec} == {200.0}
    assert capped.watts_total < tdp_only.watts_total
    # memory-bound decode: the capped step is within a few percent of the uncapped one at the same batch
    for p in cdec:
        uncapped = next(o for o in tdp_only.options if o.role == "decode").model
        t_cap = ilp.decode_step_s(p.option.model, demand, p.batch)
        t_tdp = ilp.decode_step_s(uncapped, demand, p.batch)
        assert t_tdp <= t_cap < 1.05 * t_tdp


def _exhaustive_levels(tiers: list[ilp.TierSupply], demand: ilp.Demand, s: ilp.Settings) -> float:
    """Min over every serving-mode variant and decode level of the proven ILP optimum (no LP-bound pruning,
    no tier merging)."""
    ref = ilp.reference_for(tiers, demand, None)
    best = math.inf
    for vs, vt in ilp.variants(tiers, demand, s):
        for tau in ilp._levels(ilp.slo_targets(ilp.Slo(), ref)[1], ref, vs):
            sol = ilp.solve(ilp.build_options(vt, demand, ilp.Slo(), ref, tau, vs), vt, demand, vs)
            if sol.status == "optimal":
                best = min(best, sol.objective_value)
    return best


@pytest.mark.parametrize("rate", [0.3, 0.9])
def test_level_pruning_and_tier_merging_keep_the_optimum(rate: float) -> None:
    from dataclasses import replace

    base = _fleet(a40=4, l40s=2)
    # a fleet with a duplicate of the A40 tier (same shapes, another name): merged for the solve, then split
    twin = [*base, replace(base[0], name="a40b", gpus=2)]
    s = ilp.Settings()
    demand = _demand(rate)
    for tiers in (base, twin):
        r = ilp.plan(tiers, demand, ilp.Slo(), s)
        assert r.solution.objective_value == pytest.approx(
            _exhaustive_levels(tiers, demand, s), rel=1e-6, abs=1e-6
        )
        assert r.ilps_solved <= r.levels_tried
        for t in tiers:  # the split respects every original tier's GPUs
            used = sum(p.instances * p.option.gpus for p in r.pools if p.option.tier == t.name)
            assert used <= t.gpus
        assert sum(p.arrival_rate_per_s for p in r.pools if p.option.does_decode) == pytest.approx(rate)
    merged, members = ilp.merge_identical_tiers(twin)
    assert [t.name for t in merged] == ["a40", "l40s"] and merged[0].gpus == 6
    assert [t.name for t in members["a40"]] == ["a40", "a40b"]


def test_dominated_options_are_pruned_only_when_no_better() -> None:
    tiers = _fleet()
    demand = _demand(0.5)
    s = ilp.Settings(objective=ilp.Objective.GPUS)  # every shape of a tier costs the same per instance
    ref = ilp.reference_for(tiers, demand, None)
    opts = ilp.build_options(tiers, demand, ilp.Slo(), ref, ilp.slo_targets(ilp.Slo(), ref)[1] * 0.6, s)
    drop = ilp.dominated(opts, tiers, demand, s)
    for i in drop:
        o = opts[i]
        keeper = [
            k
            for k, p in enumerate(opts)
            if k not in drop and p.usable and (p.tier, p.role, p.gpus) == (o.tier, o.role, o.gpus)
        ]
        assert keeper
        assert any(
            opts[k].capacity_per_instance(demand, s) >= o.capacity_per_instance(demand, s) for k in keeper
        )


def test_burst_fluid_model() -> None:
    b = ilp.burst(255, 1.634, 0.9, 0.91, 95)
    assert b.arrival_span_s == pytest.approx(255 / 1.634)
    assert b.backlog_conversations == pytest.approx(255 * (1 - 0.9 / 1.634))
    assert b.drain_s == pytest.approx(b.backlog_conversations / 0.9)
    assert b.makespan_s == pytest.approx(b.arrival_span_s + b.drain_s)
    assert b.extra_wait_mean_s == pytest.approx(b.drain_s / 2)
    assert b.extra_wait_p_s == pytest.approx(0.95 * b.drain_s)
    assert b.excess_fraction == pytest.approx(1.634 / 0.9 - 1)
    # a higher rate or a slower fleet never shortens the backlog
    assert ilp.burst(255, 2.0, 0.9, 0.9, 95).backlog_conversations > b.backlog_conversations
    assert ilp.burst(255, 1.634, 0.8, 0.9, 95).drain_s > b.drain_s
    # at or below capacity there is no backlog
    ok = ilp.burst(255, 0.5, 0.9, 0.9, 95)
    assert ok.backlog_conversations == 0 and ok.drain_s == 0


def test_split_rates_with_fixed_prefill_count() -> None:
    tiers = _fleet(a40=4, l40s=0)
    demand = _demand(0.5)
    # prefill/decode splits: the modes with prefill instances (colocated has none to count)
    s = ilp.Settings(modes=("disaggregated", "hybrid"))
    ref = ilp.reference_for(tiers, demand, None)
    top = ilp.max_rate_per_s(tiers, demand, ilp.Slo(), s, ref)
    by_k = [ilp.max_rate_per_s(tiers, demand, ilp.Slo(), s, ref, prefill_instances=k) for k in (1, 2, 3)]
    assert max(by_k) == pytest.approx(top, rel=1e-6)
    r = ilp.plan(tiers, replace_rate(demand, top * 0.99), ilp.Slo(), s)
    mu = ilp.max_rate_of_counts(r.options, r.solution.counts, tiers, demand, s)
    assert top * 0.99 * (1 - 1e-6) <= mu <= top * (1 + 1e-6)


def replace_rate(d: ilp.Demand, rate: float) -> ilp.Demand:
    from dataclasses import replace

    return replace(d, arrival_rate_per_s=rate)


def test_auto_solver_by_fleet_size() -> None:
    # "auto:<name>": the MIP solver for this size (LPs on HiGHS); tests/placement/test_solver_choice.py
    small, large = _fleet(a40=4, l40s=2), _fleet(a40=4000, l40s=1000)
    assert ilp.resolve_solver(ilp.Settings(), small).solver == "auto:highs"
    assert ilp.resolve_solver(ilp.Settings(), large).solver == "auto:cbc"
    assert ilp.resolve_solver(ilp.Settings(solver="highs"), large).solver == "highs"
