"""`make_plan` and the comparisons built on it (power caps, homogeneous fleets)."""

from __future__ import annotations

import time
from dataclasses import replace

from conserve.errors import ConServeError
from orchestrator.config import FleetConfig, Objective
from orchestrator.fleet import allowed_caps_w
from orchestrator.planner.burst import plan_burst, with_finite_run
from orchestrator.planner.inputs import (
    SERVING_MODES,
    _highest_rate,
    _settings,
    demand_from_stats,
    fleet_stats,
    slo_from_config,
    tier_supplies,
    tightened_slo,
)
from orchestrator.planner.report import PlanRun, mode_note, to_plan
from orchestrator.workload import WorkloadStats
from placement import ilp
from placement.errors import PlanningError


def make_plan(
    cfg: FleetConfig,
    objective: Objective | None = None,
    solver: str = "auto",
    time_limit_s: float | None = 30.0,
    fleet_file: str | None = None,
    stats: WorkloadStats | None = None,
    rate_per_s: float | None = None,
    max_rate: bool = False,
    slo_factors: tuple[float, float] = (1.0, 1.0),
    modes: tuple[str, ...] = SERVING_MODES,
) -> PlanRun:
    """Plan `cfg` (objective: the file's unless given). Raises PlanningError with a diagnosis if infeasible.

    rate_per_s overrides the workload's arrival rate; max_rate plans for the highest rate the fleet sustains
    within the SLOs (found by an ILP that maximises the rate), less 0.1% so the plan keeps a sliver of slack.
    slo_factors: (TTFET, TBT) factors on the planning SLO (< 1: tighter; the verification loop,
    orchestrator.verify, sets them when the simulator shows the plan missing the SLO). The plan's reported
    SLO stays the file's.
    """
    settings = _settings(cfg, objective, solver, time_limit_s, modes)
    ws = stats if stats is not None else fleet_stats(cfg)
    finite = cfg.workload.conversations is not None
    if rate_per_s is not None:
        if not rate_per_s > 0:
            raise PlanningError(
                f"--rate must be > 0 conversations/s, got {rate_per_s}. To fix: pass a rate > 0."
            )
        ws = replace(ws, arrival_rate_per_s=rate_per_s)
    demand = demand_from_stats(ws)
    supplies = tier_supplies(cfg)
    slo = tightened_slo(slo_from_config(cfg), *slo_factors)
    t0 = time.perf_counter()
    if max_rate:
        _, top = _highest_rate(cfg, supplies, demand, slo, settings)
        ws = replace(ws, arrival_rate_per_s=top * 0.999)
        demand = demand_from_stats(ws)
    overload: tuple[ilp.Burst, str] | None = None
    try:
        result = ilp.plan(supplies, demand, slo, settings, cfg.reference_tier)
    except PlanningError as err:
        if not finite or max_rate:
            raise
        # a finite run above the steady-state capacity: plan the fleet for the run (see plan_burst)
        result, burst = plan_burst(cfg, supplies, demand, slo, settings, ws.conversations)
        overload = (burst, str(err))
    elapsed = time.perf_counter() - t0
    run = finish_plan(cfg, result, settings, ws, supplies, demand, slo, elapsed, fleet_file, overload)
    plan = run.plan
    if slo_factors != (1.0, 1.0):
        plan = replace(
            plan,
            notes=(
                f"Planned against a tightened SLO (TTFET x {slo_factors[0]:.2f}, TBT x {slo_factors[1]:.2f} "
                "of the file's) because the simulator showed the plan at the file's SLO missing it "
                "(verification loop).",
                *plan.notes,
            ),
        )
    return replace(run, plan=plan)


def finish_plan(
    cfg: FleetConfig,
    result: ilp.PlanResult,
    settings: ilp.Settings,
    ws: WorkloadStats,
    supplies: list[ilp.TierSupply],
    demand: ilp.Demand,
    slo: ilp.Slo,
    elapsed: float,
    fleet_file: str | None,
    overload: tuple[ilp.Burst, str] | None,
    compare_modes: bool = True,
) -> PlanRun:
    """A solved ILP as a PlanRun: the plan, the best plan of each serving mode at the planned rate (when
    compare_modes and more than one mode is open) and, for a finite run above capacity (overload: the fluid
    burst figures and the steady-state diagnosis), the finite-run figures and sentences."""
    # the rate the pools were sized for (below the requested one for a finite run above capacity)
    planned_rate = result.tokens_per_s / demand.tokens_per_conversation
    plan_ws = ws if overload is None else replace(ws, arrival_rate_per_s=planned_rate)
    plan = to_plan(cfg, result, settings, elapsed, fleet_file, plan_ws)
    outcomes: tuple[ilp.ModeOutcome, ...] = ()
    if compare_modes and len(settings.modes) > 1:
        planned = replace(demand, arrival_rate_per_s=planned_rate)
        outcomes = tuple(ilp.best_per_mode(supplies, planned, slo, settings, result.reference))
        why = mode_note(result, outcomes, settings.objective.value)
        if why:
            plan = replace(plan, notes=(why, *plan.notes))
    if overload is not None:
        plan = with_finite_run(plan, result, overload[0], overload[1], cfg, settings, supplies, demand, slo)
    return PlanRun(plan, result, ws, settings, outcomes, "" if overload is None else overload[1])


