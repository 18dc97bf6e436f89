"""Calibrations of the tier model: efficiencies and overheads of one engine stack, fitted to measurements.

Pure data and a lookup; the model that uses them is tiers/perf.py (which re-exports these names). Must not
import fastapi, sqlalchemy or httpx.

Where every tier's numbers come from (docs/tiers.md, "Calibrations"), most specific first:
  1. a measured profile (fleet.yaml ``tiers[].profile``, from ``orchestrator profile``);
  2. AIConfigurator's profile of that GPU, model and TP size (tiers/aiconfigurator.py), when installed;
  3. the GPU's fitted calibration: A40 (ConServe artifact, vLLM 0.11) or A100/H100/H200/B200/L40S
     (fitted on AIConfigurator's vLLM tables, ``AIC_GPU_CALIBRATIONS``);
  4. the roofline with a labelled fallback: the fitted constants of the closest GPU we have data for
     (``FALLBACK_FROM``), or the A40's for a GPU defined inline.
The power fractions are ours everywhere (AIConfigurator has no power data for these systems).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from tiers.catalog import GpuSpec
from tiers.errors import CatalogError
from tiers.models import ModelSpec


@dataclass(frozen=True, slots=True)
class Calibration:
    """Efficiencies, overheads and power fractions of one engine stack, fitted to measurements.

    Speed: compute_efficiency (achieved fraction of dense BF16 peak at full clocks, prefill GEMMs and
    attention), bandwidth_efficiency (of datasheet memory bandwidth), prefill_overhead_s (fixed per prefill),
    step_overhead_s + per_sequence_s*B (host-side time per decode step, overlapped with GPU work),
    layer_overhead_s (GPU fixed time per layer per step), gpu_per_sequence_s (GPU time per running sequence
    per step), tp_layer_latency_s (collective latency per layer per log2(tp)), tp_link_efficiency (achieved
    fraction of the intra-node link bandwidth in all-reduces).
    Power (fractions of tdp_w - idle_w that an activity demands at full clocks, see tiers.power):
    power_active_frac (GPU busy but waiting: launches, host work), power_mem_frac (per unit of memory-time
    share of a decode step), power_gemm_frac (dense GEMMs), power_attn_frac (attention kernels),
    cap_exponent (dynamic power ~ clock ** cap_exponent).
    The presets below record each value's source and fit quality; the fits live in tiers/calibration.py.
    """

    name: str = "custom"
    compute_efficiency: float = 0.57
    bandwidth_efficiency: float = 0.8
    prefill_overhead_s: float = 0.024
    step_overhead_s: float = 0.0105
    per_sequence_s: float = 24.1e-6
    layer_overhead_s: float = 0.0
    gpu_per_sequence_s: float = 0.0
    tp_layer_latency_s: float = 0.0
    tp_link_efficiency: float = 1.0
    power_active_frac: float = 0.17
    power_mem_frac: float = 0.83
    power_gemm_frac: float = 1.0
    power_attn_frac: float = 1.0
    cap_exponent: float = 2.0
    source: str = "hand-set defaults (not fitted)"

    def __post_init__(self) -> None:
        for name in ("compute_efficiency", "bandwidth_efficiency", "tp_link_efficiency", "cap_exponent"):
            if getattr(self, name) <= 0:
                raise CatalogError(f"calibration {self.name}: {name} must be > 0, got {getattr(self, name)}")
        for name in (
            "prefill_overhead_s",
            "step_overhead_s",
            "per_sequence_s",
            "layer_overhead_s",
            "gpu_per_sequence_s",
            "tp_layer_latency_s",
            "power_active_frac",
            "power_mem_frac",
            "power_gemm_frac",
            "power_attn_frac",
        ):
            if getattr(self, name) < 0:
                raise CatalogError(f"calibration {self.name}: {name} must be >= 0, got {getattr(self, name)}")


# ---- fitted presets ----------------------------------------------------------------------------------------
# Values written by hand from the output of `python -m tiers.calibration` (see each fit function's docstring);
# fit quality is reproduced by tests/tiers/test_calibration.py (run with -s to print the per-point table).

# vLLM 0.11 on an NVIDIA A40, Qwen3-0.6B (ConServe artifact). Speed: fitted by
# tiers/calibration.py::fit_conserve_a40 on conserve/prefill_vs_L_300W_200W.csv (cold prefill, 300 W and
# 200 W) and conserve/decode_grid_300W.csv (p50 step). Power: active/mem fractions carried over from the
# Splitwise A100 fit (no A40 decode power in shared/data); gemm/attn fractions and cap_exponent fitted to the
# 200 W/300 W prefill ratio.
CONSERVE_A40_VLLM011 = Calibration(
    name="conserve-a40-vllm0.11",
    # prefill: 38 points (19 lengths x 300/200 W), median |err| 2.8%, max 10.0%
    compute_efficiency=0.6511,  # of 149.7 TFLOP/s at full clocks (attention is throttled even at 300 W)
    prefill_overhead_s=0.02466,
    power_gemm_frac=0.4453,  # Qwen3-0.6B's small GEMMs draw ~176 W at full clocks
    power_attn_frac=1.4315,  # long-context attention would draw ~396 W: throttled at 300 W, more at 200 W
    cap_exponent=1.6617,
    # decode: 101 points (B 1-128 x L 128-32k), median |err| 1.7%, max 13.0%
    bandwidth_efficiency=0.8488,  # of 696 GB/s
    step_overhead_s=0.01394,  # host-side floor per step, overlapped with GPU work
    per_sequence_s=29.10e-6,
    layer_overhead_s=104.9e-6,  # x 28 layers = 2.94 ms of GPU fixed time per step
    gpu_per_sequence_s=48.65e-6,
    tp_layer_latency_s=0.0,  # TP 1 only in the data: not identifiable; Splitwise's value is the reference
    tp_link_efficiency=1.0,
    # decode power: carried over from fit_splitwise (no A40 decode power in shared/data). Check: a KV-heavy
    # A40 decode step then draws ~258 W, in line with the ~245-270 W implied by the paper's +22.8% tokens/J
    # when its 3 decoders were capped to 200 W (DESIGN.md section 1) -- a consistency check, not a fit.
    power_active_frac=0.07637,
    power_mem_frac=0.8193,
    source="fit_conserve_a40 on conserve/prefill_vs_L_300W_200W.csv + decode_grid_300W.csv "
    "(vLLM 0.11, Qwen3-0.6B, A40); power active/mem fractions from fit_splitwise",
)

# Splitwise's profiling stack (vLLM-era 2023 on DGX-A100 / DGX-H100, llama2-70b and bloom-176b, TP 2/4/8).
# Fitted by tiers/calibration.py::fit_splitwise on splitwise/perf_model.csv (median prompt_time/token_time per
# configuration) and, for power, on its peak_power/average_power columns (A100 rows; H100 rows have none).
SPLITWISE_VLLM = Calibration(
    name="splitwise",
    # prefill: 102 points (batched prompts 128-32k tokens), median |err| 12.2%, max 41.3%
    compute_efficiency=0.6369,
    prefill_overhead_s=0.01462,
    tp_layer_latency_s=67.59e-6,  # per layer per log2(tp): 80 layers x TP8 -> 16.2 ms per step
    tp_link_efficiency=0.2102,  # of NVLink per-direction bandwidth in prefill all-reduces
    # decode: 150 points (B 1-64, context 192-37k), median |err| 7.0%, max 22.3%
    bandwidth_efficiency=0.8211,
    step_overhead_s=0.0001,  # not identifiable on this stack (folded into the GPU terms); held, not fitted
    per_sequence_s=1e-6,  # idem
    layer_overhead_s=114.1e-6,
    gpu_per_sequence_s=284.7e-6,
    # power: average_power of 40 A100 runs, median |err| 2.2%, max 17.1%
    power_active_frac=0.07637,
    power_mem_frac=0.8193,
    power_gemm_frac=1.0,  # prefill reaches TDP (peak_power ~1.0); Splitwise's constant model: prompt = TDP
    power_attn_frac=1.0,
    cap_exponent=1.6617,  # not identifiable from Splitwise's data: the A40 fit's value
    source="fit_splitwise on splitwise/perf_model.csv (DGX-A100/H100, llama2-70b, bloom-176b)",
)

_AUTO = Calibration(name="auto", source="placeholder: replaced by default_calibration() in TierModel")


# ---- per-GPU presets fitted on AIConfigurator ----------------------------------------------------------
# `python -m tiers.calibration_aic GPU` (tiers/calibration_aic.py::fit_gpu) on AIConfigurator 0.12.0's static
# estimates from its measured vLLM kernel tables (vLLM 0.24.0 tables; A100: 0.14.0), database SILICON: every
# covered model (Qwen3-0.6B, Llama-3.1-8B, Llama-3.1-70B) at TP 1/2/4/8 where the weights fit, prefill of 64
# to 32k tokens, decode steps of B 1-512 over 256 to 4M KV tokens within the tier's KV capacity. Host-side
# overheads are held at ~0: AIConfigurator models GPU time only (vLLM 0.24's CUDA graphs and async scheduling
# hide most host work; the A40 preset's 13.9 ms host floor is vLLM 0.11's). Fit quality: median / max |error|
# over all points (tests/tiers/test_aiconfigurator.py reproduces it). Only speed is fitted: the power fields
# are the A40 preset's, with the GEMM power demand set by default_calibration.


def _aic(system: str, source_fit: str, **speed: float) -> Calibration:
    return replace(
        CONSERVE_A40_VLLM011,
        name=f"aic-{system}-vllm",
        step_overhead_s=1e-6,
        per_sequence_s=0.0,
        source=f"fit_gpu on AIConfigurator 0.12.0 {system} vLLM tables ({source_fit}); power fractions: "
        "the A40 preset's",
        **speed,
    )


AIC_GPU_CALIBRATIONS: dict[str, Calibration] = {
    "H200-SXM": _aic(
        "h200_sxm", "vLLM 0.24.0; prefill median |err| 4.1% max 21.6%, decode 2.6% / 29.5%",
        compute_efficiency=0.7672, prefill_overhead_s=0.002163, bandwidth_efficiency=0.8292,
        layer_overhead_s=3.707e-05, gpu_per_sequence_s=4.21e-06, tp_layer_latency_s=4.09e-06,
        tp_link_efficiency=0.6632,
    ),
    "H100-SXM": _aic(
        "h100_sxm", "vLLM 0.24.0; prefill median |err| 4.4% max 20.2%, decode 3.1% / 25.7%",
        compute_efficiency=0.789, prefill_overhead_s=0.002271, bandwidth_efficiency=0.8462,
        layer_overhead_s=3.337e-05, gpu_per_sequence_s=4.517e-06, tp_layer_latency_s=3.846e-06,
        tp_link_efficiency=0.5748,
    ),
    "B200": _aic(
        "b200_sxm", "vLLM 0.24.0; prefill median |err| 6.2% max 28.7%, decode 6.1% / 29.2%",
        compute_efficiency=0.6573, prefill_overhead_s=0.002186, bandwidth_efficiency=0.7894,
        layer_overhead_s=2.999e-05, gpu_per_sequence_s=2.276e-06, tp_layer_latency_s=9.997e-06,
        tp_link_efficiency=0.4848,
    ),
    "A100-80GB-SXM": _aic(
        "a100_sxm", "vLLM 0.14.0; prefill median |err| 9.3% max 21.5%, decode 4.5% / 33.6%",
        compute_efficiency=0.7988, prefill_overhead_s=0.00264, bandwidth_efficiency=0.7285,
        layer_overhead_s=4.519e-05, gpu_per_sequence_s=7.715e-06, tp_layer_latency_s=6.351e-06,
        tp_link_efficiency=0.3913,
    ),
    "L40S": _aic(
        "l40s", "vLLM 0.24.0, TP 1-2 only (tiers/calibration_aic.py FIT_MAX_TP); prefill median |err| 2.9% "
        "max 15.3%, decode 4.7% / 28.9%",
        compute_efficiency=0.6185, prefill_overhead_s=0.002208, bandwidth_efficiency=0.7901,
        layer_overhead_s=8.153e-06, gpu_per_sequence_s=7.833e-06, tp_layer_latency_s=2.552e-06,
        tp_link_efficiency=0.5599,
    ),
}  # fmt: skip

# GPUs with no measurement of their own: the roofline with the fitted constants of the closest GPU we have
# data for -- a labelled guess, not a measurement. L4: L40S (same Ada generation, GDDR6, PCIe, no NVLink).
# MI300X: H100-SXM (no AMD data in AIConfigurator or shared/data; a different software stack, ROCm).
FALLBACK_FROM: dict[str, str] = {"L4": "L40S", "MI300X": "H100-SXM"}


def default_calibration(gpu: GpuSpec, model: ModelSpec) -> Calibration:
    """The calibration a tier gets when none is given (see the module docstring for the order).

    Speed: the GPU's own fitted preset (A40: CONSERVE_A40_VLLM011; AIC_GPU_CALIBRATIONS), else the fallback
    GPU's, labelled, else the A40's (a GPU defined inline). Power: GEMM power density grows with GEMM size:
    Qwen3-0.6B's (hidden 1,024) GEMMs demand 0.445 of the dynamic range on the A40 (fit_conserve_a40), while
    llama2-70b/bloom-176b prefills (hidden 8,192/14,336) reach TDP (Splitwise peak_power ~1.0). Between the
    two anchors we interpolate linearly in log2(hidden_size), clamped -- modelled, not measured. Splitwise's
    stack is available as SPLITWISE_VLLM for its older, slower engine.
    """
    return _default_for(gpu.name, model.hidden_size)


@functools.lru_cache(maxsize=256)
def _default_for(gpu_name: str, hidden_size: int) -> Calibration:
    base = CONSERVE_A40_VLLM011
    label = ""
    if gpu_name in AIC_GPU_CALIBRATIONS:
        base = AIC_GPU_CALIBRATIONS[gpu_name]
    elif gpu_name in FALLBACK_FROM:
        src = FALLBACK_FROM[gpu_name]
        base = AIC_GPU_CALIBRATIONS[src]
        label = f"fallback for {gpu_name} (no measurement): "
    elif gpu_name != "A40":
        label = f"fallback for {gpu_name} (no measurement): "
    lo, hi = CONSERVE_A40_VLLM011.power_gemm_frac, SPLITWISE_VLLM.power_gemm_frac
    x = min(max(math.log2(max(hidden_size, 1) / 1024) / 3.0, 0.0), 1.0)  # 1,024 -> 0, 8,192 -> 1
    if x == 0.0 and not label:
        return base
    name = base.name if x == 0.0 else f"{base.name}+gemm-power-h{hidden_size}"
    if label:
        name = f"fallback({gpu_name}<-{base.name})" + name[len(base.name) :]
    return replace(
        base,
        power_gemm_frac=lo + (hi - lo) * x,
        name=name,
        source=label + base.source if label else base.source,
    )
