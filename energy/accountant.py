"""`serve`'s energy driver (an APScheduler job): meters -> engine intervals -> attribution -> ledger.

Each tick observes the engines' token counters (the model meter's activity), reads every meter, appends the
samples, turns the meter deltas into per-engine intervals, and -- once the turns that overlapped an interval
have had time to finish (``lag_s``) -- attributes them (energy.intervals) using the turns recorded in the
ledger, spread over their lifetimes (prefill over [arrival, first token) on the prefilling instance, decode
over [first, last token] on the decoder). ``flush()`` at shutdown attributes whatever is still pending.

Must not import fastapi.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from energy.attribution import EngineInterval, IdlePolicy, PhaseWeights
from energy.attribution import phase_weights as tier_phase_weights
from energy.errors import EnergyError
from energy.intervals import EnergyJob, LedgerTurnSource, TurnSource, run_energy_job
from energy.lease import Lease
from energy.ledger import Ledger
from energy.meters import (
    BUSY_S_TOTAL,
    ENGINE_STEPS_TOTAL,
    EXTERNAL_HITS_TOTAL,
    GENERATION_TOKENS_TOTAL,
    PROMPT_TOKENS_TOTAL,
    STEP_ENERGY_J_TOTAL,
    Activity,
    Meter,
    MeterReading,
    ModelMeter,
    make_meter,
    reads_inline,
    utc_now,
)
from energy.records import EnergySample, Source

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineMeterBinding:
    """Which meter GPUs make up one engine (fleet.yaml engines[].meter + gpu_indices)."""

    engine_id: str
    meter_id: str
    gpu_indices: tuple[int, ...]
    tier: str | None = None
    idle_w: float = 0.0  # the engine's idle draw (tier model), for the idle row
    weights: PhaseWeights | None = None


@dataclass
class _Pending:
    engine_id: str
    start: datetime
    end: datetime
    energy_j: float
    source: Source


ObserveFn = Callable[[], Awaitable[Mapping[str, Any]]]  # engine_id -> EngineObservation


@dataclass
class EnergyAccountant:
    """The serving-side driver: sample meters, buffer engine intervals, attribute them after ``lag_s``."""

    ledger: Ledger
    meters: Mapping[str, Meter]
    bindings: Sequence[EngineMeterBinding]
    turns: TurnSource
    idle: IdlePolicy = IdlePolicy.ROW
    lag_s: float = 10.0
    clock: Callable[[], datetime] = utc_now
    observe: ObserveFn | None = None  # engines' observations, for model meters' activity
    activity: dict[str, Activity] = field(default_factory=dict)
    # Turns still running are not in the ledger yet: `horizon()` (called on the event loop each tick) gives
    # the arrival of the oldest one, and no interval ending after it is attributed until it is recorded.
    # `settle()` (attributing in this process: no `offload`) makes what was recorded durable (a flush) before
    # the turns are read. Without them a turn running longer than lag_s lost the energy of its first
    # intervals to the conversations that finished sooner.
    horizon: Callable[[], datetime | None] | None = None
    settle: Callable[[], bool] | None = None
    # Router replicas sharing a ledger and engines: only the holder of the run's lease (energy/lease.py)
    # samples and attributes; the others try to take it over on each tick. None: always account.
    lease: Lease | None = None
    leading: bool = False
    # The ledger writer's `energy(job) -> bool` (orchestrator/runtime.py): samples and attribution run there,
    # after the turns queued before them (no `settle` needed). False (writer closed): run here instead.
    # None: write and attribute in this process (tests, `simulate`).
    offload: Callable[[EnergyJob], bool] | None = None
    _outbox: list[EnergySample] = field(default_factory=list)
    _last: dict[str, MeterReading] = field(default_factory=dict)
    _pending: list[_Pending] = field(default_factory=list)
    # computed prompt, generated, hit tokens and engine steps, per engine
    _counters: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    _step_energy: dict[str, tuple[float, float]] = field(default_factory=dict)  # simulated engines' (J, s)
    samples_written: int = 0  # written here, or handed to the writer (offload)
    rows_written: int = 0  # attribution rows written here; offloaded jobs' rows: the writer's count
    jobs_offloaded: int = 0
    _baseline_written: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _takeover: bool = False
    # what /metrics shows (api/metrics.py): joules per engine since this accountant started, and the mean
    # draw over each engine's latest meter interval
    engine_joules: dict[str, float] = field(default_factory=dict)
    engine_watts: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for b in self.bindings:
            if b.meter_id not in self.meters:
                raise EnergyError(
                    f"engine {b.engine_id!r} names meter {b.meter_id!r}, which is not configured; "
                    f"meters are {sorted(self.meters)}"
                )
        if self.lease is not None:
            self.leading = self.lease.try_acquire()  # at startup: no takeover, the baseline is now
        for mid, m in self.meters.items():
            self._last[mid] = m.read()  # baseline, written with the first sample() so the ledger shows it
        self._baseline_written = False

    async def observe_engines(self) -> None:
        """Turn the engines' token counters into the activity the model meters integrate."""
        if self.observe is None:
            return
        obs = await self.observe()
        for engine_id, o in obs.items():
            if not getattr(o, "healthy", True):
                # a failed scrape has no counters: keep the last ones, so the next good scrape counts the
                # tokens of the gap (a reset to 0 made it count the engine's whole lifetime at once)
                self.activity.pop(engine_id, None)
                continue
            extra = getattr(o, "extra", {}) or {}
            prompt = float(extra.get(PROMPT_TOKENS_TOTAL, 0.0))
            gen = float(extra.get(GENERATION_TOKENS_TOTAL, 0.0))
            # tokens the engine did not compute: local prefix-cache hits and KV received (external hits)
            hits = float(getattr(o, "prefix_cache_hits_tokens", 0.0) or 0.0)
            hits += float(extra.get(EXTERNAL_HITS_TOTAL, 0.0))
            computed = prompt - hits
            steps = float(extra.get(ENGINE_STEPS_TOTAL, 0.0))
            c0, g0, h0, s0 = self._counters.get(engine_id, (computed, gen, hits, steps))
            # high-water mark of computed: vLLM counts hits when it schedules a request and prompt tokens
            # when its prefill ends, so (prompt - hits) may dip between scrapes; made up later, never lost
            self._counters[engine_id] = (max(computed, c0), gen, hits, steps)
            running: float = max(int(getattr(o, "running", 0)), 1)
            if steps > s0 and gen > g0:  # the interval's mean batch: decode tokens per engine step
                running = max((gen - g0) / (steps - s0), 1.0)
            ctx = float(getattr(o, "kv_usage_frac", 0.0)) * float(getattr(o, "kv_capacity_tokens", 0))
            step_j, busy = None, 0.0  # a simulated engine's modelled energy of its steps (energy/meters.py)
            if STEP_ENERGY_J_TOTAL in extra:
                e1, b1 = float(extra[STEP_ENERGY_J_TOTAL]), float(extra.get(BUSY_S_TOTAL, 0.0))
                e0, b0 = self._step_energy.get(engine_id, (e1, b1))
                self._step_energy[engine_id] = (e1, b1)
                step_j, busy = max(e1 - e0, 0.0), max(b1 - b0, 0.0)
            self.activity[engine_id] = Activity(
                prefill_tokens=int(max(computed - c0, 0)),
                cached_tokens=int(max(hits - h0, 0)),
                decode_tokens=int(max(gen - g0, 0)),
                decode_batch=running,
                decode_context_tokens=ctx,
                step_energy_j=step_j,
                busy_s=busy,
            )

    def sample(self) -> int:
        """Read every meter, append the samples, buffer per-engine intervals. Returns samples written."""
        samples: list[EnergySample] = []
        engine_of: dict[str, dict[int, str]] = {}
        for b in self.bindings:
            for g in b.gpu_indices:
                engine_of.setdefault(b.meter_id, {})[g] = b.engine_id
        if not self._baseline_written:
            for mid, r in self._last.items():
                samples.extend(r.samples(mid, self.meters[mid].source, engine_of.get(mid)))
            self._baseline_written = True
        readings: dict[str, MeterReading] = {}
        for mid, m in self.meters.items():
            r = m.read()
            readings[mid] = r
            samples.extend(r.samples(mid, m.source, engine_of.get(mid)))
        for b in self.bindings:
            prev, cur = self._last[b.meter_id], readings[b.meter_id]
            if cur.at <= prev.at:
                continue
            delta = sum(cur.cumulative_j.get(g, 0.0) - prev.cumulative_j.get(g, 0.0) for g in b.gpu_indices)
            self._pending.append(
                _Pending(b.engine_id, prev.at, cur.at, max(delta, 0.0), self.meters[b.meter_id].source)
            )
            self.engine_joules[b.engine_id] = self.engine_joules.get(b.engine_id, 0.0) + max(delta, 0.0)
            self.engine_watts[b.engine_id] = max(delta, 0.0) / (cur.at - prev.at).total_seconds()
        self._last.update(readings)
        if self.offload is not None:  # handed to the writer with the next job (attribute_ready)
            self._outbox.extend(samples)
            self.samples_written += len(samples)
            return len(samples)
        n = self.ledger.record_samples(samples)
        self.samples_written += n
        return n

    def attribute_ready(self, *, all_pending: bool = False, horizon: datetime | None = None) -> int:
        """Attribute buffered intervals that ended at least ``lag_s`` ago and no later than ``horizon`` (the
        arrival of the oldest turn still running), or all of them."""
        cutoff = self.clock() - timedelta(seconds=self.lag_s)
        if horizon is not None:
            cutoff = min(cutoff, horizon)
        ready = [p for p in self._pending if all_pending or p.end <= cutoff]
        if not ready and not self._outbox:
            return 0
        local = self.offload is None
        if ready and local and not all_pending and self.settle is not None and not self.settle():
            log.warning("energy: the ledger writer did not confirm its writes; attributing on the next tick")
            return 0
        ready_ids = {id(p) for p in ready}
        self._pending = [p for p in self._pending if id(p) not in ready_ids]
        by_engine = {b.engine_id: b for b in self.bindings}
        intervals = []
        for p in ready:
            b = by_engine[p.engine_id]
            idle_j = min(p.energy_j, b.idle_w * (p.end - p.start).total_seconds())
            intervals.append(  # work: from the ledger's turns when the job runs (run_energy_job)
                EngineInterval(
                    p.engine_id, p.start, p.end, p.energy_j, idle_j, (), p.source, b.tier, b.weights
                )
            )
        job = EnergyJob(tuple(self._outbox), tuple(intervals), self.idle)
        self._outbox = []
        if self.offload is not None and self.offload(job):
            self.jobs_offloaded += 1
            return 0
        _, n = run_energy_job(self.ledger, job, self.turns)  # its samples were counted when taken
        self.rows_written += n
        return n

    def power_snapshot(self) -> list[tuple[str, str, str, float, float]]:
        """(engine, tier, source, joules since start, watts over the latest interval) per metered engine."""
        out = []
        for b in self.bindings:
            src = str(self.meters[b.meter_id].source)
            out.append(
                (
                    b.engine_id,
                    b.tier or "(unknown)",
                    src,
                    self.engine_joules.get(b.engine_id, 0.0),
                    self.engine_watts.get(b.engine_id, 0.0),
                )
            )
        return out

    def settled_through(self, t: datetime) -> bool:
        """Whether every meter interval up to ``t`` has been attributed (or handed to the ledger writer, which
        runs it after the turns queued before it): every meter has been read at or after ``t`` and no
        buffered interval starts before it."""
        with self._lock:
            read_past = all(r.at >= t for r in self._last.values())
            return read_past and not any(p.start < t for p in self._pending)

    def weights_by_engine(self) -> dict[str, PhaseWeights]:
        return {b.engine_id: b.weights for b in self.bindings if b.weights is not None}

    def hold_lease(self) -> bool:
        """Whether this accountant accounts now (worker thread: the lease may do SQL). Taking the lease over
        starts from fresh meter baselines: the energy between the previous holder's last sample and now is
        not in the ledger (logged), and none is counted twice."""
        if self.lease is None:
            return True
        if self.leading:
            if self.lease.still_held():
                return True
            self.leading = False
            log.error(
                "energy accounting: lost the lease (%s); another replica may take over",
                self.lease.description,
            )
            return False
        if not self.lease.try_acquire():
            return False
        self.leading = True
        self._takeover = True
        return True

    def _rebaseline(self) -> None:
        """Meter baselines from now on: what they counted before this replica held the lease is not ours."""
        with self._lock:
            for mid, m in self.meters.items():
                self._last[mid] = m.read()
            self._baseline_written = False

    async def tick(self) -> None:
        """One scheduled job run: observe the engines, then sample and attribute: on the event loop when that
        is arithmetic (model meters, the job offloaded to the ledger writer), else in a worker thread (SQL
        and hardware reads stay off the loop). Errors are logged, not raised: a failed tick keeps its
        intervals pending and the next tick retries. A replica without the lease only tries to take it."""
        try:
            if self.lease is not None:
                # a worker thread only when the check queries a database: a thread handoff costs the event
                # loop more than a flock check (GIL hand-back; benchmarks, router overhead)
                held = await asyncio.to_thread(self.hold_lease) if self.lease.blocking else self.hold_lease()
                if not held:
                    return
            if self._takeover:
                self._counters.clear()  # the engines' counters now are the baseline
                await self.observe_engines()
                self.activity.clear()
                await asyncio.to_thread(self._rebaseline)
                self._takeover = False
                log.warning(
                    "energy accounting: this replica accounts from now on (%s); energy before now, since the "
                    "previous holder's last sample (if any), is not in the ledger",
                    self.lease.description if self.lease is not None else "no lease",
                )
                return
            await self.observe_engines()
            horizon = self.horizon() if self.horizon is not None else None
            if self.offload is not None and all(reads_inline(m) for m in self.meters.values()):
                # no SQL (the job goes to the ledger writer) and no hardware read: ~0.1 ms, on the loop
                self._sample_and_attribute(horizon)
            else:
                await asyncio.to_thread(self._sample_and_attribute, horizon)
        except EnergyError as err:
            log.error("energy accounting tick failed: %s", err)

    def _sample_and_attribute(self, horizon: datetime | None = None) -> None:
        with self._lock:
            self.sample()
            self.attribute_ready(horizon=horizon)

    def wait_idle(self) -> None:
        """Return once no tick is running in a worker thread."""
        with self._lock:
            return

    def finish(self) -> None:
        """At shutdown, after the last turns are in the ledger (or queued ahead of the job in the writer, with
        ``offload``): a last sample, then attribute everything.
        Waits for a tick still running in its worker thread (a cancelled job's thread runs on). A replica
        that does not hold the lease only attributes intervals it metered while it did."""
        with self._lock:
            if self.lease is None or (self.leading and not self._takeover and self.lease.still_held()):
                self.sample()
            self.attribute_ready(all_pending=True)

    async def flush(self, observe: bool = True) -> None:
        if observe:
            await self.observe_engines()
        await asyncio.to_thread(self.finish)

    def close(self) -> None:
        for m in self.meters.values():
            m.close()
        if self.lease is not None:
            self.lease.release()
            self.leading = False


