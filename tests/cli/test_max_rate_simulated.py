"""`plan --max-rate` against the simulator (issue 10 item 4): the planner's highest rate must be within 10% of
the highest rate at which the plan's instances sustain the SLO in simulation (orchestrator.sim_capacity: 3
seeds x 4,000 conversations, the SLO in each half of the steady window, so a transient does not count).

The simulated search used to run on the file's own stream (255 / 400 conversations) and read transients above
capacity as holding (paper-a40 1.198 conv/s, single-turn 14.79 conv/s); :func:`test_a_short_stream_hides_an_
overload_the_stability_check_sees` pins that. Where the planner is not within 10% the case is a strict xfail
whose reason carries the measured numbers (deterministic: fixed seeds); nothing here is tuned to the result.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import FleetConfig, load_fleet
from orchestrator.planner import make_plan
from orchestrator.sim_capacity import check_rate, highest_sustained_rate
from orchestrator.verify import validate_plan

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 0.10


def _fleet(name: str) -> FleetConfig:
    return load_fleet(REPO / "examples" / f"{name}.yaml")


@pytest.mark.parametrize(
    "name",
    [
        "paper-a40-disagg",  # the paper's two roles: hybrid, 1 prefiller + 3 decoders
        "paper-a40",  # every mode open: colocated, 4 A40 at 300 W
        "fleet-single-turn",  # colocated, 8 L40S at 350 W
        "fleet-llama8b-a100-l40s",
    ],
)
def test_max_rate_within_10pct_of_the_highest_sustained_rate(name: str, shared_data: Path) -> None:
    cfg = _fleet(name)
    run = make_plan(cfg, max_rate=True)
    top = run.plan.predictions.arrival_rate_per_s
    sim = highest_sustained_rate(cfg, run, time_budget_s=math.inf)  # no wall-clock limit in a test
    assert sim.rate_per_s > 0 and abs(top / sim.rate_per_s - 1.0) <= TOLERANCE, (top, sim.to_dict())


def test_a_short_stream_hides_an_overload_the_stability_check_sees() -> None:
    """At 12 conv/s (17% above the planner's max rate) the file's 400-conversation stream holds the SLO; the
    fleet does not keep up, which a 4,000-conversation stream shows in the later half of its window."""
    cfg = _fleet("fleet-single-turn")
    run = make_plan(cfg, max_rate=True)
    short = validate_plan(cfg, run, seeds=(0,), conversations=400, rate_per_s=12.0)
    assert short.holds  # the transient: why the old search (this check on the file's stream) read 14.8
    c = check_rate(cfg, run, 12.0, seeds=(0,))
    assert not c.holds
    assert c.violation_pct_halves[1] > c.violation_pct_halves[0]  # waits grow: the later half misses more
    assert "miss an SLO" in c.why or "no steady state" in c.why


def test_the_stability_check_sends_iid_conversations(shared_data: Path) -> None:
    """paper-a40-disagg's max-rate plan (hybrid, planner 0.7757 conv/s) at 0.78: on the verification's
    once-per-pass stream it holds (sustained up to 0.801 there), on i.i.d. conversations -- what users send --
    it does not (sustained 0.759): heavy conversations cluster, a decoder's batch reaches its KV, histories
    are evicted and recomputed (docs/planning.md, the paper-a40-disagg bullet)."""
    cfg = _fleet("paper-a40-disagg")
    run = make_plan(cfg, max_rate=True)
    c = check_rate(cfg, run, 0.78)
    assert not c.holds and "miss an SLO" in c.why


def test_search_stops_at_its_time_budget_with_the_bracket_so_far() -> None:
    cfg = _fleet("fleet-single-turn")
    run = make_plan(cfg, max_rate=True)
    seen: list[float] = []
    out = highest_sustained_rate(
        cfg,
        run,
        seeds=(0,),
        conversations=300,
        time_budget_s=0.0,
        progress=lambda c: seen.append(c.rate_per_s),
    )
    # the two ends of the bracket are checked, then the budget stops the bisection
    planned = run.plan.predictions.arrival_rate_per_s
    assert seen == pytest.approx([planned / 2, planned * 2])
    assert out.budget_exhausted
    assert out.rate_per_s == pytest.approx(planned / 2) and out.upper_per_s == pytest.approx(planned * 2)
    assert [c.rate_per_s for c in out.checks] == seen


def test_cli_sim_search_reports_the_bracket_within_its_budget() -> None:
    fleet = str(REPO / "examples" / "fleet-single-turn.yaml")
    args = ["plan", "--fleet", fleet, "--max-rate", "--sim-search", "--sim-budget", "0.001", "--seeds", "1"]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)  # the progress lines go to stderr only
    mr = doc["max_rate"]
    planned = doc["plan"]["predictions"]["arrival_rate_per_s"]
    assert mr["predicted_per_s"] == pytest.approx(planned)
    sim = mr["simulated"]
    # 1 ms runs out after the two ends of the bracket: half the planned rate holds, twice it does not
    assert sim["budget_exhausted"] is True and sim["seeds"] == [0]
    assert [c["holds"] for c in sim["checks"]] == [True, False]
    assert sim["rate_per_s"] == pytest.approx(planned / 2, rel=1e-5)
    assert sim["upper_per_s"] == pytest.approx(planned * 2, rel=1e-5)
    assert "conv/s: sustained" in res.stderr and "conv/s: not sustained" in res.stderr


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--sim-search"], "--sim-search needs --max-rate"),
        (["--max-rate", "--sim-search", "--no-verify"], "exclude each other"),
        (["--max-rate", "--sim-search", "--sim-budget", "0"], "--sim-budget must be > 0"),
    ],
)
def test_cli_sim_search_bad_input_is_one_line(extra: list[str], needle: str) -> None:
    res = runner.invoke(app, ["plan", "--fleet", str(REPO / "examples" / "fleet-single-turn.yaml"), *extra])
    assert res.exit_code == 1
    assert needle in res.output and len(res.output.strip().splitlines()) == 1
    assert "Traceback" not in res.output


def test_cli_max_rate_table_says_the_verification_does_not_test_stability() -> None:
    fleet = str(REPO / "examples" / "fleet-single-turn.yaml")
    res = runner.invoke(app, ["plan", "--fleet", fleet, "--max-rate", "--seeds", "1"])
    assert res.exit_code == 0, res.output
    assert "do not test stability" in res.stdout and "--sim-search bisects" in res.stdout


def test_a_seed_without_a_steady_state_fails_the_rate_at_once() -> None:
    """Far above capacity (4x the planner's max rate) the mean E2E spans the run: no steady window, so the
    rate fails on the first seed and the later seeds are not simulated."""
    cfg = _fleet("fleet-single-turn")
    run = make_plan(cfg, max_rate=True)
    far = 4.0 * run.plan.predictions.arrival_rate_per_s
    c = check_rate(cfg, run, far, seeds=(0, 1, 2), conversations=300)
    assert not c.holds and c.steady_conversations == 0
    assert c.why.startswith("seed 0: no steady state")
