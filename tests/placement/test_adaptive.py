"""conserve-adaptive (placement/adaptive.py): turn-1 placement from observed cost. Properties, then scripted
cases each way."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from placement.adaptive import (
    OBJECTIVES,
    AdaptiveConservePolicy,
    fleet_options,
    local_cost_s,
    remote_cost_s,
)
from placement.base import FleetView, InstanceView, Role, TurnRequest
from placement.errors import PlacementError
from placement.policies import make_policy
from tiers.catalog import get_gpu
from tiers.models import get_model
from tiers.perf import TierModel

A40 = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"))
A40_200W = TierModel(get_gpu("A40"), get_model("Qwen3-0.6B"), power_cap_w=200)
CAP = A40.kv_capacity_tokens


def pre(iid: str, queued: int = 0, seqs: int = 0) -> InstanceView:
    return InstanceView(
        iid,
        Role.PREFILL,
        "a40",
        queued_prefill_tokens=queued,
        running_seqs=min(seqs, 1),
        waiting_seqs=max(0, seqs - 1),
        kv_capacity_tokens=CAP,
    )


def dec(iid: str, used: int = 0, batch: int = 0, queued: int = 0, healthy: bool = True) -> InstanceView:
    return InstanceView(
        iid,
        Role.DECODE,
        "a40",
        healthy=healthy,
        queued_prefill_tokens=queued,
        kv_used_tokens=used,
        kv_capacity_tokens=CAP,
        running_seqs=batch,
    )


def policy(
    view: FleetView, decoder_tm: TierModel = A40, objective: str = "latency"
) -> AdaptiveConservePolicy:
    models = {i.instance_id: (A40 if i.role is Role.PREFILL else decoder_tm) for i in view.instances}
    opts = fleet_options("conserve-adaptive", models, {})
    pol = make_policy("conserve-adaptive", objective=objective, **opts)
    assert isinstance(pol, AdaptiveConservePolicy)
    return pol


def t1(n: int, max_out: int | None = None) -> TurnRequest:
    return TurnRequest("c", 1, n, n, max_out)


# ---- scripted cases, each way -----------------------------------------------------------------------------


def test_short_prompt_stays_local_when_the_prefiller_is_busy() -> None:
    # three 16k-token prompts queued on the only prefiller (~1.8 s of work); decoders run 10 sequences each
    view = FleetView((pre("p0", queued=48_000, seqs=3), dec("d0", 60_000, 10), dec("d1", 40_000, 10)))
    p = policy(view).place(t1(500), view)
    assert p.prefill_instance is None and p.pin and p.decode_instance in {"d0", "d1"}
    assert "local prefill" in p.reason


def test_short_prompt_goes_remote_when_the_prefiller_is_idle() -> None:
    # idle prefiller: ~36 ms remote vs ~72 ms + 10 stalled sequences locally
    view = FleetView((pre("p0"), dec("d0", 60_000, 10), dec("d1", 40_000, 10)))
    p = policy(view).place(t1(500), view)
    assert p.prefill_instance == "p0" and p.decode_instance == "d1" and p.transfer_kv and p.pin


def test_long_prompt_goes_to_the_prefiller_when_that_is_cheaper() -> None:
    # a 16k-token prompt would stall 10 running sequences ~0.57 s each: 1 s of prefiller queue is cheaper
    view = FleetView((pre("p0", queued=24_000, seqs=2), dec("d0", 60_000, 10)))
    p = policy(view).place(t1(16_000), view)
    assert p.prefill_instance == "p0" and p.transfer_tokens == 16_000


def test_long_prompt_local_on_an_idle_decoder_when_the_prefiller_is_swamped() -> None:
    view = FleetView((pre("p0", queued=160_000, seqs=10), dec("d0", 0, 0)))
    p = policy(view).place(t1(16_000), view)
    assert p.prefill_instance is None and p.decode_instance == "d0"


def test_local_decoder_is_the_cheapest_not_the_worst_fit() -> None:
    # d0 has the most free KV but a large batch; d1 is idle: the local prefill goes where it stalls nobody
    view = FleetView((pre("p0", queued=48_000, seqs=3), dec("d0", 10_000, 40), dec("d1", 100_000, 0)))
    p = policy(view).place(t1(2_000), view)
    assert p.prefill_instance is None and p.decode_instance == "d1"


def test_an_idle_decoder_without_room_is_never_the_local_choice() -> None:
    # d0 is idle (the cheapest local prefill) but cannot hold the turn; d1 can but runs 30 sequences
    view = FleetView((pre("p0", queued=160_000, seqs=10), dec("d0", CAP - 1_000, 0), dec("d1", 0, 30)))
    p = policy(view).place(t1(2_000), view)
    assert p.decode_instance == "d1"


def test_a_decoder_with_waiting_requests_is_never_the_local_choice() -> None:
    # d0 is cheapest by batch but has a request waiting (its engine admits nothing now); d1 runs 30 sequences
    busy = InstanceView("d0", Role.DECODE, "a40", kv_capacity_tokens=CAP, running_seqs=1, waiting_seqs=1)
    view = FleetView((pre("p0", queued=160_000, seqs=10), busy, dec("d1", 0, 30)))
    p = policy(view).place(t1(2_000), view)
    assert p.decode_instance == "d1" and p.prefill_instance is None
    only = FleetView((pre("p0", queued=160_000, seqs=10), busy))
    assert policy(only).place(t1(2_000), only).prefill_instance == "p0"


def test_later_turns_follow_conserve() -> None:
    view = FleetView((pre("p0", queued=48_000, seqs=3), dec("d0"), dec("d1")), {"c": "d1"})
    p = policy(view).place(TurnRequest("c", 2, 17_000, 200), view)
    assert p.decode_instance == "d1" and p.prefill_instance is None and not p.pin


def test_a_slower_capped_decoder_costs_more_locally() -> None:
    d = dec("d0", 50_000, 8)
    assert local_cost_s(8_000, d, A40_200W) > local_cost_s(8_000, d, A40)


def test_without_models_it_is_conserve_and_says_so() -> None:
    view = FleetView((pre("p0", queued=480_000, seqs=30), dec("d0")))
    pol = make_policy("conserve-adaptive")
    p = pol.place(t1(100), view)
    assert p.prefill_instance == "p0" and "no tier model" in p.reason
    assert isinstance(pol, AdaptiveConservePolicy) and pol.stats().uncosted_turn1 == 1


def test_bad_link_is_refused() -> None:
    with pytest.raises(PlacementError, match="d0"):
        make_policy("conserve-adaptive", instance_models={}, instance_links={"d0": "carrier-pigeon"})


def test_fleet_options_only_for_the_adaptive_policy() -> None:
    assert fleet_options("conserve", {"d0": A40}, {}) == {}
    assert fleet_options("CONSERVE_ADAPTIVE", {"d0": A40}, {})["instance_models"] == {"d0": A40}


def test_slowdown_objective_weighs_the_stall_per_request_not_summed_over_the_batch() -> None:
    # 2,000 tokens, 8,000 queued on the prefiller, 20 running sequences: summed over the batch the stall
    # (20 x ~39 ms) outweighs the prefiller's queue; per request, the worst slowdown is lower locally (each
    # running token ~3.4x slower for one step vs the new turn ~5x slower through the prefiller)
    view = FleetView((pre("p0", queued=8_000, seqs=1), dec("d0", 60_000, 20)))
    assert policy(view, objective="latency").place(t1(2_000), view).prefill_instance == "p0"
    p = policy(view, objective="slowdown").place(t1(2_000), view)
    assert p.prefill_instance is None and p.decode_instance == "d0" and "x <" in p.reason


def test_slowdown_objective_keeps_a_long_prompt_off_a_busy_decoder() -> None:
    # 16k tokens would make every running token ~42x slower for a step: the prefiller's 1 s queue is cheaper
    view = FleetView((pre("p0", queued=24_000, seqs=2), dec("d0", 60_000, 10)))
    assert policy(view, objective="slowdown").place(t1(16_000), view).prefill_instance == "p0"


def test_unknown_objective_is_refused() -> None:
    with pytest.raises(PlacementError, match="objective"):
        make_policy("conserve-adaptive", objective="fastest")


# ---- properties -------------------------------------------------------------------------------------------

decoders_st = st.lists(
    st.tuples(st.integers(0, CAP), st.integers(0, 64), st.integers(0, 20_000), st.booleans()),
    min_size=1,
    max_size=4,
)
prefillers_st = st.lists(st.tuples(st.integers(0, 200_000), st.integers(0, 12)), min_size=0, max_size=3)


def build(decs: list[tuple[int, int, int, bool]], pres: list[tuple[int, int]]) -> FleetView:
    return FleetView(
        tuple(pre(f"p{k}", q, s) for k, (q, s) in enumerate(pres))
        + tuple(dec(f"d{k}", u, b, q, h) for k, (u, b, q, h) in enumerate(decs))
    )


@pytest.mark.parametrize("objective", OBJECTIVES)
@settings(max_examples=300, deadline=None)
@given(decs=decoders_st, pres=prefillers_st, n=st.integers(1, 64_000), out=st.integers(0, 4_000))
def test_never_places_a_turn_where_it_does_not_fit(objective, decs, pres, n, out) -> None:
    view = build(decs, pres)
    healthy = [i for i in view.instances if i.healthy and i.role.can_decode]
    pol = policy(view, objective=objective)
    if not healthy:
        with pytest.raises(PlacementError):
            pol.place(t1(n, out), view)
        return
    p = pol.place(t1(n, out), view)
    chosen = view.get(p.decode_instance)
    assert chosen is not None and chosen.healthy and chosen.role.can_decode
    need = n + out
    if p.prefill_instance is None and any(d.role is Role.PREFILL and d.healthy for d in view.instances):
        assert chosen.kv_free_tokens >= need  # a local prefill is only chosen where the turn fits
    if any(d.kv_free_tokens >= need for d in healthy):
        assert chosen.kv_free_tokens >= need
    if p.prefill_instance is not None:
        pi = view.get(p.prefill_instance)
        assert pi is not None and pi.healthy and pi.role is Role.PREFILL


@pytest.mark.parametrize("objective", OBJECTIVES)
@settings(max_examples=300, deadline=None)
@given(
    decs=decoders_st,
    pres=prefillers_st.filter(bool),
    n=st.integers(1, 64_000),
    which=st.integers(0, 2),
    extra=st.integers(1, 200_000),
)
def test_more_observed_queue_never_moves_a_prompt_from_local_to_remote(
    objective, decs, pres, n, which, extra
) -> None:
    view = build(decs, pres)
    more = list(pres)
    k = which % len(pres)
    more[k] = (pres[k][0] + extra, pres[k][1])
    view_more = build(decs, more)
    if not any(i.healthy for i in view.instances if i.role.can_decode):
        return
    before = policy(view, objective=objective).place(t1(n), view)
    after = policy(view_more, objective=objective).place(t1(n), view_more)
    if before.prefill_instance is None:
        assert after.prefill_instance is None


@pytest.mark.parametrize("objective", OBJECTIVES)
@settings(max_examples=300, deadline=None)
@given(
    decs=decoders_st,
    pres=prefillers_st.filter(bool),
    n=st.integers(1, 64_000),
    which=st.integers(0, 3),
    extra=st.integers(1, 200_000),
)
def test_more_observed_queue_on_a_decoder_never_moves_a_prompt_there(
    objective, decs, pres, n, which, extra
) -> None:
    """The decoder side of the monotone property: more prefill work queued on decoder k never makes the
    rule prefill a turn 1 locally on k when it did not before (its local cost only grows with it)."""
    k = which % len(decs)
    more = list(decs)
    more[k] = (decs[k][0], decs[k][1], decs[k][2] + extra, decs[k][3])
    view, view_more = build(decs, pres), build(more, pres)
    if not any(i.healthy for i in view.instances if i.role.can_decode):
        return
    before = policy(view, objective=objective).place(t1(n), view)
    after = policy(view_more, objective=objective).place(t1(n), view_more)
    local_on_k = after.prefill_instance is None and after.decode_instance == f"d{k}"
    if local_on_k:
        assert before.prefill_instance is None and before.decode_instance == f"d{k}"


@settings(max_examples=200, deadline=None)
@given(
    q=st.integers(0, 400_000),
    seqs=st.integers(0, 20),
    extra=st.integers(1, 100_000),
    n=st.integers(1, 64_000),
)
def test_remote_cost_grows_with_the_queue(q, seqs, extra, n) -> None:
    d = dec("d0")
    kvb = A40.model.kv_bytes_per_token
    lo = remote_cost_s(n, pre("p0", q, seqs), A40, "pcie", d, "pcie", kvb)
    hi = remote_cost_s(n, pre("p0", q + extra, seqs), A40, "pcie", d, "pcie", kvb)
    assert hi >= lo
