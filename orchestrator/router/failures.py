"""Failure classification: what an attempt's exception says about the engine, and what the router does next.

| failure                                     | kind        | engine          | turn                        |
|---------------------------------------------|-------------|-----------------|-----------------------------|
| HTTP 4xx (the engine judged it invalid)     | REJECTED    | stays up        | ``error``; EngineRejected   |
| HTTP 5xx, or an error event in its stream   | ANSWERED    | stays up        | retried / EngineUnavailable |
| refused, reset, timed out, anything else    | UNREACHABLE | marked down now | retried / EngineUnavailable |

A retried attempt is recorded ``replaced`` and placed again through the policy (which re-places a pinned
conversation on a healthy decoder with a full re-prefill), once per ``RouterConfig.max_attempts``, and only
while nothing reached the client; otherwise the attempt is recorded ``error`` and the turn fails with
:class:`EngineUnavailable` (the API answers 503, or an SSE error event mid-stream). An engine that answered
is alive (e.g. a failed KV pull): the health polls decide whether it is down, and the retry may land on it.

Pure: no I/O. Must not import fastapi, starlette or sqlalchemy.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum

from energy.records import TurnStatus
from orchestrator.errors import EngineError

# What an attempt may fail with and still be an engine's failure (not a bug, not the client going away).
ENGINE_FAILURES: tuple[type[BaseException], ...] = (EngineError, OSError, asyncio.TimeoutError)


class EngineAnsweredError(EngineError):
    """The engine answered, with an error event in its stream: it is alive (not marked down)."""


class FailureKind(StrEnum):
    REJECTED = "rejected"  # HTTP 4xx: the client's request is invalid
    ANSWERED = "answered"  # HTTP 5xx or an error event: the engine is alive
    UNREACHABLE = "unreachable"  # refused, reset or timed out: the engine is down until a poll sees it


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the router does with a failed attempt."""

    kind: FailureKind
    status: int | None  # the engine's HTTP status, where it answered with one
    mark_down: bool  # the engine is marked down at once
    retry: bool  # the turn is placed again (nothing reached the client, attempts left)
    record: TurnStatus  # how the failed attempt is recorded


def classify(err: BaseException) -> tuple[FailureKind, int | None]:
    """The kind of an engine failure (one of ENGINE_FAILURES) and the engine's HTTP status if it gave one."""
    status = err.status if isinstance(err, EngineError) else None
    if status is not None and 400 <= status < 500:
        return FailureKind.REJECTED, status
    if isinstance(err, EngineAnsweredError) or status is not None:
        return FailureKind.ANSWERED, status
    return FailureKind.UNREACHABLE, None


def outcome(err: BaseException, *, sent: bool, attempts_left: int) -> Outcome:
    """The table in the module docstring: `sent` is whether output of this attempt reached the client,
    `attempts_left` how many attempts of the turn remain after this one."""
    kind, status = classify(err)
    if kind is FailureKind.REJECTED:
        return Outcome(kind, status, mark_down=False, retry=False, record=TurnStatus.ERROR)
    retry = not sent and attempts_left > 0
    return Outcome(
        kind,
        status,
        mark_down=kind is FailureKind.UNREACHABLE,
        retry=retry,
        record=TurnStatus.ERROR if sent else TurnStatus.REPLACED,
    )
