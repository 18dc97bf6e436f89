"""ILP solve time per solver and problem size, and whether each solve was proven optimal.

For each fleet (tiers x GPUs, built as in benchmarks/bench_plan.py: tiers cycle through catalog GPUs, 2 caps x
TP {1, 2} x roles {prefill, decode}, Llama-3.1-8B, synthetic agentic workload at half the fleet's sustainable
rate) and each solver, runs placement.ilp.plan --repeats times and records:
  - solve_s: the time inside placement.ilp.solve (the MIP solves of the plan, model building included), summed
    over the ILPs the plan solved -- what the solver choice changes;
  - plan_s: the whole plan (LP bounds, ILPs, predictions) -- what `orchestrator plan` waits for;
  - proven: every MIP solve ended with pulp status Optimal AND pulp.LpSolution[prob.sol_status] "Optimal
    Solution Found" at placement.ilp.MIP_REL_GAP (CBC's LpStatus alone says Optimal after a time-out with
    an unproven incumbent; placement.ilp.solve raises then, and this script records "NOT PROVEN" and why).
Medians of --repeats runs; `auto` is run too and its pick reported, to check the rule in
placement.ilp.resolve_solver against the measurements. Run (under the heavy lock on the shared VM):
    flock /tmp/conserve-heavy.lock python benchmarks/bench_solver.py [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator.config import SyntheticWorkload
from orchestrator.planner import demand_from_stats
from orchestrator.workload import synthetic_conversations, workload_stats
from placement import ilp
from placement.errors import PlanningError

_spec = importlib.util.spec_from_file_location("bench_plan", Path(__file__).with_name("bench_plan.py"))
assert _spec is not None and _spec.loader is not None
bench_plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_plan)


class _Timed:
    """Wraps placement.ilp.solve: accumulates its wall time and the statuses of its solves."""

    def __init__(self) -> None:
        self.orig = ilp.solve
        self.seconds = 0.0
        self.statuses: list[str] = []

    def __call__(self, *args: Any, **kwargs: Any) -> ilp.Solution:
        t0 = time.perf_counter()
        try:
            sol = self.orig(*args, **kwargs)
        except PlanningError as err:
            self.seconds += time.perf_counter() - t0
            self.statuses.append(f"NOT PROVEN ({err})")
            raise
        self.seconds += time.perf_counter() - t0
        self.statuses.append("proven optimal" if sol.status == "optimal" else sol.status)
        return sol


def measure(tiers: list[ilp.TierSupply], demand: ilp.Demand, solver: str, repeats: int, limit: float) -> dict:
    settings = ilp.Settings(solver=solver, time_limit_s=limit)
    picked = ilp.resolve_solver(settings, tiers).solver
    solve_s, plan_s, statuses, objective, ilps = [], [], set(), None, 0
    for _ in range(repeats):
        timed = _Timed()
        ilp.search.solve = timed  # type: ignore[assignment]  # where the level search looks it up
        t0 = time.perf_counter()
        try:
            r = ilp.plan(tiers, demand, ilp.Slo(), settings)
            objective, ilps = r.solution.objective_value, r.ilps_solved
        except PlanningError:
            pass
        finally:
            ilp.search.solve = timed.orig  # type: ignore[assignment]
        plan_s.append(time.perf_counter() - t0)
        solve_s.append(timed.seconds)
        statuses.update(timed.statuses)
    proven = statuses == {"proven optimal"}
    return {
        "solver": solver,
        "picked": picked,
        "solve_median_s": round(statistics.median(solve_s), 4),
        "solve_max_s": round(max(solve_s), 4),
        "plan_median_s": round(statistics.median(plan_s), 4),
        "proven_optimal": proven,
        "statuses": sorted(statuses),
        "ilps_solved": ilps,
        "objective": objective,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--time-limit", type=float, default=30.0, help="seconds per ILP solve (the CLI's default)"
    )
    ap.add_argument("--solvers", default="highs,cbc,auto")
    ap.add_argument("--tiers", default="10", help="comma-separated tier counts")
    ap.add_argument("--gpus", default="10000", help="comma-separated fleet sizes (GPUs)")
    args = ap.parse_args()
    stats = workload_stats(synthetic_conversations(SyntheticWorkload(tool_gap_s_mean=2.0), 400, seed=0), 1.0)
    base = demand_from_stats(stats)
    rows = []
    load = os.getloadavg()[0]
    for n_tiers in (int(x) for x in args.tiers.split(",")):
        for n_gpus in (int(x) for x in args.gpus.split(",")):
            tiers = bench_plan.fleet(n_tiers, n_gpus)
            s0 = ilp.Settings()
            top = ilp.max_rate_per_s(tiers, base, ilp.Slo(), s0, ilp.reference_for(tiers, base, None))
            demand = replace(base, arrival_rate_per_s=0.5 * top)
            for solver in args.solvers.split(","):
                row = {
                    "tiers": n_tiers,
                    "gpus": n_gpus,
                    **measure(tiers, demand, solver, args.repeats, args.time_limit),
                }
                rows.append(row)
                if not args.json:
                    print(
                        f"{n_tiers:>2} tiers {n_gpus:>6} GPUs {solver:>5} ({row['picked']}): solve "
                        f"{row['solve_median_s']:.3f} s (max {row['solve_max_s']:.3f}), plan "
                        f"{row['plan_median_s']:.3f} s, {'/'.join(row['statuses'])}, "
                        f"{row['ilps_solved']} ILP(s), objective {row['objective']}",
                        flush=True,
                    )
    meta = {"loadavg_start": load, "loadavg_end": os.getloadavg()[0], "repeats": args.repeats}
    if args.json:
        json.dump({"meta": meta, "rows": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"load average {meta['loadavg_start']:.2f} at the start, {meta['loadavg_end']:.2f} at the end")


if __name__ == "__main__":
    main()
