"""Plan solve time vs fleet size: 2, 5, 10 tiers x 100, 1,000, 10,000 GPUs, HiGHS and CBC.

Times the whole planning run (placement.ilp.plan: tier merging, every decode level's LP bound, the ILPs the
bound does not prune, predictions) -- what `orchestrator plan` waits for after reading the workload -- as the
median of --repeats runs, and records the proven-optimal status (status Optimal and sol_status "Optimal
Solution Found" at placement.ilp.MIP_REL_GAP) and the ILPs solved. Run:
    python benchmarks/bench_plan.py [--repeats 3] [--json] [--solvers highs,cbc]
The fleet: tiers cycle through the catalog's GPUs (so 10 tiers repeat 3 GPU types), each with caps {TDP,
0.7 TDP}, TP {1, 2}, roles prefill and decode; GPUs split evenly; the arrival rate is half the fleet's
sustainable rate (Llama-3.1-8B, synthetic agentic workload).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace

from orchestrator.config import SyntheticWorkload, parse_fleet
from orchestrator.planner import demand_from_stats, tier_supplies
from orchestrator.workload import synthetic_conversations, workload_stats
from placement import ilp
from placement.errors import PlanningError

GPUS = [
    "H100-SXM",
    "H200-SXM",
    "A100-80GB-SXM",
    "B200",
    "MI300X",
    "L40S",
    "A40",
    "H100-SXM",
    "H200-SXM",
    "B200",
]


def fleet(n_tiers: int, n_gpus: int) -> list[ilp.TierSupply]:
    tiers = []
    for i in range(n_tiers):
        name = GPUS[i % len(GPUS)]
        tdp = {
            "H100-SXM": 700,
            "H200-SXM": 700,
            "A100-80GB-SXM": 400,
            "B200": 1000,
            "MI300X": 750,
            "L40S": 350,
            "A40": 300,
        }[name]
        tiers.append(
            {
                "name": f"t{i}",
                "gpu": name,
                "count": n_gpus // n_tiers,
                "power_caps_w": [tdp, 0.7 * tdp],
                "tp": [1, 2],
            }
        )
    return tier_supplies(parse_fleet({"model": "Llama-3.1-8B", "tiers": tiers}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--time-limit", type=float, default=20.0, help="seconds per ILP solve")
    ap.add_argument("--solvers", default="highs,cbc")
    ap.add_argument("--tiers", default="2,5,10")
    ap.add_argument("--gpus", default="100,1000,10000")
    args = ap.parse_args()
    stats = workload_stats(synthetic_conversations(SyntheticWorkload(tool_gap_s_mean=2.0), 400, seed=0), 1.0)
    base = demand_from_stats(stats)
    rows = []
    for n_tiers in (int(x) for x in args.tiers.split(",")):
        for n_gpus in (int(x) for x in args.gpus.split(",")):
            tiers = fleet(n_tiers, n_gpus)
            s0 = ilp.Settings()
            ref = ilp.reference_for(tiers, base, None)
            top = ilp.max_rate_per_s(tiers, base, ilp.Slo(), s0, ref)
            demand = replace(base, arrival_rate_per_s=0.5 * top)
            for solver in args.solvers.split(","):
                s = ilp.Settings(solver=solver, time_limit_s=args.time_limit)
                full, statuses = [], set()
                levels = ilps = used = n_opts = 0
                objective = None
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    try:
                        r = ilp.plan(tiers, demand, ilp.Slo(), s)  # raises unless every ILP is proven optimal
                        statuses.add(r.solution.status)
                        levels, ilps, used = r.levels_tried, r.ilps_solved, r.gpus_used
                        n_opts, objective = len(r.options), r.solution.objective_value
                    except PlanningError:
                        statuses.add("NOT-PROVEN(time limit)")
                    full.append(time.perf_counter() - t0)
                row = {
                    "tiers": n_tiers,
                    "gpus": n_gpus,
                    "solver": solver,
                    "options": n_opts,
                    "rate_per_s": round(demand.arrival_rate_per_s, 2),
                    "levels": levels,
                    "ilps_solved": ilps,
                    "plan_median_s": round(statistics.median(full), 4),
                    "plan_max_s": round(max(full), 4),
                    "status": "/".join(sorted(statuses)),
                    "objective": objective,
                    "gpus_used": used,
                }
                rows.append(row)
                if not args.json:
                    print(
                        f"{n_tiers:>2} tiers {n_gpus:>6} GPUs {solver:>5}: plan {row['plan_median_s']:.3f} s "
                        f"(max {row['plan_max_s']:.3f}), {row['status']}, {row['levels']} levels, "
                        f"{row['ilps_solved']} ILP(s) solved, {row['options']} options, objective "
                        f"{objective if objective is None else round(objective, 2)}, "
                        f"{row['gpus_used']} GPUs used",
                        flush=True,
                    )
    if args.json:
        json.dump(rows, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
