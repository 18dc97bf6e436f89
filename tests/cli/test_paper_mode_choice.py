"""The planner's serving mode on the paper's testbed against the simulator (issue 12, acceptance item 1).

examples/paper-a40.yaml opens every mode (prefill/decode pools, hybrid, colocated instances);
examples/paper-a40-disagg.yaml is the same testbed with the paper's two roles. The planner (modelled):

- 0.5 conv/s: hybrid, 1 prefiller at 300 W + 1 at 200 W + 2 decoders at 200 W, turn-1 prompts under 13,264
  tokens prefilled on their decoder: 596 W; disaggregated 601 W; colocated 655 W (3 GPUs).
- 1 and 1.634 conv/s: every mode is over its steady-state capacity (disaggregated 0.746, hybrid 0.7765,
  colocated 0.894 conv/s; 0.8229 before its turn-1 prefill was exogenous), so the plan is for the finite
  run. With --no-verify (modelled only) it is the fluid backlog model's pick: colocated, 4 A40 at 300 W,
  planned at 0.8851 (0.8147 before). Verified (the default), the
  planner simulates the finite run on candidate plans and keeps the least energy that holds the SLO
  (orchestrator.finite_run): at 1 conv/s hybrid, 1 prefiller + 3 decoders at 200 W, turn-1 prompts under
  14,608 tokens local (0% at 70.59 / 73.01 / 71.32 tokens/J); at 1.634 none holds and the fewest violations
  are the fluid model's pick's.

The simulator (honest clock, the file's 255 conversations, seeds 0-2; SLO violations % per seed, tokens/J):

- 1.634 conv/s: colocated on the planned fleet 7.1 / 34.9 / 34.5 (mean 25.5), against ConServe on the
  paper's 1 prefiller + 3 decoders at 300 W 33.7 / 38.8 / 41.6 (38.0), and on paper-a40-disagg.yaml's plan
  (1 prefiller at 300 W + 3 decoders at 200 W, hybrid) conserve 36.1 / 43.5 / 45.9 (41.8), conserve-adaptive
  34.5 / 42.7 / 40.0 (39.1): colocated has fewer violations on every seed, as the planner chose.
- 0.5 conv/s: conserve on the planner's hybrid fleet 0 / 0 / 0 % at 54.78 / 56.44 / 58.03 tokens/J, colocated
  instances on the same 4 GPUs 0 % at 44.86 / 47.24 / 47.61 (300 W) and 46.52 / 50.32 / 50.33 (200 W).
- 1 conv/s: the fluid model's colocated at 300 W 0 % at 58.98 / 59.40 / 60.45 tokens/J, conserve on
  paper-a40-disagg.yaml's plan 0 % at 69.12 / 69.78 / 69.94, colocated at 200 W 0 / 0 / 0.4 % at 67.84 /
  70.38 / 70.87: the finite run holds on fleets the steady-state model rates over capacity, and the verified
  plan (conserve on it: 0 % at 70.59 / 73.01 / 71.32) beats them all on tokens/J.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from typer.testing import CliRunner

from orchestrator.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "examples" / "paper-a40.yaml"
PAPER_DISAGG = REPO / "examples" / "paper-a40-disagg.yaml"
SEEDS = (0, 1, 2)


def _json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") :])


def _plan(fleet: Path, rate: float, out: Path | None = None) -> dict:
    args = ["plan", "--fleet", str(fleet), "--rate", str(rate), "--json", "--no-verify"]
    res = runner.invoke(app, [*args, "--out", str(out)] if out is not None else args)
    assert res.exit_code == 0, res.output
    return _json(res.stdout)


def _sim(fleet: Path, policy: str, rate: float, *where: str) -> list[tuple[float, float]]:
    """(SLO violation %, tokens/J) per seed of `compare` for one policy at one rate."""
    out = []
    for seed in SEEDS:
        args = ["compare", "--fleet", str(fleet), "--policies", policy, "--rates", str(rate)]
        res = runner.invoke(app, [*args, "--seed", str(seed), "--json", *where])
        assert res.exit_code == 0, res.output
        (run,) = _json(res.stdout)["runs"]
        out.append((run["summary"]["slo_violation_pct"], run["summary"]["tokens_per_j"]))
    return out


def _modes(doc: dict) -> dict[str, dict]:
    return {m["mode"]: m for m in doc["modes"]}


def test_the_planner_picks_hybrid_at_half_and_colocated_above_capacity(shared_data: Path) -> None:
    low = _plan(PAPER, 0.5)
    assert low["serving_mode"] == "hybrid"
    modes = _modes(low)
    assert all(m["feasible"] for m in modes.values())  # colocated rated, not ruled out by the fleet's roles
    assert modes["hybrid"]["watts_total"] < modes["disaggregated"]["watts_total"]
    assert modes["hybrid"]["watts_total"] < modes["colocated"]["watts_total"]
    assert low["plan"]["predictions"]["conserve_threshold_tokens"] > 0
    for rate in (1.0, 1.634):
        doc = _plan(PAPER, rate)
        assert doc["serving_mode"] == "colocated", rate
        pools = doc["plan"]["pools"]
        assert {p["role"] for p in pools} == {"colocated"}
        assert sum(p["instances"] for p in pools) == 4 and {p["power_cap_w"] for p in pools} == {300}
        fr = doc["plan"]["finite_run"]
        assert fr is not None and fr["requested_rate_per_s"] == rate  # over steady-state capacity
        planned = doc["plan"]["predictions"]["arrival_rate_per_s"]
        for name in ("disaggregated", "hybrid"):  # each sustains less than the colocated plan's rate
            m = _modes(doc)[name]
            assert not m["feasible"] and "sustains at most" in m["reason"], m
            assert float(m["reason"].split("sustains at most ")[1].split()[0]) < planned


def test_the_simulator_agrees_colocated_wins_at_the_paper_rate(shared_data: Path, tmp_path: Path) -> None:
    plan = tmp_path / "colocated.yaml"
    assert _plan(PAPER, 1.634, plan)["serving_mode"] == "colocated"
    disagg = tmp_path / "disagg.yaml"
    _plan(PAPER_DISAGG, 1.634, disagg)
    colo = _sim(PAPER, "colocated", 1.634, "--plan", str(plan))
    rivals = {
        "conserve, paper's 1+3": _sim(PAPER, "conserve", 1.634, "--layout", "prefill=1,decode=3"),
        "conserve, disagg plan": _sim(PAPER_DISAGG, "conserve", 1.634, "--plan", str(disagg)),
        "conserve-adaptive, disagg plan": _sim(
            PAPER_DISAGG, "conserve-adaptive", 1.634, "--plan", str(disagg)
        ),
    }
    for name, runs in rivals.items():
        for seed, (c, r) in zip(SEEDS, zip(colo, runs, strict=True), strict=True):
            assert c[0] < r[0], (name, seed, colo, runs)  # fewer violations on every seed
        assert statistics.fmean(v for v, _ in colo) + 5 < statistics.fmean(v for v, _ in runs), (name, colo)


def test_the_simulator_agrees_hybrid_wins_at_half(shared_data: Path, tmp_path: Path) -> None:
    plan = tmp_path / "hybrid.yaml"
    assert _plan(PAPER, 0.5, plan)["serving_mode"] == "hybrid"
    ours = _sim(PAPER, "conserve", 0.5, "--plan", str(plan))
    for cap in ("", "@200"):  # colocated instances on the same 4 GPUs, at TDP and at the 200 W cap
        colo = _sim(PAPER, "colocated", 0.5, "--colocated-layout", f"colocated=4{cap}")
        for (v, t), (cv, ct) in zip(ours, colo, strict=True):
            assert v <= cv + 1.0 and t > 1.05 * ct, (cap, ours, colo)


def _plan_verified(fleet: Path, rate: float, out: Path) -> dict:
    """The plan as `orchestrator plan` makes it by default: verified in the simulator (seeds 0-2)."""
    args = ["plan", "--fleet", str(fleet), "--rate", str(rate), "--json", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return _json(res.stdout)


def _sim_plan(doc: dict, plan: Path, rate: float) -> list[tuple[float, float]]:
    """Simulate a plan with the policy that runs it: colocated instances at the plan's caps, else conserve
    with the plan's local-prefill threshold (compare applies it from --plan)."""
    pools = doc["plan"]["pools"]
    if {p["role"] for p in pools} == {"colocated"}:
        layout = ",".join(f"{p['tier']}.colocated={p['instances']}@{p['power_cap_w']:g}" for p in pools)
        return _sim(PAPER, "colocated", rate, "--colocated-layout", layout)
    return _sim(PAPER, "conserve", rate, "--plan", str(plan))


