"""The `plan` job: fleet.yaml -> tier models -> workload statistics -> ILP (placement.ilp) -> Plan.

Glue only: the formulation and the queueing model live in placement/ilp.py (pure); this module reads the
config, builds the ILP's inputs, times the solve, and turns the result into an orchestrator.fleet.Plan with
sentences that explain it. Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from conserve.errors import ConServeError
from orchestrator.config import FleetConfig, Objective
from orchestrator.fleet import FiniteRun, Plan, PlanPredictions, Pool, allowed_caps_w, tier_model
from orchestrator.workload import WorkloadStats, workload_from_config, workload_stats
from placement import ilp
from placement.errors import PlanningError


@dataclass(frozen=True, slots=True)
class PlanRun:
    """A plan together with what produced it (for the CLI's tables and --json)."""

    plan: Plan
    result: ilp.PlanResult
    stats: WorkloadStats
    settings: ilp.Settings
    modes: tuple[ilp.ModeOutcome, ...] = ()  # the best plan of each serving mode (why this mode)


def demand_from_stats(ws: WorkloadStats) -> ilp.Demand:
    return ilp.Demand(
        arrival_rate_per_s=ws.arrival_rate_per_s,
        turn1_input_tokens=ws.turn1_input_tokens_quantiles,
        decode_tokens=ws.decode_tokens_mean,
        decode_tokens_before_final=ws.decode_tokens_before_final_mean,
        later_turns=ws.later_turns_mean,
        tail_prefill_tokens=ws.tail_prefill_tokens_mean,
        tail_prefill_context_tokens=ws.tail_prefill_context_tokens_mean,
        kv_decode_token_steps=ws.kv_decode_token_steps_mean,
        kv_gap_token_seconds=ws.kv_gap_token_seconds_mean,
        tool_gap_s_total=ws.tool_gap_s_total_mean,
        final_context_tokens_max=ws.final_context_tokens_max,
        tokens_per_conversation=ws.tokens_per_conversation_mean,
        turn1_input_tokens_max=ws.turn1_input_tokens_max,
        shapes=tuple(ilp.ConvShape(*x) for x in ws.conversation_shapes),
    )


def tier_supplies(cfg: FleetConfig) -> list[ilp.TierSupply]:
    out = []
    for t in cfg.tiers:
        models = []
        for tp in sorted(set(t.tp)):
            if t.count and tp > t.count:
                continue
            for cap in allowed_caps_w(t):
                try:
                    models.append(tier_model(cfg, t.name, cap, tp))
                except ConServeError as err:
                    raise PlanningError(f"tiers.{t.name}: power cap {cap:g} W / tp {tp}: {err}") from None
        out.append(
            ilp.TierSupply(
                name=t.name,
                gpus=t.count,
                roles=tuple(t.roles),
                models=tuple(models),
                link=str(t.link.value),
                cost_per_gpu_hour=t.cost_per_gpu_hour,
            )
        )
    return out


def slo_from_config(cfg: FleetConfig) -> ilp.Slo:
    s = cfg.slo
    return ilp.Slo(
        percentile=s.percentile,
        ttfet_slowdown=s.ttfet_slowdown,
        ttfet_s=s.ttfet_s,
        tbt_slowdown=s.tbt_slowdown,
        tbt_ms=s.tbt_ms,
    )


def tightened_slo(slo: ilp.Slo, ttfet_factor: float = 1.0, tbt_factor: float = 1.0) -> ilp.Slo:
    """The planning SLO with the TTFET bounds x ttfet_factor and the TBT bounds x tbt_factor."""
    if ttfet_factor == 1.0 and tbt_factor == 1.0:
        return slo

    def mul(x: float | None, f: float) -> float | None:
        return None if x is None else x * f

    return replace(
        slo,
        ttfet_slowdown=mul(slo.ttfet_slowdown, ttfet_factor),
        ttfet_s=mul(slo.ttfet_s, ttfet_factor),
        tbt_slowdown=mul(slo.tbt_slowdown, tbt_factor),
        tbt_ms=mul(slo.tbt_ms, tbt_factor),
    )


def fleet_stats(cfg: FleetConfig) -> WorkloadStats:
    convs = workload_from_config(cfg.workload)
    # the configured rate is the planning rate (a Mooncake trace without an explicit rate keeps its own)
    explicit = cfg.workload.format != "mooncake" or "arrival_rate_per_s" in cfg.workload.model_fields_set
    return workload_stats(convs, cfg.workload.arrival_rate_per_s if explicit else None)


SERVING_MODES = ("disaggregated", "hybrid", "colocated")


def _settings(
    cfg: FleetConfig,
    objective: Objective | None,
    solver: str,
    time_limit_s: float | None,
    modes: tuple[str, ...] = SERVING_MODES,
) -> ilp.Settings:
    obj = ilp.Objective((objective or cfg.objective).value)
    bad = [m for m in modes if m not in SERVING_MODES]
    if bad or not modes:
        raise PlanningError(
            f"--modes {','.join(modes)!r}: unknown or empty. To fix: a comma-separated subset of "
            f"{','.join(SERVING_MODES)}."
        )
    return ilp.Settings(
        objective=obj, unallocated=cfg.unallocated, solver=solver, time_limit_s=time_limit_s, modes=modes
    )


def _highest_rate(
    cfg: FleetConfig,
    supplies: list[ilp.TierSupply],
    demand: ilp.Demand,
    slo: ilp.Slo,
    settings: ilp.Settings,
    context: str = "",
) -> tuple[ilp.Reference, float]:
    """The reference tier and the highest arrival rate (conv/s) any split of the fleet sustains within the
    SLOs (an ILP). Raises PlanningError when no rate fits; `context` is added to its first sentence."""
    ref = ilp.reference_for(supplies, demand, cfg.reference_tier)
    top = ilp.max_rate_per_s(supplies, demand, slo, settings, ref)
    if top <= 0:
        raise PlanningError(
            f"no arrival rate fits this fleet within the SLOs (no instance shape meets them){context}. To "
            "fix: relax the SLOs or add a tier whose KV capacity holds the longest conversation."
        )
    return ref, top


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
    # the rate the pools were sized for (below the requested one for a finite run above capacity)
    planned_rate = result.tokens_per_s / demand.tokens_per_conversation
    plan_ws = ws if overload is None else replace(ws, arrival_rate_per_s=planned_rate)
    plan = to_plan(cfg, result, settings, elapsed, fleet_file, plan_ws)
    modes: tuple[ilp.ModeOutcome, ...] = ()
    if len(settings.modes) > 1:
        planned = replace(demand, arrival_rate_per_s=planned_rate)
        modes = tuple(ilp.best_per_mode(supplies, planned, slo, settings, result.reference))
        why = mode_note(result, modes, settings.objective.value)
        if why:
            plan = replace(plan, notes=(why, *plan.notes))
    if overload is not None:
        plan = with_finite_run(plan, result, overload[0], overload[1], cfg, settings, supplies, demand, slo)
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
    return PlanRun(plan, result, ws, settings, modes)


MODE_TEXT = {
    "disaggregated": "disaggregated (prefill pools + decode pools, every turn 1 on a prefiller)",
    "hybrid": "hybrid (decoders also prefill turn-1 prompts under a threshold; the rest on prefillers)",
    "colocated": "colocated (every instance prefills and decodes its own conversations)",
}


def mode_text(r: ilp.PlanResult) -> str:
    if r.mode == "hybrid":
        return f"hybrid (turn-1 prompts under {r.threshold_tokens:,} tokens prefill on their decoder)"
    return MODE_TEXT.get(r.mode, r.mode or "-")


def mode_note(result: ilp.PlanResult, modes: tuple[ilp.ModeOutcome, ...], objective: str) -> str:
    """Why the chosen serving mode beats the others: their predicted watts and SLO figures side by side."""
    if not modes:
        return ""
    parts = []
    for m in modes:
        if m.result is None:
            parts.append(f"{m.mode}: {m.reason}")
            continue
        r = m.result
        mark = " <- chosen" if r.mode == result.mode and r.threshold_tokens == result.threshold_tokens else ""
        parts.append(
            f"{mode_text(r)}: {r.watts_total:,.0f} W, {r.gpus_used} GPUs, p95 TTFET slowdown "
            f"{r.ttfet_slowdown_p:.2f}x, TBT slowdown {r.tbt_slowdown_p:.2f}x{mark}"
        )
    return (
        f"Serving mode: {mode_text(result)}. Best plan of each mode at the same rate and SLOs (modelled; "
        f"objective {objective}, the lowest wins): " + "; ".join(parts) + "."
    )


def mode_plan(cfg: FleetConfig, run: PlanRun, mode: str) -> Plan | None:
    """The best plan of one serving mode (from the mode comparison of make_plan), as a Plan; None if none."""
    m = next((x for x in run.modes if x.mode == mode), None)
    if m is None or m.result is None:
        return None
    ws = replace(run.stats, arrival_rate_per_s=run.plan.predictions.arrival_rate_per_s)
    return to_plan(cfg, m.result, run.settings, 0.0, None, ws)


def modes_json(run: PlanRun) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for m in run.modes:
        r = m.result
        out.append(
            {
                "mode": m.mode,
                "feasible": r is not None,
                "chosen": r is not None
                and r.mode == run.result.mode
                and r.threshold_tokens == run.result.threshold_tokens,
                "local_prefill_below_tokens": r.threshold_tokens if r else None,
                "watts_total": round(r.watts_total, 1) if r else None,
                "gpus_used": r.gpus_used if r else None,
                "tokens_per_j": round(r.tokens_per_j, 3) if r else None,
                "ttfet_slowdown_p": round(r.ttfet_slowdown_p, 3) if r else None,
                "tbt_slowdown_p": round(r.tbt_slowdown_p, 3) if r else None,
                "reason": m.reason or None,
            }
        )
    return out


# Finite runs above capacity: the plan trades at most this share of the highest sustainable rate for lower
# energy (a 1% lower rate lengthens the drain by ~1%; on the paper's A40 fleet it lets the decoders run at the
# 200 W cap, whose memory-bound steps are 0.4% slower). A planning choice, not a measured constant.
BURST_RATE_TOLERANCE = 0.01


def plan_burst(
    cfg: FleetConfig,
    supplies: list[ilp.TierSupply],
    demand: ilp.Demand,
    slo: ilp.Slo,
    settings: ilp.Settings,
    conversations: int,
) -> tuple[ilp.PlanResult, ilp.Burst]:
    """Plan a finite run of `conversations` whose arrival rate exceeds the steady-state capacity.

    Every split of the fleet then builds a backlog; the best one for the run serves it fastest: the planner
    finds the highest rate any split sustains within the SLOs (mu*, an ILP), plans the least-energy fleet at
    mu* (1 - BURST_RATE_TOLERANCE), then takes the rate those instances sustain (mu >= that, an LP) for the
    fluid backlog estimate (placement.ilp.Burst). Raises PlanningError when no rate fits at all.
    """
    ref, top = _highest_rate(cfg, supplies, demand, slo, settings, ", not even for a finite run")
    result: ilp.PlanResult | None = None
    for frac in (1.0 - BURST_RATE_TOLERANCE, 0.999):
        try:
            d = replace(demand, arrival_rate_per_s=top * frac)
            result = ilp.plan_with_reference(supplies, d, slo, settings, ref)
            break
        except PlanningError:
            continue
    if result is None:
        raise PlanningError(
            f"internal: no plan at {top:.4g} conv/s although the fleet sustains it. To fix: report this."
        )
    planned = replace(demand, arrival_rate_per_s=result.tokens_per_s / demand.tokens_per_conversation)
    mu = ilp.max_rate_of_counts(result.options, result.solution.counts, supplies, planned, settings)
    mu = max(mu, planned.arrival_rate_per_s)
    return result, ilp.burst(conversations, demand.arrival_rate_per_s, mu, top, cfg.slo.percentile)


def with_finite_run(
    plan: Plan,
    result: ilp.PlanResult,
    b: ilp.Burst,
    diagnosis: str,
    cfg: FleetConfig,
    settings: ilp.Settings,
    supplies: list[ilp.TierSupply],
    demand: ilp.Demand,
    slo: ilp.Slo,
) -> Plan:
    """Attach the finite-run figures and the sentences that state the overload (plan made by plan_burst)."""
    p = plan.predictions
    ttfet_run = p.ttfet_p95_s + b.extra_wait_p_s
    jpc = p.watts_total / p.arrival_rate_per_s if p.arrival_rate_per_s > 0 else 0.0
    fr = FiniteRun(
        conversations=b.conversations,
        requested_rate_per_s=b.requested_rate_per_s,
        sustainable_rate_per_s=round(b.sustainable_rate_per_s, 6),
        plan_rate_per_s=round(b.plan_rate_per_s, 6),
        excess_pct=round(100.0 * b.excess_fraction, 2),
        arrival_span_s=round(b.arrival_span_s, 2),
        backlog_conversations=round(b.backlog_conversations, 1),
        drain_s=round(b.drain_s, 2),
        makespan_s=round(b.makespan_s, 2),
        extra_wait_mean_s=round(b.extra_wait_mean_s, 2),
        extra_wait_p95_s=round(b.extra_wait_p_s, 2),
        ttfet_p95_run_s=round(ttfet_run, 2),
        ttfet_p95_run_slowdown=round(ttfet_run / p.ttfet_standalone_s, 2) if p.ttfet_standalone_s else 0.0,
        energy_run_j=round(jpc * b.conversations, 1),
    )
    lam = b.requested_rate_per_s
    pct = f"{cfg.slo.percentile:g}"
    notes = [
        f"OVERLOAD: the requested {lam:.4g} conv/s exceeds this plan's steady-state capacity "
        f"({b.plan_rate_per_s:.4g} conv/s within the SLOs; the best split of the fleet sustains "
        f"{b.sustainable_rate_per_s:.4g}) by {100 * b.excess_fraction:.0f}%. A steady stream at {lam:.4g} "
        "conv/s cannot be served (its backlog grows without bound); this plan is for the finite run of "
        f"{b.conversations} conversations (workload.conversations).",
        f"Finite run (fluid backlog model, modelled): arrivals last {b.arrival_span_s:.0f} s; when they stop "
        f"~{b.backlog_conversations:.0f} conversations are still waiting for admission; draining them takes "
        f"~{b.drain_s:.0f} s more (run ~{b.makespan_s:.0f} s). Conversations wait on average "
        f"~{b.extra_wait_mean_s:.0f} s (p{pct} ~{b.extra_wait_p_s:.0f} s) beyond the planned waits, so the "
        f"run's p{pct} TTFET is ~{ttfet_run:.1f} s ({fr.ttfet_p95_run_slowdown:.1f}x standalone; SLO "
        f"{cfg.slo.ttfet_slowdown if cfg.slo.ttfet_slowdown is not None else '-'}x): late conversations miss "
        "the TTFET SLO in this model. Energy of the run ~"
        f"{fr.energy_run_j / 1e3:,.0f} kJ at the plan's {jpc:,.0f} J per conversation.",
        f"Split chosen for the run: the highest rate within the SLOs (shortest backlog), then least energy "
        f"within {100 * BURST_RATE_TOLERANCE:g}% of that rate. Steady-state diagnosis: {diagnosis}",
    ]
    splits = split_rates(cfg, supplies, demand, slo, settings, result)
    if splits:
        notes.append(splits)
    return replace(plan, finite_run=fr, notes=(*notes, *plan.notes))


def split_rates(
    cfg: FleetConfig,
    supplies: list[ilp.TierSupply],
    demand: ilp.Demand,
    slo: ilp.Slo,
    settings: ilp.Settings,
    result: ilp.PlanResult,
) -> str:
    """For a small single-tier prefill/decode fleet: the sustainable rate of every prefill/decode split."""
    if len(supplies) != 1 or not 2 <= supplies[0].gpus <= 16:
        return ""
    t = supplies[0]
    if set(t.roles) != {"prefill", "decode"} or any(m.tp != 1 for m in t.models):
        return ""
    ref = result.reference
    chosen = sum(p.instances for p in result.pools if p.option.role == "prefill")
    parts = []
    for k in range(1, t.gpus):
        rate = ilp.max_rate_per_s(supplies, demand, slo, settings, ref, prefill_instances=k)
        mark = " (chosen)" if k == chosen else ""
        parts.append(f"{k} prefill + {t.gpus - k} decode: {rate:.3g} conv/s{mark}")
    return (
        f"Why this split of {t.gpus} {t.models[0].gpu.name}: highest rate each split sustains within the "
        "SLOs (modelled) -- " + "; ".join(parts) + "."
    )


def to_plan(
    cfg: FleetConfig,
    r: ilp.PlanResult,
    settings: ilp.Settings,
    solve_time_s: float,
    fleet_file: str | None,
    ws: WorkloadStats,
) -> Plan:
    pools = tuple(
        Pool(
            tier=p.option.tier,
            role=p.option.role,  # type: ignore[arg-type]
            instances=p.instances,
            tp=p.option.tp,
            power_cap_w=p.option.power_cap_w,
            gpus=p.instances * p.option.gpus,
            arrival_rate_per_s=round(p.arrival_rate_per_s, 6),
            utilisation=round(p.utilisation, 4),
            kv_occupancy=round(p.kv_occupancy, 4),
            batch=round(p.batch, 3),
            step_time_ms=round(p.step_s * 1e3, 3),
            watts=round(p.watts, 1),
        )
        for p in sorted(
            r.pools, key=lambda p: (p.option.role != "prefill", p.option.tier, -p.option.power_cap_w)
        )
    )
    s = cfg.slo
    ref = r.reference
    preds = PlanPredictions(
        arrival_rate_per_s=ws.arrival_rate_per_s,
        gpus_available=r.gpus_available,
        gpus_used=r.gpus_used,
        watts_allocated=round(r.watts_allocated, 1),
        watts_unallocated=round(r.watts_unallocated, 1),
        watts_total=round(r.watts_total, 1),
        tokens_per_s=round(r.tokens_per_s, 1),
        tokens_per_j=round(r.tokens_per_j, 3),
        ttfet_p95_s=round(r.ttfet_p_s, 3),
        ttfet_standalone_s=round(ref.ttfet_s, 3),
        ttfet_p95_slowdown=round(r.ttfet_slowdown_p, 3),
        tbt_mean_ms=round(r.tbt_mean_s * 1e3, 3),
        tbt_standalone_ms=round(ref.step_s * 1e3, 3),
        tbt_slowdown=round(r.tbt_slowdown_p, 3),
        slo_ttfet_slowdown=s.ttfet_slowdown,
        slo_ttfet_s=s.ttfet_s,
        slo_tbt_slowdown=s.tbt_slowdown,
        slo_tbt_ms=s.tbt_ms,
        conserve_threshold_tokens=r.threshold_tokens,
        cost_per_hour=None if r.cost_per_hour is None else round(r.cost_per_hour, 2),
    )
    return Plan(
        model=cfg.model_spec().name,
        objective=settings.objective.value,
        pools=pools,
        predictions=preds,
        solver=r.solution.solver,
        status=r.solution.status,
        solve_time_s=round(solve_time_s, 4),
        notes=tuple(explain(cfg, r, ws)),
        fleet_file=fleet_file,
    )


def explain(cfg: FleetConfig, r: ilp.PlanResult, ws: WorkloadStats) -> list[str]:
    """Sentences saying why the plan looks the way it does (all figures modelled)."""
    notes: list[str] = []
    lam = ws.arrival_rate_per_s
    pre = [p for p in r.pools if p.option.does_prefill]
    dec = [p for p in r.pools if p.option.does_decode]
    if pre:
        th = r.threshold_tokens
        longer = [x for x in ws.turn1_input_tokens_quantiles if x >= th] if th else []
        served = sum(longer) / len(longer) if longer else ws.turn1_input_tokens_mean
        for p in pre:
            o = p.option
            rate = 1.0 / o.prefill_s if o.prefill_s else math.inf
            notes.append(
                f"Prefill on {p.instances} x {o.tier} at {o.power_cap_w:g} W: a mean turn-1 prefill of "
                f"the prompts it serves ({served:,.0f} tokens) takes {o.prefill_s * 1e3:.0f} ms, so one "
                "instance "
                f"serves at most {rate:.2f} conv/s; the TTFET SLO allows utilisation <= {o.rho_max:.2f} "
                f"(M/G/1 p{cfg.slo.percentile:g} wait), i.e. {o.rho_max * rate:.2f} conv/s per instance; "
                f"planned {p.arrival_rate_per_s:.3g} conv/s -> utilisation {p.utilisation:.2f}."
            )
    for p in dec:
        o = p.option
        caps = o.caps_per_instance(_demand_like(ws), ilp.Settings(objective=ilp.Objective.ENERGY))
        binding = min(caps, key=lambda f: caps[f])
        notes.append(
            f"Decode on {p.instances} x {o.tier} at {o.power_cap_w:g} W: one decoder sustains "
            f"{caps[ilp.Family.KV]:.3g} conv/s by KV ({o.kv_capacity_tokens:,} tokens) and "
            f"{caps[ilp.Family.TBT]:.3g} conv/s at the {o.tau_s * 1e3:.1f} ms decode-step target (batch <= "
            f"{o.batch_max:.0f}); {ilp.FAMILY_TEXT[binding]} limits it. Planned "
            f"{p.arrival_rate_per_s:.3g} conv/s "
            f"-> batch {p.batch:.1f}, step {p.step_s * 1e3:.1f} ms, KV occupancy {p.kv_occupancy:.0%}, "
            f"{p.watts / max(p.instances, 1):.0f} W each."
        )
    n_pre = sum(p.instances for p in pre if p.option.role == "prefill")
    n_dec = sum(p.instances for p in dec if p.option.role == "decode")
    if n_pre or n_dec:
        notes.append(
            f"Chosen: {n_pre} prefill + {n_dec} decode instance(s) for {lam:.4g} conv/s: the proven optimum "
            f"({r.solution.solver}) of the ILP over {len(r.options)} instance shapes x {r.levels_tried} "
            f"(serving mode, decode-step level) candidates (decode-step target {r.tau_s * 1e3:.1f} ms)."
        )
    dec_tiers = {p.option.tier for p in dec}
    caps_tried = {o.power_cap_w for o in r.options if o.does_decode and o.tier in dec_tiers}
    if len(caps_tried) > 1:
        used = sorted({p.option.power_cap_w for p in dec})
        note = f"Decoder power caps allowed {sorted(caps_tried)} W; the plan uses {used} W."
        low = min(caps_tried)
        demand = _demand_like(ws)
        for p in dec:
            if p.instances <= 0 or p.batch <= 0:
                continue
            m = p.option.model
            uncapped = replace(m, power_cap_w=None) if m.power_cap_w is not None else m
            draw_tdp = ilp.decode_power_at_w(uncapped, demand, p.batch)
            step_tdp = ilp.decode_step_s(uncapped, demand, p.batch, p.option.role == "colocated")
            if draw_tdp <= low:
                note += (
                    f" At the planned batch ({p.batch:.1f}) an uncapped {p.option.tier} decoder draws "
                    f"{draw_tdp:.0f} W (tier model, {p.batch:.1f} x {demand.decode_context_tokens:,.0f} "
                    f"resident KV tokens), below the lowest cap ({low:g} W): caps change neither speed nor "
                    "power there."
                )
            elif m.power_cap_w is not None:
                slow = p.step_s / step_tdp - 1.0 if step_tdp > 0 else 0.0
                note += (
                    f" At the planned batch ({p.batch:.1f} x {demand.decode_context_tokens:,.0f} resident "
                    f"KV tokens) an uncapped {p.option.tier} decoder would draw {draw_tdp:.0f} W; at "
                    f"{m.power_cap_w:g} W it draws {p.watts / p.instances:.0f} W while its memory-bound step "
                    f"slows by only {slow:+.1%}."
                )
            else:
                note += (
                    f" At the planned batch an uncapped {p.option.tier} decoder draws {draw_tdp:.0f} W; "
                    "the capped shapes would not sustain the planned load or would cost more here."
                )
        notes.append(note)
    if r.threshold_tokens:
        below = sum(1 for x in ws.turn1_input_tokens_quantiles if x < r.threshold_tokens)
        notes.append(
            f"ConServe local-prefill threshold (hybrid mode): turn-1 inputs under {r.threshold_tokens:,} "
            f"tokens (about {below}% of this workload's turn-1 prompts) prefill on their decoder, the rest "
            "on a prefiller; the pools above are sized for that split (prefill pools carry the longer "
            "prompts only; decoders carry the short prefills as chunked prefill in their steps)."
        )
    notes.append("All figures are modelled (tier roofline + power model + queueing), not measured.")
    return notes


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


def _demand_like(ws: WorkloadStats) -> ilp.Demand:
    return demand_from_stats(ws)


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


__all__ = [
    "mode_plan",
    "modes_json",
    "PlanRun",
    "caps_comparison",
    "best_homogeneous",
    "compare_homogeneous",
    "demand_from_stats",
    "fleet_stats",
    "make_plan",
    "slo_from_config",
    "tier_supplies",
    "tightened_slo",
]
