"""The HTML energy report's plots (energy/reports.py renders them): base64 PNGs, each titled with what its
figures are: measured (hardware meters), modelled (the tier power model), or the measured share of a mix.

Plots: energy per conversation (distribution per policy), power by tier over time (W, buckets aligned with
the meter intervals), tokens per joule by policy, and energy by phase (prefill, decode, KV transfer, idle)
per policy side by side. Simulated runs are their own series ("<policy> (simulated)"). Must not import
fastapi.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from energy.reports import Report

PHASES = ("prefill", "decode", "KV transfer", "idle")


def source_label(measured_share: float | None) -> str:
    """'measured', 'modelled', or 'x% measured' for a mix (every plot title carries it)."""
    if measured_share is None:
        return "no data"
    if measured_share >= 1.0 - 1e-12:
        return "measured"
    if measured_share <= 1e-12:
        return "modelled"
    return f"{measured_share:.0%} measured, rest modelled"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(report: Report) -> list[tuple[str, str, str]]:
    """(id, title, base64 PNG) per plot; a plot without data shows a labelled empty frame."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    src = source_label(report.measured_share)
    out = []
    # 1. energy per conversation distribution
    fig, ax = plt.subplots(figsize=(7, 3.6))
    by_pol: dict[str, list[float]] = {}
    for p, j in report.conversation_joules:
        by_pol.setdefault(p, []).append(j)
    if by_pol:
        ax.hist(list(by_pol.values()), bins=30, label=list(by_pol), stacked=False, alpha=0.75)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no conversations with energy in this window", ha="center", transform=ax.transAxes)
    ax.set_xlabel("energy per conversation (J)")
    ax.set_ylabel("conversations")
    ax.set_title(f"Energy per conversation ({src})", fontsize=10)
    out.append(("plot-conversation-energy", f"Energy per conversation ({src})", _png(fig)))
    # 2. power by tier over time
    fig, ax = plt.subplots(figsize=(7, 3.6))
    tiers = sorted({t for _, t, _ in report.tier_timeline})
    times = sorted({t for t, _, _ in report.tier_timeline})
    width = report.timeline_bucket_s or 1.0
    if tiers and times:
        idx = {t: i for i, t in enumerate(times)}
        data = np.zeros((len(tiers), len(times)))
        for t, tier, j in report.tier_timeline:
            data[tiers.index(tier), idx[t]] += j / width
        # matplotlib's date converter takes datetimes; its stubs list only numeric arrays
        ax.stackplot(times, data, labels=tiers, alpha=0.85)  # type: ignore[arg-type]
        ax.legend(fontsize=8, loc="upper left")
        fig.autofmt_xdate()
    else:
        ax.text(0.5, 0.5, "no energy rows in this window", ha="center", transform=ax.transAxes)
    ax.set_ylabel(f"power (W, mean over {width:g} s buckets)")
    ax.set_title(f"Power by tier over time ({src})", fontsize=10)
    out.append(("plot-tier-timeline", f"Power by tier over time ({src})", _png(fig)))
    # 3. tokens per joule per policy
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if report.policy_tokens_per_j:
        names = [p for p, _ in report.policy_tokens_per_j]
        vals = [v for _, v in report.policy_tokens_per_j]
        bars = ax.bar(names, vals, color="#3b7dd8")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no policy with energy in this window", ha="center", transform=ax.transAxes)
    ax.set_ylabel("tokens / J")
    ax.set_title(f"Tokens per joule by policy ({src})", fontsize=10)
    out.append(("plot-policy-tokens-per-j", f"Tokens per joule by policy ({src})", _png(fig)))
    # 4. energy by phase, policies side by side
    fig, ax = plt.subplots(figsize=(7, 3.6))
    rows = report.policy_phases
    if rows:
        x = np.arange(len(rows))
        bar_w = 0.8 / len(PHASES)
        for k, phase in enumerate(PHASES):
            vals = [float(r[1 + k]) for r in rows]
            ax.bar(x + (k - (len(PHASES) - 1) / 2) * bar_w, vals, bar_w, label=phase)
        if any(r[5] > 0 for r in rows):
            ax.bar(x + 0.45, [r[5] for r in rows], bar_w / 2, label="not split (older rows)", color="#999")
        ax.set_xticks(x, [r[0] for r in rows], fontsize=8)
        ax.legend(fontsize=8)
        ax.text(0.01, 0.97, "KV transfer: no separate meter or model; its draw is in the other phases",
                transform=ax.transAxes, fontsize=7, va="top")  # fmt: skip
    else:
        ax.text(0.5, 0.5, "no energy rows in this window", ha="center", transform=ax.transAxes)
    ax.set_ylabel("energy (J)")
    ax.set_title(f"Energy by phase and policy ({src})", fontsize=10)
    out.append(("plot-policy-phases", f"Energy by phase and policy ({src})", _png(fig)))
    return out
