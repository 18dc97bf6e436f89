"""The parking rule of the power controller (orchestrator/core/power.py ``Parker``): a decode pool drains its
least-used decoder once observed demand has stayed under the active count for ``hold_s``, parks it only when
no conversation is pinned to it, wakes parked decoders (a cold start of ``wake_s``) when demand grows, and
re-activates a draining one at once. Observations only: pinned conversations, KV held, decode pressure."""

from __future__ import annotations

import pytest

from orchestrator.core.power import (
    ACTIVE,
    DRAINING,
    PARKED,
    WAKING,
    DecoderObservation,
    Parker,
    ParkingConfig,
)
from placement.errors import PlacementError

CAP = 300_000
KV = 18_000  # per conversation


def obs(pins: dict[str, list[str]]) -> list[DecoderObservation]:
    return [DecoderObservation(i, frozenset(c), KV * len(c), CAP) for i, c in pins.items()]


def cfg(**kw: float) -> ParkingConfig:
    return ParkingConfig(parked_w=11.0, **kw)  # type: ignore[arg-type]


def test_low_load_drains_then_parks_only_without_pins() -> None:
    p = Parker(cfg(hold_s=20.0, spare=0), ["d0", "d1", "d2"])
    # one short conversation at a time: arrivals every 10 s, each gone by the next step
    t = 0.0
    for k in range(6):
        p.step(t, obs({"d0": [f"c{k}"], "d1": [], "d2": []}))
        t += 5.0
        p.step(t, obs({"d0": [], "d1": [], "d2": []}))
        t += 5.0
    assert list(p.state.values()).count(ACTIVE) < 3
    # a draining decoder that still holds a conversation is not parked ...
    p2 = Parker(cfg(hold_s=0.0, spare=0), ["d0", "d1"])
    p2.lifetimes = [5.0]
    p2.step(0.0, obs({"d0": [], "d1": ["x"]}))
    assert p2.state == {"d0": DRAINING, "d1": ACTIVE}  # the one with fewer pins drains
    p2.step(5.0, obs({"d0": [], "d1": ["x"]}))
    assert p2.state["d0"] == PARKED and not p2.accepting("d0")
    p3 = Parker(cfg(hold_s=0.0, spare=0), ["d0", "d1"])
    p3.lifetimes = [5.0]
    p3.step(0.0, obs({"d0": ["a"], "d1": ["b", "c"]}))
    assert p3.state["d0"] == DRAINING
    p3.step(5.0, obs({"d0": ["a"], "d1": ["b", "c"]}))
    assert p3.state["d0"] == DRAINING  # ... until its last conversation ends
    p3.step(10.0, obs({"d0": [], "d1": ["b", "c"]}))
    assert p3.state["d0"] == PARKED


def test_nothing_drains_before_any_lifetime_is_known() -> None:
    p = Parker(cfg(hold_s=0.0, spare=0), ["d0", "d1"])
    for t in range(0, 300, 5):
        assert p.step(float(t), obs({"d0": ["long"], "d1": []})) == []
    assert set(p.state.values()) == {ACTIVE}


def test_growing_demand_wakes_a_parked_decoder_after_a_cold_start() -> None:
    p = Parker(cfg(hold_s=0.0, spare=0, wake_s=60.0), ["d0", "d1"])
    p.lifetimes = [5.0]
    p.step(0.0, obs({"d0": [], "d1": []}))
    p.step(5.0, obs({"d0": [], "d1": []}))
    assert PARKED in p.state.values()
    parked = next(i for i, s in p.state.items() if s == PARKED)
    live = next(i for i in p.state if i != parked)
    # the active decoder fills past wake_occupancy: wake the parked one now
    many = [f"c{k}" for k in range(14)]  # 14 x 18k = 252k of 300k
    p.step(10.0, obs({live: many, parked: []}))
    assert p.state[parked] == WAKING and not p.accepting(parked)
    p.step(40.0, obs({live: many, parked: []}))
    assert p.state[parked] == WAKING  # the cold start is not over
    p.step(70.0, obs({live: many, parked: []}))
    assert p.state[parked] == ACTIVE and p.accepting(parked)


def test_a_draining_decoder_is_reactivated_at_once_and_pressure_wakes() -> None:
    p = Parker(cfg(hold_s=0.0, spare=0), ["d0", "d1"])
    p.lifetimes = [5.0]
    p.step(0.0, obs({"d0": [], "d1": ["x"]}))
    assert p.state["d0"] == DRAINING
    p.step(5.0, obs({"d0": ["y"], "d1": ["x"]}), pressure=0.9)  # TBT past wake_pressure
    assert p.state["d0"] == ACTIVE


def test_bad_config_is_refused() -> None:
    with pytest.raises(PlacementError):
        ParkingConfig(parked_w=-1.0)
    with pytest.raises(PlacementError):
        ParkingConfig(parked_w=10.0, occupancy_target=0.0)


def test_a_plan_based_start_parks_the_decoders_beyond_the_plan_and_keeps_them_parked() -> None:
    p = Parker(cfg(hold_s=0.0, spare=1, start_active=1), ["d0", "d1", "d2"])
    assert p.state == {"d0": ACTIVE, "d1": PARKED, "d2": PARKED}
    assert [(c.t_s, c.instance_id, c.to_state) for c in p.changes] == [
        (0.0, "d1", PARKED),
        (0.0, "d2", PARKED),
    ]
    # no conversation has ended yet: the plan's count holds (without start_active every decoder is needed)
    for t in range(0, 60, 5):
        assert p.step(float(t), obs({"d0": ["a", "b"], "d1": [], "d2": []})) == []
    # the wake triggers apply before any lifetime is known: decode pressure wakes one at once
    p.step(60.0, obs({"d0": ["a", "b"], "d1": [], "d2": []}), pressure=0.9)
    assert sorted(p.state.values()) == [ACTIVE, PARKED, WAKING]
    with pytest.raises(PlacementError):
        ParkingConfig(parked_w=11.0, start_active=0)
