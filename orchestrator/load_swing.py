"""Arrivals whose rate changes over time: a piecewise-linear rate profile and the load-swing profile.

A :class:`RateProfile` is a list of (time_s, rate_per_s) points; the rate is linear between points and stays
at the last point's rate after it. :func:`profiled_arrivals` gives conversations the arrival times of a
non-homogeneous Poisson process with that rate, by inversion: with unit-rate Poisson event times E_k
(cumulative sums of Exp(1) draws), arrival k is at Lambda^-1(E_k), where Lambda(t) is the integral of the
rate from 0 to t (piecewise quadratic, inverted per segment in closed form). Deterministic for a seed.

:func:`load_swing` is the workload of the power-controller benchmark (issue 14 item 3): a trough at the base
rate, a linear ramp to ``factor`` x base, back down, a trough, and a burst (a step to ``factor`` x base),
then the trough again. Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from orchestrator.errors import WorkloadError
from orchestrator.workload import ConversationSpec


@dataclass(frozen=True, slots=True)
class RateProfile:
    points: tuple[tuple[float, float], ...]  # (time_s, rate_per_s), times increasing from 0

    def __post_init__(self) -> None:
        pts = self.points
        if not pts or pts[0][0] != 0.0:
            raise WorkloadError(f"a rate profile starts at time 0, got {pts[:1]}. To fix: add (0, rate).")
        for (t0, _), (t1, _) in zip(pts, pts[1:], strict=False):
            if not t1 > t0:
                raise WorkloadError(f"rate profile times must increase, got {t0} then {t1}")
        for t, r in pts:
            if not (math.isfinite(r) and r >= 0):
                raise WorkloadError(f"rate at {t} s must be >= 0 conversations/s, got {r}")
        if pts[-1][1] <= 0:
            raise WorkloadError("the last rate of a profile must be > 0 (it holds after the last point)")

    def rate_at(self, t: float) -> float:
        pts = self.points
        for (t0, r0), (t1, r1) in zip(pts, pts[1:], strict=False):
            if t0 <= t < t1:
                return r0 + (r1 - r0) * (t - t0) / (t1 - t0)
        return pts[-1][1] if t >= pts[-1][0] else pts[0][1]

    def cumulative(self, t: float) -> float:
        """Lambda(t): expected arrivals in [0, t]."""
        acc = 0.0
        pts = self.points
        for (t0, r0), (t1, r1) in zip(pts, pts[1:], strict=False):
            if t <= t0:
                return acc
            hi = min(t, t1)
            acc += (hi - t0) * (r0 + 0.5 * (r1 - r0) * (hi - t0) / (t1 - t0))
        if t > pts[-1][0]:
            acc += (t - pts[-1][0]) * pts[-1][1]
        return acc

    def inverse(self, mass: float) -> float:
        """The time t with Lambda(t) = mass (mass >= 0)."""
        acc = 0.0
        pts = self.points
        for (t0, r0), (t1, r1) in zip(pts, pts[1:], strict=False):
            seg = (t1 - t0) * 0.5 * (r0 + r1)
            if acc + seg >= mass:
                m = mass - acc  # solve r0 x + (r1 - r0) / (2 L) x^2 = m for x in [0, L]
                a = 0.5 * (r1 - r0) / (t1 - t0)
                if abs(a) < 1e-15:
                    return t0 + (m / r0 if r0 > 0 else 0.0)
                x = (-r0 + math.sqrt(max(r0 * r0 + 4 * a * m, 0.0))) / (2 * a)
                return t0 + min(max(x, 0.0), t1 - t0)
            acc += seg
        return pts[-1][0] + (mass - acc) / pts[-1][1]

    @property
    def peak_over_trough(self) -> float:
        rates = [r for _, r in self.points if r > 0]
        return max(rates) / min(rates)


def load_swing(
    base_rate_per_s: float,
    factor: float = 4.0,
    trough_s: float = 120.0,
    ramp_s: float = 120.0,
    burst_s: float = 60.0,
) -> RateProfile:
    """Trough (base) -> ramp up to factor x base -> ramp down -> trough -> burst (step) -> trough.

    Phases in seconds from 0: [0, T) base; [T, T+R) ramp up; [T+R, T+2R) ramp down; [T+2R, 2T+2R) base;
    [2T+2R, 2T+2R+B) factor x base; after that base (T trough_s, R ramp_s, B burst_s)."""
    if not base_rate_per_s > 0 or not factor >= 1:
        raise WorkloadError(
            f"load swing: base rate must be > 0 and factor >= 1, got {base_rate_per_s}, {factor}"
        )
    b, p = base_rate_per_s, base_rate_per_s * factor
    t, r, u = trough_s, ramp_s, burst_s
    eps = 1e-3  # the burst is a step: its edges are 1 ms ramps (a profile is piecewise linear)
    pts = [(0.0, b), (t, b), (t + r, p), (t + 2 * r, b), (2 * t + 2 * r, b), (2 * t + 2 * r + eps, p),
           (2 * t + 2 * r + u, p), (2 * t + 2 * r + u + eps, b)]  # fmt: skip
    return RateProfile(tuple(pts))


def profiled_arrivals(
    convs: Sequence[ConversationSpec], profile: RateProfile, seed: int = 0
) -> list[ConversationSpec]:
    """Arrival times of a Poisson process with the profile's rate, in list order (module docstring)."""
    rng = np.random.default_rng(seed)
    marks = np.cumsum(rng.exponential(1.0, len(convs)))
    return [replace(c, arrival_s=profile.inverse(float(m))) for c, m in zip(convs, marks, strict=True)]
