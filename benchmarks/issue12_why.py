"""Issue 12: where ConServe loses, in numbers -- which conversations violate the SLO and where their turn 1
waited (simulated; honest clock).

    python benchmarks/issue12_why.py --fleet examples/fleet-single-turn.yaml --seeds 0-4 --lock
    python benchmarks/issue12_why.py --fleet examples/paper-a40.yaml --rate 1.634 --seeds 0-4 --lock

Per configuration (``conserve-adaptive:slowdown``: that policy with ``objective="slowdown"``) on compare's
layout (the plan's for the disaggregated policies, the same GPUs as colocated instances for the colocated
family) with compare's policy options, over the seeds: tokens/J, violations (% of
conversations; by SLO: TTFET / TBT / E2E), and for turn 1 of the violating and the other conversations the
mean seconds spent in each place: queued before its prefill started (on the prefiller, or on the decoder for a
local prefill), in prefill (with chunked prefill, first come first served, this includes waiting for the
chunks of prompts admitted before it), from the prefill's end to the KV's allocation on the decoder (waiting
for room) and to the first token; how many turn 1s prefilled locally and how many violators were short prompts
(below the median turn-1 prompt of the run); and each role's utilisation. No figure is tuned: every number
comes from the simulator with compare's defaults.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from typing import Any

from issue12_compare import _locked, _seeds

from orchestrator.cli import sim_setup
from orchestrator.cli.sim_common import options_for_policy, run_one
from orchestrator.config import load_fleet
from orchestrator.metrics import Convention, SloSpec, conversation_metrics
from orchestrator.sim import SimOptions
from orchestrator.sim.fleet import build_instances, fleet_workload, reference_tier_model
from orchestrator.sim.result import SimResult
from orchestrator.sim.standalone import StandaloneCache
from orchestrator.workload import poisson_arrivals

POLICIES = ("conserve", "conserve-adaptive", "per-turn", "colocated", "kv-aware")


def turn1_parts(res: SimResult) -> dict[str, dict[str, float]]:
    """Per conversation, turn 1's seconds: queue, prefill, to KV allocation on the decoder, to first token."""
    out: dict[str, dict[str, float]] = {}
    for t in res.turns:
        if t.turn != 1:
            continue
        kv = max(t.kv_admit_s, t.prefill_end_s) if t.remote_prefill else t.prefill_end_s
        out[t.conversation_id] = {
            "queue": t.prefill_start_s - t.arrival_s,
            "prefill": t.prefill_end_s - t.prefill_start_s,
            "to_kv": kv - t.prefill_end_s,
            "to_first": t.first_token_s - kv,
            "local": 0.0 if t.remote_prefill else 1.0,
            "input": float(t.input_tokens),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fleet", required=True)
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--rate", type=float, default=None, help="conv/s (default: the fleet file's)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--lock", action="store_true")
    args = ap.parse_args()
    cfg = load_fleet(args.fleet)
    plan, layout = sim_setup.plan_or_layout(cfg, None, None, args.rate)
    coloc = sim_setup.colocated_layout(build_instances(cfg, plan, layout))
    thr = sim_setup.conserve_threshold(plan, None)
    so = SimOptions()
    sa = StandaloneCache(reference_tier_model(cfg), so)
    slo = SloSpec.from_config(cfg.slo)
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for seed in _seeds(args.seeds):
        base = fleet_workload(cfg, None, seed, None)
        convs = poisson_arrivals(base, args.rate, seed) if args.rate else base
        with _locked(args.lock):
            for label in args.policies.split(","):
                pol, _, objective = label.partition(":")  # conserve-adaptive:latency = that objective
                fam = sim_setup.policy_key(pol) in sim_setup.COLOCATED_FAMILY
                opts = options_for_policy(pol, None, thr[0] if pol == "conserve" else None)
                if objective:
                    opts["objective"] = objective
                keep: dict[str, Any] = {}
                summ, _, _ = run_one(
                    cfg,
                    None if fam else plan,
                    coloc if fam else layout,
                    pol,
                    convs,
                    seed,
                    opts,
                    sa,
                    Convention.HONEST,
                    None,
                    keep=keep,
                    sim_options=so,
                )
                res: SimResult = keep["result"]
                mets = conversation_metrics(res, convs, sa, slo, Convention.HONEST)
                parts = turn1_parts(res)
                med = statistics.median(p["input"] for p in parts.values())
                a = acc[label]
                a["viol"].append(summ.slo_violation_pct)
                a["tokj"].append(summ.tokens_per_j)
                for k in ("ttfet", "tbt", "e2e"):
                    key = {"ttfet": "ttfet_slowdown", "tbt": "tbt_slowdown", "e2e": "e2e_slowdown"}[k]
                    a[f"by_{k}"].append(summ.slo_violation_pct_by.get(key, 0.0))
                bad = [m.conversation_id for m in mets if m.violates and m.conversation_id in parts]
                good = [m.conversation_id for m in mets if not m.violates and m.conversation_id in parts]
                for name, ids in (("bad", bad), ("good", good)):
                    for part in ("queue", "prefill", "to_kv", "to_first"):
                        if ids:
                            a[f"{name}_{part}"].append(statistics.fmean(parts[c][part] for c in ids))
                a["local_pct"].append(100 * statistics.fmean(p["local"] for p in parts.values()))
                if bad:
                    a["bad_short_pct"].append(100 * sum(parts[c]["input"] < med for c in bad) / len(bad))
                    a["bad_local_pct"].append(100 * statistics.fmean(parts[c]["local"] for c in bad))
                for role, u in res.utilisation_by_role().items():
                    a[f"util_{role}"].append(u)
    shown = f"{args.rate} conv/s" if args.rate else "the file's rate"
    print(f"fleet {args.fleet} at {shown}, seeds {args.seeds}, honest clock; means over seeds\n")
    print(
        "| config | viol. % (TTFET/TBT/E2E) | tokens/J | turn-1 local % | violators: queue / prefill / to KV "
        "/ to 1st token s | others: same s | violators short % / local % | utilisation by role |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for pol, a in acc.items():
        print(
            f"| {pol} | {_m(a['viol'])} ({_m(a['by_ttfet'])}/{_m(a['by_tbt'])}/{_m(a['by_e2e'])}) "
            f"| {_m(a['tokj'], 2)} | {_m(a['local_pct'])} | {_parts(a, 'bad')} | {_parts(a, 'good')} "
            f"| {_m(a['bad_short_pct'])} / {_m(a['bad_local_pct'])} "
            f"| {', '.join(f'{k[5:]} {_m(v, 2)}' for k, v in a.items() if k.startswith('util_'))} |"
        )


def _m(xs: list[float], nd: int = 1) -> str:
    return f"{statistics.fmean(xs):.{nd}f}" if xs else "-"


def _parts(a: dict[str, list[float]], name: str) -> str:
    return " / ".join(_m(a[f"{name}_{p}"], 2) for p in ("queue", "prefill", "to_kv", "to_first"))


if __name__ == "__main__":
    main()
