"""Parking decoders in the simulator (SimPowerControl.parking, orchestrator/core/power.py ``Parker``): in a
long trough a decoder drains and parks, a parked decoder draws ``parked_w`` instead of the loaded idle (the
run's energy falls), no conversation is placed on a decoder that is not accepting, and a burst wakes it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.core.power import ParkingConfig, PowerSlo
from orchestrator.load_swing import RateProfile, profiled_arrivals
from orchestrator.sim.core import SimOptions, run_simulation
from orchestrator.sim.power import SimPowerControl
from orchestrator.workload import ConversationSpec, TurnSpec
from placement.base import Role
from placement.policies import make_policy
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel


class Inst:
    def __init__(self, iid: str, role: Role, tm: TierModel) -> None:
        self.instance_id, self.tier, self.role, self.tier_model = iid, "a40", role, tm


TM = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
FLEET = [Inst("p0", Role.PREFILL, TM)] + [Inst(f"d{k}", Role.DECODE, TM) for k in range(3)]


def workload() -> list[ConversationSpec]:
    """200 s at 0.1 conv/s, a 40 s burst at 2 conv/s, then 100 s at 0.1."""
    prof = RateProfile(((0.0, 0.1), (200.0, 0.1), (200.001, 2.0), (240.0, 2.0), (240.001, 0.1)))
    n = int(prof.cumulative(340.0))
    turns = (TurnSpec(8000, 100), TurnSpec(60, 100, 1.0), TurnSpec(60, 100, 1.0))
    return profiled_arrivals([ConversationSpec(f"c{i}", 0.0, turns) for i in range(n)], prof, seed=0)


def control(parking: ParkingConfig | None) -> SimPowerControl:
    # one cap only: the runs differ by parking alone
    return SimPowerControl(PowerSlo(TM), {"a40": (300.0,)}, interval_s=5.0, parking=parking)


def run(parking: ParkingConfig | None):  # type: ignore[no-untyped-def]
    return run_simulation(FLEET, workload(), make_policy("conserve"),
                          options=SimOptions(power_controller=control(parking)))  # fmt: skip


def test_parking_saves_idle_energy_and_places_nothing_on_a_parked_decoder() -> None:
    cfg = ParkingConfig(parked_w=11.0, wake_s=30.0, hold_s=30.0, spare=0)
    base, parked = run(None), run(cfg)
    changes = [c for st in parked.power_steps for c in st.parking]
    assert any(c.to_state == "parked" for c in changes)
    assert any(c.to_state == "waking" for c in changes)  # the burst wakes one
    e0 = sum(i.energy_j for i in base.instances)
    e1 = sum(i.energy_j for i in parked.instances)
    assert e1 < e0 - 1_000  # > 1 kJ less: parked GPU-seconds at 11 W instead of 77 W
    # every conversation's decoder accepted new conversations when its first turn was placed
    spans: dict[str, list[tuple[float, float]]] = {}
    since: dict[str, float] = {}
    for c in changes:
        if c.from_state == "active":
            since[c.instance_id] = c.t_s
        elif c.to_state == "active":
            spans.setdefault(c.instance_id, []).append((since.pop(c.instance_id), c.t_s))
    for iid, t in since.items():
        spans.setdefault(iid, []).append((t, float("inf")))
    firsts = [t for t in parked.turns if t.turn == 1]
    assert firsts
    for t in firsts:
        for a, b in spans.get(t.decode_instance, []):
            assert not a < t.arrival_s < b, (t.conversation_id, t.decode_instance, a, b)  # placed at arrival


def test_simulate_cli_parks_with_park_w_and_refuses_it_alone(tmp_path: Path) -> None:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(
        yaml.safe_dump(
            {
                "model": "Qwen3-0.6B",
                "tiers": [{"name": "a40", "gpu": "A40", "count": 4, "power_caps_w": [300.0]}],
                "workload": {
                    "format": "synthetic",
                    "conversations": 40,
                    "arrival_rate_per_s": 0.1,
                    "synthetic": {"turns_mean": 2, "turn1_input_tokens_median": 4000},
                },
            }  # fmt: skip
        )
    )
    args = [
        "simulate",
        "--fleet",
        str(fleet_file),
        "--layout",
        "a40.prefill=1,a40.decode=3",
        "--no-standalone",
    ]
    out = CliRunner().invoke(app, [*args, "--power-controller", "--park-w", "11", "--json"])
    assert out.exit_code == 0, out.output
    park = json.loads(out.output)["power_controller"]["parking"]
    assert park["changes"] > 0 and sum(park["seconds_parked"].values()) > 60.0
    bad = CliRunner().invoke(app, [*args, "--park-w", "11"])
    assert bad.exit_code == 1 and "--park-w needs --power-controller" in bad.output
    assert "Traceback" not in bad.output


def test_a_plan_based_start_bills_the_unplanned_decoders_parked_from_time_zero() -> None:
    """ParkingConfig.start_active: the decoders beyond the plan's count start parked (their engines never
    started), are billed parked_w from t = 0, and take no conversation until the rule wakes them."""
    cfg = ParkingConfig(parked_w=11.0, wake_s=30.0, hold_s=30.0, spare=0, start_active=1)
    allon = run(ParkingConfig(parked_w=11.0, wake_s=30.0, hold_s=30.0, spare=0))
    res = run(cfg)
    changes = [c for st in res.power_steps for c in st.parking]
    starts = [c for c in changes if c.t_s == 0.0]
    assert sorted((c.instance_id, c.to_state) for c in starts) == [("d1", "parked"), ("d2", "parked")]
    woken = {c.instance_id: c.t_s for c in changes if c.to_state == "active" and c.from_state == "waking"}
    for t in res.turns:
        if t.turn == 1 and t.decode_instance in ("d1", "d2"):
            assert t.decode_instance in woken and t.arrival_s >= woken[t.decode_instance] - 1e-9
    # the parked start saves idle energy before the first lifetime is known (the rule alone keeps 3 on)
    e_all = sum(i.energy_j for i in allon.instances)
    e_plan = sum(i.energy_j for i in res.instances)
    assert e_plan < e_all - 500.0
