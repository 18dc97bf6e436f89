"""A finite run above the steady-state capacity, planned by simulating the run itself.

The verification step of `orchestrator plan` for a workload of N conversations (workload.conversations)
whose rate exceeds every serving mode's modelled steady-state capacity. The planner's fluid model
(orchestrator.planner.burst) would plan such a run on the split with the most capacity; it assumes the
decoders' batch is in its steady state, which a run shorter than a few relaxation times never reaches (on
examples/paper-a40.yaml at 1 conv/s the 255-conversation run holds the SLO on fleets the model rates over
capacity, at ~20% more tokens/J: docs/planning.md, "Finite runs above capacity").

So every candidate plan (orchestrator.planner.finite_candidates: the fluid model's plan, and per serving
mode the least-energy plans at fractions of that mode's highest modelled rate) is simulated on the finite run
itself: the fleet file's own N conversations at the requested rate, Poisson arrivals drawn per seed exactly
as `orchestrator compare --seed S --rates R` draws them (a timed trace without a rate keeps its timestamps),
run by the policy `plan --validate` gives the plan (colocated for an all-colocated plan, else the fleet's
with the plan's local-prefill threshold). Every conversation counts (a finite run has no steady window).

The choice (:func:`choose`):
- a candidate holds when the share of its conversations that miss an SLO, pooled over the seeds, is within
  the allowance 100 - percentile (5% for p95);
- among those that hold, the plan's objective decides: energy (the default), the highest simulated tokens/J
  (mean over the seeds; energy from the tier power model, every GPU billed: modelled, not measured); gpus,
  the fewest GPUs used; cost, the lowest $/hour (modelled); then tokens/J, then fewer violations;
- if none holds, the fluid model's plan (the most modelled capacity: the shortest backlog), as without
  simulation. Measured (docs/planning.md): on examples/paper-a40.yaml at 1.634 conv/s it also has the fewest
  simulated violations on every seed 0-4; on examples/paper-a40-disagg.yaml the fewest on seeds 0-2 (40.4% vs
  its 41.8%) is no better on seeds 3-4 (34.1% vs 34.2%), so "fewest violations" would pick by noise there.

The chosen plan's steady state at its planned rate is then simulated as `plan` verifies any plan
(:func:`steady_check`: orchestrator.verify.validate_plan, reported; not tightened, since the plan was chosen
for the finite run).

Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from conserve.errors import ConServeError
from orchestrator.config import FleetConfig
from orchestrator.metrics import SloSpec, conversation_metrics, summarize
from orchestrator.planner import PlanRun
from orchestrator.planner.burst import SPLIT_NOTE
from orchestrator.planner.finite import FiniteCandidate, with_choice_note, with_mode_comparison
from orchestrator.sim.fleet import fleet_workload, reference_tier_model, simulate_fleet, unallocated_idle_w
from orchestrator.sim.standalone import StandaloneCache
from orchestrator.verify import DEFAULT_SEEDS, Round, Validation, policy_for, validate_plan
from orchestrator.workload import ConversationSpec, poisson_arrivals, trace_timed

Progress = Callable[[int, int], None]

RULE_HOLDS = "least energy that holds"
RULES_HOLD = {"energy": RULE_HOLDS, "gpus": "fewest GPUs that hold", "cost": "lowest cost that holds"}
RULE_NONE_HOLDS = "none holds: the fluid model's pick"


@dataclass(frozen=True, slots=True)
class SeedRun:
    """One simulated finite run (one seed): every conversation counted."""

    seed: int
    conversations: int
    slo_violation_pct: float
    tokens_per_j: float
    makespan_s: float
    energy_j: float
    ttfet_slowdown_p95: float  # each conversation's TTFET vs its standalone run; nan when none


@dataclass(frozen=True, slots=True)
class SimulatedCandidate:
    """A candidate plan and its simulated finite runs."""

    label: str
    mode: str
    fraction: float | None  # of the mode's modelled highest rate; None: the fluid model's plan
    planned_rate_per_s: float  # modelled
    watts_total: float  # modelled, at the planned rate
    policy: str
    runs: tuple[SeedRun, ...]
    allowance_pct: float
    gpus_used: int = 0
    cost_per_hour: float | None = None  # modelled

    @property
    def slo_violation_pct(self) -> float:
        """Pooled over the seeds."""
        n = sum(r.conversations for r in self.runs)
        return sum(r.slo_violation_pct * r.conversations for r in self.runs) / n if n else 100.0

    @property
    def tokens_per_j(self) -> float:
        """Mean over the seeds."""
        return statistics.fmean(r.tokens_per_j for r in self.runs) if self.runs else 0.0

    @property
    def holds(self) -> bool:
        return bool(self.runs) and self.slo_violation_pct <= self.allowance_pct + 1e-9

    def to_dict(self) -> dict[str, object]:
        return {
            "label": self.label,
            "mode": self.mode,
            "fluid_model_pick": self.fraction is None,
            "fraction_of_mode_max_rate": self.fraction,
            "planned_rate_per_s_modelled": round(self.planned_rate_per_s, 6),
            "watts_total_modelled": round(self.watts_total, 1),
            "gpus_used": self.gpus_used,
            "cost_per_hour_modelled": self.cost_per_hour,
            "policy": self.policy,
            "slo_violation_pct_simulated": round(self.slo_violation_pct, 2),
            "tokens_per_j_simulated": round(self.tokens_per_j, 3),
            "holds_simulated": self.holds,
            "seeds": [
                {
                    "seed": r.seed,
                    "conversations": r.conversations,
                    "slo_violation_pct": round(r.slo_violation_pct, 2),
                    "tokens_per_j": round(r.tokens_per_j, 3),
                    "makespan_s": round(r.makespan_s, 2),
                    "energy_j": round(r.energy_j, 1),
                    "ttfet_slowdown_p95": None
                    if math.isnan(r.ttfet_slowdown_p95)
                    else round(r.ttfet_slowdown_p95, 3),
                }
                for r in self.runs
            ],
        }


@dataclass(frozen=True, slots=True)
class FiniteChoice:
    """The candidates simulated on the finite run and the one chosen (index into candidates)."""

    requested_rate_per_s: float | None  # None: the trace's own timestamps
    conversations: int
    seeds: tuple[int, ...]
    allowance_pct: float
    candidates: tuple[SimulatedCandidate, ...]
    chosen: int
    rule: str
    wall_s: float

    @property
    def pick(self) -> SimulatedCandidate:
        return self.candidates[self.chosen]

    @property
    def fluid(self) -> SimulatedCandidate:
        return next((c for c in self.candidates if c.fraction is None), self.candidates[0])

    def to_dict(self) -> dict[str, object]:
        return {
            "note": "simulated finite runs (the file's conversations at the requested rate); energy and "
            "tokens/J from the tier power model (modelled, not measured); planned rates and watts modelled",
            "requested_rate_per_s": self.requested_rate_per_s,
            "conversations": self.conversations,
            "seeds": list(self.seeds),
            "slo_violation_allowance_pct": round(self.allowance_pct, 2),
            "rule": self.rule,
            "chosen": self.chosen,
            "wall_s": round(self.wall_s, 2),
            "candidates": [c.to_dict() for c in self.candidates],
        }

    def sentence(self) -> str:
        """How the plan was chosen, for the plan's notes."""
        p, f = self.pick, self.fluid
        seeds = f"seeds {self.seeds[0]}-{self.seeds[-1]}" if len(self.seeds) > 1 else f"seed {self.seeds[0]}"
        head = (
            f"{SPLIT_NOTE}simulated on {len(self.candidates)} candidate plans x {seeds} (the file's "
            f"{self.conversations} conversations at the requested rate), "
        )
        if self.rule != RULE_NONE_HOLDS:
            what = (
                "the highest simulated tokens/J"
                if self.rule == RULE_HOLDS
                else f"the {self.rule.rsplit(' that ', 1)[0]} (modelled), then the highest simulated "
                "tokens/J,"
            )
            body = (
                f"{what} among those within the SLO allowance ({self.allowance_pct:g}%): "
                f"{p.label}, {p.slo_violation_pct:.1f}% miss, {p.tokens_per_j:.2f} tokens/J"
            )
        else:
            fewest = min(self.candidates, key=lambda c: c.slo_violation_pct)
            body = (
                f"none holds the SLO allowance ({self.allowance_pct:g}%), so the fluid model's pick (the "
                f"most modelled capacity): {p.label}, {p.slo_violation_pct:.1f}% miss, {p.tokens_per_j:.2f} "
                f"tokens/J; fewest simulated violations {fewest.slo_violation_pct:.1f}% ({fewest.label})"
            )
        if p is not f:
            body += (
                f"; the fluid model's pick ({f.label}) {f.slo_violation_pct:.1f}% miss at "
                f"{f.tokens_per_j:.2f} tokens/J"
            )
        return head + body + " (simulated; energy modelled)."


