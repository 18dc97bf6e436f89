"""Performance and power model of one tier: a GPU type x model x tensor-parallel size x power cap.

Roofline per step with calibrated efficiencies (DESIGN.md section 4; equations in docs/tiers.md). Pure; must
not import fastapi, sqlalchemy or httpx (nor orchestrator). SI units inside (seconds, watts, joules, bytes).

THIS IS THE CONTRACT other packages code against. Keep these names and signatures stable:
    TierModel.prefill_time_s(new_tokens, cached_tokens=0)
    TierModel.decode_step_time_s(batch, context_tokens)
    TierModel.step_time_s(prefill_tokens, prefill_cached_tokens, decode_batch, decode_context_tokens)
    TierModel.kv_capacity_tokens
    TierModel.idle_w / prefill_power_w(new_tokens) / decode_power_w(batch) / step_power_w(...)
    TierModel.name, .gpu, .model, .tp, .power_cap_w, .cap_w, .gpus, .calibration
Additions (optional arguments at the end, new methods): decode_power_w(batch, context_tokens=None),
step_power_w(..., decode_context_tokens=None, prefill_cached_tokens=0), prefill_energy_j,
decode_step_energy_j, step_energy_j, prefill_batch_time_s, kv_transfer_time_s, profile.

The methods are called millions of times by the simulator: every model constant is computed once in
``__post_init__`` and stored in private slots, so a call is a handful of float operations.

Model (per instance = tp GPUs; "s_gemm"/"s_attn" are power-cap slowdowns from tiers.power):

    prefill(n, c) = prefill_overhead_s + tp_latency_s
                    + max(n*k_dense*s_gemm + n*(c + n/2)*k_attn*s_attn, weights_read_s) + n*k_comm
    decode(B, C)  = max(step_overhead_s + per_sequence_s*B,                               # CPU (overlapped)
                        gpu_fixed_s + gpu_per_sequence_s*B
                        + max(weights_read_s + C*kv_read_s, B*k_dense*s_gemm + C*k_attn*s_attn) + B*k_comm)

with k_dense = 2*params/(tp*peak*compute_efficiency), k_attn = 4*layers*heads*head_dim/(tp*peak*ce),
weights_read_s = weight_bytes/(tp*bw*bandwidth_efficiency), kv_read_s = kv_bytes_per_token/(tp*bw*be),
k_comm = tensor-parallel all-reduce bytes per token / (intra-node link bandwidth * tp_link_efficiency),
tp_latency_s = tp_layer_latency_s*layers*log2(tp), gpu_fixed_s = layer_overhead_s*layers + tp_latency_s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tiers.catalog import GpuSpec, get_gpu
from tiers.errors import CatalogError
from tiers.links import LinkType, kv_transfer_time_s, tp_link_bandwidth_bytes_per_s
from tiers.models import ModelSpec, get_model
from tiers.power import DRAM_PJ_PER_BIT, cap_slowdown, check_cap, dram_traffic_w, draw_w, mem_cap_slowdown
from tiers.presets import (  # re-exported: the names other packages and tests import from tiers.perf
    _AUTO,
    CONSERVE_A40_VLLM011,
    SPLITWISE_VLLM,
    Calibration,
    default_calibration,
)

__all__ = ["CONSERVE_A40_VLLM011", "SPLITWISE_VLLM", "Calibration", "TierModel", "default_calibration"]

if TYPE_CHECKING:
    from tiers.capcurves import CapCurves
    from tiers.profiles import MeasuredProfile, ProfileCorrection


def _imported_profile(gpu: GpuSpec, model: ModelSpec, tp: int) -> MeasuredProfile | None:
    """AIConfigurator's profile of a catalog GPU x catalog model x TP size (tiers/aiconfigurator.py), or None.

    Only for the catalog's own specs: an inline GPU or model that borrows a catalog name is not what was
    measured."""
    from tiers import aiconfigurator as aic

    if not aic.enabled() or not aic.supported(gpu.name, model.name, tp):
        return None
    if get_gpu(gpu.name) != gpu or get_model(model.name) != model:
        return None
    return aic.lookup(gpu.name, model.name, tp)


def _log2(x: int) -> float:
    return math.log2(x) if x > 1 else 0.0


@dataclass(frozen=True, slots=True)
class TierModel:
    gpu: GpuSpec
    model: ModelSpec
    tp: int = 1
    power_cap_w: float | None = None  # None: uncapped (TDP)
    # vLLM's default gpu_memory_utilization; the reserve reproduces the paper's ~308k-token A40 engines
    # (see kv_capacity_tokens).
    gpu_memory_utilization: float = 0.9
    activation_reserve_bytes: float = 6.68e9
    block_size_tokens: int = 16
    calibration: Calibration = _AUTO
    profile: MeasuredProfile | None = None
    cap_curves: CapCurves | None = None  # measured cap slowdowns (tiers/capcurves.py); None: modelled (DVFS)
    # extra seconds per decode step with >= 2 running sequences: a serving engine's per-step overhead over
    # the offline grid the calibration is fitted to (tiers.serving.with_serving_overhead); 0: offline engine
    serving_overhead_s: float = 0.0

    # derived constants (computed in __post_init__; not part of the constructor)
    _k_dense: float = field(init=False, repr=False, compare=False, default=0.0)
    _k_attn: float = field(init=False, repr=False, compare=False, default=0.0)
    _k_comm: float = field(init=False, repr=False, compare=False, default=0.0)
    _weights_read_s: float = field(init=False, repr=False, compare=False, default=0.0)
    _kv_read_s: float = field(init=False, repr=False, compare=False, default=0.0)
    _prefill_fixed_s: float = field(init=False, repr=False, compare=False, default=0.0)
    _gpu_fixed_s: float = field(init=False, repr=False, compare=False, default=0.0)
    _step_overhead_s: float = field(init=False, repr=False, compare=False, default=0.0)
    _per_seq_s: float = field(init=False, repr=False, compare=False, default=0.0)
    _gpu_per_seq_s: float = field(init=False, repr=False, compare=False, default=0.0)
    _s_gemm: float = field(init=False, repr=False, compare=False, default=1.0)
    _s_attn: float = field(init=False, repr=False, compare=False, default=1.0)
    _idle_gpu_w: float = field(init=False, repr=False, compare=False, default=0.0)
    _dyn_w: float = field(init=False, repr=False, compare=False, default=0.0)
    _cap_dyn_w: float = field(init=False, repr=False, compare=False, default=0.0)
    _draw_active_w: float = field(init=False, repr=False, compare=False, default=0.0)
    _draw_gemm_w: float = field(init=False, repr=False, compare=False, default=0.0)
    _draw_attn_w: float = field(init=False, repr=False, compare=False, default=0.0)
    _correction: ProfileCorrection | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        g, m, tp = self.gpu, self.model, self.tp
        if tp < 1:
            raise CatalogError(f"tensor-parallel size must be >= 1, got {tp}")
        cap = self.power_cap_w
        if cap is not None and not (g.power_cap_min_w <= cap <= g.power_cap_max_w):
            raise CatalogError(
                f"power cap {cap} W is outside {g.name}'s range "
                f"{g.power_cap_min_w:g}-{g.power_cap_max_w:g} W. To fix: choose a cap in that range."
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise CatalogError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}. "
                "To fix: use vLLM's meaning, e.g. 0.9."
            )
        if self.block_size_tokens < 1:
            raise CatalogError(f"block_size_tokens must be >= 1, got {self.block_size_tokens}")
        if not self.serving_overhead_s >= 0.0:
            raise CatalogError(f"serving_overhead_s must be >= 0, got {self.serving_overhead_s}")
        if self.calibration is _AUTO:
            object.__setattr__(self, "calibration", default_calibration(g, m))
            if self.profile is None:
                object.__setattr__(self, "profile", _imported_profile(g, m, tp))
        c = self.calibration
        cap_w = self.cap_w
        check_cap(cap_w, g.idle_w, g.name)
        peak = g.peak_flops * tp * c.compute_efficiency
        bw = g.bandwidth_bytes_per_s * tp * c.bandwidth_efficiency
        tp_lat = c.tp_layer_latency_s * m.layers * _log2(tp)
        if tp > 1:
            # Megatron TP: 2 all-reduces per layer of hidden_size activations per token; a ring moves
            # 2*(tp-1)/tp of the message per GPU.
            comm_bytes = 2 * m.layers * m.hidden_size * m.dtype_bytes * 2.0 * (tp - 1) / tp
            k_comm = comm_bytes / (tp_link_bandwidth_bytes_per_s(g.name) * c.tp_link_efficiency)
        else:
            k_comm = 0.0
        s = object.__setattr__
        s(self, "_k_dense", m.flops_per_token / peak)
        s(self, "_k_attn", 4.0 * m.layers * m.attention_heads * m.head_dim / peak)
        s(self, "_k_comm", k_comm)
        s(self, "_weights_read_s", m.weight_bytes / bw)
        s(self, "_kv_read_s", m.kv_bytes_per_token / bw)
        s(self, "_prefill_fixed_s", c.prefill_overhead_s + tp_lat)
        s(self, "_gpu_fixed_s", c.layer_overhead_s * m.layers + tp_lat)
        s(self, "_step_overhead_s", c.step_overhead_s)
        s(self, "_per_seq_s", c.per_sequence_s)
        s(self, "_gpu_per_seq_s", c.gpu_per_sequence_s)
        s(self, "_s_gemm", cap_slowdown(c.power_gemm_frac, g.idle_w, g.tdp_w, cap_w, c.cap_exponent))
        s(self, "_s_attn", cap_slowdown(c.power_attn_frac, g.idle_w, g.tdp_w, cap_w, c.cap_exponent))
        if self.cap_curves is None:
            # memory traffic's energy floor (tiers/power.py): a cap too low for one GPU's DRAM traffic at full
            # bandwidth stretches its memory reads (measured curves below include that effect)
            dram_w = dram_traffic_w(
                g.bandwidth_bytes_per_s * c.bandwidth_efficiency, DRAM_PJ_PER_BIT.get(g.name)
            )
            s_mem = mem_cap_slowdown(dram_w, g.idle_w, cap_w)
            s(self, "_weights_read_s", self._weights_read_s * s_mem)
            s(self, "_kv_read_s", self._kv_read_s * s_mem)
        else:  # measured (orchestrator profile --micro) instead of modelled
            s_compute, s_memory = self.cap_curves.slowdowns(cap_w)
            s(self, "_s_gemm", s_compute)
            s(self, "_s_attn", s_compute)
            s(self, "_weights_read_s", self._weights_read_s * s_memory)
            s(self, "_kv_read_s", self._kv_read_s * s_memory)
        idle = g.idle_w
        if self.profile is not None and self.profile.idle_w is not None:
            idle = self.profile.idle_w / tp
        s(self, "_idle_gpu_w", idle)
        s(self, "_dyn_w", g.tdp_w - g.idle_w)
        s(self, "_cap_dyn_w", cap_w - g.idle_w)
        s(self, "_draw_active_w", draw_w(c.power_active_frac, g.idle_w, g.tdp_w, cap_w) - g.idle_w + idle)
        s(self, "_draw_gemm_w", draw_w(c.power_gemm_frac, g.idle_w, g.tdp_w, cap_w) - g.idle_w + idle)
        s(self, "_draw_attn_w", draw_w(c.power_attn_frac, g.idle_w, g.tdp_w, cap_w) - g.idle_w + idle)
        if self.profile is not None:
            from tiers.profiles import build_correction

            s(self, "_correction", build_correction(self, self.profile))

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

    @property
    def source(self) -> str:
        """Where this tier's speed numbers come from: 'measured profile: ...' (orchestrator profile or
        AIConfigurator's tables), else 'calibration <name>: ...' (a fitted preset, or a labelled fallback)."""
        if self.profile is not None:
            return f"measured profile: {self.profile.source} (roofline: {self.calibration.name})"
        return f"calibration {self.calibration.name}: {self.calibration.source}"

    def without_profile(self) -> TierModel:
        """The same tier with the pure (calibrated roofline) model."""
        if self.profile is None:
            return self
        return TierModel(
            self.gpu,
            self.model,
            self.tp,
            self.power_cap_w,
            self.gpu_memory_utilization,
            self.activation_reserve_bytes,
            self.block_size_tokens,
            self.calibration,
            None,
            self.cap_curves,
        )

    # ---- speed: the roofline ----------------------------------------------------------------------
    def _prefill_parts(
        self, new_tokens: int, cached_tokens: int, sequences: int
    ) -> tuple[float, float, float]:
        """(gemm_s, attn_s, comm_s) of a prefill, cap slowdown included; weights-read floor in gemm_s."""
        n_total = new_tokens * sequences
        gemm = n_total * self._k_dense * self._s_gemm
        attn = sequences * new_tokens * (cached_tokens + 0.5 * new_tokens) * self._k_attn * self._s_attn
        if gemm + attn < self._weights_read_s:  # tiny prefill: bound by reading the weights once
            return self._weights_read_s, 0.0, n_total * self._k_comm
        return gemm, attn, n_total * self._k_comm

    def roofline_prefill_time_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        if new_tokens <= 0:
            return 0.0
        gemm, attn, comm = self._prefill_parts(new_tokens, cached_tokens, 1)
        return self._prefill_fixed_s + gemm + attn + comm

    def roofline_decode_step_time_s(self, batch: int, context_tokens: int) -> float:
        if batch <= 0:
            return 0.0
        mem = self._weights_read_s + context_tokens * self._kv_read_s
        comp = batch * self._k_dense * self._s_gemm + context_tokens * self._k_attn * self._s_attn
        gpu = self._gpu_fixed_s + self._gpu_per_seq_s * batch + (mem if mem > comp else comp)
        gpu += batch * self._k_comm
        cpu = self._step_overhead_s + self._per_seq_s * batch
        return cpu if cpu > gpu else gpu

    # ---- speed: public (profile-corrected where a profile is given) -------------------------------
    def prefill_time_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        if new_tokens <= 0:
            return 0.0
        gemm, attn, comm = self._prefill_parts(new_tokens, cached_tokens, 1)
        t = self._prefill_fixed_s + gemm + attn + comm
        if self._correction is not None:
            t *= self._correction.prefill_time_ratio(new_tokens, cached_tokens)
        return t

    def prefill_batch_time_s(
        self, sequences: int, new_tokens_each: int, cached_tokens_each: int = 0
    ) -> float:
        """One prefill step over `sequences` prompts of `new_tokens_each` tokens each (batched prefill)."""
        if sequences <= 0 or new_tokens_each <= 0:
            return 0.0
        gemm, attn, comm = self._prefill_parts(new_tokens_each, cached_tokens_each, sequences)
        t = self._prefill_fixed_s + gemm + attn + comm
        if self._correction is not None:
            t *= self._correction.prefill_time_ratio(new_tokens_each * sequences, cached_tokens_each)
        return t

    def decode_step_time_s(self, batch: int, context_tokens: int) -> float:
        t = self.roofline_decode_step_time_s(batch, context_tokens)
        if self._correction is not None and batch > 0:
            t *= self._correction.decode_time_ratio(batch, context_tokens)
        if batch >= 2:
            t += self.serving_overhead_s
        return t

    def step_time_s(
        self, prefill_tokens: int, prefill_cached_tokens: int, decode_batch: int, decode_context_tokens: int
    ) -> float:
        """One continuous-batching step that prefills a chunk and decodes a batch together.

        The chunk's GPU work (GEMMs, attention, all-reduce) adds to the decode step; its fixed per-request
        overhead is paid once per step, hidden in the step's own overhead."""
        if prefill_tokens <= 0:
            return self.decode_step_time_s(decode_batch, decode_context_tokens)
        if decode_batch <= 0:
            return self.prefill_time_s(prefill_tokens, prefill_cached_tokens)
        gemm, attn, comm = self._prefill_parts(prefill_tokens, prefill_cached_tokens, 1)
        pre = gemm + attn + comm
        if self._correction is not None:
            pre *= self._correction.prefill_time_ratio(prefill_tokens, prefill_cached_tokens)
        return self.decode_step_time_s(decode_batch, decode_context_tokens) + pre

    def kv_transfer_time_s(self, tokens: int, link: LinkType | str = LinkType.PCIE) -> float:
        """Seconds to move `tokens` tokens of this model's KV cache over `link` (tiers.links)."""
        return kv_transfer_time_s(tokens, self.model.kv_bytes_per_token, link)

    # ---- memory ---------------------------------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        """KV tokens that fit: (memory*utilisation - weights - activation reserve) / bytes per token, whole
        blocks. The default reserve (6.68 GB per GPU: vLLM's profiled activation peak, CUDA graphs and
        non-torch memory) is set so the paper's A40 + Qwen3-0.6B engines hold ~308k tokens (DESIGN.md 4):
        0.9 * 48 GB - 1.19 GB - 6.68 GB = 35.33 GB = 308,050 tokens of 114,688 B."""
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
        return self._idle_gpu_w * self.tp

    def _prefill_energy_gpu_j(self, new_tokens: int, cached_tokens: int) -> tuple[float, float]:
        """(energy per GPU in J, duration in s) of a prefill, roofline only."""
        gemm, attn, comm = self._prefill_parts(new_tokens, cached_tokens, 1)
        fixed = self._prefill_fixed_s
        e = self._draw_active_w * (fixed + comm) + self._draw_gemm_w * gemm + self._draw_attn_w * attn
        return e, fixed + gemm + attn + comm

    def prefill_energy_j(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """Energy of the whole instance (tp GPUs) for one prefill, idle draw included."""
        if new_tokens <= 0:
            return 0.0
        e, dur = self._prefill_energy_gpu_j(new_tokens, cached_tokens)
        e *= self.tp
        if self._correction is not None:
            r_t = self._correction.prefill_time_ratio(new_tokens, cached_tokens)
            r_p = self._correction.prefill_power_ratio(new_tokens)
            e *= r_t * r_p
            e = max(e, self.idle_w * dur * r_t)
        return e

    def prefill_power_w(self, new_tokens: int) -> float:
        """Mean draw of the instance while it prefills `new_tokens` uncached tokens."""
        if new_tokens <= 0:
            return self.idle_w
        return self.prefill_energy_j(new_tokens) / self.prefill_time_s(new_tokens)

    def _decode_draw_gpu_w(self, batch: int, context_tokens: int) -> float:
        mem = self._weights_read_s + context_tokens * self._kv_read_s
        comp = batch * self._k_dense * self._s_gemm + context_tokens * self._k_attn * self._s_attn
        step = self.roofline_decode_step_time_s(batch, context_tokens)
        c = self.calibration
        frac = c.power_active_frac + c.power_mem_frac * min(1.0, mem / step)
        frac += c.power_gemm_frac * min(1.0, comp / step)
        dyn = frac * self._dyn_w
        return self._idle_gpu_w + (dyn if dyn < self._cap_dyn_w else self._cap_dyn_w)

    def decode_power_w(self, batch: int, context_tokens: int | None = None) -> float:
        """Mean draw of the instance during decode steps of `batch` sequences over `context_tokens` KV tokens.

        Pass context_tokens: memory traffic is most of decode power. Without it the step is costed with no KV
        (weights only), a lower bound."""
        if batch <= 0:
            return self.idle_w
        ctx = 0 if context_tokens is None else context_tokens
        p = self._decode_draw_gpu_w(batch, ctx) * self.tp
        if self._correction is not None:
            p = max(self.idle_w, p * self._correction.decode_power_ratio(batch, ctx))
        return p

    def decode_step_energy_j(self, batch: int, context_tokens: int) -> float:
        if batch <= 0:
            return 0.0
        return self.decode_power_w(batch, context_tokens) * self.decode_step_time_s(batch, context_tokens)

    def step_energy_j(
        self, prefill_tokens: int, prefill_cached_tokens: int, decode_batch: int, decode_context_tokens: int
    ) -> float:
        """Energy of the instance over one step_time_s(...) step (idle draw included)."""
        if prefill_tokens <= 0:
            return self.decode_step_energy_j(decode_batch, decode_context_tokens)
        if decode_batch <= 0:
            return self.prefill_energy_j(prefill_tokens, prefill_cached_tokens)
        dec_t = self.decode_step_time_s(decode_batch, decode_context_tokens)
        total_t = self.step_time_s(prefill_tokens, prefill_cached_tokens, decode_batch, decode_context_tokens)
        gemm, attn, comm = self._prefill_parts(prefill_tokens, prefill_cached_tokens, 1)
        pre_e = (self._draw_active_w * comm + self._draw_gemm_w * gemm + self._draw_attn_w * attn) * self.tp
        pre_t = gemm + attn + comm
        if self._correction is not None and pre_t > 0:
            pre_e *= (total_t - dec_t) / pre_t
        return self.decode_power_w(decode_batch, decode_context_tokens) * dec_t + pre_e

    def step_power_w(
        self,
        prefill_tokens: int,
        decode_batch: int,
        decode_context_tokens: int | None = None,
        prefill_cached_tokens: int = 0,
    ) -> float:
        """Mean draw of the instance over a step (idle when there is no work)."""
        if prefill_tokens <= 0 and decode_batch <= 0:
            return self.idle_w
        ctx = 0 if decode_context_tokens is None else decode_context_tokens
        t = self.step_time_s(prefill_tokens, prefill_cached_tokens, decode_batch, ctx)
        if t <= 0:
            return self.idle_w
        return self.step_energy_j(prefill_tokens, prefill_cached_tokens, decode_batch, ctx) / t
