"""Attribution conserves energy: property tests over random interval schedules (hypothesis)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from energy.attribution import (
    EngineInterval,
    IdlePolicy,
    PhaseWeights,
    Work,
    attribute,
    attribute_all,
    check_conservation,
    phase_weights,
)
from energy.errors import EnergyError
from energy.records import Source
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel

T0 = datetime(2025, 1, 1, tzinfo=UTC)
CONVS = [f"c{i}" for i in range(6)]

energies = st.one_of(st.just(0.0), st.floats(1e-6, 1e7, allow_nan=False, allow_infinity=False))
tokens = st.one_of(st.just(0.0), st.floats(0.0, 1e6, allow_nan=False), st.integers(0, 50_000).map(float))
works = st.lists(st.builds(Work, st.sampled_from(CONVS), st.integers(1, 4), tokens, tokens), max_size=12)


@st.composite
def schedules(draw: st.DrawFn) -> list[EngineInterval]:
    """Random engines x consecutive intervals, each with random work of random conversations."""
    out = []
    for e in range(draw(st.integers(1, 3))):
        t = T0
        weights = draw(
            st.one_of(st.none(), st.builds(PhaseWeights, st.floats(1e-4, 10), st.floats(1e-4, 10)))
        )
        for _ in range(draw(st.integers(1, 5))):
            dt = timedelta(seconds=draw(st.floats(0.001, 60.0)))  # distinct bounds per engine
            energy = draw(energies)
            idle = draw(st.one_of(st.just(0.0), st.floats(0, 2e7)))
            out.append(
                EngineInterval(
                    f"e{e}", t, t + dt, energy, idle, tuple(draw(works)), Source.MEASURED, "a40", weights
                )
            )
            t = t + dt
    return out


@settings(max_examples=150, deadline=None)
@given(schedules(), st.sampled_from(list(IdlePolicy)))
def test_rows_sum_to_metered_energy_and_are_non_negative(
    intervals: list[EngineInterval], idle: IdlePolicy
) -> None:
    rows = attribute_all(intervals, idle)
    check_conservation(intervals, rows, rel_tol=1e-9)
    assert all(r.joules >= 0 and r.work_share >= 0 for r in rows)
    for iv in intervals:
        mine = [
            r
            for r in rows
            if r.engine_id == iv.engine_id and r.interval_start == iv.start and r.interval_end == iv.end
        ]
        total = math.fsum(r.joules for r in mine)
        assert total == pytest.approx(iv.energy_j, rel=1e-9, abs=0)
        if iv.energy_j > 0:
            assert math.fsum(r.work_share for r in mine) == pytest.approx(1.0, rel=1e-9)


@settings(max_examples=150, deadline=None)
@given(schedules(), st.sampled_from(list(IdlePolicy)))
def test_only_conversations_that_worked_in_the_interval_get_rows(
    intervals: list[EngineInterval], idle: IdlePolicy
) -> None:
    for iv in intervals:
        weights = iv.weights or PhaseWeights(1.0, 1.0)
        worked = {(w.conversation_id, w.turn) for w in iv.work if w.weight(weights) > 0}
        rows = attribute(iv, idle)
        got = {(r.conversation_id, r.turn) for r in rows if not r.is_idle}
        assert got <= worked
        if iv.energy_j > 0 and (idle == IdlePolicy.SHARE or iv.energy_j > iv.idle_j):
            assert (
                got == worked
            )  # every worker with positive work gets something when there is energy to share
        assert sum(1 for r in rows if r.is_idle) <= 1


def test_split_follows_weighted_work_and_idle_goes_to_its_row() -> None:
    iv = EngineInterval(
        "d0",
        T0,
        T0 + timedelta(seconds=1),
        energy_j=300.0,
        idle_j=100.0,
        work=(Work("a", 1, prefill_tokens=100), Work("b", 2, decode_tokens=100)),
        source=Source.MODELLED,
        weights=PhaseWeights(3.0, 1.0),
    )
    rows = {(r.conversation_id, r.turn): r for r in attribute(iv)}
    assert rows[("a", 1)].joules == pytest.approx(150.0)  # 300 weight units of 400
    assert rows[("b", 2)].joules == pytest.approx(50.0)
    assert rows[(None, None)].joules == pytest.approx(100.0)
    shared = {(r.conversation_id, r.turn): r.joules for r in attribute(iv, IdlePolicy.SHARE)}
    assert shared == pytest.approx({("a", 1): 225.0, ("b", 2): 75.0})


def test_interval_without_work_is_all_idle() -> None:
    iv = EngineInterval("d0", T0, T0, 42.0, 10.0, (Work("a", 1, 0, 0),), Source.MEASURED)
    (row,) = attribute(iv)
    assert row.is_idle and row.joules == 42.0 and row.work_share == 1.0


def test_negative_energy_is_refused_with_the_likely_cause() -> None:
    with pytest.raises(EnergyError, match="counter reset"):
        EngineInterval("d0", T0, T0, -1.0, 0.0, (), Source.MEASURED)


def test_tier_phase_weights_make_a_prefill_token_cheaper_than_a_decode_token() -> None:
    tier = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    w = phase_weights(tier)
    assert 0 < w.prefill_j_per_token < w.decode_j_per_token
