"""`--solver auto`: the rule measured by benchmarks/bench_solver.py (placement.ilp.resolve_solver), and what
each resolved choice hands to PuLP for LPs and MIPs. Speed itself is measured in BENCHMARKS.md, not here."""

from __future__ import annotations

import pulp
import pytest

from orchestrator.config import parse_fleet
from orchestrator.planner import tier_supplies
from placement import ilp

GPUS = ["H100-SXM", "H200-SXM", "B200", "A100-80GB-SXM", "L40S"]


def _fleet(n_tiers: int, gpus: int) -> list[ilp.TierSupply]:
    """n_tiers tiers, each 2 caps x TP {1, 2} x {prefill, decode} = 8 instance shapes, as the benchmark."""
    tiers = [
        {
            "name": f"t{i}",
            "gpu": GPUS[i % len(GPUS)],
            "count": gpus // n_tiers,
            "power_caps_w": [300, 250],
            "tp": [1, 2],
        }
        for i in range(n_tiers)
    ]
    return tier_supplies(parse_fleet({"model": "Llama-3.1-8B", "tiers": tiers}))


@pytest.mark.parametrize(
    ("n_tiers", "gpus", "mip"),
    [
        (2, 100, "highs"),  # 16 shapes, few GPUs: HiGHS in-process saves CBC's subprocess
        (2, 1000, "highs"),
        (2, 10_000, "cbc"),  # HiGHS 0.25 s vs CBC 0.04 s
        (10, 100, "cbc"),  # 80 shapes: HiGHS 2.4 s vs CBC 1.2 s (the old rule, by GPUs alone, chose HiGHS)
        (10, 1000, "cbc"),
        (10, 10_000, "cbc"),  # HiGHS 3.2 s, CBC 0.3 s
    ],
)
def test_auto_picks_the_measured_faster_mip_solver(n_tiers: int, gpus: int, mip: str) -> None:
    tiers = _fleet(n_tiers, gpus)
    assert ilp.instance_shapes(tiers) == 8 * n_tiers
    s = ilp.resolve_solver(ilp.Settings(solver="auto"), tiers)
    assert s.solver == f"auto:{mip}"
    assert isinstance(ilp._solver(s, mip=True), pulp.HiGHS if mip == "highs" else pulp.PULP_CBC_CMD)
    assert isinstance(ilp._solver(s, mip=False), pulp.HiGHS)  # LPs always in-process


@pytest.mark.parametrize("name", ["highs", "cbc"])
def test_an_explicit_solver_is_used_for_everything(name: str) -> None:
    s = ilp.resolve_solver(ilp.Settings(solver=name), _fleet(10, 10_000))
    kind = pulp.HiGHS if name == "highs" else pulp.PULP_CBC_CMD
    assert isinstance(ilp._solver(s, mip=True), kind) and isinstance(ilp._solver(s, mip=False), kind)


def test_auto_without_highspy_is_cbc(monkeypatch: pytest.MonkeyPatch) -> None:
    # resolve_solver and _solver look the probe up in the module that defines them
    monkeypatch.setattr(ilp.model, "_highs_available", lambda: False)
    s = ilp.resolve_solver(ilp.Settings(solver="auto"), _fleet(2, 100))
    assert s.solver == "cbc"
    assert isinstance(ilp._solver(s, mip=False), pulp.PULP_CBC_CMD)


def test_auto_plans_prove_the_same_optimum() -> None:
    from orchestrator.config import SyntheticWorkload
    from orchestrator.planner import demand_from_stats
    from orchestrator.workload import synthetic_conversations, workload_stats

    stats = workload_stats(synthetic_conversations(SyntheticWorkload(tool_gap_s_mean=2.0), 200, seed=0), 1.0)
    demand = demand_from_stats(stats)
    tiers = _fleet(3, 60)
    values = {
        name: ilp.plan(tiers, demand, ilp.Slo(), ilp.Settings(solver=name)).solution.objective_value
        for name in ("auto", "auto:cbc", "highs", "cbc")
    }
    assert max(values.values()) - min(values.values()) <= 1e-5 * max(values.values())
