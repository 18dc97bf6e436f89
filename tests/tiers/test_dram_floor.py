"""A power cap cannot move DRAM traffic below the memory devices' energy per bit (tiers/power.py).

Before the floor, a 100 W cap on the A40 left a memory-bound decode step as fast as at 300 W while drawing
100 W, i.e. ~5 pJ of dynamic energy per bit moved: less than GDDR6 devices alone draw (7.5 pJ/bit, Micron)."""

from __future__ import annotations

import pytest

from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel
from tiers.power import DRAM_PJ_PER_BIT, mem_cap_slowdown

# a KV-heavy decode step on the paper's engines: 32 sequences of ~16k tokens
BATCH, CONTEXT = 32, 520_000


def _a40(cap_w: float) -> TierModel:
    return TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"), 1, cap_w)


@pytest.mark.parametrize("cap_w", [100.0, 150.0, 200.0, 250.0, 300.0])
def test_decode_dynamic_energy_per_bit_not_below_the_dram_devices(cap_w: float) -> None:
    tm = _a40(cap_w)
    t = tm.decode_step_time_s(BATCH, CONTEXT)
    dyn_j = (tm.decode_power_w(BATCH, CONTEXT) - tm.idle_w) * t
    bits = (tm.model.weight_bytes + CONTEXT * tm.model.kv_bytes_per_token) * 8
    assert dyn_j / bits >= DRAM_PJ_PER_BIT["A40"] * 1e-12 * 0.999


def test_a40_decode_unchanged_at_200w_slowed_at_100w() -> None:
    """200 W: within the measured +-10% of 300 W (conserve/decode_grid_diff_200W_vs_300W.csv), the floor does
    not bind; 100 W (23 W above idle, under the ~35 W of DRAM traffic) slows the memory-bound step."""
    t300 = _a40(300).decode_step_time_s(BATCH, CONTEXT)
    assert _a40(200).decode_step_time_s(BATCH, CONTEXT) == pytest.approx(t300, rel=1e-12)
    assert _a40(150).decode_step_time_s(BATCH, CONTEXT) == pytest.approx(t300, rel=1e-12)
    assert _a40(100).decode_step_time_s(BATCH, CONTEXT) > 1.4 * t300


def test_no_floor_without_a_figure_and_the_rule() -> None:
    assert "H100-SXM" not in DRAM_PJ_PER_BIT  # no public per-bit figure for HBM3 here: no floor
    assert mem_cap_slowdown(35.0, 77.0, 200.0) == 1.0
    assert mem_cap_slowdown(46.0, 77.0, 100.0) == pytest.approx(2.0)