def describe(run: PlanRun) -> str:
    """A short label of a plan's instances: '1 prefill@300W + 3 decode@200W, < 14,608 local'."""
    tiers = {p.tier for p in run.plan.pools}
    parts = [
        f"{p.instances} {p.role}@{p.power_cap_w:g}W" + (f" ({p.tier})" if len(tiers) > 1 else "")
        for p in run.plan.pools
        if p.instances > 0
    ]
    th = run.plan.predictions.conserve_threshold_tokens
    return " + ".join(parts) + (f", turn-1 < {th:,} tokens local" if th else "")


def finite_workload(cfg: FleetConfig, rate_per_s: float | None, seed: int) -> list[ConversationSpec]:
    """The finite run for one seed, as `compare --seed seed [--rates rate]` draws it (module docstring)."""
    convs = fleet_workload(cfg, None, seed)
    return convs if rate_per_s is None else poisson_arrivals(convs, rate_per_s, seed)


def simulate_candidate(
    cfg: FleetConfig,
    cand: FiniteCandidate,
    rate_per_s: float | None,
    seeds: Sequence[int],
    standalone: StandaloneCache,
    tick: Callable[[], None] | None = None,
) -> SimulatedCandidate:
    run = cand.run
    policy, opts = policy_for(run, cfg)
    slo = SloSpec.from_config(cfg.slo)
    runs = []
    for seed in seeds:
        convs = finite_workload(cfg, rate_per_s, seed)
        res, insts = simulate_fleet(
            cfg, run.plan, policy, None, seed=seed, conversations=convs, policy_options=opts,
            energy_window_s=None,
        )  # fmt: skip
        mets = conversation_metrics(res, convs, standalone, slo)
        s = summarize(res, mets, unallocated_idle_w=unallocated_idle_w(cfg, insts))
        runs.append(
            SeedRun(
                seed,
                s.conversations,
                s.slo_violation_pct,
                s.tokens_per_j,
                s.makespan_s,
                s.energy_j,
                float(s.ttfet_slowdown.get("p95", math.nan)),
            )
        )
        if tick is not None:
            tick()
    p = run.plan.predictions
    return SimulatedCandidate(
        label=f"{cand.mode}: {describe(run)}",
        mode=cand.mode,
        fraction=cand.fraction,
        planned_rate_per_s=p.arrival_rate_per_s,
        watts_total=p.watts_total,
        policy=policy,
        runs=tuple(runs),
        allowance_pct=100.0 - cfg.slo.percentile,
        gpus_used=p.gpus_used,
        cost_per_hour=p.cost_per_hour,
    )


