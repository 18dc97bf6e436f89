"""Energy reports from the ledger: per conversation, tier, policy or engine; table, CSV, JSON and HTML.

``build_report(ledger, by=..., since=..., until=...)`` is the one query path: the CLI
(``orchestrator report energy``) and the API (``GET /v1/reports/energy``) both call it and render the same
:class:`Report`, so they always agree.

Counting rules (stated in every report's ``notes``):
  * tokens = prompt + output tokens of every OK turn (the paper's tokens/J numerator);
  * energy = every attribution row in the window, idle rows included (all GPUs of the deployment);
  * the window selects attribution rows by interval start and conversations by creation time, both in
    [since, until);
  * ``measured_share`` = fraction of the joules that came from hardware meters; the rest is modelled.

Must not import fastapi.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from energy.errors import EnergyError
from energy.estimate import DEFAULT_GRID_G_PER_KWH, co2e_g
from energy.ledger import ConversationFacts, Ledger
from energy.records import AttributionRow, ReportFilter, Source
from energy.report_render import render, render_csv, render_html, render_json, render_table
from energy.report_types import Column, Format, GroupBy, Report, parse_choice, parse_time

__all__ = [
    "Column",
    "Format",
    "GroupBy",
    "Report",
    "build_report",
    "parse_choice",
    "parse_time",
    "power_cap_notes",
    "render",
    "render_csv",
    "render_html",
    "render_json",
    "render_table",
    "row_totals",
]


def _p95(values: Sequence[float]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    k = max(0, math.ceil(0.95 * len(vals)) - 1)  # nearest-rank percentile
    return vals[k]


def _div(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def row_totals(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Tokens, joules, tokens/J, J/token and the joule-weighted measured share over report rows that carry
    ``tokens``, ``joules`` and ``measured_share``: the sums of a report regrouped after it was built (the
    API's per-tenant rows and totals, api/routes_reports.py)."""
    rows = list(rows)
    joules = sum(float(r.get("joules") or 0.0) for r in rows)
    tokens = sum(int(r.get("tokens") or 0) for r in rows)
    measured_j = sum(float(r.get("joules") or 0.0) * float(r.get("measured_share") or 0.0) for r in rows)
    return {
        "tokens": tokens,
        "joules": joules,
        "tokens_per_j": _div(tokens, joules),
        "j_per_token": _div(joules, tokens),
        "measured_share": _div(measured_j, joules),
    }


# ---- building -----------------------------------------------------------------------------------------
@dataclass
class _Acc:
    joules: float = 0.0
    measured_j: float = 0.0
    idle_j: float = 0.0
    prefill_j: float = 0.0  # the prefill part of conversation rows (AttributionRow.prefill_j)
    unsplit_j: float = 0.0  # conversation rows without a phase split (rows written before it existed)
    engines: set[str] = field(default_factory=set)
    tiers: set[str] = field(default_factory=set)
    conversations: set[tuple[str, str]] = field(default_factory=set)

    def add(self, run: str, a: AttributionRow) -> None:
        self.joules += a.joules
        if a.source == Source.MEASURED:
            self.measured_j += a.joules
        if a.conversation_id is None:
            self.idle_j += a.joules
        else:
            self.conversations.add((run, a.conversation_id))
            if a.prefill_j is None:
                self.unsplit_j += a.joules
            else:
                self.prefill_j += a.prefill_j
        self.engines.add(a.engine_id)
        if a.tier:
            self.tiers.add(a.tier)


def power_cap_notes(ledger: Ledger, run_ids: Sequence[str]) -> list[str]:
    """One note per run whose engines were given power caps (ledger power_caps, energy/power.py): which caps
    were applied (read back from NVML), which were modelled only (simulated engines) and which were NOT
    applied, with the reason. Selected by run (none given: all), not by time: caps are set as a run starts."""
    caps = ledger.power_caps(ReportFilter(run_ids=tuple(run_ids)))
    rows = [(run, r) for run, r in caps if r.event == "apply"]
    out = []
    for run in sorted({run for run, _ in rows}):
        parts = []
        for _, r in (x for x in rows if x[0] == run):
            gpu = "" if r.gpu_index is None else f" GPU {r.gpu_index}"
            cap = f"{r.requested_w:g} W" if r.requested_w is not None else "cap"
            if r.status in ("applied", "differs"):
                parts.append(f"{r.engine_id}{gpu} {cap} applied (read back {r.applied_w:g} W)")
            elif r.status == "simulated":
                parts.append(f"{r.engine_id} {cap} modelled (simulated engine)")
            else:
                parts.append(f"{r.engine_id}{gpu} {cap} NOT applied ({r.status})")
        out.append(f"power caps of run {run}: " + "; ".join(parts))
    return out


