"""The whole planning run: the best plan over variants and levels, its predictions, and the best plan per
serving mode (placement.ilp docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from placement.errors import PlanningError
from placement.ilp.capacity import max_rate_per_s
from placement.ilp.diagnosis import diagnose
from placement.ilp.model import resolve_solver
from placement.ilp.predict import PlanResult, _predict
from placement.ilp.search import _best, merge_identical_tiers, reference_for, split_merged, variants
from placement.ilp.values import Demand, Reference, Settings, Slo, TierSupply


def plan(
    tiers: Sequence[TierSupply],
    demand: Demand,
    slo: Slo,
    settings: Settings,
    reference_tier: str | None = None,
) -> PlanResult:
    """Plan the fleet: solve one ILP per decode level, keep the best proven optimum, predict its figures.

    Raises PlanningError with a diagnosis (which family binds, by how much, what would fix it) when no level
    is
    feasible.
    """
    if not tiers:
        raise PlanningError("the fleet has no tiers. To fix: list at least one tier.")
    return plan_with_reference(tiers, demand, slo, settings, reference_for(tiers, demand, reference_tier))


def plan_with_reference(
    tiers: Sequence[TierSupply], demand: Demand, slo: Slo, settings: Settings, ref: Reference
) -> PlanResult:
    """:func:`plan` with given standalone latencies (to compare fleets against one baseline)."""
    if demand.arrival_rate_per_s <= 0:
        raise PlanningError("arrival rate must be > 0. To fix: set workload.arrival_rate_per_s.")
    settings = resolve_solver(settings, tiers)
    merged, members = merge_identical_tiers(tiers)
    best = _best(merged, demand, slo, ref, settings)
    if best is None:
        d = diagnose(tiers, demand, slo, settings, ref)
        raise PlanningError(d.message)
    opts, sol = best.options, best.solution
    if len(merged) < len(tiers):
        opts, sol = split_merged(opts, sol, members)
    r = _predict(opts, sol, tiers, demand, slo, ref, best.tau_s, best.settings, best.levels)
    return replace(r, ilps_solved=best.ilps)


@dataclass(frozen=True, slots=True)
class ModeOutcome:
    """The best plan of one serving mode (modelled), or why there is none."""

    mode: str
    result: PlanResult | None
    reason: str = ""


_NOT_ALLOWED = {
    "colocated": "not considered: no tier lists `colocated` in its roles. To fix: add colocated to a tier's "
    "roles in the fleet file to let the planner compare it",
    "disaggregated": "not considered: it needs a tier with the `prefill` role and one with `decode`",
    "hybrid": "not considered: it needs a tier with the `prefill` role and one with `decode`",
}


def best_per_mode(
    tiers: Sequence[TierSupply], demand: Demand, slo: Slo, settings: Settings, ref: Reference
) -> list[ModeOutcome]:
    """For each mode of settings.modes, the least-objective plan of that mode alone (for the explanation)."""
    settings = resolve_solver(settings, tiers)
    merged, members = merge_identical_tiers(tiers)
    out: list[ModeOutcome] = []
    for mode in settings.modes:
        only = replace(settings, modes=(mode,))
        if not variants(merged, demand, only):  # the fleet's roles rule the mode out: nothing was sized
            out.append(ModeOutcome(mode, None, _NOT_ALLOWED.get(mode, "not allowed by the fleet's roles")))
            continue
        best = _best(merged, demand, slo, ref, only)
        if best is None:
            top = max_rate_per_s(tiers, demand, slo, only, ref)
            out.append(
                ModeOutcome(
                    mode,
                    None,
                    f"infeasible at {demand.arrival_rate_per_s:.4g} conv/s (this mode sustains at most "
                    f"{top:.4g} conv/s within the SLOs; modelled)",
                )
            )
            continue
        opts, sol = best.options, best.solution
        if len(merged) < len(tiers):
            opts, sol = split_merged(opts, sol, members)
        r = _predict(opts, sol, tiers, demand, slo, ref, best.tau_s, best.settings, best.levels)
        out.append(ModeOutcome(mode, r))
    return out
