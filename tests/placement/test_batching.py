"""The decode batch's birth-death law (placement/ilp/batching.py) and the M/G/c wait (ilp.queueing)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from placement import ilp


def test_constant_step_gives_the_poisson_law_of_m_g_inf() -> None:
    steps = np.full(256, 0.02)
    law = ilp.batch_law(steps, rate_per_s=0.5, steps_per_conversation=800, instances=1)
    mean = 0.5 * 800 * 0.02  # lam K step
    var = float((law.pi * law.per_instance**2).sum() - law.mean_batch**2)
    assert law.stable
    assert law.mean_batch == pytest.approx(mean, rel=1e-6)
    assert var == pytest.approx(mean, rel=1e-6)
    assert law.step_tok_s == pytest.approx(0.02)
    assert law.step_cv_tok == pytest.approx(0.0, abs=1e-9)


def test_a_step_growing_with_the_batch_widens_the_law_beyond_the_fluid_point() -> None:
    b = np.arange(1, 257, dtype=float)
    steps = 0.01 + 0.0015 * b
    lam, k = 0.5, 950.0
    fluid = lam * k * 0.01 / (1 - lam * k * 0.0015)  # B = lam K (a + b B)
    law = ilp.batch_law(steps, lam, k, 1)
    var = float((law.pi * law.per_instance**2).sum() - law.mean_batch**2)
    assert law.stable
    assert law.mean_batch > fluid
    assert var > law.mean_batch  # wider than Poisson
    assert law.step_tok_s > 0.01 + 0.0015 * fluid
    assert law.tau_c_s > 0
    # a longer span averages the swings out; a span of 0 sees the whole spread
    cv = law.span_cv(np.array([0.0, 1.0, 100.0, 1e4]))
    assert cv[0] == pytest.approx(law.step_cv_tok, rel=1e-3)
    assert all(np.diff(cv) < 0)


def test_tau_c_is_the_mean_residence_of_m_m_inf() -> None:
    # a step that barely grows with the batch: the law is ~Poisson(lam K s) (mean 50, never empty) and the
    # step is linear in the population, whose autocorrelation in M/M/inf is exp(-t / (K s)): integrated
    # time K s. The law's far tail (pi ~ 1e-90 at 256 sequences) used to turn the rounding error of the
    # cumulative sum into an astronomical tau_c (1e40 s on paper-a40; every fleet's was).
    s, k = 0.02, 5000.0
    steps = s * (1.0 + 1e-6 * np.arange(1, 257, dtype=float))
    law = ilp.batch_law(steps, 0.5, k, 1)
    assert law.mean_batch == pytest.approx(50.0, rel=1e-3)
    assert law.pi[-1] < 1e-80
    assert law.tau_c_s == pytest.approx(k * s, rel=1e-3)


def test_pooling_over_instances_narrows_the_law() -> None:
    steps = 0.01 + 0.0015 * np.arange(1, 257, dtype=float)
    one = ilp.batch_law(steps, 0.5, 950.0, 1)
    four = ilp.batch_law(steps, 2.0, 950.0, 4)  # four instances at the same load each
    assert four.step_tok_s < one.step_tok_s
    assert four.step_cv_tok < one.step_cv_tok


def test_no_stationary_law_when_the_pool_cannot_deliver_the_tokens() -> None:
    steps = 0.01 + 0.0015 * np.arange(1, 257, dtype=float)
    # at the cap a step serves 256 tokens in 0.394 s: 650 tokens/s; ask for 700
    law = ilp.batch_law(steps, 700.0 / 950.0, 950.0, 1)
    assert not law.stable


def test_capacity_law_is_the_rate_at_which_the_mean_step_reaches_the_target() -> None:
    steps = 0.01 + 0.0015 * np.arange(1, 257, dtype=float)
    rate, law = ilp.capacity_law(steps, 950.0, 0.03)
    assert law.step_tok_s == pytest.approx(0.03, rel=2e-3)
    assert ilp.batch_law(steps, rate * 1.01, 950.0, 1).step_tok_s > 0.03
    # the fluid capacity (B at step 0.03 over its residence) is higher: the law is stricter
    b_max = (0.03 - 0.01) / 0.0015
    assert rate < b_max / (950.0 * 0.03)
    assert ilp.capacity_law(steps, 950.0, 0.005)[0] == 0.0  # a step at batch 1 above the target


def test_erlang_c() -> None:
    assert ilp.erlang_c(1, 0.4) == pytest.approx(0.4)
    for rho in (0.2, 0.5, 0.9):
        assert ilp.erlang_c(2, rho) == pytest.approx(2 * rho * rho / (1 + rho))
    assert ilp.erlang_c(4, 0.5) < ilp.erlang_c(2, 0.5) < ilp.erlang_c(1, 0.5)
    p0, theta = ilp.wait_tail(0.5, 1.0, 1.5, servers=2)
    assert p0 == pytest.approx(1 / 3) and theta == pytest.approx(1.5 / 2 / (2 * 0.5))
    assert ilp.wait_tail(0.5, 1.0, 1.5) == (0.5, pytest.approx(1.5 / (2 * 0.5)))
    assert math.isinf(ilp.wait_tail(1.0, 1.0, 1.5, servers=3)[1])


def test_tau_c_of_a_pool_is_the_relaxation_time_of_its_population() -> None:
    # a step that barely grows with the batch: the chain is M/M/inf with death rate 1 / (K step) per
    # conversation, whose population relaxes as exp(-t / (K step)); the step follows the population, so its
    # integrated autocorrelation time is K step. Three instances put the chain's top states (k up to 768)
    # at pi ~ 1e-290, where the head-summed G(k)'s rounding once overflowed tau_c to ~1e100 s.
    a, k, n = 0.02, 900.0, 3
    steps = a * (1.0 + 1e-6 * np.arange(1, 257, dtype=float))
    lam = 60.0 / (k * a)  # 60 conversations in the pool on average
    law = ilp.batch_law(steps, lam, k, n)
    assert law.mean_batch == pytest.approx(20.0, rel=1e-3)
    assert law.tau_c_s == pytest.approx(k * a, rel=1e-2)


def _a40_colocated() -> tuple[ilp.Option, ilp.Option, ilp.Demand]:
    from orchestrator.config import SyntheticWorkload, parse_fleet
    from orchestrator.planner import demand_from_stats, tier_supplies
    from orchestrator.workload import synthetic_conversations, workload_stats

    stats = workload_stats(
        synthetic_conversations(
            SyntheticWorkload(turn1_input_tokens_median=12000, turns_mean=5), 300, seed=1
        ),
        rate_per_s=1.0,
    )
    cfg = parse_fleet({"model": "Qwen3-0.6B", "tiers": [{"name": "a40", "gpu": "A40", "count": 4}]})
    m = tier_supplies(cfg)[0].models[0]
    colo = ilp.Option(tier="a40", role="colocated", power_cap_w=m.cap_w, tp=1, model=m)
    dec = ilp.Option(tier="a40", role="decode", power_cap_w=m.cap_w, tp=1, model=m)
    return colo, dec, demand_from_stats(stats)


def test_a_colocated_instance_steps_its_batch_in_the_time_its_turn1_prefills_leave() -> None:
    # its turn-1 prefills arrive with the conversations (r e1 seconds per second), whatever the batch: each
    # token of a batch of b waits step_d(b) / (1 - r e1), not step_d(b) + b (L1 / O) turn1_token_s
    colo, dec, demand = _a40_colocated()
    e1 = ilp.exogenous_prefill_s(colo.model, demand)
    assert e1 == pytest.approx(demand.turn1_mean_tokens * ilp.turn1_token_s(colo.model, demand))
    r = 0.4
    own = ilp.instance_steps_s(dec, demand)  # the batch's own curve: decode + later turns' prefills
    steps = ilp.instance_steps_s(colo, demand, rate_per_instance=r)
    assert steps == pytest.approx(own / (1.0 - r * e1), rel=1e-12)
    # the two pricings agree at the fluid point b = r K step(b) (K = O + Kn; exactly when Kn = 0): the rate
    # whose fluid batch is b is r = b / (K step_d(b) + b e1)
    k = demand.decode_tokens + demand.later_turns
    for b in (2, 4, 8):
        r_b = b / (k * own[b - 1] + b * e1)
        at_b = ilp.instance_steps_s(colo, demand, rate_per_instance=r_b)[b - 1]
        assert at_b == pytest.approx(ilp.decode_step_s(colo.model, demand, float(b), True), rel=0.01)
    # above it the batch's step grows only with the batch's own work: the law is narrower, so the rate at
    # which its mean step reaches a target is higher than with the prefills billed per sequence
    tau = 2.5 * float(steps[0])
    rate, law = ilp.capacity_law(own, k, tau, e1)
    at = ilp.batch_law(ilp.instance_steps_s(colo, demand, rate_per_instance=rate), rate, k, 1)
    assert law.step_tok_s == pytest.approx(at.step_tok_s, rel=1e-9)
    assert at.step_tok_s <= tau and at.step_tok_s == pytest.approx(tau, rel=3e-3)
    billed = np.array([ilp.decode_step_s(colo.model, demand, float(x), True) for x in range(1, 257)])
    assert rate > ilp.capacity_law(billed, k, tau)[0]
    # the turn-1 prefills alone fill the instance at r e1 = 1: no step is left for the batch
    assert np.isinf(ilp.instance_steps_s(colo, demand, rate_per_instance=1.0 / e1)).all()
