"""The meter interface every kind implements: cumulative joules per GPU (monotonic) with a UTC timestamp.

:class:`Meter` and its :class:`MeterReading`, and :class:`CounterTracker`, which folds a hardware energy
counter's resets and 64-bit wraps into a monotonic cumulative. The kinds are in energy/hw_meters.py (NVML,
zeus, DCGM), energy/model_meter.py and energy/replay_meter.py; energy/meters.py builds them.
Must not import fastapi or sqlalchemy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from energy.errors import EnergyError
from energy.records import EnergySample, Source

Clock = Callable[[], datetime]

NO_DRIVER_HINT = "use meter kind 'model' or 'dcgm'"


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class MeterReading:
    at: datetime
    cumulative_j: Mapping[int, float]  # GPU index -> joules since the meter started (monotonic)

    def samples(
        self, meter_id: str, source: Source, engine_of: Mapping[int, str] | None = None
    ) -> list[EnergySample]:
        engine_of = engine_of or {}
        return [
            EnergySample(meter_id, gpu, self.at, j, source, engine_of.get(gpu))
            for gpu, j in sorted(self.cumulative_j.items())
        ]


@runtime_checkable
class Meter(Protocol):
    meter_id: str
    source: Source
    gpu_indices: tuple[int, ...]

    def read(self) -> MeterReading:
        """Cumulative joules per GPU since this meter started; never decreases."""
        ...

    def close(self) -> None: ...


def reads_inline(meter: Meter) -> bool:
    """Whether ``meter.read()`` is cheap arithmetic that may run on the event loop (a class attribute
    ``reads_inline = True``: the model and replay meters); hardware meters (NVML, zeus, DCGM) are read in a
    worker thread."""
    return bool(getattr(meter, "reads_inline", False))


# ---- counters --------------------------------------------------------------------------------------
U64 = 2**64


@dataclass(slots=True)
class CounterTracker:
    """Fold a hardware energy counter (mJ, unsigned 64-bit) into a monotonic cumulative in joules.

    A reading below the previous one is either a wrap of the 64-bit counter (when the wrapped delta is
    plausible for the elapsed time at ``max_power_w``) or a reset (driver reload, GPU reset: the counter
    restarted from 0, so the energy since the reset is the new reading itself). Either way the cumulative
    keeps rising and ``resets`` / ``wraps`` count the events.
    """

    max_power_w: float = (
        5000.0  # above any single GPU's board power (B200 TDP 1000 W), so never clips real data
    )
    first_mj: int | None = None
    last_mj: int | None = None
    last_at: datetime | None = None
    cumulative_j: float = 0.0
    resets: int = 0
    wraps: int = 0

    def update(self, counter_mj: int, at: datetime) -> float:
        counter_mj = int(counter_mj)
        if counter_mj < 0:
            raise EnergyError(f"energy counter reading must be >= 0 mJ, got {counter_mj}")
        if self.last_mj is None:
            self.first_mj = self.last_mj = counter_mj
            self.last_at = at
            return self.cumulative_j
        if counter_mj >= self.last_mj:
            delta_mj = counter_mj - self.last_mj
        else:
            wrapped = U64 - self.last_mj + counter_mj
            elapsed_s = max((at - self.last_at).total_seconds(), 0.0) if self.last_at else 0.0
            if wrapped <= self.max_power_w * max(elapsed_s, 1.0) * 1000.0:
                delta_mj = wrapped
                self.wraps += 1
            else:
                delta_mj = counter_mj
                self.resets += 1
        self.cumulative_j += delta_mj / 1000.0
        self.last_mj = counter_mj
        self.last_at = at
        return self.cumulative_j
