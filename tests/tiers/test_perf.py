"""Properties of the tier model: monotonicity, power-cap asymmetry, energy >= idle, KV capacity."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from tiers.catalog import get_gpu
from tiers.errors import CatalogError
from tiers.models import get_model
from tiers.perf import CONSERVE_A40_VLLM011, SPLITWISE_VLLM, Calibration, TierModel, default_calibration
from tiers.presets import AIC_GPU_CALIBRATIONS


def tier(gpu: str = "A40", model: str = "Qwen3-0.6B", tp: int = 1, cap: float | None = None) -> TierModel:
    return TierModel(get_gpu(gpu), get_model(model), tp=tp, power_cap_w=cap)


TIERS = [
    tier(),
    tier(cap=200),
    tier("H100-SXM", "Llama-3.1-70B", tp=4),
    tier("H100-SXM", "Llama-3.1-70B", tp=4, cap=400),
    tier("A100-80GB-SXM", "Llama-3.1-8B"),
    tier("L4", "Qwen3-0.6B", cap=50),
]
IDS = [t.name + "-" + t.model.name for t in TIERS]


def test_default_calibration_is_the_gpus_own() -> None:
    """Issue 10 item 5: each GPU gets its own fitted speed constants (the A40's only on the A40); GPUs with no
    measurement get a labelled fallback; the power model (GEMM demand by model size) is ours everywhere."""
    assert tier().calibration is CONSERVE_A40_VLLM011
    for gpu, preset in AIC_GPU_CALIBRATIONS.items():
        cal = default_calibration(get_gpu(gpu), get_model("Qwen3-0.6B"))
        assert cal.compute_efficiency == preset.compute_efficiency
        assert cal.bandwidth_efficiency == preset.bandwidth_efficiency
        assert "AIConfigurator" in cal.source
    # no GPU but the A40 carries the A40 host's overheads (issue 10: 24.7 ms per prefill, 105 us per layer)
    assert all(p.prefill_overhead_s < 0.005 for p in AIC_GPU_CALIBRATIONS.values())
    l4 = default_calibration(get_gpu("L4"), get_model("Qwen3-0.6B"))
    assert l4.compute_efficiency == AIC_GPU_CALIBRATIONS["L40S"].compute_efficiency
    assert l4.name.startswith("fallback(L4<-") and "no measurement" in l4.source
    # bigger GEMMs draw more power: GEMM power demand interpolated up to Splitwise's TDP
    big = default_calibration(get_gpu("H100-SXM"), get_model("Llama-3.1-70B"))
    assert big.power_gemm_frac == pytest.approx(SPLITWISE_VLLM.power_gemm_frac)
    mid = default_calibration(get_gpu("H100-SXM"), get_model("Llama-3.1-8B")).power_gemm_frac
    assert CONSERVE_A40_VLLM011.power_gemm_frac < mid < SPLITWISE_VLLM.power_gemm_frac
    explicit = TierModel(get_gpu("H100-SXM"), get_model("Llama-2-70B"), tp=4, calibration=SPLITWISE_VLLM)
    assert explicit.calibration is SPLITWISE_VLLM and explicit.profile is None
    assert replace(explicit, power_cap_w=400).calibration is SPLITWISE_VLLM
    assert explicit.source.startswith("calibration splitwise:")


@pytest.mark.parametrize("tm", TIERS, ids=IDS)
def test_times_grow_with_work(tm: TierModel) -> None:
    lengths = [1, 64, 512, 4096, 16384, 32768]
    pre = [tm.prefill_time_s(n) for n in lengths]
    assert all(a <= b for a, b in itertools.pairwise(pre))
    assert tm.prefill_time_s(512, cached_tokens=16000) > tm.prefill_time_s(512)
    assert tm.prefill_time_s(0) == 0.0 and tm.decode_step_time_s(0, 0) == 0.0
    for b in (1, 8, 64):
        steps = [tm.decode_step_time_s(b, c) for c in (0, 10_000, 100_000, 300_000)]
        assert all(a <= x for a, x in itertools.pairwise(steps))
    assert tm.decode_step_time_s(64, 50_000) >= tm.decode_step_time_s(1, 50_000)


@pytest.mark.parametrize("tm", TIERS, ids=IDS)
def test_mixed_step_costs_more_than_its_parts_alone(tm: TierModel) -> None:
    dec = tm.decode_step_time_s(16, 100_000)
    mixed = tm.step_time_s(2048, 0, 16, 100_000)
    assert mixed > dec
    assert tm.step_time_s(0, 0, 16, 100_000) == dec
    assert tm.step_time_s(2048, 0, 0, 0) == tm.prefill_time_s(2048)


def test_cap_slows_prefill_not_decode() -> None:
    full, capped = tier("H100-SXM", "Llama-3.1-70B", tp=4), tier("H100-SXM", "Llama-3.1-70B", tp=4, cap=350)
    assert capped.prefill_time_s(16384) > 1.1 * full.prefill_time_s(16384)
    assert capped.decode_step_time_s(16, 200_000) <= 1.02 * full.decode_step_time_s(16, 200_000)
    assert capped.decode_power_w(16, 200_000) < full.decode_power_w(16, 200_000)
    assert capped.decode_power_w(16, 200_000) <= 350 * 4 + 1e-9


def test_a40_200w_cap_saves_decode_energy_at_heavy_kv() -> None:
    """The paper's decode tier: at high KV occupancy an uncapped A40 draws > 200 W, so the cap saves energy
    per step without slowing it (DESIGN.md section 1)."""
    full, capped = tier(), tier(cap=200)
    b, ctx = 16, 250_000
    assert full.decode_power_w(b, ctx) > 200
    assert capped.decode_step_energy_j(b, ctx) < 0.85 * full.decode_step_energy_j(b, ctx)


@pytest.mark.parametrize("tm", TIERS, ids=IDS)
def test_energy_never_below_idle(tm: TierModel) -> None:
    for p, c, b, ctx in itertools.product((0, 1, 256, 8192), (0, 4096), (0, 1, 32, 128), (0, 5_000, 200_000)):
        t = tm.step_time_s(p, c, b, ctx)
        e = tm.step_energy_j(p, c, b, ctx)
        assert e >= tm.idle_w * t - 1e-9, (p, c, b, ctx)
        assert tm.step_power_w(p, b, ctx, c) <= tm.cap_w * tm.tp + 1e-6
    assert tm.step_power_w(0, 0) == tm.idle_w
    assert tm.prefill_power_w(0) == tm.idle_w


def test_kv_capacity_reproduces_paper_a40() -> None:
    """The paper's A40 + Qwen3-0.6B engines held ~308k tokens (DESIGN.md section 4)."""
    tm = tier()
    assert tm.model.kv_bytes_per_token == 114_688
    assert tm.kv_capacity_tokens == pytest.approx(308_000, rel=0.03)
    assert tm.kv_capacity_tokens % 16 == 0
    assert replace(tm, gpu_memory_utilization=0.5).kv_capacity_tokens < tm.kv_capacity_tokens
    big = tier("H100-SXM", "Llama-3.1-70B", tp=4)
    assert big.kv_capacity_tokens > 0
    assert tier("L4", "Llama-3.1-70B").kv_capacity_tokens == 0  # weights do not fit: no room, not negative


def test_tp_splits_work() -> None:
    one = tier("H100-SXM", "Llama-3.1-8B", tp=1)
    four = tier("H100-SXM", "Llama-3.1-8B", tp=4)
    assert four.prefill_time_s(16384) < one.prefill_time_s(16384)
    assert four.gpus == 4 and four.idle_w == 4 * one.idle_w
    assert four.kv_capacity_tokens > 4 * one.kv_capacity_tokens * 0.9


def test_invalid_inputs_raise_with_fix() -> None:
    with pytest.raises(CatalogError, match="tensor-parallel"):
        tier(tp=0)
    with pytest.raises(CatalogError, match="To fix"):
        tier(cap=50)
    with pytest.raises(CatalogError, match="gpu_memory_utilization"):
        TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"), gpu_memory_utilization=1.5)
    with pytest.raises(CatalogError, match="compute_efficiency"):
        Calibration(compute_efficiency=0)


def test_kv_transfer_scales_with_model() -> None:
    small, big = tier(), tier("H100-SXM", "Llama-3.1-70B", tp=4)
    assert big.kv_transfer_time_s(16384, "pcie") > small.kv_transfer_time_s(16384, "pcie")
    assert small.kv_transfer_time_s(16384, "ethernet") > small.kv_transfer_time_s(16384, "nvlink")
