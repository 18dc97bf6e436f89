"""Power-controller steps in the driver core: pools, what a driver measured over an interval, the PowerView.

The controller (placement/power.py) sees pools, not instances. Both drivers -- the simulator in virtual time
(orchestrator/sim/power.py) and the live server in wall time (orchestrator/power_loop.py) -- measure the same
things per pool over the last interval and build the view here, so the controller reads the same quantities
from both:

    pool        the instances of one tier in one role (id "<tier>/<role>"); caps: the tier's allowed ones
    latency     decoders (decode, colocated): token-weighted mean inter-token gap of the interval,
                    tbt_s = sum(step_s x tokens of the step) / sum(tokens)
                against tbt_budget_s = the TBT bound: ``tbt_s`` (absolute) or ``tbt_slowdown`` x the reference
                tier's decode step alone (batch 1) at the pool's mean context per sequence;
                prefillers (prefill, colocated): the p95 by ratio of the prefills that ended in the interval
                (arrival of the turn to the end of its prefill) and of those still waiting (their age so far,
                a lower bound), each against its own budget = ``ttft_s`` or ``ttft_slowdown`` x the reference
                tier's prefill of the same new tokens over the same cached prefix, alone.
    queue       prefill tokens waiting on the pool's instances now
    batch       mean running sequences per instance now
    power       mean draw of the pool over the interval (energy / interval), modelled or metered

Why a turn budget checks a conversation SLO: TTFET is a sum over the turns' segments, so when every turn keeps
within ``ttfet_slowdown`` x its standalone time the conversation does too (conservative). A colocated pool
reports the larger of its two pressures. Pure: no clock, no I/O; imports placement/ and tiers/ only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from placement.base import Role
from placement.errors import PlacementError
from placement.power import PoolObservation, PowerView


class ReferenceModel(Protocol):
    """What the budgets need of the reference tier (tiers.perf.TierModel satisfies it)."""

    def decode_step_time_s(self, batch: int, context_tokens: int) -> float: ...
    def prefill_time_s(self, new_tokens: int, cached_tokens: int = 0) -> float: ...


@dataclass(frozen=True, slots=True)
class PowerSlo:
    """The bounds the controller's pressures are measured against (from the fleet's SLO section)."""

    reference: ReferenceModel
    tbt_slowdown: float | None = 5.0
    ttft_slowdown: float | None = 5.0  # per turn; the fleet's ttfet_slowdown (see the module docstring)
    tbt_s: float | None = None  # absolute bounds win over slowdowns
    ttft_s: float | None = None

    def __post_init__(self) -> None:
        if self.tbt_s is None and self.tbt_slowdown is None:
            raise PlacementError(
                "the power controller needs a TBT bound. To fix: set slo.tbt_slowdown or slo.tbt_ms"
            )
        if self.ttft_s is None and self.ttft_slowdown is None:
            raise PlacementError(
                "the power controller needs a TTFET bound. To fix: set slo.ttfet_slowdown or slo.ttfet_s"
            )

    def tbt_budget_s(self, context_tokens: float) -> float:
        if self.tbt_s is not None:
            return self.tbt_s
        assert self.tbt_slowdown is not None
        return self.tbt_slowdown * self.reference.decode_step_time_s(1, max(int(context_tokens), 1))

    def prefill_budget_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """A prefill's budget: the bound, or the slowdown x the same prefill alone on the reference tier."""
        if self.ttft_s is not None:
            return self.ttft_s
        assert self.ttft_slowdown is not None
        return self.ttft_slowdown * self.reference.prefill_time_s(max(new_tokens, 1), max(cached_tokens, 0))


@dataclass(frozen=True, slots=True)
class PoolSpec:
    pool_id: str
    tier: str
    role: Role
    instance_ids: tuple[str, ...]
    gpus: int  # of the whole pool
    allowed_caps_w: tuple[float, ...]


class _InstanceLike(Protocol):
    @property
    def instance_id(self) -> str: ...
    @property
    def tier(self) -> str: ...
    @property
    def role(self) -> Role | str: ...


