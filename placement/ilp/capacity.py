"""Capacity: the highest arrival rate a fleet or a fixed set of instances sustains within the SLOs, and
the fluid model of a finite burst above it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pulp

from placement.ilp.model import _solver, _status_ok, resolve_solver
from placement.ilp.options import _Static, build_options, hybrid_split
from placement.ilp.queueing import slo_targets
from placement.ilp.search import _levels, variants
from placement.ilp.values import Demand, Option, Reference, Settings, Slo, TierSupply


def _max_rate_model(
    opts: Sequence[Option],
    tiers: Sequence[TierSupply],
    demand: Demand,
    settings: Settings,
    relax: bool,
    prefill_instances: int | None = None,
    fixed_counts: Sequence[int] | None = None,
) -> tuple[pulp.LpProblem, pulp.LpVariable] | None:
    """max lam s.t. (1)-(7) with lam a variable. Per (tier, role, GPUs) only the highest-capacity option is
    kept (for the rate, capacity is all that matters). prefill_instances: fix the number of prefill-role
    instances; fixed_counts: fix every n_j (then it is an LP over the loads)."""
    best_of: dict[tuple[str, str, int], tuple[float, int]] = {}
    for i, o in enumerate(opts):
        if not o.usable or (fixed_counts is not None and fixed_counts[i] <= 0):
            continue
        cap = o.capacity_per_instance(demand, settings)
        key = (o.tier, o.role, o.gpus) if fixed_counts is None else (o.tier, o.role, -1 - i)
        if key not in best_of or cap > best_of[key][0]:
            best_of[key] = (cap, i)
    idx = sorted(i for _, i in best_of.values())
    if not any(opts[i].does_prefill for i in idx) or not any(opts[i].does_decode for i in idx):
        return None
    cat = pulp.LpContinuous if relax or fixed_counts is not None else pulp.LpInteger
    prob = pulp.LpProblem("conserve_max_rate", pulp.LpMaximize)
    lam = pulp.LpVariable("lam", lowBound=0)
    n = {i: pulp.LpVariable(f"n_{i}", lowBound=0, cat=cat) for i in idx}
    lv = {i: pulp.LpVariable(f"l_{i}", lowBound=0) for i in idx}
    prob += lam
    for t in tiers:
        terms = [opts[i].gpus * n[i] for i in idx if opts[i].tier == t.name]
        if terms:
            prob += pulp.lpSum(terms) <= t.gpus
    f = hybrid_split(demand, settings.local_prefill_below_tokens).local_share
    prob += pulp.lpSum([lv[i] for i in idx if opts[i].does_prefill]) == (1.0 - f) * lam
    prob += pulp.lpSum([lv[i] for i in idx if opts[i].does_decode]) == lam
    if prefill_instances is not None:
        prob += pulp.lpSum([n[i] for i in idx if opts[i].role == "prefill"]) == prefill_instances
    if fixed_counts is not None:
        for i in idx:
            prob += n[i] == fixed_counts[i]
    for i in idx:
        cap = opts[i].capacity_per_instance(demand, settings)
        if math.isfinite(cap):
            prob += lv[i] <= cap * n[i]
    return prob, lam


def max_rate_per_s(
    tiers: Sequence[TierSupply],
    demand: Demand,
    slo: Slo,
    settings: Settings,
    ref: Reference,
    prefill_instances: int | None = None,
) -> float:
    """Highest arrival rate (conv/s) the fleet sustains within the SLOs: max lam over n, l (ILP per level).

    The options' coefficients do not depend on lam, so lam can be a variable; returns 0 when nothing fits.
    Levels are solved in order of their LP bound and pruned once the bound cannot beat the incumbent.
    prefill_instances: the same with the number of prefill-role instances fixed (to explain a split).
    """
    settings = resolve_solver(settings, tiers)
    _, tbt_target = slo_targets(slo, ref)
    cands: list[tuple[float, list[Option], Settings, list[TierSupply]]] = []
    for vs, vt in variants(tiers, demand, settings):
        if prefill_instances is not None and vs.mode == "colocated":
            continue
        cache: dict[tuple[int, int], _Static] = {}
        for tau in _levels(tbt_target, ref, vs):
            opts = build_options(vt, demand, slo, ref, tau, vs, cache)
            built = _max_rate_model(opts, vt, demand, vs, True, prefill_instances)
            if built is None:
                continue
            prob, lam = built
            prob.solve(_solver(vs, mip=False))
            if _status_ok(prob):
                cands.append((float(lam.value() or 0.0), opts, vs, vt))
    best = 0.0
    for bound, opts, settings, tiers in sorted(cands, key=lambda c: -c[0]):
        if bound <= best * (1 + 1e-9):
            break
        built = _max_rate_model(opts, tiers, demand, settings, False, prefill_instances)
        if built is None:
            continue
        prob, lam = built
        prob.solve(_solver(settings))
        if _status_ok(prob):
            best = max(best, float(lam.value() or 0.0))
    return best


def max_rate_of_counts(
    options: Sequence[Option],
    counts: Sequence[int],
    tiers: Sequence[TierSupply],
    demand: Demand,
    settings: Settings,
) -> float:
    """Highest arrival rate (conv/s) a fixed set of instances sustains within the SLOs (an LP over loads)."""
    settings = resolve_solver(settings, tiers)
    th = max((o.local_below_tokens for o in options), default=0)
    settings = replace(settings, local_prefill_below_tokens=th, mode=settings.mode or "fixed")
    built = _max_rate_model(options, tiers, demand, settings, True, fixed_counts=counts)
    if built is None:
        return 0.0
    prob, lam = built
    prob.solve(_solver(settings, mip=False))
    return float(lam.value() or 0.0) if _status_ok(prob) else 0.0


@dataclass(frozen=True, slots=True)
class Burst:
    """A finite run of N conversations arriving at lam above the rate mu the plan sustains (fluid model).

    Arrivals at rate lam over T_a = N / lam; the fleet admits conversations at mu < lam, so an admission
    backlog builds up during the arrivals and drains after them. The k-th arrival (t = k / lam) starts at
    k / mu: it waits w_k = k (1/mu - 1/lam) beyond the steady-state (planned) waits. Hence
        backlog when arrivals stop  N (1 - mu / lam)
        drain after the last arrival  N (1/mu - 1/lam)  (= the last conversation's extra wait)
        makespan  N / mu;  extra wait: mean = drain / 2, p-th percentile = p/100 x drain.
    A steady stream at lam would have no such bound: its backlog grows without limit.
    """

    conversations: int
    requested_rate_per_s: float  # lam
    sustainable_rate_per_s: float  # the most any split of the fleet sustains within the SLOs
    plan_rate_per_s: float  # mu: the most the planned instances sustain within the SLOs
    excess_fraction: float  # lam / mu - 1
    arrival_span_s: float
    backlog_conversations: float
    drain_s: float
    makespan_s: float
    extra_wait_mean_s: float
    extra_wait_p_s: float


def burst(conversations: int, lam: float, mu: float, sustainable: float, percentile: float) -> Burst:
    """The fluid estimate of :class:`Burst` (mu > 0)."""
    n = float(conversations)
    mu_eff = min(mu, lam)
    drain = n * (1.0 / mu_eff - 1.0 / lam)
    return Burst(
        conversations=conversations,
        requested_rate_per_s=lam,
        sustainable_rate_per_s=sustainable,
        plan_rate_per_s=mu,
        excess_fraction=lam / mu - 1.0,
        arrival_span_s=n / lam,
        backlog_conversations=n * (1.0 - mu_eff / lam),
        drain_s=drain,
        makespan_s=n / mu_eff,
        extra_wait_mean_s=drain / 2.0,
        extra_wait_p_s=drain * percentile / 100.0,
    )
