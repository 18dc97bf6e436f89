"""The ConServe artifact's experiment harness, emulated (orchestrator.artifact): arrivals, the AMPD virtual
prefiller, wrong-prediction draws, compound prompts, the per-token TBT statistic, the energy window."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from orchestrator.artifact import (
    REPLAY_POINT,
    RecordedTurn1,
    ReplayPoint,
    VirtualPrefiller,
    artifact_arrival_offsets_s,
    compound_prompt_tokens,
    pooled_token_slowdowns,
    recorded_rate,
    replay_offsets_s,
    split_window_energy_j,
    wrong_predicted_turns,
)
from orchestrator.errors import WorkloadError
from orchestrator.workload import load_conserve_trace


def test_arrivals_are_the_artifacts_poisson_draws() -> None:
    rng = random.Random(42)
    expect, t = [], 0.0
    for _ in range(5):
        expect.append(t)
        t += rng.expovariate(1.25)
    assert artifact_arrival_offsets_s(5, 1.25) == pytest.approx(expect, rel=1e-12)


def test_arrivals_at_every_rate_are_one_sequence_scaled() -> None:
    """expovariate(rate) = -log(1 - u) / rate: the paper's runs at different rates share one shape."""
    a = np.array(artifact_arrival_offsets_s(50, 1.0))
    b = np.array(artifact_arrival_offsets_s(50, 2.0))
    assert b == pytest.approx(a / 2.0, rel=1e-9)


def test_arrivals_reject_bad_input() -> None:
    with pytest.raises(WorkloadError, match="rate_per_s"):
        artifact_arrival_offsets_s(3, 0.0)
    with pytest.raises(WorkloadError, match="n must be"):
        artifact_arrival_offsets_s(-1, 1.0)


@pytest.mark.parametrize(
    ("label", "replayed"), [(1.634, 2.0), (0.5, 0.5), (1.5, 1.5)], ids=["1.634", "0.5", "1.5"]
)
def test_the_saturation_point_replays_the_2_per_s_run(label: float, replayed: float) -> None:
    assert recorded_rate(label) == replayed


def _rec(cid: str, send: float, start: float, dec: float, end: float) -> RecordedTurn1:
    return RecordedTurn1(cid, send, start, dec, end)


def test_replay_offsets_start_at_zero_from_the_chosen_event() -> None:
    recs = [_rec("a", 0.0, 0.1, 0.8, 0.9), _rec("b", 0.3, 0.8, 1.5, 1.6), _rec("c", 0.4, 1.5, 2.1, 2.3)]
    assert replay_offsets_s(recs, ReplayPoint.PREFILL_START) == pytest.approx({"a": 0.0, "b": 0.7, "c": 1.4})
    assert replay_offsets_s(recs, ReplayPoint.DECODE_START) == pytest.approx({"a": 0.0, "b": 0.7, "c": 1.3})
    assert replay_offsets_s([], ReplayPoint.DECODE_START) == {}
    assert REPLAY_POINT["colocated"] is ReplayPoint.PREFILL_START
    assert REPLAY_POINT["per-turn"] is ReplayPoint.DECODE_START


def test_recorded_turn_must_be_in_order() -> None:
    with pytest.raises(WorkloadError, match="out of order"):
        _rec("x", 1.0, 0.5, 2.0, 3.0)


def test_virtual_prefiller_waits_for_everything_in_flight() -> None:
    """Recorded requests span [send, response); the wait runs to the latest end among those in flight."""
    vp = VirtualPrefiller([
        _rec("a", 10.0, 10.0, 10.6, 10.7),  # relative [0.0, 0.7)
        _rec("b", 10.2, 10.7, 11.3, 11.5),  # [0.2, 1.5): queued behind a
        _rec("c", 13.0, 13.0, 13.6, 13.7),  # [3.0, 3.7)
    ])
    assert vp.busy_until_s(0.5) == pytest.approx(1.5)  # a and b in flight: wait for b's response
    assert vp.busy_until_s(2.0) == pytest.approx(2.0)  # nothing in flight
    assert vp.query_and_block(0.5, 0.1) == pytest.approx(1.0)
    assert len(vp.blocks) == 1
    assert vp.blocks[0] == pytest.approx((1.5, 1.6))
    # a block pushes a recorded start that falls inside it to the block's end
    assert vp.query_and_block(2.95, 0.2) == pytest.approx(0.0)
    assert vp.blocks[-1] == pytest.approx((2.95, 3.15))
    assert vp.busy_until_s(3.1) == pytest.approx(3.1)  # c now starts at 3.15
    assert vp.busy_until_s(3.2) == pytest.approx(3.85)
    shift = vp.turn1_shift_s()
    assert shift["a"] == pytest.approx(0.0)
    assert shift["b"] == pytest.approx(0.0)
    assert shift["c"] == pytest.approx(0.15)