def build_report(
    ledger: Ledger,
    by: GroupBy | str = GroupBy.CONVERSATION,
    since: datetime | None = None,
    until: datetime | None = None,
    run_ids: Sequence[str] = (),
    timeline_buckets: int = 60,
    grid_g_per_kwh: float = DEFAULT_GRID_G_PER_KWH,
) -> Report:
    by = GroupBy(parse_choice(by, GroupBy, "--by"))
    if since and until and until <= since:
        raise EnergyError(f"--until ({until.isoformat()}) must be after --since ({since.isoformat()})")
    flt = ReportFilter(since, until, tuple(run_ids))
    runs = ledger.runs()
    run_policy = {r.run_id: r.policy or "(none)" for r in runs}
    # simulated and served runs never share a row, a bar or a series (issue 14: `--by policy` merged them)
    run_kind = {r.run_id: str(r.kind) for r in runs}

    def kind(run: str) -> str:
        return run_kind.get(run, "serve")

    attrs = ledger.attributions(flt)
    facts = ledger.conversation_facts(flt)

    def pol(run: str, conv_policy: str | None = None) -> str:
        return conv_policy or run_policy.get(run, "(none)")

    def label(run: str, conv_policy: str | None = None) -> str:  # plots: a policy's simulated runs apart
        p = pol(run, conv_policy)
        return p if kind(run) != "simulate" else f"{p} (simulated)"

    per_conv: dict[tuple[str, str], _Acc] = {}
    per_policy: dict[tuple[str, str], _Acc] = {}
    per_tier: dict[tuple[str, str], _Acc] = {}
    per_engine: dict[tuple[str, str], _Acc] = {}
    engine_tier: dict[tuple[str, str], str] = {}
    total = _Acc()
    for run, a in attrs:
        total.add(run, a)
        per_policy.setdefault((kind(run), pol(run)), _Acc()).add(run, a)
        per_tier.setdefault((kind(run), a.tier or "(unknown)"), _Acc()).add(run, a)
        per_engine.setdefault((run, a.engine_id), _Acc()).add(run, a)
        engine_tier[(run, a.engine_id)] = a.tier or "(unknown)"
        if a.conversation_id is not None:
            per_conv.setdefault((run, a.conversation_id), _Acc()).add(run, a)

    tokens_total = sum(f.tokens for f in facts)
    notes = [
        "tokens = prompt + output tokens of every OK turn; energy = all attribution rows in the window, "
        "idle rows included",
        f"measured share of energy: {_div(total.measured_j, total.joules) or 0.0:.1%} "
        "(the rest is modelled from the tier power model, not measured)",
    ]
    if not attrs:
        notes.append("no attribution rows in this window")
    notes += power_cap_notes(ledger, run_ids)

    cols: list[Column]
    rows: list[dict[str, Any]]
    if by == GroupBy.CONVERSATION:
        cols = [
            Column("run_id", "run"),
            Column("kind", "run kind"),
            Column("conversation_id", "conversation"),
            Column("policy", "policy"),
            Column("turns", "turns"),
            Column("tokens", "tokens"),
            Column("joules", "energy", "J"),
            Column("j_per_token", "J/token", "J"),
            Column("ttfet_s", "TTFET", "s"),
            Column("ttfet_slowdown", "TTFET slowdown", "x"),
            Column("e2e_slowdown", "E2E slowdown", "x"),
            Column("tbt_slowdown", "TBT slowdown", "x"),
            Column("tiers", "tiers"),
            Column("measured_share", "measured share"),
        ]
        rows = []
        for f in facts:
            acc = per_conv.get((f.run_id, f.conversation_id), _Acc())
            rows.append(
                {
                    "run_id": f.run_id,
                    "kind": kind(f.run_id),
                    "conversation_id": f.conversation_id,
                    "policy": pol(f.run_id, f.policy),
                    "turns": f.turns,
                    "tokens": f.tokens,
                    "joules": acc.joules,
                    "j_per_token": _div(acc.joules, f.tokens),
                    "ttfet_s": f.ttfet_s,
                    "ttfet_slowdown": f.ttfet_slowdown,
                    "e2e_slowdown": f.e2e_slowdown,
                    "tbt_slowdown": f.tbt_slowdown,
                    "tiers": tuple(sorted(set(f.tiers) | acc.tiers)),
                    "measured_share": _div(acc.measured_j, acc.joules),
                }
            )
    elif by == GroupBy.POLICY:
        cols = [
            Column("policy", "policy"),
            Column("kind", "run kind"),
            Column("runs", "runs"),
            Column("conversations", "conversations"),
            Column("tokens", "tokens"),
            Column("joules", "energy", "J"),
            Column("idle_j", "idle", "J"),
            Column("tokens_per_j", "tokens/J"),
            Column("j_per_token", "J/token", "J"),
            Column("ttfet_p95_s", "p95 TTFET", "s"),
            Column("ttfet_slowdown_p95", "p95 TTFET slowdown", "x"),
            Column("measured_share", "measured share"),
        ]
        by_pol: dict[tuple[str, str], list[ConversationFacts]] = {}
        for f in facts:
            by_pol.setdefault((kind(f.run_id), pol(f.run_id, f.policy)), []).append(f)
        rows = []
        for k, p in sorted(set(per_policy) | set(by_pol), key=lambda kp: (kp[1], kp[0])):
            acc, fs = per_policy.get((k, p), _Acc()), by_pol.get((k, p), [])
            toks = sum(f.tokens for f in fs)
            rows.append(
                {
                    "policy": p,
                    "kind": k,
                    "runs": len({f.run_id for f in fs} | {r for r, _ in acc.conversations}),
                    "conversations": len(fs),
                    "tokens": toks,
                    "joules": acc.joules,
                    "idle_j": acc.idle_j,
                    "tokens_per_j": _div(toks, acc.joules),
                    "j_per_token": _div(acc.joules, toks),
                    "ttfet_p95_s": _p95([f.ttfet_s for f in fs if f.ttfet_s is not None]),
                    "ttfet_slowdown_p95": _p95(
                        [f.ttfet_slowdown for f in fs if f.ttfet_slowdown is not None]
                    ),
                    "measured_share": _div(acc.measured_j, acc.joules),
                }
            )
    elif by == GroupBy.TIER:
        cols = [
            Column("tier", "tier"),
            Column("kind", "run kind"),
            Column("engines", "engines"),
            Column("conversations", "conversations"),
            Column("joules", "energy", "J"),
            Column("idle_j", "idle", "J"),
            Column("share", "share of total"),
            Column("measured_share", "measured share"),
        ]
        rows = [
            {
                "tier": t,
                "kind": k,
                "engines": len(acc.engines),
                "conversations": len(acc.conversations),
                "joules": acc.joules,
                "idle_j": acc.idle_j,
                "share": _div(acc.joules, total.joules),
                "measured_share": _div(acc.measured_j, acc.joules),
            }
            for (k, t), acc in sorted(per_tier.items(), key=lambda x: (x[0][1], x[0][0]))
        ]
    else:
        cols = [
            Column("run_id", "run"),
            Column("engine_id", "engine"),
            Column("tier", "tier"),
            Column("conversations", "conversations"),
            Column("joules", "energy", "J"),
            Column("idle_j", "idle", "J"),
            Column("attributed_j", "to conversations", "J"),
            Column("measured_share", "measured share"),
        ]
        rows = [
            {
                "run_id": r,
                "engine_id": e,
                "tier": engine_tier[(r, e)],
                "conversations": len(acc.conversations),
                "joules": acc.joules,
                "idle_j": acc.idle_j,
                "attributed_j": acc.joules - acc.idle_j,
                "measured_share": _div(acc.measured_j, acc.joules),
            }
            for (r, e), acc in sorted(per_engine.items())
        ]

    totals = {
        "joules": total.joules,
        "idle_j": total.idle_j,
        "tokens": tokens_total,
        "tokens_per_j": _div(tokens_total, total.joules),
        "conversations": len(facts),
        "measured_share": _div(total.measured_j, total.joules),
        "attribution_rows": len(attrs),
        "co2e_g": co2e_g(total.joules, grid_g_per_kwh),
    }
    notes.append(
        f"carbon: {co2e_g(total.joules, grid_g_per_kwh):.4g} gCO2e at {grid_g_per_kwh:g} gCO2e/kWh"
        + (" (default: 2023 world average, Ember)" if grid_g_per_kwh == DEFAULT_GRID_G_PER_KWH else "")
    )

    # plot data
    conv_j = tuple(
        (label(f.run_id, f.policy), per_conv[(f.run_id, f.conversation_id)].joules)
        for f in facts
        if (f.run_id, f.conversation_id) in per_conv
    )
    timeline, bucket_s = _timeline(
        [(a.interval_start, a.interval_end, _series(a.tier, kind(run)), a.joules) for run, a in attrs],
        timeline_buckets,
    )
    pol_tpj = []
    for k, p in sorted(per_policy, key=lambda kp: (kp[1], kp[0])):
        toks = sum(f.tokens for f in facts if (kind(f.run_id), pol(f.run_id, f.policy)) == (k, p))
        v = _div(toks, per_policy[(k, p)].joules)
        if v is not None:
            pol_tpj.append((p if k != "simulate" else f"{p} (simulated)", v))
    return Report(
        by,
        since,
        until,
        tuple(cols),
        tuple(rows),
        totals,
        tuple(notes),
        conv_j,
        tuple(timeline),
        tuple(pol_tpj),
        timeline_bucket_s=bucket_s,
        policy_phases=tuple(
            (
                p if k != "simulate" else f"{p} (simulated)",
                acc.prefill_j,
                acc.joules - acc.idle_j - acc.prefill_j - acc.unsplit_j,
                0.0,  # KV transfer: not metered or modelled apart; its draw is inside the engines' rows
                acc.idle_j,
                acc.unsplit_j,
            )
            for (k, p), acc in sorted(per_policy.items(), key=lambda x: (x[0][1], x[0][0]))
        ),
        measured_share=_div(total.measured_j, total.joules),
    )


