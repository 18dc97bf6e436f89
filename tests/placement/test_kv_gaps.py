"""Pinned KV across tool gaps (placement/kv_gaps.py): the offload decision on a scripted gap, and its rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placement.base import InstanceView, Role
from placement.errors import PlacementError
from placement.kv_gaps import GapAction, HostMemory, gap_action, gap_costs, kv_pressure
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel

A40 = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
HOST = HostMemory(capacity_bytes=256e9)
CTX = 17_000  # a conversation of the paper's trace after turn 1 (~16k prompt + output)


def decoder(waiting: int, used: int) -> InstanceView:
    return InstanceView("d0", Role.DECODE, "a40", waiting_seqs=waiting, kv_used_tokens=used,
                        kv_capacity_tokens=A40.kv_capacity_tokens)  # fmt: skip


def test_scripted_gap_keep_then_offload_under_pressure() -> None:
    """A 40 s tool gap on a decoder that comes under pressure 5 s into it: kept while the decoder has room,
    kept under pressure until idle as long as a restore from host memory takes, then offloaded (not dropped:
    reading 1.95 GB back over PCIe 4.0 x16 takes ~62 ms, re-prefilling 17k tokens ~0.66 s)."""
    costs = gap_costs(CTX, A40, HOST)
    assert costs.kv_bytes == CTX * 114_688
    assert costs.offload_restore_s == pytest.approx(CTX * 114_688 / 31.5e9)
    assert costs.offload_restore_s is not None and costs.offload_restore_s < costs.drop_restore_s
    free = decoder(0, 100_000)
    busy = decoder(3, A40.kv_capacity_tokens)
    timeline = [
        (0.0, free),
        (4.9, free),
        (5.0, busy),
        (5.0 + costs.offload_restore_s * 0.5, busy),
        (6.0, busy),
    ]
    actions = [gap_action(t, kv_pressure(d), costs, HOST.capacity_bytes) for t, d in timeline]
    assert actions == [
        GapAction.KEEP,
        GapAction.KEEP,
        GapAction.OFFLOAD,
        GapAction.OFFLOAD,
        GapAction.OFFLOAD,
    ]
    # under pressure from the start, a gap shorter than the restore keeps its KV (no restore is paid)
    assert gap_action(0.01, True, costs, HOST.capacity_bytes) is GapAction.KEEP
    assert gap_action(costs.offload_restore_s, True, costs, HOST.capacity_bytes) is GapAction.OFFLOAD


def test_a_full_host_tier_drops_after_the_re_prefill_time() -> None:
    costs = gap_costs(CTX, A40, HOST)
    assert gap_action(0.5, True, costs, host_free_bytes=1e9) is GapAction.KEEP  # 0.5 s < ~0.66 s re-prefill
    assert gap_action(1.0, True, costs, host_free_bytes=1e9) is GapAction.DROP
    no_host = gap_costs(CTX, A40, None)
    assert no_host.offload_restore_s is None and gap_action(1.0, True, no_host) is GapAction.DROP


def test_energy_of_each_mechanism() -> None:
    costs = gap_costs(CTX, A40, HOST)
    assert costs.offload_energy_j is not None and costs.offload_restore_s is not None
    assert costs.offload_energy_j == pytest.approx(2 * costs.offload_restore_s * A40.idle_w)
    assert costs.drop_energy_j == pytest.approx(A40.prefill_energy_j(CTX))
    assert costs.offload_energy_j < costs.drop_energy_j  # copying is cheaper than recomputing here


def test_pressure_is_waiting_work_or_a_full_cache() -> None:
    assert not kv_pressure(decoder(0, 100))
    assert kv_pressure(decoder(1, 100))
    assert kv_pressure(decoder(0, A40.kv_capacity_tokens))


def test_bad_host_tier_is_refused() -> None:
    with pytest.raises(PlacementError, match="To fix"):
        HostMemory(capacity_bytes=1e9, bandwidth_bytes_per_s=0)


@settings(max_examples=200, deadline=None)
@given(
    idle=st.floats(0, 600),
    later=st.floats(0, 600),
    ctx=st.integers(1, 200_000),
    host_free=st.floats(0, 1e12),
    pressure=st.booleans(),
)
def test_without_pressure_always_keep_and_a_release_is_never_undone_by_waiting(
    idle: float, later: float, ctx: int, host_free: float, pressure: bool
) -> None:
    costs = gap_costs(ctx, A40, HOST)
    a = gap_action(idle, pressure, costs, host_free)
    if not pressure:
        assert a is GapAction.KEEP
    if a is not GapAction.KEEP:  # idle longer under the same observation: still released, the same way
        assert gap_action(idle + later, pressure, costs, host_free) is a
