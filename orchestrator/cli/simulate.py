"""`orchestrator simulate` and `orchestrator compare`: run policies on a fleet in the simulator.

Thin edge over orchestrator.sim and orchestrator.metrics: parses options, shows a progress bar and tables,
writes per-conversation CSV/JSON and PNG plots (matplotlib, Agg). Errors are one line with exit code 1.
Every latency and energy figure printed here is simulated/modelled, not measured; the output says so.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.cli import sim_setup
from orchestrator.cli.common import console, fail, handle_errors, print_json
from orchestrator.cli.sim_setup import colocated_layout
from orchestrator.config import FleetConfig, load_fleet
from orchestrator.errors import ConfigError, SimulationError
from orchestrator.fleet import InstanceSpec, Plan, load_plan
from orchestrator.metrics import (
    TOKENS_COUNTED,
    Convention,
    SloSpec,
    Summary,
    conversation_metrics,
    conversation_row,
    summarize,
)
from orchestrator.sim.core import SimOptions
from orchestrator.sim.fleet import (
    build_instances,
    fleet_workload,
    reference_tier_model,
    simulate_fleet,
    unallocated_idle_w,
)
from orchestrator.sim.standalone import StandaloneCache
from orchestrator.workload import ConversationSpec
from placement.policies import POLICY_NAMES, make_policy

JSON_SCHEMA_VERSION = 1
DEFAULT_MISPREDICT_RATE = 0.1  # the paper's AMPD emulation injected 10% mispredictions (DESIGN.md s5)


def _policy_options(policy: str, mispredict_rate: float | None, threshold: int | None) -> dict[str, Any]:
    key = policy.replace("_", "-").lower()
    if key == "per-turn":
        return {"mispredict_rate": DEFAULT_MISPREDICT_RATE if mispredict_rate is None else mispredict_rate}
    if key == "conserve" and threshold is not None:
        return {"local_prefill_below_tokens": threshold}
    return {}


_THRESHOLD_HELP = (
    "conserve: turn-1 prompts shorter than this prefill on their decoder (default: the plan's threshold; "
    "off with an explicit --layout)"
)


def _setup_lines(
    note: str | None, thr: tuple[int, str] | None, rate: float | None, arrivals: str
) -> list[str]:
    """What simulate/compare decided before running: layout conversion, threshold, arrivals."""
    lines = [f"Note: {note}."] if note else []
    if thr is not None:
        lines.append(sim_setup.threshold_line(*thr) + ".")
    if arrivals == sim_setup.TRACE_ARRIVALS:
        shown = "-" if rate is None else f"{rate:.3g} conv/s observed"
        lines.append(
            f"Arrivals: the trace's own timestamps ({shown}); --rate draws Poisson arrivals instead."
        )
    return lines


_BUDGET_HELP = (
    "chunked-prefill token budget per step of decode/colocated engines (vLLM --max-num-batched-tokens; "
    "default 8192; the paper's artifact used 2944)"
)
_PREFILL_BUDGET_HELP = "the same for prefill engines (default: --max-batched-tokens; the artifact used 8192)"


_ADMISSION_HELP = (
    "admit conversations through a router-side KV tracker as the paper's artifact did (orchestrator.sim."
    "admission); the admission wait is inside the honest convention's clock, outside the artifact's"
)


def _sim_options(
    max_batched: int | None, prefill_max_batched: int | None, router_admission: bool = False
) -> SimOptions:
    pairs = (("--max-batched-tokens", max_batched), ("--prefill-max-batched-tokens", prefill_max_batched))
    for name, v in pairs:
        if v is not None and v < 1:
            raise ConfigError(f"{name} must be >= 1 token, got {v}. To fix: e.g. 2944 (the paper's engines).")
    base = SimOptions()
    return SimOptions(
        max_batched_tokens=max_batched if max_batched is not None else base.max_batched_tokens,
        prefill_max_batched_tokens=prefill_max_batched,
        router_admission=router_admission,
    )


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _summary_table(rows: list[tuple[str, float | None, Summary]], title: str) -> Table:
    t = Table(
        title=title,
        title_justify="left",
        caption="x: p95 slowdown; TTFET s: p95; TBT ms: mean last turn; admit s: router-side admission "
        "wait, mean/p95 (--router-admission)",
    )
    cols = (
        "policy",
        "rate",
        "TTFETx",
        "TBTx",
        "E2Ex",
        "viol%",
        "TTFET s",
        "TBT ms",
        "tok/J",
        "kJ",
        "xfers",
        "util",
        "admit s",
    )
    for c in cols:
        t.add_column(c, justify="left" if c == "policy" else "right", no_wrap=c == "policy")
    for label, rate, s in rows:
        u = s.utilisation_by_role
        util = "/".join(f"{u[r]:.0%}" for r in ("prefill", "decode", "colocated") if r in u)
        t.add_row(
            label,
            _fmt(rate, ".3g"),
            _fmt(s.ttfet_slowdown["p95"]),
            _fmt(s.tbt_slowdown["p95"]),
            _fmt(s.e2e_slowdown["p95"]),
            _fmt(s.slo_violation_pct, ".1f"),
            _fmt(s.ttfet_s["p95"]),
            _fmt(s.tbt_mean_ms["mean"], ".1f"),
            _fmt(s.tokens_per_j),
            _fmt(s.energy_j / 1e3, ",.1f"),
            str(s.kv_transfers),
            util,
            f"{_fmt(s.admission_wait_s.get('mean'), '.1f')}/{_fmt(s.admission_wait_s.get('p95'), '.1f')}",
        )
    return t


def _progress(disable: bool = False) -> Progress:
    """The progress bar of simulate and compare: description, bar, done/total, elapsed; cleared when done."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=disable,
    )


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _out_dir(out: Path | None) -> Path | None:
    if out is None:
        return None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory. To fix: pass a directory path.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _load(fleet: Path, plan_file: Path | None) -> tuple[FleetConfig, Plan | None]:
    cfg = load_fleet(fleet)
    plan = load_plan(plan_file) if plan_file is not None else None
    return cfg, plan


