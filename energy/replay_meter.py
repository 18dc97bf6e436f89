"""The replay meter: recorded samples read back (tests; re-attributing past runs), and the samples' CSV file.

Must not import fastapi or sqlalchemy.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from energy.errors import EnergyError
from energy.meter_base import Clock, MeterReading, utc_now
from energy.records import EnergySample, Source, require_utc


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
