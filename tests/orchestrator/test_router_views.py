"""The router's per-instance views are reused while nothing they are built from changed: whatever the router
mutates between requests, `view()` equals a view built afresh (a field missing from the cache key fails)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.engines.base import EngineObservation
from orchestrator.router.instances import Instance as _Instance
from placement.base import Role

# every mutation the router makes to an _Instance between two fleet views
MUTATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("inflight_prefill_tokens"), st.integers(-500, 500)),
        st.tuples(st.just("inflight_requests"), st.integers(-3, 3)),
        st.tuples(st.just("pinned_tokens"), st.integers(-5000, 5000)),
        st.tuples(st.just("pin"), st.sampled_from(["c1", "c2", "c3"])),
        st.tuples(st.just("unpin"), st.sampled_from(["c1", "c2", "c3"])),
        st.tuples(st.just("healthy"), st.booleans()),
        st.tuples(st.just("kv_capacity_tokens"), st.integers(1, 100_000)),
        st.tuples(
            st.just("obs"),
            st.builds(
                EngineObservation,
                healthy=st.booleans(),
                kv_usage_frac=st.floats(0, 1),
                running=st.integers(0, 8),
                waiting=st.integers(0, 8),
            ),
        ),
        st.tuples(st.just("nothing"), st.none()),
    ),
    max_size=30,
)


def _apply(inst: _Instance, what: str, arg: object) -> None:
    if what == "pin":
        inst.pinned.add(str(arg))
    elif what == "unpin":
        inst.pinned.discard(str(arg))
    elif what in ("inflight_prefill_tokens", "inflight_requests", "pinned_tokens"):
        setattr(inst, what, getattr(inst, what) + int(arg))  # type: ignore[call-overload]
    elif what != "nothing":
        setattr(inst, what, arg)


@settings(max_examples=300, deadline=None)
@given(MUTATIONS)
def test_a_reused_view_always_equals_a_fresh_one(mutations: list[tuple[str, object]]) -> None:
    inst = _Instance(engine=None, instance_id="d0", role=Role.DECODE, tier="a40", kv_capacity_tokens=10_000)  # type: ignore[arg-type]
    for what, arg in mutations:
        before = inst.view()
        _apply(inst, what, arg)
        after = inst.view()
        assert after == inst._build_view()
        if what == "nothing":
            assert after is before  # nothing changed: the same object, not a rebuilt one
