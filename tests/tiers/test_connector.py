"""Per-turn connector costs (tiers.connector) against the ConServe artifact's fitted constants and data."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from orchestrator.sim.core import kv_round_trip_bookkeeping_s
from tiers.catalog import get_gpu
from tiers.connector import (
    artifact_prefill_hit_s,
    kv_bookkeeping_s,
    producer_prefill_ms,
    shipped_tokens,
    wrong_predict_wait_s,
)
from tiers.models import get_model
from tiers.perf import TierModel

QWEN_KV = 114_688


def _constants(shared_data: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    with (shared_data / "conserve" / "cost_model_constants.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                out[row["name"]] = float(row["value"])
            except ValueError:
                continue  # formula rows (the prefill fits) and ranges
    return out


def _artifact_wait_ms(c: dict[str, float], lhist: int, lincr: int) -> float:
    """per_turn_cost_model.py wrong_predict_disagg_wait_ms, restated from the CSV's constants."""

    def net(n: int) -> float:
        if n <= c["NETWORK_KNEE_L"]:
            return c["NETWORK_LOW_CONST_MS"]
        return c["NETWORK_HIGH_SLOPE_US_PER_TOKEN"] * n / 1e3 + c["NETWORK_HIGH_OFFSET_MS"]

    def hit(n: int) -> float:
        if n <= c["PREFILL_HIT_KNEE_L"]:
            return c["PREFILL_HIT_LOW_CONST_MS"]
        return c["PREFILL_HIT_HIGH_SLOPE_US_PER_TOKEN"] * n / 1e3 + c["PREFILL_HIT_HIGH_OFFSET_MS"]

    total = lhist + lincr
    mgmt = 2 * (c["KV_MGMT_BASE_MS"] + c["KV_MGMT_PER_BLOCK_US"] * total / c["KV_BLOCK_SIZE_TOKENS"] / 1e3)
    return net(lhist) + hit(total) + net(lincr) + mgmt


@pytest.mark.parametrize(
    ("lhist", "lincr"),
    [(500, 67), (15_000, 67), (74_693, 67), (16_000, 2_000), (40_000, 1)],
    ids=["short-history", "real-16k-history", "compound0-plus-turn1", "long-increment", "one-token"],
)
def test_wrong_prediction_wait_is_the_artifacts_cost_model(shared_data: Path, lhist: int, lincr: int) -> None:
    c = _constants(shared_data)
    assert wrong_predict_wait_s(lhist, lincr, QWEN_KV) * 1e3 == pytest.approx(
        _artifact_wait_ms(c, lhist, lincr), abs=1e-6
    )


def test_compound_history_triples_the_modelled_wait(shared_data: Path) -> None:
    """The artifact charged the history from the 56,635-token compound prompt on (conversation 0): the wait
    is about three times the wait of the conversation's real ~18k-token history."""
    real = wrong_predict_wait_s(17_912 + 146, 67, QWEN_KV)
    charged = wrong_predict_wait_s(56_635 + 17_912 + 146, 67, QWEN_KV)
    print(f"\nwrong-prediction wait: real history {real * 1e3:.1f} ms, as charged {charged * 1e3:.1f} ms")
    assert 2.5 < charged / real < 4.0
    assert charged < 0.25  # still a quarter of a second at most: the queue, not this wait, is what costs


def test_artifacts_prefix_hit_curve_is_below_the_measured_prefix_hit(shared_data: Path) -> None:
    """prefill_vs_L_300W_200W.csv's prefix-hit column (hit_ms_approx_p50_300W) is a whole request (lookup,
    one recomputed token, one decode step); the artifact's fit under-charges it at every length."""
    with (shared_data / "conserve" / "prefill_vs_L_300W_200W.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    print("\nL        measured hit   artifact model")
    for r in rows:
        n = int(r["L_tokens"])
        measured = float(r["hit_ms_approx_p50_300W"])
        model = artifact_prefill_hit_s(n) * 1e3
        print(f"{n:6d}  {measured:8.1f} ms   {model:8.1f} ms")
        assert model < measured, n


def test_kv_bookkeeping_matches_the_simulators_copy() -> None:
    """The simulator's round trip charges this module's bookkeeping (one home for the KV_MGMT constants)."""
    for n in (0, 16, 1_000, 16_384, 75_000):
        assert kv_bookkeeping_s(n) == pytest.approx(kv_round_trip_bookkeeping_s(n), rel=1e-12)


@pytest.mark.parametrize(
    ("prompt", "cached", "prefix_cache", "expected"),
    [(16_000, 15_800, True, 200), (16_000, 15_800, False, 16_000), (100, 500, True, 0), (0, 0, False, 0)],
    ids=["decoder-holds-history", "proxy-decoder-no-prefix-cache", "cache-longer-than-prompt", "empty"],
)
def test_shipped_tokens(prompt: int, cached: int, prefix_cache: bool, expected: int) -> None:
    assert shipped_tokens(prompt, cached, prefix_cache) == expected


def test_shipped_tokens_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match="prompt_tokens=-1"):
        shipped_tokens(-1, 0, True)


def test_no_measurable_lmcache_store_cost_at_short_prompts(shared_data: Path) -> None:
    """The producer's prefill recovered from the hand-off measurement (TTFT - hand-off) is not longer than
    the tier model's plain prefill (fitted without any connector): no store cost to model at 128-512."""
    tm = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
    with (shared_data / "conserve" / "network_kv_transfer.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["net_p50_ms_measured"]]
    assert len(rows) == 3
    for r in rows:
        n = int(r["L_tokens"])
        producer = producer_prefill_ms(float(r["net_p50_ms_measured"]), float(r["net_share_of_TTFT_pct"]))
        plain = tm.prefill_time_s(n) * 1e3
        print(f"L={n}: LMCache producer prefill {producer:.1f} ms, plain prefill model {plain:.1f} ms")
        assert producer <= plain


def test_producer_prefill_rejects_a_bad_share() -> None:
    with pytest.raises(ValueError, match="network share"):
        producer_prefill_ms(4.2, 0.0)
