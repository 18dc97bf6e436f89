"""KV held across tool gaps on a recorded run (orchestrator/kv_gaps.py): the idle share, and the rule's
open-loop replay on a scripted timeline."""

from __future__ import annotations

import pytest

from orchestrator.kv_gaps import kv_gap_report
from orchestrator.sim.result import SimResult, TurnRecord
from placement.kv_gaps import HostMemory, gap_costs
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel

# ~2,500 KV tokens: two 1,000-token conversations fill it
SMALL = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"), gpu_memory_utilization=0.17)


def turn(cid: str, k: int, arrive: float, end: float, inp: int, out: int) -> TurnRecord:
    return TurnRecord(
        cid, k, arrive, inp, out, "d0", "d0", False, arrive, arrive, arrive, arrive, end, 0, inp, 0, 0
    )


def result(turns: list[TurnRecord]) -> SimResult:
    return SimResult("conserve", 0, 100.0, (), tuple(turns), (), (), None, 0, 0, (), (), 0, 0.0)


def test_idle_share_of_a_scripted_run() -> None:
    # A: turn 1 for 2 s (1,000 tokens), a 20 s tool gap holding 1,000, turn 2 for 2 s (1,100 tokens)
    res = result([turn("A", 1, 0.0, 2.0, 900, 100), turn("A", 2, 22.0, 24.0, 1_050, 50)])
    rep = kv_gap_report(res, {"d0": SMALL}, HostMemory(256e9))
    assert rep.active_kv_token_s == pytest.approx(1_000 * 2 + 1_100 * 2)
    assert rep.idle_kv_token_s == pytest.approx(1_000 * 20)
    assert rep.idle_share == pytest.approx(20_000 / 24_200)
    # one conversation never fills the decoder: no pressure, the KV is kept
    assert (rep.gaps, rep.kept, rep.offloaded, rep.dropped, rep.released_kv_token_s) == (1, 1, 0, 0, 0.0)
    assert rep.idle_share_with_rule == rep.idle_share


def test_under_pressure_the_gap_is_offloaded_after_its_restore_time() -> None:
    # A idles from 2 s to 22 s; B runs 1,600 tokens from 5 s to 15 s: held KV 2,600 >= capacity from 5 s
    assert 1_000 + 1_600 >= SMALL.kv_capacity_tokens > 1_600
    a1, a2 = turn("A", 1, 0.0, 2.0, 900, 100), turn("A", 2, 22.0, 24.0, 1_050, 50)
    res = result([a1, a2, turn("B", 1, 5.0, 15.0, 1_500, 100)])
    rep = kv_gap_report(res, {"d0": SMALL}, HostMemory(256e9))
    assert (rep.offloaded, rep.dropped, rep.kept) == (1, 0, 0)
    assert rep.released_kv_token_s == pytest.approx(1_000 * (22.0 - 5.0))  # released when pressure began
    costs = gap_costs(1_000, SMALL, HostMemory(256e9))
    assert rep.offload_energy_j == pytest.approx(costs.offload_energy_j)
    assert rep.restore_s == pytest.approx(costs.offload_restore_s)
    assert rep.idle_share_with_rule < rep.idle_share
    # without a host tier the same gap is dropped and re-prefilled
    rep = kv_gap_report(res, {"d0": SMALL}, None)
    assert (rep.offloaded, rep.dropped) == (0, 1) and rep.drop_energy_j == pytest.approx(
        SMALL.prefill_energy_j(1_000)
    )
