"""Conversation state as every driver keeps it: turn count, context, where its KV lives, its pin, its summary.

A live request carries a whole prompt; the conversation's previous context (prompt + output of its last
finished turn) tells how much of it is new (:meth:`ConversationState.next_turn`). A client that rewrote its
history (the prompt is not longer than the context) sends a prompt that is all new. When a turn ends
(:meth:`ConversationState.turn_ended`) the context grows to that turn's prompt + output, its decoder holds
that KV (pinned or not: a round trip ships it from there, orchestrator.core.turns.round_trip_tokens), and a
final turn sets the summary (orchestrator.core.summary). The pin fields are kept by a PinBook.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.core.summary import final_turn_times
from placement.base import TurnRequest


@dataclass(slots=True, eq=False)
class ConversationState:
    conversation_id: str
    first_arrival_s: float = 0.0
    turns: int = 0  # turns started so far
    pin: str | None = None  # kept by the driver's PinBook
    pinned_tokens: int = 0  # tokens counted against the pinned decoder
    context_tokens: int = 0  # prompt + output of the last finished turn
    last_decoder: str | None = None  # decoder of the last finished turn (holds its KV, pinned or not)
    final_turn: int | None = None
    ttfet_s: float | None = None
    e2e_s: float | None = None
    ended: bool = False

    def next_turn(self, prompt_tokens: int, max_output_tokens: int | None = None) -> TurnRequest:
        """Start the next turn: the turn as a policy sees it."""
        self.turns += 1
        turn = self.turns
        new = prompt_tokens - self.context_tokens if turn > 1 else prompt_tokens
        if new <= 0:  # the client rewrote its history: the whole prompt is new
            new = prompt_tokens
        return TurnRequest(self.conversation_id, turn, prompt_tokens, new, max_output_tokens)

    def turn_ended(
        self,
        turn: int,
        prompt_tokens: int,
        output_tokens: int,
        decoder: str,
        final: bool,
        first_token_s: float | None,
        last_token_s: float | None,
    ) -> float | None:
        """A turn finished successfully; returns the conversation's TTFET when this was a final turn whose
        first token was seen (the latest final turn wins), else None."""
        self.context_tokens = prompt_tokens + output_tokens
        self.last_decoder = decoder
        if not final or first_token_s is None:
            return None
        self.final_turn = turn
        self.ttfet_s, self.e2e_s = final_turn_times(self.first_arrival_s, first_token_s, last_token_s)
        return self.ttfet_s
