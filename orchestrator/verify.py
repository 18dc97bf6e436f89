"""Plans verified before they are shown: simulate the ILP's plan in steady state and tighten until it holds.

The validation step of `orchestrator plan` (the only place where planning meets simulation: the model modules,
placement/ilp/ and orchestrator/planner.py, never import the simulator).

Steady state
    The plan is simulated on a long stream of the workload's own conversations (each conversation of the
    fleet file's workload once per pass, seeded order) arriving as a Poisson stream conditioned on realising
    the planned rate exactly (:func:`steady_stream`), for several seeds
    (default 3). The stream lasts at least STEADY_HORIZON_STANDALONE x the standalone TTFET and
    (RAMP_TAU_C + WINDOW_TAU_C) x tau_c (at least the file's own run), at most MAX_CONVERSATIONS
    conversations per seed; tau_c is the decoders' batch relaxation time, the largest integrated
    autocorrelation time of a decode pool's step under the plan's batch law (PoolPrediction.tau_c_s).
    Three phases, reported separately:
    - ramp-up: conversations arriving before t_w = clamp(max(mean simulated E2E, RAMP_TAU_C x tau_c), 10%,
      30% of the arrival span): the decoders' population converges to its Little's-law level after about
      one residence time, its spread (the batch law) after a few tau_c (141.5 s on paper-a40-disagg, whose
      window had started after 33 s and averaged 5.6 of the law's 6.7 sequences: docs/planning.md);
    - steady state: conversations arriving in [t_w, T - mean E2E] (T = the last arrival); energy and tokens
      over [t_w, T] (tokens/J = tokens of the conversations arriving in that window / energy of every GPU
      over it, idle and unallocated GPUs included -- the planner's tokens_per_s / watts_total);
    - drain: conversations arriving after T - mean E2E (their later turns meet a fleet that empties).
    The SLO verdict ("SLO met" in the table) is the steady-state share of conversations that miss an SLO
    (pooled over the seeds) against the allowance 100 - percentile (5% for p95).

The loop (:func:`verify`)
    If the simulated steady-state violations exceed the allowance, the SLO family whose violations
    dominate (TTFET or TBT; E2E counts for both) is tightened in the planning SLO by the ratio of its
    slowdown bound to its simulated p-th percentile slowdown (x 0.97, clamped to [0.5, 0.95]) and the ILP
    re-solves at the same rate (with --max-rate: at the highest rate the tightened SLO allows). It stops
    when the plan holds, after MAX_ROUNDS rounds (a round whose re-solve returns the same instances is not
    re-simulated: the target is tightened again), or when the tightened ILP is infeasible -- then it names
    the resource that runs out (the ILP's diagnosis) and shows the best plan found with "SLO met: NO".

Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from conserve.errors import ConServeError
from orchestrator.config import FleetConfig
from orchestrator.metrics import ConversationMetrics, SloSpec, conversation_metrics
from orchestrator.planner import PlanRun
from orchestrator.sim.fleet import reference_tier_model, simulate_fleet, unallocated_idle_w
from orchestrator.sim.result import SimResult
from orchestrator.sim.standalone import StandaloneCache
from orchestrator.workload import ConversationSpec, workload_from_config
from placement.base import Role

DEFAULT_SEEDS = 3
# The stream lasts at least this many standalone TTFETs: a conversation resides ~1-3 standalone TTFETs, so
# the ramp-up and drain (about one residence each) leave a steady window of >= ~14 standalone TTFETs.
STEADY_HORIZON_STANDALONE = 20.0
MAX_CONVERSATIONS = 2000  # per seed: bounds the loop's time (examples/fleet.yaml: BENCHMARKS.md)
# Ramp-up >= RAMP_TAU_C decode relaxation times (the batch law's chain started empty on paper-a40-disagg is
# 2.2% below its stationary mean batch at 3 tau_c = 425 s, 7.4% at 250 s), steady window >= WINDOW_TAU_C (a
# time average over T has a standard error of sqrt(2 tau_c / T) SDs: 0.45 per seed). Choices, not measured.
RAMP_TAU_C = 3.0
WINDOW_TAU_C = 10.0
MAX_ROUNDS = 4
TIGHTEN_MIN, TIGHTEN_MAX, TIGHTEN_MARGIN = 0.5, 0.95, 0.97

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class ValidationRow:
    metric: str
    predicted: float | None
    simulated: float | None
    note: str = ""


@dataclass(frozen=True, slots=True)
class Phase:
    """Conversations of one phase of the simulated runs (pooled over the seeds)."""

    conversations: int
    slo_violation_pct: float
    ttfet_slowdown_p: float | None

    def to_dict(self) -> dict[str, object]:
        return {
            "conversations": self.conversations,
            "slo_violation_pct": round(self.slo_violation_pct, 2),
            "ttfet_slowdown_p": None if self.ttfet_slowdown_p is None else round(self.ttfet_slowdown_p, 3),
        }


@dataclass(frozen=True, slots=True)
class Round:
    """One round of the verification loop: the planning SLO factors and what the simulator said."""

    ttfet_factor: float
    tbt_factor: float
    slo_violation_pct: float
    ttfet_slowdown_p: float | None
    tbt_slowdown_p: float | None
    watts_total: float


@dataclass(frozen=True, slots=True)
class Validation:
    """The plan simulated in steady state (orchestrator.sim), next to its predictions."""

    policy: str
    seeds: tuple[int, ...]
    conversations: int  # per seed
    arrival_rate_per_s: float
    rows: tuple[ValidationRow, ...]
    slo_violation_pct: float  # steady state, pooled over the seeds
    allowance_pct: float  # 100 - percentile
    violation_pct_by: dict[str, float]
    steady: Phase
    ramp_up: Phase
    drain: Phase
    window_s: tuple[float, float]  # the steady window [t_w, T] (seconds from the first arrival)
    sim_wall_s: float
    threshold_tokens: int = 0
    rounds: tuple[Round, ...] = ()
    loop_wall_s: float = 0.0
    status: str = "holds"  # "holds", "fails: <why>", "not checked"
    predicted_met: bool = True
    tbt_slowdown_p: float | None = None  # steady-state p-th percentile of the per-conversation TBT slowdown

    @property
    def holds(self) -> bool:
        """Steady-state violations within the allowance -- and a steady state at all: when the mean E2E
        fills the arrival span after the ramp-up, every conversation is ramp-up or drain (the fleet does
        not keep up: waits grow with the run) and 0% of none must not read as holding."""
        return self.steady.conversations > 0 and self.slo_violation_pct <= self.allowance_pct + 1e-9

    def shortfall(self) -> str:
        """Why it does not hold, in words (for the status)."""
        if self.steady.conversations == 0:
            return (
                "no steady state: every simulated conversation arrived in the ramp-up or the drain (the mean "
                "E2E spans the run, so the fleet does not keep up with the rate)"
            )
        return (
            f"{self.slo_violation_pct:.1f}% of steady-state conversations miss an SLO (allowed "
            f"{self.allowance_pct:g}%)"
        )

    def metric(self, name: str) -> ValidationRow | None:
        return next((r for r in self.rows if r.metric == name), None)

    def to_dict(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "seeds": list(self.seeds),
            "conversations": self.conversations,
            "arrival_rate_per_s": self.arrival_rate_per_s,
            "slo_violation_pct": round(self.slo_violation_pct, 2),
            "slo_violation_allowance_pct": round(self.allowance_pct, 2),
            "slo_violation_pct_by": {k: round(v, 2) for k, v in self.violation_pct_by.items()},
            "slo_met_simulated": self.holds,
            "slo_met_predicted": self.predicted_met,
            "status": self.status,
            "steady_state": {
                **self.steady.to_dict(),
                "window_s": [round(self.window_s[0], 2), round(self.window_s[1], 2)],
            },
            "ramp_up": self.ramp_up.to_dict(),
            "drain": self.drain.to_dict(),
            "local_prefill_below_tokens": self.threshold_tokens,
            "tbt_slowdown_p": None if self.tbt_slowdown_p is None else round(self.tbt_slowdown_p, 3),
            "sim_wall_s": round(self.sim_wall_s, 3),
            "loop_wall_s": round(self.loop_wall_s, 3),
            "rounds": [
                {
                    "ttfet_factor": round(r.ttfet_factor, 4),
                    "tbt_factor": round(r.tbt_factor, 4),
                    "slo_violation_pct": round(r.slo_violation_pct, 2),
                    "ttfet_slowdown_p": None if r.ttfet_slowdown_p is None else round(r.ttfet_slowdown_p, 3),
                    "tbt_slowdown_p": None if r.tbt_slowdown_p is None else round(r.tbt_slowdown_p, 3),
                    "watts_total": round(r.watts_total, 1),
                }
                for r in self.rounds
            ],
            "metrics": {
                r.metric: {"predicted": r.predicted, "simulated": r.simulated, "note": r.note or None}
                for r in self.rows
            },
        }


def steady_stream(
    base: Sequence[ConversationSpec], n: int, rate_per_s: float, seed: int, iid: bool = False
) -> list[ConversationSpec]:
    """n conversations of `base` at rate_per_s: the workload the planner summarised, at the planned rate.
    iid: draw them with replacement instead (i.i.d., as users send them; the stability check of
    orchestrator.sim_capacity: once per pass is smoother and hid a collapse, docs/planning.md "Max rate").

    Mix: every conversation of `base` once per pass, each pass in a seeded random order (the last pass cut
    short), so the stream's token and turn statistics are the planner's (``workload_stats`` of `base`),
    not a resample of them. Drawing with replacement, as before, moved the stream's mean decode tokens by
    several percent on a few hundred heavy-tailed conversations.
    Arrivals: a Poisson process conditioned on its count -- the n - 1 gaps are exponential draws scaled so
    that they sum to (n - 1) / rate_per_s (uniform spacings: the arrival times of a Poisson process given
    that n arrivals span exactly that time). Unconditioned, the realised rate of a 255-400 conversation
    stream is off by its sampling error (seed 0: 11% below the planned rate on examples/paper-a40.yaml and
    examples/fleet-single-turn.yaml), and a prediction at the planned rate was compared with a simulation
    at another one."""
    rng = np.random.default_rng(seed)
    m = len(base)
    passes = -(-n // m) if m else 0
    if iid or not m:
        idx = rng.integers(0, m, n) if m else np.array([], dtype=int)
    else:
        idx = np.concatenate([rng.permutation(m) for _ in range(passes)])[:n]
    convs = [replace(base[int(i)], conversation_id=f"s{seed}-{k}") for k, i in enumerate(idx)]
    if not convs:
        return convs
    if not rate_per_s > 0 or not math.isfinite(rate_per_s):
        raise ConServeError(
            f"arrival rate must be > 0 conversations/s, got {rate_per_s}. To fix: pass a rate > 0."
        )
    gaps = rng.exponential(1.0, len(convs) - 1)
    total = float(gaps.sum())
    if total > 0:
        gaps *= (len(convs) - 1) / rate_per_s / total
    times = np.concatenate(([0.0], np.cumsum(gaps)))
    return [replace(c, arrival_s=float(x)) for c, x in zip(convs, times, strict=True)]


def decode_relaxation_s(run: PlanRun) -> float:
    """tau_c of the plan's decoders: the largest batch-law relaxation time of its decode pools (0: none)."""
    return max((p.tau_c_s for p in run.result.pools), default=0.0)


