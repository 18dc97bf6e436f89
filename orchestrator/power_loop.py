"""The online power controller in `serve`: every few seconds, observe the pools, decide, apply the caps.

The same :class:`placement.power.PowerController` the simulator drives (orchestrator/sim/power.py), here in
wall time. Opt-in (``serve --power-controller``, ``CONSERVE_POWER_CONTROLLER=true``). Per pool (the engines of
one tier in one role, orchestrator/core/power.py) over the last interval it reads:

- latency: the router's finished turns, through a :class:`TeeObserver` put in front of the router's observer
  (the inter-token gaps of the turns a decoder served; arrival -> first token of the turns a prefiller
  prefilled, against the same prefill alone on the reference tier);
- queue and batch: the router's per-instance status now (``queued_prefill_tokens``, ``running``);
- power: the energy accountant's meters (watts of each engine over its latest interval), when accounting runs.

A decision is applied through the power API of issue 14 item 2 (energy/power.py ``apply_caps``, NVML or
zeusd), under the serving session's holder, so ``serve``'s stop (or the next start after a crash) restores
the limits. Without NVML, without permission, or for engines on another host, the result says the cap was
not applied, the pool keeps the cap in force, and serving goes on. Simulated engines (``backend: sim``) get a
``simulated`` result: no GPU exists to cap, so the cap goes to the engine's tier model instead
(``SimEngine.set_power_cap`` through ``sim_cap``): its later steps are timed and powered at the new cap by
tiers/steps.py, as the simulator's instances are (orchestrator/sim/power.py). Must not import fastapi.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from energy.power import CapRequest, CapResult, CapStatus, Holder, apply_caps
from orchestrator.core.power import (
    ACTIVE,
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
from placement.power import ControllerConfig, PowerController, PowerDecision

log = logging.getLogger("conserve.power")

# The controller's period in wall time: "every few seconds" (issue 14); as the simulator's default
# (orchestrator/sim/power.py DEFAULT_INTERVAL_S). Not fitted to any result.
DEFAULT_INTERVAL_S = 5.0


@dataclass(frozen=True, slots=True)
class LiveEngine:
    """One engine as the controller caps it."""

    engine_id: str
    tier: str
    role: str
    gpus: tuple[int, ...] = ()  # NVML indices
    local: bool = True
    simulated: bool = False
    n_gpus: int = 0  # GPUs of the engine when it names none (a simulated engine's TP); 0: len(gpus) or 1

    @property
    def instance_id(self) -> str:  # the name orchestrator.core.power.pools_of groups by
        return self.engine_id


Applier = Callable[[Sequence[CapRequest]], list[CapResult]]


@dataclass(slots=True)
class _Acc:
    gap_token_s: float = 0.0
    tokens: int = 0
    prefills: list[tuple[float, int, int]] = field(default_factory=list)


class LivePowerLoop:
    """Observations in, caps out, every ``interval_s``; :meth:`step` is one controller step."""

    def __init__(
        self,
        engines: Sequence[LiveEngine],
        allowed_caps_w: Mapping[str, Sequence[float]],
        initial_caps_w: Mapping[str, float],  # engine id -> cap in force per GPU
        slo: PowerSlo,
        *,
        status: Callable[[], list[dict[str, Any]]],
        watts: Callable[[], Mapping[str, float]] | None = None,
        apply: Applier | None = None,
        on_results: Callable[[list[CapResult]], None] | None = None,
        config: ControllerConfig | None = None,
        budget_w: float | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        sim_cap: Callable[[str, float], None] | None = None,  # a simulated engine's cap hook (engine id, W)
        parking: ParkingConfig
        | None = None,  # park decoders (orchestrator/core/power.py); needs the three below
        pins: Callable[[], Mapping[str, frozenset[str]]] | None = None,  # engine id -> conversations pinned
        set_state: Callable[[str, str, str], None]
        | None = None,  # (engine id, from, to): apply a parking change
        now_s: Callable[[], float] | None = None,  # the serving clock
    ) -> None:
        self.engines = {e.engine_id: e for e in engines}
        self.sim_cap = sim_cap
        self.parkers: dict[str, Parker] = {}
        if parking is not None:
            if pins is None or set_state is None or now_s is None:
                raise ValueError("parking needs pins, set_state and now_s")
            self.parkers = {
                s.pool_id: Parker(parking, s.instance_ids)
                for s in pools_of(engines, allowed_caps_w, {e.engine_id: 1 for e in engines})
                if s.role.value == "decode" and len(s.instance_ids) > 1
            }
        self.pins, self.set_state, self.now_s = pins, set_state, now_s
        self.parking_changes: list[ParkChange] = []
        for parker in self.parkers.values():  # a plan-based start (ParkingConfig.start_active) parks at once
            for c in parker.changes:
                assert set_state is not None
                set_state(c.instance_id, c.from_state, c.to_state)
                self.parking_changes.append(c)
        self.specs: list[PoolSpec] = pools_of(
            engines, allowed_caps_w, {e.engine_id: max(len(e.gpus), e.n_gpus, 1) for e in engines}
        )
        self.pool_of = {i: s.pool_id for s in self.specs for i in s.instance_ids}
        self.caps_w = {s.pool_id: float(initial_caps_w[s.instance_ids[0]]) for s in self.specs}
        self.slo = slo
        self.status = status
        self.watts = watts
        self.apply = apply
        self.on_results = on_results  # e.g. record them in the ledger, show them in /v1/fleet
        self.controller = PowerController(config)
        self.budget_w = budget_w
        self.interval_s = interval_s
        self._acc: dict[str, _Acc] = {s.pool_id: _Acc() for s in self.specs}
        self.history: list[dict[str, Any]] = []  # one entry per step (GET /v1/fleet could show it)
        self.results: dict[str, list[CapResult]] = {}  # engine id -> its latest results

    # ---- observations (RouterObserver, through TeeObserver) ------------------------------------------
    def turn_done(self, rec: Any, ttft_s: float | None, tbt_gaps_s: list[float]) -> None:
        dec = self.pool_of.get(rec.instance_id)
        if dec is not None and tbt_gaps_s:
            acc = self._acc[dec]
            acc.gap_token_s += sum(tbt_gaps_s)
            acc.tokens += len(tbt_gaps_s)
        if ttft_s is None:
            return
        prompt = int(rec.prompt_tokens)
        if rec.remote_prefill and rec.prefill_instance_id in self.pool_of:
            cached = min(int(rec.prefill_cached_tokens or 0), prompt)
            pre = self._acc[self.pool_of[rec.prefill_instance_id]]
            pre.prefills.append((ttft_s, prompt - cached, cached))
        elif dec is not None and self.engines[rec.instance_id].role == "colocated":
            cached = min(int(rec.cached_tokens or 0), prompt)
            self._acc[dec].prefills.append((ttft_s, prompt - cached, cached))

    def _intervals(self) -> dict[str, PoolInterval]:
        out = {s.pool_id: PoolInterval(duration_s=self.interval_s) for s in self.specs}
        ctx: dict[str, list[float]] = {k: [0.0, 0.0] for k in out}
        for st in self.status():
            pid = self.pool_of.get(st["instance_id"])
            if pid is None:
                continue
            iv = out[pid]
            iv.queue_tokens += int(st.get("queued_prefill_tokens") or 0)
            running = int(st.get("running") or 0)
            iv.batch += running
            ctx[pid][0] += float(st.get("kv_used_tokens") or 0)
            ctx[pid][1] += running
        w = self.watts() if self.watts is not None else None
        for s in self.specs:
            iv = out[s.pool_id]
            iv.batch /= len(s.instance_ids)
            used, seqs = ctx[s.pool_id]
            iv.context_tokens = used / seqs if seqs else 0.0
            acc, self._acc[s.pool_id] = self._acc[s.pool_id], _Acc()
            iv.gap_token_s, iv.tokens, iv.prefills = acc.gap_token_s, acc.tokens, acc.prefills
            if w is not None and all(i in w for i in s.instance_ids):
                iv.energy_j = sum(w[i] for i in s.instance_ids) * self.interval_s
        return out

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> PowerDecision:
        """Observe the interval, decide, apply (blocking NVML calls: run it off the event loop)."""
        view = power_view(self.specs, self.caps_w, self._intervals(), self.slo, self.budget_w)
        decision = self.controller.step(view)
        applied: list[dict[str, Any]] = []
        for c in decision.changes:
            spec = next(s for s in self.specs if s.pool_id == c.pool_id)
            results = self._apply(spec, c.to_w)
            ok = bool(results) and all(r.status.in_force or r.status is CapStatus.SIMULATED for r in results)
            if ok:
                self.caps_w[c.pool_id] = c.to_w
            else:
                bad = next(r for r in results if not (r.status.in_force or r.status is CapStatus.SIMULATED))
                log.warning(
                    "power controller: pool %s to %g W NOT applied (%s: %s); it stays at %g W",
                    c.pool_id, c.to_w, bad.status, bad.message, self.caps_w[c.pool_id],
                )  # fmt: skip
            applied.append({"pool": c.pool_id, "from_w": c.from_w, "to_w": c.to_w, "reason": c.reason,
                            "applied": ok, "statuses": sorted({str(r.status) for r in results})})  # fmt: skip
        parking = self._park(view)
        self.history.append(
            {
                "caps_w": dict(self.caps_w),
                "changes": applied,
                "pressure": {p.pool_id: p.latency_s / p.slo_s for p in view.pools},
                "parking": [(c.instance_id, c.from_state, c.to_state, c.reason) for c in parking],
            }  # fmt: skip
        )
        return decision

    def _park(self, view: Any) -> list[ParkChange]:
        """The parking rule of each decode pool, on the router's pins and KV (the simulator's rule, live)."""
        if not self.parkers:
            return []
        assert self.pins is not None and self.set_state is not None and self.now_s is not None
        t = self.now_s()
        pins = self.pins()
        status = {st["instance_id"]: st for st in self.status()}
        press = {p.pool_id: (p.latency_s / p.slo_s if p.slo_s > 0 else 0.0) for p in view.pools}
        out: list[ParkChange] = []
        for pid, parker in self.parkers.items():
            obs = []
            for i in parker.state:
                st = status.get(i, {})
                obs.append(DecoderObservation(i, pins.get(i, frozenset()), int(st.get("kv_used_tokens") or 0),
                                              int(st.get("kv_capacity_tokens") or 1)))  # fmt: skip
            for c in parker.step(t, obs, press.get(pid, 0.0)):
                self.set_state(c.instance_id, c.from_state, c.to_state)
                log.info(
                    "power controller: %s %s -> %s (%s)", c.instance_id, c.from_state, c.to_state, c.reason
                )
                out.append(c)
        self.parking_changes += out
        return out

    def _apply(self, spec: PoolSpec, cap_w: float) -> list[CapResult]:
        out: list[CapResult] = []
        requests = []
        for eid in spec.instance_ids:
            e = self.engines[eid]
            if e.simulated:
                if self.sim_cap is not None:
                    self.sim_cap(eid, cap_w)
                    msg = "simulated engine: no GPU limit is set; its tier model runs at the cap (modelled)"
                else:
                    msg = "simulated engine: no GPU limit is set and no model hook: recorded only"
                out.append(CapResult(eid, CapStatus.SIMULATED, msg, cap_w, tier=e.tier))
            elif not e.local:
                msg = f"engine {eid!r} runs on another host: the controller caps local GPUs only"
                out.append(CapResult(eid, CapStatus.REMOTE, msg, cap_w, tier=e.tier))
            else:
                requests.append(CapRequest(eid, cap_w, e.gpus, e.tier))
        if requests:
            if self.apply is None:
                out += [CapResult(r.engine_id, CapStatus.NO_NVML, "no power API", cap_w) for r in requests]
            else:
                out += self.apply(requests)
        for r in out:
            self.results.setdefault(r.engine_id, []).append(r)
            del self.results[r.engine_id][:-8]
        if self.on_results is not None and out:
            self.on_results(out)
        return out

    async def run(self) -> None:
        """One scheduled step, off the event loop's thread (NVML calls block)."""
        await asyncio.to_thread(self.step)


