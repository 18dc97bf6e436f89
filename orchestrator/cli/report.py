"""`orchestrator report energy`: per-conversation / tier / policy / engine energy from the SQL ledger.

The same query code as `GET /v1/reports/energy` (energy/reports.py), so the CLI and the API agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from orchestrator.cli.common import console, handle_errors

DEFAULT_DB = "sqlite:///conserve.db"  # orchestrator.config.FleetConfig.database_url's default


def register(app: typer.Typer) -> None:
    report_app = typer.Typer(
        help="Reports from the ledger (energy per conversation, tier, policy, engine).", no_args_is_help=True
    )

    @report_app.command("energy")
    @handle_errors
    def energy(
        db: str = typer.Option(
            DEFAULT_DB,
            "--db",
            help="SQLAlchemy URL of the ledger (sqlite:///f.db, postgresql+psycopg://user@host/db)",
        ),
        since: str | None = typer.Option(None, "--since", help="ISO 8601 start (UTC if no offset)"),
        until: str | None = typer.Option(None, "--until", help="ISO 8601 end, exclusive (UTC if no offset)"),
        by: str = typer.Option("conversation", "--by", help="conversation | tier | policy | engine"),
        fmt: str = typer.Option("table", "--format", help="table | csv | json | html"),
        out: Path | None = typer.Option(None, "--out", help="write to this file instead of stdout"),
        run: list[str] = typer.Option([], "--run", help="only these run ids (repeatable; default: all)"),
        as_json: bool = typer.Option(False, "--json", help="shorthand for --format json"),
        grid: float = typer.Option(
            480.0,
            "--grid-g-per-kwh",
            min=0,
            help="grid carbon intensity for the gCO2e figure (default: "
            "2023 world average, Ember; as fleet.yaml grid_carbon_g_per_kwh)",
        ),
    ) -> None:
        """Energy report: joules, J/token, tokens, TTFET and slowdowns, tiers, measured vs modelled share."""
        from energy.ledger import Ledger
        from energy.reports import (
            Format,
            GroupBy,
            build_report,
            parse_choice,
            parse_time,
            render,
            render_table,
        )

        group = parse_choice(by, GroupBy, "--by")
        form = Format.JSON if as_json else parse_choice(fmt, Format, "--format")
        t0, t1 = parse_time(since, "--since"), parse_time(until, "--until")
        _check_sqlite_exists(db)
        with Ledger(db) as ledger:
            if ledger.revision() is None:
                from energy.errors import EnergyError

                raise EnergyError(
                    f"{db} holds no ConServe ledger (no schema). To fix: point --db at the "
                    "database `orchestrator serve` or `orchestrator simulate --db` wrote"
                )
            report = build_report(ledger, group, t0, t1, run, grid_g_per_kwh=grid)
        if form == Format.TABLE and out is None:
            # piped output gets a wide table rather than ellipsised numbers; a terminal keeps its width
            target = console if console.is_terminal else Console(width=240)
            target.print(render_table(report))
            return
        text = render(report, form)
        if out is not None:
            out.write_text(text)
            console.print(f"wrote {form} report ({len(report.rows)} rows) to {out}", highlight=False)
        else:
            sys.stdout.write(text)

    app.add_typer(report_app, name="report")


def _check_sqlite_exists(url: str) -> None:
    """A report on a missing SQLite file would silently create an empty one; refuse instead."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from energy.errors import EnergyError

    try:
        u = make_url(url)
    except ArgumentError:
        return  # Ledger() reports the bad URL
    if (
        u.get_backend_name() == "sqlite"
        and u.database
        and u.database != ":memory:"
        and not Path(u.database).exists()
    ):
        raise EnergyError(
            f"ledger file {u.database!r} does not exist. To fix: pass --db with the URL that "
            "`orchestrator serve` or `orchestrator simulate --db` wrote"
        )
