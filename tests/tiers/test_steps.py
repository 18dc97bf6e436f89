"""tiers/steps.py: the instance step and KV hand-off model shared by the simulator and the simulated engines
(their agreement on whole runs: tests/core/test_engine_model.py)."""

from __future__ import annotations

import pytest

from tiers.catalog import get_gpu
from tiers.connector import kv_bookkeeping_s
from tiers.links import LinkType, kv_transfer_time_s
from tiers.models import get_model
from tiers.perf import TierModel
from tiers.steps import handoff_link, handoff_time_s, plan_chunks, prefill_step_power_w, prefill_step_time_s

TM = TierModel(get_gpu("H100-SXM"), get_model("Llama-3.1-8B"))


def test_the_chunk_budget_is_what_the_decode_batch_leaves_first_come_first_served() -> None:
    assert plan_chunks(8192, 0, [5000, 5000, 10]) == [5000, 3192]
    assert plan_chunks(8192, 100, [5000, 5000]) == [5000, 3092]  # one budget token per decoding sequence
    assert plan_chunks(8192, 8192, [10]) == []
    assert plan_chunks(100, 0, [30, 30, 30, 30]) == [30, 30, 30, 10]


def test_one_chunk_is_the_tier_models_continuous_batching_step() -> None:
    assert prefill_step_time_s(TM, [(4000, 1000)], 8, 20_000) == TM.step_time_s(4000, 1000, 8, 20_000)
    assert prefill_step_power_w(TM, [(4000, 1000)], 8, 20_000) == TM.step_power_w(4000, 8, 20_000, 1000)


def test_each_further_chunk_adds_its_own_gpu_work_to_the_shared_step() -> None:
    one = prefill_step_time_s(TM, [(4000, 0)], 8, 20_000)
    two = prefill_step_time_s(TM, [(4000, 0), (2000, 3000)], 8, 20_000)
    extra = TM.step_time_s(2000, 3000, 8, 20_000) - TM.decode_step_time_s(8, 20_000)
    assert two == pytest.approx(one + extra, rel=1e-12)
    assert extra > 0
    # the step's draw: every chunk's tokens, at the first chunk's context
    assert prefill_step_power_w(TM, [(4000, 0), (2000, 3000)], 8, 20_000) == TM.step_power_w(
        6000, 8, 20_000, 0
    )


def test_a_handoff_runs_over_the_slower_link() -> None:
    assert handoff_link("nvlink", "nvlink") == "nvlink"
    assert handoff_link(LinkType.NVLINK, LinkType.PCIE) == "pcie"
    assert handoff_link("infiniband", "pcie") == "infiniband"
    assert handoff_link("ethernet", "nvlink") == "ethernet"
    assert handoff_link("warp-drive", "nvlink") == "ethernet"  # unknown: the slowest
    kvb = TM.model.kv_bytes_per_token
    assert handoff_time_s(16_000, kvb, "nvlink", "ethernet") == kv_transfer_time_s(16_000, kvb, "ethernet")
    assert handoff_time_s(16_000, kvb, "pcie", "pcie", 16_500) == pytest.approx(
        kv_transfer_time_s(16_000, kvb, "pcie") + kv_bookkeeping_s(16_500)
    )
