"""Online power controller: a policy for GPU power caps. Observations in, cap changes out, as data.

Every few seconds a driver (the simulator in virtual time, the live server in wall time) builds a
:class:`PowerView` of its pools -- the instances of one tier in one role -- and calls
``controller.step(view)``; it applies the returned :class:`PowerDecision` (the simulator swaps the pool's tier
model, the live server calls energy/power.py). Beyond the paper; anchors: BiScale's per-phase DVFS, RAPID's
power reallocation under a budget, DynamoLLM's reconfiguration with hysteresis. No clock, no I/O.

Per pool (symbols as in the code):

    pressure  p = latency_s / slo_s            decoders: mean TBT of the last interval vs the TBT SLO;
                                               prefillers: p95 TTFT of the interval's prefills vs its budget
    idle      batch == 0 and queue_tokens == 0: p = 0 (no work is slowed by a cap)
    growing   queue_tokens > last_queue * (1 + queue_growth) + min_queue_tokens     (prefillers)
    up        p >= upper, or a prefiller whose queue is growing        -> one allowed cap higher
    down      p <= lower and the queue is not growing                  -> one allowed cap lower
    hold      otherwise; and for ``hold_steps`` steps after a change (hysteresis), unless p >= emergency
    no gain   a raise is skipped when the pool draws < headroom x its cap (power_w known): the cap is not
              what slows it

Fleet budget (optional, ``budget_w``): the sum over pools of gpus x cap, the most the fleet can draw, stays
<= budget_w. Decreases are applied first; while over the budget the pool with the lowest pressure steps down
(hold is ignored: the budget is a hard limit); raises are then granted by decreasing pressure while they fit.
When even every pool at its lowest cap exceeds the budget, all are at their lowest and ``over_budget_w`` says
by how much.

Properties (tests/placement/test_power_controller.py, hypothesis): caps always in the allowed set; never over
a feasible budget; a pool's new cap never falls as its own pressure or queue rises; constant observations in
the hold band never change a cap. The thresholds are not fitted to any result: ``upper`` keeps a 15% margin
to the SLO, ``lower`` steps down only with 40% slack, so one step (typically 25-50 W, a few percent of
compute speed, tiers/power.py) cannot carry a pool from slack to violation.
Must not import fastapi, sqlalchemy, httpx, or anything that reads wall-clock time.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field

from placement.base import Role
from placement.errors import PlacementError


@dataclass(frozen=True, slots=True)
class PoolObservation:
    """What a driver observed about one pool over the last interval."""

    pool_id: str
    role: Role
    gpus: int  # GPUs of the whole pool (instances x tp)
    cap_w: float  # current cap per GPU
    allowed_caps_w: tuple[float, ...]  # the tier's allowed caps per GPU
    latency_s: float  # the role's latency metric over the interval (see module docstring)
    slo_s: float  # its bound
    queue_tokens: int = 0  # prefill tokens waiting
    batch: float = 0.0  # mean running sequences per instance
    power_w: float | None = None  # measured or modelled mean draw of the pool (None: unknown)


@dataclass(frozen=True, slots=True)
class PowerView:
    pools: tuple[PoolObservation, ...]
    budget_w: float | None = None  # fleet cap budget: sum of gpus x cap over pools


@dataclass(frozen=True, slots=True)
class CapChange:
    pool_id: str
    from_w: float
    to_w: float
    reason: str


@dataclass(frozen=True, slots=True)
class PowerDecision:
    changes: tuple[CapChange, ...]
    caps_w: Mapping[str, float]  # every pool's cap after the decision
    total_cap_w: float  # sum of gpus x cap
    over_budget_w: float = 0.0  # > 0: the budget cannot be met even at the lowest caps

    def change_of(self, pool_id: str) -> CapChange | None:
        return next((c for c in self.changes if c.pool_id == pool_id), None)


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    lower: float = 0.6  # pressure at or below: slack, step down
    upper: float = 0.85  # at or above: step up (15% margin to the SLO)
    emergency: float = 1.0  # at or above (the SLO is violated): step up even while holding
    hold_steps: int = 2  # steps a pool keeps a new cap before it may move again
    queue_growth: float = 0.25  # prefill queue growing: more than 25% over the last interval's ...
    min_queue_tokens: int = 2048  # ... plus this (one long turn-1 prompt is not a trend)
    headroom: float = 0.9  # a pool drawing below 90% of its cap is not held back by it

    def __post_init__(self) -> None:
        if not 0 <= self.lower < self.upper <= self.emergency:
            raise PlacementError(
                "power controller thresholds must satisfy 0 <= lower < upper <= emergency, got "
                f"{self.lower}, {self.upper}, {self.emergency}"
            )
        if self.hold_steps < 0 or self.queue_growth < 0 or self.min_queue_tokens < 0 or self.headroom <= 0:
            raise PlacementError("power controller: hold_steps, queue_growth, min_queue_tokens must be >= 0")


@dataclass(frozen=True, slots=True)
class _PoolState:
    since_change: int = 1_000_000  # steps since the last change
    last_queue_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ControllerState:
    pools: Mapping[str, _PoolState] = field(default_factory=dict)


def _levels(p: PoolObservation) -> tuple[float, ...]:
    levels = tuple(sorted(set(p.allowed_caps_w)))
    if not levels or levels[0] <= 0:
        raise PlacementError(f"pool {p.pool_id!r}: allowed_caps_w must list caps > 0, got {p.allowed_caps_w}")
    return levels


def _index(levels: tuple[float, ...], cap_w: float) -> int:
    """The allowed level nearest to cap_w (a cap outside the list is snapped)."""
    i = bisect.bisect_left(levels, cap_w)
    if i == len(levels) or (i > 0 and cap_w - levels[i - 1] <= levels[i] - cap_w):
        i -= 1
    return max(i, 0)


def pressure(p: PoolObservation) -> float:
    if p.batch <= 0 and p.queue_tokens <= 0:
        return 0.0
    if p.slo_s <= 0:
        raise PlacementError(f"pool {p.pool_id!r}: slo_s must be > 0, got {p.slo_s}")
    return max(p.latency_s, 0.0) / p.slo_s


def decide(
    view: PowerView, state: ControllerState, cfg: ControllerConfig = ControllerConfig()
) -> tuple[PowerDecision, ControllerState]:
    """One controller step (rules in the module docstring): the decision and the next state."""
    ids = [p.pool_id for p in view.pools]
    if len(set(ids)) != len(ids):
        raise PlacementError(f"power controller: pool ids must be unique, got {ids}")
    levels = {p.pool_id: _levels(p) for p in view.pools}
    now = {p.pool_id: _index(levels[p.pool_id], p.cap_w) for p in view.pools}
    target = dict(now)
    reasons: dict[str, str] = {}
    press = {p.pool_id: pressure(p) for p in view.pools}
    raises: list[str] = []
    for p in view.pools:
        st = state.pools.get(p.pool_id, _PoolState())
        pr, i = press[p.pool_id], now[p.pool_id]
        growing = p.role.can_prefill_remote and p.queue_tokens > (
            st.last_queue_tokens * (1 + cfg.queue_growth) + cfg.min_queue_tokens
        )
        holding = st.since_change < cfg.hold_steps
        want_up = pr >= cfg.upper or growing
        if want_up and i + 1 < len(levels[p.pool_id]) and (not holding or pr >= cfg.emergency):
            capped = p.power_w is None or p.power_w >= cfg.headroom * p.gpus * levels[p.pool_id][i]
            if capped:
                raises.append(p.pool_id)
                reasons[p.pool_id] = f"pressure {pr:.2f}" + (" and queue growing" if growing else "")
            else:
                reasons[p.pool_id] = f"pressure {pr:.2f}, but drawing < {cfg.headroom:.0%} of the cap: hold"
        elif pr <= cfg.lower and not growing and not holding and i > 0:
            target[p.pool_id] = i - 1
            reasons[p.pool_id] = f"slack: pressure {pr:.2f} <= {cfg.lower}"

    gpus = {p.pool_id: p.gpus for p in view.pools}
    cap_of = {p.pool_id: p.cap_w for p in view.pools}

    def total(t: Mapping[str, int]) -> float:
        return sum(gpus[k] * levels[k][t[k]] for k in t)

    over = 0.0
    if view.budget_w is not None:
        while total(target) > view.budget_w + 1e-9:  # lowest pressure steps down first (ties: by id)
            movable = [k for k in ids if target[k] > 0]
            if not movable:
                over = total(target) - view.budget_w
                break
            k = min(movable, key=lambda k: (press[k], k))
            target[k] -= 1
            reasons[k] = f"fleet budget {view.budget_w:g} W"
    for k in sorted(raises, key=lambda k: (-press[k], k)):  # highest pressure first
        trial = dict(target)
        trial[k] = now[k] + 1 if target[k] == now[k] else target[k]
        if trial[k] > target[k] and (view.budget_w is None or total(trial) <= view.budget_w + 1e-9):
            target = trial
        else:
            reasons[k] += f"; no room in the fleet budget {view.budget_w:g} W"

    changes = tuple(
        CapChange(k, cap_of[k], levels[k][target[k]], reasons.get(k, "snapped to the nearest allowed cap"))
        for k in ids
        if levels[k][target[k]] != cap_of[k]
    )
    changed = {c.pool_id for c in changes}
    new_state = ControllerState(
        {
            p.pool_id: _PoolState(
                0 if p.pool_id in changed else min(state.pools.get(p.pool_id, _PoolState()).since_change + 1,
                                                  1_000_000),
                p.queue_tokens,
            )
            for p in view.pools
        }
    )  # fmt: skip
    caps = {k: levels[k][target[k]] for k in ids}
    return PowerDecision(changes, caps, total(target), over), new_state


class PowerController:
    """The controller as an object, like a placement policy: it keeps its own state between steps."""

    name = "power-controller"

    def __init__(self, config: ControllerConfig | None = None) -> None:
        self.config = config or ControllerConfig()
        self.state = ControllerState()

    def step(self, view: PowerView) -> PowerDecision:
        decision, self.state = decide(view, self.state, self.config)
        return decision
