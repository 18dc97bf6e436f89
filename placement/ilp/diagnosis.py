"""Infeasibility diagnosis (placement.ilp docstring: "Infeasibility diagnosis"): elastic shortfalls per
family, the fewest extra GPUs, the smallest SLO scaling, the sustainable rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pulp

from placement.ilp.capacity import max_rate_per_s
from placement.ilp.model import _solver, resolve_solver
from placement.ilp.options import build_options
from placement.ilp.queueing import slo_targets
from placement.ilp.search import _best, _levels
from placement.ilp.values import FAMILY_TEXT, Demand, Family, Option, Reference, Settings, Slo, TierSupply


@dataclass(frozen=True, slots=True)
class Diagnosis:
    shortfalls: tuple[tuple[Family, float], ...]  # family, conversations/s that do not fit (elastic ILP)
    add_gpus: tuple[str, int] | None  # fewest extra GPUs of one tier that make the fleet feasible
    slo_factor: float | None  # smallest SLO scaling that makes it feasible (None: not even at 100x)
    unusable: tuple[str, ...]  # options excluded before solving, with reasons
    message: str
    max_rate_per_s: float = 0.0


def elastic_shortfalls(
    options: Sequence[Option], tiers: Sequence[TierSupply], demand: Demand, settings: Settings
) -> tuple[tuple[Family, float], ...]:
    """Minimise the load (conv/s) that violates each family, all options allowed, GPUs hard."""
    lam = demand.arrival_rate_per_s
    prob = pulp.LpProblem("conserve_elastic", pulp.LpMinimize)
    idx = list(range(len(options)))
    n = {i: pulp.LpVariable(f"n_{i}", lowBound=0, cat="Integer") for i in idx}
    lv = {i: pulp.LpVariable(f"l_{i}", lowBound=0) for i in idx}
    slack: dict[Family, list[pulp.LpVariable]] = {}
    cover_short = {
        "prefill": pulp.LpVariable("short_prefill", lowBound=0),
        "decode": pulp.LpVariable("short_decode", lowBound=0),
    }
    terms = []
    for i in idx:
        o = options[i]
        caps = o.caps_per_instance(demand, settings)
        for fam, cap in caps.items():
            if not math.isfinite(cap):
                continue
            s = pulp.LpVariable(f"s_{fam.value}_{i}", lowBound=0)
            slack.setdefault(fam, []).append(s)
            prob += lv[i] <= cap * n[i] + s
            terms.append(s)
    prob += pulp.lpSum(terms) + 10.0 * pulp.lpSum(cover_short.values())
    for t in tiers:
        prob += pulp.lpSum(options[i].gpus * n[i] for i in idx if options[i].tier == t.name) <= t.gpus
    prob += pulp.lpSum(lv[i] for i in idx if options[i].does_prefill) + cover_short["prefill"] == lam
    prob += pulp.lpSum(lv[i] for i in idx if options[i].does_decode) + cover_short["decode"] == lam
    prob.solve(_solver(settings))
    if prob.status != pulp.LpStatusOptimal:
        return ()
    out: dict[Family, float] = {}
    for fam, ss in slack.items():
        v = sum(float(s.value() or 0.0) for s in ss)
        if v > 1e-6 * max(lam, 1e-9):
            out[fam] = v
    return tuple(sorted(out.items(), key=lambda kv: -kv[1]))


def diagnose(
    tiers: Sequence[TierSupply], demand: Demand, slo: Slo, settings: Settings, ref: Reference
) -> Diagnosis:
    """Explain an infeasible fleet (see the module docstring, 'Infeasibility diagnosis')."""
    settings = resolve_solver(settings, tiers)
    _, tbt_target = slo_targets(slo, ref)
    levels = _levels(tbt_target, ref, settings)
    # (a) elastic ILP at the level whose shortfall is smallest
    shortfalls: tuple[tuple[Family, float], ...] = ()
    best_short = math.inf
    unusable: tuple[str, ...] = ()
    for tau in levels:
        opts = build_options(tiers, demand, slo, ref, tau, settings)
        sf = elastic_shortfalls(opts, tiers, demand, settings)
        total = sum(v for _, v in sf)
        if total < best_short:
            best_short, shortfalls = total, sf
            unusable = tuple(f"{o.key}: {o.reason}" for o in opts if not o.usable)
    # (b) fewest extra GPUs (of one tier) that make it feasible
    add: tuple[str, int] | None = None
    for t in tiers:
        if not t.models:
            continue
        hi = max(1, t.gpus)
        found = None
        while hi <= max(64, 64 * t.gpus):
            if _best(tiers, demand, slo, ref, settings, {t.name: hi}) is not None:
                found = hi
                break
            hi *= 2
        if found is None:
            continue
        lo = found // 2
        while lo + 1 < found:
            mid = (lo + found) // 2
            if _best(tiers, demand, slo, ref, settings, {t.name: mid}) is not None:
                found = mid
            else:
                lo = mid
        if add is None or found < add[1]:
            add = (t.name, found)
    # (c) SLO scaling
    factor: float | None = None
    if _best(tiers, demand, slo.scaled(100.0), ref, settings) is not None:
        lo_f: float = 1.0
        hi_f: float = 100.0
        for _ in range(12):
            mid_f = math.sqrt(lo_f * hi_f)
            if _best(tiers, demand, slo.scaled(mid_f), ref, settings) is not None:
                hi_f = mid_f
            else:
                lo_f = mid_f
        factor = hi_f
    lam = demand.arrival_rate_per_s
    parts = ["the fleet cannot serve the workload within the SLOs"]
    if shortfalls:
        parts.append(
            "binding: "
            + "; ".join(
                f"{FAMILY_TEXT[f]} short by {v:.3g} conv/s ({100 * v / lam:.0f}% of {lam:g})"
                for f, v in shortfalls
            )
        )
    fixes = []
    if add is not None:
        gpu_name = next(t.models[0].gpu.name for t in tiers if t.name == add[0])
        fixes.append(f"add {add[1]} {gpu_name} to tier {add[0]!r}")
    if factor is not None:
        bits = []
        if slo.ttfet_slowdown is not None:
            bits.append(f"TTFET p{slo.percentile:g} slowdown to {slo.ttfet_slowdown * factor:.3g}x")
        if slo.ttfet_s is not None:
            bits.append(f"ttfet_s to {slo.ttfet_s * factor:.3g} s")
        if slo.tbt_slowdown is not None:
            bits.append(f"TBT slowdown to {slo.tbt_slowdown * factor:.3g}x")
        if slo.tbt_ms is not None:
            bits.append(f"tbt_ms to {slo.tbt_ms * factor:.3g} ms")
        fixes.append("relax " + " and ".join(bits))
    sustainable = max_rate_per_s(tiers, demand, slo, settings, ref)
    if sustainable > 0:
        fixes.append(
            f"lower workload.arrival_rate_per_s to <= {sustainable:.4g} conv/s, the most this fleet sustains "
            "(modelled; `orchestrator plan --max-rate` plans for it)"
        )
    if not fixes:
        fixes.append("add a tier that can hold the conversations")
    message = ". ".join(parts) + ". To fix: " + ", or ".join(fixes) + "."
    if unusable and not shortfalls:
        message += " Unusable instance shapes: " + "; ".join(unusable[:4]) + "."
    return Diagnosis(shortfalls, add, factor, unusable, message, sustainable)
