"""Fidelity to measurement (issue 12 item 1): the simulator against the paper's measured figures, strictly.

Each case is one figure the paper measured on 4x A40 (Qwen3-0.6B, 255 conversations x 5 turns of its SWE-bench
trace; 1 prefiller + 3 decoders, or 4 colocated engines) and the simulator's value for it, run the way the
artifact ran the experiment: its engine budgets, its router-side KV admission, the artifact clock, and the
harness mechanisms wired into the simulator (``orchestrator.fidelity.ALL_MECHANISMS``: W2 arrivals replayed
from a simulated prefiller-only run, W3 no prefix caching on the proxy path's engines for full
disaggregation, W4 the artifact's AMPD emulation for the per-turn baseline, W5 the serving path's per-step
overhead, W6 the artifact's energy window for conserve and per-turn). The tolerance is the issue's: 20% on
latency slowdowns (p95 TTFET, p95 last-turn TBT), 5% on tokens/J; SLO-violation shares (the issue's table)
within 5 points. The TBT cases compare the paper's per-token statistic (every final-turn gap / the
conversation's standalone mean TBT, p95 over all final-turn tokens; ``Summary.tbt_token_slowdown``, W1).

Arrivals are the paper's own: the artifact drew them once, from ``random.Random(42)`` (conserve/src/
scheduler.py lines 8 and 142-144; ``orchestrator.artifact.artifact_arrival_offsets_s``), so each case is one
run of the same arrival sequence as the paper's one run (through the replay, W2). The spread over seeds 0-4
and what each mechanism changes are in docs/paper-reproduction.md, section "Fidelity to measurement", with the
evidence for every mark below.

Cases the doc shows no measured mechanism reaches are strict xfails stating the simulated figure and why. A
strict xfail that starts passing fails the suite: then the mark goes. Run time: ~5 s (9 simulations shared
by the cases).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator import fidelity as fid
from orchestrator.config import FleetConfig, load_fleet
from orchestrator.metrics import Summary
from orchestrator.sim.standalone import StandaloneCache

LATENCY_TOL = 0.20
TOKENS_PER_J_TOL = 0.05
VIOLATION_TOL_POINTS = 5.0

UNREACHED = "no measured mechanism reaches it: see docs/paper-reproduction.md, Fidelity to measurement"


def unreached(why: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=f"{UNREACHED} ({why})")


@pytest.fixture(scope="module")
def cfg(shared_data: Path, repo_root: Path) -> FleetConfig:
    return load_fleet(repo_root / "examples" / "paper-a40.yaml")


@pytest.fixture(scope="module")
def runs(cfg: FleetConfig) -> dict[tuple[str, float, float | None], Summary]:
    """Lazily filled: (label, rate, wrong-prediction rate override) -> artifact-convention summary."""
    return {}


@pytest.fixture(scope="module")
def sa(cfg: FleetConfig) -> StandaloneCache:
    """The normaliser, shared: each conversation alone on an idle colocated A40, the paper's engine."""
    return fid.paper_standalone(cfg)


def simulate(
    cfg: FleetConfig,
    sa: StandaloneCache,
    cache: dict[tuple[str, float, float | None], Summary],
    label: str,
    rate: float,
    mispredict: float | None = None,
) -> Summary:
    key = (label, rate, mispredict)
    if key not in cache:
        mech = fid.ALL_MECHANISMS
        if mispredict is not None:
            mech = replace(mech, wrong_prediction_rate=mispredict)
        cache[key] = fid.run_point(cfg, label, rate, "paper", mech, standalone=sa).artifact
    return cache[key]


def value(s: Summary, metric: str) -> float:
    if metric == "ttfet":
        return s.ttfet_slowdown["p95"]
    if metric == "tbt":
        return s.tbt_token_slowdown["p95"]
    if metric == "viol":
        return s.slo_violation_pct
    if metric == "tokJ":
        return s.tokens_per_j
    raise AssertionError(metric)


def check(metric: str, got: float, paper: float) -> None:
    if metric == "viol":
        assert abs(got - paper) <= VIOLATION_TOL_POINTS, f"{got:.1f}% vs the paper's {paper}%"
    else:
        tol = TOKENS_PER_J_TOL if metric == "tokJ" else LATENCY_TOL
        assert got == pytest.approx(paper, rel=tol), f"{got:.2f} vs the paper's {paper}"


