"""The tail of a decoder's running KV, constraint (4b) (placement/ilp/kvtail.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.workload import workload_stats
from orchestrator.workload_spec import ConversationSpec, TurnSpec
from placement import ilp
from placement.ilp.kvtail import conditional_tail, kv_overflow_share, kv_tail_rate

# a step that grows with the batch (the knife edge where the law spreads): 14 ms + 2.7 ms per sequence
STEPS = 0.014 + 0.0027 * np.arange(0, 256, dtype=float)
K_STEPS = 876.0  # steps per conversation in the batch
CTX, CTX_SD, KV = 17_457.0, 2_781.0, 308_032  # tokens (examples/paper-a40-disagg.yaml's decoders)


def test_deterministic_contexts_overflow_exactly_when_the_batch_passes_capacity_over_context() -> None:
    law = ilp.batch_law(STEPS, 0.3, K_STEPS, 1)
    share = kv_overflow_share(law.pi, law.per_instance, CTX, 0.0, KV)
    assert share == pytest.approx(float(law.pi[law.per_instance * CTX > KV].sum()), rel=1e-12)
    assert 0.0 < share < 1.0


def test_the_normal_sum_of_contexts_matches_an_exact_convolution() -> None:
    # contexts uniform on 64 values around CTX: the sum of k of them by repeated convolution vs the normal
    vals = np.linspace(CTX - 4_800, CTX + 4_800, 64)
    var = float(vals.var())
    for k in (12, 17, 24):
        dist = np.ones(64) / 64
        for _ in range(k - 1):
            dist = np.convolve(dist, np.ones(64) / 64)
        sums = k * vals[0] + np.arange(dist.size) * (vals[1] - vals[0])
        exact = float(dist[sums > KV].sum())
        normal = float(conditional_tail(np.array([float(k)]), float(vals.mean()), var, KV)[0])
        assert normal == pytest.approx(exact, abs=0.01), k


def test_the_tail_rate_is_where_the_share_reaches_the_allowance() -> None:
    allowance = 0.05  # p95
    r = kv_tail_rate(STEPS, K_STEPS, CTX, CTX_SD**2, KV, allowance)
    assert 0.0 < r < math.inf

    def share(rate: float) -> float:
        law = ilp.batch_law(STEPS, rate, K_STEPS, 1)
        return kv_overflow_share(law.pi, law.per_instance, CTX, CTX_SD**2, KV)

    assert share(r) == pytest.approx(allowance, rel=1e-6)
    assert share(1.01 * r) > allowance > share(0.99 * r)
    # a stricter percentile allows fewer arrivals to meet a full KV: a lower rate
    assert kv_tail_rate(STEPS, K_STEPS, CTX, CTX_SD**2, KV, 0.01) < r


def test_no_tail_limit_when_the_kv_holds_every_batch_up_to_the_cap() -> None:
    assert kv_tail_rate(STEPS, K_STEPS, 100.0, 0.0, 10**6, 0.05) == math.inf


def test_workload_stats_carry_the_second_moment_of_the_running_context() -> None:
    # one turn of 1,000 prompt tokens and 10 outputs: contexts 1,000..1,010 over its decode steps
    conv = ConversationSpec("c", 0.0, (TurnSpec(appended_tokens=1_000, output_tokens=10),))
    ws = workload_stats([conv], 1.0)
    assert ws.kv_decode_token_steps_mean == pytest.approx(10 * (1_000 + 5))
    assert ws.kv_decode_token2_steps_mean == pytest.approx((1_010**3 - 1_000**3) / 3)
    mean = ws.kv_decode_token_steps_mean / ws.decode_tokens_mean
    var = ws.kv_decode_token2_steps_mean / ws.decode_tokens_mean - mean**2
    assert var == pytest.approx(100 / 12, rel=1e-3)  # uniform over 10 tokens of growth
