"""The highest arrival rate a plan's instances sustain in simulation: the measure `plan --max-rate` is
compared with (tests/cli/test_plan_fidelity.py, docs/planning.md "Max rate").

Sustaining a rate means two things, both checked on every seed:
- the SLO holds in steady state (violations within the allowance 100 - percentile), as in
  :func:`orchestrator.verify.validate_plan`;
- the fleet keeps up with the arrivals (stability): the steady window is not empty on any seed, and the SLO
  holds in each half of it separately (pooled over the seeds). A queue that does not keep up has waits that
  grow with time, so its later half misses first; a stationary one holds in both.

The stream's conversations are drawn i.i.d. from the workload (verify.steady_stream(iid=True), as users send
them): the verification's once-per-pass stream spreads heavy conversations evenly and overstated
paper-a40-disagg's capacity (0.801 vs 0.759 conv/s; docs/planning.md, "Max rate against the simulator").

The stream is at least STABILITY_CONVERSATIONS conversations per seed. A short stream cannot tell a
transient from a steady state: on examples/paper-a40.yaml's max-rate plan a 255-conversation stream held the
SLO at 1.2 conv/s with 0% violations, while 4,000 conversations at 0.9 conv/s grow a backlog of ~900
conversations (the decoders' KV fills, later turns wait for admission and never catch up again); on
examples/fleet-single-turn.yaml 400 conversations held at 14.8 conv/s while 8,000 at 10.5 conv/s see the
mean TTFET climb from 3 s to 26 s across the run (BENCHMARKS.md / docs/planning.md: measured).

The search is a bisection on simulated verdicts (geometric midpoints) between half and twice the planned rate,
until the bracket is narrower than `resolution` or the time budget runs out (then the best bracket so far is
returned with `budget_exhausted`).

Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from conserve.errors import ConServeError
from orchestrator.config import FleetConfig
from orchestrator.metrics import SloSpec, conversation_metrics
from orchestrator.planner import PlanRun
from orchestrator.sim.fleet import reference_tier_model, simulate_fleet
from orchestrator.sim.standalone import StandaloneCache
from orchestrator.verify import DEFAULT_SEEDS, policy_for, steady_stream, stream_length
from orchestrator.workload import workload_from_config

# Conversations per seed of a stability check: the horizon of the claim "sustains this rate". At 4,000 the
# runaway of both measured fleets above their capacity shows (see the module docstring); a longer horizon
# can only lower the measured rate (a metastable collapse can start later), and costs time linearly.
STABILITY_CONVERSATIONS = 4000
DEFAULT_RESOLUTION = 0.02  # bisection stops when hi / lo - 1 is below this (the measure's resolution)
DEFAULT_TIME_BUDGET_S = 300.0

CheckProgress = Callable[["RateCheck"], None]


@dataclass(frozen=True, slots=True)
class RateCheck:
    """The verdict on one arrival rate (pooled over the seeds)."""

    rate_per_s: float
    holds: bool
    why: str  # "" when it holds
    violation_pct_halves: tuple[float, float]  # first and second half of the steady window
    steady_conversations: int
    wall_s: float


@dataclass(frozen=True, slots=True)
class SimulatedMaxRate:
    """The outcome of the bisection: lo sustains, hi does not (hi = inf: the bracket's upper end held)."""

    rate_per_s: float  # lo: the highest rate found to hold (0 when even the lower end misses)
    upper_per_s: float  # hi: the lowest rate found not to hold
    checks: tuple[RateCheck, ...]
    budget_exhausted: bool
    conversations: int  # per seed
    seeds: tuple[int, ...]
    wall_s: float

    def to_dict(self) -> dict[str, object]:
        return {
            "rate_per_s": round(self.rate_per_s, 6),
            "upper_per_s": None if math.isinf(self.upper_per_s) else round(self.upper_per_s, 6),
            "budget_exhausted": self.budget_exhausted,
            "conversations": self.conversations,
            "seeds": list(self.seeds),
            "wall_s": round(self.wall_s, 2),
            "checks": [
                {
                    "rate_per_s": round(c.rate_per_s, 6),
                    "holds": c.holds,
                    "why": c.why or None,
                    "violation_pct_halves": [round(v, 2) for v in c.violation_pct_halves],
                    "steady_conversations": c.steady_conversations,
                }
                for c in self.checks
            ],
        }


def check_rate(
    cfg: FleetConfig,
    run: PlanRun,
    rate_per_s: float,
    seeds: Sequence[int] = tuple(range(DEFAULT_SEEDS)),
    conversations: int | None = None,
) -> RateCheck:
    """Simulate the plan's instances at rate_per_s (module docstring) and say whether they sustain it.

    The steady window is validate_plan's without its floor of 3 decode relaxation times on t_w: arrivals in
    [t_w, T - mean E2E], t_w = clamp(mean E2E, 10%, 30% of the arrival span). A seed with no steady state
    fails the rate at once (the later seeds are skipped).
    """
    if not seeds:
        raise ConServeError("seeds must not be empty. To fix: pass at least one seed.")
    t0 = time.perf_counter()
    n = conversations or max(stream_length(cfg, run), STABILITY_CONVERSATIONS)
    base = workload_from_config(cfg.workload)
    policy, opts = policy_for(run, cfg)
    slo = SloSpec.from_config(cfg.slo)
    standalone = StandaloneCache(reference_tier_model(cfg))
    allowance = 100.0 - cfg.slo.percentile
    halves: tuple[list[bool], list[bool]] = ([], [])
    for seed in seeds:
        convs = steady_stream(base, n, rate_per_s, seed, iid=True)
        res, _ = simulate_fleet(
            cfg, run.plan, policy, None, seed=seed, conversations=convs, policy_options=opts,
            energy_window_s=None,
        )  # fmt: skip
        mets = conversation_metrics(res, convs, standalone, slo)
        t_end = max(c.arrival_s for c in convs)
        e2e_mean = float(np.mean([m.e2e_s for m in mets])) if mets else 0.0
        t_w = min(max(e2e_mean, 0.1 * t_end), 0.3 * t_end)
        t_cut = max(t_end - e2e_mean, t_w)
        steady = [m for m in mets if t_w <= m.arrival_s <= t_cut]
        if not steady:
            why = (
                f"seed {seed}: no steady state (the mean E2E, {e2e_mean:.0f} s, spans the run: the fleet "
                "does not keep up)"
            )
            return RateCheck(rate_per_s, False, why, (100.0, 100.0), 0, time.perf_counter() - t0)
        mid = (t_w + t_cut) / 2.0
        for m in steady:
            halves[0 if m.arrival_s < mid else 1].append(m.violates)
    pct = tuple(100.0 * sum(h) / len(h) if h else 100.0 for h in halves)
    first, second = pct[0], pct[1]
    why = ""
    if first > allowance + 1e-9 or second > allowance + 1e-9:
        which = (
            "both halves"
            if min(first, second) > allowance + 1e-9
            else ("the later half" if second > allowance + 1e-9 else "the earlier half")
        )
        why = (
            f"{first:.1f}% / {second:.1f}% of the steady window's earlier / later half miss an SLO (allowed "
            f"{allowance:g}%; {which})"
        )
    return RateCheck(
        rate_per_s,
        not why,
        why,
        (first, second),
        len(halves[0]) + len(halves[1]),
        time.perf_counter() - t0,
    )


def highest_sustained_rate(
    cfg: FleetConfig,
    run: PlanRun,
    seeds: Sequence[int] = tuple(range(DEFAULT_SEEDS)),
    lo_per_s: float | None = None,
    hi_per_s: float | None = None,
    resolution: float = DEFAULT_RESOLUTION,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    conversations: int | None = None,
    progress: CheckProgress | None = None,
) -> SimulatedMaxRate:
    """The highest rate at which the plan's instances sustain the SLO in simulation (module docstring), by
    bisection between lo (default half the planned rate) and hi (default twice it)."""
    if not resolution > 0:
        raise ConServeError(f"resolution must be > 0, got {resolution}. To fix: pass e.g. 0.02.")
    t0 = time.perf_counter()
    planned = run.plan.predictions.arrival_rate_per_s
    lo, hi = lo_per_s or planned / 2.0, hi_per_s or planned * 2.0
    n = conversations or max(stream_length(cfg, run), STABILITY_CONVERSATIONS)
    checks: list[RateCheck] = []

    def check(r: float) -> bool:
        c = check_rate(cfg, run, r, seeds, n)
        checks.append(c)
        if progress is not None:
            progress(c)
        return c.holds

    def out(rate: float, upper: float, exhausted: bool) -> SimulatedMaxRate:
        return SimulatedMaxRate(
            rate, upper, tuple(checks), exhausted, n, tuple(seeds), time.perf_counter() - t0
        )

    if not check(lo):
        return out(0.0, lo, False)
    if check(hi):
        return out(hi, math.inf, False)
    while hi / lo - 1.0 > resolution:
        if time.perf_counter() - t0 >= time_budget_s:
            return out(lo, hi, True)
        mid = math.sqrt(lo * hi)
        if check(mid):
            lo = mid
        else:
            hi = mid
    return out(lo, hi, False)


__all__: list[str] = [
    "STABILITY_CONVERSATIONS",
    "RateCheck",
    "SimulatedMaxRate",
    "check_rate",
    "highest_sustained_rate",
]