def _series(tier: str | None, run_kind: str) -> str:
    t = tier or "(unknown)"
    return t if run_kind != "simulate" else f"{t} (simulated)"


def _timeline(
    rows: Sequence[tuple[datetime, datetime, str, float]], buckets: int
) -> tuple[list[tuple[datetime, str, float]], float]:
    """(bucket start, series, joules) over equal buckets, and the bucket width (s).

    The width is a whole number of the rows' typical interval (their median length) and each row's joules
    are spread over the buckets it overlaps in proportion to time, so a constant draw plots flat (buckets of
    1.56 s over 1 s intervals made a 2x sawtooth: some buckets held one interval, others two)."""
    if not rows:
        return [], 0.0
    t0 = min(r[0] for r in rows)
    t1 = max(r[1] for r in rows)
    span = max((t1 - t0).total_seconds(), 1e-9)
    lengths = sorted((r[1] - r[0]).total_seconds() for r in rows if r[1] > r[0])
    typical = lengths[len(lengths) // 2] if lengths else span
    width = max(typical * math.ceil(span / max(buckets, 1) / typical - 1e-9), typical)
    acc: dict[tuple[int, str], float] = {}
    for a, b, series, j in rows:
        lo, hi = (a - t0).total_seconds(), (b - t0).total_seconds()
        k = int(lo // width)
        if hi <= lo:
            acc[(k, series)] = acc.get((k, series), 0.0) + j
            continue
        while k * width < hi:
            part = min(hi, (k + 1) * width) - max(lo, k * width)
            if part > 0:
                acc[(k, series)] = acc.get((k, series), 0.0) + j * part / (hi - lo)
            k += 1
    return [(t0 + timedelta(seconds=k * width), s, j) for (k, s), j in sorted(acc.items())], width