def build_accountant(
    ledger: Ledger,
    instances: Sequence[Any],
    *,
    engines: Mapping[str, Any] | None = None,
    cfg: Any = None,
    idle: IdlePolicy = IdlePolicy.ROW,
    lag_s: float = 10.0,
    clock: Callable[[], datetime] = utc_now,
    horizon: Callable[[], datetime | None] | None = None,
    lease: Lease | None = None,
    offload: Callable[[EnergyJob], bool] | None = None,
) -> EnergyAccountant:
    """An accountant for a serving fleet.

    ``instances``: objects with ``instance_id`` and ``tier_model`` (and ``tier``) -- the sim backend's
    instances or the vLLM engines with their tier models. Engines listed in ``cfg.engines`` with a ``meter``
    use that meter (``cfg.meters``) on their ``gpu_indices``; every other engine gets a model meter fed by its
    own token counters (``engines[id].observe()``), so its energy is ``modelled``.
    """
    meter_cfg = {m.id: m for m in getattr(cfg, "meters", []) or []}
    engine_cfg = {e.id: e for e in getattr(cfg, "engines", []) or []}
    meters: dict[str, Meter] = {}
    bindings: list[EngineMeterBinding] = []
    acc_activity: dict[str, Activity] = {}

    def activity_for(engine_id: str) -> Callable[[datetime, datetime], Activity]:
        return lambda start, end: acc_activity.pop(engine_id, Activity())

    for inst in instances:
        tm = inst.tier_model
        ecfg = engine_cfg.get(inst.instance_id)
        tier_name = getattr(tm, "name", None) or getattr(inst, "tier", None)
        weights = tier_phase_weights(tm)
        if ecfg is not None and ecfg.meter:
            mc = meter_cfg.get(ecfg.meter)
            if mc is None:
                raise EnergyError(
                    f"engines: {inst.instance_id!r} names meter {ecfg.meter!r}, which is not in "
                    f"meters {sorted(meter_cfg)}"
                )
            sharing = sorted(e.id for e in engine_cfg.values() if e.meter == mc.id)
            if not ecfg.gpu_indices and len(sharing) > 1:
                raise EnergyError(
                    f"engines {', '.join(sharing)} share meter {mc.id!r} but engine {inst.instance_id!r} has "
                    "no gpu_indices, so its GPUs are unknown (all such engines were bound to GPU 0: counted "
                    "twice, other GPUs counted for nobody). To fix: give every engine on a shared meter "
                    "gpu_indices in fleet.yaml, as the meter numbers GPUs (nvml and dcgm: NVML index, as "
                    "nvidia-smi lists them; zeus: the index among CUDA_VISIBLE_DEVICES, which may differ)"
                )
            if mc.id not in meters:
                gpus = sorted({g for e in engine_cfg.values() if e.meter == mc.id for g in e.gpu_indices})
                meters[mc.id] = make_meter(
                    mc.kind,
                    meter_id=mc.id,
                    gpu_indices=gpus,
                    url=mc.url,
                    path=mc.path,
                    clock=clock,
                    hostname=getattr(mc, "hostname", None),
                )
            # an engine alone on its meter without gpu_indices: every GPU the meter reads is its own
            own = tuple(ecfg.gpu_indices) or tuple(meters[mc.id].gpu_indices)
            bindings.append(EngineMeterBinding(inst.instance_id, mc.id, own, tier_name, tm.idle_w, weights))
        else:
            mid = f"model:{inst.instance_id}"
            meters[mid] = ModelMeter(tm, activity_for(inst.instance_id), meter_id=mid, clock=clock)
            bindings.append(
                EngineMeterBinding(
                    inst.instance_id, mid, meters[mid].gpu_indices, tier_name, tm.idle_w, weights
                )
            )

    observe: ObserveFn | None = None
    if engines:

        async def observe() -> Mapping[str, Any]:
            out = {}
            for eid, eng in engines.items():
                try:
                    # the Engine protocol's observe_shared: one scrape serves this tick and the router's
                    # health poll at the same moment (vLLM engines; others observe)
                    out[eid] = await eng.observe_shared()
                except Exception as err:  # an engine that cannot be observed did no measurable work
                    log.warning("energy: observing %s failed: %s", eid, err)
            return out

    acct = EnergyAccountant(
        ledger,
        meters,
        bindings,
        LedgerTurnSource(ledger),
        idle=idle,
        lag_s=lag_s,
        clock=clock,
        observe=observe,
        activity=acc_activity,
        horizon=horizon,
        lease=lease,
        offload=offload,
    )
    return acct
