"""A conversation of turns: the dataclasses the planner and the simulator code against (via workload.py).

A conversation's turn k input is the previous turn's input + the previous turn's output + the tokens appended
this turn. Must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TurnSpec:
    appended_tokens: int  # new input tokens this turn (turn 1: the whole first prompt)
    output_tokens: int  # tokens decoded this turn
    tool_gap_s: float = 0.0  # gap between the end of the previous turn and this turn's arrival (0 for turn 1)


@dataclass(frozen=True, slots=True)
class ConversationSpec:
    conversation_id: str
    arrival_s: float  # arrival of turn 1, seconds from the start of the run
    turns: tuple[TurnSpec, ...]

    def input_tokens(self, turn: int) -> int:
        """Whole prompt of 1-based `turn`: history (inputs and outputs so far) + appended tokens."""
        total = 0
        for k, t in enumerate(self.turns[:turn], start=1):
            total += t.appended_tokens
            if k < turn:
                total += t.output_tokens
        return total

    @property
    def total_tokens(self) -> int:
        """Prompt + output tokens of every turn (the paper's tokens/J numerator)."""
        return sum(self.input_tokens(k) + t.output_tokens for k, t in enumerate(self.turns, start=1))
