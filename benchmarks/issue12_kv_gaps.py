"""Issue 12 item 3: per policy, the share of KV-seconds idle conversations hold across tool gaps, and what the
keep/offload/drop rule would release (orchestrator/kv_gaps.py: open-loop replay; simulated, modelled energy).

    python benchmarks/issue12_kv_gaps.py --fleet examples/fleet-long-gaps.yaml --seed 0 --host-gb 256

Each policy runs on the layout compare gives it (the ILP's plan for the disaggregated ones, the same GPUs as
colocated instances for colocated / kv-aware / round-robin). The host tier is per decoder (``--host-gb``,
PCIe 4.0 x16); 0 turns offload off (drops only).
"""

from __future__ import annotations

import argparse

from orchestrator.cli import sim_setup
from orchestrator.config import load_fleet
from orchestrator.kv_gaps import kv_gap_report
from orchestrator.sim.fleet import build_instances, fleet_workload, simulate_fleet
from placement.kv_gaps import HostMemory

POLICIES = ("conserve", "conserve-adaptive", "per-turn", "colocated", "kv-aware", "round-robin")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fleet", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", type=float, default=None)
    ap.add_argument("--conversations", type=int, default=None)
    ap.add_argument("--host-gb", type=float, default=256.0)
    args = ap.parse_args()
    cfg = load_fleet(args.fleet)
    host = HostMemory(args.host_gb * 1e9) if args.host_gb > 0 else None
    convs = fleet_workload(cfg, args.rate, args.seed, args.conversations)
    plan, layout = sim_setup.plan_or_layout(cfg, None, None, args.rate)
    coloc = sim_setup.colocated_layout(build_instances(cfg, plan, layout))
    print(f"fleet {args.fleet}, seed {args.seed}, host tier {args.host_gb:g} GB per decoder; open loop\n")
    print(
        "| policy | idle share of KV-s (keep all) | with the rule | gaps | kept | offloaded | dropped "
        "| offload J | re-prefill J | restore s (sum) | tokens/J |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for pol in POLICIES:
        coloc_family = sim_setup.policy_key(pol) in sim_setup.COLOCATED_FAMILY
        res, insts = simulate_fleet(
            cfg,
            None if coloc_family else plan,
            pol,
            None,
            layout=coloc if coloc_family else layout,
            seed=args.seed,
            conversations=convs,
            energy_window_s=None,
        )
        r = kv_gap_report(res, {i.instance_id: i.tier_model for i in insts}, host)
        print(
            f"| {pol} | {r.idle_share:.1%} | {r.idle_share_with_rule:.1%} | {r.gaps} | {r.kept} "
            f"| {r.offloaded} | {r.dropped} | {r.offload_energy_j:.0f} | {r.drop_energy_j:.0f} "
            f"| {r.restore_s:.2f} | {res.tokens_per_j:.2f} |"
        )


if __name__ == "__main__":
    main()
