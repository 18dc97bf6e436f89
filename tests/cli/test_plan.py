"""`orchestrator plan` through Typer's CliRunner: exit codes, one-line errors, --json, --out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.fleet import load_plan

runner = CliRunner()


def _run(*args: str):  # noqa: ANN202
    return runner.invoke(app, ["plan", *args])


@pytest.fixture(scope="module")
def example_json(repo_root: Path) -> dict:
    # --no-verify: these tests check the ILP's modelled plan; the verification loop has its own tests
    fleet = str(repo_root / "examples" / "fleet.yaml")
    res = _run("--fleet", fleet, "--json", "--compare-homogeneous", "--no-verify")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_example_plan_shape(example_json: dict, repo_root: Path) -> None:
    plan = example_json["plan"]
    pre = {p["tier"] for p in plan["pools"] if p["role"] == "prefill" and p["instances"] > 0}
    dec = {p["tier"] for p in plan["pools"] if p["role"] == "decode" and p["instances"] > 0}
    # Decode goes to the memory-rich tier (most KV per GPU).
    assert dec == {"h200"}
    assert pre and pre <= {"h200", "h100", "l4"}
    assert plan["status"] == "optimal"
    assert plan["predictions"]["gpus_used"] <= plan["predictions"]["gpus_available"]
    # The prefill side is the ILP's least-energy choice under the per-conversation TTFET model (queueing
    # decides how many instances a tier needs, not only its joules per prefill): taking the chosen prefill
    # tier(s) away never gives a plan that draws less.
    from orchestrator.config import load_fleet
    from orchestrator.planner import make_plan

    cfg = load_fleet(repo_root / "examples" / "fleet.yaml")
    without = [t if t.name not in pre else t.model_copy(update={"roles": ["decode"]}) for t in cfg.tiers]
    alt = make_plan(cfg.model_copy(update={"tiers": without}))
    assert alt.plan.predictions.watts_total >= plan["predictions"]["watts_total"] - 1e-6


@pytest.mark.xfail(
    strict=True,
    reason=(
        "with the per-conversation SLO model and the hybrid mode the least-energy plan of "
        "examples/fleet.yaml uses h200 only (1 prefill @500 W + 4 hybrid decoders @500 W, 2,378 W, "
        "302.75 tokens/J, modelled), "
        "which the all-h200 single-tier plan matches exactly (302.75): the heterogeneous fleet no longer "
        "beats it on this workload. Not a planner defect: h200 is the cheapest tier for every role (prefill "
        "150.9 J at 500 W vs 160.1 J on h100 at 700 W; decoder 470.5 W + 29.8 J/conv for 1.12 conv/s vs "
        "h100's 515.2 W + 123.8 J for 0.725; L4 cannot serve: 3.16 s mean prefill misses the TTFET bounds, "
        "37.1 ms decode step > 14.7 ms target) and the plan needs 5 of its 8 GPUs (docs/planning.md)"
    ),
)
def test_example_beats_best_homogeneous(example_json: dict) -> None:
    best = example_json["best_homogeneous"]
    assert best is not None
    homog = next(h for h in example_json["homogeneous"] if h["tier"] == best)
    assert example_json["plan"]["predictions"]["tokens_per_j"] > homog["plan"]["predictions"]["tokens_per_j"]
    # same GPU budget
    assert (
        homog["plan"]["predictions"]["gpus_available"]
        == example_json["plan"]["predictions"]["gpus_available"]
    )


def test_table_output_and_out_file(repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.yaml"
    res = _run("--fleet", str(repo_root / "examples" / "fleet.yaml"), "--out", str(out), "--no-verify")
    assert res.exit_code == 0, res.output
    assert "tokens/J (modelled)" in res.stdout and "Pools" in res.stdout
    assert load_plan(out).status == "optimal"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--fleet", "/nonexistent/fleet.yaml"], "does not exist"),
        (["--solver", "gurobi"], "--solver 'gurobi' is not known"),
        (["--time-limit", "0"], "--time-limit must be > 0"),
        (["--rate", "1", "--max-rate"], "exclude each other"),
        (["--rate", "-1"], "--rate must be > 0"),
    ],
    ids=["missing-file", "bad-solver", "bad-limit", "rate-conflict", "bad-rate"],
)
def test_errors_are_one_line_exit_1(repo_root: Path, args: list[str], match: str) -> None:
    if "--fleet" not in args:
        args = ["--fleet", str(repo_root / "examples" / "fleet.yaml"), *args]
    res = _run(*args)
    assert res.exit_code == 1
    err = res.stderr.strip()
    assert match in err.replace("\n", " ")
    assert "Traceback" not in res.output


def test_infeasible_fleet_exit_1_with_diagnosis(tmp_path: Path) -> None:
    f = tmp_path / "fleet.yaml"
    # no workload.conversations: a steady stream, which an overloaded fleet cannot serve
    f.write_text(
        "model: Qwen3-0.6B\ntiers: [{name: a40, gpu: A40, count: 2}]\nworkload: {arrival_rate_per_s: 5.0}\n"
    )
    res = _run("--fleet", str(f))
    assert res.exit_code == 1
    assert "To fix: add" in res.stderr and "short by" in res.stderr
    res = _run("--fleet", str(f), "--max-rate", "--json", "--no-verify")
    assert res.exit_code == 0, res.output
    assert 0 < json.loads(res.stdout)["plan"]["predictions"]["arrival_rate_per_s"] < 5.0


def test_paper_example(repo_root: Path, shared_data: Path) -> None:
    """The paper's 4 x A40 at 1.634 conv/s: a finite burst above the modelled steady-state capacity.

    Among prefill/decode pools (the paper's design space, --modes disaggregated) the planner finds the
    paper's 1 + 3 split with 200 W decoders, on examples/paper-a40-disagg.yaml (the paper's two roles).
    examples/paper-a40.yaml opens every mode and the planner chooses colocated there (it wins on the honest
    clock, DESIGN.md section 1): tests/cli/test_plan_modes.py and tests/cli/test_paper_mode_choice.py."""
    fleet = str(repo_root / "examples" / "paper-a40-disagg.yaml")
    res = _run("--fleet", fleet, "--json", "--no-verify", "--modes", "disaggregated")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    plan = doc["plan"]
    pools = plan["pools"]
    n_pre = sum(p["instances"] for p in pools if p["role"] == "prefill")
    n_dec = sum(p["instances"] for p in pools if p["role"] == "decode")
    assert (n_pre, n_dec) == (1, 3)  # the paper's split
    fr = plan["finite_run"]
    assert fr is not None and fr["conversations"] == 255 and fr["requested_rate_per_s"] == 1.634
    assert fr["excess_pct"] > 0 and fr["backlog_conversations"] > 0
    assert plan["predictions"]["arrival_rate_per_s"] < 1.634
    notes = " ".join(plan["notes"])
    assert plan["notes"][0].startswith("OVERLOAD")
    assert "1 prefill + 3 decode" in notes and "(chosen)" in notes
    # the split's explanation ranks 1 + 3 above the others
    assert "2 prefill + 2 decode" in notes
    # 200 W decoder caps: the plan uses them and they lower predicted watts at the same rate
    assert {p["power_cap_w"] for p in pools if p["role"] == "decode"} == {200.0}
    caps = doc["caps_comparison"]
    assert caps["watts_total_decoders_at_tdp"] > caps["watts_total"]
    assert caps["watts_saved_by_decoder_caps"] > 0
    # --max-rate still plans the steady-state maximum, with the same split
    res = _run("--fleet", fleet, "--max-rate", "--json", "--no-verify", "--modes", "disaggregated")
    assert res.exit_code == 0, res.output
    mr = json.loads(res.stdout)["plan"]
    assert mr["finite_run"] is None
    assert sum(p["instances"] for p in mr["pools"] if p["role"] == "decode") == 3


def _small_fleet(tmp_path: Path, conversations: int | None, rate: float, count: int = 2) -> Path:
    f = tmp_path / "fleet.yaml"
    conv = f"conversations: {conversations}, " if conversations is not None else ""
    f.write_text(
        f"model: Qwen3-0.6B\ntiers: [{{name: a40, gpu: A40, count: {count}, power_caps_w: [300, 200]}}]\n"
        f"workload: {{{conv}arrival_rate_per_s: {rate}, synthetic: {{turn1_input_tokens_median: 8000, "
        "turns_mean: 4}}\n"
    )
    return f


def test_finite_run_above_capacity_is_planned_with_a_prominent_overload(tmp_path: Path) -> None:
    f = _small_fleet(tmp_path, 60, 5.0)
    res = _run("--fleet", str(f), "--json", "--no-verify")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)["plan"]
    fr = plan["finite_run"]
    assert fr["requested_rate_per_s"] == 5.0 and fr["conversations"] == 60
    assert 0 < fr["plan_rate_per_s"] < 5.0 and fr["sustainable_rate_per_s"] >= fr["plan_rate_per_s"] * 0.98
    assert fr["excess_pct"] == pytest.approx(100 * (5.0 / fr["plan_rate_per_s"] - 1), rel=1e-3)
    assert fr["makespan_s"] == pytest.approx(fr["arrival_span_s"] + fr["drain_s"], rel=1e-3)
    assert fr["ttfet_p95_run_s"] > plan["predictions"]["ttfet_p95_s"]
    assert plan["notes"][0].startswith("OVERLOAD")
    # the pools are sized for the plan's rate
    dec_rate = sum(p["arrival_rate_per_s"] for p in plan["pools"] if p["role"] != "prefill")
    assert dec_rate == pytest.approx(plan["predictions"]["arrival_rate_per_s"], rel=1e-4)
    # people see it before the table; the plan file keeps it
    out = tmp_path / "plan.yaml"
    res = _run("--fleet", str(f), "--out", str(out), "--no-verify")
    assert res.exit_code == 0, res.output
    assert "OVERLOAD" in res.stdout.split("Pools")[0]
    loaded = load_plan(out)
    assert loaded.finite_run is not None and loaded.finite_run.conversations == 60
    # the same rate as a steady stream (no workload.conversations) is infeasible: exit 1 with the diagnosis
    res = _run("--fleet", str(_small_fleet(tmp_path, None, 5.0)))
    assert res.exit_code == 1 and "short by" in res.stderr


def test_finite_run_within_capacity_has_no_overload(tmp_path: Path) -> None:
    res = _run("--fleet", str(_small_fleet(tmp_path, 40, 0.1)), "--json", "--no-verify")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)["plan"]
    assert plan["finite_run"] is None
    assert not any(n.startswith("OVERLOAD") for n in plan["notes"])


def test_validate_simulates_the_plan(tmp_path: Path) -> None:
    f = _small_fleet(tmp_path, 24, 0.1, count=3)
    res = _run("--fleet", str(f), "--validate", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["validated"] is True
    v = doc["validation"]
    # the verification simulates a steady stream of the file's conversations (at least its 24), 3 seeds
    assert v["conversations"] >= 24 and v["arrival_rate_per_s"] == pytest.approx(0.1)
    assert v["seeds"] == [0, 1, 2]
    m = v["metrics"]
    for key in ("p95 TTFET s", "p95 TTFET slowdown", "mean TBT ms", "tokens/J", "decode busy fraction"):
        assert m[key]["predicted"] is not None and m[key]["predicted"] > 0
        assert m[key]["simulated"] is not None and m[key]["simulated"] > 0
    assert m["tokens/J"]["predicted"] == doc["plan"]["predictions"]["tokens_per_j"]
    assert 0 <= v["slo_violation_pct"] <= 100
    res = _run("--fleet", str(f), "--validate")
    assert res.exit_code == 0, res.output
    assert "Verified in the simulator: predicted vs simulated" in res.stdout
