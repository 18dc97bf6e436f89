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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from placement.base import InstanceView


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


# ---- bounded admission wait (issue 12 item 4): the live router's rule, and the simulator's -----------------

# serve's default bound on the wait (``serve --admission-wait``, fleet.yaml ``admission_wait_s``): a turn
# that no decoder can hold waits up to this long for one to free room, then is refused (503, Retry-After).
# A choice, not a measurement: room frees when running turns end, and a turn of the paper's trace decodes
# ~120 tokens at tens of ms per token (seconds), so 30 s spans many turn ends; a wait that outlasts it means
# the fleet is over capacity. It stays well under common client timeouts (the OpenAI Python client's default
# is 600 s). 0 turns admission off (turns queue on their engine, unbounded).
DEFAULT_ADMISSION_WAIT_S = 30.0


class Admit(StrEnum):
    ADMIT = "admit"  # some healthy decode-capable instance has room: place the turn now
    WAIT = "wait"  # none has room yet and the wait is not over: look again later
    REJECT = "reject"  # none had room within the bound: refuse the turn


def any_room(instances: Iterable[InstanceView], need_tokens: int) -> bool:
    """Room for `need_tokens` as the admission rule sees it: some healthy decode-capable instance can take
    them next to its used KV (as views show it) -- or none is healthy at all: then waiting cannot help, and
    placement answers at once (EngineUnavailable, 503 engine_unavailable)."""
    healthy = [v for v in instances if v.healthy and v.role.can_decode]
    return not healthy or any(has_room(v.kv_capacity_tokens, v.kv_used_tokens, need_tokens) for v in healthy)


def admit(room: bool, waited_s: float, max_wait_s: float) -> Admit:
    """The bounded-wait rule: admit when there is room; otherwise wait while ``waited_s < max_wait_s``, then
    reject. ``max_wait_s <= 0`` means admission is off: always admit (the turn queues on its engine)."""
    if room or max_wait_s <= 0:
        return Admit.ADMIT
    return Admit.WAIT if waited_s < max_wait_s else Admit.REJECT


def retry_after_s(max_wait_s: float) -> int:
    """Retry-After of a refused turn: the bound itself (whole seconds, at least 1): room freed within one
    wait is what the refused client would have waited for."""
    return max(1, -int(-max_wait_s // 1))


def refusal_message(need_tokens: int, max_wait_s: float) -> str:
    """What a refused turn is told (the router raises it as AdmissionTimedOut; the API answers 503)."""
    return (
        f"no decoder had room for this turn's ~{need_tokens} KV tokens within the admission wait of "
        f"{max_wait_s:g} s: the fleet is at capacity. To fix: retry after Retry-After seconds, lower "
        "max_tokens, or add decode capacity."
    )