def pool_id(tier: str, role: Role | str) -> str:
    return f"{tier}/{Role(role).value}"


def pools_of(
    instances: Iterable[_InstanceLike], allowed_caps_w: Mapping[str, Sequence[float]], gpus: Mapping[str, int]
) -> list[PoolSpec]:
    """Group instances by (tier, role), in first-seen order. ``allowed_caps_w``: tier -> its caps per GPU;
    ``gpus``: instance id -> its GPUs. PlacementError naming the tier when it has no caps."""
    groups: dict[tuple[str, Role], list[str]] = {}
    for inst in instances:
        groups.setdefault((inst.tier, Role(inst.role)), []).append(inst.instance_id)
    out = []
    for (tier, role), ids in groups.items():
        caps = tuple(sorted({float(c) for c in allowed_caps_w.get(tier, ())}))
        if not caps:
            raise PlacementError(
                f"tier {tier!r} has no allowed power caps for the power controller. To fix: list "
                f"tiers[{tier}].power_caps_w in fleet.yaml (e.g. [300, 250, 200, 150])"
            )
        n_gpus = sum(gpus.get(i, 1) for i in ids)
        out.append(PoolSpec(pool_id(tier, role), tier, role, tuple(ids), n_gpus, caps))
    return out


@dataclass(slots=True)
class PoolInterval:
    """What a driver measured about one pool over the last interval (accumulated, then read once)."""

    duration_s: float = 0.0
    gap_token_s: float = 0.0  # sum over decode steps of step_s x sequences decoded in the step
    tokens: int = 0  # decode tokens emitted
    context_tokens: float = 0.0  # mean context per decoding sequence now (0: none decoding)
    # prefills that ended: (turn arrival -> prefill end s, new tokens, cached tokens)
    prefills: list[tuple[float, int, int]] = field(default_factory=list)
    # prefills still queued or running: (age so far s, new tokens, cached tokens)
    waiting: list[tuple[float, int, int]] = field(default_factory=list)
    queue_tokens: int = 0
    batch: float = 0.0
    energy_j: float | None = None  # None: no meter for this pool


def _p95_ratio(items: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(latency, budget) of the item at the 95th percentile of latency / budget (nearest rank)."""
    ranked = sorted(items, key=lambda lb: lb[0] / lb[1])
    k = min(len(ranked) - 1, max(0, -(-95 * len(ranked) // 100) - 1))
    return ranked[k]


def observation(spec: PoolSpec, cap_w: float, iv: PoolInterval, slo: PowerSlo) -> PoolObservation:
    """One pool's :class:`PoolObservation` (rules in the module docstring)."""
    cands: list[tuple[float, float]] = []
    if spec.role.can_decode and iv.tokens > 0:
        cands.append((iv.gap_token_s / iv.tokens, slo.tbt_budget_s(iv.context_tokens)))
    if spec.role.can_prefill_remote:
        pre = [(lat, slo.prefill_budget_s(n, c)) for lat, n, c in (*iv.prefills, *iv.waiting)]
        if pre:
            cands.append(_p95_ratio(pre))
    latency_s, budget_s = max(cands, key=lambda lb: lb[0] / lb[1]) if cands else (0.0, 1.0)
    power_w = None
    if iv.energy_j is not None and iv.duration_s > 0:
        power_w = iv.energy_j / iv.duration_s
    return PoolObservation(
        spec.pool_id, spec.role, spec.gpus, cap_w, spec.allowed_caps_w, latency_s, budget_s,
        iv.queue_tokens, iv.batch, power_w,
    )  # fmt: skip


def power_view(
    specs: Sequence[PoolSpec],
    caps_w: Mapping[str, float],
    intervals: Mapping[str, PoolInterval],
    slo: PowerSlo,
    budget_w: float | None = None,
) -> PowerView:
    """The controller's view of every pool (``caps_w``, ``intervals``: by pool id)."""
    empty = PoolInterval()
    obs = (observation(s, caps_w[s.pool_id], intervals.get(s.pool_id, empty), slo) for s in specs)
    return PowerView(tuple(obs), budget_w)