def pick(cands: Sequence[SimulatedCandidate], objective: str = "energy") -> tuple[int, str]:
    """(index, rule) of the chosen candidate (module docstring)."""
    if not cands:
        raise ConServeError("internal: no finite-run candidates to choose among. To fix: report this.")
    held = [i for i, c in enumerate(cands) if c.holds]
    if not held:
        return next((i for i, c in enumerate(cands) if c.fraction is None), 0), RULE_NONE_HOLDS

    def first(c: SimulatedCandidate) -> float:
        if objective == "gpus":
            return float(c.gpus_used)
        if objective == "cost":
            return c.cost_per_hour if c.cost_per_hour is not None else math.inf
        return -c.tokens_per_j

    best = min(held, key=lambda i: (first(cands[i]), -cands[i].tokens_per_j, cands[i].slo_violation_pct, i))
    return best, RULES_HOLD.get(objective, RULE_HOLDS)


def choose(
    cfg: FleetConfig,
    cands: Sequence[FiniteCandidate],
    rate_per_s: float | None,
    seeds: Sequence[int] = tuple(range(DEFAULT_SEEDS)),
    progress: Progress | None = None,
) -> tuple[PlanRun, FiniteChoice]:
    """Simulate every candidate's finite run and return the chosen plan (with the choice in its notes and
    the per-mode comparison at its planned rate) and the record of the choice."""
    if not seeds:
        raise ConServeError("--seeds must be >= 1. To fix: pass --seeds 3.")
    t0 = time.perf_counter()
    standalone = StandaloneCache(reference_tier_model(cfg))
    total, done = len(cands) * len(seeds), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    sims = tuple(simulate_candidate(cfg, c, rate_per_s, seeds, standalone, tick) for c in cands)
    i, rule = pick(sims, cands[0].run.plan.objective if cands else "energy")
    n = sims[0].runs[0].conversations if sims and sims[0].runs else 0
    w = cfg.workload
    # the rate the run's arrivals were drawn at; None: a timed trace's own timestamps (compare's rule)
    lam = rate_per_s if rate_per_s is not None else (None if trace_timed(w) else w.arrival_rate_per_s)
    choice = FiniteChoice(
        lam, n, tuple(seeds), 100.0 - cfg.slo.percentile, sims, i, rule, time.perf_counter() - t0
    )
    run = with_mode_comparison(cfg, with_choice_note(cands[i].run, choice.sentence()))
    return run, replace(choice, wall_s=time.perf_counter() - t0)


def steady_check(
    cfg: FleetConfig, run: PlanRun, seeds: Sequence[int], progress: Progress | None = None
) -> Validation:
    """The chosen plan's steady state at its planned rate (orchestrator.verify.validate_plan), with a status;
    no tightening rounds: the plan was chosen by simulating the finite run."""
    v = validate_plan(cfg, run, seeds, progress)
    row = next((r for r in v.rows if r.metric.endswith("TTFET slowdown")), None)
    first = Round(
        1.0,
        1.0,
        v.slo_violation_pct,
        row.simulated if row else None,
        v.tbt_slowdown_p,
        run.plan.predictions.watts_total,
    )
    status = (
        "holds"
        if v.holds
        else f"fails: {v.shortfall()} (steady state at the planned rate; not tightened: the plan was chosen "
        "by simulating the finite run)"
    )
    return replace(v, rounds=(first,), loop_wall_s=v.sim_wall_s, status=status)


__all__ = [
    "RULES_HOLD",
    "RULE_HOLDS",
    "RULE_NONE_HOLDS",
    "FiniteChoice",
    "SimulatedCandidate",
    "choose",
    "describe",
    "finite_workload",
    "pick",
    "simulate_candidate",
    "steady_check",
]
