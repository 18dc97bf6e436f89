"""Issue 10, paper-a40-disagg: the tail of a decoder's running KV under the batch law, and the verification's
stream (once per pass vs i.i.d.). A measurement script (docs/planning.md, the paper-a40-disagg bullet).

    PYTHONPATH=. python benchmarks/fidelity_kv_tail.py [--fleets fleet,paper-a40-disagg] [--iid] [--n 2000]

Part 1 (modelled, no simulation; seconds): for each fleet's plan (made as `orchestrator plan` makes it) and
each decode pool, the share of arrivals that meet the pool's running KV above its capacity at the planned
load: the running sequences' contexts are i.i.d. given the batch (the batch law is a symmetric queue's), with
the workload's per-decode-token context moments, their sum taken as normal; under one instance's law (n = 1,
what a linear ILP constraint could use) and under the pool's law (n instances, the balanced placement the
simulator's decoders show); and the rate per instance at which the n = 1 share reaches 1 - p/100 (the
candidate constraint "(4b)"), as a multiple of the planned load.

Part 2 (--iid; simulation, ~10 s per fleet, run it under the heavy-job lock): orchestrator.verify's
validate_plan on the stream it uses (each conversation once per pass) and on i.i.d. draws (with
replacement, same arrivals), simulated / predicted and the steady-state violations.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from fidelity_batch import iid_stream  # benchmarks/fidelity_batch.py: this script's directory is on sys.path

import orchestrator.verify as ver
from orchestrator.config import load_fleet
from orchestrator.planner.inputs import demand_from_stats
from orchestrator.planner.run import make_plan
from orchestrator.workload import ConversationSpec, workload_from_config
from placement.ilp.batching import batch_law, instance_steps_s

FLEETS = [
    "fleet",
    "paper-a40",
    "paper-a40-disagg",
    "fleet-llama8b-a100-l40s",
    "fleet-long-gaps",
    "fleet-single-turn",
    "fleet-mooncake",
]


def context_moments(convs: Sequence[ConversationSpec]) -> tuple[float, float]:
    """(mean, variance) of a running sequence's context over the decode tokens of the workload."""
    o = a = a2 = 0.0
    for c in convs:
        prev = 0
        for k, t in enumerate(c.turns, start=1):
            ctx = t.appended_tokens if k == 1 else prev + t.appended_tokens
            n = t.output_tokens
            o += n
            a += n * (ctx + n / 2.0)
            a2 += ((ctx + n) ** 3 - ctx**3) / 3.0
            prev = ctx + n
    mean = a / o
    return mean, a2 / o - mean**2


def overflow_share(pi: np.ndarray, per: np.ndarray, mean: float, var: float, cap: float) -> float:
    sd = np.sqrt(np.maximum(per * var, 0.0))
    z = (cap - per * mean) / np.where(sd > 0, sd, 1.0) / math.sqrt(2.0)
    tail = np.where(sd > 0, 0.5 * np.array([math.erfc(x) for x in z]), (per * mean > cap).astype(float))
    return float((pi * tail).sum())


def tail_rate(steps: np.ndarray, k: float, mean: float, var: float, cap: float, share_max: float) -> float:
    """Rate per instance at which the n = 1 share reaches share_max (bisection; inf: never below the
    stability limit)."""
    hi = len(steps) / (k * float(steps[-1]))

    def share(rate: float) -> float:
        law = batch_law(steps, rate, k, 1)
        return overflow_share(law.pi, law.per_instance, mean, var, cap)

    if share(hi * (1 - 1e-9)) <= share_max:
        return math.inf
    lo = 0.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if share(mid) <= share_max else (lo, mid)
    return lo


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fleets", default=",".join(FLEETS))
    ap.add_argument("--iid", action="store_true")
    ap.add_argument("--n", type=int, default=0, help="conversations per seed (0: the verification's)")
    args = ap.parse_args(argv)
    once_per_pass = ver.steady_stream
    for name in [f for f in args.fleets.split(",") if f]:
        cfg = load_fleet(f"examples/{name}.yaml")
        run = make_plan(cfg)
        rate = run.plan.predictions.arrival_rate_per_s
        d = demand_from_stats(replace(run.stats, arrival_rate_per_s=rate))
        mean, var = context_moments(workload_from_config(cfg.workload))
        allowance = 1.0 - cfg.slo.percentile / 100.0
        k = d.decode_tokens + d.later_turns
        for p in run.result.pools:
            o = p.option
            if not o.does_decode or p.instances == 0:
                continue
            steps = instance_steps_s(o, d)
            each = p.arrival_rate_per_s / p.instances
            cap = float(o.kv_capacity_tokens)
            one = batch_law(steps, each, k, 1)
            pool = batch_law(steps, p.arrival_rate_per_s, k, p.instances)
            t1 = tail_rate(steps, k, mean, var, cap, allowance)
            print(
                f"{name} {p.instances} x {o.key} at {each:.4f} conv/s each (mu_tbt {o.mu_tbt:.4f}); context "
                f"{mean:,.0f} +- {math.sqrt(max(var, 0.0)):,.0f} tokens, KV {cap:,.0f}: P(running KV > KV) "
                f"n=1 {overflow_share(one.pi, one.per_instance, mean, var, cap):.2e}, pooled "
                f"{overflow_share(pool.pi, pool.per_instance, mean, var, cap):.2e}; n=1 rate at "
                f"{allowance:.0%}: {t1:.4f} ({t1 / each:.3f} x planned)",
                flush=True,
            )
        if not args.iid:
            continue
        for label, stream in (("once per pass", once_per_pass), ("i.i.d.", iid_stream)):
            setattr(ver, "steady_stream", stream)  # noqa: B010 (validate_plan looks it up in its module)
            try:
                v = ver.validate_plan(cfg, run, conversations=args.n or None)
            finally:
                setattr(ver, "steady_stream", once_per_pass)  # noqa: B010
            keep = ("p95 TTFET slowdown", "mean TBT ms", "tokens/J")
            cells = [
                f"{r.metric} {r.simulated / r.predicted:.3f}"
                for r in v.rows
                if r.metric in keep and r.predicted and r.simulated
            ]
            print(
                f"  {label}, {v.conversations} conversations x 3 seeds: simulated / predicted "
                f"{', '.join(cells)}; violations {v.slo_violation_pct:.2f}% (allowed {v.allowance_pct:g}%)",
                flush=True,
            )


if __name__ == "__main__":
    main()
