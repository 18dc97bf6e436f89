"""The search over serving-mode variants and decode levels with bound-and-prune, the reference instance,
and the exact merging of identical tiers (placement.ilp docstring: "Levels", "Reductions")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from placement.errors import PlanningError
from placement.ilp.model import Solution, lp_bound, solve
from placement.ilp.options import _Static, build_options
from placement.ilp.queueing import reference_latencies, slo_targets
from placement.ilp.values import Demand, Option, Reference, Settings, Slo, TierSupply


def _levels(tbt_target_s: float, ref: Reference, settings: Settings) -> list[float]:
    """Decode step targets tau: fractions of the TBT target, plus small multiples of the standalone step (so a
    loose TBT SLO still leaves fast-decode levels, which a tight TTFET SLO may need). Equal levels (within
    1e-9 relative) are listed once."""
    base = tbt_target_s if math.isfinite(tbt_target_s) else 10.0 * ref.step_s
    levels = {base * f for f in settings.decode_levels if f > 0}
    levels |= {ref.step_s * m for m in settings.step_multiples if ref.step_s * m < base}
    out: list[float] = []
    for tau in sorted(levels, reverse=True):
        if not out or tau < out[-1] * (1 - 1e-9):
            out.append(tau)
    return out


@dataclass(frozen=True, slots=True)
class _Search:
    """The outcome of the level search: the best level's options and solution, and the search's effort."""

    options: list[Option]
    solution: Solution
    tau_s: float
    levels: int  # (mode variant, decode level) candidates considered
    ilps: int  # ILPs solved (the others were pruned by their LP bound)
    settings: Settings = field(default_factory=Settings)  # the winning variant (mode, hybrid threshold)
    tiers: tuple[TierSupply, ...] = ()


def colocated_roles(t: TierSupply) -> tuple[str, ...]:
    """A tier runs colocated instances when its roles allow them (the fleet file's `roles`)."""
    return ("colocated",) if "colocated" in t.roles else ()


def variants(
    tiers: Sequence[TierSupply], demand: Demand, settings: Settings
) -> list[tuple[Settings, list[TierSupply]]]:
    """The serving-mode variants the planner chooses among (docstring "Serving modes"): (settings with mode
    and hybrid threshold, tiers with the roles of that mode). A settings with its mode already set is one
    variant."""
    if settings.mode:
        return [(settings, list(tiers))]
    out: list[tuple[Settings, list[TierSupply]]] = []
    pd = [replace(t, roles=tuple(r for r in t.roles if r in ("prefill", "decode"))) for t in tiers]
    any_pd = any("prefill" in t.roles for t in pd) and any("decode" in t.roles for t in pd)
    for mode in settings.modes:
        if mode == "colocated":
            colo = [replace(t, roles=colocated_roles(t)) for t in tiers]
            if any(t.roles for t in colo):  # no tier allows colocated instances: nothing to solve
                out.append((replace(settings, mode=mode), colo))
        elif mode not in ("disaggregated", "hybrid"):
            raise PlanningError(
                f"unknown serving mode {mode!r}. To fix: use disaggregated, hybrid or colocated."
            )
        elif not any_pd:  # no tier can prefill or none can decode: no pools to size
            continue
        elif mode == "disaggregated":
            out.append((replace(settings, mode=mode), pd))
        elif mode == "hybrid":
            sample = np.asarray(demand.turn1_input_tokens, dtype=float)
            ths = sorted({int(np.quantile(sample, q)) // 16 * 16 for q in settings.hybrid_quantiles} - {0})
            out += [(replace(settings, mode=mode, local_prefill_below_tokens=th), pd) for th in ths]
    return out


def _best(
    tiers: Sequence[TierSupply],
    demand: Demand,
    slo: Slo,
    ref: Reference,
    settings: Settings,
    extra_gpus: dict[str, int] | None = None,
) -> _Search | None:
    """Best proven optimum over the serving-mode variants x decode levels (= one ILP with a binary choice of
    mode, hybrid threshold and level).

    Bound-and-prune: every (variant, level)'s LP relaxation is a lower bound on its ILP; they are solved in
    order of their bound and the search stops once the next bound cannot beat the incumbent (ties go to the
    earlier variant -- disaggregated, then hybrid, then colocated -- and the larger tau). Exact: a pruned
    candidate's ILP cannot be better.
    """
    _, tbt_target = slo_targets(slo, ref)
    levels = _levels(tbt_target, ref, settings)
    cands: list[tuple[float, int, float, list[Option], Settings, list[TierSupply]]] = []
    vlist = variants(tiers, demand, settings)
    for vi, (vs, vt) in enumerate(vlist):
        cache: dict[tuple[int, int], _Static] = {}
        for li, tau in enumerate(levels):
            opts = build_options(vt, demand, slo, ref, tau, vs, cache)
            bound = lp_bound(opts, vt, demand, vs, extra_gpus)
            if math.isfinite(bound):
                cands.append((bound, vi * len(levels) + li, tau, opts, vs, vt))
    cands.sort(key=lambda c: (c[0], c[1]))
    best: tuple[list[Option], Solution, float, int, Settings, list[TierSupply]] | None = None
    ilps = 0
    for bound, rank, tau, opts, vs, vt in cands:
        if best is not None:
            tol = 1e-9 * max(1.0, abs(best[1].objective_value))
            # a candidate can only win with a strictly lower objective, or an equal one at a lower rank
            if bound > best[1].objective_value + tol or (
                bound >= best[1].objective_value - tol and rank > best[3]
            ):
                continue
        sol = solve(opts, vt, demand, vs, extra_gpus)
        ilps += 1
        if sol.status != "optimal":
            continue
        if best is None:
            best = (opts, sol, tau, rank, vs, vt)
            continue
        tol = 1e-9 * max(1.0, abs(sol.objective_value))
        if sol.objective_value < best[1].objective_value - tol or (
            sol.objective_value <= best[1].objective_value + tol and rank < best[3]
        ):
            best = (opts, sol, tau, rank, vs, vt)
    if best is None:
        return None
    return _Search(best[0], best[1], best[2], len(levels) * len(vlist), ilps, best[4], tuple(best[5]))


def reference_for(tiers: Sequence[TierSupply], demand: Demand, reference_tier: str | None) -> Reference:
    tier = next((t for t in tiers if t.name == reference_tier), None) if reference_tier else tiers[0]
    if tier is None or not tier.models:
        raise PlanningError(f"reference tier {reference_tier!r} has no instance shapes. To fix: check tiers.")
    # the reference is one instance at its highest allowed cap and smallest TP that holds the model with room
    # for KV (a 70B model has none at TP 1 on an 80-141 GB GPU); orchestrator.sim.fleet.reference_tier_model
    # picks the same instance for the simulator's standalone runs
    fits = [x for x in tier.models if x.kv_capacity_tokens > 0] or list(tier.models)
    m = sorted(fits, key=lambda x: (x.tp, -x.cap_w))[0]
    return reference_latencies(m, demand, tier.name)


def merge_identical_tiers(
    tiers: Sequence[TierSupply],
) -> tuple[list[TierSupply], dict[str, list[TierSupply]]]:
    """Merge tiers that differ only by name (same instance shapes, roles, link and price) into one.

    Identical tiers make the ILP symmetric (swapping their instances changes nothing), which the solver must
    still prove. Merging is exact when any merged solution can be split back: the TP sizes form a
    divisibility chain (1, 2, 4, 8) and every tier's GPU count is a multiple of the largest, so placing
    instances largest first fills the tiers without leftover fragments (:func:`split_merged`). Tiers that do
    not meet this stay separate. Returns (tiers to solve, merged name -> the original tiers).
    """
    groups: dict[tuple[object, ...], list[TierSupply]] = {}
    order: list[tuple[object, ...]] = []
    for t in tiers:
        tps = sorted({m.tp for m in t.models})
        chain = all(b % a == 0 for a, b in zip(tps, tps[1:], strict=False))
        ok = bool(tps) and chain and t.gpus % tps[-1] == 0
        key: tuple[object, ...] = (t.models, t.roles, t.link, t.cost_per_gpu_hour) if ok else ("solo", t.name)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(t)
    out: list[TierSupply] = []
    members: dict[str, list[TierSupply]] = {}
    for key in order:
        g = groups[key]
        merged = g[0] if len(g) == 1 else replace(g[0], gpus=sum(t.gpus for t in g))
        out.append(merged)
        members[merged.name] = g
    return out, members


def split_merged(
    options: Sequence[Option], sol: Solution, members: dict[str, list[TierSupply]]
) -> tuple[list[Option], Solution]:
    """Expand a solution over merged tiers to the original tiers (largest instances first, loads pro rata)."""
    out_opts: list[Option] = []
    counts: list[int] = []
    loads: list[float] = []
    free = {t.name: t.gpus for g in members.values() for t in g}
    order = sorted(range(len(options)), key=lambda i: -options[i].gpus)
    placed: dict[tuple[int, str], int] = {}
    for i in order:
        o, k = options[i], sol.counts[i]
        for t in members.get(o.tier, []):
            take = min(k, free[t.name] // o.gpus)
            if take > 0:
                placed[(i, t.name)] = take
                free[t.name] -= take * o.gpus
                k -= take
        if k > 0:
            raise PlanningError(f"internal: cannot split {sol.counts[i]} x {o.key} over merged tiers")
    for i, o in enumerate(options):
        for t in members.get(o.tier, []):
            k = placed.get((i, t.name), 0)
            out_opts.append(o if t.name == o.tier else replace(o, tier=t.name))
            counts.append(k)
            loads.append(sol.loads[i] * k / sol.counts[i] if sol.counts[i] else 0.0)
    return out_opts, replace(sol, counts=tuple(counts), loads=tuple(loads))
