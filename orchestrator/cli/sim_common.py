"""What `orchestrator simulate` and `orchestrator compare` share: option helps, one simulated run, the output.

``run_one`` runs one policy on one workload (orchestrator.sim) and scores it (orchestrator.metrics); the
rest turns results into the tables, CSV rows and JSON both commands print. Every figure is simulated or
modelled, never measured; the output says so.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.cli import sim_setup
from orchestrator.cli.common import console
from orchestrator.config import FleetConfig, load_fleet
from orchestrator.errors import ConfigError
from orchestrator.fleet import InstanceSpec, Plan, load_plan
from orchestrator.metrics import (
    Convention,
    SloSpec,
    Summary,
    conversation_metrics,
    conversation_row,
    summarize,
)
from orchestrator.sim.core import SimOptions
from orchestrator.sim.fleet import simulate_fleet, unallocated_idle_w
from orchestrator.sim.standalone import StandaloneCache
from orchestrator.workload import ConversationSpec
from placement.kv_gaps import HostMemory

JSON_SCHEMA_VERSION = 1
DEFAULT_MISPREDICT_RATE = 0.1  # the paper's AMPD emulation injected 10% mispredictions (DESIGN.md s5)


def options_for_policy(policy: str, mispredict_rate: float | None, threshold: int | None) -> dict[str, Any]:
    key = policy.replace("_", "-").lower()
    if key == "per-turn":
        return {"mispredict_rate": DEFAULT_MISPREDICT_RATE if mispredict_rate is None else mispredict_rate}
    if key == "conserve" and threshold is not None:
        return {"local_prefill_below_tokens": threshold}
    return {}


THRESHOLD_HELP = (
    "conserve: turn-1 prompts shorter than this prefill on their decoder (default: the plan's threshold; "
    "off with an explicit --layout)"
)


def setup_lines(
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


BUDGET_HELP = (
    "chunked-prefill token budget per step of decode/colocated engines (vLLM --max-num-batched-tokens; "
    "default 8192; the paper's artifact used 2944)"
)
PREFILL_BUDGET_HELP = "the same for prefill engines (default: --max-batched-tokens; the artifact used 8192)"


VIEW_HELP = (
    "policies' views count the cached histories of conversations still going as used KV, as the paper "
    "tables in docs/paper-reproduction.md were measured (default: only what a live engine reports)"
)
ADMISSION_HELP = (
    "admit conversations through a router-side KV tracker as the paper's artifact did (orchestrator.sim."
    "admission); the admission wait is inside the honest convention's clock, outside the artifact's"
)


ADMISSION_WAIT_HELP = (
    "with --router-admission: refuse a conversation whose turn 1 waited this many seconds for KV room "
    "(serve's 503 after its admission wait; refused ones count as SLO violations); default: no bound"
)


KV_GAP_HELP = (
    "apply the keep / offload / drop rule to KV across tool gaps in the run (orchestrator.sim.gaps): "
    "under KV pressure an idle conversation's KV is offloaded to host memory (--host-kv-gb) or dropped "
    "and re-prefilled"
)
HOST_KV_HELP = "with --kv-gap-rule: each decoder's host-memory tier for offloaded KV, in GB (PCIe 4.0 x16)"


def build_sim_options(
    max_batched: int | None,
    prefill_max_batched: int | None,
    router_admission: bool = False,
    view_cached_histories: bool = False,
    admission_wait: float | None = None,
    kv_gap_rule: bool = False,
    host_kv_gb: float | None = None,
) -> SimOptions:
    pairs = (("--max-batched-tokens", max_batched), ("--prefill-max-batched-tokens", prefill_max_batched))
    for name, v in pairs:
        if v is not None and v < 1:
            raise ConfigError(f"{name} must be >= 1 token, got {v}. To fix: e.g. 2944 (the paper's engines).")
    if admission_wait is not None and not router_admission:
        raise ConfigError(
            "--admission-wait bounds the router-side admission wait. To fix: add --router-admission."
        )
    if admission_wait is not None and admission_wait < 0:
        raise ConfigError(f"--admission-wait must be >= 0 s, got {admission_wait}. To fix: e.g. 30.")
    if host_kv_gb is not None and not kv_gap_rule:
        raise ConfigError("--host-kv-gb is the gap rule's host tier. To fix: add --kv-gap-rule.")
    if host_kv_gb is not None and not host_kv_gb > 0:
        raise ConfigError(f"--host-kv-gb must be > 0 GB, got {host_kv_gb}. To fix: e.g. 256.")
    base = SimOptions()
    return SimOptions(
        kv_gap_rule=kv_gap_rule,
        kv_gap_host=HostMemory(host_kv_gb * 1e9) if host_kv_gb is not None else None,
        max_batched_tokens=max_batched if max_batched is not None else base.max_batched_tokens,
        prefill_max_batched_tokens=prefill_max_batched,
        router_admission=router_admission,
        view_cached_histories=view_cached_histories,
        admission_wait_s=admission_wait,
    )


def fmt_num(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def summary_table(rows: list[tuple[str, float | None, Summary]], title: str) -> Table:
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
            fmt_num(rate, ".3g"),
            fmt_num(s.ttfet_slowdown["p95"]),
            fmt_num(s.tbt_slowdown["p95"]),
            fmt_num(s.e2e_slowdown["p95"]),
            fmt_num(s.slo_violation_pct, ".1f"),
            fmt_num(s.ttfet_s["p95"]),
            fmt_num(s.tbt_mean_ms["mean"], ".1f"),
            fmt_num(s.tokens_per_j),
            fmt_num(s.energy_j / 1e3, ",.1f"),
            str(s.kv_transfers),
            util,
            "/".join(fmt_num(s.admission_wait_s.get(k), ".1f") for k in ("mean", "p95")),
        )
    return t


def progress_bar(disable: bool = False) -> Progress:
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


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def make_out_dir(out: Path | None) -> Path | None:
    if out is None:
        return None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory. To fix: pass a directory path.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def clean_json(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    return obj


def load_fleet_and_plan(fleet: Path, plan_file: Path | None) -> tuple[FleetConfig, Plan | None]:
    cfg = load_fleet(fleet)
    plan = load_plan(plan_file) if plan_file is not None else None
    return cfg, plan


def run_one(
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