# (configuration, rate conv/s, metric, the paper's figure); the figures are issue 12's table and DESIGN.md 1.
# Each xfail states the simulated figure on this arrival sequence (seeds 0-4 in the doc) and the evidence.
ENERGY_SPAN = (
    "the modelled draw matches the artifact's published colocated runs (+-10%) but our runs end up to 18% "
    "sooner on the same arrivals (doc: cross-check); no A40 decode power trace or section-5 run log is public"
)
POINTS = [
    pytest.param("conserve", 1.634, "ttfet", 4.06, id="conserve-1.634-p95-ttfet"),
    pytest.param("conserve", 1.634, "tbt", 4.43, id="conserve-1.634-p95-tbt"),
    pytest.param("conserve", 1.634, "viol", 0.0, id="conserve-1.634-slo-violations"),
    pytest.param(
        "conserve",
        1.634,
        "tokJ",
        62.01,
        id="conserve-1.634-tokens-per-j",
        marks=unreached(
            f"67.2 with the artifact's energy window (W6), +8.4%; 63.7 without it: {ENERGY_SPAN}"
        ),
    ),
    pytest.param(
        "conserve@200W",
        1.634,
        "tokJ",
        76.1,
        id="conserve-200W-1.634-tokens-per-j",
        marks=unreached(f"80.7 with the artifact's energy window (W6), +6.0%: {ENERGY_SPAN}"),
    ),
    pytest.param("per-turn", 1.634, "ttfet", 8.30, id="per-turn-1.634-p95-ttfet"),
    pytest.param("per-turn", 1.634, "tbt", 4.30, id="per-turn-1.634-p95-tbt"),
    pytest.param("per-turn", 1.634, "viol", 13.3, id="per-turn-1.634-slo-violations"),
    pytest.param(
        "per-turn",
        1.634,
        "tokJ",
        57.68,
        id="per-turn-1.634-tokens-per-j",
        marks=unreached(
            "65.9, +14%: the artifact ran ConServe's runner doing the same work plus sleeps, with the same "
            "recorded prefiller; our model gives it ConServe's energy within 3%"
        ),
    ),
    pytest.param("colocated", 1.634, "ttfet", 5.56, id="colocated-1.634-p95-ttfet"),
    pytest.param(
        "colocated",
        1.634,
        "tbt",
        7.52,
        id="colocated-1.634-p95-tbt",
        marks=unreached(
            "4.49 per token, -40%: the p95 token lies among decode-only steps (~4.4x), the paper's among "
            "steps carrying a 2,944-token prefill chunk (6-16x); no chunked interference measurement in "
            "shared/data"
        ),
    ),
    pytest.param("colocated", 1.634, "viol", 17.6, id="colocated-1.634-slo-violations"),
    pytest.param(
        "colocated",
        1.634,
        "tokJ",
        61.14,
        id="colocated-1.634-tokens-per-j",
        marks=unreached(
            f"66.0, +7.9% (the replayed arrivals end the run sooner than Poisson's): {ENERGY_SPAN}"
        ),
    ),
    pytest.param(
        "full-disagg",
        1.634,
        "ttfet",
        104.0,
        id="full-disagg-1.634-p95-ttfet",
        marks=unreached(
            "142x, +37%: every mechanism deepens our collapse; its depth is set by the prefiller's total "
            "work, within 4% of the artifact's prefiller rate; the paper gives only '~104x'"
        ),
    ),
    pytest.param(
        "full-disagg",
        1.634,
        "tokJ",
        30.3,
        id="full-disagg-1.634-tokens-per-j",
        marks=unreached(f"31.96, +5.5%: {ENERGY_SPAN}"),
    ),
    pytest.param(
        "full-disagg",
        0.5,
        "ttfet",
        53.6,
        id="full-disagg-0.5-p95-ttfet",
        marks=unreached(
            "67.4x on the paper's arrival sequence, +26%; mean over seeds 0-4 within 20%: the collapse is "
            "deep enough that one arrival sequence moves p95 by +-14x"
        ),
    ),
    pytest.param("full-disagg", 0.5, "tbt", 1.57, id="full-disagg-0.5-p95-tbt"),
]


@pytest.mark.parametrize(("label", "rate", "metric", "paper"), POINTS)
def test_paper_point(
    cfg: FleetConfig,
    sa: StandaloneCache,
    runs: dict[tuple[str, float, float | None], Summary],
    label: str,
    rate: float,
    metric: str,
    paper: float,
) -> None:
    got = value(simulate(cfg, sa, runs, label, rate), metric)
    print(f"\n{label} at {rate} conv/s, {metric}: simulated {got:.2f}, paper {paper}")
    check(metric, got, paper)


@pytest.mark.parametrize(
    ("mispredict", "paper"),
    [
        pytest.param(0.0, 4.02, id="per-turn-0pct-wrong-p95-ttfet"),
        pytest.param(0.5, 13.67, id="per-turn-50pct-wrong-p95-ttfet"),
    ],
)
def test_per_turn_sensitivity_to_wrong_predictions(
    cfg: FleetConfig,
    sa: StandaloneCache,
    runs: dict[tuple[str, float, float | None], Summary],
    mispredict: float,
    paper: float,
) -> None:
    got = value(simulate(cfg, sa, runs, "per-turn", 1.634, mispredict), "ttfet")
    print(f"\nper-turn at 1.634 conv/s, {mispredict:.0%} wrong: p95 TTFET {got:.2f}, paper {paper}")
    check("ttfet", got, paper)
