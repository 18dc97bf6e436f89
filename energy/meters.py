"""Energy meters: one interface, cumulative joules per GPU (monotonic) with a UTC timestamp.

Kinds (fleet.yaml ``meters: [{id, kind, url, path}]``; engines name their meter and GPU indices):
  zeus    zeus.monitor.ZeusMonitor measurement windows over local GPUs (package ``zeus`` >= 0.16)
  nvml    nvidia-ml-py ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver loaded), with counter
          resets (driver reload) and 64-bit wraps folded into a monotonic cumulative
  dcgm    an NVIDIA DCGM exporter's ``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` counter (mJ) over HTTP
  model   joules from the tier power model (tiers.perf.TierModel) and the engine's reported work:
          idle power for the wall time plus each phase's power above idle for its modelled busy time
  replay  recorded samples (tests; re-attributing past runs)

``zeus`` and ``nvml`` import their libraries lazily; without an NVIDIA driver they fail with one line naming
the alternative. Hardware readings are ``Source.MEASURED``; the model meter's are ``Source.MODELLED``.
The interface is in energy/meter_base.py, the kinds in energy/hw_meters.py, energy/model_meter.py and
energy/replay_meter.py; this module builds them (:func:`make_meter`) and re-exports their names.
Must not import fastapi or sqlalchemy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from energy.errors import EnergyError
from energy.hw_meters import (
    DCGM_ENERGY_METRIC,
    DcgmMeter,
    NvmlMeter,
    ZeusMeter,
    parse_dcgm_energy,
    parse_dcgm_samples,
)
from energy.meter_base import (
    NO_DRIVER_HINT,
    U64,
    Clock,
    CounterTracker,
    Meter,
    MeterReading,
    reads_inline,
    utc_now,
)
from energy.model_meter import (
    BUSY_S_TOTAL,
    ENGINE_STEPS_TOTAL,
    EXTERNAL_HITS_TOTAL,
    GENERATION_TOKENS_TOTAL,
    PROMPT_TOKENS_TOTAL,
    STEP_ENERGY_J_TOTAL,
    Activity,
    ActivitySource,
    ModelMeter,
    TierPower,
    modelled_energy_j,
)
from energy.replay_meter import ReplayMeter, read_samples, write_samples

__all__ = [
    "DCGM_ENERGY_METRIC",
    "ENGINE_STEPS_TOTAL",
    "STEP_ENERGY_J_TOTAL",
    "BUSY_S_TOTAL",
    "EXTERNAL_HITS_TOTAL",
    "GENERATION_TOKENS_TOTAL",
    "METER_KINDS",
    "NO_DRIVER_HINT",
    "PROMPT_TOKENS_TOTAL",
    "U64",
    "Activity",
    "ActivitySource",
    "Clock",
    "CounterTracker",
    "DcgmMeter",
    "Meter",
    "MeterReading",
    "ModelMeter",
    "NvmlMeter",
    "ReplayMeter",
    "TierPower",
    "ZeusMeter",
    "make_meter",
    "modelled_energy_j",
    "parse_dcgm_energy",
    "parse_dcgm_samples",
    "read_samples",
    "reads_inline",
    "utc_now",
    "write_samples",
]

METER_KINDS = ("zeus", "nvml", "dcgm", "model", "replay")


def make_meter(
    kind: str,
    *,
    meter_id: str | None = None,
    gpu_indices: Sequence[int] = (),
    url: str | None = None,
    path: str | Path | None = None,
    tier: TierPower | None = None,
    activity: ActivitySource | None = None,
    clock: Clock = utc_now,
    hostname: str | None = None,
) -> Meter:
    """Build a meter from a fleet.yaml ``meters:`` entry (kind, url, path) plus the engine's GPU indices."""
    mid = meter_id or kind
    if kind == "nvml":
        return NvmlMeter(gpu_indices, mid, clock)
    if kind == "zeus":
        return ZeusMeter(gpu_indices, mid, clock)
    if kind == "dcgm":
        return DcgmMeter(url or "", gpu_indices, mid, hostname=hostname, clock=clock)
    if kind == "model":
        if tier is None or activity is None:
            raise EnergyError(
                f"meter {mid!r} (kind model) needs the engine's tier model and an activity source"
            )
        return ModelMeter(tier, activity, gpu_indices, mid, clock)
    if kind == "replay":
        if path is None:
            raise EnergyError(f"meter {mid!r} (kind replay) needs 'path' to recorded samples")
        return ReplayMeter.from_file(path, clock, mid)
    from conserve.errors import did_you_mean

    raise EnergyError(
        f"unknown meter kind {kind!r}; choose one of {', '.join(METER_KINDS)}."
        f"{did_you_mean(kind, METER_KINDS)}"
    )
