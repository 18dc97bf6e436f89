"""Hardware energy meters: NVML, zeus and an NVIDIA DCGM exporter (``Source.MEASURED``).

``zeus`` and ``nvml`` import their libraries lazily; without an NVIDIA driver they fail with one line naming
the alternative (``NO_DRIVER_HINT``). Each is read in a worker thread, never on the event loop.
Must not import fastapi or sqlalchemy.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from energy.errors import EnergyError
from energy.meter_base import NO_DRIVER_HINT, Clock, CounterTracker, MeterReading, utc_now
from energy.records import Source


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
        stamps = [s for i in self.gpu_indices if i in counters and (s := counters[i][1]) is not None]
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
