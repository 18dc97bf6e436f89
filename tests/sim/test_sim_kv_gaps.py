"""The keep / offload / drop rule for KV across tool gaps, closed loop in the simulator
(orchestrator/sim/gaps.py, SimOptions.kv_gap_rule): on a scripted gap, the decision and what the next turn
pays for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from simkit import Inst
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import SimulationError
from orchestrator.sim import SimOptions, run_simulation
from orchestrator.sim.result import SimResult, TurnRecord
from orchestrator.workload import ConversationSpec, TurnSpec
from placement.base import Role
from placement.kv_gaps import HostMemory, gap_costs
from placement.policies import make_policy
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel

# 2,496 KV tokens: A's 1,000 idle tokens and B's 2,400 do not fit together
SMALL = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"), gpu_memory_utilization=0.17)
HOST = HostMemory(256e9)
HIT = 1_000 // 16 * 16  # turn 2 finds A's 1,000 cached tokens: whole 16-token blocks


def run(opts: SimOptions, with_b: bool = True, with_c: bool = False) -> SimResult:
    # A: a 900-token prompt, 100 out, a 20 s tool gap, then 50 more tokens (turn 2's prompt: 1,050 tokens)
    a = ConversationSpec("A", 0.0, (TurnSpec(900, 100), TurnSpec(50, 50, 20.0)))
    # B arrives 5 s into A's gap and needs 2,400 tokens of KV: the engine must evict cached KV to admit it
    b = ConversationSpec("B", 5.0, (TurnSpec(2_300, 100),))
    # C: a short request at 10 s (after B has finished), placed while A still idles
    c = ConversationSpec("C", 10.0, (TurnSpec(100, 10),))
    convs = [a, b] if with_b else [a]
    inst = [Inst("c0", "a40", Role.COLOCATED, SMALL)]
    return run_simulation(inst, convs + ([c] if with_c else []), make_policy("colocated"), options=opts)


def turn2(res: SimResult) -> TurnRecord:
    return next(t for t in res.turns if t.conversation_id == "A" and t.turn == 2)


def test_without_pressure_the_gap_is_kept_and_turn_2_hits_the_cache() -> None:
    res = run(SimOptions(kv_gap_rule=True, kv_gap_host=HOST), with_b=False)
    g = res.kv_gaps
    assert g is not None and (g.gaps, g.kept, g.offloaded, g.dropped) == (1, 1, 0, 0)
    t2 = turn2(res)
    assert t2.cached_tokens == HIT and t2.prefill_start_s == t2.arrival_s
    assert g.restore_s == 0.0 and g.copy_energy_j == 0.0 and g.released_kv_token_s == 0.0
    assert g.idle_kv_token_s == pytest.approx(1_000 * 20.0)


def test_under_pressure_the_idle_kv_is_offloaded_and_turn_2_waits_its_copy_back() -> None:
    res = run(SimOptions(kv_gap_rule=True, kv_gap_host=HOST))
    g = res.kv_gaps
    assert g is not None and (g.gaps, g.offloaded, g.dropped, g.kept) == (1, 1, 0, 0)
    costs = gap_costs(1_000, SMALL, HOST)
    assert costs.offload_restore_s is not None and costs.offload_energy_j is not None
    t2 = turn2(res)
    # turn 2 is placed after the copy back (1,000 tokens x 114,688 B over 31.5 GB/s = 3.6 ms) and finds its
    # history in the prefix cache: it prefills only the new tokens (at block granularity)
    assert t2.prefill_start_s - t2.arrival_s == pytest.approx(costs.offload_restore_s)
    assert g.restore_s == pytest.approx(costs.offload_restore_s)
    assert t2.cached_tokens == HIT and t2.prefilled_tokens == 1_050 - t2.cached_tokens
    # released when B's admission needed the room (5 s), held off the decoder until turn 2 (22 s + turn 1)
    a1 = next(t for t in res.turns if t.conversation_id == "A" and t.turn == 1)
    assert g.released_kv_token_s == pytest.approx(1_000 * (t2.arrival_s - 5.0), rel=1e-3)
    assert g.idle_kv_token_s == pytest.approx(1_000 * (t2.arrival_s - a1.last_token_s))
    # copies out and back at the idle draw, billed in the run's energy
    assert g.copy_energy_j == pytest.approx(costs.offload_energy_j)
    assert res.energy_j == pytest.approx(sum(i.energy_j for i in res.instances) + costs.offload_energy_j)


def test_under_pressure_without_a_host_tier_the_kv_is_dropped_and_turn_2_re_prefills() -> None:
    res = run(SimOptions(kv_gap_rule=True))
    g = res.kv_gaps
    assert g is not None and (g.offloaded, g.dropped, g.kept) == (0, 1, 0)
    t2 = turn2(res)
    assert t2.cached_tokens == 0 and t2.prefilled_tokens == 1_050  # the whole context again
    assert t2.prefill_start_s == t2.arrival_s and g.restore_s == 0.0 and g.copy_energy_j == 0.0


def test_a_drop_frees_only_the_room_an_admission_needs_oldest_idle_first() -> None:
    # A (1,000 tokens) and A2 (600) idle; B needs 1,200: 304 tokens over capacity: only A (idle longest) goes
    a = ConversationSpec("A", 0.0, (TurnSpec(900, 100), TurnSpec(50, 50, 20.0)))
    a2 = ConversationSpec("A2", 0.5, (TurnSpec(500, 100), TurnSpec(50, 50, 15.0)))
    b = ConversationSpec("B", 5.0, (TurnSpec(1_100, 100),))
    inst = [Inst("c0", "a40", Role.COLOCATED, SMALL)]
    res = run_simulation(inst, [a, a2, b], make_policy("colocated"), options=SimOptions(kv_gap_rule=True))
    g = res.kv_gaps
    assert g is not None and (g.gaps, g.dropped, g.kept, g.offloaded) == (2, 1, 1, 0)
    t2 = {t.conversation_id: t for t in res.turns if t.turn == 2}
    assert t2["A"].cached_tokens == 0 and t2["A2"].cached_tokens == 600 // 16 * 16


def test_no_drop_while_ended_conversations_cached_kv_covers_the_need() -> None:
    # B has ended (one turn): its 2,400 cached tokens are what C's admission takes, not idle A's KV
    a = ConversationSpec("A", 6.0, (TurnSpec(900, 100), TurnSpec(50, 50, 20.0)))
    b = ConversationSpec("B", 0.0, (TurnSpec(2_300, 100),))
    c = ConversationSpec("C", 10.0, (TurnSpec(1_000, 100),))
    inst = [Inst("c0", "a40", Role.COLOCATED, SMALL)]
    res = run_simulation(inst, [a, b, c], make_policy("colocated"), options=SimOptions(kv_gap_rule=True))
    g = res.kv_gaps
    assert g is not None and (g.dropped, g.kept, g.evicted_while_kept) == (0, 1, 0)


def test_a_full_host_tier_drops() -> None:
    res = run(SimOptions(kv_gap_rule=True, kv_gap_host=HostMemory(1_000 * 114_688 - 1)))
    g = res.kv_gaps
    assert g is not None and (g.offloaded, g.dropped) == (0, 1)


def test_without_the_rule_the_lru_trims_the_idle_kv() -> None:
    # the simulator's default: B's admission evicts the tail of A's cached KV; turn 2 prefills what was lost
    res = run(SimOptions())
    assert res.kv_gaps is None
    t2 = turn2(res)
    assert 0 < t2.cached_tokens < HIT
    off = turn2(run(SimOptions(kv_gap_rule=True, kv_gap_host=HOST)))
    assert off.prefilled_tokens < t2.prefilled_tokens


def test_the_released_conversation_is_not_counted_on_its_pin() -> None:
    # the views at C's placement (10 s, A idle, released at 5 s under the rule): A's 1,000 tokens are counted
    # on its pin without the rule, not after the release
    def used_at_c(opts: SimOptions) -> int:
        res = run(opts, with_c=True)
        d = next(d for d in res.decisions if d.turn.conversation_id == "C")
        assert d.view is not None
        (v,) = d.view.instances
        return v.kv_used_tokens

    assert used_at_c(SimOptions(record_views=True)) == 1_000
    assert used_at_c(SimOptions(record_views=True, kv_gap_rule=True, kv_gap_host=HOST)) == 0


def test_host_tier_without_the_rule_is_refused() -> None:
    with pytest.raises(SimulationError, match="kv_gap_rule"):
        SimOptions(kv_gap_host=HOST)


FLEET = {
    "model": "Qwen3-0.6B",
    "tiers": [{"name": "a40", "gpu": "A40", "count": 2, "roles": ["colocated"]}],
    "workload": {
        "format": "synthetic",
        "conversations": 8,
        "arrival_rate_per_s": 1.0,
        "synthetic": {
            "turn1_input_tokens_median": 2000,
            "turns_mean": 3,
            "output_tokens_mean": 40,
            "tool_gap_s_mean": 5.0,
        },
    },
}


def test_simulate_option_reports_the_rule_and_refuses_a_host_tier_alone(tmp_path: Path) -> None:
    f = tmp_path / "fleet.yaml"
    f.write_text(yaml.safe_dump(FLEET))
    base = [
        "simulate",
        "--fleet",
        str(f),
        "--layout",
        "colocated=2",
        "--policy",
        "colocated",
        "--no-standalone",
    ]
    r = CliRunner().invoke(app, [*base, "--json", "--kv-gap-rule", "--host-kv-gb", "64"])
    assert r.exit_code == 0, r.output
    gaps = json.loads(r.output)["kv_gaps"]
    assert gaps["gaps"] > 0 and gaps["gaps"] == gaps["kept"] + gaps["offloaded"] + gaps["dropped"]
    r = CliRunner().invoke(app, [*base, "--host-kv-gb", "64"])
    assert r.exit_code == 1 and "--kv-gap-rule" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, [*base, "--kv-gap-rule", "--host-kv-gb", "0"])
    assert r.exit_code == 1 and "--host-kv-gb must be > 0" in r.output


def test_compare_option_records_the_rule_per_run(tmp_path: Path) -> None:
    f = tmp_path / "fleet.yaml"
    f.write_text(yaml.safe_dump(FLEET))
    args = [
        "compare",
        "--fleet",
        str(f),
        "--policies",
        "colocated,kv-aware",
        "--colocated-layout",
        "colocated=2",
    ]
    r = CliRunner().invoke(app, [*args, "--json", "--kv-gap-rule", "--host-kv-gb", "64"])
    assert r.exit_code == 0, r.output
    runs = json.loads(r.output[r.output.index("{") :])["runs"]
    assert len(runs) == 2 and all(run["kv_gaps"]["gaps"] > 0 for run in runs)
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0 and "kv_gaps" not in json.loads(r.output[r.output.index("{") :])["runs"][0]