def test_virtual_prefiller_wait_grows_with_an_oversaturated_backlog() -> None:
    """A recorded run offered 2 conv/s on a 1.634 conv/s prefiller: the backlog, hence the wait, grows
    linearly while arrivals last (about (2 - 1.634) / 1.634 s per s)."""
    service = 1.0 / 1.634
    recs, free = [], 0.0
    for k, send in enumerate(artifact_arrival_offsets_s(255, 2.0)):
        start = max(send, free)
        free = start + service
        recs.append(_rec(str(k), send, start, free, free + 0.02))
    vp = VirtualPrefiller(recs)
    waits = [vp.busy_until_s(t) - t for t in (20.0, 60.0, 100.0)]
    print("\nwait at 20 / 60 / 100 s:", ", ".join(f"{w:.1f} s" for w in waits))
    assert waits[0] < waits[1] < waits[2]
    assert waits[2] == pytest.approx(100.0 * (2.0 - 1.634) / 1.634, rel=0.5)


def test_virtual_prefiller_rejects_bad_input() -> None:
    with pytest.raises(WorkloadError, match="at least one"):
        VirtualPrefiller([])
    vp = VirtualPrefiller([_rec("a", 0.0, 0.0, 0.5, 0.6)])
    with pytest.raises(WorkloadError, match="block_s"):
        vp.query_and_block(0.0, -1.0)


def test_wrong_predictions_are_the_artifacts_draws() -> None:
    convs = [("c0", 5), ("c1", 3), ("c2", 1)]
    rng = random.Random(42)
    expect = {(cid, t) for cid, n in convs for t in range(2, n + 1) if rng.random() < 0.3}
    assert wrong_predicted_turns(convs, 0.3) == frozenset(expect)
    assert wrong_predicted_turns(convs, 0.0) == frozenset()
    everything = wrong_predicted_turns(convs, 1.0)
    assert everything == frozenset({("c0", t) for t in (2, 3, 4, 5)} | {("c1", 2), ("c1", 3)})
    with pytest.raises(WorkloadError, match="rate"):
        wrong_predicted_turns(convs, 1.5)


def test_the_papers_draw_hits_about_a_tenth_of_later_turns() -> None:
    wrong = wrong_predicted_turns([(str(k), 5) for k in range(255)])
    assert 80 < len(wrong) < 125  # 1,020 candidates at 10 %
    assert all(turn >= 2 for _, turn in wrong)


def test_compound_prompts_of_the_papers_trace(shared_data: Path) -> None:
    convs = load_conserve_trace(shared_data / "conserve" / "trace_profile_summary.csv")
    sizes = compound_prompt_tokens(c.turns[0].appended_tokens for c in convs)
    # the longest turn-1 prompt alone, two more alone, then a pair (24,247 + 23,169)
    assert sizes == (56_635, 29_338, 26_363, 47_416)


def test_compound_prompts_need_enough_text() -> None:
    assert compound_prompt_tokens([10, 20, 30], target_tokens=25, compounds=2) == (30, 30)
    with pytest.raises(WorkloadError, match="ran out"):
        compound_prompt_tokens([10, 20], target_tokens=25, compounds=2)


def test_pooled_token_slowdowns_weigh_conversations_by_their_tokens() -> None:
    gaps = {"long": [0.02] * 95, "short": [0.1] * 5, "no-base": [1.0]}
    base = {"long": 0.02, "short": 0.01}
    pooled = pooled_token_slowdowns(gaps, base)
    assert len(pooled) == 100
    assert float(np.percentile(pooled, 50)) == pytest.approx(1.0)
    # per conversation the slowdowns are 1 and 10; per token, 95 of 100 gaps are at 1
    assert float(np.percentile(pooled, 94)) == pytest.approx(1.0)
    assert pooled.max() == pytest.approx(10.0)
    assert len(pooled_token_slowdowns({}, {})) == 0


def test_split_window_energy() -> None:
    # decoders 250 kJ; the prefiller busy 150 s drawing 40 kJ in a 160 s window, idle 77 W otherwise
    assert split_window_energy_j(250e3, 40e3, 150.0, 160.0, 77.0) == pytest.approx(250e3 + 40e3 + 770.0)
    with pytest.raises(WorkloadError, match="busy"):
        split_window_energy_j(0.0, 1.0, 10.0, 5.0, 77.0)