class TeeObserver:
    """The router's observer, and the power loop beside it (orchestrator.router.RouterObserver)."""

    def __init__(self, inner: Any, loop: LivePowerLoop) -> None:
        self.inner = inner
        self.loop = loop

    def turn_done(
        self, rec: Any, ttft_s: float | None, tbt_gaps_s: list[float], ttfet_s: float | None
    ) -> None:
        self.inner.turn_done(rec, ttft_s, tbt_gaps_s, ttfet_s)
        self.loop.turn_done(rec, ttft_s, tbt_gaps_s)

    def kv_transfer(self, prefill_instance: str, decode_instance: str, nbytes: int) -> None:
        self.inner.kv_transfer(prefill_instance, decode_instance, nbytes)

    def replaced(self, conversation_id: str, old_instance: str | None, new_instance: str) -> None:
        self.inner.replaced(conversation_id, old_instance, new_instance)

    def retried(self, instance_id: str) -> None:
        self.inner.retried(instance_id)

    def __getattr__(self, name: str) -> Any:  # anything else the inner observer offers
        return getattr(self.inner, name)


def nvml_applier(holder_of: Callable[[], Holder], state_path: Any) -> Applier:
    """Apply through energy/power.py under the serving session's holder (restored at stop)."""

    def apply(requests: Sequence[CapRequest]) -> list[CapResult]:
        return apply_caps(list(requests), holder_of(), state_path=state_path)

    return apply


