"""The prefill pool's parking rule (orchestrator/core/prefill_park.py ``PrefillParker``): it parks the pool
only after a turn-1 prefill was observed and while the decoders, with the turn-1 prefills added as a stall,
would stay in the cap controller's slack band for hold_s; it drains first (parks when nothing is queued),
wakes with a cold start when the decode pressure (trend-scaled) reaches wake_pressure."""

from __future__ import annotations

from orchestrator.core.power import ACTIVE, DRAINING, PARKED, WAKING, ParkingConfig
from orchestrator.core.prefill_park import PrefillParker


def cfg(**kw: float) -> ParkingConfig:
    return ParkingConfig(parked_w=11.0, prefill=True, **kw)  # type: ignore[arg-type]


def pins(k: int) -> set[str]:
    """Conversation k alone pinned (a new one every call: one arrival per step)."""
    return {f"c{k}"}


def test_parks_only_with_slack_after_hold_and_when_drained() -> None:
    p = PrefillParker(cfg(hold_s=20.0, window_s=30.0), ["p0"])
    # no turn-1 prefill observed yet: nothing parks however idle
    for k in range(10):
        assert p.step(5.0 * k, set(), None, 2, 0.0, True) == []
    # one arrival every 10 s, a 1 s prefill on 2 decoders: stall 5%; pressure 0.3 -> 0.32 <= 0.6
    t, k = 50.0, 0
    states = []
    while t <= 120.0:
        p.step(t, pins(k) if k % 2 == 0 else pins(k - 1), 1.0, 2, 0.3, False)
        states.append(p.pool_state)
        t, k = t + 5.0, k + 1
    assert states[0] == ACTIVE and DRAINING in states  # after hold_s of slack
    assert p.pool_state == DRAINING and not p.accepting("p0")  # still busy: not parked
    p.step(125.0, pins(100), 1.0, 2, 0.3, True)
    assert p.state == {"p0": PARKED}


def test_no_slack_with_the_stall_added_keeps_it_active() -> None:
    p = PrefillParker(cfg(hold_s=0.0, window_s=30.0), ["p0"])
    # pressure 0.5 alone is slack, but 1 arrival/s x 1 s prefill / 4 decoders = 25% stall: 0.5/0.75 = 0.67
    for k in range(90):  # the first 30 s: no prefill seen yet (the rate window fills meanwhile)
        p.step(float(k), {f"c{i}" for i in range(k + 1)}, 1.0 if k >= 30 else None, 4, 0.5, True)
        assert p.pool_state == ACTIVE
    # the same pressure with a 10% stall (1 arrival/s x 0.4 s / 4): 0.5/0.9 = 0.56, slack: it parks
    p.step(90.0, {f"c{i}" for i in range(91)}, 0.4, 4, 0.5, True)
    assert p.pool_state == DRAINING


def test_pressure_wakes_a_parked_pool_after_a_cold_start() -> None:
    p = PrefillParker(cfg(hold_s=0.0, wake_s=60.0), ["p0", "p1"])
    p.step(0.0, set(), 1.0, 2, 0.1, True)
    p.step(5.0, set(), 1.0, 2, 0.1, True)
    assert p.state == {"p0": PARKED, "p1": PARKED}
    p.step(10.0, set(), 1.0, 2, 0.7, True)
    assert p.pool_state == PARKED  # between the bands: hold
    p.step(15.0, set(), 1.0, 2, 0.9, True)
    assert p.pool_state == WAKING and not p.accepting("p1")
    p.step(45.0, set(), 1.0, 2, 0.1, True)
    assert p.pool_state == WAKING
    out = p.step(75.0, set(), 1.0, 2, 0.1, True)
    assert p.pool_state == ACTIVE and {c.instance_id for c in out} == {"p0", "p1"}