def stream_length(cfg: FleetConfig, run: PlanRun, max_conversations: int = MAX_CONVERSATIONS) -> int:
    """Conversations per seed: >= the file's run, 20 standalone TTFETs and 13 decode relaxation times."""
    p = run.plan.predictions
    rate = p.arrival_rate_per_s
    horizon = STEADY_HORIZON_STANDALONE * max(p.ttfet_standalone_s, 1e-3)
    horizon = max(horizon, (RAMP_TAU_C + WINDOW_TAU_C) * decode_relaxation_s(run))
    n = max(run.stats.conversations, math.ceil(rate * horizon), 50)
    return int(min(n, max(max_conversations, 50)))


def policy_for(run: PlanRun, cfg: FleetConfig) -> tuple[str, dict[str, object]]:
    """The policy that runs the plan: colocated for an all-colocated plan, else the fleet's (ConServe with
    the plan's local-prefill threshold: 0 unless the plan chose hybrid decoders)."""
    roles = {p.role for p in run.plan.pools if p.instances > 0}
    if roles == {Role.COLOCATED.value}:
        return "colocated", {}
    name = cfg.policy
    opts: dict[str, object] = {}
    if name.replace("_", "-").lower() == "conserve":
        opts["local_prefill_below_tokens"] = run.plan.predictions.conserve_threshold_tokens
    return name, opts