def _run_one(
    cfg: FleetConfig,
    plan: Plan | None,
    layout: str | None,
    policy: str,
    convs: list[ConversationSpec],
    seed: int,
    opts: dict[str, Any],
    standalone: StandaloneCache | None,
    convention: Convention,
    energy_window_s: float | None,
    progress: Any = None,
    keep: dict[str, Any] | None = None,
    plan_rate: float | None = None,
    sim_options: SimOptions | None = None,
) -> tuple[Summary, list[dict[str, Any]], list[InstanceSpec]]:
    res, insts = simulate_fleet(
        cfg,
        plan,
        policy,
        None,
        layout=layout,
        seed=seed,
        conversations=convs,
        policy_options=opts,
        energy_window_s=energy_window_s,
        progress=progress,
        plan_rate=plan_rate,
        options=sim_options,
    )
    mets = conversation_metrics(res, convs, standalone, SloSpec.from_config(cfg.slo), convention)
    summ = summarize(res, mets, convention, unallocated_idle_w(cfg, insts))
    if keep is not None:  # the raw result and metrics, for --db (energy/accounting.py writes the ledger)
        keep.update(result=res, metrics=mets)
    return summ, [conversation_row(m) for m in mets], insts


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
        threshold: int | None = typer.Option(None, "--local-prefill-below", help=_THRESHOLD_HELP),
        convention: Convention = typer.Option(Convention.HONEST, "--convention", help="honest or artifact"),
        max_batched: int | None = typer.Option(None, "--max-batched-tokens", help=_BUDGET_HELP),
        prefill_max_batched: int | None = typer.Option(
            None, "--prefill-max-batched-tokens", help=_PREFILL_BUDGET_HELP
        ),
        router_admission: bool = typer.Option(False, "--router-admission", help=_ADMISSION_HELP),
        power_controller: bool = typer.Option(False, "--power-controller", help=_POWER_HELP),
        power_budget: float | None = typer.Option(
            None, "--power-budget", help="with --power-controller: fleet cap budget, W (sum of GPUs x cap)"
        ),
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
        cfg, plan = _load(fleet, plan_file)
        pol = policy or cfg.policy
        make_policy(pol, **_policy_options(pol, mispredict_rate, threshold))  # validate early
        out_dir = _out_dir(out)
        sim_opts = _sim_options(max_batched, prefill_max_batched, router_admission)
        if power_budget is not None and (not power_controller or not power_budget > 0):
            raise ConfigError("--power-budget needs --power-controller and a budget > 0 W, e.g. 1000")
        if power_controller:
            from orchestrator.sim.power import fleet_power_control

            sim_opts = replace(sim_opts, power_controller=fleet_power_control(cfg, budget_w=power_budget))
        seed = sim_setup.effective_seed(cfg, seed)
        convs = fleet_workload(cfg, rate, seed, conversations, max_turns)
        rate_label, arrivals = sim_setup.arrivals(cfg, rate, convs)
        plan, layout = sim_setup.plan_or_layout(cfg, plan, layout, rate)
        fitted = sim_setup.fit_policy(pol, cfg, plan, layout)
        plan, layout = fitted.plan, fitted.layout
        is_conserve = sim_setup.policy_key(pol) == "conserve"
        thr = sim_setup.conserve_threshold(plan, threshold) if is_conserve else None
        sa = None if no_standalone else StandaloneCache(reference_tier_model(cfg), sim_opts)
        opts = _policy_options(pol, mispredict_rate, thr[0] if thr else None)
        kept: dict[str, Any] | None = {} if db or power_controller else None
        with _progress(disable=json_out) as prog:  # no bar with --json: stdout carries the JSON only
            task = prog.add_task(f"simulating {pol}", total=len(convs))

            def tick(done: int, total: int) -> None:
                prog.update(task, completed=done)

            summ, rows, insts = _run_one(
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
        doc = {
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
        if db and kept is not None:
            doc["ledger"] = _write_ledger(db, run_id, pol, kept, cfg, insts)
        if out_dir is not None:
            _write_rows(out_dir / "conversations.csv", rows)
            (out_dir / "summary.json").write_text(json.dumps(_clean(doc), indent=2, default=str))
        if json_out:
            doc["conversations"] = rows
            print_json(_clean(doc))
            return
        lay = ", ".join(f"{i.instance_id} ({i.tier_model.name})" for i in insts)
        console.print(f"[bold]{pol}[/] on {len(insts)} instances: {lay}", highlight=False, soft_wrap=True)
        for line in _setup_lines(fitted.note, thr, rate_label, arrivals):
            console.print(line, highlight=False, soft_wrap=True)
        console.print(
            _summary_table([(pol, doc["rate_per_s"], summ)], f"Simulated ({convention} convention)")
        )
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
        threshold: int | None = typer.Option(None, "--local-prefill-below", help=_THRESHOLD_HELP),
        convention: Convention = typer.Option(Convention.HONEST, "--convention"),
        max_batched: int | None = typer.Option(None, "--max-batched-tokens", help=_BUDGET_HELP),
        prefill_max_batched: int | None = typer.Option(
            None, "--prefill-max-batched-tokens", help=_PREFILL_BUDGET_HELP
        ),
        router_admission: bool = typer.Option(False, "--router-admission", help=_ADMISSION_HELP),
        power_controller: bool = typer.Option(
            False, "--power-controller", help="also run every policy under the power controller (+power)"
        ),
        json_out: bool = typer.Option(False, "--json"),
        out: Path | None = typer.Option(None, "--out", help="directory for CSV/JSON rows and PNG plots"),
    ) -> None:
        """Compare policies across arrival rates (and decoder power caps) in the simulator."""
        cfg, plan = _load(fleet, plan_file)
        seed = sim_setup.effective_seed(cfg, seed)
        pols = [p.strip() for p in policies.split(",") if p.strip()]
        for p in pols:
            make_policy(p, **_policy_options(p, mispredict_rate, threshold))
        try:
            rate_list = [float(r) for r in rates.split(",") if r.strip()] if rates else None
            caps = [float(c) for c in decode_caps.split(",") if c.strip()] if decode_caps else []
        except ValueError:
            fail("--rates and --decode-caps take comma-separated numbers, e.g. --rates 0.5,1,1.634")
            return
        if rate_list is not None and any(not r > 0 for r in rate_list):
            fail("--rates must be > 0 conversations/s")
        out_dir = _out_dir(out)
        sim_opts = _sim_options(max_batched, prefill_max_batched, router_admission)
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
        with _progress(disable=json_out) as prog:
            task = prog.add_task("simulating", total=total)
            for rate, how, convs in workloads:
                for label, pol, lay, pl in configs:
                    shown = "trace" if rate is None else f"{rate:.3g} conv/s"
                    prog.update(task, description=f"{label} @ {shown}")
                    thr_tokens = thr[0] if pol == "conserve" else None
                    summ, rows, _ = _run_one(
                        cfg,
                        pl,
                        lay,
                        pol,
                        convs,
                        seed,
                        _policy_options(pol, mispredict_rate, thr_tokens),
                        sa,
                        convention,
                        1.0 if out_dir is not None else None,
                        sim_options=ctl_opts if label.endswith("+power") else sim_opts,
                    )
                    table_rows.append((label, rate, summ))
                    results.append(
                        {
                            "config": label,
                            "policy": pol,
                            "rate_per_s": rate,
                            "arrivals": how,
                            "summary": summ.to_dict(),
                        }
                    )
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
            _write_rows(out_dir / "conversations.csv", all_rows)
            (out_dir / "compare.json").write_text(json.dumps(_clean(doc), indent=2, default=str))
            _plots(out_dir, table_rows)
        if json_out:
            print_json(_clean(doc))
            return
        console.print(_summary_table(table_rows, f"Policies x rates (simulated, {convention} convention)"))
        has_conserve = doc["conserve_threshold"] is not None
        for line in _setup_lines(note, thr if has_conserve else None, workloads[0][0], arrivals):
            console.print(line, highlight=False, soft_wrap=True)
        console.print(
            f"x = slowdown vs the conversation alone on an idle {reference_tier_model(cfg).name}; tokens/J "
            f"counts {TOKENS_COUNTED}, every GPU billed (modelled energy).",
            style="dim",
        )
        if out_dir is not None:
            console.print(f"Wrote {out_dir}/conversations.csv, compare.json and PNG plots")


_POWER_HELP = (
    "run the online power controller (placement/power.py): every 5 virtual seconds it moves each pool's "
    "cap within its tier's power_caps_w; energy is modelled at the cap in force"
)


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
            pts = [(r[1], getattr(r[2], metric)["p95"]) for r in rows if r[0] == lab]
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
