"""Simulator speed: the paper scenario per policy, and 10,000 conversations x 10 turns on a 64-GPU fleet.

    python benchmarks/bench_sim.py [--repeat 3] [--skip-big] [--rate 6]

Prints wall times (median of --repeat runs), events and simulated tokens (prompt + output of every turn) per
wall-second. Wall time covers run_simulation() (event loop + results, 1 s energy windows included); building
the workload is timed separately. Target (issue 3): 10k x 10 on 64 GPUs in < 60 s on a 2-core machine.
Figures go to BENCHMARKS.md (section "Simulator").
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.config import load_fleet
from orchestrator.sim import run_simulation
from orchestrator.sim.fleet import build_instances, fleet_workload, links_of
from orchestrator.workload import ConversationSpec, TurnSpec, poisson_arrivals
from placement.base import Role
from placement.policies import make_policy
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class _Inst:
    instance_id: str
    tier: str
    role: Role
    tier_model: TierModel


def big_workload(n: int, turns: int, rate: float, seed: int) -> list[ConversationSpec]:
    """n conversations of exactly `turns` turns shaped like the paper's trace (turn-1 ~15.9k tokens, +67
    appended, ~120 output tokens per turn) with exponential tool gaps of mean 2 s."""
    rng = np.random.default_rng(seed)
    first = np.maximum(1, rng.lognormal(np.log(15_900), 0.35, n)).astype(int)
    outs = rng.geometric(1 / 120, (n, turns))
    apps = rng.poisson(67, (n, turns))
    gaps = rng.exponential(2.0, (n, turns))
    convs = []
    for i in range(n):
        ts = [TurnSpec(int(first[i]), int(outs[i, 0]))]
        ts += [TurnSpec(int(apps[i, k]), int(outs[i, k]), float(gaps[i, k])) for k in range(1, turns)]
        convs.append(ConversationSpec(f"c{i}", 0.0, tuple(ts)))
    return poisson_arrivals(convs, rate, seed)


def timed(fn, repeat: int):  # type: ignore[no-untyped-def]
    walls, res = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = fn()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls), walls, res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--rate", type=float, default=6.0, help="conversations/s for the 64-GPU run")
    args = ap.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}"
    )

    fleet = REPO / "examples" / "paper-a40.yaml"
    if fleet.is_file():
        cfg = load_fleet(fleet)
        convs = fleet_workload(cfg, rate=1.634, seed=0)
        tokens = sum(c.total_tokens for c in convs)
        print(f"\npaper scenario: {len(convs)} conversations x 5 turns, 1.634 conv/s, {tokens:,} tokens")
        for pol, layout, opts in (
            ("conserve", "prefill=1,decode=3", {}),
            ("per-turn", "prefill=1,decode=3", {"mispredict_rate": 0.1}),
            ("full-disagg", "prefill=1,decode=3", {}),
            ("colocated", "colocated=4", {}),
        ):
            insts = build_instances(cfg, layout=layout)

            def run(pol=pol, opts=opts, insts=insts):  # type: ignore[no-untyped-def]
                return run_simulation(insts, convs, make_policy(pol, **opts), links=links_of(cfg))

            med, walls, res = timed(run, args.repeat)
            print(
                f"  {pol:12s} median {med * 1e3:7.1f} ms  (runs {', '.join(f'{w * 1e3:.0f}' for w in walls)})"
                f"  events {res.events:,}  {tokens / med:,.0f} simulated tokens/s"
            )
    else:
        print("examples/paper-a40.yaml missing or ../shared/data absent: paper scenario skipped")

    if args.skip_big:
        return
    tm = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    insts = [_Inst(f"p{i}", "a40", Role.PREFILL, tm) for i in range(16)]
    insts += [_Inst(f"d{i}", "a40", Role.DECODE, tm) for i in range(48)]
    t0 = time.perf_counter()
    convs = big_workload(10_000, 10, args.rate, 0)
    gen_s = time.perf_counter() - t0
    tokens = sum(c.total_tokens for c in convs)
    print(
        f"\n10,000 conversations x 10 turns, 64 A40 (16 prefill + 48 decode), {args.rate:g} conv/s, "
        f"tool gaps exp(2 s); {tokens:,} tokens; workload built in {gen_s:.1f} s"
    )
    med, walls, res = timed(lambda: run_simulation(insts, convs, make_policy("conserve")), args.repeat)
    c = res.conversations
    print(
        f"  conserve     median {med:6.1f} s  (runs {', '.join(f'{w:.1f}' for w in walls)}; event loop "
        f"{res.wall_s:.1f} s)  events {res.events:,}  {tokens / med:,.0f} simulated tokens/s  "
        f"virtual {res.makespan_s:,.0f} s, {len(res.energy_windows):,} energy windows, "
        f"mean TTFET {sum(x.ttfet_s for x in c) / len(c):.1f} s"
    )
    print(f"  target < 60 s: {'met' if med < 60 else 'NOT met'}")


if __name__ == "__main__":
    main()
