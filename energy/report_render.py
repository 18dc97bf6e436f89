"""An energy report rendered: table (rich), CSV, JSON and one self-contained HTML page with its plots.

The CLI (``orchestrator report energy``) and the API (``GET /v1/reports/energy``) render the same
:class:`energy.report_types.Report` with these functions.
Must not import fastapi.
"""

from __future__ import annotations

import csv
import html
import io
import json
import string
from importlib import resources
from typing import Any

from energy.report_plots import plots
from energy.report_types import Format, Report, parse_choice


# ---- rendering ----------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        return (
            f"{v:.4g}"
            if a < 1e-3 or a >= 1e6
            else f"{v:,.4f}".rstrip("0").rstrip(".")
            if a < 10
            else f"{v:,.1f}"
        )
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v)
    return str(v)


def render_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([c.key for c in report.columns])
    for r in report.rows:
        w.writerow(
            [
                ""
                if r.get(c.key) is None
                else (";".join(r[c.key]) if isinstance(r.get(c.key), tuple) else r[c.key])
                for c in report.columns
            ]
        )
    return buf.getvalue()


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, default=str) + "\n"


def render_table(report: Report) -> Any:
    """A rich Table (the CLI prints it)."""
    from rich.table import Table

    title = (
        f"energy by {report.by}"
        + (f" since {report.since:%Y-%m-%d %H:%M:%S}" if report.since else "")
        + (f" until {report.until:%Y-%m-%d %H:%M:%S}" if report.until else "")
    )
    caption = " | ".join(report.notes)
    t = Table(title=title, caption=caption)
    for c in report.columns:
        t.add_column(
            f"{c.title} ({c.unit})" if c.unit else c.title,
            justify="left"
            if c.key in ("run_id", "conversation_id", "policy", "tier", "engine_id", "tiers")
            else "right",
        )
    for r in report.rows:
        t.add_row(*[_fmt(r.get(c.key)) for c in report.columns])
    tot = report.totals
    t.caption = (
        caption + f" | total {_fmt(tot['joules'])} J, {tot['tokens']} tokens, "
        f"{_fmt(tot['tokens_per_j'])} tokens/J"
    )
    return t


def render_html(report: Report, max_rows: int = 500) -> str:
    """One self-contained HTML page (inline CSS, plots as inline base64 PNG; no external resources)."""
    esc = html.escape
    head = "".join(
        f"<th>{esc(c.title)}{' (' + esc(c.unit) + ')' if c.unit else ''}</th>" for c in report.columns
    )
    body_rows = []
    for r in report.rows[:max_rows]:
        body_rows.append(
            "<tr>" + "".join(f"<td>{esc(_fmt(r.get(c.key)))}</td>" for c in report.columns) + "</tr>"
        )
    more = (
        f"<p class='note'>showing {max_rows} of {len(report.rows)} rows; use --format csv for all</p>"
        if len(report.rows) > max_rows
        else ""
    )
    figs = "".join(
        f"<figure><img id='{pid}' alt='{esc(title)}' src='data:image/png;base64,{b64}'>"
        f"<figcaption>{esc(title)}</figcaption></figure>"
        for pid, title, b64 in plots(report)
    )
    tot = report.totals
    window = (
        f"{report.since.isoformat() if report.since else 'start'} to "
        f"{report.until.isoformat() if report.until else 'now'}"
    )
    notes = "".join(f"<li>{esc(n)}</li>" for n in report.notes)
    return _template().substitute(
        by=esc(str(report.by)),
        window=esc(window),
        generated=esc(report.generated_at.isoformat(timespec="seconds")),
        energy=esc(_fmt(tot["joules"])),
        tokens=tot["tokens"],
        tokens_per_j=esc(_fmt(tot["tokens_per_j"])),
        conversations=tot["conversations"],
        measured_share="-" if tot["measured_share"] is None else f"{tot['measured_share']:.0%}",
        notes=notes,
        figures=figs,
        head=head,
        rows="".join(body_rows),
        more=more,
    )


def _template() -> string.Template:
    """energy/templates/report.html: a string.Template with $placeholders (self-contained: inline CSS)."""
    text = resources.files("energy.templates").joinpath("report.html").read_text(encoding="utf-8")
    return string.Template(text)


def render(report: Report, fmt: Format | str) -> str:
    fmt = parse_choice(fmt, Format, "--format") if isinstance(fmt, str) else fmt
    if fmt == Format.CSV:
        return render_csv(report)
    if fmt == Format.JSON:
        return render_json(report)
    if fmt == Format.HTML:
        return render_html(report)
    from rich.console import Console

    console = Console(record=True, width=200, file=io.StringIO())
    console.print(render_table(report))
    return console.export_text()
