"""Conversation state in the driver core: new tokens per turn, the context, where its KV is, the summary."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.core import ConversationState


def test_turns_new_tokens_context_and_the_latest_final_turns_summary() -> None:
    c = ConversationState("c", first_arrival_s=10.0)
    t1 = c.next_turn(16_000)
    assert (t1.turn, t1.input_tokens, t1.new_tokens, t1.max_output_tokens) == (1, 16_000, 16_000, None)
    assert c.turn_ended(1, 16_000, 120, "d0", False, 11.0, 12.0) is None
    assert (c.context_tokens, c.last_decoder, c.final_turn) == (16_120, "d0", None)
    t2 = c.next_turn(16_187, max_output_tokens=200)
    assert (t2.turn, t2.new_tokens, t2.max_output_tokens) == (2, 67, 200)
    assert c.turn_ended(2, 16_187, 90, "d1", True, 13.0, 14.5) == 3.0  # a 'stop' turn: TTFET so far
    assert (c.final_turn, c.ttfet_s, c.e2e_s, c.last_decoder) == (2, 3.0, 4.5, "d1")
    c.next_turn(16_300)
    assert c.turn_ended(3, 16_300, 10, "d1", True, 20.0, None) == 10.0  # the latest final turn wins
    assert (c.final_turn, c.e2e_s) == (3, None)


@given(context=st.integers(0, 50_000), prompt=st.integers(1, 50_000))
def test_a_rewritten_history_makes_the_whole_prompt_new(context: int, prompt: int) -> None:
    c = ConversationState("c")
    c.next_turn(1)
    c.turn_ended(1, 1, 0, "d0", False, None, None)
    c.context_tokens = context
    t = c.next_turn(prompt)
    assert 1 <= t.new_tokens <= prompt
    assert t.new_tokens == (prompt - context if prompt > context else prompt)
