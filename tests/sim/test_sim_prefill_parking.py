"""Parking the prefiller in the simulator (ParkingConfig.prefill, orchestrator/core/prefill_park.py): in a
long trough the prefiller drains and parks, turn-1 prompts arriving meanwhile are prefilled on their decoder
(the conserve policy's local prefill), the parked GPU is billed parked_w (the run's energy falls), and nothing
is prefilled on the prefiller while it is not active."""

from __future__ import annotations

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
FLEET = [Inst("p0", Role.PREFILL, TM)] + [Inst(f"d{k}", Role.DECODE, TM) for k in range(2)]


def workload() -> list[ConversationSpec]:
    """300 s at 0.05 conv/s (short prompts), then 60 s at 1 conv/s."""
    prof = RateProfile(((0.0, 0.05), (300.0, 0.05), (300.001, 1.0), (360.0, 1.0), (360.001, 0.05)))
    n = int(prof.cumulative(400.0))
    turns = (TurnSpec(4000, 100), TurnSpec(60, 100, 1.0))
    return profiled_arrivals([ConversationSpec(f"c{i}", 0.0, turns) for i in range(n)], prof, seed=0)


def run(prefill: bool):  # type: ignore[no-untyped-def]
    park = ParkingConfig(parked_w=11.0, wake_s=30.0, hold_s=30.0, spare=1, prefill=prefill)
    ctl = SimPowerControl(PowerSlo(TM), {"a40": (300.0,)}, interval_s=5.0, parking=park)
    return run_simulation(
        FLEET, workload(), make_policy("conserve"), options=SimOptions(power_controller=ctl)
    )


def test_the_prefiller_parks_in_a_trough_and_turn1_prefills_locally_meanwhile() -> None:
    base, res = run(False), run(True)
    changes = [c for st in res.power_steps for c in st.parking if c.instance_id == "p0"]
    assert any(c.to_state == "parked" for c in changes)
    # the prefiller's non-active spans (draining, parked, waking)
    spans, since = [], None
    for c in changes:
        if c.from_state == "active":
            since = c.t_s
        elif c.to_state == "active":
            spans.append((since, c.t_s))
            since = None
    if since is not None:
        spans.append((since, float("inf")))
    firsts = [t for t in res.turns if t.turn == 1]
    local = [t for t in firsts if any(a < t.arrival_s < b for a, b in spans)]
    assert local, "no turn-1 arrived while the prefiller was parked"
    for t in local:  # placed while it took no work: prefilled on its decoder, not on p0
        assert t.prefill_instance == t.decode_instance != "p0"
    e0 = sum(i.energy_j for i in base.instances)
    e1 = sum(i.energy_j for i in res.instances)
    assert e1 < e0 - 1_000  # parked prefiller-seconds at 11 W instead of 77 W
