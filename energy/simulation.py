"""A simulator run into the ledger (``orchestrator simulate --db``): turns, conversations, modelled energy.

The simulator's energy windows (modelled energy per instance per window, and each turn's prefill/decode tokens
in the window) become engine intervals, attributed by ``energy.intervals.account``; its turns and
conversations become ledger rows.

Must not import fastapi.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from energy.attribution import EngineInterval, IdlePolicy, PhaseWeights, Work
from energy.attribution import phase_weights as tier_phase_weights
from energy.errors import EnergyError
from energy.intervals import account
from energy.ledger import Ledger
from energy.records import ConversationSummary, EnergySample, RunInfo, RunKind, Source, TurnRecord, TurnStatus

# A fixed instant for callers that want reproducible timestamps (tests). By default virtual second 0 of a
# simulation is written as the wall-clock time the run is written (issue 14: runs dated at a virtual epoch
# in 2000 stretched every timeline over 26 years when a ledger held simulated and served runs).
SIM_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
UNALLOCATED_ENGINE = "unallocated"  # pseudo-engine of a simulated fleet's unused GPUs, billed idle
UNALLOCATED_TIER = "unallocated (idle)"  # the simulator's label for them (orchestrator/metrics.py)


@dataclass(frozen=True, slots=True)
class SimulationWriteSummary:
    run_id: str
    policy: str
    conversations: int
    turns: int
    attribution_rows: int
    samples: int
    energy_j: float  # sum of the attribution rows written (== the simulator's energy of all instances)
    tokens: int  # prompt + output tokens of every turn written
    source: Source = Source.MODELLED

    @property
    def tokens_per_j(self) -> float:
        return self.tokens / self.energy_j if self.energy_j > 0 else 0.0


def write_simulation(
    ledger: Ledger,
    sim_result: Any,
    policy: str,
    run_id: str,
    *,
    epoch: datetime | None = None,
    idle: IdlePolicy = IdlePolicy.ROW,
    tier_models: Mapping[str, Any] | None = None,
    label: str | None = None,
    write_samples: bool = True,
    unallocated_idle_w: float = 0.0,
    metrics: Sequence[Any] | None = None,
) -> SimulationWriteSummary:
    """Write one simulator run (orchestrator.sim.result.SimResult) into ``ledger`` as run ``run_id``.

    Virtual time t (s) is written as ``epoch + t`` (default epoch: now, real timestamps; the run's kind
    ``simulate`` keeps it apart from served runs in every report). Energy rows are ``modelled``.
    ``tier_models`` (tier model name -> tiers.perf.TierModel) sets the per-phase work weights; without it
    prefill and decode tokens weigh the same. ``unallocated_idle_w``
    (orchestrator.sim.fleet.unallocated_idle_w: GPUs of the fleet no instance uses, billed idle) becomes one
    idle row of engine ``unallocated`` over the whole run, so the ledger's energy is that of all GPUs, as the
    simulator's tokens/J counts it. Raises EnergyError if the windows do not add up to the simulator's per-
    instance energy. ``metrics`` (orchestrator.metrics.conversation_metrics) adds TTFET/E2E/TBT slowdowns, in
    the metrics' convention.
    """
    if epoch is None:
        epoch = datetime.now(UTC)
    if unallocated_idle_w < 0:
        raise EnergyError(f"unallocated_idle_w must be >= 0 W, got {unallocated_idle_w}")
    if ledger.run_id != run_id:
        ledger = Ledger(ledger.url, run_id=run_id, policy=policy, kind=RunKind.SIMULATE)
        own = True
    else:
        own = False
    try:
        return _write_simulation(
            ledger,
            sim_result,
            policy,
            run_id,
            epoch,
            idle,
            tier_models or {},
            label,
            write_samples,
            unallocated_idle_w,
            metrics,
        )
    finally:
        if own:
            ledger.close()


def _at(epoch: datetime, t_s: float) -> datetime:
    return epoch + timedelta(seconds=float(t_s))


def _write_simulation(
    ledger: Ledger,
    res: Any,
    policy: str,
    run_id: str,
    epoch: datetime,
    idle: IdlePolicy,
    tier_models: Mapping[str, Any],
    label: str | None,
    write_samples: bool,
    unallocated_idle_w: float = 0.0,
    metrics: Sequence[Any] | None = None,
) -> SimulationWriteSummary:
    ledger.upgrade()
    existing = [r for r in ledger.runs() if r.run_id == run_id]
    if existing:
        raise EnergyError(
            f"run {run_id!r} is already in the ledger {ledger.url}; runs are append-only. "
            "To fix: pass a new --run-id (or a fresh --db)"
        )
    ledger.start_run(RunInfo(run_id, RunKind.SIMULATE, policy, started_at=epoch, label=label))
    inst_tier = {i.instance_id: i.tier_model for i in res.instances}
    inst_gpus = {i.instance_id: int(i.gpus) for i in res.instances}
    n_turns = {c.conversation_id: c.turns for c in res.conversations}

    turns: list[TurnRecord] = []
    for t in res.turns:
        final = t.turn == n_turns.get(t.conversation_id, t.turn)
        turns.append(
            TurnRecord(
                conversation_id=t.conversation_id,
                turn=t.turn,
                request_id=f"{t.conversation_id}/{t.turn}/{t.restarts}",
                instance_id=t.decode_instance,
                arrival_at=_at(epoch, t.arrival_s),
                first_token_at=_at(epoch, t.first_token_s),
                last_token_at=_at(epoch, t.last_token_s),
                prompt_tokens=t.input_tokens,
                output_tokens=t.output_tokens,
                finish_reason="stop" if final else "tool_calls",
                is_final=final,
                status=TurnStatus.OK,
                prefill_instance_id=t.prefill_instance if t.remote_prefill else None,
                remote_prefill=t.remote_prefill,
                tier=inst_tier.get(t.decode_instance),
                # as serve records them: the decoder received a remote prefill's whole KV; the simulator's
                # cached_tokens is the prefix-cache hit where the prompt was prefilled
                cached_tokens=t.input_tokens if t.remote_prefill else t.cached_tokens,
                prefill_cached_tokens=t.cached_tokens if t.remote_prefill else 0,
                policy=policy,
            )
        )
    ledger.record_turns(turns)
    by_id = {m.conversation_id: m for m in (metrics or ())}

    def summary(c: Any) -> ConversationSummary:
        m = by_id.get(c.conversation_id)
        if m is None:
            return ConversationSummary(
                c.conversation_id, policy, _at(epoch, c.arrival_s), c.turns, c.ttfet_s, c.e2e_s
            )
        return ConversationSummary(
            c.conversation_id,
            policy,
            _at(epoch, c.arrival_s),
            c.turns,
            m.ttfet_s,
            m.e2e_s,
            m.ttfet_slowdown,
            m.e2e_slowdown,
            m.tbt_slowdown,
        )

    ledger.record_conversations([summary(c) for c in res.conversations])

    weights = {name: tier_phase_weights(tm) for name, tm in tier_models.items()}
    intervals = list(_sim_intervals(res, epoch, weights, inst_tier))
    expected = {i.instance_id: float(i.energy_j) for i in res.instances}
    got: dict[str, float] = {}
    for iv in intervals:
        got[iv.engine_id] = got.get(iv.engine_id, 0.0) + iv.energy_j
    for inst, e in expected.items():
        if abs(got.get(inst, 0.0) - e) > 1e-6 * max(e, 1.0):
            raise EnergyError(
                f"simulator energy windows of {inst} sum to {got.get(inst, 0.0)} J but the "
                f"instance reports {e} J; cannot write a conserving ledger"
            )
    if unallocated_idle_w > 0 and res.makespan_s > 0:
        intervals.append(
            EngineInterval(
                UNALLOCATED_ENGINE,
                epoch,
                _at(epoch, res.makespan_s),
                unallocated_idle_w * res.makespan_s,
                unallocated_idle_w * res.makespan_s,
                (),
                Source.MODELLED,
                UNALLOCATED_TIER,
            )
        )
    n_rows = account(ledger, intervals, idle)

    n_samples = 0
    if write_samples:  # the model meter's view: cumulative modelled joules per GPU at each window end
        samples: list[EnergySample] = []
        cum: dict[str, float] = {}
        for iv in sorted(intervals, key=lambda iv: (iv.end, iv.engine_id)):
            cum[iv.engine_id] = cum.get(iv.engine_id, 0.0) + iv.energy_j
            g = max(inst_gpus.get(iv.engine_id, 1), 1)
            samples.extend(
                EnergySample(
                    f"model:{iv.engine_id}", k, iv.end, cum[iv.engine_id] / g, Source.MODELLED, iv.engine_id
                )
                for k in range(g)
            )
        n_samples = ledger.record_samples(samples)

    return SimulationWriteSummary(
        run_id=run_id,
        policy=policy,
        conversations=len(res.conversations),
        turns=len(turns),
        attribution_rows=n_rows,
        samples=n_samples,
        energy_j=sum(iv.energy_j for iv in intervals),
        tokens=sum(t.prompt_tokens + t.output_tokens for t in turns),
    )


def _sim_intervals(
    res: Any, epoch: datetime, weights: Mapping[str, PhaseWeights], inst_tier: Mapping[str, str]
) -> list[EngineInterval]:
    out: list[EngineInterval] = []
    if res.energy_windows:
        for w in res.energy_windows:
            tier = inst_tier.get(w.instance_id, w.tier)
            out.append(
                EngineInterval(
                    engine_id=w.instance_id,
                    start=_at(epoch, w.start_s),
                    end=_at(epoch, w.end_s),
                    energy_j=float(w.energy_j),
                    idle_j=float(w.idle_energy_j),
                    work=tuple(
                        Work(x.conversation_id, x.turn, x.prefill_tokens, x.decode_tokens) for x in w.work
                    ),
                    source=Source.MODELLED,
                    tier=tier,
                    weights=weights.get(tier),
                )
            )
        return out
    # No windows (energy_window_s=None): one interval per instance over the whole run, work from the turns.
    work: dict[str, list[Work]] = {}
    for t in res.turns:
        pre_on = t.prefill_instance if t.remote_prefill else t.decode_instance
        work.setdefault(pre_on, []).append(Work(t.conversation_id, t.turn, prefill_tokens=t.prefilled_tokens))
        work.setdefault(t.decode_instance, []).append(
            Work(t.conversation_id, t.turn, decode_tokens=t.output_tokens)
        )
    for i in res.instances:
        tier = inst_tier.get(i.instance_id)
        # the documented idle rule: idle draw x the whole run (the instance's idle_energy_j is only the draw
        # while no step ran); the idle power is that draw over the non-busy time
        free_s = res.makespan_s - i.busy_s
        idle_w = i.idle_energy_j / free_s if free_s > 0 else 0.0
        out.append(
            EngineInterval(
                i.instance_id,
                epoch,
                _at(epoch, res.makespan_s),
                float(i.energy_j),
                min(float(i.energy_j), idle_w * res.makespan_s),
                tuple(work.get(i.instance_id, ())),
                Source.MODELLED,
                tier,
                weights.get(tier or ""),
            )
        )
    return out
