"""Simulated and served runs in one ledger (issue 14 items 1.5 and 1.7): simulated runs carry real timestamps
and their own kind, every report keeps them apart, and the timeline's buckets follow the intervals (a constant
draw plots flat, not as a 2x sawtooth)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from energy.accounting import write_simulation
from energy.ledger import Ledger
from energy.records import AttributionRow, RunInfo, RunKind, Source, TurnRecord
from energy.reports import GroupBy, build_report
from orchestrator.fleet import InstanceSpec
from orchestrator.sim.core import run_simulation
from orchestrator.workload import ConversationSpec, TurnSpec
from placement.base import Role
from placement.policies import make_policy
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel


def _simulate_into(url: str) -> None:
    tm = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    insts = [InstanceSpec("p0", "a40", Role.PREFILL, tm), InstanceSpec("d0", "a40", Role.DECODE, tm)]
    convs = [
        ConversationSpec(f"c{i}", 0.3 * i, (TurnSpec(2000, 20), TurnSpec(50, 20, 0.2))) for i in range(4)
    ]
    res = run_simulation(insts, convs, make_policy("conserve"), seed=0, energy_window_s=1.0)
    with Ledger(url) as lg:
        write_simulation(lg, res, "conserve", "sim-1")


def _serve_rows(url: str, t0: datetime, seconds: int, watts: float) -> None:
    with Ledger(url, run_id="live-1", policy="conserve", kind=RunKind.SERVE) as lg:
        lg.upgrade()
        lg.start_run(RunInfo("live-1", RunKind.SERVE, "conserve", started_at=t0))
        lg.record_turns(
            [TurnRecord("c0", 1, "r1", "d0", t0, t0, t0 + timedelta(seconds=1), 100, 10, "stop", True)]
        )
        lg.record_attributions(
            AttributionRow(t0 + timedelta(seconds=s), t0 + timedelta(seconds=s + 1), "d0",
                           None, None, watts, 1.0, Source.MEASURED, "a40")
            for s in range(seconds)
        )  # fmt: skip


def test_simulated_runs_have_real_timestamps_and_their_own_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    before = datetime.now(UTC)
    _simulate_into(url)
    _serve_rows(url, before, 10, 100.0)
    with Ledger(url) as lg:
        sim = next(r for r in lg.runs() if r.run_id == "sim-1")
        assert sim.kind == RunKind.SIMULATE
        assert abs((sim.started_at - before).total_seconds()) < 60  # not dated in 2000
        rep = build_report(lg, GroupBy.POLICY)
        kinds = sorted((r["policy"], r["kind"]) for r in rep.rows)
        assert kinds == [("conserve", "serve"), ("conserve", "simulate")]
        tiers = build_report(lg, GroupBy.TIER)
        assert {r["kind"] for r in tiers.rows} == {"serve", "simulate"}
        series = {s for _, s, _ in tiers.tier_timeline}
        assert "a40" in series and any(s.endswith(" (simulated)") for s in series)
        assert any("(simulated)" in p for p, _ in rep.policy_tokens_per_j)


@pytest.mark.parametrize("buckets", [60, 7, 1000])
def test_timeline_of_a_constant_draw_is_flat(tmp_path: Path, buckets: int) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    _serve_rows(url, t0, 94, 250.0)  # 250 W for 94 one-second intervals
    with Ledger(url) as lg:
        rep = build_report(lg, GroupBy.TIER, timeline_buckets=buckets)
    width = rep.timeline_bucket_s
    assert width >= 1.0 and width == pytest.approx(round(width))  # whole intervals per bucket
    watts = [
        j / width
        for t, _, j in rep.tier_timeline
        if t + timedelta(seconds=width) <= t0 + timedelta(seconds=94)
    ]
    assert watts and max(watts) == pytest.approx(250.0) and min(watts) == pytest.approx(250.0)
