"""Performance and power model of one tier: a GPU type x model x tensor-parallel size x power cap.

Roofline per step with calibrated efficiencies (DESIGN.md section 4). Pure; must not import fastapi,
sqlalchemy or httpx. SI units inside (seconds, watts, joules, bytes).

THIS IS THE CONTRACT other packages code against. Keep these names and signatures stable:
    TierModel.prefill_time_s(new_tokens, cached_tokens=0)
    TierModel.decode_step_time_s(batch, context_tokens)
    TierModel.step_time_s(prefill_tokens, prefill_cached_tokens, decode_batch, decode_context_tokens)
    TierModel.kv_capacity_tokens
    TierModel.idle_w / prefill_power_w(new_tokens) / decode_power_w(batch) / step_power_w(...)
    TierModel.name, .gpu, .model, .tp, .power_cap_w, .gpus
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tiers.catalog import GpuSpec
from tiers.errors import CatalogError
from tiers.models import ModelSpec


@dataclass(frozen=True, slots=True)
class Calibration:
    """Efficiencies and overheads fitted to measurements (see tiers/calibration.py for the fits)."""

    compute_efficiency: float = 0.57  # A40 Qwen3-0.6B prefill fit (prefill_vs_L_300W_200W.csv)
    bandwidth_efficiency: float = 0.8
    prefill_overhead_s: float = 0.024  # fixed per prefill request (A40 fit intercept 24.22 ms)
    step_overhead_s: float = 0.0105  # fixed per decode step (A40 decode alpha 12.27 ms minus weight read)
    per_sequence_s: float = 24.1e-6  # per running sequence per step (A40 decode beta 24.129 us)
    source: str = "A40 + Qwen3-0.6B, ConServe artifact"


@dataclass(frozen=True, slots=True)
class TierModel:
    gpu: GpuSpec
    model: ModelSpec
    tp: int = 1
    power_cap_w: float | None = None  # None: uncapped (TDP)
    gpu_memory_utilization: float = 0.9
    activation_reserve_bytes: float = 1.0e9
    block_size_tokens: int = 16
    calibration: Calibration = field(default_factory=Calibration)

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise CatalogError(f"tensor-parallel size must be >= 1, got {self.tp}")
        cap = self.power_cap_w
        if cap is not None and not (self.gpu.power_cap_min_w <= cap <= self.gpu.power_cap_max_w):
            raise CatalogError(
                f"power cap {cap} W is outside {self.gpu.name}'s range "
                f"{self.gpu.power_cap_min_w:g}-{self.gpu.power_cap_max_w:g} W. To fix: choose a cap in that range."
            )

    # ---- identity -------------------------------------------------------------------------------
    @property
    def gpus(self) -> int:
        return self.tp

    @property
    def cap_w(self) -> float:
        return self.power_cap_w if self.power_cap_w is not None else self.gpu.tdp_w

    @property
    def name(self) -> str:
        return f"{self.gpu.name}@{self.cap_w:g}W/tp{self.tp}"

    # ---- speed ----------------------------------------------------------------------------------
    def _compute_slowdown(self) -> float:
        """Factor (>= 1) by which a power cap slows compute-bound work. First-order placeholder."""
        g = self.gpu
        if self.cap_w >= g.tdp_w:
            return 1.0
        frac = (self.cap_w - g.idle_w) / (g.tdp_w - g.idle_w)
        return max(1.0, frac ** (-1.0 / 2.9))

    def prefill_time_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        if new_tokens <= 0:
            return 0.0
        flops = self.model.prefill_flops(new_tokens, cached_tokens) / self.tp
        compute = flops / (self.gpu.peak_flops * self.calibration.compute_efficiency) * self._compute_slowdown()
        return self.calibration.prefill_overhead_s + compute

    def decode_step_time_s(self, batch: int, context_tokens: int) -> float:
        if batch <= 0:
            return 0.0
        bytes_read = (self.model.weight_bytes + context_tokens * self.model.kv_bytes_per_token) / self.tp
        mem = bytes_read / (self.gpu.bandwidth_bytes_per_s * self.calibration.bandwidth_efficiency)
        return self.calibration.step_overhead_s + mem + self.calibration.per_sequence_s * batch

    def step_time_s(
        self, prefill_tokens: int, prefill_cached_tokens: int, decode_batch: int, decode_context_tokens: int
    ) -> float:
        """One continuous-batching step that prefills a chunk and decodes a batch together."""
        if prefill_tokens <= 0:
            return self.decode_step_time_s(decode_batch, decode_context_tokens)
        pre = self.prefill_time_s(prefill_tokens, prefill_cached_tokens) - self.calibration.prefill_overhead_s
        dec = self.decode_step_time_s(max(decode_batch, 1), decode_context_tokens)
        return dec + pre

    # ---- memory ---------------------------------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        free = (
            self.gpu.memory_bytes * self.tp * self.gpu_memory_utilization
            - self.model.weight_bytes
            - self.activation_reserve_bytes * self.tp
        )
        tokens = int(free // self.model.kv_bytes_per_token)
        return max(0, tokens - tokens % self.block_size_tokens)

    # ---- power (per instance = tp GPUs) ---------------------------------------------------------
    @property
    def idle_w(self) -> float:
        return self.gpu.idle_w * self.tp

    def prefill_power_w(self, new_tokens: int) -> float:
        return min(self.cap_w, self.gpu.tdp_w) * self.tp

    def decode_power_w(self, batch: int) -> float:
        g = self.gpu
        draw = g.idle_w + 0.6 * (g.tdp_w - g.idle_w)
        return min(self.cap_w, draw) * self.tp

    def step_power_w(self, prefill_tokens: int, decode_batch: int) -> float:
        if prefill_tokens > 0:
            return self.prefill_power_w(prefill_tokens)
        if decode_batch > 0:
            return self.decode_power_w(decode_batch)
        return self.idle_w
