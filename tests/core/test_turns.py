"""The meaning of every Placement field, as the driver core defines it for the router and the simulator."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.core import (
    kv_shipped_tokens,
    local_prefill_tokens,
    moves_pin,
    pin_reason,
    remote_prefill_tokens,
    round_trip_tokens,
    running_turn_kv_tokens,
)
from placement.base import Placement, TurnRequest

T1 = TurnRequest("c", 1, 16_000, 16_000)
T3 = TurnRequest("c", 3, 16_400, 187, max_output_tokens=120)


def test_pin_moves_only_when_asked_and_to_another_decoder() -> None:
    assert moves_pin(Placement("d0", pin=True), None)
    assert moves_pin(Placement("d1", pin=True), "d0")
    assert not moves_pin(Placement("d0", pin=True), "d0")
    assert not moves_pin(Placement("d1"), "d0")  # no pin asked: the existing pin stays as it is
    assert pin_reason(Placement("d0", pin=True), None, later_turn=False) == "placed"
    assert (
        pin_reason(Placement("d1", pin=True, reason="d0 down"), "d0", later_turn=True) == "replaced: d0 down"
    )
    assert pin_reason(Placement("d1", pin=True), None, later_turn=True).startswith("replaced: ")


def test_running_turn_is_counted_for_its_prompt_and_the_clients_cap() -> None:
    assert running_turn_kv_tokens(T1) == 16_000
    assert running_turn_kv_tokens(T3) == 16_520


def test_a_round_trip_ships_the_history_the_decoder_holds_in_whole_blocks() -> None:
    rt = Placement("d0", "p0", transfer_kv=True, transfer_tokens=187, history_tokens=16_213)
    assert round_trip_tokens(rt, T3, decoder_holds_tokens=20_000, block_tokens=16) == 16_208
    assert round_trip_tokens(rt, T3, decoder_holds_tokens=1_000, block_tokens=16) == 992  # partly evicted
    assert round_trip_tokens(rt, T3, decoder_holds_tokens=0) == 0  # lost: a plain remote prefill
    assert round_trip_tokens(rt, T1, decoder_holds_tokens=20_000) == 0  # turn 1 has no history
    assert round_trip_tokens(Placement("d0", history_tokens=500), T3, 20_000) == 0  # local: no round trip
    # the prefiller then computes only the rest; a local placement queues the increment on the decoder
    assert (remote_prefill_tokens(rt, T3, round_trip=16_208), local_prefill_tokens(rt, T3)) == (192, 0)
    assert remote_prefill_tokens(Placement("d0", "p0", transfer_kv=True), T1) == 16_000
    assert (remote_prefill_tokens(Placement("d0"), T3), local_prefill_tokens(Placement("d0"), T3)) == (0, 187)


@given(
    inp=st.integers(2, 100_000),
    hist=st.integers(0, 100_000),
    held=st.integers(0, 100_000),
    block=st.sampled_from([1, 16, 32]),
)
def test_round_trip_never_ships_more_than_asked_held_or_the_prompt_less_one(
    inp: int, hist: int, held: int, block: int
) -> None:
    turn = TurnRequest("c", 2, inp, 1)
    rt = round_trip_tokens(Placement("d0", "p0", history_tokens=hist), turn, held, block)
    assert 0 <= rt <= min(hist, held, inp - 1)
    assert rt % block == 0
    pl = Placement("d0", "p0")
    assert (
        remote_prefill_tokens(pl, turn, rt) >= 1 and local_prefill_tokens(pl, turn) == 0
    )  # the last token is always computed


@given(inp=st.integers(1, 100_000), cached=st.integers(0, 200_000), block=st.sampled_from([1, 16]))
def test_kv_shipped_is_the_prompt_less_what_the_decoder_holds(inp: int, cached: int, block: int) -> None:
    shipped = kv_shipped_tokens(inp, cached, block)
    assert 0 <= shipped <= inp
    assert shipped == inp - min(cached, inp) // block * block
