"""The ILP itself: solver choice and configuration, objective coefficients, dominated options, the model,
its LP bound and its solve (placement.ilp docstring: "Constraints", "Objective", "Reductions",
"Solver status")."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import pulp

from placement.errors import PlanningError
from placement.ilp.options import hybrid_split
from placement.ilp.values import Demand, Objective, Option, Settings, TierSupply

TIE_BREAK_W = 1e-3  # W per allocated GPU added to the energy objective (see objective_coefficients)
# Relative optimality gap at which a solve counts as proven optimal: |incumbent - bound| <= 1e-6 |incumbent|
# (0.1 W on a 100 kW fleet). Passed to both solvers (HiGHS's own default would be 1e-4, CBC's 0).
MIP_REL_GAP = 1e-6


@functools.lru_cache(maxsize=1)
def _highs_available() -> bool:
    return bool(pulp.HiGHS().available())


@dataclass(frozen=True, slots=True)
class Solution:
    status: str  # "optimal" or "infeasible"
    objective_value: float
    counts: tuple[int, ...]  # n_j, aligned with options
    loads: tuple[float, ...]  # l_j
    solver: str


# "auto" (benchmarks/bench_solver.py; BENCHMARKS.md, "Solver choice"; 2-core EPYC VM, load average 4.5-6):
# - LP relaxations (level bounds, rate searches) on HiGHS, in-process: CBC runs a subprocess per solve;
# - MIPs on CBC, except small problems (fewer than AUTO_HIGHS_MAX_GPUS GPUs and at most AUTO_HIGHS_MAX_SHAPES
#   instance shapes), where HiGHS in-process saves CBC's ~35 ms subprocess (2 tiers = 16 shapes x 100 /
#   1,000 GPUs: MIPs 0.04-0.05 s vs 0.07-0.09 s). In every larger cell CBC proved the optimum faster:
#   10 tiers x 100 GPUs 1.2 s vs HiGHS 2.4 s, 5 x 5,000 0.08 s vs 2.9 s, 10 x 10,000 0.3 s vs 3.2 s.
AUTO_HIGHS_MAX_GPUS = 2_000
AUTO_HIGHS_MAX_SHAPES = 16


def instance_shapes(tiers: Sequence[TierSupply]) -> int:
    """Instance shapes the ILP chooses among: tier x (power cap, TP) x role (the solver's problem size)."""
    return sum(len(t.models) * len(t.roles) for t in tiers)


def resolve_solver(settings: Settings, tiers: Sequence[TierSupply]) -> Settings:
    """settings with solver "auto" replaced by "auto:<MIP solver>", the measured faster one for this size.

    With "auto:<name>" LPs go to HiGHS (if installed) and MIPs to <name>; without highspy everything is CBC.
    """
    name = settings.solver.lower()
    if name != "auto":
        return settings
    if not _highs_available():
        return replace(settings, solver="cbc")
    small = (
        sum(t.gpus for t in tiers) < AUTO_HIGHS_MAX_GPUS and instance_shapes(tiers) <= AUTO_HIGHS_MAX_SHAPES
    )
    return replace(settings, solver="auto:highs" if small else "auto:cbc")


@contextlib.contextmanager
def _c_stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr while C code runs, so nothing it prints reaches stdout.

    HiGHS (highspy 1.16) prints its banner ("Running HiGHS 1.16.0 ...") from C++ on the process's stdout when
    its first model is constructed, before any option (output_flag, pulp's msg=False) can be set; stdout
    carries `plan --json`. Python's own buffers are flushed first and C's stdio buffers before the swap back.
    Without a usable fd 1 or 2 (closed, or a test harness's replacement) it does nothing."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        os.dup2(2, 1)
    except OSError:
        os.close(saved)
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).fflush(None)  # C stdio may hold the banner in its buffer
        os.dup2(saved, 1)
        os.close(saved)


if hasattr(pulp, "HiGHS"):

    class _QuietHiGHS(pulp.HiGHS):  # type: ignore[misc,name-defined]
        """pulp's in-process HiGHS with its model constructed while stdout points at stderr (banner)."""

        def createAndConfigureSolver(self, lp: pulp.LpProblem) -> None:  # noqa: N802 (pulp's name)
            with _c_stdout_to_stderr():
                super().createAndConfigureSolver(lp)


def _solver(settings: Settings, mip: bool = True) -> pulp.LpSolver:
    """The configured solver. Both prove optimality to MIP_REL_GAP (relative gap between the incumbent and
    the best bound); HiGHS's own default is 1e-4, CBC's 0 -- one explicit figure for both."""
    name = settings.solver.lower()
    if name == "auto" or name.startswith("auto:"):  # resolve_solver; unresolved: HiGHS if installed
        mip_name = name.partition(":")[2] or ("highs" if _highs_available() else "cbc")
        name = mip_name if mip or not _highs_available() else "highs"
    kw: dict[str, float] = {"gapRel": MIP_REL_GAP}
    if settings.time_limit_s is not None:
        kw["timeLimit"] = settings.time_limit_s
    if name == "highs":
        if not _highs_available():
            raise PlanningError(
                "solver 'highs' is not available (pip install highspy). To fix: --solver cbc."
            )
        return _QuietHiGHS(msg=False, mip=mip, **kw)
    if name == "cbc":
        return pulp.PULP_CBC_CMD(msg=False, mip=mip, **kw)
    raise PlanningError(f"unknown solver {settings.solver!r}. To fix: use 'highs', 'cbc' or 'auto'.")


def objective_coefficients(opt: Option, tier: TierSupply, settings: Settings) -> tuple[float, float]:
    """(coefficient of n_j, coefficient of l_j) in the objective."""
    if settings.objective == Objective.GPUS:
        return float(opt.gpus), 0.0
    if settings.objective == Objective.COST:
        if tier.cost_per_gpu_hour is None:
            raise PlanningError(
                f"objective 'cost' needs tiers.{tier.name}.cost_per_gpu_hour. To fix: set it for every tier."
            )
        return opt.gpus * tier.cost_per_gpu_hour, 0.0
    idle_credit = tier.idle_w_per_gpu * opt.gpus if settings.unallocated == "idle" else 0.0
    # + TIE_BREAK_W per GPU: between plans of equal power, allocate fewer GPUs (an allocated prefill instance
    # that gets no load draws exactly what an unallocated idle GPU draws)
    return opt.fixed_w - idle_credit + TIE_BREAK_W * opt.gpus, opt.joules_per_conversation


def objective_constant(tiers: Sequence[TierSupply], settings: Settings) -> float:
    if settings.objective == Objective.ENERGY and settings.unallocated == "idle":
        return sum(t.gpus * t.idle_w_per_gpu for t in tiers)
    return 0.0


def dominated(
    options: Sequence[Option], tiers: Sequence[TierSupply], demand: Demand, settings: Settings
) -> frozenset[int]:
    """Indices of usable options that another usable option dominates (dropped before the ILP is built).

    k dominates j when both are the same tier, role and GPUs per instance, and k is no worse on every
    coefficient: capacity per instance (min over families) >= j's, objective per instance <= j's, objective
    per conversation <= j's. Swapping every j instance for a k instance keeps the loads feasible and the
    objective no higher, so dropping j never loses the optimum. Among equal options the first is kept.
    """
    by_tier = {t.name: t for t in tiers}
    groups: dict[tuple[str, str, int], list[tuple[int, float, float, float]]] = {}
    for i, o in enumerate(options):
        if not o.usable:
            continue
        cn, cl = objective_coefficients(o, by_tier[o.tier], settings)
        cap = o.capacity_per_instance(demand, settings)
        groups.setdefault((o.tier, o.role, o.gpus), []).append((i, cap, cn, cl))
    out: set[int] = set()
    for rows in groups.values():
        for i, cap_i, cn_i, cl_i in rows:
            for k, cap_k, cn_k, cl_k in rows:
                if k == i or k in out:
                    continue
                if cap_k >= cap_i and cn_k <= cn_i and cl_k <= cl_i:
                    strictly = cap_k > cap_i or cn_k < cn_i or cl_k < cl_i
                    if strictly or k < i:
                        out.add(i)
                        break
    return frozenset(out)


@dataclass(slots=True)
class _Model:
    prob: pulp.LpProblem
    idx: list[int]
    n: dict[int, pulp.LpVariable]
    lv: dict[int, pulp.LpVariable]


def _build(
    options: Sequence[Option],
    tiers: Sequence[TierSupply],
    demand: Demand,
    settings: Settings,
    extra_gpus: dict[str, int] | None = None,
    relax: bool = False,
) -> _Model | None:
    """The ILP of the module docstring over the usable, undominated options (None: a side has no option).

    One capacity row per option, l_j <= min_f cap_f n_j: the same feasible set as the per-family rows
    (3)-(7), which only the elastic diagnosis needs separately. relax: n_j continuous (the LP bound).
    """
    lam = demand.arrival_rate_per_s
    by_tier = {t.name: t for t in tiers}
    drop = dominated(options, tiers, demand, settings)
    idx = [i for i, o in enumerate(options) if o.usable and i not in drop]
    if not any(options[i].does_prefill for i in idx) or not any(options[i].does_decode for i in idx):
        return None
    cat = pulp.LpContinuous if relax else pulp.LpInteger
    prob = pulp.LpProblem("conserve_plan", pulp.LpMinimize)
    n = {i: pulp.LpVariable(f"n_{i}", lowBound=0, cat=cat) for i in idx}
    lv = {i: pulp.LpVariable(f"l_{i}", lowBound=0) for i in idx}
    coefs = [objective_coefficients(options[i], by_tier[options[i].tier], settings) for i in idx]
    obj = pulp.lpSum([cn * n[i] for i, (cn, _) in zip(idx, coefs, strict=True)])
    obj += pulp.lpSum([cl * lv[i] for i, (_, cl) in zip(idx, coefs, strict=True) if cl])
    prob += obj + objective_constant(tiers, settings)
    for t in tiers:
        gpus = t.gpus + (extra_gpus or {}).get(t.name, 0)
        terms = [options[i].gpus * n[i] for i in idx if options[i].tier == t.name]
        if terms:
            prob += pulp.lpSum(terms) <= gpus, f"gpus:{t.name}"
    lam_p = lam * (1.0 - hybrid_split(demand, settings.local_prefill_below_tokens).local_share)
    prob += pulp.lpSum([lv[i] for i in idx if options[i].does_prefill]) == lam_p, "cover:prefill"
    prob += pulp.lpSum([lv[i] for i in idx if options[i].does_decode]) == lam, "cover:decode"
    for i in idx:
        cap = options[i].capacity_per_instance(demand, settings)
        if math.isfinite(cap):
            prob += lv[i] <= cap * n[i], f"cap:{i}"
    return _Model(prob, idx, n, lv)


def _status_ok(prob: pulp.LpProblem) -> bool:
    return bool(prob.status == pulp.LpStatusOptimal and prob.sol_status == pulp.LpSolutionOptimal)


def lp_bound(
    options: Sequence[Option],
    tiers: Sequence[TierSupply],
    demand: Demand,
    settings: Settings,
    extra_gpus: dict[str, int] | None = None,
) -> float:
    """Objective of the LP relaxation (n_j continuous): a lower bound on :func:`solve`'s (inf: infeasible)."""
    mdl = _build(options, tiers, demand, settings, extra_gpus, relax=True)
    if mdl is None:
        return math.inf
    mdl.prob.solve(_solver(settings, mip=False))
    if not _status_ok(mdl.prob):
        return math.inf
    return float(pulp.value(mdl.prob.objective))


def solve(
    options: Sequence[Option],
    tiers: Sequence[TierSupply],
    demand: Demand,
    settings: Settings,
    extra_gpus: dict[str, int] | None = None,
) -> Solution:
    """Solve the ILP of the module docstring over the usable options. Raises PlanningError on solver

    failure.
    """
    empty = (tuple(0 for _ in options), tuple(0.0 for _ in options))
    mdl = _build(options, tiers, demand, settings, extra_gpus)
    if mdl is None:
        return Solution("infeasible", math.inf, *empty, "")
    prob, n, lv = mdl.prob, mdl.n, mdl.lv
    solver = _solver(settings)
    prob.solve(solver)
    status = pulp.LpStatus[prob.status]
    sol_status = pulp.LpSolution.get(prob.sol_status, str(prob.sol_status))
    if prob.status == pulp.LpStatusInfeasible or prob.sol_status == pulp.LpSolutionInfeasible:
        return Solution("infeasible", math.inf, *empty, solver.name)
    if not _status_ok(prob):
        raise PlanningError(
            f"the solver stopped without a proven optimum (status {status!r}, solution {sol_status!r}). "
            "To fix: raise --time-limit or try --solver highs."
        )
    counts = tuple(int(round(n[i].value() or 0.0)) if i in n else 0 for i in range(len(options)))
    loads = tuple(max(0.0, float(lv[i].value() or 0.0)) if i in lv else 0.0 for i in range(len(options)))
    value = float(pulp.value(prob.objective))
    return Solution("optimal", value, counts, loads, solver.name)
