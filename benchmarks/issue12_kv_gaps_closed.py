"""Issue 12 item 3, closed loop: the keep/offload/drop rule applied inside the simulated run
(orchestrator/sim/gaps.py, ``SimOptions.kv_gap_rule``) against the same run without it, per policy and seed
(simulated latencies, modelled energy).

    python benchmarks/issue12_kv_gaps_closed.py --fleet examples/fleet-long-gaps.yaml --seeds 0-4 \
        --host-gb 256 --lock

Per policy three runs on the layout compare gives it (the ILP's plan for the disaggregated ones, the same GPUs
as colocated instances for colocated / kv-aware / round-robin): **off** (every idle conversation's KV stays in
its decoder's prefix cache and pin accounting; the cache's LRU evicts it when an admission needs room),
**offload** (the rule with a ``--host-gb`` host tier per decoder, PCIe 4.0 x16) and **drop** (the rule
without a host tier). Each cell: mean [min-max] over the seeds. "history re-prefilled" counts, over later
turns, the prompt tokens prefilled beyond the turn's new ones (history lost to an eviction or a drop), in
thousands.
Each seed runs under the machine's heavy-job lock with ``--lock``.
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
from orchestrator.metrics import Convention
from orchestrator.sim import SimOptions
from orchestrator.sim.fleet import build_instances, fleet_workload, reference_tier_model
from orchestrator.sim.result import SimResult
from orchestrator.sim.standalone import StandaloneCache
from placement.kv_gaps import HostMemory

POLICIES = ("conserve", "conserve-adaptive", "per-turn", "colocated", "kv-aware", "round-robin")


def history_reprefilled_tokens(res: SimResult) -> int:
    """Prompt tokens later turns prefilled beyond their new ones (their history was not in the cache)."""
    by_conv: dict[str, list[Any]] = defaultdict(list)
    for t in res.turns:
        by_conv[t.conversation_id].append(t)
    lost = 0
    for turns in by_conv.values():
        turns.sort(key=lambda t: t.turn)
        for prev, t in zip(turns, turns[1:], strict=False):
            new = t.input_tokens - (prev.input_tokens + prev.output_tokens)
            lost += max(0, t.prefilled_tokens - new - 16)  # a block: vLLM recomputes >= 1 token
    return lost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fleet", required=True)
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--rate", type=float, default=None)
    ap.add_argument("--host-gb", type=float, default=256.0)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--lock", action="store_true")
    args = ap.parse_args()
    cfg = load_fleet(args.fleet)
    modes = {
        "off": SimOptions(),
        "offload": SimOptions(kv_gap_rule=True, kv_gap_host=HostMemory(args.host_gb * 1e9)),
        "drop": SimOptions(kv_gap_rule=True),
    }
    plan, layout = sim_setup.plan_or_layout(cfg, None, None, args.rate)
    coloc = sim_setup.colocated_layout(build_instances(cfg, plan, layout))
    thr = sim_setup.conserve_threshold(plan, None)
    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for seed in _seeds(args.seeds):
        convs = fleet_workload(cfg, args.rate, seed, None)
        with _locked(args.lock):
            for pol in args.policies.split(","):
                coloc_family = sim_setup.policy_key(pol) in sim_setup.COLOCATED_FAMILY
                # compare's options: the plan's threshold for conserve, 10% mispredictions for per-turn
                opts = options_for_policy(pol, None, thr[0] if pol == "conserve" else None)
                for mode, so in modes.items():
                    sa = StandaloneCache(reference_tier_model(cfg), so)
                    keep: dict[str, Any] = {}
                    summ, _, _ = run_one(
                        cfg,
                        None if coloc_family else plan,
                        coloc if coloc_family else layout,
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
                    c = cells[(pol, mode)]
                    c["viol"].append(summ.slo_violation_pct)
                    c["tokj"].append(summ.tokens_per_j)
                    c["ttfet"].append(summ.ttfet_slowdown["p95"])
                    c["lost"].append(history_reprefilled_tokens(res) / 1e3)
                    g = res.kv_gaps
                    c["offl"].append(g.offloaded if g else 0)
                    c["drop"].append(g.dropped if g else 0)
                    c["gaps"].append(g.gaps if g else 0)
                    c["restore"].append(g.restore_s if g else 0.0)
                    c["rel"].append(100 * g.idle_share_released if g else 0.0)
    print(
        f"fleet {args.fleet}, seeds {args.seeds}, host tier {args.host_gb:g} GB per decoder (offload), closed"
    )
    print("loop; mean [min-max] over seeds; simulated, energy modelled\n")
    print(
        "| policy | gap rule | SLO viol. % | tokens/J | p95 TTFET x | gaps | offloaded | dropped "
        "| idle KV-s released % | restore s (sum) | history re-prefilled k tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (pol, mode), m in cells.items():
        print(
            f"| {pol} | {mode} | {_fmt(m['viol'], '.1f')} | {_fmt(m['tokj'], '.2f')} "
            f"| {_fmt(m['ttfet'], '.2f')} "
            f"| {statistics.fmean(m['gaps']):.0f} | {_fmt(m['offl'], '.0f')} | {_fmt(m['drop'], '.0f')} "
            f"| {_fmt(m['rel'], '.1f')} | {_fmt(m['restore'], '.1f')} | {_fmt(m['lost'], '.0f')} |"
        )


def _fmt(xs: list[float], spec: str) -> str:
    return f"{statistics.fmean(xs):{spec}} [{min(xs):{spec}}-{max(xs):{spec}}]"


if __name__ == "__main__":
    main()
