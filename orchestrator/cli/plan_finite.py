"""`orchestrator plan` for a finite run above capacity: the candidate plans simulated on the run (progress
bar, table, the totals row). The choice itself is orchestrator.finite_run's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.cli.common import err_console
from orchestrator.config import FleetConfig
from orchestrator.finite_run import FiniteChoice, choose, steady_check
from orchestrator.planner import PlanRun, finite_candidates
from orchestrator.verify import Validation

T = TypeVar("T")


def choose_finite(
    cfg: FleetConfig, run: PlanRun, rate: float | None, seeds: int, fleet: Path
) -> tuple[PlanRun, FiniteChoice, Validation]:
    """A finite run above capacity: simulate the run on every candidate plan and keep the least energy that
    holds (orchestrator.finite_run), then the chosen plan's steady state at its planned rate; progress bars
    on stderr."""
    cands = finite_candidates(cfg, run, fleet_file=str(fleet))
    chosen, choice = sim_progress(
        f"simulating the finite run on {len(cands)} candidate plans",
        lambda tick: choose(cfg, cands, rate, tuple(range(seeds)), progress=tick),
    )
    v = sim_progress(
        "verifying the chosen plan's steady state in the simulator",
        lambda tick: steady_check(cfg, chosen, tuple(range(seeds)), progress=tick),
    )
    return chosen, choice, v


def sim_progress(text: str, job: Callable[[Callable[[int, int], None]], T]) -> T:
    with Progress(
        TextColumn(text),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("sim", total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return job(tick)


def finite_met(c: FiniteChoice) -> str:
    p = c.pick
    word = "yes" if p.holds else "NO"
    return f"{word}: {p.slo_violation_pct:.1f}% of the run miss (<= {c.allowance_pct:g}% allowed), simulated"


def finite_table(c: FiniteChoice) -> Table:
    lam = c.requested_rate_per_s
    rate = "its trace timestamps" if lam is None else f"{lam:.4g} conv/s"
    t = Table(
        title=(
            f"Finite run simulated on each candidate plan ({c.conversations} conversations at {rate}, seeds "
            f"{', '.join(str(s) for s in c.seeds)}; every conversation counted; allowed {c.allowance_pct:g}% "
            f"miss). Rule: {c.rule}. Planned rate and watts modelled; violations and tokens/J simulated "
            "(energy from the tier power model)"
        ),
        title_justify="left",
    )
    cols = ("candidate", "planned conv/s", "W (modelled)", "viol. % (per seed)", "tokens/J (per seed)", "")
    for col in cols:
        t.add_column(col, justify="left" if col in ("candidate", "") else "right")
    for i, s in enumerate(c.candidates):
        mark = "chosen" if i == c.chosen else ("holds" if s.holds else "misses")
        if s.fraction is None:
            mark += ", fluid model's pick"
        t.add_row(
            s.label if s.fraction is None else f"{s.label} ({s.fraction:g} x {s.mode} max)",
            f"{s.planned_rate_per_s:.4g}",
            f"{s.watts_total:,.0f}",
            f"{s.slo_violation_pct:.1f} ({' / '.join(f'{r.slo_violation_pct:.1f}' for r in s.runs)})",
            f"{s.tokens_per_j:.2f} ({' / '.join(f'{r.tokens_per_j:.2f}' for r in s.runs)})",
            mark,
        )
    return t
