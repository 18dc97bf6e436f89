"""Router-side KV admission as the ConServe paper's artifact ran it (an option of the simulator driver).

The artifact (eicchen/conserve, ``conserve/src/conversation.py``: ``KvTracker``) kept, in the client that
played the router, a KV budget per engine (its ``KV_BUDGET_TOKENS``, ~308k tokens per A40 engine; here each
instance's modelled KV capacity). Before a conversation's first request was sent, its client blocked until
an engine had room for a reservation; the per-conversation clock (t0 = start of the first request,
``paper/figures/section5/scripts/s5_metrics.py``) started only after that wait. What was reserved depended on
the policy, and :data:`RULES` records it (read from the artifact, not tuned):

- ``conserve`` (``run_conversation_adaptive_disagg_decoders``) and ``colocated``
  (``run_conversation_no_disagg_oracle``): the conversation's whole final context (every turn's appended
  tokens + outputs) on one decode-capable engine, up front, released when the conversation ends.
- ``per-turn`` (``run_conversation_per_turn_adaptive_disagg_decoders``, AMPD-style): turn 1's prompt +
  output only; every later turn adds its appended tokens + output without blocking (the budget may be
  exceeded); released when the conversation ends.
- ``full-disagg`` (``run_conversation_kv_aware_all_disagg``): every turn blocks until a decoder has room for
  its whole prompt + output and the prefiller for its prompt, and releases both when the turn ends; only
  turn 1's wait is outside the clock (later turns' waits fall between turn 1 and the final turn).

``exclude_turn1_prefill_queue``: the artifact ran ConServe's and the per-turn baseline's two halves
separately and added turn-1 prefill compute + KV transfer back as a correction measured from the prefiller's
first execution, i.e. the prefiller's queueing left out (``adaptive_correction`` in s5_metrics.py, applied to
both ``adaptive_3eng`` and ``per_turn_adaptive_disagg_decoders``). For the per-turn runs it then added back
the extra turn-1 queueing its virtual prefiller's misprediction blocks caused; the simulator does not separate
that part, so under this rule per-turn's excluded queue includes it (docs/paper-reproduction.md gives its
size).

In the simulator the policy still makes every placement (``placement.base.Policy``): with admission on, the
driver calls ``place`` only once some engine has room for the reservation, shows the policy each engine's KV
use as max(observed, reserved) (the router's own accounting of its reservations), and reserves on the engine
the policy chose (waiting for that engine when it has no room yet, as ``KvTracker.wait_for_engine``). Waiting
conversations are admitted in arrival order without head-of-line blocking (the artifact's clients polled
every 50 ms; whoever fitted got in). What a turn reserves is :func:`reservation_tokens` (and
:func:`growth_tokens` for a later turn under the first-turn rule), so every driver reserves the same.
Pure data; must not import fastapi, sqlalchemy or httpx.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class Reserve(StrEnum):
    CONVERSATION = "conversation"  # whole final context up front, released at conversation end
    FIRST_TURN = "first-turn"  # turn 1's prompt + output; later turns grow it without blocking
    TURN = "turn"  # each turn: prompt + output on the decoder, prompt on the prefiller; released per turn


@dataclass(frozen=True, slots=True)
class AdmissionRule:
    reserve: Reserve
    exclude_turn1_prefill_queue: bool  # the artifact convention's t0 moves past turn 1's prefiller queue


# policy name -> rule (see the module docstring for the artifact function each row follows)
RULES: dict[str, AdmissionRule] = {
    "conserve": AdmissionRule(Reserve.CONVERSATION, True),
    "colocated": AdmissionRule(Reserve.CONVERSATION, False),
    "per-turn": AdmissionRule(Reserve.FIRST_TURN, True),
    "full-disagg": AdmissionRule(Reserve.TURN, False),
}
# Policies the artifact did not run (round-robin, kv-aware): reserve like colocated, no exclusion.
DEFAULT_RULE = AdmissionRule(Reserve.CONVERSATION, False)


def rule_for(policy_name: str) -> AdmissionRule:
    return RULES.get(policy_name, DEFAULT_RULE)


def reservation_tokens(
    rule: AdmissionRule, turn: int, input_tokens: Sequence[int], output_tokens: Sequence[int]
) -> tuple[int, int]:
    """(decoder tokens, prefiller tokens) that turn `turn` (1-based) of a conversation reserves when it is
    admitted; (0, 0): the turn is not admitted (it rides on the conversation's earlier reservation).

    `input_tokens[k]` / `output_tokens[k]` are turn k+1's whole prompt and its output (the artifact's clients
    replayed a trace, so they knew both; a live router knows them only up to the current turn).
    """
    if rule.reserve is Reserve.TURN:
        inp = input_tokens[turn - 1]
        return inp + output_tokens[turn - 1], inp
    if turn != 1:
        return 0, 0
    if rule.reserve is Reserve.CONVERSATION:
        return input_tokens[-1] + output_tokens[-1], 0  # the whole final context
    return input_tokens[0] + output_tokens[0], 0


def growth_tokens(rule: AdmissionRule, appended_tokens: int, output_tokens: int) -> int:
    """What a later turn adds to its conversation's reservation without blocking (AMPD's first-turn rule:
    its appended tokens + output; the budget may be exceeded); 0 under the other rules."""
    return appended_tokens + output_tokens if rule.reserve is Reserve.FIRST_TURN else 0


def has_room(capacity_tokens: int, reserved_tokens: int, need_tokens: int) -> bool:
    """An engine can take a reservation of `need_tokens` next to what is already reserved on it."""
    return capacity_tokens - reserved_tokens >= need_tokens
