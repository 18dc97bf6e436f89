"""Predictions that agree with the simulator (issue 10 item 4 and the acceptance): `plan --json` on each test
fleet verifies its plan in steady state (3 seeds); the simulated SLO violations must stay within the
percentile's allowance and predicted vs simulated within 10% for p95 TTFET slowdown, mean TBT and tokens/J.
`--max-rate` against the simulator: tests/cli/test_max_rate_simulated.py.

Where the model is not within 10% the case is a strict xfail whose reason carries the measured numbers
(deterministic: fixed seeds); nothing here is tuned to the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
FLEETS = [
    "fleet",
    "paper-a40",
    "fleet-llama8b-a100-l40s",
    "fleet-long-gaps",
    "fleet-single-turn",
    "fleet-mooncake",
]
METRICS = ["p95 TTFET slowdown", "mean TBT ms", "tokens/J"]
TOLERANCE = 0.10

# measured on this commit (simulated / predicted, steady state, seeds 0-2, the stream realising the planned
# workload and rate: orchestrator.verify.steady_stream); also in docs/planning.md
TTFET_GAP = (
    "the decode side of the served TTFET is (O_b + Kn) x the planned mean step; with the tail prefill "
    "priced as the simulator runs it (appended tokens only, orchestrator.planner.inputs) the step now "
    "matches the simulated TBT within 5%, and the TTFET term the old overcount hid is not yet identified "
    "(candidates: later turns queueing behind turn-1 prefill chunks on their decoder, the per-step batch "
    "variance the mean step ignores)"
)
OUTSIDE: dict[tuple[str, str], str] = {
    ("paper-a40", "p95 TTFET slowdown"): (
        "predicted 4.10x, simulated 2.69x (0.655): planned at the burst rate 0.89 conv/s, where the "
        "decoders run at 99.5% of their modelled token throughput; there the active batch "
        "(B = rate x steps x step(B)) is hypersensitive to the stream's tokens (a steady window's few "
        "hundred heavy-tailed conversations carry ~7% fewer decode tokens than the workload mean)"
    ),
    ("paper-a40", "mean TBT ms"): (
        "predicted 54.7 ms, simulated 26.5 ms (0.484): same cause; the simulated decoders batch ~6 "
        "sequences at the throughput they realise, as the tier model's step curve says"
    ),
    (
        "fleet-llama8b-a100-l40s",
        "p95 TTFET slowdown",
    ): f"predicted 1.97x, simulated 2.27x (1.152): {TTFET_GAP}",
    ("fleet-long-gaps", "tokens/J"): (
        "predicted 47.4, simulated 41.2 (0.870): colocated plan at 88% planned KV occupancy; in simulation "
        "17% of the later turns find their history gone after the 30 s tool gap and recompute it (2,249 "
        "tokens per later turn on average vs ~200 appended), prefill energy the model omits"
    ),
    ("fleet-single-turn", "p95 TTFET slowdown"): (
        "predicted 3.59x, simulated 2.97x (0.827): the prefillers pack several prompts into one "
        "8,192-token step (one fixed overhead), the M/G/1 model serves them one by one"
    ),
    ("fleet-mooncake", "p95 TTFET slowdown"): f"predicted 1.34x, simulated 1.54x (1.147): {TTFET_GAP}",
}


def _fleet_path(name: str) -> Path:
    return REPO / "examples" / f"{name}.yaml"


@pytest.fixture(scope="module")
def verified(request: pytest.FixtureRequest) -> dict[str, dict]:
    if not (REPO.parent / "shared" / "data").is_dir():
        pytest.skip("reference data not found (../shared/data): paper-a40 needs its trace")
    out: dict[str, dict] = {}
    for name in FLEETS:
        res = runner.invoke(app, ["plan", "--fleet", str(_fleet_path(name)), "--json"])
        assert res.exit_code == 0, res.output
        lines = res.stdout.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("{"))
        out[name] = json.loads("\n".join(lines[start:]))["validation"]
    return out


@pytest.mark.parametrize("name", FLEETS)
def test_simulated_violations_within_the_allowance(verified: dict[str, dict], name: str) -> None:
    v = verified[name]
    assert v["seeds"] == [0, 1, 2]
    assert v["slo_violation_pct"] <= v["slo_violation_allowance_pct"], v["status"]
    assert v["slo_met_simulated"] is True and v["status"] == "holds"


def _cases() -> list:
    out = []
    for name in FLEETS:
        for metric in METRICS:
            why = OUTSIDE.get((name, metric))
            marks = [pytest.mark.xfail(strict=True, reason=f"not within 10%: {why}")] if why else []
            out.append(pytest.param(name, metric, marks=marks, id=f"{name}-{metric}"))
    return out


@pytest.mark.parametrize(("name", "metric"), _cases())
def test_prediction_within_10pct_of_the_simulator(verified: dict[str, dict], name: str, metric: str) -> None:
    m = verified[name]["metrics"][metric]
    assert m["predicted"] > 0 and m["simulated"] > 0
    assert abs(m["simulated"] / m["predicted"] - 1.0) <= TOLERANCE, (name, metric, m)
