"""Measured profiles: points measured on a real tier (``orchestrator profile``) that override the roofline.

A profile is a YAML file (read through fleet.yaml ``tiers[].profile``)::

    gpu: A40                      # catalog name or alias
    model: Qwen3-0.6B
    tp: 1
    power_cap_w: 300              # the cap the points were measured at (null: TDP)
    source: "orchestrator profile, host gpu-3, vLLM 0.11, 2025-11-20"
    energy_measured: true         # false when energy_j values are modelled: they are then ignored
    idle_w: 77.0                  # optional: measured idle draw of the whole instance (all tp GPUs)
    prefill:                      # latency of one prefill request; energy_j of the instance over it
      - {new_tokens: 1024, cached_tokens: 0, latency_ms: 36.5, energy_j: 6.9}
    decode:                       # one decode step of `batch` sequences over `context_tokens` KV tokens
      - {batch: 8, context_tokens: 65536, step_ms: 17.9, energy_j: 3.8}

How a profile changes a :class:`tiers.perf.TierModel`: at every measured point we take the ratio
measured / roofline (the roofline evaluated at the profile's power cap). The tier's prediction is its own
roofline times that ratio, interpolated between points (prefill: piecewise-linear in new_tokens; decode:
bilinear on the grid of measured log2(batch) x log2(context + 1) coordinates, unmeasured nodes filled by
inverse-distance weighting) and held at the nearest point's value outside the measured range. At a
measured point, with the same cap, the model
therefore returns the measured value; outside the range it is the roofline scaled by the nearest ratio; at
another power cap the roofline's cap effect is kept and the measured correction is carried over.

Pure except load/save (file I/O). Pydantic only at this file edge. Must not import fastapi, sqlalchemy or
httpx.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tiers.catalog import get_gpu
from tiers.errors import CatalogError, ProfileError
from tiers.fileio import write_text_atomic
from tiers.models import get_model

if TYPE_CHECKING:
    from tiers.perf import TierModel

PROFILE_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class PrefillPoint:
    new_tokens: int
    cached_tokens: int
    latency_ms: float
    energy_j: float | None = None


@dataclass(frozen=True, slots=True)
class DecodePoint:
    batch: int
    context_tokens: int
    step_ms: float
    energy_j: float | None = None


@dataclass(frozen=True, slots=True)
class MeasuredProfile:
    gpu: str
    model: str
    tp: int
    power_cap_w: float | None
    source: str
    energy_measured: bool
    prefill: tuple[PrefillPoint, ...] = ()
    decode: tuple[DecodePoint, ...] = ()
    idle_w: float | None = None
    # True: gpu/model name inline specs of a fleet.yaml (e.g. a CPU test engine), not catalog entries;
    # they are then checked only against the tier at apply time (check_matches). Added for the profiler.
    inline_specs: bool = False


# ---- file edge ------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _PrefillIn(_Strict):
    new_tokens: int = Field(gt=0)
    cached_tokens: int = Field(0, ge=0)
    latency_ms: float = Field(gt=0)
    energy_j: float | None = Field(None, gt=0)


class _DecodeIn(_Strict):
    batch: int = Field(gt=0)
    context_tokens: int = Field(ge=0)
    step_ms: float = Field(gt=0)
    energy_j: float | None = Field(None, gt=0)


class _ProfileIn(_Strict):
    version: int = PROFILE_FORMAT_VERSION
    gpu: str = Field(min_length=1)
    model: str = Field(min_length=1)
    tp: int = Field(1, ge=1)
    power_cap_w: float | None = Field(None, gt=0)
    source: str = Field(min_length=1)
    energy_measured: bool
    idle_w: float | None = Field(None, gt=0)
    prefill: list[_PrefillIn] = Field(default_factory=list)
    decode: list[_DecodeIn] = Field(default_factory=list)
    inline_specs: bool = False


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _validate(data: Any, where: str) -> MeasuredProfile:
    try:
        p = _ProfileIn.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        raise ProfileError(
            f"{where}: {_loc(tuple(e['loc']))}: {e['msg']} (got {e.get('input')!r}). "
            "To fix: correct that field (see tiers/profiles.py for the format)."
        ) from None
    if p.version != PROFILE_FORMAT_VERSION:
        raise ProfileError(
            f"{where}: version: format {p.version} is not supported (expected {PROFILE_FORMAT_VERSION}). "
            "To fix: re-run `orchestrator profile` with this version of ConServe."
        )
    if not p.prefill and not p.decode:
        raise ProfileError(
            f"{where}: prefill, decode: the profile has no points. To fix: measure at least one."
        )
    for name, value in (("gpu", p.gpu), ("model", p.model)):
        if p.inline_specs:
            break
        try:
            (get_gpu if name == "gpu" else get_model)(value)
        except CatalogError as err:
            raise ProfileError(f"{where}: {name}: {err}") from None
    return MeasuredProfile(
        gpu=p.gpu,
        model=p.model,
        tp=p.tp,
        power_cap_w=p.power_cap_w,
        source=p.source,
        energy_measured=p.energy_measured,
        prefill=tuple(
            PrefillPoint(x.new_tokens, x.cached_tokens, x.latency_ms, x.energy_j) for x in p.prefill
        ),
        decode=tuple(DecodePoint(x.batch, x.context_tokens, x.step_ms, x.energy_j) for x in p.decode),
        idle_w=p.idle_w,
        inline_specs=p.inline_specs,
    )


def parse_profile(data: Any, where: str = "profile") -> MeasuredProfile:
    """Validate an already-parsed mapping (e.g. from YAML) into a MeasuredProfile."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a mapping of fields, got {type(data).__name__}.")
    return _validate(data, where)


