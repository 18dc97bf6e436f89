"""The online power controller in the simulator: a periodic power step in virtual time (issue 14 item 3).

Opt-in with ``SimOptions.power_controller`` (a :class:`SimPowerControl`). Every ``interval_s`` of virtual time
the simulator calls :meth:`SimPowerDriver.step`: it measures each pool over the interval just ended
(orchestrator/core/power.py: the same quantities the live server measures), asks the controller
(placement/power.py) for a decision, and applies it by swapping every instance of a changed pool to its tier
model at the new cap (tiers/power.py: a cap slows compute-bound work and lowers the draw; memory-bound decode
barely slows). A decode stretch in progress is cut at its next step so the rest runs at the new cap; a
prefill step in progress ends at the cap it started with (one step, well under a second).

Energy is accounted at the cap in force: each step's draw is computed from the tier model when the step is
planned, so the energy windows, per-instance totals and tokens/J of the run carry every cap change. Modelled
power of a pool over an interval = its busy steps' energy (clipped to the interval) + idle draw while no step
ran. An instance keeps its configured tier model's name in the result (the cap history is in
``SimResult.power_steps``). Reads the simulator's own state; never the wall clock.

Parking (optional, ``SimPowerControl.parking``): each decode pool's :class:`orchestrator.core.power.Parker`
steps with the caps; a draining, parked or waking instance shows ``accepting = False`` in its view (no new
conversation is placed on it; its pinned ones stay), and a parked one is billed ``parked_w`` per GPU instead
of its idle draw (``_Instance.parked`` spans, read by sim/collect.py); its changes: ``PowerStep.parking``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator.core.power import (
    PARKED,
    DecoderObservation,
    ParkChange,
    Parker,
    ParkingConfig,
    PoolInterval,
    PoolSpec,
    PowerSlo,
    pools_of,
    power_view,
)
from orchestrator.core.prefill_park import PrefillParker
from orchestrator.errors import SimulationError
from orchestrator.sim.instance import _DECODE_ONLY  # a sequence that decodes KV a prefiller sent (no prefill)
from placement.base import Role
from placement.power import ControllerConfig, PowerController, PowerDecision
from tiers.perf import TierModel

# How often the controller steps, virtual seconds: "every few seconds" (issue 14); DynamoLLM reconfigures
# on a seconds-to-minutes scale and our caps act within one step. Not fitted to any result.
DEFAULT_INTERVAL_S = 5.0


@dataclass(frozen=True, slots=True)
class SimPowerControl:
    """What the simulator's power controller needs: the SLO, the caps each tier allows, how often it steps."""

    slo: PowerSlo
    allowed_caps_w: Mapping[str, tuple[float, ...]]  # tier label -> caps per GPU
    interval_s: float = DEFAULT_INTERVAL_S
    config: ControllerConfig = field(default_factory=ControllerConfig)
    # optional fleet cap budget (sum of gpus x cap), enforced from the first step (interval_s): until then
    # the configured caps are in force
    budget_w: float | None = None
    # optional parking of decoders (orchestrator/core/power.py): drain, stop, cold-start; None: caps only
    parking: ParkingConfig | None = None

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and math.isfinite(self.interval_s)):
            raise SimulationError(f"power controller interval must be > 0 s, got {self.interval_s}")


@dataclass(frozen=True, slots=True)
class PowerStep:
    """One controller step: when, every pool's cap after it, and what moved (modelled)."""

    t_s: float
    caps_w: Mapping[str, float]  # pool id -> cap per GPU after the step
    pressures: Mapping[str, float]  # pool id -> latency / budget of the interval
    power_w: Mapping[str, float | None]  # pool id -> mean modelled draw over the interval
    changes: tuple[tuple[str, float, float, str], ...]  # (pool id, from W, to W, reason)
    parking: tuple[ParkChange, ...] = ()  # decoders that changed state (drain, park, wake, ready)


def fleet_power_slo(cfg: Any) -> PowerSlo:
    """The controller's bounds from a fleet's ``slo`` section, against its reference tier (the standalone
    normaliser of the slowdown metrics, orchestrator.sim.fleet.reference_tier_model)."""
    from orchestrator.sim.fleet import reference_tier_model

    return PowerSlo(
        reference_tier_model(cfg),
        tbt_slowdown=cfg.slo.tbt_slowdown,
        ttft_slowdown=cfg.slo.ttfet_slowdown,
        tbt_s=cfg.slo.tbt_ms / 1000 if cfg.slo.tbt_ms is not None else None,
        ttft_s=cfg.slo.ttfet_s,
    )