def _window_energy_j(res: SimResult, t0: float, t1: float) -> float:
    """Energy of every instance over [t0, t1] from its energy windows (pro rata for partial overlaps)."""
    total = 0.0
    for w in res.energy_windows:
        lo, hi = max(w.start_s, t0), min(w.end_s, t1)
        if hi <= lo or w.end_s <= w.start_s:
            continue
        total += w.energy_j * (hi - lo) / (w.end_s - w.start_s)
    return total


def _q(vals: Sequence[float], p: float) -> float | None:
    xs = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.percentile(np.asarray(xs), p)) if xs else None


def _phase(mets: Sequence[ConversationMetrics], p: float) -> Phase:
    n = len(mets)
    viol = 100.0 * sum(1 for m in mets if m.violates) / n if n else 0.0
    return Phase(n, viol, _q([m.ttfet_slowdown for m in mets if m.ttfet_slowdown is not None], p))


def validate_plan(
    cfg: FleetConfig,
    run: PlanRun,
    seeds: Sequence[int] = tuple(range(DEFAULT_SEEDS)),
    progress: Progress | None = None,
    conversations: int | None = None,
    rate_per_s: float | None = None,
) -> Validation:
    """Simulate the plan at its planned rate (or `rate_per_s`) on a steady stream of the workload, for each
    seed, and compare the steady-state figures with the plan's predictions (module docstring)."""
    if not seeds:
        raise ConServeError("--seeds must be >= 1. To fix: pass --seeds 3.")
    t_start = time.perf_counter()
    pct = cfg.slo.percentile
    preds = run.plan.predictions
    rate = rate_per_s or preds.arrival_rate_per_s
    n = conversations or stream_length(cfg, run)
    base = workload_from_config(cfg.workload)
    policy, opts = policy_for(run, cfg)
    slo = SloSpec.from_config(cfg.slo)
    standalone = StandaloneCache(reference_tier_model(cfg))
    idle_unalloc_w = 0.0
    steady: list[ConversationMetrics] = []
    ramp: list[ConversationMetrics] = []
    drain: list[ConversationMetrics] = []
    tokens = energy = span_total = 0.0
    busy: dict[str, list[float]] = {}
    window = (0.0, 0.0)
    total = n * len(seeds)
    ramp_s = RAMP_TAU_C * decode_relaxation_s(run)
    for k, seed in enumerate(seeds):
        convs = steady_stream(base, n, rate, seed)
        tick = None
        if progress is not None:
            done0 = k * n

            def tick(done: int, _total: int, done0: int = done0) -> None:
                progress(done0 + done, total)

        res, insts = simulate_fleet(
            cfg, run.plan, policy, None, seed=seed, conversations=convs, policy_options=opts,
            energy_window_s=1.0, progress=tick,
        )  # fmt: skip
        idle_unalloc_w = unallocated_idle_w(cfg, insts)
        mets = conversation_metrics(res, convs, standalone, slo)
        arrivals = [c.arrival_s for c in convs]
        t_end = max(arrivals)
        e2e_mean = float(np.mean([m.e2e_s for m in mets])) if mets else 0.0
        t_w = min(max(e2e_mean, ramp_s, 0.1 * t_end), 0.3 * t_end)
        t_cut = max(t_end - e2e_mean, t_w)
        window = (t_w, t_end)
        for m in mets:
            (ramp if m.arrival_s < t_w else steady if m.arrival_s <= t_cut else drain).append(m)
        tokens += sum(c.total_tokens for c in convs if t_w <= c.arrival_s <= t_end)
        energy += _window_energy_j(res, t_w, t_end) + idle_unalloc_w * (t_end - t_w)
        span_total += t_end - t_w
        for i in res.instances:
            busy.setdefault(i.role, []).append(i.busy_s / res.makespan_s if res.makespan_s > 0 else 0.0)
    wall = time.perf_counter() - t_start
    st = _phase(steady, pct)
    by: dict[str, float] = {}
    for m in steady:
        for v in m.violated:
            by[v] = by.get(v, 0.0) + 100.0 / max(len(steady), 1)
    tbt = [m.tbt_mean_ms for m in steady if m.tbt_mean_ms > 0]
    dec_busy = busy.get("decode", []) + busy.get("colocated", [])
    ttfet_s = _q([m.ttfet_s for m in steady], pct)
    pname = f"p{pct:g}"
    rows = [
        ValidationRow(
            f"{pname} TTFET slowdown",
            preds.ttfet_p95_slowdown,
            _q([m.ttfet_slowdown for m in steady if m.ttfet_slowdown is not None], pct),
            "each conversation vs its own standalone run (reference tier); steady state",
        ),
        ValidationRow(f"{pname} TTFET s", preds.ttfet_p95_s, ttfet_s, "steady state"),
        ValidationRow(
            "mean TBT ms",
            preds.tbt_mean_ms,
            float(np.mean(tbt)) if tbt else None,
            "mean over conversations of the final turn's mean TBT; steady state",
        ),
        ValidationRow(
            "tokens/J",
            preds.tokens_per_j,
            tokens / energy if energy > 0 else None,
            "prompt + output tokens / energy of every GPU (idle included); steady window",
        ),
        ValidationRow(
            "decode busy fraction",
            _decode_busy_predicted(run),
            float(np.mean(dec_busy)) if dec_busy else None,
            "decoders and colocated instances; predicted: 1 - exp(-planned active batch); "
            "sim: busy / whole run",
        ),
    ]
    pred_met = preds.ttfet_p95_slowdown <= (cfg.slo.ttfet_slowdown or math.inf) + 1e-9 and (
        preds.tbt_slowdown <= (cfg.slo.tbt_slowdown or math.inf) + 1e-9
    )
    return Validation(
        policy=policy,
        seeds=tuple(seeds),
        conversations=n,
        arrival_rate_per_s=rate,
        rows=tuple(rows),
        slo_violation_pct=st.slo_violation_pct,
        allowance_pct=100.0 - pct,
        violation_pct_by=by,
        steady=st,
        ramp_up=_phase(ramp, pct),
        drain=_phase(drain, pct),
        window_s=window,
        sim_wall_s=wall,
        threshold_tokens=int(opts.get("local_prefill_below_tokens", 0) or 0),  # type: ignore[call-overload]
        predicted_met=pred_met,
        tbt_slowdown_p=_q([m.tbt_slowdown for m in steady if m.tbt_slowdown is not None], pct),
    )


