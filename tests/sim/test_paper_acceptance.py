"""Issue 3's acceptance checks on the paper's setup (docs/paper-reproduction.md explains every number).

4x A40 + Qwen3-0.6B, 255 conversations x 5 turns of the paper's trace, Poisson arrivals (seed 0);
1 prefiller + 3 decoders (decoders at 300 W, and capped at 200 W) or 4 colocated engines. Slowdowns against
the conversation alone on one idle colocated A40 at 300 W. Honest convention unless stated. The runs are
orchestrator.sim.paper's (the module that also prints the doc's tables).

Where our simulator disagrees with the paper the check is marked ``xfail(strict=True)`` with the measured
figure in the reason: the constants come from calibration and are not tuned to match, and a strict xfail fails
the suite as soon as the model changes enough to meet the paper's figure, so the documentation gets updated.
Needs ../shared/data.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_fleet
from orchestrator.metrics import Summary
from orchestrator.sim.paper import PAPER_RATE, run_sweep

RATE = PAPER_RATE
LABELS = ("conserve", "conserve@200W", "per-turn", "full-disagg", "colocated")
DECODE_BOUND = (
    "simulated 1P+3D is decode-bound at 1.634 conv/s: the trace's first 255 conversations need ~1,425 output "
    "tokens/s and three A40 decoders give ~900-1,000 at full KV (docs/paper-reproduction.md, 'Why')"
)


@pytest.fixture(scope="module")
def paper(shared_data: Path, repo_root: Path):  # type: ignore[no-untyped-def]
    fleet = repo_root / "examples" / "paper-a40.yaml"
    if not fleet.is_file():
        pytest.skip("examples/paper-a40.yaml is missing")
    # the artifact's engine budgets (PAPER_SIM_OPTIONS, run_sweep's default)
    runs = run_sweep(load_fleet(fleet), rates=(1.25, RATE), seeds=(0,), labels=LABELS)
    for run in runs.values():
        assert run.honest.conversations == 255 and run.honest.turns == 255 * 5
    return {(label, rate): run for (label, rate, _), run in runs.items()}


def honest(paper, label: str, rate: float = RATE) -> Summary:  # type: ignore[no-untyped-def]
    return paper[(label, rate)].honest


def artifact(paper, label: str, rate: float = RATE) -> Summary:  # type: ignore[no-untyped-def]
    return paper[(label, rate)].artifact


def p95(s: Summary) -> float:
    return s.ttfet_slowdown["p95"]


@pytest.mark.xfail(
    strict=True,
    reason="measured 26.57 (artifact) / 29.45 = 0.90 > 0.6: " + DECODE_BOUND,
)
def test_conserve_p95_ttfet_at_most_0_6x_per_turn(paper) -> None:  # type: ignore[no-untyped-def]
    # like for like with the paper: ConServe under the artifact's convention, the baseline honest
    assert p95(artifact(paper, "conserve")) <= 0.6 * p95(honest(paper, "per-turn"))


@pytest.mark.xfail(
    strict=True,
    reason="measured 141.81 / 26.60 = 5.3x: full-disagg collapses but ConServe is itself overloaded; "
    + DECODE_BOUND,
)
def test_full_disagg_at_least_10x_conserve(paper) -> None:  # type: ignore[no-untyped-def]
    assert p95(honest(paper, "full-disagg")) >= 10 * p95(honest(paper, "conserve"))


@pytest.mark.xfail(
    strict=True,
    reason="measured 50.7 vs per-turn 54.7 tokens/J (seed 0; ConServe is ahead for seeds 2-4): overloaded "
    "ConServe piled conversations on one decoder, which thrashes (re-prefills evicted histories) and ends "
    "92 s later (565 s vs 473 s) while the other GPUs are billed idle; " + DECODE_BOUND,
)
def test_conserve_tokens_per_j_at_least_per_turn(paper) -> None:  # type: ignore[no-untyped-def]
    assert honest(paper, "conserve").tokens_per_j >= honest(paper, "per-turn").tokens_per_j


@pytest.mark.xfail(strict=True, reason="measured 31.8% (artifact convention): " + DECODE_BOUND)
def test_conserve_slo_violations_at_most_2pct(paper) -> None:  # type: ignore[no-untyped-def]
    assert artifact(paper, "conserve").slo_violation_pct <= 2.0


def test_decoder_cap_raises_tokens_per_j_15pct(paper) -> None:  # type: ignore[no-untyped-def]
    base = honest(paper, "conserve")
    capped = honest(paper, "conserve@200W")
    assert capped.tokens_per_j >= 1.15 * base.tokens_per_j


@pytest.mark.xfail(strict=True, reason="measured 33.7% violations with 200 W decoders: " + DECODE_BOUND)
def test_decoder_cap_keeps_slo_violations_at_most_2pct(paper) -> None:  # type: ignore[no-untyped-def]
    assert honest(paper, "conserve@200W").slo_violation_pct <= 2.0


# What does agree with the paper in our model (asserted, so a regression shows up):


def test_full_disagg_is_far_worst_and_conserve_transfers_once(paper) -> None:  # type: ignore[no-untyped-def]
    full = p95(honest(paper, "full-disagg"))
    for label in ("conserve", "per-turn", "colocated"):
        assert full >= 4 * p95(honest(paper, label))  # at 1.634 the others are themselves overloaded
        # below saturation the collapse is the paper's order of magnitude (~104x vs ~4-8x)
        assert p95(honest(paper, "full-disagg", 1.25)) >= 10 * p95(honest(paper, label, 1.25))
    assert honest(paper, "conserve").kv_transfers == 255
    assert honest(paper, "full-disagg").kv_transfers == 255 * 5
    assert honest(paper, "full-disagg").tokens_per_j < 0.7 * honest(paper, "conserve").tokens_per_j


def test_below_saturation_conserve_meets_the_slo(paper) -> None:  # type: ignore[no-untyped-def]
    s = honest(paper, "conserve", 1.25)
    assert s.slo_violation_pct <= 2.0
    assert p95(s) <= p95(honest(paper, "per-turn", 1.25)) * 1.05
    assert s.tokens_per_j >= honest(paper, "per-turn", 1.25).tokens_per_j


def test_decoder_cap_saves_energy_below_saturation(paper) -> None:  # type: ignore[no-untyped-def]
    base, capped = honest(paper, "conserve", 1.25), honest(paper, "conserve@200W", 1.25)
    assert capped.tokens_per_j >= 1.15 * base.tokens_per_j
    assert capped.slo_violation_pct <= 2.0
