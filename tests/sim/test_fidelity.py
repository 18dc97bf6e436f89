"""Fidelity to measurement (issue 12 item 1): the simulator against the paper's measured figures, strictly.

Each case is one figure the paper measured on 4x A40 (Qwen3-0.6B, 255 conversations x 5 turns of its SWE-bench
trace; 1 prefiller + 3 decoders, or 4 colocated engines) and the simulator's value for it, run as
``orchestrator.sim.paper`` configures the experiment today: the artifact's engine budgets, its router-side KV
admission, the artifact clock. The tolerance is the issue's: 20% on latency slowdowns (p95 TTFET, p95
last-turn TBT), 5% on tokens/J; SLO-violation shares (the issue's table) within 5 points.

Arrivals are the paper's own: the artifact drew them once, from ``random.Random(42)`` (conserve/src/
scheduler.py lines 8 and 142-144; ``orchestrator.artifact.artifact_arrival_offsets_s``), so each case is one
run of the same arrival sequence as the paper's one run. The spread over seeds 0-4 and what each mechanism
changes are in docs/paper-reproduction.md, section "Fidelity to measurement", with the evidence for every
mark below.

The TBT cases compare the paper's per-token statistic (every final-turn gap / the conversation's standalone
mean TBT, p95 over all final-turn tokens; ``Summary.tbt_token_slowdown``, wiring item W1), not the
simulator's per-conversation one.

Cases that need a mechanism wired into the simulator are strict xfails naming it; cases the doc shows no
measured mechanism reaches are strict xfails saying so. A strict xfail that starts passing fails the suite:
then the mark goes. Run time: ~5 s (8 simulations shared by the cases).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from orchestrator.artifact import artifact_arrival_offsets_s
from orchestrator.config import FleetConfig, load_fleet
from orchestrator.metrics import (
    Convention,
    SloSpec,
    StandaloneCache,
    Summary,
    conversation_metrics,
    summarize,
)
from orchestrator.sim.fleet import reference_tier_model, simulate_fleet
from orchestrator.sim.paper import CONFIGS, PAPER_SIM_OPTIONS
from orchestrator.workload import workload_from_config

LATENCY_TOL = 0.20
TOKENS_PER_J_TOL = 0.05
VIOLATION_TOL_POINTS = 5.0

W2 = "the artifact's arrival replay from a prefiller-only run (W2)"
W3 = "prefix caching off on the proxy path's engines for full-disagg (W3)"
W4 = "the artifact's AMPD emulation: pinned decoder, virtual-prefiller waits (W4)"
UNREACHED = "no measured mechanism reaches it: see docs/paper-reproduction.md, Fidelity to measurement"


def needs(*what: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(
        strict=True, reason="needs " + " and ".join(what) + " wired into the simulator (issue 12 item 1)"
    )


def unreached(why: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=f"{UNREACHED} ({why})")


@dataclass(frozen=True, slots=True)
class Run:
    summary: Summary  # artifact convention


@pytest.fixture(scope="module")
def cfg(shared_data: Path, repo_root: Path) -> FleetConfig:
    return load_fleet(repo_root / "examples" / "paper-a40.yaml")


@pytest.fixture(scope="module")
def runs(cfg: FleetConfig) -> dict[tuple[str, float, float | None], Run]:
    """Lazily filled: (label, rate, wrong-prediction rate override) -> run."""
    return {}


@pytest.fixture(scope="module")
def sa(cfg: FleetConfig) -> StandaloneCache:
    """The normaliser, shared: each conversation alone on an idle colocated A40, the paper's engine."""
    return StandaloneCache(reference_tier_model(cfg), PAPER_SIM_OPTIONS)


def simulate(
    cfg: FleetConfig,
    sa: StandaloneCache,
    cache: dict[tuple[str, float, float | None], Run],
    label: str,
    rate: float,
    mispredict: float | None = None,
) -> Summary:
    key = (label, rate, mispredict)
    if key not in cache:
        policy, layout, opts = CONFIGS[label]
        opts = dict(opts)
        if mispredict is not None:
            opts["mispredict_rate"] = mispredict
        base = workload_from_config(cfg.workload)
        convs = [
            replace(c, arrival_s=t)
            for c, t in zip(base, artifact_arrival_offsets_s(len(base), rate), strict=True)
        ]
        res, _ = simulate_fleet(
            cfg, policy_name=policy, layout=layout, conversations=convs, policy_options=opts,
            options=replace(PAPER_SIM_OPTIONS, router_admission=True), energy_window_s=None, seed=42,
        )
        mets = conversation_metrics(res, convs, sa, SloSpec.from_config(cfg.slo), Convention.ARTIFACT)
        cache[key] = Run(summarize(res, mets, Convention.ARTIFACT))
    return cache[key].summary


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