def _decode_busy_predicted(run: PlanRun) -> float | None:
    rows = [(1.0 - math.exp(-p.batch), p.instances) for p in run.plan.pools if p.role != "prefill"]
    n = sum(k for _, k in rows)
    return sum(v * k for v, k in rows) / n if n else None


@dataclass(slots=True)
class _Factors:
    ttfet: float = 1.0
    tbt: float = 1.0
    history: list[Round] = field(default_factory=list)


def _tighten(cfg: FleetConfig, v: Validation, f: _Factors) -> str:
    """Tighten the SLO family whose simulated violations dominate; returns its name."""
    by = v.violation_pct_by
    ttfet_share = by.get("ttfet_slowdown", 0.0) + by.get("ttfet_s", 0.0) + by.get("e2e_slowdown", 0.0)
    tbt_share = by.get("tbt_slowdown", 0.0) + by.get("tbt_ms", 0.0) + by.get("e2e_slowdown", 0.0)
    pname = f"p{cfg.slo.percentile:g}"
    if ttfet_share >= tbt_share:
        row = v.metric(f"{pname} TTFET slowdown")
        bound = cfg.slo.ttfet_slowdown
        f.ttfet *= _ratio(bound, row.simulated if row else None)
        return "TTFET"
    f.tbt *= _ratio(cfg.slo.tbt_slowdown, v.tbt_slowdown_p)
    return "TBT"


