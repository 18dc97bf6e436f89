"""Finite runs above the steady-state capacity: the plan for the run and the fluid backlog figures."""

from __future__ import annotations

from dataclasses import replace

from orchestrator.config import FleetConfig
from orchestrator.fleet import FiniteRun, Plan
from orchestrator.planner.inputs import _highest_rate
from placement import ilp
from placement.errors import PlanningError

# Finite runs above capacity: the plan trades at most this share of the highest sustainable rate for lower
# energy (a 1% lower rate lengthens the drain by ~1%; on the paper's A40 fleet it lets the decoders run at the
# 200 W cap, whose memory-bound steps are 0.4% slower). A planning choice, not a measured constant.
BURST_RATE_TOLERANCE = 0.01
# how the sentence on the chosen split starts, and where its steady-state diagnosis starts (finite.py
# replaces the first part when the verification chose the plan by simulating the run)
SPLIT_NOTE = "Split chosen for the run: "
DIAGNOSIS_NOTE = " Steady-state diagnosis: "


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
    return result, burst_of(result, supplies, demand, settings, conversations, top, cfg.slo.percentile)


def burst_of(
    result: ilp.PlanResult,
    supplies: list[ilp.TierSupply],
    demand: ilp.Demand,
    settings: ilp.Settings,
    conversations: int,
    sustainable: float,
    percentile: float,
) -> ilp.Burst:
    """The fluid backlog estimate of a finite run at demand's rate on `result`'s instances: at the rate those
    instances sustain (an LP; at least the rate they were planned at)."""
    planned = replace(demand, arrival_rate_per_s=result.tokens_per_s / demand.tokens_per_conversation)
    mu = ilp.max_rate_of_counts(result.options, result.solution.counts, supplies, planned, settings)
    mu = max(mu, planned.arrival_rate_per_s)
    return ilp.burst(conversations, demand.arrival_rate_per_s, mu, sustainable, percentile)


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
        f"{SPLIT_NOTE}the highest rate within the SLOs (shortest backlog), then least energy within "
        f"{100 * BURST_RATE_TOLERANCE:g}% of that rate.{DIAGNOSIS_NOTE}{diagnosis}",
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