def load_profile(path: str | Path) -> MeasuredProfile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ProfileError(
            f"{path}: cannot read the profile ({err.strerror}). To fix: check the path."
        ) from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ProfileError(f"{path}: not valid YAML ({err}). To fix: check the file's syntax.") from None
    return parse_profile(data, str(path))


def profile_to_dict(profile: MeasuredProfile) -> dict[str, Any]:
    def drop_none(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if v is not None}

    return drop_none(
        {
            "version": PROFILE_FORMAT_VERSION,
            "gpu": profile.gpu,
            "model": profile.model,
            "tp": profile.tp,
            "power_cap_w": profile.power_cap_w,
            "source": profile.source,
            "energy_measured": profile.energy_measured,
            "idle_w": profile.idle_w,
            "inline_specs": True if profile.inline_specs else None,
            "prefill": [
                drop_none(
                    {
                        "new_tokens": p.new_tokens,
                        "cached_tokens": p.cached_tokens,
                        "latency_ms": p.latency_ms,
                        "energy_j": p.energy_j,
                    }
                )
                for p in profile.prefill
            ],
            "decode": [
                drop_none(
                    {
                        "batch": p.batch,
                        "context_tokens": p.context_tokens,
                        "step_ms": p.step_ms,
                        "energy_j": p.energy_j,
                    }
                )
                for p in profile.decode
            ],
        }
    )


def save_profile(profile: MeasuredProfile, path: str | Path) -> None:
    """Write atomically: a temp file in the same directory, then rename over `path`."""
    path = Path(path)
    text = yaml.safe_dump(profile_to_dict(profile), sort_keys=False)
    parse_profile(yaml.safe_load(text), str(path))  # never write a file we could not read back
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


# ---- applying a profile ---------------------------------------------------------------------------------


class _Interp1D:
    """Piecewise-linear in x, held constant outside [x0, xn]."""

    __slots__ = ("xs", "ys")

    def __init__(self, pairs: list[tuple[float, float]]) -> None:
        merged: dict[float, list[float]] = {}
        for x, y in pairs:
            merged.setdefault(x, []).append(y)
        xs = sorted(merged)
        self.xs = tuple(xs)
        self.ys = tuple(sum(merged[x]) / len(merged[x]) for x in xs)

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if x <= xs[0]:
            return ys[0]
        if x >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, x)
        x0, x1 = xs[i - 1], xs[i]
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0)


