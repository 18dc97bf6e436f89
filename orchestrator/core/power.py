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


# ---- parking: drain a decoder in a trough, stop its engine, start it again before it is needed ------------
#
# A cap cannot go below the idle draw of an engine that is loaded: ~77 W on the A40 with vLLM
# (tiers/catalog.py), a quarter of its TDP. Only an engine that is stopped (no CUDA context on the GPU) drops
# below it: idle power is set by the DVFS state the CUDA context forces, not by what is in memory
# (arXiv 2605.23918, "The Model Parking Tax": the context adds 26-50 W over bare idle on HBM GPUs and 66 W on
# the GDDR6 L40S; VRAM occupancy < 0.02 W/GB). So vLLM's sleep mode, which keeps the process and its context,
# saves memory, not power; a parked decoder here is an engine stopped, and waking it is a cold start.
#
# States of a decoder: active (takes new conversations) -> draining (keeps its pinned conversations, takes no
# new one) -> parked (no pins left: engine stopped, draws ``parked_w``) -> waking (cold start: draws the
# loaded idle, ``wake_s``, takes nothing) -> active. A draining decoder is re-activated at once when needed.
#
# How many decoders to keep active, from what was observed only (no future knowledge):
#
#     rate_now   = new conversations pinned in the last window_s / window_s
#     rate_prev  = the same over the window before
#     rate_proj  = max(rate_now, rate_now + (rate_now - rate_prev) / window_s * wake_s)   # the trend, carried
#                                                                     over the time a cold start takes
#     lifetime   = mean pinned lifetime of the conversations that ended (first seen -> gone)
#     kv_conv    = KV tokens held per pinned conversation now (the last value seen when none is pinned)
#     needed     = ceil(rate_proj x lifetime x kv_conv / (occupancy_target x kv_capacity))   (Little's law)
#                  and >= ceil(KV held now / (occupancy_target x kv_capacity)), >= min_active; + spare
#     wake now   when an active decoder's occupancy passes wake_occupancy or the pool's decode pressure
#                passes wake_pressure: needed >= active + 1
#
# More needed than active -> re-activate draining decoders, then wake parked ones. Fewer needed for hold_s
# in a row, nothing waking or draining -> drain the active decoder with the fewest pinned conversations.
# Until a conversation has ended (no lifetime yet) nothing is drained.
#
# Start (``start_active``, optional): a deployment starts from its plan, not from every GPU loaded. With
# ``start_active = k`` the first k decoders (in the pool's order) start active and the others start parked
# (their engines never started: a plan for the expected load that leaves GPUs unallocated). Until a lifetime
# is known, ``needed`` is then k (the plan's count) instead of every decoder; the wake triggers (occupancy,
# pressure) apply from the first step. None: every decoder starts active, as before.

ACTIVE, DRAINING, PARKED, WAKING = "active", "draining", "parked", "waking"


@dataclass(frozen=True, slots=True)
class ParkingConfig:
    parked_w: float  # draw per GPU of a stopped engine (no CUDA context)
    # an engine's cold start: vLLM's reload takes "30-100+ seconds per switch" (blog.vllm.ai, sleep mode)
    wake_s: float = 60.0
    occupancy_target: float = 0.5  # KV an active decoder is planned to hold (room for conversations' growth)
    window_s: float = 30.0  # arrival rate measured over
    hold_s: float = 60.0  # demand under the active count this long before a decoder drains (hysteresis)
    min_active: int = 1
    # decoders kept active beyond what Little's law asks (N+1): a cold start takes wake_s, so a step in load
    # (a burst) lands on the active ones before a parked one can help
    spare: int = 1
    wake_occupancy: float = 0.75
    wake_pressure: float = 0.85  # = ControllerConfig.upper: the TBT margin the cap controller keeps
    # decoders active at the start (the plan's count for the expected load); the rest start parked. None: all
    start_active: int | None = None
    # also park the prefill pool while its decoders could prefill turn-1 prompts locally and keep slack
    # (orchestrator/core/prefill_park.py); park_pressure = ControllerConfig.lower, the cap controller's slack
    prefill: bool = False
    park_pressure: float = 0.6

    def __post_init__(self) -> None:
        if not (self.parked_w >= 0 and self.wake_s >= 0 and self.window_s > 0 and self.hold_s >= 0):
            raise PlacementError("parking: parked_w, wake_s, hold_s must be >= 0 and window_s > 0")
        if not (0 < self.occupancy_target <= 1 and 0 < self.wake_occupancy <= 1 and self.min_active >= 1):
            raise PlacementError("parking: occupancies must be in (0, 1] and min_active >= 1")
        if self.start_active is not None and self.start_active < 1:
            raise PlacementError(
                f"parking: start_active must be >= 1 (or None: all active), got {self.start_active}"
            )


@dataclass(frozen=True, slots=True)
class DecoderObservation:
    instance_id: str
    pinned: frozenset[object]  # conversations pinned to it now
    kv_used_tokens: int
    kv_capacity_tokens: int


@dataclass(frozen=True, slots=True)
class ParkChange:
    t_s: float
    instance_id: str
    from_state: str
    to_state: str
    reason: str


def _ceil(x: float) -> int:
    """Ceiling that ignores float noise (a demand of 1.0000000001 decoders is 1)."""
    n = int(x)
    return n + 1 if x - n > 1e-9 else n