def fleet_power_control(
    cfg: Any,
    interval_s: float = DEFAULT_INTERVAL_S,
    budget_w: float | None = None,
    parking: ParkingConfig | None = None,
) -> SimPowerControl:
    """``SimOptions.power_controller`` for a fleet: its SLO and every tier's allowed caps (and parking)."""
    from orchestrator.fleet import allowed_caps_w

    caps = {t.name: tuple(allowed_caps_w(t)) for t in cfg.tiers}
    return SimPowerControl(fleet_power_slo(cfg), caps, interval_s, budget_w=budget_w, parking=parking)


class SimPowerDriver:
    """Drives one :class:`PowerController` over one simulation (built by the simulator when opted in)."""

    def __init__(self, ctl: SimPowerControl, insts: Sequence[Any]) -> None:
        self.ctl = ctl
        self.controller = PowerController(ctl.config)
        self.insts = list(insts)
        self.specs: list[PoolSpec] = pools_of(
            (_Named(i.id, i.tier, i.role) for i in self.insts),
            ctl.allowed_caps_w,
            {i.id: i.tm.gpus for i in self.insts},
        )
        by_id = {i.id: i for i in self.insts}
        self.members = {s.pool_id: [by_id[k] for k in s.instance_ids] for s in self.specs}
        self.original: dict[str, TierModel] = {i.id: i.tm for i in self.insts}
        self._models: dict[tuple[str, float], TierModel] = {}
        for s in self.specs:
            gpu = self.members[s.pool_id][0].tm.gpu
            bad = [c for c in s.allowed_caps_w if not gpu.power_cap_min_w <= c <= gpu.power_cap_max_w]
            if bad:
                raise SimulationError(
                    f"tiers.{s.tier}.power_caps_w: {bad} outside {gpu.name}'s range {gpu.power_cap_min_w:g}-"
                    f"{gpu.power_cap_max_w:g} W. To fix: list caps in that range."
                )
        self.caps_w = {s.pool_id: self.members[s.pool_id][0].tm.cap_w for s in self.specs}
        self.last_t = 0.0
        self.seen = {i.id: 0 for i in self.insts}  # segments already measured
        self.logged = {i.id: 0 for i in self.insts}  # prefill-log entries already measured
        self.tbt_mark = {i.id: (0.0, 0) for i in self.insts}
        self.steps: list[PowerStep] = []
        self.parkers: dict[str, Parker] = {}
        if ctl.parking is not None:
            for s in self.specs:
                if s.role == Role.DECODE and len(s.instance_ids) > 1:
                    self.parkers[s.pool_id] = Parker(ctl.parking, s.instance_ids)
        # the prefill pool's parking (ParkingConfig.prefill, orchestrator/core/prefill_park.py)
        self.prefill_parkers: dict[str, PrefillParker] = {}
        if ctl.parking is not None and ctl.parking.prefill:
            for s in self.specs:
                if s.role == Role.PREFILL:
                    self.prefill_parkers[s.pool_id] = PrefillParker(ctl.parking, s.instance_ids)
        self.turn1_tokens: list[int] = []  # new tokens of the prefill pools' prefills (turn-1 prompts)
        # decoders a plan-based start parks at t = 0 (ParkingConfig.start_active), reported with step 1
        self._pending: list[ParkChange] = []
        for pid, parker in self.parkers.items():
            by_id = {i.id: i for i in self.members[pid]}
            for c in parker.changes:
                self._apply_park(by_id[c.instance_id], parker, c, 0.0)
                self._pending.append(c)

    # ---- measuring -------------------------------------------------------------------------------------
    def _energy_j(self, inst: Any, t0: float, t1: float) -> float:
        """Modelled energy of `inst` over (t0, t1]: its steps' draw where they ran, idle elsewhere."""
        busy_s = e = 0.0
        segs = inst.segments
        for k in range(self.seen[inst.id], len(segs)):
            a, b, _, _, _, pw, _ = segs[k]
            ov = min(b, t1) - max(a, t0)
            if ov > 0:
                busy_s += ov
                e += ov * pw
        self.seen[inst.id] = len(segs)
        if inst.cur is not None:  # the step or stretch in progress, so far (committed later, clipped then)
            a, pw = inst.cur[0], inst.cur[4]
            ov = t1 - max(a, t0)
            if ov > 0:
                busy_s += ov
                e += ov * pw
        idle_w = inst.tm.idle_w
        saved = sum(max(0.0, min(b, t1) - max(a, t0)) * (idle_w - w) for a, b, w in inst.parked)
        return e + max(0.0, (t1 - t0) - busy_s) * idle_w - saved

    def _measure(self, sim: Any, t: float) -> dict[str, PoolInterval]:
        out: dict[str, PoolInterval] = {}
        dt = t - self.last_t
        for s in self.specs:
            iv = PoolInterval(duration_s=dt, energy_j=0.0)
            ctx = nd = 0
            for inst in self.members[s.pool_id]:
                gap_s, toks = inst.tbt_gap_token_s, inst.tbt_tokens
                g0, k0 = self.tbt_mark[inst.id]
                iv.gap_token_s += gap_s - g0
                iv.tokens += toks - k0
                self.tbt_mark[inst.id] = (gap_s, toks)
                ctx += inst.ctx_sum
                nd += inst.n_decode
                iv.queue_tokens += inst.queued_prefill
                iv.batch += len(inst.prefilling) + inst.n_decode
                assert iv.energy_j is not None
                iv.energy_j += self._energy_j(inst, self.last_t, t)
                ended = set()
                for k in range(self.logged[inst.id], len(inst.prefill_log)):
                    ts = inst.prefill_log[k][2]
                    if id(ts) not in ended and self.last_t < ts.prefill_end_s <= t:
                        ended.add(id(ts))
                        lat = ts.prefill_end_s - ts.arrival_s
                        iv.prefills.append((lat, ts.prefilled_tokens, ts.cached_tokens))
                self.logged[inst.id] = len(inst.prefill_log)
                for q in (*inst.waiting, *inst.prefilling):
                    if q.kind != _DECODE_ONLY:
                        qts = q.ts
                        new = q.prefill_total if q.admitted else max(1, qts.input_tokens - q.pulled)
                        iv.waiting.append((t - qts.arrival_s, new, qts.input_tokens - new))
            iv.context_tokens = ctx / nd if nd else 0.0
            iv.batch /= max(len(self.members[s.pool_id]), 1)
            out[s.pool_id] = iv
        return out

    # ---- stepping --------------------------------------------------------------------------------------
    def model_at(self, inst: Any, cap_w: float) -> TierModel:
        key = (inst.id, cap_w)
        tm = self._models.get(key)
        if tm is None:
            base = self.original[inst.id]
            tm = base if base.cap_w == cap_w else replace(base, power_cap_w=cap_w)
            self._models[key] = tm
        return tm

    def step(self, sim: Any, t: float) -> PowerDecision:
        """Measure the interval ending at `t`, decide, apply; the simulator schedules the next step."""
        intervals = self._measure(sim, t)
        for pid in self.prefill_parkers:
            self.turn1_tokens += [n for _, n, _ in intervals[pid].prefills]
            del self.turn1_tokens[:-200]  # the recent ones
        view = power_view(self.specs, self.caps_w, intervals, self.ctl.slo, self.ctl.budget_w)
        decision = self.controller.step(view)
        for c in decision.changes:
            for inst in self.members[c.pool_id]:
                inst.tm = self.model_at(inst, c.to_w)
                inst.dirty = True
                sim._wake(inst, t)  # cut a decode stretch at its next step: the rest runs at the new cap
        self.caps_w = dict(decision.caps_w)
        parked = self._park(t, view)
        self.steps.append(
            PowerStep(
                t,
                dict(decision.caps_w),
                {p.pool_id: (p.latency_s / p.slo_s if p.slo_s > 0 else 0.0) for p in view.pools},
                {p.pool_id: p.power_w for p in view.pools},
                tuple((c.pool_id, c.from_w, c.to_w, c.reason) for c in decision.changes),
                parked,
            )
        )
        self.last_t = t
        return decision

    def _park(self, t: float, view: Any) -> tuple[ParkChange, ...]:
        """The parking rule of every decode pool; a parked instance draws ``parked_w`` per GPU from now."""
        out: list[ParkChange] = []
        press = {p.pool_id: (p.latency_s / p.slo_s if p.slo_s > 0 else 0.0) for p in view.pools}
        for pid, parker in self.parkers.items():
            members = self.members[pid]
            obs = [
                DecoderObservation(i.id, frozenset(i.pinned), i.make_view().kv_used_tokens, i.cap)
                for i in members
            ]
            by_id = {i.id: i for i in members}
            for c in parker.step(t, obs, press.get(pid, 0.0)):
                self._apply_park(by_id[c.instance_id], parker, c, t)
                out.append(c)
        out += self._park_prefill(t, press)
        if self._pending:  # the start's parking, reported with the first step
            out, self._pending = [*self._pending, *out], []
        return tuple(out)

    def _park_prefill(self, t: float, press: Mapping[str, float]) -> list[ParkChange]:
        """The prefill pools' parking rule: turn-1 prompts prefill on the decoders while it is parked."""
        out: list[ParkChange] = []
        if not self.prefill_parkers:
            return out
        dec_pools = [s.pool_id for s in self.specs if s.role == Role.DECODE]
        decoders = [i for pid in dec_pools for i in self.members[pid]]
        active = [i for i in decoders if i.accepting]
        pinned: set[object] = set()
        for i in decoders:
            pinned |= i.pinned
        prefill_s = None
        if self.turn1_tokens and active:
            n = max(1, round(sum(self.turn1_tokens) / len(self.turn1_tokens)))
            prefill_s = sum(i.tm.prefill_time_s(n) for i in active) / len(active)
        pressure = max((press.get(pid, 0.0) for pid in dec_pools), default=0.0)
        for pid, pp in self.prefill_parkers.items():
            members = self.members[pid]
            by_id = {i.id: i for i in members}
            idle = all(not i.waiting and not i.prefilling and not i.busy for i in members)
            for c in pp.step(t, pinned, prefill_s, len(active), pressure, idle):
                self._apply_park(by_id[c.instance_id], pp, c, t)
                out.append(c)
        return out

    @staticmethod
    def _apply_park(inst: Any, parker: Parker | PrefillParker, c: ParkChange, t: float) -> None:
        inst.accepting = parker.accepting(inst.id)
        inst.dirty = True
        if c.to_state == PARKED:
            inst.parked.append((t, math.inf, parker.cfg.parked_w * inst.tm.gpus))
        elif c.from_state == PARKED:
            a, _, w = inst.parked[-1]
            inst.parked[-1] = (a, t, w)  # waking: a cold start draws the loaded idle

    def finish(self) -> None:
        """Give every instance back its configured tier model (names and idle draw in the result; every
        step's draw was fixed when it ran)."""
        for inst in self.insts:
            inst.tm = self.original[inst.id]


