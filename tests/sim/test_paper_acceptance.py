"""Issue 3's acceptance checks on the paper's setup (docs/paper-reproduction.md explains every number).

4x A40 + Qwen3-0.6B, 255 conversations x 5 turns of the paper's trace, Poisson arrivals (seed 0);
1 prefiller + 3 decoders (decoders at 300 W, and capped at 200 W) or 4 colocated engines. Slowdowns against
the conversation alone on one idle colocated A40 at 300 W. The runs are orchestrator.sim.paper's (the module
that also prints the doc's tables): every configuration with the artifact's router-side KV admission
(orchestrator.sim.admission).

Convention: the acceptance checks compare with the paper's figures, so they are evaluated under the
**artifact** convention, the one issue 3 asks for to make the side-by-side like for like (t0 = the
conversation's router-side KV admission; for conserve and per-turn also past turn 1's prefiller queue, as the
artifact's correction did). Tokens/J does not depend on the convention. The same checks under the **honest**
convention (t0 = arrival of turn 1, the admission wait included) are below them where they differ.

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


@pytest.fixture(scope="module")
def paper(shared_data: Path, repo_root: Path):  # type: ignore[no-untyped-def]
    fleet = repo_root / "examples" / "paper-a40.yaml"
    if not fleet.is_file():
        pytest.skip("examples/paper-a40.yaml is missing")
    # the artifact's engine budgets (PAPER_SIM_OPTIONS, run_sweep's default) and router-side admission
    runs = run_sweep(load_fleet(fleet), rates=(1.25, RATE), seeds=(0,), labels=LABELS)
    for run in runs.values():
        assert run.honest.conversations == 255 and run.honest.turns == 255 * 5
        assert run.artifact.conversations == 255
    return {(label, rate): run for (label, rate, _), run in runs.items()}


def honest(paper, label: str, rate: float = RATE) -> Summary:  # type: ignore[no-untyped-def]
    return paper[(label, rate)].honest


def artifact(paper, label: str, rate: float = RATE) -> Summary:  # type: ignore[no-untyped-def]
    return paper[(label, rate)].artifact


def p95(s: Summary) -> float:
    return s.ttfet_slowdown["p95"]


# ---- the acceptance checks, artifact convention ------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="measured 3.88 / 4.65 = 0.83 > 0.6 (artifact convention; honest 6.49 / 7.47 = 0.87): our "
    "per-turn baseline's mispredicted turn is a ~60 ms KV round trip plus the prefiller's short queue, so it "
    "stays close to ConServe (paper 4.06 vs 8.30); docs/paper-reproduction.md, 'Why', item 3",
)
def test_conserve_p95_ttfet_at_most_0_6x_per_turn(paper) -> None:  # type: ignore[no-untyped-def]
    assert p95(artifact(paper, "conserve")) <= 0.6 * p95(artifact(paper, "per-turn"))


def test_full_disagg_at_least_10x_conserve(paper) -> None:  # type: ignore[no-untyped-def]
    assert p95(artifact(paper, "full-disagg")) >= 10 * p95(artifact(paper, "conserve"))


def test_conserve_tokens_per_j_at_least_per_turn(paper) -> None:  # type: ignore[no-untyped-def]
    # seed 0: 62.2 vs 61.9; not for every seed (the doc's seed table: behind for seeds 2 and 4)
    assert artifact(paper, "conserve").tokens_per_j >= artifact(paper, "per-turn").tokens_per_j


def test_conserve_slo_violations_at_most_2pct(paper) -> None:  # type: ignore[no-untyped-def]
    assert artifact(paper, "conserve").slo_violation_pct <= 2.0


def test_decoder_cap_raises_tokens_per_j_15pct(paper) -> None:  # type: ignore[no-untyped-def]
    base = artifact(paper, "conserve")
    capped = artifact(paper, "conserve@200W")
    assert capped.tokens_per_j >= 1.15 * base.tokens_per_j


def test_decoder_cap_keeps_slo_violations_at_most_2pct(paper) -> None:  # type: ignore[no-untyped-def]
    assert artifact(paper, "conserve@200W").slo_violation_pct <= 2.0


def test_tokens_per_j_is_the_same_under_both_conventions(paper) -> None:  # type: ignore[no-untyped-def]
    for label in LABELS:
        assert artifact(paper, label).tokens_per_j == honest(paper, label).tokens_per_j


# ---- the same checks under the honest convention, where they differ ------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="measured 16.1% (honest): the router-side admission wait (mean 2.2 s, p95 14.0 s) counts here; "
    "the three A40 decoders are saturated at 1.634 conv/s (docs/paper-reproduction.md, 'Why', item 1)",
)
def test_honest_conserve_slo_violations_at_most_2pct(paper) -> None:  # type: ignore[no-untyped-def]
    assert honest(paper, "conserve").slo_violation_pct <= 2.0


@pytest.mark.xfail(
    strict=True, reason="measured 17.3% with 200 W decoders (honest; artifact convention 0.0%)"
)
def test_honest_decoder_cap_keeps_slo_violations_at_most_2pct(paper) -> None:  # type: ignore[no-untyped-def]
    assert honest(paper, "conserve@200W").slo_violation_pct <= 2.0


def test_honest_full_disagg_at_least_10x_conserve(paper) -> None:  # type: ignore[no-untyped-def]
    assert p95(honest(paper, "full-disagg")) >= 10 * p95(honest(paper, "conserve"))


def test_admission_wait_is_what_separates_the_conventions(paper) -> None:  # type: ignore[no-untyped-def]
    s = honest(paper, "conserve")
    assert s.admission_wait_s["mean"] > 0  # the decoders are full at 1.634: conversations wait for KV
    assert p95(honest(paper, "conserve")) > p95(artifact(paper, "conserve"))
    assert honest(paper, "conserve", 1.25).admission_wait_s["p95"] < 1.0  # below saturation, little wait


# What else agrees with the paper in our model (asserted, so a regression shows up):


def test_full_disagg_is_far_worst_and_conserve_transfers_once(paper) -> None:  # type: ignore[no-untyped-def]
    full = p95(honest(paper, "full-disagg"))
    for label in ("conserve", "per-turn", "colocated"):
        assert full >= 10 * p95(honest(paper, label))
        assert p95(honest(paper, "full-disagg", 1.25)) >= 10 * p95(honest(paper, label, 1.25))
    assert honest(paper, "conserve").kv_transfers == 255
    assert honest(paper, "full-disagg").kv_transfers == 255 * 5
    assert honest(paper, "full-disagg").tokens_per_j < 0.7 * honest(paper, "conserve").tokens_per_j


def test_below_saturation_conserve_meets_the_slo(paper) -> None:  # type: ignore[no-untyped-def]
    s = honest(paper, "conserve", 1.25)  # honest: at 1.25 conv/s (seed 0) nobody waits for admission
    assert s.slo_violation_pct <= 2.0
    assert p95(s) <= p95(honest(paper, "per-turn", 1.25)) * 1.05
    assert s.tokens_per_j >= honest(paper, "per-turn", 1.25).tokens_per_j


def test_decoder_cap_saves_energy_below_saturation(paper) -> None:  # type: ignore[no-untyped-def]
    base, capped = honest(paper, "conserve", 1.25), honest(paper, "conserve@200W", 1.25)
    assert capped.tokens_per_j >= 1.15 * base.tokens_per_j
    assert capped.slo_violation_pct <= 2.0
