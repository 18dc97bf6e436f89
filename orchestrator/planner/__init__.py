"""The `plan` job: fleet.yaml -> tier models -> workload statistics -> ILP (placement.ilp) -> Plan.

Glue only: the formulation and the queueing model live in placement/ilp/ (pure); this module reads the
config, builds the ILP's inputs, times the solve, and turns the result into an orchestrator.fleet.Plan with
sentences that explain it. Must not import fastapi, sqlalchemy or httpx.

Modules: inputs (fleet file -> the ILP's inputs), report (PlanResult -> Plan and its sentences), burst (finite
runs above capacity), run (make_plan and the comparisons built on it), finite (candidate plans for a finite
run above capacity, which orchestrator.finite_run simulates). Import from orchestrator.planner.
"""

from __future__ import annotations

from orchestrator.planner.burst import BURST_RATE_TOLERANCE, plan_burst, split_rates, with_finite_run
from orchestrator.planner.finite import (
    FINITE_CANDIDATE_FRACTIONS,
    FiniteCandidate,
    finite_candidates,
)
from orchestrator.planner.inputs import (
    SERVING_MODES,
    _demand_like,
    _highest_rate,
    _settings,
    demand_from_stats,
    fleet_stats,
    slo_from_config,
    tier_supplies,
    tightened_slo,
)
from orchestrator.planner.report import (
    MODE_TEXT,
    PlanRun,
    explain,
    mode_note,
    mode_plan,
    mode_text,
    modes_json,
    to_plan,
)
from orchestrator.planner.run import (
    _plan_with_reference,
    best_homogeneous,
    caps_comparison,
    compare_homogeneous,
    finish_plan,
    make_plan,
)

__all__ = [
    "BURST_RATE_TOLERANCE",
    "FINITE_CANDIDATE_FRACTIONS",
    "FiniteCandidate",
    "MODE_TEXT",
    "PlanRun",
    "SERVING_MODES",
    "_demand_like",
    "_highest_rate",
    "_plan_with_reference",
    "_settings",
    "best_homogeneous",
    "caps_comparison",
    "compare_homogeneous",
    "demand_from_stats",
    "explain",
    "finite_candidates",
    "finish_plan",
    "fleet_stats",
    "make_plan",
    "mode_note",
    "mode_plan",
    "mode_text",
    "modes_json",
    "plan_burst",
    "slo_from_config",
    "split_rates",
    "tier_supplies",
    "tightened_slo",
    "to_plan",
    "with_finite_run",
]
