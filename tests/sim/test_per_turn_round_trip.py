"""The per-turn baseline's mispredicted turns cost what the paper's AMPD emulation charged (issue 3).

The artifact (eicchen/conserve conserve/src/per_turn_cost_model.py) delays a wrongly predicted turn-2+ request
by net(history) + prefill on the prefiller with the history in place + net(new) + KV bookkeeping
(2 sides x (2.0 ms + 5.0 us per 16-token block) over history + new), plus the prefiller's queue. The simulator
does each step for real: the history's KV goes decoder -> prefiller over the link, the prefiller queues and
prefills the rest over it, the new KV comes back, the bookkeeping is added to that transfer, and the decoder
emits the first token at its next step.
"""

from __future__ import annotations

import pytest
from simkit import a40, disagg

from orchestrator.sim import run_simulation
from orchestrator.sim.core import kv_round_trip_bookkeeping_s
from orchestrator.workload import ConversationSpec, TurnSpec
from placement.base import FleetView, InstanceView, Role, TurnRequest
from placement.policies import PerTurnPolicy
from tiers.links import kv_transfer_time_s


def test_bookkeeping_matches_the_artifacts_constants() -> None:
    # kv_mgmt_ms(L) = 2 * (2.0 + 5.0 * L / 16 / 1000) ms (cost_model_constants.csv)
    assert kv_round_trip_bookkeeping_s(0) == pytest.approx(4.0e-3)
    assert kv_round_trip_bookkeeping_s(16_000) == pytest.approx(2 * (2.0 + 5.0 * 1000 / 1000) * 1e-3)


def test_mispredicted_turn_pays_the_round_trip() -> None:
    tm = a40()
    first, out1, new2, out2 = 16_000, 40, 67, 30
    conv = ConversationSpec("c", 0.0, (TurnSpec(first, out1), TurnSpec(new2, out2)))
    res = run_simulation(disagg(tm, 1, 1), [conv], PerTurnPolicy(mispredict_rate=1.0))
    t1, t2 = res.turns
    assert t2.remote_prefill and t2.prefill_instance == "p0" and t2.decode_instance == "d0"
    history = first + out1
    blk = tm.block_size_tokens
    hist = history // blk * blk  # the decoder's cached history, whole blocks
    assert t2.history_transfer_tokens == hist
    assert t2.cached_tokens == hist and t2.prefilled_tokens == t2.input_tokens - hist  # only the rest
    back = t2.input_tokens - hist  # the decoder still holds the history: only the rest comes back
    assert t2.transfer_tokens == back
    kvb = tm.model.kv_bytes_per_token
    expected = (
        kv_transfer_time_s(hist, kvb, "pcie")  # net(history), decoder -> prefiller
        + tm.prefill_time_s(back, hist)  # idle prefiller: the prefill of the new tokens over the history
        + kv_transfer_time_s(back, kvb, "pcie")  # net(new), back
        + kv_round_trip_bookkeeping_s(t2.input_tokens)  # both sides, over history + new
        + tm.decode_step_time_s(1, t2.input_tokens)  # the decoder's first step emits the first token
    )
    assert t2.arrival_s == pytest.approx(t1.last_token_s)
    assert t2.ttft_s == pytest.approx(expected, rel=1e-9)
    assert res.kv_transfers == 3  # turn 1's hand-off + the round trip's two legs
    assert res.kv_transfer_bytes == (first + hist + back) * kvb


def test_round_trip_costs_more_than_a_local_turn_and_less_than_a_full_reprefill() -> None:
    tm = a40()
    conv = ConversationSpec("c", 0.0, (TurnSpec(16_000, 40), TurnSpec(67, 30)))
    local = run_simulation(disagg(tm, 1, 1), [conv], PerTurnPolicy(mispredict_rate=0.0)).turns[1]
    trip = run_simulation(disagg(tm, 1, 1), [conv], PerTurnPolicy(mispredict_rate=1.0)).turns[1]
    assert not local.remote_prefill and trip.remote_prefill
    assert trip.ttft_s > local.ttft_s
    assert trip.ttft_s < tm.prefill_time_s(trip.input_tokens)  # far cheaper than re-prefilling 16k tokens


def test_policy_asks_for_the_history_only_when_it_stays_on_the_decoder_holding_it() -> None:
    def view(free: int) -> FleetView:
        return FleetView(
            (
                InstanceView("p0", Role.PREFILL, "a40", True, 0, 0, 300_000, 0, 0, 0),
                InstanceView("d0", Role.DECODE, "a40", True, 0, 300_000 - free, 300_000, 1, 0, 1),
                InstanceView("d1", Role.DECODE, "a40", True, 0, 0, 300_000, 0, 0, 0),
            ),
            {},
        )

    pol = PerTurnPolicy(mispredict_rate=1.0)
    pol.place(TurnRequest("c", 1, 16_000, 16_000), view(300_000))
    pol.observe_turn_end("c", 1, 40)
    home = pol.place(TurnRequest("c", 2, 16_107, 67), view(300_000)).decode_instance
    pol.observe_turn_end("c", 2, 40)
    stay = pol.place(TurnRequest("c", 3, 16_214, 67), view(300_000))
    assert stay.decode_instance == home and stay.history_tokens == 16_214 - 67
    assert stay.transfer_tokens == 67
    pol.observe_turn_end("c", 3, 40)
    full = FleetView(
        tuple(
            InstanceView(i.instance_id, i.role, i.tier, True, 0, 300_000 if i.instance_id == home else 0,
                         300_000, 1, 0, 1)
            for i in view(0).instances
        ),
        {},
    )
    moved = pol.place(TurnRequest("c", 4, 16_321, 67), full)  # growth no longer fits at home: migrate
    assert moved.decode_instance != home and moved.history_tokens == 0
    assert moved.transfer_tokens == 16_321
