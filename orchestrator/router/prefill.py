"""The prefill and hand-off step of a remote-prefill placement.

The prefiller prefills the prompt (``Engine.prefill``: one token, remote decode) and returns the KV handle
(``kv_transfer_params``) the decoder pulls the KV cache with; the decode step forwards it with the original
request. A KV round trip (``Placement.history_tokens``): the decoder that served the conversation's last
turn holds its history, so the prefiller pulls that KV from it and computes only the rest
(orchestrator.core.turns decides how many tokens each side does). The prefiller's in-flight accounting
(queued prefill tokens, requests) is held while its prefill runs.

Must not import fastapi, starlette or sqlalchemy.
"""

from __future__ import annotations

from typing import Any

from orchestrator.core import remote_prefill_tokens, round_trip_tokens
from orchestrator.engines.base import EngineRequest, PrefillResult, RequestKind
from orchestrator.router.instances import Instance
from placement.base import Placement, TurnRequest


async def prefill_remote(
    pre: Instance,
    dec: Instance,
    placement: Placement,
    treq: TurnRequest,
    decoder_holds_tokens: int,
    kind: RequestKind,
    body: dict[str, Any],
    request_id: str,
    conversation_id: str,
    prompt_tokens: int,
) -> PrefillResult:
    """Run the prefill on `pre` for decoding on `dec`; `decoder_holds_tokens` is the conversation's context
    that `dec` holds from its last turn (0 when the last turn ran elsewhere)."""
    history = round_trip_tokens(placement, treq, decoder_holds_tokens)
    queued = remote_prefill_tokens(placement, treq, history)
    pre.inflight_prefill_tokens += queued
    pre.inflight_requests += 1
    try:
        res = await pre.engine.prefill(
            EngineRequest(
                kind,
                body,
                request_id,
                conversation_id,
                prompt_tokens,
                history_tokens=history,
                history_source=dec.instance_id if history else None,
            )
        )
    finally:
        pre.inflight_prefill_tokens -= queued
        pre.inflight_requests -= 1
    dec.kv_transfers_in += 1
    return res
