"""The online power controller (placement/power.py) as a pure function: named scenarios, then hypothesis
properties -- caps stay in the allowed set, a feasible fleet budget is never exceeded, a pool's cap never
falls as its own pressure or queue rises, and observations in the hold band never move a cap."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placement.base import Role
from placement.errors import PlacementError
from placement.power import (
    ControllerConfig,
    ControllerState,
    PoolObservation,
    PowerController,
    PowerView,
    decide,
)

A40_CAPS = (150.0, 200.0, 250.0, 300.0)


def pool(
    pid: str = "d", role: Role = Role.DECODE, cap: float = 300.0, latency_s: float = 0.05, slo_s: float = 0.1,
    queue: int = 0, batch: float = 8.0, gpus: int = 3, power_w: float | None = None,
) -> PoolObservation:  # fmt: skip
    return PoolObservation(pid, role, gpus, cap, A40_CAPS, latency_s, slo_s, queue, batch, power_w)


def step(*pools: PoolObservation, budget_w: float | None = None, state: ControllerState | None = None):  # type: ignore[no-untyped-def]
    return decide(PowerView(pools, budget_w), state or ControllerState())


@pytest.mark.parametrize(
    ("obs", "to_w", "why"),
    [
        (pool(latency_s=0.05), 250.0, "slack"),  # TBT at 50% of the SLO: decoders down
        (pool(latency_s=0.07), None, ""),  # 70%: in the hold band
        (pool(cap=200.0, latency_s=0.09), 250.0, "pressure 0.90"),  # 90%: up
        (pool(cap=150.0, latency_s=0.2), 200.0, "pressure 2.00"),  # violating: up (one step)
        (pool(cap=150.0, latency_s=0.01), None, ""),  # already at the lowest cap
        (pool(cap=300.0, latency_s=0.2), None, ""),  # already at the highest cap
        (pool("p", Role.PREFILL, cap=200.0, latency_s=0.05, queue=50_000), 250.0, "queue growing"),
        (pool("p", Role.PREFILL, latency_s=0.0, queue=0, batch=0.0), 250.0, "slack"),  # idle
        (pool(cap=200.0, latency_s=0.09, power_w=300.0), None, ""),  # drawing 300 of 600 W: cap not binding
        (pool(cap=240.0, latency_s=0.07), 250.0, "snapped"),  # a cap off the allowed list
    ],
    ids=["decode-slack", "hold-band", "decode-pressure", "violation", "at-min", "at-max", "prefill-queue",
         "idle", "not-power-limited", "snap"],
)  # fmt: skip
def test_scenarios(obs: PoolObservation, to_w: float | None, why: str) -> None:
    decision, _ = step(obs)
    change = decision.change_of(obs.pool_id)
    if to_w is None:
        assert change is None, change
    else:
        assert change is not None and change.to_w == to_w and why in change.reason


def test_hysteresis_holds_a_new_cap_unless_the_slo_is_violated() -> None:
    ctl = PowerController(ControllerConfig(hold_steps=2))
    assert ctl.step(PowerView((pool(latency_s=0.05),))).caps_w["d"] == 250.0
    held = ctl.step(PowerView((pool(cap=250.0, latency_s=0.05),)))  # still slack, but holding
    assert held.changes == ()
    up = ctl.step(PowerView((pool(cap=250.0, latency_s=0.11),)))  # violated: moves at once
    assert up.caps_w["d"] == 300.0
    assert ctl.step(PowerView((pool(cap=300.0, latency_s=0.09),))).changes == ()  # pressure, but holding


def test_a_budget_lowers_the_pool_with_the_most_slack_first() -> None:
    pre = pool("p", Role.PREFILL, cap=300.0, latency_s=0.08, gpus=1)  # pressure 0.8
    dec = pool("d", cap=300.0, latency_s=0.07, gpus=3)  # 0.7
    decision, _ = step(pre, dec, budget_w=1100.0)  # 4 x 300 = 1200 W: 100 W too much
    assert decision.caps_w == {"p": 300.0, "d": 250.0} and decision.total_cap_w == 1050.0
    assert "fleet budget" in (decision.change_of("d") or pytest.fail()).reason


def test_an_infeasible_budget_puts_every_pool_at_its_lowest_cap_and_says_by_how_much() -> None:
    decision, _ = step(pool("a", gpus=2), pool("b", gpus=2), budget_w=500.0)
    assert decision.caps_w == {"a": 150.0, "b": 150.0} and decision.over_budget_w == pytest.approx(100.0)


def test_a_raise_that_does_not_fit_the_budget_is_refused_with_a_reason() -> None:
    decision, _ = step(pool("d", cap=250.0, latency_s=0.09, gpus=4), budget_w=1000.0)
    assert decision.changes == () and decision.total_cap_w == 1000.0


def test_bad_observations_and_settings_are_refused() -> None:
    with pytest.raises(PlacementError, match="unique"):
        step(pool("a"), pool("a"))
    with pytest.raises(PlacementError, match="allowed_caps_w"):
        step(replace(pool(), allowed_caps_w=()))
    with pytest.raises(PlacementError, match="slo_s"):
        step(pool(slo_s=0.0))
    with pytest.raises(PlacementError, match="lower < upper"):
        ControllerConfig(lower=0.9, upper=0.8)


# ---- properties -------------------------------------------------------------------------------------------
caps_st = st.lists(st.sampled_from([100.0, 150.0, 175.0, 200.0, 250.0, 300.0, 350.0, 400.0]), min_size=1,
                   max_size=5, unique=True).map(lambda c: tuple(sorted(c)))  # fmt: skip


@st.composite
def pools_st(draw: st.DrawFn) -> tuple[PoolObservation, ...]:
    n = draw(st.integers(1, 5))
    out = []
    for k in range(n):
        caps = draw(caps_st)
        out.append(PoolObservation(
            pool_id=f"pool{k}", role=draw(st.sampled_from(list(Role))), gpus=draw(st.integers(1, 16)),
            cap_w=draw(st.sampled_from(caps)), allowed_caps_w=caps,
            latency_s=draw(st.floats(0, 0.5)), slo_s=draw(st.floats(0.01, 0.3)),
            queue_tokens=draw(st.integers(0, 200_000)), batch=draw(st.floats(0, 64)),
            power_w=draw(st.none() | st.floats(0, 10_000)),
        ))  # fmt: skip
    return tuple(out)


@st.composite
def states_st(draw: st.DrawFn, pools: tuple[PoolObservation, ...]) -> ControllerState:
    from placement.power import _PoolState

    return ControllerState({p.pool_id: _PoolState(draw(st.integers(0, 5)), draw(st.integers(0, 200_000)))
                            for p in pools})  # fmt: skip


def _min_total(pools: tuple[PoolObservation, ...]) -> float:
    """The fleet's cap total with every pool at its lowest cap."""
    return sum(p.gpus * min(p.allowed_caps_w) for p in pools)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), pools=pools_st(), slack=st.floats(-2000, 20_000))