# (configuration, rate conv/s, metric, the paper's figure); the figures are issue 12's table and DESIGN.md 1
POINTS = [
    pytest.param("conserve", 1.634, "ttfet", 4.06, id="conserve-1.634-p95-ttfet"),
    pytest.param("conserve", 1.634, "tbt", 4.43, id="conserve-1.634-p95-tbt"),
    pytest.param("conserve", 1.634, "viol", 0.0, id="conserve-1.634-slo-violations"),
    pytest.param("conserve", 1.634, "tokJ", 62.01, id="conserve-1.634-tokens-per-j"),
    pytest.param("conserve@200W", 1.634, "tokJ", 76.1, id="conserve-200W-1.634-tokens-per-j"),
    pytest.param("per-turn", 1.634, "ttfet", 8.30, id="per-turn-1.634-p95-ttfet", marks=needs(W2, W4)),
    pytest.param("per-turn", 1.634, "tbt", 4.30, id="per-turn-1.634-p95-tbt"),
    pytest.param("per-turn", 1.634, "viol", 13.3, id="per-turn-1.634-slo-violations", marks=needs(W2, W4)),
    pytest.param("per-turn", 1.634, "tokJ", 57.68, id="per-turn-1.634-tokens-per-j",
                 marks=unreached("same work as ConServe's runner; modelled energy equal or better")),
    pytest.param("colocated", 1.634, "ttfet", 5.56, id="colocated-1.634-p95-ttfet", marks=needs(W2)),
    pytest.param("colocated", 1.634, "tbt", 7.52, id="colocated-1.634-p95-tbt",
                 marks=unreached("per token 4.2 today, 4.5 with every mechanism; per conversation 4.8-5.5")),
    pytest.param("colocated", 1.634, "viol", 17.6, id="colocated-1.634-slo-violations", marks=needs(W2)),
    # holds today (+4.5%); with W2 it will not (68.9 on this sequence): the doc's "not reached" list
    pytest.param("colocated", 1.634, "tokJ", 61.14, id="colocated-1.634-tokens-per-j"),
    pytest.param("full-disagg", 1.634, "ttfet", 104.0, id="full-disagg-1.634-p95-ttfet",
                 marks=unreached("a deeper collapse: 126-143x today and with every mechanism")),
    pytest.param("full-disagg", 1.634, "tokJ", 30.3, id="full-disagg-1.634-tokens-per-j",
                 marks=unreached("32.9 today, 32.0 with W3 and W5: +5.5%")),
    pytest.param("full-disagg", 0.5, "ttfet", 53.6, id="full-disagg-0.5-p95-ttfet",
                 marks=pytest.mark.xfail(strict=True, reason=(
                     f"needs {W3} wired into the simulator (issue 12 item 1); even then 67x on the "
                     "paper's arrival sequence (+25%; seeds 0-4: 54-70x, mean 62x)"))),
    pytest.param("full-disagg", 0.5, "tbt", 1.57, id="full-disagg-0.5-p95-tbt", marks=needs(W3)),
]


@pytest.mark.parametrize(("label", "rate", "metric", "paper"), POINTS)
def test_paper_point(
    cfg: FleetConfig,
    sa: StandaloneCache,
    runs: dict[tuple[str, float, float | None], Run],
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
        pytest.param(0.0, 4.02, id="per-turn-0pct-wrong-p95-ttfet", marks=needs(W2, W4)),
        pytest.param(0.5, 13.67, id="per-turn-50pct-wrong-p95-ttfet", marks=needs(W2, W4)),
    ],
)
def test_per_turn_sensitivity_to_wrong_predictions(
    cfg: FleetConfig,
    sa: StandaloneCache,
    runs: dict[tuple[str, float, float | None], Run],
    mispredict: float,
    paper: float,
) -> None:
    got = value(simulate(cfg, sa, runs, "per-turn", 1.634, mispredict), "ttfet")
    print(f"\nper-turn at 1.634 conv/s, {mispredict:.0%} wrong: p95 TTFET {got:.2f}, paper {paper}")
    check("ttfet", got, paper)
