"""placement.ilp.prefillpool: a prefill pool's chunked steps (FCFS chunks within the token budget, routing
to the fewest queued tokens) stretch a prompt whose last step also carries the next queued prompt's first
chunk, which the M/G/k FCFS wait does not have; and the hand-off survival that takes the pool's delay sample
(placement.ilp.stepchain.StepChain.handoff_survival_sample) is the law of V + H."""

from __future__ import annotations

import numpy as np
import pytest

from placement.ilp.prefillpool import pool_delay_sample, pool_ends
from placement.ilp.queueing import wait_tail
from placement.ilp.stepchain import StepChain
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel

TM = TierModel(get_gpu("L40S"), get_model("Llama-3.1-8B"))  # fleet-single-turn's prefill tier


def _step(*chunks: int) -> float:
    """tiers.steps.prefill_step_time_s of fresh chunks with no decode batch."""
    base = TM.decode_step_time_s(1, 0)
    return TM.step_time_s(chunks[0], 0, 0, 0) + sum(TM.step_time_s(c, 0, 0, 0) - base for c in chunks[1:])


def test_a_shared_last_step_ends_both_prompts_together() -> None:
    """One prefiller: P (6,000 tokens) at t = 0; A and B (3,000 each) arrive during P's step and are
    admitted at its end; their chunks fit one 8,192-token step, so A ends only when B's chunk is done too
    (FCFS would end A one own prefill after P). A fourth prompt C (9,000) arriving then is split over two
    steps, the first shared with nothing."""
    a = np.array([0.0, 0.01, 0.02])
    ends = pool_ends(a, np.array([6000, 3000, 3000]), 1, TM, 8192)
    p_end = _step(6000)
    assert ends[0] == pytest.approx(p_end)
    assert ends[1] == pytest.approx(p_end + _step(3000, 3000))
    assert ends[2] == pytest.approx(ends[1])
    assert ends[1] > p_end + TM.prefill_time_s(3000) + 0.1  # stretched by B's whole chunk


def test_routing_counts_the_step_in_progress() -> None:
    """Two prefillers: the first prompt's step is still running when the second arrives, so the second goes
    to the idle one (its queued tokens count until the step ends) and neither waits."""
    a = np.array([0.0, 0.05])
    ends = pool_ends(a, np.array([4000, 4000]), 2, TM, 8192)
    assert ends[0] == pytest.approx(_step(4000))
    assert ends[1] == pytest.approx(0.05 + _step(4000))


def test_the_pool_waits_longer_than_fcfs_mgk() -> None:
    """fleet-single-turn's pool (2 prefillers, ~2 prompts/s over 3,024 tokens): the chunked pool's mean delay
    beyond the own prefill exceeds the M/G/2 FCFS wait's (the simulator: 0.127-0.132 s vs an exact FCFS
    recursion's 0.106-0.108 s on its own arrivals)."""
    tok = np.exp(np.random.default_rng(3).normal(np.log(3000.0), 0.6, 4000)).round()
    served = tok[tok >= 3024]
    v = pool_delay_sample(served, 2.0, 2, TM, arrivals=8000)
    s = np.array([TM.prefill_time_s(int(x)) for x in served])
    p0, theta = wait_tail(2.0 * s.mean() / 2, s.mean(), float((s**2).mean()), 2)
    assert v.mean() > 1.1 * p0 * theta
    assert v.min() > -0.1  # a chunked long prompt is at most slightly faster than its one-step prefill


def test_handoff_survival_of_a_delay_sample_is_the_law_of_the_sum() -> None:
    """P(V + H > b) from the grid against a Monte Carlo sum of independent draws of V and H."""
    parts = np.exp(np.random.default_rng(7).normal(np.log(0.1), 0.6, 400)).clip(0.005, 0.6)
    chain = StepChain(parts, 0.7, 0.04)
    rng = np.random.default_rng(4)
    v = np.where(rng.uniform(size=50_000) < 0.3, rng.exponential(0.25, 50_000), 0.0) - 0.01
    h_pmf = chain.handoff()
    h = rng.choice(chain.values[: len(h_pmf)], 50_000, p=h_pmf / h_pmf.sum())
    b = np.linspace(0.0, 1.5, 61)
    emp = ((v + h)[None, :] > b[:, None]).mean(axis=1)
    assert np.abs(chain.handoff_survival_sample(v)(b) - emp).max() < 0.015  # as test_stepchain.py's laws