def build_power_loop(rt: Any, interval_s: float = DEFAULT_INTERVAL_S) -> LivePowerLoop:
    """The loop for a built Runtime (orchestrator/runtime.py): its fleet, router, meters and power session."""
    from orchestrator.fleet import allowed_caps_w, find_tier
    from orchestrator.power import engine_caps
    from orchestrator.sim.power import fleet_power_slo

    cfg = rt.cfg
    allowed = {t.name: allowed_caps_w(t) for t in cfg.tiers}
    if cfg.backend == "sim":
        engines = [
            LiveEngine(i, e.tier, str(e.role), simulated=True, n_gpus=e.tier_model.gpus)
            for i, e in rt.engines.items()
        ]
        initial = {i: float(e.tier_model.cap_w) for i, e in rt.engines.items()}

        def sim_cap(engine_id: str, cap_w: float) -> None:
            rt.engines[engine_id].set_power_cap(cap_w)

        def set_state(engine_id: str, from_state: str, to_state: str) -> None:
            """Placement takes an engine only while active; a parked simulated engine draws parked_w."""
            eng = rt.engines[engine_id]
            holders[engine_id].accepting = to_state == ACTIVE  # router/instances.py Instance.accepting
            if to_state == PARKED:
                eng.park(parking.parked_w * eng.tier_model.gpus)  # type: ignore[union-attr]
            elif from_state == PARKED:
                eng.unpark()
    else:
        sim_cap = set_state = None  # type: ignore[assignment]
        caps = engine_caps(cfg)
        engines = [LiveEngine(c.engine_id, c.tier, c.role, c.gpus, c.local) for c in caps]
        initial = {
            c.engine_id: float(c.cap_w if c.cap_w is not None else find_tier(cfg, c.tier).gpu_spec().tdp_w)
            for c in caps
        }
    slo = fleet_power_slo(cfg)
    # the router's instances, read live (orchestrator/core/pins.py PinBook.holders)
    holders = rt.router.gap_state()[1].holders

    def pinned_ids() -> Mapping[str, frozenset[str]]:
        return {i: frozenset(h.pinned) for i, h in holders.items()}

    parking = None
    if rt.settings.power_park_w is not None:
        if cfg.backend != "sim":  # stopping and cold-starting vLLM engines is not built: say so, keep serving
            log.warning("power controller: parking (power_park_w) is built for simulated engines only; "
                        "the vLLM engines stay up")  # fmt: skip
        else:
            parking = ParkingConfig(parked_w=rt.settings.power_park_w, wake_s=rt.settings.power_wake_s)
    for t in cfg.tiers:
        if len(allowed[t.name]) < 2 and any(e.tier == t.name for e in engines):
            only = ", ".join(f"{c:g}" for c in allowed[t.name])
            log.warning("power controller: tier %s allows one cap (%s W); list tiers[].power_caps_w to "
                        "let it move", t.name, only)  # fmt: skip
    power = rt.power

    def holder() -> Holder:
        if power.holder is None:  # the session applied no cap at start: the controller's layer is its own
            power.holder = Holder.this_process("serve", "orchestrator serve (power controller)")
        return power.holder  # type: ignore[no-any-return]

    watts = None
    if rt.accountant is not None:
        acc = rt.accountant

        def watts() -> Mapping[str, float]:
            return {engine: w for engine, _, _, _, w in acc.power_snapshot()}

    def on_results(results: list[CapResult]) -> None:
        """Each change in the ledger (event ``controller``) and in /v1/fleet's power_cap of its engines."""
        power._record(rt.ledger, results, "controller")
        for eid in {r.engine_id for r in results}:
            power.results[eid] = [r for r in results if r.engine_id == eid]
            power.sources[eid] = "power controller (--power-controller)"

    return LivePowerLoop(
        engines, allowed, initial, slo, status=rt.router.instance_status, watts=watts,
        apply=nvml_applier(holder, power.state_path), on_results=on_results, interval_s=interval_s,
        budget_w=rt.settings.power_budget_w, sim_cap=sim_cap, parking=parking, pins=pinned_ids,
        set_state=set_state, now_s=rt.router.clock.now_s,
    )  # fmt: skip