def test_caps_stay_allowed_and_a_feasible_budget_is_never_exceeded(
    data: st.DataObject, pools: tuple[PoolObservation, ...], slack: float
) -> None:
    state = data.draw(states_st(pools))
    budget = _min_total(pools) + slack
    decision, _ = decide(PowerView(pools, budget), state)
    for p in pools:
        assert decision.caps_w[p.pool_id] in p.allowed_caps_w
    if budget >= _min_total(pools):
        assert decision.total_cap_w <= budget + 1e-6 and decision.over_budget_w == 0.0
    else:
        assert all(decision.caps_w[p.pool_id] == min(p.allowed_caps_w) for p in pools)
        assert decision.over_budget_w == pytest.approx(_min_total(pools) - budget, abs=1e-6)
    unbudgeted, _ = decide(PowerView(pools), state)
    for p in pools:  # without a budget a cap moves by at most one allowed step
        levels = sorted(p.allowed_caps_w)
        near = min(range(len(levels)), key=lambda i: (abs(levels[i] - p.cap_w), i))
        assert abs(levels.index(unbudgeted.caps_w[p.pool_id]) - near) <= 1


@settings(max_examples=300, deadline=None)
@given(data=st.data(), pools=pools_st(), use_budget=st.booleans(), frac=st.floats(0, 1))
def test_a_pools_cap_never_falls_as_its_pressure_or_queue_rises(
    data: st.DataObject, pools: tuple[PoolObservation, ...], use_budget: bool, frac: float
) -> None:
    state = data.draw(states_st(pools))
    k = data.draw(st.integers(0, len(pools) - 1))
    # a budget between every pool at its lowest and every pool at its highest cap: often binding
    top = sum(p.gpus * max(p.allowed_caps_w) for p in pools)
    budget = _min_total(pools) + frac * (top - _min_total(pools)) if use_budget else None
    p = pools[k]
    worse = replace(p, latency_s=p.latency_s + data.draw(st.floats(0, 0.5)),
                    queue_tokens=p.queue_tokens + data.draw(st.integers(0, 100_000)))  # fmt: skip
    base, _ = decide(PowerView(pools, budget), state)
    more, _ = decide(PowerView(pools[:k] + (worse,) + pools[k + 1 :], budget), state)
    assert more.caps_w[p.pool_id] >= base.caps_w[p.pool_id]


@settings(max_examples=200, deadline=None)
@given(pools=pools_st(), steps=st.integers(1, 6), frac=st.floats(0.61, 0.84))
def test_steady_observations_in_the_hold_band_never_move_a_cap(
    pools: tuple[PoolObservation, ...], steps: int, frac: float
) -> None:
    steady = tuple(replace(p, latency_s=frac * p.slo_s, queue_tokens=0, batch=max(p.batch, 1.0),
                           cap_w=p.allowed_caps_w[0]) for p in pools)  # fmt: skip
    ctl = PowerController()
    for _ in range(steps):
        assert ctl.step(PowerView(steady)).changes == ()