class Parker:
    """The parking rule over one decode pool (module comment above); keeps its own observations."""

    def __init__(self, cfg: ParkingConfig, instance_ids: Sequence[str]) -> None:
        self.cfg = cfg
        self.state = {i: ACTIVE for i in instance_ids}
        self.since = {i: 0.0 for i in instance_ids}
        self.first_seen: dict[object, float] = {}
        self.arrivals: list[float] = []
        self.lifetimes: list[float] = []
        self.kv_conv = 0.0
        self.under_since: float | None = None
        self.changes: list[ParkChange] = []
        if cfg.start_active is not None:  # the plan's count active, the rest parked from t = 0
            for i in list(instance_ids)[cfg.start_active :]:
                self._to(0.0, i, PARKED, f"start: the plan keeps {cfg.start_active} decoders active")

    def accepting(self, instance_id: str) -> bool:
        return self.state.get(instance_id, ACTIVE) == ACTIVE

    def _to(self, t: float, i: str, to: str, why: str) -> ParkChange:
        c = ParkChange(t, i, self.state[i], to, why)
        self.state[i], self.since[i] = to, t
        self.changes.append(c)
        return c

    def _observe(self, t: float, decoders: Sequence[DecoderObservation]) -> None:
        now: set[object] = set()
        for d in decoders:
            now |= d.pinned
        for c in now - self.first_seen.keys():
            self.first_seen[c] = t
            self.arrivals.append(t)
        for c in [c for c in self.first_seen if c not in now]:
            self.lifetimes.append(t - self.first_seen.pop(c))
        del self.lifetimes[:-200]  # the recent ones
        horizon = t - 2 * self.cfg.window_s
        while self.arrivals and self.arrivals[0] <= horizon:
            self.arrivals.pop(0)
        if now:
            self.kv_conv = sum(d.kv_used_tokens for d in decoders if d.pinned) / len(now)

    def needed(self, t: float, decoders: Sequence[DecoderObservation], pressure: float) -> int:
        cfg = self.cfg
        w = cfg.window_s
        n_now = sum(1 for a in self.arrivals if a > t - w)
        rate_now, rate_prev = n_now / w, (len(self.arrivals) - n_now) / w
        rate = max(rate_now, rate_now + (rate_now - rate_prev) / w * cfg.wake_s)
        cap = max(1.0, sum(d.kv_capacity_tokens for d in decoders) / max(len(decoders), 1))
        per = cfg.occupancy_target * cap
        held = sum(d.kv_used_tokens for d in decoders)
        if self.lifetimes:
            life = sum(self.lifetimes) / len(self.lifetimes)
            need = max(cfg.min_active, _ceil(rate * life * self.kv_conv / per), _ceil(held / per)) + cfg.spare
        elif cfg.start_active is not None:  # no lifetime yet: the plan's count
            need = max(cfg.start_active, _ceil(held / per))
        else:  # no lifetime yet and no plan: every decoder
            return len(decoders)
        active = [d for d in decoders if self.state[d.instance_id] == ACTIVE]
        hot = any(d.kv_used_tokens > cfg.wake_occupancy * d.kv_capacity_tokens for d in active)
        if hot or pressure >= cfg.wake_pressure:
            need = max(need, len(active) + 1)
        return min(need, len(decoders))

    def step(
        self, t: float, decoders: Sequence[DecoderObservation], pressure: float = 0.0
    ) -> list[ParkChange]:
        """One step at time ``t``: the decoders' states after it change as the returned list says."""
        cfg = self.cfg
        out: list[ParkChange] = []
        self._observe(t, decoders)
        by_id = {d.instance_id: d for d in decoders}
        for i, st in self.state.items():
            if st == WAKING and t - self.since[i] >= cfg.wake_s - 1e-9:
                out.append(self._to(t, i, ACTIVE, f"cold start done ({cfg.wake_s:g} s)"))
            elif st == DRAINING and not by_id[i].pinned:
                out.append(self._to(t, i, PARKED, "drained: engine stopped"))
        need = self.needed(t, decoders, pressure)
        ready = [i for i, s in self.state.items() if s in (ACTIVE, WAKING)]
        if need > len(ready):
            self.under_since = None
            short = need - len(ready)
            for i in sorted((i for i, s in self.state.items() if s == DRAINING),
                            key=lambda i: (-len(by_id[i].pinned), i))[:short]:  # fmt: skip
                out.append(self._to(t, i, ACTIVE, f"needed: {need} decoders"))
                short -= 1
            for i in sorted(i for i, s in self.state.items() if s == PARKED)[:short]:
                out.append(self._to(t, i, WAKING, f"needed: {need} decoders, cold start"))
        elif need < len(ready) and all(s in (ACTIVE, PARKED) for s in self.state.values()):
            if self.under_since is None:
                self.under_since = t
            if t - self.under_since >= cfg.hold_s:
                active = [i for i, s in self.state.items() if s == ACTIVE]
                i = min(active, key=lambda i: (len(by_id[i].pinned), by_id[i].kv_used_tokens, i))
                out.append(
                    self._to(t, i, DRAINING, f"{need} of {len(ready)} decoders needed for {cfg.hold_s:g} s")
                )
                self.under_since = None
        else:
            self.under_since = None
        return out
