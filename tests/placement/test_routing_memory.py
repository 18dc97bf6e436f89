"""placement.ilp.routing: worst-fit placement on the policy's view of used KV (max(resident, pinned)) sends
turn-1 arrivals that come close together to the same decoder far more often than an even split, and the
step chain run at the routing's Palm rate of same-decoder neighbours reproduces the local prompts' wait of
an independent event simulation of the decoders' steps fed with that routed stream (the even split's chain,
what the planner took before, does not)."""

from __future__ import annotations

import numpy as np
import pytest

from placement.ilp.routing import near_local_rate, routed_stream
from placement.ilp.stepchain import StepChain

STEP_S = 0.04  # decode part of a step (an 8B decoder at batch ~20, as fleet-single-turn's 40.9 ms)
RATE = 4.0  # turn-1 arrivals/s over 3 decoders (fleet-single-turn's planned rate)
THRESHOLD = 3024  # hybrid threshold: prompts under it prefill on their decoder (fleet-single-turn's)
PREFILL_S_PER_TOKEN = 8e-5  # a local prompt's prefill part of a mixed step (~0.16 s mean, as that fleet's)
REMOTE_S_PER_TOKEN = 6e-5  # the prefill tier's prefill time per token


def _tokens() -> np.ndarray:
    """Turn-1 prompts of a lognormal mix (median 3,000, sigma 0.6: fleet-single-turn's workload)."""
    return np.exp(np.random.default_rng(3).normal(np.log(3000.0), 0.6, 400)).round()


@pytest.fixture(scope="module")
def routed() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tok = _tokens()
    return routed_stream(
        tok, tok < THRESHOLD, tok * REMOTE_S_PER_TOKEN, RATE, 3, STEP_S, 330.0, (0.3, 0.3), arrivals=20_000
    )


def test_worst_fit_follows_the_leader(routed: tuple) -> None:
    """Consecutive arrivals within 0.1 s land on the same decoder much more often than 1/3, and the split is
    still even on average; a second apart the memory has mostly gone."""
    times, chosen, _ = routed
    same = chosen[1:] == chosen[:-1]
    gap = np.diff(times)
    assert same[gap < 0.1].mean() > 0.5
    assert same[gap > 1.0].mean() < same[gap < 0.1].mean() - 0.15
    counts = np.bincount(chosen[len(chosen) // 5 :], minlength=3) / (len(chosen) - len(chosen) // 5)
    assert np.abs(counts - 1 / 3).max() < 0.02


def _decoder_waits(times: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """Y = (end of the step in progress - arrival) + the other prompts' parts prefilled in the next step, for
    one decoder's local arrivals (sorted) with their prefill parts; steps of STEP_S + the parts admitted."""
    ys = np.empty(len(times))
    t, length, i = 0.0, STEP_S, 0
    while i < len(times):
        end = t + length
        j = int(np.searchsorted(times, end, side="left"))  # arrivals in [t, end) join the next step
        batch = parts[i:j]
        ys[i:j] = (end - times[i:j]) + (batch.sum() - batch)
        t, length, i = end, STEP_S + float(batch.sum()), j
    return ys


def test_the_chain_at_the_routing_rate_matches_the_routed_decoders(routed: tuple) -> None:
    times, chosen, is_local = routed
    tok = _tokens()
    rng = np.random.default_rng(11)
    local_tok = tok[tok < THRESHOLD]
    start = len(times) // 5
    ys = []
    for j in range(3):
        sel = is_local & (chosen == j)
        sel[:start] = False
        a = times[sel]
        ys.append(_decoder_waits(a, rng.choice(local_tok, len(a)) * PREFILL_S_PER_TOKEN))
    y = np.concatenate(ys)
    parts = local_tok * PREFILL_S_PER_TOKEN
    lam = RATE * float(np.mean(tok < THRESHOLD)) / 3
    even = StepChain(parts, lam, STEP_S)
    near = StepChain(parts, near_local_rate(times, chosen, is_local, even.mean_step_s), STEP_S)

    def q(chain: StepChain, p: float) -> float:
        cdf = np.cumsum(chain.local_wait())
        return float(np.interp(p, cdf, chain.values[: len(cdf)]))

    for p in (0.9, 0.95, 0.99):
        # ~7,800 simulated local prompts: the 99th percentile rests on ~80 of them
        assert q(near, p) == pytest.approx(float(np.quantile(y, p)), rel=0.15), p
    # the even split's chain (the planner before this model) misses the tail
    assert q(even, 0.9) < 0.75 * float(np.quantile(y, 0.9))


def test_near_rate_of_an_even_independent_split_is_the_split() -> None:
    """Control: arrivals thrown on 3 decoders independently give the even split's rate (no memory)."""
    rng = np.random.default_rng(2)
    times = np.cumsum(rng.exponential(1 / RATE, 40_000))
    chosen = rng.integers(0, 3, len(times))
    is_local = rng.uniform(size=len(times)) < 0.5
    assert near_local_rate(times, chosen, is_local, 0.05) == pytest.approx(RATE * 0.5 / 3, rel=0.08)