def _ratio(bound: float | None, observed: float | None) -> float:
    if not bound or not observed or observed <= 0:
        return TIGHTEN_MAX
    return min(TIGHTEN_MAX, max(TIGHTEN_MIN, TIGHTEN_MARGIN * bound / observed))


def verify(
    cfg: FleetConfig,
    run: PlanRun,
    replan: Callable[[float, float], PlanRun],
    seeds: Sequence[int] = tuple(range(DEFAULT_SEEDS)),
    progress: Progress | None = None,
    max_rounds: int = MAX_ROUNDS,
    conversations: int | None = None,
) -> tuple[PlanRun, Validation]:
    """The verification loop (module docstring). replan(ttfet_factor, tbt_factor) re-solves the ILP with the
    planning SLO scaled by those factors (raising ConServeError when infeasible)."""
    t0 = time.perf_counter()
    f = _Factors()
    v = validate_plan(cfg, run, seeds, progress, conversations)
    f.history.append(_round(f, v, run))
    best = (run, v)
    status: str | None = None
    for _ in range(max_rounds):
        if v.holds:
            break
        family = _tighten(cfg, v, f)
        try:
            nxt = replan(f.ttfet, f.tbt)
        except ConServeError as err:
            status = (
                f"fails: {v.shortfall()}, and tightening the planning {family} target to "
                f"{f.ttfet if family == 'TTFET' else f.tbt:.2f}x leaves no feasible plan: {err}"
            )
            break
        if _signature(nxt) == _signature(run):
            continue  # the tightened ILP chose the same instances: tighten further, nothing to re-simulate
        run = nxt
        v = validate_plan(cfg, run, seeds, progress, conversations)
        f.history.append(_round(f, v, run))
        if v.holds or v.slo_violation_pct < best[1].slo_violation_pct:
            best = (run, v)
    run, v = best
    if status is None:
        status = (
            "holds" if v.holds else f"fails: {v.shortfall()} after {len(f.history) - 1} tightening rounds"
        )
    return run, replace(v, rounds=tuple(f.history), loop_wall_s=time.perf_counter() - t0, status=status)


def _signature(run: PlanRun) -> tuple[object, ...]:
    pools = tuple((p.tier, p.role, p.instances, p.power_cap_w, p.tp) for p in run.plan.pools)
    return (pools, run.plan.predictions.conserve_threshold_tokens, run.plan.predictions.arrival_rate_per_s)


def _round(f: _Factors, v: Validation, run: PlanRun) -> Round:
    pname = next((r.metric for r in v.rows if r.metric.endswith("TTFET slowdown")), "")
    row = v.metric(pname)
    return Round(
        f.ttfet,
        f.tbt,
        v.slo_violation_pct,
        row.simulated if row else None,
        v.tbt_slowdown_p,
        run.plan.predictions.watts_total,
    )


__all__: list[str] = [
    "Validation",
    "ValidationRow",
    "steady_stream",
    "validate_plan",
    "verify",
]
