"""The planner's inputs from a fleet file: workload statistics -> ilp.Demand, tiers -> ilp.TierSupply, the
SLO, the solver settings, and the highest rate the fleet sustains."""

from __future__ import annotations

from dataclasses import replace

from conserve.errors import ConServeError
from orchestrator.config import FleetConfig, Objective
from orchestrator.fleet import allowed_caps_w, tier_model
from orchestrator.workload import WorkloadStats, trace_timed, workload_from_config, workload_stats
from placement import ilp
from placement.errors import PlanningError


def tail_with_cached_outputs(
    tail_tokens: float, tail_context_tokens: float, outputs_before_final: float, later_turns: float
) -> tuple[float, float]:
    """(tokens, mean cached context) of the incremental prefills of turns 2..n when each turn's output is
    already in the prefix cache.

    ``workload_stats`` counts a later turn's incremental prefill as appended_k + out_{k-1} over a cached
    context of in_{k-1}. A serving engine keeps the KV of the whole finished turn, prompt and output: vLLM's
    prefix cache hashes the full blocks of the running sequence, generated tokens included, and the
    simulator caches prompt + output when a turn ends (orchestrator/sim/core.py, module docstring "Prefix
    cache"). So turn k prefills appended_k (plus the partial last block, < 16 tokens: left out) over a
    cached in_{k-1} + out_{k-1}: the tokens drop by sum_{k>=2} out_{k-1} = O_b (the outputs before the
    final turn) and the context grows by the mean previous output, O_b / Kn (the context is a token-weighted
    mean; weighting by appended_k instead of appended_k + out_{k-1} is approximated by that shift).
    Measured on examples/fleet-mooncake.yaml before this: the model priced 7,467 prefill tokens/s per
    colocated instance, the simulator ran 6,650 (the difference is the outputs, ~1,045 per conversation).
    """
    if later_turns <= 0 or tail_tokens <= 0:
        return tail_tokens, tail_context_tokens
    tokens = max(tail_tokens - outputs_before_final, 0.0)
    return tokens, tail_context_tokens + outputs_before_final / later_turns


def demand_from_stats(ws: WorkloadStats) -> ilp.Demand:
    tail, tail_ctx = tail_with_cached_outputs(
        ws.tail_prefill_tokens_mean,
        ws.tail_prefill_context_tokens_mean,
        ws.decode_tokens_before_final_mean,
        ws.later_turns_mean,
    )
    shapes = []
    for x in ws.conversation_shapes:
        c = ilp.ConvShape(*x)
        p_i, ctx_i = tail_with_cached_outputs(
            c.tail_tokens, c.tail_context_tokens, c.decode_before_final, c.later_turns
        )
        shapes.append(replace(c, tail_tokens=p_i, tail_context_tokens=ctx_i))
    return ilp.Demand(
        arrival_rate_per_s=ws.arrival_rate_per_s,
        turn1_input_tokens=ws.turn1_input_tokens_quantiles,
        decode_tokens=ws.decode_tokens_mean,
        decode_tokens_before_final=ws.decode_tokens_before_final_mean,
        later_turns=ws.later_turns_mean,
        tail_prefill_tokens=tail,
        tail_prefill_context_tokens=tail_ctx,
        kv_decode_token_steps=ws.kv_decode_token_steps_mean,
        kv_gap_token_seconds=ws.kv_gap_token_seconds_mean,
        tool_gap_s_total=ws.tool_gap_s_total_mean,
        final_context_tokens_max=ws.final_context_tokens_max,
        tokens_per_conversation=ws.tokens_per_conversation_mean,
        turn1_input_tokens_max=ws.turn1_input_tokens_max,
        shapes=tuple(shapes),
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
    return workload_stats(convs, None if trace_timed(cfg.workload) else cfg.workload.arrival_rate_per_s)


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


def _demand_like(ws: WorkloadStats) -> ilp.Demand:
    return demand_from_stats(ws)
