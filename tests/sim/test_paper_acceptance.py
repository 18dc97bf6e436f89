"""Issue 3's acceptance checks on the paper's setup (docs/paper-reproduction.md explains every number).

4x A40 + Qwen3-0.6B, 255 conversations x 5 turns of the paper's trace, Poisson arrivals (seed 0);
1 prefiller + 3 decoders (decoders at 300 W, and capped at 200 W) or 4 colocated engines. Slowdowns against
the conversation alone on one idle colocated A40 at 300 W. Honest convention unless stated.

Where our simulator disagrees with the paper the check is marked ``xfail(strict=True)`` with the reason: the
constants come from calibration and are not tuned to match, and a strict xfail fails the suite as soon as the
model changes enough to meet the paper's figure, so the documentation gets updated. Needs ../shared/data.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_fleet
from orchestrator.metrics import Convention, SloSpec, StandaloneCache, conversation_metrics, summarize
from orchestrator.sim.fleet import fleet_workload, reference_tier_model, simulate_fleet, unallocated_idle_w

RATE = 1.634
CONFIGS = {
    "conserve": ("conserve", "prefill=1,decode=3", {}),
    "conserve@200W": ("conserve", "prefill=1,decode=3@200", {}),
    "per-turn": ("per-turn", "prefill=1,decode=3", {"mispredict_rate": 0.1}),
    "full-disagg": ("full-disagg", "prefill=1,decode=3", {}),
    "colocated": ("colocated", "colocated=4", {}),
}
DECODE_BOUND = (
    "simulated 1P+3D is decode-bound at 1.634 conv/s: the trace's first 255 conversations need ~1,425 output "
    "tokens/s and three A40 decoders give ~1,000 at full KV (docs/paper-reproduction.md, 'Why')"
)


@pytest.fixture(scope="module")
def paper(shared_data: Path, repo_root: Path):  # type: ignore[no-untyped-def]
    fleet = repo_root / "examples" / "paper-a40.yaml"
    if not fleet.is_file():
        pytest.skip("examples/paper-a40.yaml is missing")
    cfg = load_fleet(fleet)
    sa = StandaloneCache(reference_tier_model(cfg))
    out = {}
    for rate in (1.25, RATE):
        convs = fleet_workload(cfg, rate=rate, seed=0)
        assert len(convs) == 255 and all(len(c.turns) == 5 for c in convs)
        for label, (pol, layout, opts) in CONFIGS.items():
            res, insts = simulate_fleet(
                cfg,
                policy_name=pol,
                layout=layout,
                conversations=convs,
                policy_options=opts,
                energy_window_s=None,
            )
            for conv in Convention:
                ms = conversation_metrics(res, convs, sa, SloSpec.from_config(cfg.slo), conv)
                out[(label, rate, conv)] = summarize(res, ms, conv, unallocated_idle_w(cfg, insts))
    return out


def p95(s) -> float:  # type: ignore[no-untyped-def]
    return s.ttfet_slowdown["p95"]


@pytest.mark.xfail(strict=True, reason=DECODE_BOUND + "; per-turn's mispredictions land on an idle prefiller")
def test_conserve_p95_ttfet_at_most_0_6x_per_turn(paper) -> None:  # type: ignore[no-untyped-def]
    # like for like with the paper: ConServe under the artifact's convention, the baseline honest
    assert p95(paper[("conserve", RATE, Convention.ARTIFACT)]) <= 0.6 * p95(
        paper[("per-turn", RATE, Convention.HONEST)]
    )


@pytest.mark.xfail(
    strict=True, reason="full-disagg collapses (~145x) but ConServe is itself overloaded: " + DECODE_BOUND
)
def test_full_disagg_at_least_10x_conserve(paper) -> None:  # type: ignore[no-untyped-def]
    assert p95(paper[("full-disagg", RATE, Convention.HONEST)]) >= 10 * p95(
        paper[("conserve", RATE, Convention.HONEST)]
    )


@pytest.mark.xfail(
    strict=True, reason="overloaded ConServe drains longer with an idle prefiller: " + DECODE_BOUND
)
def test_conserve_tokens_per_j_at_least_per_turn(paper) -> None:  # type: ignore[no-untyped-def]
    assert (
        paper[("conserve", RATE, Convention.HONEST)].tokens_per_j
        >= paper[("per-turn", RATE, Convention.HONEST)].tokens_per_j
    )


@pytest.mark.xfail(strict=True, reason=DECODE_BOUND)
def test_conserve_slo_violations_at_most_2pct(paper) -> None:  # type: ignore[no-untyped-def]
    assert paper[("conserve", RATE, Convention.ARTIFACT)].slo_violation_pct <= 2.0


@pytest.mark.xfail(
    strict=True,
    reason="the calibrated power model draws ~121 W while decoding at 300 W, below a 200 W cap, so the cap "
    "saves almost nothing on decoders (the paper measured +22.8%)",
)
def test_decoder_cap_raises_tokens_per_j_15pct(paper) -> None:  # type: ignore[no-untyped-def]
    base = paper[("conserve", RATE, Convention.HONEST)]
    capped = paper[("conserve@200W", RATE, Convention.HONEST)]
    assert capped.tokens_per_j >= 1.15 * base.tokens_per_j and capped.slo_violation_pct <= 2.0


# What does agree with the paper in our model (asserted, so a regression shows up):


def test_full_disagg_is_far_worst_and_conserve_transfers_once(paper) -> None:  # type: ignore[no-untyped-def]
    full = p95(paper[("full-disagg", RATE, Convention.HONEST)])
    for label in ("conserve", "per-turn", "colocated"):
        assert full >= 5 * p95(paper[(label, RATE, Convention.HONEST)])
    assert paper[("conserve", RATE, Convention.HONEST)].kv_transfers == 255
    assert paper[("full-disagg", RATE, Convention.HONEST)].kv_transfers == 255 * 5
    assert (
        paper[("full-disagg", RATE, Convention.HONEST)].tokens_per_j
        < 0.7 * paper[("conserve", RATE, Convention.HONEST)].tokens_per_j
    )


def test_below_saturation_conserve_meets_the_slo(paper) -> None:  # type: ignore[no-untyped-def]
    s = paper[("conserve", 1.25, Convention.HONEST)]
    assert s.slo_violation_pct <= 2.0
    assert p95(s) <= p95(paper[("per-turn", 1.25, Convention.HONEST)]) * 1.05