def power_summary(res: Any) -> dict[str, Any]:
    """The controller's steps of a run: how many, the cap changes, virtual seconds spent at each cap."""
    steps = res.power_steps
    at: dict[str, dict[str, float]] = {}
    prev_t, prev_caps = 0.0, None
    for st in steps:
        if prev_caps is not None:
            for pool, cap in prev_caps.items():
                cell = at.setdefault(pool, {})
                cell[f"{cap:g}"] = cell.get(f"{cap:g}", 0.0) + st.t_s - prev_t
        prev_t, prev_caps = st.t_s, st.caps_w
    interval = steps[1].t_s - steps[0].t_s if len(steps) > 1 else (steps[0].t_s if steps else 0.0)
    out: dict[str, Any] = {
        "steps": len(steps),
        "interval_s": interval,
        "changes": sum(len(st.changes) for st in steps),
        "seconds_at_cap": at,
        "source": "modelled",
    }
    park = [c for st in steps for c in st.parking]
    if park:  # decoder-seconds parked per instance (the run ends at its makespan)
        since: dict[str, float] = {}
        parked: dict[str, float] = {}
        for c in park:
            if c.to_state == PARKED:
                since[c.instance_id] = c.t_s
            elif c.from_state == PARKED:
                parked[c.instance_id] = parked.get(c.instance_id, 0.0) + c.t_s - since.pop(c.instance_id)
        for i, t in since.items():
            parked[i] = parked.get(i, 0.0) + max(0.0, res.makespan_s - t)
        out["parking"] = {"changes": len(park), "seconds_parked": parked}
    return out


@dataclass(frozen=True, slots=True)
class _Named:
    instance_id: str
    tier: str
    role: Any
