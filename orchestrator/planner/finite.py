"""Candidate plans for a finite run above the steady-state capacity (the ILP side; no simulation here).

`plan_burst` (burst.py) plans such a run on the split with the most modelled capacity: the fluid model says
the run's backlog is shortest there. That model assumes the decoders' batch reaches its steady state; a run
of a few hundred conversations is shorter than a few relaxation times of the batch (tau_c, docs/planning.md),
so on examples/paper-a40.yaml at 1 conv/s the 255-conversation run holds the SLO on cheaper fleets the model
rates over capacity. So the planner offers candidates and the verification step (orchestrator.finite_run)
simulates the finite run on each and keeps the least energy that holds:

- the fluid model's plan (plan_burst's, first);
- per serving mode, the least-energy plan at FINITE_CANDIDATE_FRACTIONS of the highest rate that mode
  sustains in the model (lower planned rates let the ILP choose lower power caps and fewer instances).

Duplicates (the same instances, caps and hybrid threshold) are dropped. Every candidate carries the fluid
finite-run figures of its own instances (plan.finite_run), all modelled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from orchestrator.config import FleetConfig
from orchestrator.planner.burst import DIAGNOSIS_NOTE, SPLIT_NOTE, burst_of
from orchestrator.planner.inputs import _highest_rate, demand_from_stats, slo_from_config, tier_supplies
from orchestrator.planner.report import PlanRun, mode_note
from orchestrator.planner.run import finish_plan
from placement import ilp
from placement.errors import PlanningError

# Fractions of each mode's modelled highest rate at which a candidate is planned. 0.99 is plan_burst's own
# (BURST_RATE_TOLERANCE); the lower ones reach the cheaper shapes (on examples/paper-a40.yaml: colocated at
# the 200 W cap from 0.95, a 200 W prefiller from 0.95 in hybrid mode, 3 colocated GPUs at 0.7). A planning
# choice, not a measured constant: each costs one ILP solve and, if new, one simulated finite run per seed.
FINITE_CANDIDATE_FRACTIONS = (0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


@dataclass(frozen=True, slots=True)
class FiniteCandidate:
    """One plan for a finite run: its PlanRun (plan.finite_run set), the mode it was planned in, and the
    rate it was planned at as a fraction of that mode's modelled highest rate (None: plan_burst's plan)."""

    run: PlanRun
    mode: str
    fraction: float | None
    mode_rate_per_s: float  # the mode's modelled highest rate (conv/s)

    @property
    def fluid_pick(self) -> bool:
        return self.fraction is None


def signature(run: PlanRun) -> tuple[object, ...]:
    """What a simulation of the plan depends on: its instances, caps and hybrid threshold."""
    pools = tuple(sorted((p.tier, p.role, p.instances, p.power_cap_w, p.tp) for p in run.plan.pools))
    return (pools, run.plan.predictions.conserve_threshold_tokens)


def finite_candidates(
    cfg: FleetConfig,
    run: PlanRun,
    fractions: tuple[float, ...] = FINITE_CANDIDATE_FRACTIONS,
    fleet_file: str | None = None,
) -> list[FiniteCandidate]:
    """The candidates for `run`, make_plan's plan of a finite run above capacity (module docstring).

    Raises PlanningError when `run` is not such a plan. Candidates are assembled without the per-mode
    comparison (with_mode_comparison adds it to the one chosen).
    """
    fr = run.plan.finite_run
    if fr is None or not run.overload:
        raise PlanningError(
            "internal: finite-run candidates need a plan of a finite run above capacity. To fix: report this."
        )
    supplies = tier_supplies(cfg)
    demand = demand_from_stats(run.stats)  # at the requested rate
    slo = slo_from_config(cfg)
    settings = run.settings
    out = [FiniteCandidate(run, run.result.mode, None, fr.sustainable_rate_per_s)]
    seen = {signature(run)}
    for mode in settings.modes:
        only = replace(settings, modes=(mode,))
        try:
            ref, top = _highest_rate(cfg, supplies, demand, slo, only)
        except PlanningError:
            continue  # the mode has no shape within the SLOs (or the fleet's roles rule it out)
        for f in fractions:
            t0 = time.perf_counter()
            try:
                result = ilp.plan_with_reference(
                    supplies, replace(demand, arrival_rate_per_s=top * f), slo, only, ref
                )
            except PlanningError:
                continue
            top_run = fr.sustainable_rate_per_s
            b = burst_of(result, supplies, demand, only, fr.conversations, top_run, cfg.slo.percentile)
            cand = finish_plan(
                cfg, result, settings, run.stats, supplies, demand, slo, time.perf_counter() - t0,
                run.plan.fleet_file or fleet_file, (b, run.overload), compare_modes=False,
            )  # fmt: skip
            sig = signature(cand)
            if sig in seen:
                continue
            seen.add(sig)
            out.append(FiniteCandidate(cand, mode, f, top))
    return out


def with_choice_note(run: PlanRun, sentence: str) -> PlanRun:
    """`run` with burst.py's sentence on how the split was chosen replaced by `sentence` (the steady-state
    diagnosis it ends with is kept)."""
    notes = []
    for n in run.plan.notes:
        if n.startswith(SPLIT_NOTE) and DIAGNOSIS_NOTE in n:
            n = sentence + DIAGNOSIS_NOTE + n.split(DIAGNOSIS_NOTE, 1)[1]
        notes.append(n)
    return replace(run, plan=replace(run.plan, notes=tuple(notes)))


def with_mode_comparison(cfg: FleetConfig, run: PlanRun) -> PlanRun:
    """`run` with the best plan of each serving mode at its planned rate (as make_plan adds it)."""
    if run.modes or len(run.settings.modes) < 2:
        return run
    demand = demand_from_stats(replace(run.stats, arrival_rate_per_s=run.plan.predictions.arrival_rate_per_s))
    supplies, slo = tier_supplies(cfg), slo_from_config(cfg)
    outcomes = tuple(ilp.best_per_mode(supplies, demand, slo, run.settings, run.result.reference))
    why = mode_note(run.result, outcomes, run.settings.objective.value)
    notes = run.plan.notes
    if why:  # after the finite-run sentences, which lead
        k = sum(1 for n in notes if n.startswith(("OVERLOAD", "Finite run", SPLIT_NOTE, "Why this split")))
        notes = (*notes[:k], why, *notes[k:])
    return replace(run, plan=replace(run.plan, notes=notes), modes=outcomes)


__all__ = [
    "FINITE_CANDIDATE_FRACTIONS",
    "FiniteCandidate",
    "finite_candidates",
    "signature",
    "with_choice_note",
    "with_mode_comparison",
]
