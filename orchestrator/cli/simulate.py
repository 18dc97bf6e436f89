"""`orchestrator simulate`: one policy on a fleet in the simulator (`compare`: orchestrator/cli/compare.py).

Thin edge over orchestrator.sim and orchestrator.metrics: parses options, shows a progress bar and tables,
writes per-conversation CSV/JSON and PNG plots (matplotlib, Agg). Errors are one line with exit code 1.
Every latency and energy figure printed here is simulated/modelled, not measured; the output says so.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from orchestrator.cli import sim_setup
from orchestrator.cli.common import console, handle_errors, print_json
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
from orchestrator.config import FleetConfig
from orchestrator.errors import ConfigError
from orchestrator.fleet import InstanceSpec
from orchestrator.metrics import TOKENS_COUNTED, Convention
from orchestrator.sim.fleet import fleet_workload, reference_tier_model, unallocated_idle_w
from orchestrator.sim.standalone import StandaloneCache
from placement.policies import POLICY_NAMES, make_policy

POWER_HELP = (
    "run the online power controller (placement/power.py): every 5 virtual seconds it moves each pool's "
    "cap within its tier's power_caps_w; energy is modelled at the cap in force"
)


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    @handle_errors
    def simulate(
        fleet: Path = typer.Option(..., "--fleet", help="fleet.yaml"),
        plan_file: Path | None = typer.Option(
            None, "--plan", help="plan file from `orchestrator plan --out`"
        ),
        layout: str | None = typer.Option(
            None, "--layout", help="explicit instances, e.g. 'prefill=1,decode=3@200' or 'colocated=4'"
        ),
        policy: str | None = typer.Option(None, "--policy", help=f"one of {', '.join(POLICY_NAMES)}"),
        rate: float | None = typer.Option(
            None, "--rate", help="conversations/s (Poisson); default: the file's"
        ),
        seed: int | None = typer.Option(
            None, "--seed", help="seed of the workload, arrivals and per-turn errors (default: workload.seed)"
        ),
        conversations: int | None = typer.Option(None, "--conversations", help="override workload size"),
        max_turns: int | None = typer.Option(None, "--max-turns", help="cap turns per conversation"),
        mispredict_rate: float | None = typer.Option(
            None,
            "--mispredict-rate",
            help="per-turn: injected misprediction rate (default 0.1, as the paper)",
        ),
        threshold: int | None = typer.Option(None, "--local-prefill-below", help=THRESHOLD_HELP),
        convention: Convention = typer.Option(Convention.HONEST, "--convention", help="honest or artifact"),
        max_batched: int | None = typer.Option(None, "--max-batched-tokens", help=BUDGET_HELP),
        prefill_max_batched: int | None = typer.Option(
            None, "--prefill-max-batched-tokens", help=PREFILL_BUDGET_HELP
        ),
        router_admission: bool = typer.Option(False, "--router-admission", help=ADMISSION_HELP),
        admission_wait: float | None = typer.Option(None, "--admission-wait", help=ADMISSION_WAIT_HELP),
        power_controller: bool = typer.Option(False, "--power-controller", help=POWER_HELP),
        power_budget: float | None = typer.Option(
            None, "--power-budget", help="with --power-controller: fleet cap budget, W (sum of GPUs x cap)"
        ),
        park_w: float | None = typer.Option(
            None,
            "--park-w",
            help="with --power-controller: park decoders in troughs, drawing this many W per "
            "GPU while parked (engine stopped; docs/energy.md)",
        ),
        view_cached: bool = typer.Option(False, "--view-cached-histories", help=VIEW_HELP),
        kv_gap_rule: bool = typer.Option(False, "--kv-gap-rule", help=KV_GAP_HELP),
        host_kv_gb: float | None = typer.Option(None, "--host-kv-gb", help=HOST_KV_HELP),
        energy_window: float = typer.Option(1.0, "--energy-window", help="energy accounting window, seconds"),
        no_standalone: bool = typer.Option(False, "--no-standalone", help="skip slowdowns (faster)"),
        json_out: bool = typer.Option(False, "--json", help="print JSON for scripts"),
        out: Path | None = typer.Option(
            None, "--out", help="directory for conversations.csv and summary.json"
        ),
        db: str | None = typer.Option(
            None,
            "--db",
            help="also write the run (turns, conversations, modelled energy attributions) to "
            "this SQL ledger, e.g. sqlite:///runs.db; read it with `orchestrator report energy --db`",
        ),
        run_id: str | None = typer.Option(
            None, "--run-id", help="ledger run id (default: simulate-<policy>-<time>)"
        ),
    ) -> None:
        """Simulate one policy on a fleet (virtual time) and report latency, SLOs and tokens/J (modelled)."""
        cfg, plan = load_fleet_and_plan(fleet, plan_file)
        pol = policy or cfg.policy
        make_policy(pol, **options_for_policy(pol, mispredict_rate, threshold))  # validate early
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
        if power_budget is not None and (not power_controller or not power_budget > 0):
            raise ConfigError("--power-budget needs --power-controller and a budget > 0 W, e.g. 1000")
        if park_w is not None and (not power_controller or not park_w >= 0):
            raise ConfigError("--park-w needs --power-controller and a draw >= 0 W, e.g. 11")
        if power_controller:
            from orchestrator.core.power import ParkingConfig
            from orchestrator.sim.power import fleet_power_control

            parking = ParkingConfig(parked_w=park_w) if park_w is not None else None
            ctl = fleet_power_control(cfg, budget_w=power_budget, parking=parking)
            sim_opts = replace(sim_opts, power_controller=ctl)
        seed = sim_setup.effective_seed(cfg, seed)
        convs = fleet_workload(cfg, rate, seed, conversations, max_turns)
        rate_label, arrivals = sim_setup.arrivals(cfg, rate, convs)
        plan, layout = sim_setup.plan_or_layout(cfg, plan, layout, rate)
        fitted = sim_setup.fit_policy(pol, cfg, plan, layout)
        plan, layout = fitted.plan, fitted.layout
        is_conserve = sim_setup.policy_key(pol) == "conserve"
        thr = sim_setup.conserve_threshold(plan, threshold) if is_conserve else None
        sa = None if no_standalone else StandaloneCache(reference_tier_model(cfg), sim_opts)
        opts = options_for_policy(pol, mispredict_rate, thr[0] if thr else None)
        kept: dict[str, Any] | None = {} if db or power_controller or kv_gap_rule else None
        with progress_bar(disable=json_out) as prog:  # no bar with --json: stdout carries the JSON only
            task = prog.add_task(f"simulating {pol}", total=len(convs))

            def tick(done: int, total: int) -> None:
                prog.update(task, completed=done)

            summ, rows, insts = run_one(
                cfg,
                plan,
                layout,
                pol,
                convs,
                seed,
                opts,
                sa,
                convention,
                energy_window,
                tick,
                keep=kept,
                plan_rate=rate,
                sim_options=sim_opts,
            )
        doc: dict[str, Any] = {
            "schema_version": JSON_SCHEMA_VERSION,
            "note": "simulated latencies; energy modelled by the tier power model, not measured",
            "policy": pol,
            "policy_options": opts,
            "conserve_threshold": None if thr is None else {"tokens": thr[0], "source": thr[1]},
            "layout_conversion": fitted.note,
            "rate_per_s": rate_label,
            "arrivals": arrivals,
            "seed": seed,
            "instances": [
                {"id": i.instance_id, "tier": i.tier, "role": str(i.role), "tier_model": i.tier_model.name}
                for i in insts
            ],
            "summary": summ.to_dict(),
        }
        if power_controller and kept is not None:
            from orchestrator.sim.power import power_summary

            doc["power_controller"] = power_summary(kept["result"])
        gaps = kept["result"].kv_gaps if kv_gap_rule and kept is not None else None
        if gaps is not None:  # the closed-loop gap rule's record (orchestrator.sim.gaps), modelled
            doc["kv_gaps"] = {k: getattr(gaps, k) for k in gaps.__slots__}
        if db and kept is not None:
            doc["ledger"] = _write_ledger(db, run_id, pol, kept, cfg, insts)
        if out_dir is not None:
            write_rows(out_dir / "conversations.csv", rows)
            (out_dir / "summary.json").write_text(json.dumps(clean_json(doc), indent=2, default=str))
        if json_out:
            doc["conversations"] = rows
            print_json(clean_json(doc))
            return
        lay = ", ".join(f"{i.instance_id} ({i.tier_model.name})" for i in insts)
        console.print(f"[bold]{pol}[/] on {len(insts)} instances: {lay}", highlight=False, soft_wrap=True)
        for line in setup_lines(fitted.note, thr, rate_label, arrivals):
            console.print(line, highlight=False, soft_wrap=True)
        console.print(summary_table([(pol, doc["rate_per_s"], summ)], f"Simulated ({convention} convention)"))
        console.print(
            f"tokens/J counts {TOKENS_COUNTED}; every GPU billed, idle ones included "
            f"(energy modelled, not measured). SLO: slowdown > 5 on TTFET, mean last-turn TBT or E2E vs "
            f"the conversation alone on an idle {reference_tier_model(cfg).name}.",
            style="dim",
        )
        if "power_controller" in doc:
            pc = doc["power_controller"]
            console.print(
                f"power controller (modelled): {pc['steps']} steps every {pc['interval_s']:g} s, "
                f"{pc['changes']} cap changes; time at each cap per pool: "
                + "; ".join(f"{k} " + ", ".join(f"{c} W {s:.0f} s" for c, s in v.items())
                            for k, v in pc["seconds_at_cap"].items()),
                highlight=False,
                soft_wrap=True,
            )  # fmt: skip
            if "parking" in pc:
                parked = ", ".join(f"{k} {v:.0f} s" for k, v in pc["parking"]["seconds_parked"].items())
                console.print(f"parking (modelled): {pc['parking']['changes']} changes; parked: {parked}",
                              highlight=False, soft_wrap=True)  # fmt: skip
        if gaps is not None:
            console.print(
                f"KV across tool gaps (modelled): {gaps.gaps} gaps, {gaps.kept} kept, {gaps.offloaded} "
                f"offloaded, {gaps.dropped} dropped ({gaps.evicted_while_kept} kept but evicted by the LRU); "
                f"restores {gaps.restore_s:.2f} s in all, host copies {gaps.copy_energy_j:.0f} J; "
                f"{gaps.idle_share_released:.1%} of the idle KV-token-seconds released.",
                highlight=False,
                soft_wrap=True,
            )
        if summ.policy_stats:
            ps = summ.policy_stats
            console.print(
                f"per-turn predictor: {ps.get('predictions', 0)} predictions, mean |error| "
                f"{ps.get('mean_abs_error_tokens', 0):.1f} tokens ({ps.get('mean_abs_pct_error', 0):.0%}), "
                f"{ps.get('injected_mispredictions', 0)} injected mispredictions, "
                f"{ps.get('migrations', 0)} migrations."
            )
        if out_dir is not None:
            console.print(f"Wrote {out_dir / 'conversations.csv'} and {out_dir / 'summary.json'}")
        if "ledger" in doc:
            led = doc["ledger"]
            console.print(
                f"Ledger: run {led['run_id']!r} ({led['turns']} turns, {led['attribution_rows']} modelled "
                f"energy rows) in {led['db']}; see `orchestrator report energy --db {led['db']} --by policy`",
                highlight=False,
                soft_wrap=True,
            )


def _write_ledger(
    db: str,
    run_id: str | None,
    policy: str,
    kept: dict[str, Any],
    cfg: FleetConfig,
    insts: Sequence[InstanceSpec],
) -> dict[str, Any]:
    """--db: write the run to the SQL ledger (energy/accounting.py; the same code path serve uses)."""
    from datetime import UTC, datetime

    from energy.accounting import write_simulation
    from energy.ledger import Ledger

    rid = run_id or f"simulate-{policy}-{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}"
    with Ledger(db, run_id=rid, policy=policy) as ledger:
        w = write_simulation(
            ledger,
            kept["result"],
            policy,
            rid,
            tier_models={i.tier_model.name: i.tier_model for i in insts},
            unallocated_idle_w=unallocated_idle_w(cfg, insts),
            metrics=kept["metrics"],
            label="orchestrator simulate",
        )
    return {
        "db": db,
        "run_id": rid,
        "turns": w.turns,
        "attribution_rows": w.attribution_rows,
        "energy_j": w.energy_j,
        "tokens": w.tokens,
        "tokens_per_j": w.tokens_per_j,
        "source": "modelled",
    }
