"""Serving runtime: builds engines, router, ledger writer and scheduled jobs from fleet.yaml (+ plan).

``Runtime`` is what `orchestrator serve` runs behind the API (api/app.py starts and stops it in the app's
lifespan). It owns:

- the engines: simulated ones (orchestrator/engines/sim.py) from a plan's instances for ``backend: sim``,
  or ``VllmEngine`` clients for the fleet's ``engines:`` list for ``backend: vllm``;
- the :class:`orchestrator.router.Router` with the configured policy (placement/policies.make_policy);
- the ledger writer (orchestrator/ledger_writer.py): turns and pins are queued by the router (no SQL on the
  event loop) and written in group commits by a worker process (or a thread); an answered turn's last byte
  waits for its commit (``ledger_durable``); ``stop()`` drains the queue, so no ledger row is lost on
  shutdown;
- APScheduler jobs (AsyncIOScheduler): poll engine health/metrics every ``poll_interval_s``, release pins of
  conversations idle for ``pin_ttl_s``, account energy every ``energy_interval_s``. On an injected clock
  other than the system's (``build_runtime(clock=...)``, e.g. ``conserve.clock.LoopClock`` on a virtual-time
  event loop) the same jobs are asyncio tasks sleeping on that clock, so a whole `serve` runs in virtual time.

Settings (orchestrator/serve_settings.py ``ServeSettings``) are pydantic-settings (env prefix ``CONSERVE_``),
the edge where files and flags enter.
Must not import fastapi (the API imports this, not the reverse).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conserve.clock import Clock, SystemClock
from conserve.errors import ConServeError
from energy.records import (
    ConversationView,
    RunInfo,
    RunKind,
    new_run_id,
)
from orchestrator.config import FleetConfig, load_fleet
from orchestrator.engines.base import Engine
from orchestrator.engines.sim import SimEngine, SimKvFabric
from orchestrator.errors import ConfigError
from orchestrator.ledger_writer import LEDGER_PROCESS_NICE, LedgerWriter
from orchestrator.router import Router, RouterConfig
from orchestrator.serve_settings import (
    ServeSettings,  # re-exported: the CLI, the API and tests import it here
)
from placement.base import Role

log = logging.getLogger("conserve.runtime")

__all__ = [
    "ServeSettings",
    "Runtime",
    "build_runtime",
    "default_sim_instances",
]


# At shutdown, scheduled job runs in progress (an engine poll, an energy tick) get this long to end.
JOB_DRAIN_S = 10.0
# At start, the ledger writer's worker process gets this long to come up (~1 s of imports on the dev box).
LEDGER_READY_S = 60.0


class LedgerPinLookup:
    """Router PinLookup over the ledger (shared pins across replicas), off the event loop."""

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    async def lookup(self, conversation_id: str) -> ConversationView | None:
        return await asyncio.to_thread(self.ledger.latest_conversation, conversation_id)


# ---- building the fleet -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimInstance:
    instance_id: str
    tier: str
    role: Role
    tier_model: Any


def default_sim_instances(cfg: FleetConfig) -> list[SimInstance]:
    """A fleet when there is neither a plan nor a planner: per tier, ~1/4 prefillers (>= 1) and the rest
    decoders when both roles are allowed, else all GPUs in the one allowed role. One GPU per instance."""
    from orchestrator.fleet import tier_model

    out: list[SimInstance] = []
    for t in cfg.tiers:
        if t.count <= 0:
            continue
        tm = tier_model(cfg, t.name)
        if "prefill" in t.roles and "decode" in t.roles and t.count >= 2:
            n_pre = max(1, t.count // 4)
            roles = [Role.PREFILL] * n_pre + [Role.DECODE] * (t.count - n_pre)
        else:
            roles = [Role(t.roles[0])] * t.count
        counters: dict[Role, int] = {}
        for r in roles:
            i = counters.get(r, 0)
            counters[r] = i + 1
            out.append(SimInstance(f"{t.name}-{r.value}-{i}", t.name, r, tm))
    return out


def _sim_instances(cfg: FleetConfig, plan_path: Path | None) -> tuple[list[Any], str]:
    from orchestrator import fleet

    if plan_path is not None:
        return list(fleet.instances_from_plan(cfg, fleet.load_plan(plan_path))), f"plan {plan_path}"
    try:
        from orchestrator import planner  # planning helper's module; optional until it lands
    except ImportError:
        planner = None  # type: ignore[assignment]
    make = getattr(planner, "make_plan", None) or getattr(planner, "plan_fleet", None) if planner else None
    if make is not None:
        try:
            made = make(cfg)
            plan = getattr(made, "plan", made)  # planner.make_plan returns a PlanRun wrapping the Plan
            return list(fleet.instances_from_plan(cfg, plan)), "planner (no --plan given)"
        except ConServeError as err:
            log.warning("planner could not plan this fleet (%s); using the default split", err)
    return list(default_sim_instances(cfg)), "default split (no plan)"


@dataclass
class Runtime:
    cfg: FleetConfig
    settings: ServeSettings
    router: Router
    engines: dict[str, Engine]
    served_model_name: str
    ledger: Any
    writer: LedgerWriter
    fleet_source: str
    backend: str
    policy_name: str
    _scheduler: Any = None
    _started: bool = False
    _jobs: set[asyncio.Task[Any]] = field(default_factory=set)  # scheduled job runs in progress
    notes: list[str] = field(default_factory=list)
    accountant: Any = None  # energy.accounting.EnergyAccountant (None: energy accounting off)
    power: Any = None  # orchestrator.power.SessionPowerCaps: GPU caps applied at start, restored at stop
    power_loop: Any = None  # orchestrator.power_loop.LivePowerLoop (None: the power controller is off)
    kv_gaps: Any = None  # orchestrator.kv_gaps_live.GapKeeper (None: the KV-gap rule is off)
    clock: Clock = field(default_factory=SystemClock)  # the router's, the sim engines' and the accountant's
    _clock_jobs: list[asyncio.Task[None]] = field(default_factory=list)  # jobs on a non-system clock
    _draining: bool = False

    async def start(self) -> None:
        """Start scheduled jobs (needs the running event loop) and take a first observation."""
        if self._started:
            return
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        if self.power is not None:  # caps before the first request (NVML calls block: off the loop)
            await asyncio.to_thread(self.power.start, self.ledger)
        if not await asyncio.to_thread(self.writer.wait_ready, LEDGER_READY_S):
            log.warning("the ledger writer is not up after %.0f s; answers wait for it", LEDGER_READY_S)
        await self.router.poll()
        if self.accountant is not None:
            # the engines' token counters now are the baseline of the model meters' activity: without it the
            # first tick took its own reading as the baseline and the work served before it got no energy
            await self.accountant.observe_engines()
        if self.power_loop is not None:  # sees the router's finished turns beside the API's metrics
            from orchestrator.power_loop import TeeObserver

            self.router.observer = TeeObserver(self.router.observer, self.power_loop)
        # (id, job, interval s): the same jobs on either clock
        jobs: list[tuple[str, Any, float]] = [
            ("poll-engines", self.router.poll, self.settings.poll_interval_s),
            # on the loop: it edits the router's conversations; ended conversations leave memory within
            # ended_keep_s + this (issue 13 item 5)
            ("expire-pins", self.router.expire_idle, min(10.0, self.settings.pin_ttl_s)),
        ]
        if self.accountant is not None:
            jobs.append(("energy-accounting", self.accountant.tick, self.settings.energy_interval_s))
        if self.power_loop is not None:
            jobs.append(("power-controller", self.power_loop.run, self.power_loop.interval_s))
        if self.kv_gaps is not None:  # on the loop: it edits the router's pin accounting
            jobs.append(("kv-gaps", self.kv_gaps.tick, self.settings.kv_gap_interval_s))
        if not isinstance(self.clock, SystemClock):  # APScheduler runs on wall time: jobs sleep on the clock
            loop = asyncio.get_running_loop()
            self._clock_jobs = [loop.create_task(self._every(fn, every)) for _, fn, every in jobs]
            self._started = True
            return
        sched = AsyncIOScheduler()
        for job_id, fn, every in jobs:
            sched.add_job(
                self._job(fn),
                "interval",
                seconds=every,
                id=job_id,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
            )
        sched.start()
        self._scheduler = sched
        self._started = True

    def _job(self, fn: Any) -> Any:
        """A scheduled job as a coroutine on the event loop whose runs `stop()` can wait for: APScheduler's
        shutdown cancels runs in progress and logs each as "Error running job" with a traceback."""

        async def run() -> None:
            task = asyncio.current_task()
            assert task is not None
            self._jobs.add(task)
            try:
                result = fn()
                if inspect.isawaitable(result):
                    await result
            finally:
                self._jobs.discard(task)

        run.__qualname__ = getattr(fn, "__qualname__", "job")
        return run

    async def _every(self, fn: Any, every_s: float) -> None:
        """A scheduled job on the runtime's clock: every ``every_s``, a run that fails is logged (as
        APScheduler does) and the next one runs on time."""
        job = self._job(fn)
        while True:
            await self.clock.sleep(every_s)
            if self._draining:
                return
            try:
                await job()
            except Exception:
                log.exception("scheduled job %s failed", getattr(fn, "__qualname__", fn))

    def scheduler_pause(self) -> None:
        """Pause the scheduled jobs (tests: make a failure invisible to the health poll)."""
        if self._scheduler is not None:
            self._scheduler.pause()

    def scheduler_resume(self) -> None:
        if self._scheduler is not None:
            self._scheduler.resume()

    async def stop(self) -> None:
        """Stop jobs, close engines, drain the ledger queue (no row lost), close the ledger."""
        if self._clock_jobs:  # no new runs; those in progress end
            self._draining = True
            for task in self._clock_jobs:
                if task not in self._jobs:
                    task.cancel()
            await asyncio.wait(self._clock_jobs, timeout=JOB_DRAIN_S)
            self._clock_jobs = []
        if self._scheduler is not None:
            self._scheduler.pause()  # no new runs; let those in progress end (a poll, a tick: seconds)
            await asyncio.sleep(0)  # a run submitted just now starts and registers
            if self._jobs:
                await asyncio.wait(set(self._jobs), timeout=JOB_DRAIN_S)
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self.accountant is not None:
            await self.accountant.observe_engines()  # the engines' last token counts, before they close
            await asyncio.to_thread(self.accountant.wait_idle)  # a cancelled tick runs on in its thread
        await self.router.aclose()
        if self.router.shared is not None:  # its connections (and this replica's advisory lock)
            await self.router.shared.aclose()
        if self.accountant is not None:  # every turn is handed to the writer: attribute what is still pending
            await asyncio.to_thread(self.accountant.finish)  # a last job, queued behind those turns
        await asyncio.to_thread(self.writer.close)  # writes the turns, then runs the job
        if self.accountant is not None:
            self.accountant.close()
        if self.power is not None:  # the previous GPU power limits back (a crash: the next start does it)
            await asyncio.to_thread(self.power.stop, self.ledger)
        self.ledger.close()
        self._started = False


def admission_wait_s(settings: ServeSettings, cfg: FleetConfig) -> float:
    """The router's admission wait: the serve flag, else the fleet file's, else the documented default."""
    from orchestrator.core import DEFAULT_ADMISSION_WAIT_S

    for v in (settings.admission_wait_s, cfg.admission_wait_s):
        if v is not None:
            return v
    return DEFAULT_ADMISSION_WAIT_S


def _shared_turns(settings: ServeSettings, db_url: str) -> Any:
    """The store replicas number turns and pin in (energy/heads.py), or None: this process decides."""
    from sqlalchemy.engine import make_url

    try:
        backend = make_url(db_url).get_backend_name()
    except Exception:  # noqa: BLE001 - the Ledger names a bad URL, with how to fix it
        return None
    mode = settings.shared_state
    if mode == "memory" or (mode == "auto" and backend != "postgresql"):
        return None
    if backend != "postgresql":
        raise ConfigError(
            f"shared_state 'database' needs a PostgreSQL ledger, not {backend!r}. To fix: use a "
            "postgresql+psycopg:// URL, or shared_state 'memory' (one replica)."
        )
    from energy.heads import PgConversationHeads

    assert settings.run_id is not None
    return PgConversationHeads(db_url, pin_ttl_s=settings.pin_ttl_s, run_id=settings.run_id)


def build_runtime(
    settings: ServeSettings,
    cfg: FleetConfig | None = None,
    instances: Sequence[Any] | None = None,
    clock: Clock | None = None,
) -> Runtime:
    """Everything `orchestrator serve` runs, from settings (and an already-loaded fleet, for tests).

    `instances` (objects with instance_id, tier, role, tier_model) overrides the plan for the sim backend.
    `clock` (default: the system clock, sim engines sped up by ``sim_speedup``) is the router's, the
    simulated engines' and the energy accountant's; another clock also runs the scheduled jobs on it.
    """
    from energy.ledger import Ledger
    from placement.policies import make_policy

    cfg = cfg or load_fleet(settings.fleet)
    spec = cfg.model_spec()
    served = settings.served_model_name or spec.name
    policy_name = settings.policy or cfg.policy
    make_policy(policy_name)  # a bad name fails before anything is built; the fleet's models are bound below
    engines: dict[str, Engine] = {}
    models: dict[str, Any] = {}  # instance id -> TierModel, for policies that cost decisions with it
    caps: dict[str, int] = {}
    # one clock for the router and the simulated engines (conserve/clock.py): monotonic time, record
    # timestamps; simulated engines sleep modelled seconds / sim_speedup on it
    if clock is None:
        clock = SystemClock(settings.sim_speedup if cfg.backend == "sim" else 1.0)
    if cfg.backend == "sim":
        if instances is not None:
            instances, source = list(instances), "explicit instances"
        else:
            instances, source = _sim_instances(cfg, settings.plan)
        if not instances:
            raise ConfigError(f"{settings.fleet}: the plan has no instances. To fix: give tiers a count > 0.")
        fabric = SimKvFabric()
        links = {t.name: str(t.link.value) for t in cfg.tiers}  # as `simulate` links them (links_of)
        for inst in instances:
            engines[inst.instance_id] = SimEngine(
                inst.instance_id,
                inst.role,
                inst.tier,
                inst.tier_model,
                model_name=served,
                clock=clock,
                fabric=fabric,
                link=links.get(inst.tier, "pcie"),
            )
            caps[inst.instance_id] = inst.tier_model.kv_capacity_tokens
            models[inst.instance_id] = inst.tier_model
    else:
        try:
            from orchestrator.engines.vllm import VllmEngine
        except ImportError as err:  # pragma: no cover - shipped together
            raise ConfigError("backend 'vllm' needs orchestrator/engines/vllm.py") from err
        from orchestrator.fleet import tier_model

        for e in cfg.engines:
            engines[e.id] = VllmEngine(e.id, Role(e.role), e.tier, e.url)
            models[e.id] = tier_model(cfg, e.tier)
            caps[e.id] = models[e.id].kv_capacity_tokens  # replaced by the engine's own report
        source = f"engines: in {settings.fleet}"
    # conserve-adaptive costs turn 1 with every instance's tier model and link (placement/adaptive.py), as
    # the simulator's driver does (orchestrator/sim/fleet.py)
    from placement.adaptive import fleet_options

    tier_links = {t.name: str(t.link.value) for t in cfg.tiers}
    tiers_of = {e.id: e.tier for e in cfg.engines} | {i.instance_id: i.tier for i in instances or ()}
    links = {iid: tier_links.get(tiers_of.get(iid, ""), "pcie") for iid in models}
    policy = make_policy(policy_name, **fleet_options(policy_name, models, links))
    # GPU power caps (fleet.yaml / plan), applied in start(); decided before anything is started, so a bad cap
    # fails here with one line
    from orchestrator.power import SessionPowerCaps

    plan = None
    if cfg.backend == "vllm" and settings.plan is not None:
        from orchestrator.fleet import load_plan

        plan = load_plan(settings.plan)
    power = SessionPowerCaps.for_fleet(cfg, plan, settings.power_state_file, instances or ())
    db_url = settings.db or cfg.database_url
    if settings.run_id is None:  # issue 14: one run per server start (energy/records.py new_run_id)
        settings = settings.model_copy(update={"run_id": new_run_id(RunKind.SERVE)})
    assert settings.run_id is not None
    shared = _shared_turns(settings, db_url)
    ledger = Ledger(db_url, run_id=settings.run_id, policy=policy.name, kind=RunKind.SERVE)
    ledger.upgrade()
    ledger.start_run(RunInfo(settings.run_id, RunKind.SERVE, policy.name, label=str(settings.fleet)))
    in_memory = db_url.startswith("sqlite") and (
        db_url.endswith(":memory:") or db_url.rstrip("/") == "sqlite:"
    )
    spool = None
    if not in_memory:  # records a previous server had to give up are written before this one serves
        from orchestrator.ledger_spool import LedgerSpool, default_spool_path

        spool = LedgerSpool(settings.ledger_spool_file or default_spool_path(db_url))
        try:
            spool.replay(db_url)
        except Exception as err:  # noqa: BLE001 - serving goes on; the file stays for the next start
            log.error("ledger spool %s not replayed (kept for the next start): %s: %s", spool.path,
                      type(err).__name__, err)  # fmt: skip
    writer = LedgerWriter(
        ledger,
        process=settings.ledger_writer == "process" and not in_memory,  # memory: another process cannot open
        batch_max=settings.ledger_batch_max,
        flush_interval_s=settings.ledger_flush_interval_s,
        # answers wait for this worker when durable: it gets the server's priority then, not a leftover share
        nice=0 if settings.ledger_durable else LEDGER_PROCESS_NICE,
        spool=spool,
    )
    router = Router(
        engines,
        policy,
        RouterConfig(
            model_name=served,
            max_context_tokens=spec.max_context_tokens,
            pin_ttl_s=settings.pin_ttl_s,
            admission_wait_s=admission_wait_s(settings, cfg),
            run_id=settings.run_id,
        ),
        sink=writer,
        durability=writer.wait_durable if settings.ledger_durable else None,
        pin_lookup=LedgerPinLookup(ledger),
        kv_capacity_tokens=caps,
        clock=clock,
        shared=shared,
    )
    accountant = None
    if settings.energy_interval_s > 0:  # meters -> attribution -> ledger (energy/accounting.py)
        from energy.accounting import build_accountant
        from energy.lease import lease_for
        from orchestrator.fleet import tier_model as _tier_model

        metered = (
            instances or ()
            if cfg.backend == "sim"
            else [SimInstance(e.id, e.tier, Role(e.role), _tier_model(cfg, e.tier)) for e in cfg.engines]
        )
        accountant = build_accountant(
            ledger,
            metered,
            engines=engines,
            cfg=cfg,
            lag_s=settings.energy_lag_s,
            horizon=router.settled_before,  # running turns are not recorded yet: wait for them
            # samples and attribution run in the ledger writer, after the turns handed to it before them
            offload=writer.energy,
            lease=lease_for(db_url, settings.run_id),  # one replica per run accounts (energy/lease.py)
            clock=clock.wall,  # meter readings in the time base of the router's turn records
        )
    rt = Runtime(
        cfg=cfg,
        settings=settings,
        router=router,
        engines=engines,
        served_model_name=served,
        ledger=ledger,
        writer=writer,
        fleet_source=source,
        backend=cfg.backend,
        policy_name=policy.name,
        accountant=accountant,
        power=power,
        clock=clock,
    )
    if settings.power_controller:  # built now: a fleet it cannot control fails here with one line
        from orchestrator.power_loop import build_power_loop

        rt.power_loop = build_power_loop(rt, settings.power_controller_interval_s)
    if settings.kv_gap_interval_s > 0:  # issue 12 item 3, live: every decoder's tier model costs its restores
        from orchestrator.kv_gaps_live import GapKeeper

        rt.kv_gaps = GapKeeper(router, models)
    return rt
