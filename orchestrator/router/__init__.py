"""The live router: applies a placement policy to live requests, keeps pins, records every turn.

One policy, one driver core, two drivers: this package and the simulator build a
:class:`placement.base.FleetView` and call ``policy.place(turn, view)`` -- the router never decides placement
itself. Views, pins, the meaning of every Placement field and the per-conversation summary come from the
driver core (orchestrator/core/), shared with the simulator. Per turn it

1. estimates the prompt's tokens (tokenizer-free: ~4 characters per token, plus a few per chat message;
   the engine's reported ``usage`` replaces the estimate in the records once the turn ends) (values.py);
2. builds a FleetView from the engines' polled observations plus its own accounting (in-flight prefill
   tokens per instance, KV tokens of the conversations pinned to each decoder: a decoder's used KV is the
   larger of what it reports and what its pinned conversations hold) and places the turn (instances.py,
   driver.py);
3. executes the Placement: a remote prefill calls ``prefill()`` on the prefiller and forwards the returned
   ``kv_transfer_params`` with the original request to the decoder; otherwise the decoder prefills locally
   (from its prefix cache for later turns) (prefill.py);
4. streams the decoder's chunks back as typed events, timing the first token, every token gap and the last
   token (decode.py), encoded for the client by an output adapter: SSE bytes, chunk dicts or one JSON body
   (adapters.py);
5. records the turn (a :class:`energy.records.TurnRecord`) and pins (``PinRecord``) through a
   :class:`TurnSink` that must not block (the runtime's background SQL writer); with ``durability`` given,
   an answered turn's last byte waits until that record is committed (driver.py).

Final turn: a turn whose ``finish_reason`` is ``"stop"`` with no tool calls, or that the client marks final
(``X-Conversation-Final: true`` header or body ``"conserve": {"final": true}``, parsed by the API). TTFET is
from the arrival of turn 1 to the first token of the latest final turn. The pin is held until the client
marks a turn final, the conversation is idle for ``pin_ttl_s``, or its decoder fails (a ``stop`` turn does
not end it: a chat may go on). A request without a conversation id is a one-turn conversation.

Failure (failures.py): an engine that cannot be reached (refused, reset, timed out) is marked down at once;
one that answers with an error (HTTP 5xx, an error event in its stream) stays up; a health poll marks an
engine down after ``down_after_failed_polls`` failed polls in a row and brings it back on its first good poll
(instances.py). A failed attempt is recorded with status ``replaced`` and retried once through the policy
(which re-places a pinned conversation on a healthy decoder with a full re-prefill) when nothing was sent to
the client yet; otherwise the turn is recorded with status ``error`` and :class:`EngineUnavailable` is raised
(the API answers 503, or an SSE error event mid-stream).

Must not import fastapi, starlette or sqlalchemy (the API and the ledger are edges).
"""

from orchestrator.engines.sse import SSE_DONE, SseSplitter, parse_event
from orchestrator.router.adapters import assemble_response
from orchestrator.router.driver import Router
from orchestrator.router.failures import EngineAnsweredError
from orchestrator.router.values import (
    CHARS_PER_TOKEN,
    ConversationNotFound,
    EngineRejected,
    EngineUnavailable,
    PinLookup,
    PromptTooLarge,
    RouterConfig,
    RouterObserver,
    TurnInput,
    TurnSink,
    estimate_prompt_tokens,
)

__all__ = [
    "CHARS_PER_TOKEN",
    "ConversationNotFound",
    "EngineAnsweredError",
    "EngineRejected",
    "EngineUnavailable",
    "PinLookup",
    "PromptTooLarge",
    "Router",
    "RouterConfig",
    "RouterObserver",
    "SSE_DONE",
    "SseSplitter",
    "TurnInput",
    "TurnSink",
    "assemble_response",
    "estimate_prompt_tokens",
    "parse_event",
]
