"""GPU catalog: datasheet specs of the accelerators ConServe plans for.

Pure data plus a lookup with "did you mean" suggestions. Must not import fastapi, sqlalchemy or httpx.

Every number carries its source. "Datasheet" means the vendor's public product datasheet for that SKU;
dense BF16 figures are the tensor-core numbers *without* structured sparsity. Idle power is the draw of an
idle GPU with an inference engine loaded (weights resident, no requests); where no measurement is public
the value is marked as an estimate and users should override it with a measured profile.
"""

from __future__ import annotations

from dataclasses import dataclass

from conserve.errors import did_you_mean
from tiers.errors import CatalogError


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU SKU. SI-ish units in the field names."""

    name: str
    bf16_dense_tflops: float
    memory_gb: float  # GB = 1e9 bytes of device memory
    memory_bandwidth_gbps: float  # GB/s (1e9 bytes/s)
    tdp_w: float
    idle_w: float
    power_cap_min_w: float
    power_cap_max_w: float
    source: str

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def peak_flops(self) -> float:
        return self.bf16_dense_tflops * 1e12

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gbps * 1e9


_GPUS: tuple[GpuSpec, ...] = (
    # NVIDIA A40 datasheet: 149.7 TFLOPS BF16 tensor (299.4 with sparsity), 48 GB GDDR6, 696 GB/s, 300 W.
    # Idle 77 W: measured by the ConServe paper with vLLM loaded
    # (shared/data/conserve/cost_model_constants.csv, GPU0_IDLE_POWER_W 75.9-77).
    # Cap range 100-300 W: nvidia-smi "Min/Max Power Limit" on A40.
    GpuSpec(
        "A40",
        149.7,
        48,
        696,
        300,
        77.0,
        100,
        300,
        "NVIDIA A40 datasheet; idle measured in ConServe artifact (cost_model_constants.csv)",
    ),
    # NVIDIA A100 80GB SXM datasheet: 312 TFLOPS BF16 dense, 80 GB HBM2e, 2,039 GB/s, 400 W.
    # Idle 63 W: Splitwise power model (shared/data/splitwise/configs_power_model_constant.yaml).
    GpuSpec(
        "A100-80GB-SXM",
        312,
        80,
        2039,
        400,
        63.0,
        100,
        400,
        "NVIDIA A100 datasheet (80GB SXM); idle from Splitwise constant power model",
    ),
    # NVIDIA H100 SXM5 datasheet: 989 TFLOPS BF16 dense (1,979 sparse), 80 GB HBM3, 3.35 TB/s, 700 W.
    # Idle 75 W: Splitwise power model (configs_power_model_constant.yaml). Cap range 200-700 W (nvidia-smi).
    GpuSpec(
        "H100-SXM",
        989,
        80,
        3350,
        700,
        75.0,
        200,
        700,
        "NVIDIA H100 datasheet (SXM5); idle from Splitwise constant power model",
    ),
    # NVIDIA H200 SXM datasheet: 989 TFLOPS BF16 dense, 141 GB HBM3e, 4.8 TB/s, up to 700 W.
    # Idle: estimate, same board power as H100 SXM (75 W, Splitwise) -- no public measurement.
    GpuSpec(
        "H200-SXM",
        989,
        141,
        4800,
        700,
        75.0,
        200,
        700,
        "NVIDIA H200 datasheet (SXM); idle estimated from H100 (Splitwise)",
    ),
    # NVIDIA L40S datasheet: 362.05 TFLOPS BF16 dense (733 sparse), 48 GB GDDR6, 864 GB/s, 350 W.
    # Idle: estimate 35 W (typical nvidia-smi idle of Ada data-center boards; no engine-loaded measurement
    # public).
    GpuSpec("L40S", 362.05, 48, 864, 350, 35.0, 100, 350, "NVIDIA L40S datasheet; idle is an estimate"),
    # NVIDIA L4 datasheet: 121 TFLOPS BF16 dense (242 sparse), 24 GB GDDR6, 300 GB/s, 72 W.
    # Idle: estimate 16 W; cap range 40-72 W (nvidia-smi on L4).
    GpuSpec("L4", 121, 24, 300, 72, 16.0, 40, 72, "NVIDIA L4 datasheet; idle is an estimate"),
    # NVIDIA HGX B200 datasheet: 2.25 PFLOPS BF16 dense per GPU (4.5 sparse), 180 GB HBM3e, 8 TB/s, 1,000 W.
    # Idle: estimate 140 W (no public engine-loaded idle figure).
    GpuSpec(
        "B200", 2250, 180, 8000, 1000, 140.0, 200, 1000, "NVIDIA HGX B200 datasheet; idle is an estimate"
    ),
    # AMD Instinct MI300X datasheet: 1,307.4 TFLOPS BF16 dense, 192 GB HBM3, 5.3 TB/s, 750 W.
    # Idle: estimate 140 W (no public engine-loaded idle figure).
    GpuSpec(
        "MI300X",
        1307.4,
        192,
        5300,
        750,
        140.0,
        200,
        750,
        "AMD Instinct MI300X datasheet; idle is an estimate",
    ),
)

GPUS: dict[str, GpuSpec] = {g.name: g for g in _GPUS}

# Names people commonly type, mapped to the catalog's canonical names.
_ALIASES: dict[str, str] = {
    "a100": "A100-80GB-SXM",
    "a100-80gb": "A100-80GB-SXM",
    "a100-80gb-sxm": "A100-80GB-SXM",
    "h100": "H100-SXM",
    "h100-80gb": "H100-SXM",
    "h100-sxm": "H100-SXM",
    "h200": "H200-SXM",
    "h200-sxm": "H200-SXM",
    "a40": "A40",
    "l40s": "L40S",
    "l4": "L4",
    "b200": "B200",
    "mi300x": "MI300X",
}


def get_gpu(name: str) -> GpuSpec:
    """Look a GPU up by canonical name or common alias (case-insensitive)."""
    if name in GPUS:
        return GPUS[name]
    canonical = _ALIASES.get(name.lower())
    if canonical:
        return GPUS[canonical]
    for key, spec in GPUS.items():
        if key.lower() == name.lower():
            return spec
    raise CatalogError(
        f"unknown GPU {name!r}.{did_you_mean(name, list(GPUS) + list(_ALIASES))} "
        f"Known GPUs: {', '.join(GPUS)}. "
        "To fix: use one of these names or define the GPU inline in fleet.yaml."
    )
