"""A solved plan as an orchestrator.fleet.Plan: pools, predictions, and the sentences that explain it
(serving mode, prefill and decode pools, power caps, the hybrid threshold)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from orchestrator.config import FleetConfig
from orchestrator.fleet import Plan, PlanPredictions, Pool
from orchestrator.planner.inputs import _demand_like
from orchestrator.workload import WorkloadStats
from placement import ilp


@dataclass(frozen=True, slots=True)
class PlanRun:
    """A plan together with what produced it (for the CLI's tables and --json)."""

    plan: Plan
    result: ilp.PlanResult
    stats: WorkloadStats
    settings: ilp.Settings
    modes: tuple[ilp.ModeOutcome, ...] = ()  # the best plan of each serving mode (why this mode)
    overload: str = ""  # a finite run above capacity: the steady-state diagnosis at the requested rate


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
            f"{caps[ilp.Family.TBT]:.3g} conv/s at the {o.tau_s * 1e3:.1f} ms decode-step target (its "
            f"batch law's mean step; a steady batch would reach it at {o.batch_max:.0f}); "
            f"{ilp.FAMILY_TEXT[binding]} limits it. Planned "
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