class _Grid2D:
    """Ratios over (log2 batch, log2(context+1)) on the rectilinear grid of the measured coordinates.

    Nodes that were measured hold their measured ratio; the others are filled by inverse-distance weighting
    (axes scaled to [0, 1]). Lookup is bilinear, clamped to the box, so a measured point returns its own
    value and a query outside the box takes the value at the box's nearest edge."""

    __slots__ = ("xs", "ys", "vals")

    def __init__(self, pts: list[tuple[float, float, float]]) -> None:
        merged: dict[tuple[float, float], list[float]] = {}
        for x, y, r in pts:
            merged.setdefault((x, y), []).append(r)
        known = {k: sum(v) / len(v) for k, v in merged.items()}
        self.xs = tuple(sorted({k[0] for k in known}))
        self.ys = tuple(sorted({k[1] for k in known}))
        sx = (self.xs[-1] - self.xs[0]) or 1.0
        sy = (self.ys[-1] - self.ys[0]) or 1.0
        vals: list[float] = []
        for gy in self.ys:
            for gx in self.xs:
                if (gx, gy) in known:
                    vals.append(known[(gx, gy)])
                    continue
                num = den = 0.0
                for (px, py), r in known.items():
                    w = 1.0 / (((gx - px) / sx) ** 2 + ((gy - py) / sy) ** 2)
                    num += w * r
                    den += w
                vals.append(num / den)
        self.vals = tuple(vals)

    @staticmethod
    def _locate(axis: tuple[float, ...], v: float) -> tuple[int, float]:
        if len(axis) == 1 or v <= axis[0]:
            return 0, 0.0
        if v >= axis[-1]:
            return len(axis) - 2, 1.0
        i = bisect.bisect_right(axis, v) - 1
        return i, (v - axis[i]) / (axis[i + 1] - axis[i])

    def __call__(self, x: float, y: float) -> float:
        nx = len(self.xs)
        i, tx = self._locate(self.xs, x)
        j, ty = self._locate(self.ys, y)
        v = self.vals
        i1 = i + 1 if nx > 1 else i
        j1 = j + 1 if len(self.ys) > 1 else j
        a = v[j * nx + i] * (1 - tx) + v[j * nx + i1] * tx
        b = v[j1 * nx + i] * (1 - tx) + v[j1 * nx + i1] * tx
        return a * (1 - ty) + b * ty


class ProfileCorrection:
    """Measured/roofline ratios of one profile for one tier model (see module docstring)."""

    __slots__ = ("_pt", "_pp", "_dt", "_dp")

    def __init__(
        self,
        prefill_time: _Interp1D | _Grid2D | None,
        prefill_power: _Interp1D | None,
        decode_time: _Grid2D | None,
        decode_power: _Grid2D | None,
    ) -> None:
        self._pt, self._pp, self._dt, self._dp = prefill_time, prefill_power, decode_time, decode_power

    def prefill_time_ratio(self, new_tokens: int, cached_tokens: int = 0) -> float:
        if self._pt is None:
            return 1.0
        if isinstance(self._pt, _Grid2D):
            return self._pt(math.log2(new_tokens), math.log2(cached_tokens + 1))
        return self._pt(new_tokens)

    def prefill_power_ratio(self, new_tokens: int) -> float:
        return self._pp(new_tokens) if self._pp is not None else 1.0

    def decode_time_ratio(self, batch: int, context_tokens: int) -> float:
        if self._dt is None:
            return 1.0
        return self._dt(math.log2(batch), math.log2(context_tokens + 1))

    def decode_power_ratio(self, batch: int, context_tokens: int) -> float:
        if self._dp is None:
            return 1.0
        return self._dp(math.log2(max(batch, 1)), math.log2(context_tokens + 1))


