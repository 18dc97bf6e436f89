"""The driver core's fleet-view rule and pin book, as properties over arbitrary sequences of operations."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.core import PinBook, PinState, instance_view, kv_used_tokens
from placement.base import Role


@given(
    cap=st.integers(1, 10**6),
    resident=st.integers(0, 2 * 10**6),
    pinned=st.integers(0, 2 * 10**6),
    reserved=st.integers(0, 2 * 10**6),
)
def test_used_kv_is_the_largest_account_capped_at_capacity(
    cap: int, resident: int, pinned: int, reserved: int
) -> None:
    used = kv_used_tokens(cap, resident, pinned, reserved)
    assert used == min(cap, max(resident, pinned, reserved))
    assert 0 <= used <= cap
    # monotone in every account: more pinned KV never makes an instance look emptier
    assert kv_used_tokens(cap, resident, pinned + 1, reserved) >= used


def test_instance_view_carries_the_observables_and_the_rule() -> None:
    v = instance_view(
        "d0",
        Role.DECODE,
        "a40",
        healthy=True,
        queued_prefill_tokens=7,
        resident_kv_tokens=100,
        pinned_kv_tokens=900,
        kv_capacity_tokens=800,
        running_seqs=2,
        waiting_seqs=1,
        pinned_conversations=3,
    )
    assert (v.kv_used_tokens, v.kv_free_tokens, v.queued_prefill_tokens) == (800, 0, 7)
    assert (v.running_seqs, v.waiting_seqs, v.pinned_conversations) == (2, 1, 3)


@dataclass
class _Holder:
    pinned: set[str] = field(default_factory=set)
    pinned_tokens: int = 0


CONVS = ["a", "b", "c", "d"]
INSTANCES = ["d0", "d1", "d2"]
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("pin"), st.sampled_from(CONVS), st.sampled_from(INSTANCES)),
        st.tuples(st.just("unpin"), st.sampled_from(CONVS), st.none()),
        st.tuples(st.just("account"), st.sampled_from(CONVS), st.integers(0, 50_000)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_pin_book_tallies_always_equal_the_sum_over_pinned_conversations(ops: list[tuple]) -> None:
    holders = {i: _Holder() for i in INSTANCES}
    book = PinBook(holders)
    convs = {c: PinState(c) for c in CONVS}
    for op, cid, arg in ops:
        conv = convs[cid]
        if op == "pin":
            before = conv.pin
            assert book.pin(conv, arg) == before
            assert conv.pinned_tokens == 0  # a moved pin restarts its count on the new decoder
        elif op == "unpin":
            before = conv.pin
            assert book.unpin(conv) == before
        else:
            assert book.account(conv, arg) == conv.pin
            if conv.pin is None:
                assert conv.pinned_tokens == 0  # nothing is counted for an unpinned conversation
        for iid, h in holders.items():
            here = [c for c in convs.values() if c.pin == iid]
            assert h.pinned == {c.conversation_id for c in here}
            assert h.pinned_tokens == sum(c.pinned_tokens for c in here)
        assert book.pins == {c.conversation_id: c.pin for c in convs.values() if c.pin is not None}


def test_the_pin_map_is_shared_not_copied() -> None:
    """A FleetView built from ``book.pins`` sees later pins (the router passes the dict, never a copy)."""
    book = PinBook({"d0": _Holder()})
    pins = book.pins
    book.pin(PinState("a"), "d0")
    assert pins == {"a": "d0"}
