"""Energy by phase (issue 14 item 5): attribution rows carry their prefill part, the report splits each
policy's energy into prefill, decode, KV transfer and idle (summing to its energy), and every plot says
whether its figures are measured or modelled."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from energy.accounting import write_simulation
from energy.attribution import EngineInterval, PhaseWeights, Work, attribute
from energy.ledger import Ledger
from energy.records import Source
from energy.report_plots import plots, source_label
from energy.reports import GroupBy, build_report
from orchestrator.fleet import InstanceSpec
from orchestrator.sim.core import run_simulation
from orchestrator.workload import ConversationSpec, TurnSpec
from placement.base import Role
from placement.policies import make_policy
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_rows_carry_their_prefill_part() -> None:
    iv = EngineInterval(
        "e", T0, T0 + timedelta(seconds=1), 100.0, 20.0,
        (Work("a", 1, prefill_tokens=10, decode_tokens=10), Work("b", 1, decode_tokens=30)),
        Source.MEASURED, weights=PhaseWeights(3.0, 1.0),
    )  # fmt: skip
    rows = {r.conversation_id: r for r in attribute(iv)}
    a, b = rows["a"], rows["b"]
    assert a.joules == pytest.approx(80 * 40 / 70) and a.prefill_j == pytest.approx(a.joules * 30 / 40)
    assert b.prefill_j == 0.0 and rows[None].prefill_j is None


def test_report_splits_energy_by_phase_and_labels_plots(tmp_path: Path) -> None:
    tm = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    insts = [InstanceSpec("p0", "a40", Role.PREFILL, tm), InstanceSpec("d0", "a40", Role.DECODE, tm)]
    convs = [
        ConversationSpec(f"c{i}", 0.4 * i, (TurnSpec(3000, 30), TurnSpec(60, 30, 0.3))) for i in range(5)
    ]
    res = run_simulation(insts, convs, make_policy("conserve"), seed=0, energy_window_s=0.5)
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as lg:
        write_simulation(lg, res, "conserve", "sim-1", tier_models={tm.name: tm})
        rep = build_report(lg, GroupBy.POLICY)
    ((label, pre, dec, kv, idle, unsplit),) = rep.policy_phases
    assert label == "conserve (simulated)" and pre > 0 and dec > 0 and idle > 0 and kv == 0 and unsplit == 0
    assert math.isclose(pre + dec + kv + idle, rep.rows[0]["joules"], rel_tol=1e-9)
    assert rep.measured_share == 0.0 and source_label(rep.measured_share) == "modelled"
    titles = [t for _, t, _ in plots(rep)]
    assert len(titles) == 4 and all(t.endswith("(modelled)") for t in titles)
    assert "Energy by phase and policy (modelled)" in titles
    assert source_label(1.0) == "measured" and source_label(0.25) == "25% measured, rest modelled"


def test_report_gives_carbon_at_the_grid_intensity(tmp_path: Path) -> None:
    tm = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    insts = [InstanceSpec("d0", "a40", Role.COLOCATED, tm)]
    res = run_simulation(insts, [ConversationSpec("c", 0.0, (TurnSpec(500, 10),))], make_policy("colocated"))
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}") as lg:
        write_simulation(lg, res, "colocated", "s")
        default = build_report(lg, GroupBy.POLICY)
        mine = build_report(lg, GroupBy.POLICY, grid_g_per_kwh=100.0)
    j = default.totals["joules"]
    assert default.totals["co2e_g"] == pytest.approx(j / 3.6e6 * 480.0)
    assert mine.totals["co2e_g"] == pytest.approx(j / 3.6e6 * 100.0)
    assert any("at 100 gCO2e/kWh" in n for n in mine.notes)
