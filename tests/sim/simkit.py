"""Small fleets and workloads for the simulator tests (built directly from the tier contracts).

A plain module (not conftest.py) so `from simkit import ...` cannot pick up another directory's conftest.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.workload import ConversationSpec, TurnSpec
from placement.base import Role
from tiers.catalog import GpuSpec, get_gpu
from tiers.models import get_model
from tiers.perf import TierModel


@dataclass(frozen=True, slots=True)
class Inst:
    instance_id: str
    tier: str
    role: Role
    tier_model: TierModel


def a40(cap_w: float | None = None) -> TierModel:
    return TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"), power_cap_w=cap_w)


def small_gpu_model() -> TierModel:
    """An A40-like GPU with ~4.5k KV tokens (memory sized for it), so admission queues form quickly."""
    g = get_gpu("A40")
    probe = TierModel(g, get_model("Qwen3-0.6B"))
    # memory such that utilisation * memory - weights - reserve = 4,500 tokens of KV
    mem_bytes = (
        4500 * probe.model.kv_bytes_per_token + probe.model.weight_bytes + probe.activation_reserve_bytes
    ) / probe.gpu_memory_utilization
    tiny = GpuSpec(
        "A40-small",
        g.bf16_dense_tflops,
        mem_bytes / 1e9,
        g.memory_bandwidth_gbps,
        g.tdp_w,
        g.idle_w,
        g.power_cap_min_w,
        g.power_cap_max_w,
        "test fixture: A40 with little memory",
    )
    return TierModel(tiny, get_model("Qwen3-0.6B"))


def disagg(tm: TierModel, prefill: int = 1, decode: int = 3) -> list[Inst]:
    return [Inst(f"p{i}", "a40", Role.PREFILL, tm) for i in range(prefill)] + [
        Inst(f"d{i}", "a40", Role.DECODE, tm) for i in range(decode)
    ]


def colocated(tm: TierModel, n: int = 4) -> list[Inst]:
    return [Inst(f"c{i}", "a40", Role.COLOCATED, tm) for i in range(n)]


def agentic(
    n: int, gap_s: float = 0.0, first: int = 8000, turns: int = 4, spacing_s: float = 0.4, out: int = 60
) -> list[ConversationSpec]:
    convs = []
    for i in range(n):
        ts = [TurnSpec(first + 97 * i, out + 7 * (i % 5))]
        ts += [TurnSpec(67, out + 13 * ((i + k) % 7), gap_s) for k in range(turns - 1)]
        convs.append(ConversationSpec(f"conv-{i}", i * spacing_s, tuple(ts)))
    return convs
