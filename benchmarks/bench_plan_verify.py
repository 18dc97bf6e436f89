"""Time of `orchestrator plan`'s verification loop (orchestrator/verify.py) on an example fleet.

Runs what `orchestrator plan --fleet FILE` does after the ILP -- the steady-state simulation of the plan over
--seeds seeds and, if it misses the SLO, the tightening rounds -- --repeats times and prints the median of
the loop's wall time, with the solve time of the ILP alone beside it. With --max-rate the plan is made for the
highest rate (`plan --max-rate`), and --sim-search also times the simulated max-rate bisection after the loop
(`plan --max-rate --sim-search`: orchestrator.sim_capacity.highest_sustained_rate, its default budget).
Run (under the heavy lock):
    python benchmarks/bench_plan_verify.py [--fleet examples/fleet.yaml] [--repeats 3] [--seeds 3]
        [--max-rate [--sim-search]] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from orchestrator.config import load_fleet
from orchestrator.planner import PlanRun, make_plan
from orchestrator.sim_capacity import highest_sustained_rate
from orchestrator.verify import verify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", type=Path, default=Path("examples/fleet.yaml"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-rate", action="store_true", help="plan for the highest rate (plan --max-rate)")
    ap.add_argument("--sim-search", action="store_true", help="with --max-rate: time the sim search")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.sim_search and not a.max_rate:
        ap.error("--sim-search needs --max-rate")
    cfg = load_fleet(a.fleet)
    loops: list[float] = []
    solves: list[float] = []
    last = None
    searches: list[float] = []
    found = None
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        run = make_plan(cfg, max_rate=a.max_rate)
        solves.append(time.perf_counter() - t0)

        def replan(ft: float, fb: float) -> PlanRun:
            return make_plan(cfg, max_rate=a.max_rate, slo_factors=(ft, fb))

        t1 = time.perf_counter()
        run, v = verify(cfg, run, replan, tuple(range(a.seeds)))
        loops.append(time.perf_counter() - t1)
        last = v
        if a.sim_search:
            sim = highest_sustained_rate(cfg, run, tuple(range(a.seeds)))
            searches.append(sim.wall_s)
            found = (run.plan.predictions.arrival_rate_per_s, sim)
    assert last is not None
    out = {
        "fleet": str(a.fleet),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "repeats": a.repeats,
        "seeds": a.seeds,
        "conversations_per_seed": last.conversations,
        "rounds": len(last.rounds),
        "verification_loop_s_median": round(statistics.median(loops), 2),
        "verification_loop_s_all": [round(x, 2) for x in loops],
        "plan_s_median": round(statistics.median(solves), 2),
        "slo_violation_pct": round(last.slo_violation_pct, 2),
        "status": last.status,
        "max_rate": a.max_rate,
    }
    if found is not None:
        top, sim = found
        out["sim_search_s_median"] = round(statistics.median(searches), 2)
        out["sim_search_s_all"] = [round(x, 2) for x in searches]
        out["max_rate_predicted_per_s"] = round(top, 4)
        out["max_rate_simulated_per_s"] = round(sim.rate_per_s, 4)
        out["sim_search_checks"] = len(sim.checks)
        out["sim_search_budget_exhausted"] = sim.budget_exhausted
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
