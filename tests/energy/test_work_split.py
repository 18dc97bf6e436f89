"""Who computed a turn's prompt (issue 14, item 1): a remote prefiller computes the prompt minus its own
prefix-cache hit; the decoder computes what it neither had cached nor received by KV transfer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from energy.accounting import spread_work
from energy.records import TurnRecord

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def turn1_remote(prefill_cached: int = 0) -> TurnRecord:
    # as the router records a sim-backend turn 1: the decoder's usage says the whole prompt was cached
    # (it arrived by KV transfer), the prefiller computed it
    return TurnRecord(
        "c", 1, "r", "d0", arrival_at=T0, first_token_at=T0 + timedelta(seconds=2),
        last_token_at=T0 + timedelta(seconds=4), prompt_tokens=16_000, cached_tokens=16_000,
        output_tokens=100, prefill_instance_id="p0", remote_prefill=True,
        prefill_cached_tokens=prefill_cached,
    )  # fmt: skip


def test_remote_turn1_prefill_is_work_of_the_prefiller_not_lost() -> None:
    whole = (T0, T0 + timedelta(seconds=10))
    pre = spread_work([turn1_remote()], "p0", *whole)
    assert len(pre) == 1 and pre[0].prefill_tokens == pytest.approx(16_000) and pre[0].decode_tokens == 0
    dec = spread_work([turn1_remote()], "d0", *whole)
    assert dec[0].prefill_tokens == 0 and dec[0].decode_tokens == pytest.approx(100)


def test_prefillers_own_prefix_hit_is_not_work() -> None:
    pre = spread_work([turn1_remote(prefill_cached=6_000)], "p0", T0, T0 + timedelta(seconds=10))
    assert pre[0].prefill_tokens == pytest.approx(10_000)


def test_local_turn_decoder_computes_prompt_minus_its_cache() -> None:
    t = TurnRecord(
        "c", 2, "r2", "d0", arrival_at=T0, first_token_at=T0 + timedelta(seconds=1),
        last_token_at=T0 + timedelta(seconds=3), prompt_tokens=16_200, cached_tokens=16_100,
        output_tokens=50,
    )  # fmt: skip
    got = spread_work([t], "d0", T0, T0 + timedelta(seconds=10))
    assert got[0].prefill_tokens == pytest.approx(100) and got[0].decode_tokens == pytest.approx(50)
