"""The power controller's view in the driver core (orchestrator/core/power.py) and the load-swing arrivals
(orchestrator/load_swing.py): pools by tier x role, pressures against the SLO budgets, a profile's rate
integrated and inverted, the 4x swing's shape."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.core.power import PoolInterval, PowerSlo, pools_of, power_view
from orchestrator.errors import WorkloadError
from orchestrator.load_swing import RateProfile, load_swing, profiled_arrivals
from orchestrator.workload import ConversationSpec, TurnSpec
from placement.base import Role
from placement.errors import PlacementError


class Ref:
    def decode_step_time_s(self, batch: int, context_tokens: int) -> float:
        return 0.01 + 1e-6 * context_tokens

    def prefill_time_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        return 1e-4 * new_tokens


class I:  # noqa: E742 - a tiny instance record
    def __init__(self, iid: str, tier: str, role: Role) -> None:
        self.instance_id, self.tier, self.role = iid, tier, role


def test_pools_group_by_tier_and_role_and_need_caps() -> None:
    specs = pools_of([I("p", "a", Role.PREFILL), I("d1", "a", Role.DECODE), I("d2", "a", Role.DECODE)],
                     {"a": [300, 150, 200]}, {"d1": 2})  # fmt: skip
    assert [(s.pool_id, s.instance_ids, s.gpus, s.allowed_caps_w) for s in specs] == [
        ("a/prefill", ("p",), 1, (150.0, 200.0, 300.0)), ("a/decode", ("d1", "d2"), 3, (150.0, 200.0, 300.0))
    ]  # fmt: skip
    with pytest.raises(PlacementError, match="power_caps_w"):
        pools_of([I("p", "b", Role.PREFILL)], {}, {})


def test_pressures_against_the_budgets() -> None:
    specs = pools_of([I("p", "a", Role.PREFILL), I("d", "a", Role.DECODE)], {"a": [200, 300]}, {})
    slo = PowerSlo(Ref())  # slowdown 5 on both
    ivs = {
        # 100 tokens at 30 ms, mean context 10k: budget 5 x (10 + 10) ms = 100 ms -> pressure 0.3
        "a/decode": PoolInterval(
            5.0, gap_token_s=3.0, tokens=100, context_tokens=10_000, batch=4, energy_j=1000
        ),
        # p95 (nearest rank: the 19th of 20) of prefills of 1000 new tokens (budget 0.5 s): 18 at 0.1 s and
        # two at 1.0 s -> 1.0 / 0.5
        "a/prefill": PoolInterval(5.0, prefills=[(0.1, 1000, 0)] * 18 + [(1.0, 1000, 0)] * 2, batch=1),
    }
    view = power_view(specs, {"a/prefill": 300.0, "a/decode": 300.0}, ivs, slo)
    obs = {p.pool_id: p for p in view.pools}
    assert obs["a/decode"].latency_s / obs["a/decode"].slo_s == pytest.approx(0.3)
    assert obs["a/decode"].power_w == pytest.approx(200.0)
    assert obs["a/prefill"].latency_s / obs["a/prefill"].slo_s == pytest.approx(2.0)
    assert obs["a/prefill"].power_w is None  # no meter
    with pytest.raises(PlacementError, match="TBT bound"):
        PowerSlo(Ref(), tbt_slowdown=None)


def test_profile_integrates_and_inverts() -> None:
    p = load_swing(0.5, 4.0, trough_s=100, ramp_s=50, burst_s=20)
    assert p.peak_over_trough == pytest.approx(4.0)
    assert p.rate_at(50) == 0.5 and p.rate_at(150) == pytest.approx(2.0) and p.rate_at(310) == 2.0
    assert p.cumulative(100) == pytest.approx(50.0)
    assert p.cumulative(150) == pytest.approx(50.0 + 50 * 1.25)
    for t in (0.0, 37.0, 120.0, 199.0, 300.5, 500.0):
        assert p.inverse(p.cumulative(t)) == pytest.approx(t, abs=1e-6)
    with pytest.raises(WorkloadError, match="time 0"):
        RateProfile(((1.0, 1.0),))


def test_arrivals_follow_the_rate() -> None:
    p = load_swing(1.0, 4.0, trough_s=200, ramp_s=100, burst_s=100)
    n = int(p.cumulative(700))
    convs = [ConversationSpec(f"c{i}", 0.0, (TurnSpec(10, 1),)) for i in range(n)]
    t = np.array([c.arrival_s for c in profiled_arrivals(convs, p, seed=3)])
    assert np.all(np.diff(t) >= 0)
    trough = np.sum((t >= 0) & (t < 200)) / 200
    burst = np.sum((t >= 600) & (t < 700)) / 100
    assert 3.0 < burst / trough < 5.5  # a 4x swing, Poisson noise allowed
    assert profiled_arrivals(convs, p, seed=3) == profiled_arrivals(convs, p, seed=3)
