"""The model meter costs decode with its KV context (issue 14, the serve-vs-simulate gap): the decode draw
of the tier model depends on the KV read per step; without the context it is the weights-only lower bound."""

from __future__ import annotations

import pytest

from energy.meters import Activity, modelled_energy_j
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel


def test_decode_energy_uses_the_context_the_engine_reported() -> None:
    tm = TierModel(get_gpu("H200-SXM"), get_model("Llama-3.1-8B"))
    batch, ctx, tokens, wall = 8, 8 * 16_000, 800, 5.0
    act = Activity(decode_tokens=tokens, decode_batch=batch, decode_context_tokens=ctx)
    step = tm.decode_step_time_s(batch, ctx)
    want = tm.idle_w * wall + (tokens / batch) * step * (tm.decode_power_w(batch, ctx) - tm.idle_w)
    assert modelled_energy_j(tm, act, wall) == pytest.approx(want, rel=1e-9)
    assert tm.decode_power_w(batch, ctx) > tm.decode_power_w(batch)  # the context matters here
