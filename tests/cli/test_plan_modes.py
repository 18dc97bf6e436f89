"""Every serving mode as a choice of the ILP: disaggregated, hybrid, colocated (issue 10 item 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import load_fleet
from orchestrator.planner import demand_from_stats, fleet_stats, make_plan, tier_supplies
from placement import ilp

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def _json(stdout: str) -> dict:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("{"))
    return json.loads("\n".join(lines[start:]))


def test_more_modes_never_cost_more() -> None:
    cfg = load_fleet(REPO / "examples" / "fleet.yaml")
    tiers = tier_supplies(cfg)
    demand = demand_from_stats(fleet_stats(cfg))
    slo = ilp.Slo()
    ref = ilp.reference_for(tiers, demand, cfg.reference_tier)
    s = ilp.Settings(unallocated="off")
    every = ilp.plan_with_reference(tiers, demand, slo, s, ref)
    for mode in ("disaggregated", "hybrid", "colocated"):
        try:
            one = ilp.plan_with_reference(
                tiers, demand, slo, ilp.Settings(unallocated="off", modes=(mode,)), ref
            )
        except ilp.PlanningError:
            continue
        assert every.solution.objective_value <= one.solution.objective_value + 1e-6
        assert one.mode == mode
        if mode == "colocated":
            assert {p.option.role for p in one.pools} == {"colocated"}
        else:
            assert {p.option.role for p in one.pools} <= {"prefill", "decode"}
        assert (one.threshold_tokens > 0) == (mode == "hybrid")


def test_hybrid_plan_sizes_the_prefill_pool_for_the_long_prompts_only() -> None:
    cfg = load_fleet(REPO / "examples" / "fleet.yaml")
    run = make_plan(cfg, modes=("hybrid",))
    r = run.result
    assert r.mode == "hybrid" and r.threshold_tokens > 0
    assert run.plan.predictions.conserve_threshold_tokens == r.threshold_tokens
    lam = run.plan.predictions.arrival_rate_per_s
    short = sum(1 for c in run.stats.conversation_shapes if c[0] < r.threshold_tokens)
    f = short / len(run.stats.conversation_shapes)
    pre = sum(p.arrival_rate_per_s for p in r.pools if p.option.role == "prefill")
    dec = sum(p.arrival_rate_per_s for p in r.pools if p.option.role == "decode")
    assert pre == pytest.approx((1 - f) * lam, rel=1e-6) and dec == pytest.approx(lam, rel=1e-6)
    assert all(p.option.local_tokens > 0 for p in r.pools if p.option.role == "decode")


def test_paper_fleet_chooses_a_mode_and_says_why(shared_data: Path) -> None:
    """examples/paper-a40.yaml opens every mode (examples/paper-a40-disagg.yaml keeps the paper's roles)."""
    res = runner.invoke(
        app, ["plan", "--fleet", str(REPO / "examples" / "paper-a40.yaml"), "--json", "--no-verify"]
    )
    assert res.exit_code == 0, res.output
    doc = _json(res.stdout)
    modes = {m["mode"]: m for m in doc["modes"]}
    assert set(modes) == {"disaggregated", "hybrid", "colocated"}
    chosen = [m for m in doc["modes"] if m["chosen"]]
    assert len(chosen) == 1 and chosen[0]["mode"] == doc["serving_mode"]
    roles = {p["role"] for p in doc["plan"]["pools"]}
    assert (roles == {"colocated"}) == (doc["serving_mode"] == "colocated")
    # on the honest clock colocated engines beat the paper's pools on this fleet (DESIGN.md section 1)
    assert doc["serving_mode"] == "colocated"
    for m in doc["modes"]:  # each mode: its watts and SLO figures, or why it has none
        assert (m["watts_total"] is not None) == m["feasible"]
        assert m["feasible"] or "sustains at most" in m["reason"]
    note = next(n for n in doc["plan"]["notes"] if n.startswith("Serving mode:"))
    assert "disaggregated" in note and "colocated" in note and "<- chosen" in note


def test_a_mode_the_fleet_roles_rule_out_is_named_not_rated_zero(shared_data: Path) -> None:
    """examples/paper-a40-disagg.yaml lists only prefill and decode roles (as the paper ran it): colocated is
    not sized at all, so the explanation says how to allow it instead of "sustains at most 0 conv/s"."""
    res = runner.invoke(
        app, ["plan", "--fleet", str(REPO / "examples" / "paper-a40-disagg.yaml"), "--json", "--no-verify"]
    )
    assert res.exit_code == 0, res.output
    modes = {m["mode"]: m for m in _json(res.stdout)["modes"]}
    assert not modes["colocated"]["feasible"]
    assert "no tier lists `colocated` in its roles" in modes["colocated"]["reason"]
    assert "sustains at most 0 " not in modes["colocated"]["reason"]
    assert modes["hybrid"]["feasible"] or "sustains at most" in modes["hybrid"]["reason"]


def test_compare_homogeneous_prints_the_best_colocated_plan() -> None:
    fleet = str(REPO / "examples" / "fleet.yaml")
    res = runner.invoke(app, ["plan", "--fleet", fleet, "--json", "--no-verify", "--compare-homogeneous"])
    assert res.exit_code == 0, res.output
    doc = _json(res.stdout)
    colo = doc["best_colocated"]
    assert colo is not None and {p["role"] for p in colo["pools"]} == {"colocated"}
    res = runner.invoke(app, ["plan", "--fleet", fleet, "--no-verify", "--compare-homogeneous"])
    assert res.exit_code == 0, res.output
    assert "Best colocated plan" in res.stdout


def test_unknown_mode_is_one_line() -> None:
    fleet = str(REPO / "examples" / "fleet.yaml")
    res = runner.invoke(app, ["plan", "--fleet", fleet, "--modes", "pipelined"])
    assert res.exit_code == 1
    assert "--modes" in res.stderr and "Traceback" not in res.output
