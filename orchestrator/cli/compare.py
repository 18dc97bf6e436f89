"""`orchestrator compare`: policies x arrival rates (x decode caps) on a fleet in the simulator.

Thin edge over orchestrator.sim and orchestrator.metrics (through orchestrator/cli/sim_common.py, shared with
`simulate`): a progress bar, one table, per-conversation CSV, compare.json and PNG plots (matplotlib, Agg).
Errors are one line with exit code 1. Every latency and energy figure is simulated/modelled, not measured;
the output says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from orchestrator.cli import sim_setup
from orchestrator.cli.common import console, fail, handle_errors, print_json
from orchestrator.cli.sim_common import (
    ADMISSION_HELP,
    ADMISSION_WAIT_HELP,
    BUDGET_HELP,
    HOST_KV_HELP,
    JSON_SCHEMA_VERSION,
    KV_GAP_HELP,
    PREFILL_BUDGET_HELP,
    THRESHOLD_HELP,
    VIEW_HELP,
    build_sim_options,
    clean_json,
    load_fleet_and_plan,
    make_out_dir,
    options_for_policy,
    progress_bar,
    run_one,
    setup_lines,
    summary_table,
    write_rows,
)
from orchestrator.cli.sim_setup import colocated_layout
from orchestrator.errors import SimulationError
from orchestrator.fleet import InstanceSpec, Plan
from orchestrator.metrics import TOKENS_COUNTED, Convention, Summary
from orchestrator.sim.fleet import build_instances, fleet_workload, reference_tier_model
from orchestrator.sim.standalone import StandaloneCache
from placement.policies import make_policy


def register(app: typer.Typer) -> None:
    @app.command("compare")
    @handle_errors
    def compare(
        fleet: Path = typer.Option(..., "--fleet", help="fleet.yaml"),
        policies: str = typer.Option("conserve,per-turn,full-disagg,colocated", "--policies"),
        rates: str | None = typer.Option(None, "--rates", help="comma-separated conversations/s"),
        plan_file: Path | None = typer.Option(
            None, "--plan", help="plan file for the disaggregated policies"
        ),
        layout: str | None = typer.Option(
            None, "--layout", help="instances for the disaggregated policies, e.g. 'prefill=1,decode=3'"
        ),
        colocated: str | None = typer.Option(
            None,
            "--colocated-layout",
            help="instances for colocated/round-robin/kv-aware (default: same GPUs)",
        ),
        decode_caps: str | None = typer.Option(
            None, "--decode-caps", help="extra power configurations: decoder caps in W, e.g. '200'"
        ),
        seed: int | None = typer.Option(None, "--seed", help="default: the fleet file's workload.seed"),
        conversations: int | None = typer.Option(None, "--conversations"),
        max_turns: int | None = typer.Option(None, "--max-turns"),
        mispredict_rate: float | None = typer.Option(None, "--mispredict-rate"),
        threshold: int | None = typer.Option(None, "--local-prefill-below", help=THRESHOLD_HELP),
        convention: Convention = typer.Option(Convention.HONEST, "--convention"),
        max_batched: int | None = typer.Option(None, "--max-batched-tokens", help=BUDGET_HELP),
        prefill_max_batched: int | None = typer.Option(
            None, "--prefill-max-batched-tokens", help=PREFILL_BUDGET_HELP
        ),
        router_admission: bool = typer.Option(False, "--router-admission", help=ADMISSION_HELP),
        admission_wait: float | None = typer.Option(None, "--admission-wait", help=ADMISSION_WAIT_HELP),
        power_controller: bool = typer.Option(
            False, "--power-controller", help="also run every policy under the power controller (+power)"
        ),
        view_cached: bool = typer.Option(False, "--view-cached-histories", help=VIEW_HELP),
        kv_gap_rule: bool = typer.Option(False, "--kv-gap-rule", help=KV_GAP_HELP),
        host_kv_gb: float | None = typer.Option(None, "--host-kv-gb", help=HOST_KV_HELP),
        json_out: bool = typer.Option(False, "--json"),
        out: Path | None = typer.Option(None, "--out", help="directory for CSV/JSON rows and PNG plots"),
    ) -> None:
        """Compare policies across arrival rates (and decoder power caps) in the simulator."""
        cfg, plan = load_fleet_and_plan(fleet, plan_file)
        seed = sim_setup.effective_seed(cfg, seed)
        pols = [p.strip() for p in policies.split(",") if p.strip()]
        for p in pols:
            make_policy(p, **options_for_policy(p, mispredict_rate, threshold))
        try:
            rate_list = [float(r) for r in rates.split(",") if r.strip()] if rates else None
            caps = [float(c) for c in decode_caps.split(",") if c.strip()] if decode_caps else []
        except ValueError:
            fail("--rates and --decode-caps take comma-separated numbers, e.g. --rates 0.5,1,1.634")
            return
        if rate_list is not None and any(not r > 0 for r in rate_list):
            fail("--rates must be > 0 conversations/s")
        out_dir = make_out_dir(out)
        sim_opts = build_sim_options(
            max_batched,
            prefill_max_batched,
            router_admission,
            view_cached,
            admission_wait,
            kv_gap_rule,
            host_kv_gb,
        )
        base_convs = fleet_workload(cfg, None, seed, conversations, max_turns)
        from orchestrator.workload import poisson_arrivals

        if rate_list is None:  # the file's arrivals: Poisson at its rate, or a timed trace's own timestamps
            label_rate, arrivals = sim_setup.arrivals(cfg, None, base_convs)
            workloads = [(label_rate, arrivals, base_convs)]
        else:
            arrivals = sim_setup.POISSON_ARRIVALS
            workloads = [(r, arrivals, poisson_arrivals(base_convs, r, seed)) for r in rate_list]
        # the ILP's plan (when no plan/layout is given) is made once, at the highest rate, for every run
        plan_rate = None if rate_list is None else max(rate_list)
        plan, layout = sim_setup.plan_or_layout(cfg, plan, layout, plan_rate)
        disagg_insts = build_instances(cfg, plan, layout)
        if colocated is not None:
            sim_setup.fit_policy("colocated", cfg, None, colocated)  # refuses prefill instances
        coloc = colocated_layout(disagg_insts) if colocated is None else colocated
        thr = sim_setup.conserve_threshold(plan, threshold)
        uses_coloc = any(sim_setup.policy_key(p) in sim_setup.COLOCATED_FAMILY for p in pols)
        note = (
            f"colocated, round-robin and kv-aware run the same {sum(i.gpus for i in disagg_insts)} GPUs as "
            f"colocated instances at TDP ({coloc})"
            if uses_coloc and colocated is None
            else None
        )
        sa = StandaloneCache(reference_tier_model(cfg), sim_opts)
        configs: list[tuple[str, str, str | None, Plan | None]] = []  # label, policy, layout, plan
        ctl_opts = None
        if power_controller:
            from orchestrator.sim.power import fleet_power_control

            ctl_opts = replace(sim_opts, power_controller=fleet_power_control(cfg))
        for p in pols:
            key = sim_setup.policy_key(p)
            if key in sim_setup.COLOCATED_FAMILY:
                configs.append((key, key, coloc, None))
                if ctl_opts is not None:
                    configs.append((f"{key}+power", key, coloc, None))
            else:
                configs.append((key, key, layout, plan))
                if ctl_opts is not None:
                    configs.append((f"{key}+power", key, layout, plan))
                for cap in caps:
                    configs.append((f"{key}@{cap:g}W", key, _capped_layout(disagg_insts, cap), None))

        results: list[dict[str, Any]] = []
        table_rows: list[tuple[str, float | None, Summary]] = []
        all_rows: list[dict[str, Any]] = []
        total = len(configs) * len(workloads)
        with progress_bar(disable=json_out) as prog:
            task = prog.add_task("simulating", total=total)
            for rate, how, convs in workloads:
                for label, pol, lay, pl in configs:
                    shown = "trace" if rate is None else f"{rate:.3g} conv/s"
                    prog.update(task, description=f"{label} @ {shown}")
                    thr_tokens = thr[0] if pol == "conserve" else None
                    kept: dict[str, Any] | None = {} if kv_gap_rule else None
                    summ, rows, _ = run_one(
                        cfg,
                        pl,
                        lay,
                        pol,
                        convs,
                        seed,
                        options_for_policy(pol, mispredict_rate, thr_tokens),
                        sa,
                        convention,
                        1.0 if out_dir is not None else None,
                        keep=kept,
                        sim_options=ctl_opts if label.endswith("+power") else sim_opts,
                    )
                    table_rows.append((label, rate, summ))
                    run_doc: dict[str, Any] = {
                        "config": label,
                        "policy": pol,
                        "rate_per_s": rate,
                        "arrivals": how,
                        "summary": summ.to_dict(),
                    }
                    gaps = kept["result"].kv_gaps if kept else None
                    if (
                        gaps is not None
                    ):  # the closed-loop gap rule's record (orchestrator.sim.gaps), modelled
                        run_doc["kv_gaps"] = {k: getattr(gaps, k) for k in gaps.__slots__}
                    results.append(run_doc)
                    for r in rows:
                        all_rows.append({"config": label, "rate_per_s": rate, **r})
                    prog.advance(task)
        doc = {
            "schema_version": JSON_SCHEMA_VERSION,
            "note": "simulated latencies; energy modelled by the tier power model, not measured",
            "tokens_counted": TOKENS_COUNTED,
            "convention": str(convention),
            "seed": seed,
            "arrivals": arrivals,
            "conserve_threshold": {"tokens": thr[0], "source": thr[1]}
            if any(sim_setup.policy_key(p) == "conserve" for p in pols)
            else None,
            "layout_conversion": note,
            "runs": results,
        }
        if out_dir is not None:
            write_rows(out_dir / "conversations.csv", all_rows)
            (out_dir / "compare.json").write_text(json.dumps(clean_json(doc), indent=2, default=str))
            _plots(out_dir, table_rows)
        if json_out:
            print_json(clean_json(doc))
            return
        console.print(summary_table(table_rows, f"Policies x rates (simulated, {convention} convention)"))
        has_conserve = doc["conserve_threshold"] is not None
        for line in setup_lines(note, thr if has_conserve else None, workloads[0][0], arrivals):
            console.print(line, highlight=False, soft_wrap=True)
        console.print(
            f"x = slowdown vs the conversation alone on an idle {reference_tier_model(cfg).name}; tokens/J "
            f"counts {TOKENS_COUNTED}, every GPU billed (modelled energy).",
            style="dim",
        )
        if out_dir is not None:
            console.print(f"Wrote {out_dir}/conversations.csv, compare.json and PNG plots")


def _capped_layout(instances: Sequence[InstanceSpec], cap_w: float | None) -> str:
    """The same instances as a --layout string, every decoder capped at `cap_w` (None: caps unchanged)."""
    counts: dict[tuple[str, str, float | None], int] = {}
    for i in instances:
        c = cap_w if str(i.role) == "decode" and cap_w is not None else i.tier_model.power_cap_w
        counts[(i.tier, str(i.role), c)] = counts.get((i.tier, str(i.role), c), 0) + 1
    if cap_w is not None and not any(r == "decode" for _, r, _ in counts):
        raise SimulationError("--decode-caps needs decode instances in the layout or plan.")
    if any(i.tier_model.tp != 1 for i in instances):
        raise SimulationError(
            "this plan uses tensor parallelism, which --layout cannot express. "
            "To fix: pass --layout explicitly."
        )
    return ",".join(f"{t}.{r}={n}" + (f"@{c:g}" if c is not None else "") for (t, r, c), n in counts.items())


def _nan(v: float | None) -> float:
    return math.nan if v is None else v


def _plots(out_dir: Path, rows: list[tuple[str, float | None, Summary]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r[0] for r in rows}, key=[r[0] for r in rows].index)
    for metric, fname, ylabel in (
        ("ttfet_slowdown", "ttfet_p95_slowdown.png", "p95 TTFET slowdown (x standalone)"),
        ("tbt_slowdown", "tbt_p95_slowdown.png", "p95 last-turn mean TBT slowdown"),
        ("e2e_slowdown", "e2e_p95_slowdown.png", "p95 E2E slowdown"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for lab in labels:
            # None (a trace has no rate; no finished conversation has no p95) is a gap, as matplotlib draws it
            pts = [(_nan(r[1]), _nan(getattr(r[2], metric)["p95"])) for r in rows if r[0] == lab]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab)
        ax.set_xlabel("arrival rate (conversations/s)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.axhline(5.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title("simulated")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
    # the issue-12 acceptance figures: SLO violations and tokens/J per policy and rate
    for fname, ylabel, get in (
        ("slo_violations.png", "SLO violations (% of conversations)", lambda x: x.slo_violation_pct),
        ("tokens_per_j_by_rate.png", "tokens/J (modelled, idle GPUs billed)", lambda x: x.tokens_per_j),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for lab in labels:
            pts2 = [(_nan(r[1]), float(get(r[2]))) for r in rows if r[0] == lab]
            ax.plot([p[0] for p in pts2], [p[1] for p in pts2], marker="o", label=lab)
        ax.set_xlabel("arrival rate (conversations/s)")
        ax.set_ylabel(ylabel)
        ax.set_title("simulated")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
    top = max(r[1] or 0 for r in rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    vals = [(r[0], r[2].tokens_per_j) for r in rows if r[1] == top]
    ax.bar([v[0] for v in vals], [v[1] for v in vals])
    ax.set_ylabel("tokens/J (modelled, idle GPUs billed)")
    ax.set_title(f"tokens per joule at {top:g} conv/s")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "tokens_per_j.png", dpi=120)
    plt.close(fig)
