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
    res = _run("--fleet", str(repo_root / "examples" / "fleet.yaml"), "--json", "--compare-homogeneous")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_example_plan_shape(example_json: dict) -> None:
    plan = example_json["plan"]
    pre = {p["tier"] for p in plan["pools"] if p["role"] == "prefill" and p["instances"] > 0}
    dec = {p["tier"] for p in plan["pools"] if p["role"] == "decode" and p["instances"] > 0}
    # compute-heavy (highest FLOP/s per byte/s of memory bandwidth) = l4; memory-rich (most GB) = h200
    assert pre == {"l4"}
    assert dec == {"h200"}
    assert plan["status"] == "optimal"
    assert plan["predictions"]["gpus_used"] <= plan["predictions"]["gpus_available"]


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
    res = _run("--fleet", str(repo_root / "examples" / "fleet.yaml"), "--out", str(out))
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
    f.write_text(
        "model: Qwen3-0.6B\ntiers: [{name: a40, gpu: A40, count: 2}]\n"
        "workload: {conversations: 100, arrival_rate_per_s: 5.0}\n"
    )
    res = _run("--fleet", str(f))
    assert res.exit_code == 1
    assert "To fix: add" in res.stderr and "short by" in res.stderr
    res = _run("--fleet", str(f), "--max-rate", "--json")
    assert res.exit_code == 0, res.output
    assert 0 < json.loads(res.stdout)["plan"]["predictions"]["arrival_rate_per_s"] < 5.0


def test_paper_example(repo_root: Path, shared_data: Path) -> None:
    fleet = str(repo_root / "examples" / "paper-a40.yaml")
    res = _run("--fleet", fleet, "--max-rate", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    pools = doc["plan"]["pools"]
    n_pre = sum(p["instances"] for p in pools if p["role"] == "prefill")
    n_dec = sum(p["instances"] for p in pools if p["role"] == "decode")
    assert (n_pre, n_dec) == (1, 3)  # the paper's split
    assert any("Prefill on" in n for n in doc["plan"]["notes"])
    caps = doc["caps_comparison"]
    assert caps["watts_total"] <= caps["watts_total_tdp_only"]  # allowing caps never costs energy