def test_the_planner_choice_at_one_conv_s_is_the_simulated_winner(shared_data: Path, tmp_path: Path) -> None:
    """At 1 conv/s (over every mode's modelled capacity) the verified plan is the simulated winner on the
    SLO, then tokens/J (seeds 0-2), against the fluid model's pick (colocated at 300 W), ConServe on the
    paper's roles' plan and colocated instances at 200 W. Was a strict xfail while the planner kept the
    fluid model's pick (59.0-60.5 tokens/J vs 69.1-69.9 on the disaggregated fleet)."""
    plan = tmp_path / "chosen.yaml"
    doc = _plan_verified(PAPER, 1.0, plan)
    assert doc["plan"]["finite_run"]["requested_rate_per_s"] == 1.0  # still planned for the finite run
    assert doc["finite_run_choice"] is not None
    chosen = _sim_plan(doc, plan, 1.0)
    fluid = tmp_path / "fluid.yaml"
    assert _plan(PAPER, 1.0, fluid)["serving_mode"] == "colocated"  # --no-verify: the fluid model's pick
    disagg = tmp_path / "disagg.yaml"
    _plan(PAPER_DISAGG, 1.0, disagg)
    rivals = {
        "colocated at 300 W, the fluid model's pick": _sim(PAPER, "colocated", 1.0, "--plan", str(fluid)),
        "conserve, disagg plan": _sim(PAPER_DISAGG, "conserve", 1.0, "--plan", str(disagg)),
        "colocated at 200 W": _sim(PAPER, "colocated", 1.0, "--colocated-layout", "colocated=4@200"),
    }
    viol, tpj = statistics.fmean(v for v, _ in chosen), statistics.fmean(t for _, t in chosen)
    assert viol <= 100 - 95, chosen  # holds the finite run within the p95 allowance
    for name, runs in rivals.items():
        assert viol <= statistics.fmean(v for v, _ in runs) + 1.0, (name, chosen, runs)  # same SLO or better
        assert tpj >= statistics.fmean(t for _, t in runs), (name, chosen, runs)  # then more tokens/J