def check_matches(tm: TierModel, profile: MeasuredProfile) -> None:
    """A profile applies to one GPU type, model and TP size."""
    gpu = _canonical(get_gpu, profile.gpu)
    model = _canonical(get_model, profile.model)
    if gpu != tm.gpu.name:
        raise ProfileError(
            f"profile gpu: measured on {profile.gpu!r} but the tier is {tm.gpu.name!r}. "
            "To fix: use a profile measured on this tier's GPU."
        )
    if model != tm.model.name:
        raise ProfileError(
            f"profile model: measured with {profile.model!r} but the fleet serves {tm.model.name!r}. "
            "To fix: re-profile with the fleet's model."
        )
    if profile.tp != tm.tp:
        raise ProfileError(
            f"profile tp: measured at tensor-parallel size {profile.tp} but the tier model has tp {tm.tp}. "
            "To fix: profile each TP size you allow, or restrict the tier's tp list."
        )


def _canonical(lookup: Any, name: str) -> str:
    try:
        return str(lookup(name).name)
    except CatalogError:
        return name


def build_correction(tm: TierModel, profile: MeasuredProfile) -> ProfileCorrection:
    """Ratios measured/roofline at every point, the roofline evaluated at the profile's own power cap."""
    check_matches(tm, profile)
    from tiers.perf import TierModel as _TM

    cap = profile.power_cap_w
    if cap is not None and cap >= tm.gpu.tdp_w:
        cap = None
    if cap is not None and not (tm.gpu.power_cap_min_w <= cap <= tm.gpu.power_cap_max_w):
        raise ProfileError(
            f"profile power_cap_w: {cap:g} W is outside {tm.gpu.name}'s range "
            f"{tm.gpu.power_cap_min_w:g}-{tm.gpu.power_cap_max_w:g} W. To fix: correct the profile."
        )
    base = _TM(
        tm.gpu,
        tm.model,
        tm.tp,
        cap,
        tm.gpu_memory_utilization,
        tm.activation_reserve_bytes,
        tm.block_size_tokens,
        tm.calibration,
        None,
    )
    use_energy = profile.energy_measured
    # the tier model's draws include the profile's idle override: shift the base's modelled power to match
    idle_shift_w = 0.0 if profile.idle_w is None else profile.idle_w - base.idle_w
    pt: list[tuple[float, float]] = []
    pt2: list[tuple[float, float, float]] = []
    pp: list[tuple[float, float]] = []
    for p in profile.prefill:
        model_s = base.roofline_prefill_time_s(p.new_tokens, p.cached_tokens)
        pt.append((p.new_tokens, p.latency_ms / 1e3 / model_s))
        pt2.append((math.log2(p.new_tokens), math.log2(p.cached_tokens + 1), p.latency_ms / 1e3 / model_s))
        if use_energy and p.energy_j is not None:
            model_w = base.prefill_energy_j(p.new_tokens, p.cached_tokens) / model_s + idle_shift_w
            pp.append((p.new_tokens, p.energy_j / (p.latency_ms / 1e3) / model_w))
    dt: list[tuple[float, float, float]] = []
    dp: list[tuple[float, float, float]] = []
    for d in profile.decode:
        x, y = math.log2(d.batch), math.log2(d.context_tokens + 1)
        dt.append((x, y, d.step_ms / 1e3 / base.roofline_decode_step_time_s(d.batch, d.context_tokens)))
        if use_energy and d.energy_j is not None:
            model_w = base.decode_power_w(d.batch, d.context_tokens) + idle_shift_w
            dp.append((x, y, d.energy_j / (d.step_ms / 1e3) / model_w))
    # prefill points over cached prefixes: a grid in (log2 new, log2(cached + 1)); else piecewise in new
    with_prefix = any(p.cached_tokens > 0 for p in profile.prefill)
    return ProfileCorrection(
        (_Grid2D(pt2) if with_prefix else _Interp1D(pt)) if pt else None,
        _Interp1D(pp) if pp else None,
        _Grid2D(dt) if dt else None,
        _Grid2D(dp) if dp else None,
    )


def apply_profile(tm: TierModel, profile: MeasuredProfile) -> TierModel:
    """`tm` with `profile`'s measured points overriding its roofline (raises ProfileError on mismatch)."""
    from dataclasses import replace

    return replace(tm, profile=profile)
