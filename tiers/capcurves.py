"""Measured power-cap curves: how a cap slows compute-bound and memory-bound kernels on one GPU type.

Written by ``orchestrator profile --micro`` (orchestrator/micro.py: a torch GEMM and a memory copy at each
allowed cap); read through fleet.yaml ``tiers[].cap_curves``. The file (YAML)::

    version: 1
    kind: cap-curves
    gpu: A40                        # catalog name of the GPU measured (null: not a GPU)
    device: cuda                    # cuda | cpu
    gpu_measured: true              # false: the figures are a CPU's, not a GPU's
    caps_applied: true              # false: no power cap was applied (every point at cap_w null)
    power_measured: true            # gemm_power_w / mem_power_w from zeus; false: null
    source: "orchestrator profile --micro on host gpu-3, torch 2.13.0, 2026-12-07T10:00:00Z"
    gemm: {n: 8192, dtype: bfloat16}
    memory: {bytes: 1073741824}
    points:                         # one per cap, highest first
      - {cap_w: 300, gemm_tflops: 121.4, mem_gbps: 604.1, gemm_power_w: 297.0, mem_power_w: 212.5}
      - {cap_w: 200, gemm_tflops: 92.8, mem_gbps: 598.7, gemm_power_w: 199.1, mem_power_w: 198.0}

:meth:`CapCurves.slowdowns` gives, for a cap, (compute, memory) = throughput at the highest measured cap /
throughput at that cap, linear in the cap between points, held outside, and never below 1 (a lower cap does
not speed a kernel up; a faster figure is noise). ``TierModel(cap_curves=...)`` multiplies its compute-bound
times (prefill GEMMs and attention) and memory-bound times (weight and KV reads) by them, in place of the
modelled DVFS slowdown (tiers/power.py). The GEMM kernel is large and draws the GPU's full power, so it is the
slowdown of a workload that hits the cap; a small model's GEMMs that draw less are slowed less (the fitted
``power_gemm_frac`` of tiers/perf.py knows that, this curve does not).

Pure except load/save. Pydantic only at the file edge. Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tiers.errors import ProfileError
from tiers.fileio import write_text_atomic

CAP_CURVES_VERSION = 1


@dataclass(frozen=True, slots=True)
class CapPoint:
    cap_w: float | None  # None: no cap applied
    gemm_tflops: float
    mem_gbps: float
    gemm_power_w: float | None = None
    mem_power_w: float | None = None


@dataclass(frozen=True, slots=True)
class CapCurves:
    gpu: str | None
    device: str
    gpu_measured: bool
    caps_applied: bool
    power_measured: bool
    source: str
    points: tuple[CapPoint, ...]  # highest cap first
    gemm: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None

    def slowdowns(self, cap_w: float) -> tuple[float, float]:
        """(compute, memory) slowdown factors >= 1 at ``cap_w`` relative to the highest measured cap."""
        pts = sorted((p for p in self.points if p.cap_w is not None), key=lambda p: p.cap_w or 0.0)
        if not pts:
            return 1.0, 1.0
        ref = pts[-1]
        caps = [p.cap_w or 0.0 for p in pts]
        i = bisect.bisect_left(caps, cap_w)
        if i <= 0:
            lo = hi = pts[0]
        elif i >= len(pts):
            lo = hi = pts[-1]
        else:
            lo, hi = pts[i - 1], pts[i]
        span = (hi.cap_w or 0.0) - (lo.cap_w or 0.0)
        f = 0.0 if span <= 0 else (cap_w - (lo.cap_w or 0.0)) / span

        def at(a: float, b: float) -> float:
            return a + f * (b - a)

        compute = ref.gemm_tflops / at(lo.gemm_tflops, hi.gemm_tflops)
        memory = ref.mem_gbps / at(lo.mem_gbps, hi.mem_gbps)
        return max(1.0, compute), max(1.0, memory)

    def check_usable(self, gpu_name: str, where: str) -> None:
        """Refuse curves the tier model cannot use: a CPU run, no caps applied, or another GPU's."""
        capped = {p.cap_w for p in self.points if p.cap_w is not None}
        if not self.gpu_measured or not self.caps_applied or len(capped) < 2:
            raise ProfileError(
                f"{where}: these cap curves were measured on {self.device} with "
                f"{'no cap applied' if not self.caps_applied else f'{len(capped)} cap(s)'}: not a GPU's "
                "curve over caps. To fix: run `orchestrator profile --micro` on a GPU host with at least two "
                "caps (or remove cap_curves from the tier)"
            )
        if self.gpu is None or self.gpu.lower() != gpu_name.lower():
            raise ProfileError(
                f"{where}: measured on GPU {self.gpu!r} but the tier's GPU is {gpu_name!r}. To fix: use "
                "curves of the same GPU type"
            )


# ---- file edge ------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _PointIn(_Strict):
    cap_w: float | None = Field(None, gt=0)
    gemm_tflops: float = Field(gt=0)
    mem_gbps: float = Field(gt=0)
    gemm_power_w: float | None = Field(None, gt=0)
    mem_power_w: float | None = Field(None, gt=0)


class _CurvesIn(_Strict):
    version: int = CAP_CURVES_VERSION
    kind: Literal["cap-curves"] = "cap-curves"
    gpu: str | None = None
    device: str = Field(min_length=1)
    gpu_measured: bool
    caps_applied: bool
    power_measured: bool
    source: str = Field(min_length=1)
    gemm: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    points: list[_PointIn] = Field(min_length=1)


def curves_from_dict(data: Any, where: str = "cap curves") -> CapCurves:
    try:
        c = _CurvesIn.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        raise ProfileError(
            f"{where}: {loc}: {e['msg']}. To fix: regenerate it with `orchestrator profile --micro`"
        ) from None
    if c.version != CAP_CURVES_VERSION:
        raise ProfileError(f"{where}: version {c.version} is not supported (expected {CAP_CURVES_VERSION})")
    pts = tuple(CapPoint(**p.model_dump()) for p in c.points)
    pts = tuple(sorted(pts, key=lambda p: -(p.cap_w or 0.0)))
    return CapCurves(c.gpu, c.device, c.gpu_measured, c.caps_applied, c.power_measured, c.source, pts,
                     c.gemm, c.memory)  # fmt: skip


def curves_to_dict(c: CapCurves) -> dict[str, Any]:
    return {
        "version": CAP_CURVES_VERSION, "kind": "cap-curves", "gpu": c.gpu, "device": c.device,
        "gpu_measured": c.gpu_measured, "caps_applied": c.caps_applied, "power_measured": c.power_measured,
        "source": c.source, "gemm": c.gemm, "memory": c.memory,
        "points": [{"cap_w": p.cap_w, "gemm_tflops": p.gemm_tflops, "mem_gbps": p.mem_gbps,
                    "gemm_power_w": p.gemm_power_w, "mem_power_w": p.mem_power_w} for p in c.points],
    }  # fmt: skip


def load_cap_curves(path: str | Path) -> CapCurves:
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"cap curves file {str(p)!r} does not exist. To fix: orchestrator profile --micro")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ProfileError(f"{p}: not valid YAML ({err})") from None
    return curves_from_dict(data, str(p))


def save_cap_curves(c: CapCurves, path: str | Path, header: str = "") -> None:
    """Write atomically (temp file + rename); ``header`` lines become YAML comments."""
    lines = "".join(f"# {h}\n" for h in header.splitlines())
    write_text_atomic(Path(path), lines + yaml.safe_dump(curves_to_dict(c), sort_keys=False))
