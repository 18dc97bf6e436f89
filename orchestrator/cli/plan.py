"""`orchestrator plan`: size a fleet for a workload (ILP) and print or save the plan.

Thin edge over orchestrator.planner: parses options, prints rich tables or JSON (schema: docs/planning.md),
writes the plan file atomically. Errors are one line with exit code 1 (orchestrator.cli.common).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.panel import Panel
from rich.table import Table

from orchestrator.cli.common import PANEL_WIDTH, console, err_console, fail, handle_errors, print_json
from orchestrator.cli.plan_finite import choose_finite, finite_met, finite_table, sim_progress
from orchestrator.config import FleetConfig, Objective, load_fleet
from orchestrator.finite_run import FiniteChoice
from orchestrator.fleet import Plan, save_plan
from orchestrator.planner import (
    PlanRun,
    best_homogeneous,
    caps_comparison,
    compare_homogeneous,
    make_plan,
    mode_plan,
    mode_text,
    modes_json,
)
from orchestrator.sim_capacity import RateCheck, SimulatedMaxRate, highest_sustained_rate
from orchestrator.verify import Validation, verify
from placement.errors import PlanningError

JSON_SCHEMA_VERSION = 1


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _pool_table(plan: Plan, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("tier", "role", "n", "GPUs", "cap W", "TP", "conv/s", "util", "KV", "batch", "step ms", "W"):
        t.add_column(col, justify="left" if col in ("tier", "role") else "right")
    for p in plan.pools:
        dec = p.role != "prefill"
        t.add_row(
            p.tier,
            p.role[:6] if p.role != "prefill" else "prefill",
            str(p.instances),
            str(p.gpus),
            f"{p.power_cap_w:g}",
            str(p.tp),
            f"{p.arrival_rate_per_s:.3g}",
            f"{p.utilisation:.0%}",
            f"{p.kv_occupancy:.0%}" if dec else "-",
            f"{p.batch:.1f}" if dec else "-",
            f"{p.step_time_ms:.1f}" if dec else "-",
            f"{p.watts:,.0f}",
        )
    return t


def _totals_table(
    plans: list[tuple[str, Plan]],
    verified: dict[str, Validation | None] | None = None,
    finite: FiniteChoice | None = None,
) -> Table:
    t = Table(title="Totals (modelled, not measured)", title_justify="left")
    verified = verified or {}
    t.add_column("")
    for name, _ in plans:
        t.add_column(name, justify="right")
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, f: Any) -> None:
        rows.append((label, [f(p) for _, p in plans]))

    add("GPUs used / available", lambda p: f"{p.predictions.gpus_used} / {p.predictions.gpus_available}")
    add("conversations/s", lambda p: f"{p.predictions.arrival_rate_per_s:.4g}")
    add("watts (allocated)", lambda p: f"{p.predictions.watts_allocated:,.0f}")
    add("watts (unallocated GPUs)", lambda p: f"{p.predictions.watts_unallocated:,.0f}")
    add("watts total", lambda p: f"{p.predictions.watts_total:,.0f}")
    add("tokens/s (prompt+output)", lambda p: f"{p.predictions.tokens_per_s:,.0f}")
    add("tokens/J (modelled)", lambda p: f"{p.predictions.tokens_per_j:.2f}")
    add(
        "p95 TTFET s (slowdown / SLO)",
        lambda p: (
            f"{p.predictions.ttfet_p95_s:.2f} ({p.predictions.ttfet_p95_slowdown:.2f}x / "
            f"{_fmt(p.predictions.slo_ttfet_slowdown)}x)"
        ),
    )
    add(
        "mean TBT ms (slowdown / SLO)",
        lambda p: (
            f"{p.predictions.tbt_mean_ms:.1f} ({p.predictions.tbt_slowdown:.2f}x / "
            f"{_fmt(p.predictions.slo_tbt_slowdown)}x)"
        ),
    )
    if finite is not None:
        fnames = iter([n for n, _ in plans])
        add(
            "SLO met (simulated, finite run)",
            lambda p: finite_met(finite) if next(fnames) == "plan" else "not simulated",
        )
    names = iter([n for n, _ in plans])
    steady = "steady state" if finite is None else "steady, planned rate"
    add(
        f"SLO met (simulated, {steady})",
        lambda p: _slo_met(verified.get(n := next(names)), n == "plan"),
    )
    add(
        "SLO met (modelled prediction)",
        lambda p: "yes" if _predicted_met(p) else "NO",
    )
    add("ConServe local-prefill threshold", lambda p: f"{p.predictions.conserve_threshold_tokens:,} tokens")
    add("$/hour", lambda p: _fmt(p.predictions.cost_per_hour, ",.2f"))
    add("solver / status / s", lambda p: f"{p.solver} / {p.status} / {p.solve_time_s:.2f}")
    for label, vals in rows:
        t.add_row(label, *vals)
    return t


def _verify(cfg: FleetConfig, run: PlanRun, replan: Any, seeds: int) -> tuple[PlanRun, Validation]:
    """The verification loop (orchestrator.verify.verify) with a progress bar on stderr."""
    return sim_progress(
        "verifying the plan in the simulator",
        lambda tick: verify(cfg, run, replan, tuple(range(seeds)), progress=tick),
    )


def _sim_max_rate(cfg: FleetConfig, run: PlanRun, seeds: int, budget_s: float) -> SimulatedMaxRate:
    """--sim-search: bisect the highest rate the plan's instances sustain in simulation (one stderr line per
    simulated rate: the progress, and why a rate misses)."""
    err_console.print(
        f"searching the highest sustained rate in the simulator ({seeds} seed(s) x >= 4,000 conversations "
        f"per rate; budget {budget_s:g} s)",
        highlight=False,
    )

    def tick(c: RateCheck) -> None:
        verdict = "sustained" if c.holds else f"not sustained: {c.why}"
        err_console.print(f"  {c.rate_per_s:.4g} conv/s: {verdict} ({c.wall_s:.1f} s)", highlight=False)

    return highest_sustained_rate(cfg, run, tuple(range(seeds)), time_budget_s=budget_s, progress=tick)


def _sim_max_rate_text(run: PlanRun, sim: SimulatedMaxRate) -> str:
    top = run.plan.predictions.arrival_rate_per_s
    upper = "above the bracket" if sim.upper_per_s == float("inf") else f"{sim.upper_per_s:.4g} is not"
    ratio = f"; modelled / simulated {top / sim.rate_per_s:.3f}" if sim.rate_per_s > 0 else ""
    cut = " (time budget reached: the bracket so far)" if sim.budget_exhausted else ""
    return (
        f"Max rate: modelled {top:.4g} conv/s; simulated {sim.rate_per_s:.4g} conv/s sustained ({upper}; "
        f"{len(sim.seeds)} seed(s) x {sim.conversations} conversations, the SLO in each half of the steady "
        f"window){ratio}{cut}; {sim.wall_s:.0f} s."
    )


def _validation_table(v: Validation) -> Table:
    t = Table(
        title=(
            f"Verified in the simulator: predicted vs simulated ({v.policy}, {len(v.seeds)} seeds x "
            f"{v.conversations} conversations at {v.arrival_rate_per_s:.4g} conv/s; steady state: "
            f"{v.steady.conversations} conversations arriving in [{v.window_s[0]:.0f} s, "
            f"{v.window_s[1]:.0f} s], ramp-up ({v.ramp_up.conversations}) and drain "
            f"({v.drain.conversations}) excluded; both modelled -- the simulator steps the same tier models "
            "with the online policy)"
        ),
        title_justify="left",
    )
    for col in ("metric", "predicted", "simulated", "sim / pred", "note"):
        t.add_column(col, justify="left" if col in ("metric", "note") else "right")
    for r in v.rows:
        ratio = (
            f"{r.simulated / r.predicted:.2f}"
            if r.predicted and r.simulated is not None and r.predicted != 0
            else "-"
        )
        t.add_row(r.metric, _fmt(r.predicted, ".4g"), _fmt(r.simulated, ".4g"), ratio, r.note)
    t.add_row(
        "SLO violations %",
        "-",
        f"{v.slo_violation_pct:.1f}",
        "-",
        f"allowed {v.allowance_pct:g}%; ramp-up {v.ramp_up.slo_violation_pct:.1f}%, drain "
        f"{v.drain.slo_violation_pct:.1f}% (reported, not judged)",
    )
    return t


def _predicted_met(p: Plan) -> bool:
    d = p.predictions
    ok_ttfet = d.slo_ttfet_slowdown is None or d.ttfet_p95_slowdown <= d.slo_ttfet_slowdown + 1e-9
    ok_tbt = d.slo_tbt_slowdown is None or d.tbt_slowdown <= d.slo_tbt_slowdown + 1e-9
    return ok_ttfet and ok_tbt


def _slo_met(v: Validation | None, own: bool = True) -> str:
    if v is None:
        return "not verified (--no-verify)" if own else "not simulated"
    if v.steady.conversations == 0:
        return "NO: no steady state (the fleet does not keep up with the rate), simulated"
    word = "yes" if v.holds else "NO"
    return f"{word}: {v.slo_violation_pct:.1f}% miss (<= {v.allowance_pct:g}% allowed), simulated"


def register(app: typer.Typer) -> None:
    @app.command("plan")
    @handle_errors
    def plan_cmd(
        fleet: Path = typer.Option(..., "--fleet", "-f", help="fleet.yaml (see docs/fleet-yaml.md)"),
        objective: Objective | None = typer.Option(
            None, "--objective", help="energy | gpus | cost (default: file's)"
        ),
        out: Path | None = typer.Option(None, "--out", "-o", help="write the plan here (YAML, atomic)"),
        json_out: bool = typer.Option(False, "--json", help="print JSON (schema in docs/planning.md)"),
        compare: bool = typer.Option(
            False, "--compare-homogeneous", help="also plan each tier alone with the fleet's whole GPU budget"
        ),
        solver: str = typer.Option(
            "auto", "--solver", help="highs | cbc | auto (LPs on HiGHS; MIPs on CBC unless small; measured)"
        ),
        time_limit: float = typer.Option(30.0, "--time-limit", help="seconds per ILP solve"),
        rate: float | None = typer.Option(
            None, "--rate", help="override workload.arrival_rate_per_s (conv/s)"
        ),
        max_rate: bool = typer.Option(
            False, "--max-rate", help="plan for the highest arrival rate the fleet sustains within the SLOs"
        ),
        validate: bool = typer.Option(
            False,
            "--validate",
            help="verify the plan in the simulator (the default; kept for scripts; excludes --no-verify)",
        ),
        no_verify: bool = typer.Option(
            False,
            "--no-verify",
            help="skip the simulator verification loop (faster; figures only modelled; a finite run above "
            "capacity is then planned by the fluid backlog model alone, not chosen by simulating the run)",
        ),
        modes: str = typer.Option(
            "disaggregated,hybrid,colocated",
            "--modes",
            help="serving modes the ILP chooses among (comma-separated subset)",
        ),
        seeds: int = typer.Option(
            3,
            "--seeds",
            help="arrival streams (seeds) the verification simulates (also a finite run's candidates)",
        ),
        sim_search: bool = typer.Option(
            False,
            "--sim-search",
            help="with --max-rate: also bisect the highest rate the plan's instances sustain in simulation",
        ),
        sim_budget: float = typer.Option(300.0, "--sim-budget", help="seconds for --sim-search"),
    ) -> None:
        """Size prefill/decode pools per GPU tier and power cap for a workload and SLOs (PuLP ILP)."""
        if solver.lower() not in ("highs", "cbc", "auto"):
            fail(f"--solver {solver!r} is not known. To fix: use highs, cbc or auto.")
        if time_limit <= 0:
            fail(f"--time-limit must be > 0 seconds, got {time_limit}.")
        if rate is not None and max_rate:
            fail("--rate and --max-rate exclude each other. To fix: pass one of them.")
        if validate and no_verify:
            fail("--validate and --no-verify exclude each other. To fix: pass one of them.")
        if seeds < 1:
            fail(f"--seeds must be >= 1, got {seeds}. To fix: pass --seeds 3.")
        if sim_search and not max_rate:
            fail("--sim-search needs --max-rate. To fix: add --max-rate.")
        if sim_search and no_verify:
            fail("--sim-search and --no-verify exclude each other. To fix: pass one of them.")
        if not sim_budget > 0:
            fail(f"--sim-budget must be > 0 seconds, got {sim_budget}. To fix: pass e.g. --sim-budget 300.")
        cfg = load_fleet(fleet)
        mode_list = tuple(m.strip() for m in modes.split(",") if m.strip())

        def replan(ttfet_factor: float = 1.0, tbt_factor: float = 1.0) -> PlanRun:
            return make_plan(
                cfg,
                objective,
                solver.lower(),
                time_limit,
                str(fleet),
                rate_per_s=rate,
                max_rate=max_rate,
                slo_factors=(ttfet_factor, tbt_factor),
                modes=mode_list,
            )

        run = replan()
        validation: Validation | None = None
        finite: FiniteChoice | None = None
        if not no_verify and run.plan.finite_run is not None:
            # a finite run above capacity: the run on each candidate, then the chosen plan's steady state
            run, finite, validation = choose_finite(cfg, run, rate, seeds, fleet)
        elif not no_verify:
            run, validation = _verify(cfg, run, replan, seeds)
        sim_max = _sim_max_rate(cfg, run, seeds, sim_budget) if sim_search else None
        homog: list[tuple[str, PlanRun | None, str]] = []
        if compare:
            # at the plan's rate (below the requested one for a finite run above capacity)
            at_rate = replace(run.stats, arrival_rate_per_s=run.plan.predictions.arrival_rate_per_s)
            homog = compare_homogeneous(cfg, at_rate, objective, solver.lower(), time_limit)
        caps = caps_comparison(cfg, run, objective, solver.lower(), time_limit)
        if out is not None:
            save_plan(run.plan, out)
        if json_out:
            doc: dict[str, Any] = {"schema_version": JSON_SCHEMA_VERSION, "plan": run.plan.to_dict()}
            doc["workload"] = {
                "conversations": run.stats.conversations,
                "arrival_rate_per_s": run.stats.arrival_rate_per_s,
                "turns_per_conversation_mean": run.stats.turns_per_conversation_mean,
                "turn1_input_tokens_p50": run.stats.turn1_input_tokens_p50,
                "turn1_input_tokens_p95": run.stats.turn1_input_tokens_p95,
                "tokens_per_conversation_mean": run.stats.tokens_per_conversation_mean,
            }
            if compare:
                best = best_homogeneous(homog)
                doc["homogeneous"] = [
                    {"tier": n, "plan": r.plan.to_dict() if r else None, "error": e or None}
                    for n, r, e in homog
                ]
                doc["best_homogeneous"] = best[0] if best else None
            doc["serving_mode"] = run.result.mode
            doc["modes"] = modes_json(run)
            if compare:
                colo = mode_plan(cfg, run, "colocated")
                doc["best_colocated"] = colo.to_dict() if colo else None
            doc["caps_comparison"] = caps
            doc["out"] = str(out) if out else None
            doc["validated"] = validation is not None or finite is not None
            doc["validation"] = None if validation is None else validation.to_dict()
            doc["finite_run_choice"] = None if finite is None else finite.to_dict()
            if sim_max is not None:
                doc["max_rate"] = {
                    "predicted_per_s": run.plan.predictions.arrival_rate_per_s,
                    "simulated": sim_max.to_dict(),
                }
            print_json(doc)
            return
        console.print(
            f"[bold]Plan[/] for {cfg.model_spec().name}, {run.stats.arrival_rate_per_s:.4g} conv/s "
            f"({run.stats.conversations} conversations, {run.stats.turns_per_conversation_mean:.1f} "
            "turns each, "
            f"turn-1 p50 {run.stats.turn1_input_tokens_p50:,.0f} tokens), objective {run.plan.objective}"
        )
        fr = run.plan.finite_run
        if fr is not None:
            console.print(
                Panel(
                    f"The requested {fr.requested_rate_per_s:.4g} conv/s exceeds the steady-state capacity "
                    f"of this plan ({fr.plan_rate_per_s:.4g} conv/s within the SLOs; best split "
                    f"{fr.sustainable_rate_per_s:.4g}) by [bold]{fr.excess_pct:.0f}%[/]. A steady stream at "
                    "this rate is infeasible; this plan is for the FINITE run of "
                    f"{fr.conversations} conversations: arrivals last {fr.arrival_span_s:.0f} s, "
                    f"~{fr.backlog_conversations:.0f} conversations still wait when they stop, the backlog "
                    f"drains in ~{fr.drain_s:.0f} s more (run ~{fr.makespan_s:.0f} s); extra wait mean "
                    f"~{fr.extra_wait_mean_s:.0f} s, p95 ~{fr.extra_wait_p95_s:.0f} s; run p95 TTFET "
                    f"~{fr.ttfet_p95_run_s:.1f} s ({fr.ttfet_p95_run_slowdown:.1f}x standalone). "
                    "Pools and totals below are at the plan's rate. Modelled (fluid backlog), not measured."
                    + (
                        ""
                        if finite is None
                        else f" Simulated finite run ({len(finite.seeds)} seeds): "
                        f"{finite.pick.slo_violation_pct:.1f}% of conversations miss an SLO, "
                        f"{finite.pick.tokens_per_j:.2f} tokens/J (energy modelled); chosen among "
                        f"{len(finite.candidates)} candidate plans (table below)."
                    ),
                    title="OVERLOAD: finite run above steady-state capacity",
                    border_style="bold red",
                    width=min(console.width, PANEL_WIDTH),
                )
            )
        console.print(_pool_table(run.plan, "Pools"))
        plans: list[tuple[str, Plan]] = [("plan", run.plan)]
        if compare:
            best = best_homogeneous(homog)
            for n, r, e in homog:
                if r is None:
                    console.print(f"[yellow]homogeneous {n}:[/] {e}", highlight=False, soft_wrap=True)
            if best is not None:
                console.print(
                    _pool_table(best[1].plan, f"Best single-tier plan: {best[0]} (same GPU budget)")
                )
                plans.append((f"all-{best[0]}", best[1].plan))
            colo = mode_plan(cfg, run, "colocated")
            if colo is not None and run.result.mode != "colocated":
                console.print(_pool_table(colo, "Best colocated plan (same fleet)"))
                plans.append(("colocated", colo))
            elif colo is None:
                console.print("[yellow]colocated:[/] no colocated plan meets the SLOs here (modelled)")
        console.print(f"Serving mode: [bold]{mode_text(run.result)}[/]", highlight=False)
        console.print(_totals_table(plans, {"plan": validation}, finite))
        if finite is not None and not finite.pick.holds:
            console.print(
                Panel(
                    f"{finite_met(finite)}: {finite.sentence()}",
                    title="SLO NOT MET in the simulated finite run",
                    border_style="bold red",
                    width=min(console.width, PANEL_WIDTH),
                ),
                soft_wrap=True,
            )
        elif validation is not None and not validation.holds:
            console.print(
                Panel(
                    validation.status,
                    title="SLO NOT MET in the simulator",
                    border_style="bold red",
                    width=min(console.width, PANEL_WIDTH),
                ),
                soft_wrap=True,
            )
        if compare:
            best = best_homogeneous(homog)
            if best is not None:
                a, b = run.plan.predictions.tokens_per_j, best[1].plan.predictions.tokens_per_j
                verdict = "beats" if a > b * (1 + 1e-9) else "does not beat"
                console.print(
                    f"The plan {verdict} the best single-tier plan ({best[0]}): {a:.2f} vs {b:.2f} tokens/J "
                    f"({(a / b - 1) * 100:+.1f}%, modelled)."
                )
        if caps is not None:
            console.print(
                f"Power caps: with the allowed caps the plan draws {_fmt(caps['watts_total'], ',.0f')} W; "
                f"at TDP only it would draw {_fmt(caps['watts_total_tdp_only'], ',.0f')} W "
                f"({_fmt(caps['watts_saved'], '+,.0f')} W saved; decoders held at TDP would draw "
                f"{_fmt(caps['watts_total_decoders_at_tdp'], ',.0f')} W, so decoder caps save "
                f"{_fmt(caps['watts_saved_by_decoder_caps'], '+,.0f')} W) at "
                f"{run.plan.predictions.arrival_rate_per_s:.4g} conv/s. '-': infeasible without the caps."
            )
        for note in run.plan.notes:
            console.print(f"- {note}", highlight=False)
        if sim_max is not None:
            console.print(_sim_max_rate_text(run, sim_max), highlight=False, soft_wrap=True)
        elif max_rate and validation is not None:
            console.print(
                f"Max rate: modelled. The verification's {validation.conversations}-conversation streams "
                "do not test stability (a transient above capacity can hold the SLO on them); "
                "--sim-search bisects the rate the instances sustain (docs/planning.md, Max rate).",
                style="dim",
                highlight=False,
                soft_wrap=True,
            )
        if finite is not None:
            console.print(finite_table(finite))
        if validation is not None:
            console.print(_validation_table(validation))
        elif fr is not None:
            console.print(
                "Not verified in the simulator (--no-verify): modelled figures only; the finite run is "
                "planned on the split with the most modelled capacity (fluid backlog model). Without "
                "--no-verify the planner simulates the run on candidate plans and keeps the least energy "
                "that holds the SLO.",
                style="dim",
                highlight=False,
                soft_wrap=True,
            )
        else:
            console.print("Not verified in the simulator (--no-verify): modelled figures only.", style="dim")
        if out is not None:
            console.print(f"Plan written to {out}")

    _ = PlanningError  # re-exported for callers that catch planning failures
