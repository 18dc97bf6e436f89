"""A decoder that does not accept new conversations (drained or parked by the power controller) gets no new
conversation, while the conversations pinned to it keep their decoder."""

from __future__ import annotations

from placement.base import FleetView, InstanceView, Role, TurnRequest
from placement.policies import make_policy


def view(pins: dict[str, str]) -> FleetView:
    return FleetView(
        (
            InstanceView("p0", Role.PREFILL, "a40"),
            InstanceView("d0", Role.DECODE, "a40", kv_capacity_tokens=300_000, accepting=False),
            InstanceView("d1", Role.DECODE, "a40", kv_used_tokens=200_000, kv_capacity_tokens=300_000,
                         pinned_conversations=1),
        ),
        pins,
    )  # fmt: skip


def test_new_conversation_skips_a_non_accepting_decoder_and_pins_stay() -> None:
    pol = make_policy("conserve")
    new = pol.place(TurnRequest("c-new", 1, 16_000, 16_000), view({}))
    assert new.decode_instance == "d1"  # d0 has more free KV but takes no new conversation
    pinned = pol.place(TurnRequest("c-old", 2, 16_200, 200), view({"c-old": "d0"}))
    assert pinned.decode_instance == "d0"  # draining: its own conversations finish there


def test_router_instance_view_carries_accepting() -> None:
    from orchestrator.router.instances import Instance

    inst = Instance(engine=None, instance_id="d0", role=Role.DECODE, tier="a40")  # type: ignore[arg-type]
    assert inst.view().accepting
    inst.accepting = False
    assert not inst.view().accepting  # the reused view is rebuilt
    assert inst.status()["accepting"] is False
