"""The power controller in the simulator (orchestrator/sim/power.py, SimOptions.power_controller): on a
scripted load swing the caps go down in the trough and up in the burst, the energy is accounted at the cap
in force, the run without the option is unchanged, and `simulate --power-controller` reports the steps."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.core.power import PowerSlo
from orchestrator.load_swing import RateProfile, profiled_arrivals
from orchestrator.sim.core import SimOptions, run_simulation
from orchestrator.sim.power import SimPowerControl
from orchestrator.workload import ConversationSpec, TurnSpec
from placement.base import Role
from placement.policies import make_policy
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel

CAPS = (100.0, 150.0, 200.0, 250.0, 300.0)


class Inst:
    def __init__(self, iid: str, role: Role, tm: TierModel) -> None:
        self.instance_id, self.tier, self.role, self.tier_model = iid, "a40", role, tm


def fleet() -> list[Inst]:
    tm = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    return [Inst("p0", Role.PREFILL, tm), Inst("d0", Role.DECODE, tm)]


def swing() -> list[ConversationSpec]:
    """60 s at 0.1 conv/s, 40 s at 4 conv/s (a burst of 16k-token prompts), 60 s at 0.1."""
    prof = RateProfile(((0.0, 0.1), (60.0, 0.1), (60.001, 4.0), (100.0, 4.0), (100.001, 0.1)))
    n = int(prof.cumulative(160.0))
    convs = [ConversationSpec(f"c{i}", 0.0, (TurnSpec(16000, 100), TurnSpec(60, 100, 1.0))) for i in range(n)]
    return profiled_arrivals(convs, prof, seed=0)


def control() -> SimPowerControl:
    ref = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    return SimPowerControl(PowerSlo(ref), {"a40": CAPS}, interval_s=5.0)


def run(ctl: SimPowerControl | None):  # type: ignore[no-untyped-def]
    return run_simulation(fleet(), swing(), make_policy("conserve"), options=SimOptions(power_controller=ctl))


def test_caps_go_down_in_the_trough_and_up_in_the_burst() -> None:
    res = run(control())
    steps = res.power_steps
    assert steps and all(b.t_s - a.t_s == 5.0 for a, b in zip(steps, steps[1:], strict=False))
    pre = {round(st.t_s): st.caps_w["a40/prefill"] for st in steps}
    dec = {round(st.t_s): st.caps_w["a40/decode"] for st in steps}
    trough = [c for t, c in pre.items() if 50 <= t <= 60]
    burst = [c for t, c in pre.items() if 65 <= t <= 100]
    assert max(trough) <= 150.0 and max(dec[t] for t in (50, 55, 60)) <= 150.0  # down from 300 W: slack
    assert max(burst) >= max(trough) + 100.0  # up when the queue of 16k-token prompts grew
    assert all(c in CAPS for st in steps for c in st.caps_w.values())
    assert any("queue growing" in ch[3] or "pressure" in ch[3] for st in steps for ch in st.changes)
    # the configured tier model is given back: names in the result are the configured ones
    assert {i.tier_model for i in res.instances} == {"A40@300W/tp1"}


def test_energy_is_accounted_at_the_cap_in_force() -> None:
    res = run(control())
    base = run(None)
    assert res.tokens == base.tokens
    assert res.energy_j < base.energy_j  # lower caps in the trough: less modelled energy, same tokens
    # the windows carry the capped draw: each conserves against its instance's total
    for inst in res.instances:
        win = sum(w.energy_j for w in res.energy_windows if w.instance_id == inst.instance_id)
        assert abs(win - inst.energy_j) <= 1e-6 * inst.energy_j
    # the interval draw the controller saw never exceeds the pool's cap in force during it (+ nothing)
    prev = {"a40/prefill": 300.0, "a40/decode": 300.0}
    for st in res.power_steps:
        for pool, w in st.power_w.items():
            assert w is not None and w <= prev[pool] + 1e-6, (st.t_s, pool, w, prev[pool])
        prev = dict(st.caps_w)


def test_without_the_option_the_run_has_no_steps() -> None:
    assert run(None).power_steps == ()


def _two_a40_fleet(tmp_path: Path, conversations: int) -> Path:
    """Two A40s with the test's caps and a small synthetic workload, written as fleet.yaml."""
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(
        yaml.safe_dump(
            {
                "model": "Qwen3-0.6B",
                "tiers": [{"name": "a40", "gpu": "A40", "count": 2, "power_caps_w": list(CAPS)}],
                "workload": {
                    "format": "synthetic",
                    "conversations": conversations,
                    "arrival_rate_per_s": 0.5,
                    "synthetic": {"turns_mean": 2, "turn1_input_tokens_median": 4000},
                },
            }  # fmt: skip
        )
    )
    return fleet_file


def test_simulate_cli_flag(tmp_path: Path) -> None:
    fleet_file = _two_a40_fleet(tmp_path, conversations=20)
    args = [
        "simulate",
        "--fleet",
        str(fleet_file),
        "--layout",
        "a40.prefill=1,a40.decode=1",
        "--no-standalone",
    ]
    out = CliRunner().invoke(app, [*args, "--power-controller", "--json"])
    assert out.exit_code == 0, out.output
    pc = json.loads(out.output)["power_controller"]
    assert pc["steps"] > 0 and pc["interval_s"] == 5.0 and pc["source"] == "modelled"
    assert set(pc["seconds_at_cap"]) == {"a40/prefill", "a40/decode"}
    plain = CliRunner().invoke(app, [*args, "--json"])
    assert "power_controller" not in json.loads(plain.output)


def test_compare_cli_adds_a_power_row(tmp_path: Path) -> None:
    fleet_file = _two_a40_fleet(tmp_path, conversations=10)
    args = [
        "compare",
        "--fleet",
        str(fleet_file),
        "--policies",
        "conserve",
        "--layout",
        "a40.prefill=1,a40.decode=1",
    ]
    out = CliRunner().invoke(app, [*args, "--power-controller", "--json"])
    assert out.exit_code == 0, out.output
    runs = {r["config"]: r["summary"] for r in json.loads(out.output)["runs"]}
    assert set(runs) == {"conserve", "conserve+power"}
    assert runs["conserve+power"]["energy_j"] < runs["conserve"]["energy_j"]  # caps lowered from TDP


def test_a_fleet_budget_is_never_exceeded() -> None:
    ctl = control()
    budgeted = SimPowerControl(ctl.slo, ctl.allowed_caps_w, ctl.interval_s, budget_w=350.0)
    res = run(budgeted)
    assert res.power_steps and all(sum(st.caps_w.values()) <= 350.0 for st in res.power_steps)
    assert max(st.caps_w["a40/prefill"] for st in res.power_steps) <= 250.0  # 250 + 100: the most it can get


def test_simulate_refuses_a_budget_without_the_controller(tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["simulate", "--fleet", "examples/paper-a40.yaml", "--power-budget", "900"])
    assert out.exit_code == 1 and "--power-budget needs --power-controller" in out.output
    assert "Traceback" not in out.output