def caps_comparison(
    cfg: FleetConfig,
    run: PlanRun,
    objective: Objective | None = None,
    solver: str = "auto",
    time_limit_s: float | None = 30.0,
) -> dict[str, float | None] | None:
    """What the allowed power caps save: the plan's watts vs TDP only, and vs decoders held at TDP.

    None when no tier allows a cap below TDP. Values are None where that variant is infeasible.
    """
    if not any(len(allowed_caps_w(t)) > 1 or allowed_caps_w(t)[0] < t.gpu_spec().tdp_w for t in cfg.tiers):
        return None
    tdp_tiers = [t.model_copy(update={"power_caps_w": None}) for t in cfg.tiers]
    variants: dict[str, float | None] = {}
    # at the plan's own rate (for a finite run above capacity that is below the requested rate)
    demand = demand_from_stats(replace(run.stats, arrival_rate_per_s=run.plan.predictions.arrival_rate_per_s))
    slo = slo_from_config(cfg)
    ref = run.result.reference
    for key, c, dec_caps in (
        ("watts_total_tdp_only", cfg.model_copy(update={"tiers": tdp_tiers}), True),
        ("watts_total_decoders_at_tdp", cfg, False),
    ):
        settings = replace(run.settings, decoder_caps=dec_caps)
        try:
            r = ilp.plan_with_reference(tier_supplies(c), demand, slo, settings, ref)
            variants[key] = round(r.watts_total, 1)
        except ConServeError:
            variants[key] = None
    w = run.result.watts_total
    tdp, dec = variants["watts_total_tdp_only"], variants["watts_total_decoders_at_tdp"]
    return {
        "watts_total": round(w, 1),
        "watts_total_tdp_only": tdp,
        "watts_total_decoders_at_tdp": dec,
        "watts_saved": None if tdp is None else round(tdp - w, 1),
        "watts_saved_by_decoder_caps": None if dec is None else round(dec - w, 1),
    }


def compare_homogeneous(
    cfg: FleetConfig,
    stats: WorkloadStats,
    objective: Objective | None = None,
    solver: str = "auto",
    time_limit_s: float | None = 30.0,
) -> list[tuple[str, PlanRun | None, str]]:
    """Plan each tier alone with the fleet's whole GPU budget: [(tier, run or None, error message)]."""
    budget = sum(t.count for t in cfg.tiers)
    out: list[tuple[str, PlanRun | None, str]] = []
    for t in cfg.tiers:
        single = t.model_copy(update={"count": budget})
        c = cfg.model_copy(update={"tiers": [single], "reference_tier": None})
        # keep the same reference (standalone) latencies: reference tier of the original fleet
        try:
            run = _plan_with_reference(c, cfg, stats, objective, solver, time_limit_s)
            out.append((t.name, run, ""))
        except ConServeError as err:
            out.append((t.name, None, str(err)))
    return out


def _plan_with_reference(
    c: FleetConfig,
    original: FleetConfig,
    stats: WorkloadStats,
    objective: Objective | None,
    solver: str,
    time_limit_s: float | None,
) -> PlanRun:
    settings = _settings(c, objective, solver, time_limit_s)
    demand = demand_from_stats(stats)
    ref = ilp.reference_for(tier_supplies(original), demand, original.reference_tier)
    supplies = tier_supplies(c)
    t0 = time.perf_counter()
    result = ilp.plan_with_reference(supplies, demand, slo_from_config(c), settings, ref)
    plan = to_plan(c, result, settings, time.perf_counter() - t0, None, stats)
    return PlanRun(plan, result, stats, settings)


def best_homogeneous(rows: list[tuple[str, PlanRun | None, str]]) -> tuple[str, PlanRun] | None:
    ok = [(name, run) for name, run, _ in rows if run is not None]
    if not ok:
        return None
    return max(ok, key=lambda x: x[1].plan.predictions.tokens_per_j)
