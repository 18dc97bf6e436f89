"""placement.ilp.stepchain against a direct event simulation of the same decoder: steps of d + the prefill
parts of every local prompt that arrived during the step before, Poisson local arrivals. The chain's laws
must match the simulated local waits (Y = R + S_M) and remote hand-offs (H = R1 + T_b + T_c) as
distributions (largest CDF gap) and in their tails, and so must the survival functions the TTFET mixture
uses (with a prefill pool's wait for H); the model this replaced (the residual alone, M = 0) must not --
that is the correlation the chain adds."""

from __future__ import annotations

import numpy as np
import pytest

from placement.ilp.queueing import mixture_quantile
from placement.ilp.stepchain import StepChain

STEP_S = 0.04  # decode part of a step (an 8B decoder's step at batch ~20, placement.ilp tier models)
XS = np.linspace(0.0, 1.2, 241)  # where the CDFs are compared (s)


def _parts() -> np.ndarray:
    """Prefill parts of a heavy-tailed prompt mix (lognormal, median 0.1 s), fixed seed."""
    return np.exp(np.random.default_rng(7).normal(np.log(0.1), 0.6, 400)).clip(0.005, 0.6)


def _simulate(parts: np.ndarray, rate: float, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(Y of every local prompt, H of a remote probe at a uniform time in every 7th step)."""
    rng = np.random.default_rng(seed)
    t = 0.0
    lengths = np.empty(steps)
    admitted: np.ndarray = np.zeros(0)
    ys: list[np.ndarray] = []
    for n in range(steps):
        length = STEP_S + float(admitted.sum())
        lengths[n] = length
        k = rng.poisson(rate * length)
        arrivals = t + rng.uniform(0.0, length, k)
        p = rng.choice(parts, k)
        # TTFT_i = (end - a_i) + d + sum p; Y_i = TTFT_i - d - p_i
        ys.append((t + length - arrivals) + float(p.sum()) - p)
        admitted = p
        t += length
    # remote probes: a uniform time over the run lands in a step with probability ~ its length
    ends = np.cumsum(lengths)
    probes = rng.uniform(0.0, ends[-3], steps // 7)
    idx = np.searchsorted(ends, probes, side="right")
    h = (ends[idx] - probes) + lengths[idx + 1] + lengths[idx + 2]
    return np.concatenate(ys), h


def _cdf_at(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    order = np.argsort(values)
    cum = np.concatenate([[0.0], np.cumsum(weights[order])])
    return np.asarray(cum[np.searchsorted(values[order], XS, side="right")])


def _cdf_gap(sample: np.ndarray, values: np.ndarray, weights: np.ndarray) -> float:
    emp = np.searchsorted(np.sort(sample), XS, side="right") / len(sample)
    return float(np.abs(emp - _cdf_at(values, weights)).max())


def _quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order]) / weights.sum()
    return float(values[order][min(int(np.searchsorted(cum, q)), len(values) - 1)])


@pytest.fixture(scope="module")
def simulated() -> dict[float, tuple[np.ndarray, np.ndarray]]:
    return {rate: _simulate(_parts(), rate, 150_000, seed=1) for rate in (0.7, 3.0)}


@pytest.mark.parametrize("rate", [0.7, 3.0])
def test_the_chain_matches_the_event_simulation(simulated: dict, rate: float) -> None:
    ys, h = simulated[rate]
    chain = StepChain(_parts(), rate, STEP_S)
    for sample, law in ((ys, chain.local_wait()), (h, chain.handoff())):
        assert law.sum() == pytest.approx(1.0, abs=1e-6)
        assert _cdf_gap(sample, chain.values, law) < 0.015
        for q in (0.95, 0.99):  # the tail the p95 slowdown of short prompts sits in
            # ~6,000 (rate 0.7) to ~25,000 simulated prompts: the 99th percentile is within ~5% of its own
            assert _quantile(chain.values, law, q) == pytest.approx(float(np.quantile(sample, q)), rel=0.12)


@pytest.mark.parametrize("rate", [0.7, 3.0])
def test_the_survival_functions_match_the_event_simulation(simulated: dict, rate: float) -> None:
    """What the TTFET mixture evaluates: P(Y > b), and P(W + H > b) with an independent prefill-pool wait
    W (P(W > 0) = 0.3, exponential tail of mean 0.2 s, drawn here)."""
    ys, h = simulated[rate]
    chain = StepChain(_parts(), rate, STEP_S)
    b = np.linspace(0.0, 1.0, 101)
    emp_y = (ys[None, :] > b[:, None]).mean(axis=1)
    assert np.abs(chain.local_survival()(b) - emp_y).max() < 0.015
    rng = np.random.default_rng(5)
    w = np.where(rng.uniform(size=len(h)) < 0.3, rng.exponential(0.2, len(h)), 0.0)
    emp_wh = ((w + h)[None, :] > b[:, None]).mean(axis=1)
    assert np.abs(chain.handoff_survival(0.3, 0.2)(b) - emp_wh).max() < 0.015
    assert chain.local_survival()(np.array([-0.01]))[0] == 1.0  # a negative budget is always missed


def test_the_residual_alone_misses_the_tail(simulated: dict) -> None:
    """What the planner modelled before: the residual of the step in progress, no co-batched prompts
    (M = 0). At 3 local prompts/s per decoder its law is far from the simulated wait; the chain's is not."""
    ys, _ = simulated[3.0]
    chain = StepChain(_parts(), 3.0, STEP_S)
    residual_alone = chain.g.sum(axis=0)  # the residual's law, whatever the next step's class
    values = chain.values[: len(residual_alone)]
    assert _cdf_gap(ys, values, residual_alone) > 0.1
    assert float(np.quantile(ys, 0.99)) > 1.3 * _quantile(values, residual_alone, 0.99)


def test_no_local_prompts_leaves_the_decode_step() -> None:
    chain = StepChain(np.zeros(1), 0.0, STEP_S)
    y, h = chain.local_wait(), chain.handoff()
    assert float(y @ chain.values) == pytest.approx(STEP_S / 2, rel=0.02)  # the residual of a decode step
    assert float(h @ chain.values) == pytest.approx(2.5 * STEP_S, rel=0.02)  # + two decode steps
    assert chain.local_survival()(np.array([STEP_S * 1.01]))[0] == pytest.approx(0.0, abs=1e-12)


def test_the_mixture_takes_a_survival_function() -> None:
    """A part with its own survival (8th element) is evaluated with it, not with the M/G/c wait: the p-th
    percentile of a delay uniform on (0, 1) s plus a fixed 0.5 s is 0.5 + p/100."""
    c = np.full(100, 0.5)

    def uniform(b: np.ndarray) -> np.ndarray:
        return np.clip(1.0 - b, 0.0, 1.0)

    x = mixture_quantile([(1.0, 0.0, 1.0, 1.0, c, np.ones(100), 1, uniform)], 95.0)
    assert x == pytest.approx(1.45, abs=1e-6)
    assert mixture_quantile([(1.0, 0.0, 1.0, 1.0, c, np.ones(100), 1, None)], 95.0) == pytest.approx(0.5)
