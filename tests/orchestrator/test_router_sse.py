"""The router's SSE pass-through: SseSplitter over arbitrary block boundaries, and Router.stream_sse over an
engine that offers stream_raw (accounting from the parsed events, bytes forwarded unchanged)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from energy.records import PinRecord, TurnRecord, TurnStatus
from orchestrator.engines.base import EngineObservation, EngineRequest, PrefillResult, RequestKind, Wire
from orchestrator.errors import EngineError
from orchestrator.router import (
    SSE_DONE,
    EngineUnavailable,
    Router,
    RouterConfig,
    SseSplitter,
    TurnInput,
    parse_event,
)
from placement.base import Role
from placement.policies import make_policy


def _chunk(i: int, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": f"t{i}"}, "finish_reason": finish}],
    }


USAGE = {"id": "x", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
CHUNKS = [_chunk(0), _chunk(1), _chunk(2, "stop"), USAGE]


def _events(chunks: list[dict[str, Any]]) -> list[bytes]:
    return [b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n" for c in chunks]


WIRE = b"".join(_events(CHUNKS)) + b": keep-alive\n\n" + SSE_DONE


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, len(WIRE)), max_size=12), crlf=st.booleans())
def test_splitter_finds_the_same_events_for_any_block_boundaries(cuts: list[int], crlf: bool) -> None:
    wire = WIRE.replace(b"\n", b"\r\n") if crlf else WIRE
    sp = SseSplitter()
    got: list[tuple[bytes, bytes]] = []
    for block in _split(wire, cuts):
        got += sp.split(block)
    got += sp.close()
    assert [parse_event(p) for p, _ in got] == CHUNKS
    assert b"".join(raw for _, raw in got) == b"".join(_events(CHUNKS))
    assert sp.done


def test_splitter_joins_multiline_data_and_the_parser_rejects_non_json() -> None:
    ((payload, raw),) = SseSplitter().split(b'data: {"a":\ndata: 1}\n\n')
    assert parse_event(payload) == {"a": 1} and raw == b'data: {"a":\n1}\n\n'
    with pytest.raises(EngineError, match="e1.*not JSON"):
        parse_event(b"{oops", "e1")
    with pytest.raises(EngineError, match="not a JSON object"):
        parse_event(b"[1, 2]")


# ---- Router.stream_sse over a raw-SSE engine -----------------------------------------------------------


class CannedSseEngine:
    """An engine whose stream_raw replays fixed SSE bytes in given blocks (the wire of a vLLM server)."""

    role = Role.COLOCATED
    tier = "t"
    wire = Wire.SSE
    kv_capacity_tokens = 100_000

    def __init__(self, blocks: list[bytes]) -> None:
        self.instance_id = "e0"
        self.blocks = blocks
        self.bodies: list[dict[str, Any]] = []

    async def stream_raw(self, req: EngineRequest) -> AsyncIterator[bytes]:
        self.bodies.append(req.body)
        for b in self.blocks:
            yield b

    def stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:  # pragma: no cover - not used
        raise AssertionError("the router must use stream_raw")

    async def prefill(self, req: EngineRequest) -> PrefillResult:  # pragma: no cover - colocated, no prefill
        raise AssertionError

    async def complete(self, req: EngineRequest) -> dict[str, Any]:  # pragma: no cover
        raise AssertionError

    async def observe(self) -> EngineObservation:
        return EngineObservation(healthy=True)

    async def observe_shared(self) -> EngineObservation:
        return await self.observe()

    async def aclose(self) -> None:
        return None


class Sink:
    def __init__(self) -> None:
        self.turns: list[TurnRecord] = []

    def turn(self, rec: TurnRecord) -> None:
        self.turns.append(rec)

    def pin(self, rec: PinRecord) -> None:
        return None


def _router(engine: CannedSseEngine, sink: Sink) -> Router:
    return Router({"e0": engine}, make_policy("conserve"), RouterConfig("m", 32_000), sink=sink)


def _inp(include_usage: bool) -> TurnInput:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    return TurnInput(RequestKind.CHAT, body, None, include_usage=include_usage)


@pytest.mark.parametrize("include_usage", [False, True], ids=["usage-dropped", "usage-asked"])
@pytest.mark.parametrize(
    "cuts", [[], [10, 200, 201], list(range(0, len(WIRE), 7))], ids=["one", "three", "many"]
)
async def test_stream_sse_forwards_engine_bytes_and_records_the_turn(
    include_usage: bool, cuts: list[int]
) -> None:
    engine, sink = CannedSseEngine(_split(WIRE, cuts)), Sink()
    blocks = [b async for b in _router(engine, sink).stream_sse(_inp(include_usage))]
    expected = _events(CHUNKS if include_usage else CHUNKS[:3])
    assert b"".join(blocks) == b"".join(expected) + SSE_DONE
    assert all(not b.endswith(SSE_DONE) for b in blocks[:-1]) and blocks[-1].endswith(SSE_DONE)
    assert engine.bodies[0]["stream_options"] == {"include_usage": True}  # the router always asks for usage
    (rec,) = sink.turns
    assert rec.status == TurnStatus.OK and rec.is_final and rec.finish_reason == "stop"
    assert (rec.prompt_tokens, rec.output_tokens) == (7, 3)  # from the engine's usage, not the estimate
    assert rec.first_token_at is not None and rec.last_token_at is not None


async def test_engine_error_event_mid_stream_ends_the_turn_as_an_error() -> None:
    err = b'data: {"error": {"message": "boom", "code": 500}}\n\n'
    engine, sink = CannedSseEngine([_events([_chunk(0)])[0], err]), Sink()
    got = []
    with pytest.raises(EngineUnavailable, match="boom"):
        async for b in _router(engine, sink).stream_sse(_inp(False)):
            got.append(b)
    assert got == [_events([_chunk(0)])[0]]
    assert [r.status for r in sink.turns] == [TurnStatus.ERROR]


ROLE = {
    "id": "x",
    "object": "chat.completion.chunk",
    "choices": [{"index": 0, "delta": {"role": "assistant"}}],
}


class RecordingSink(Sink):
    """A sink that notes how many blocks the client had received when the turn was recorded."""

    def __init__(self, received: list[bytes]) -> None:
        super().__init__()
        self.received = received
        self.blocks_at_record: list[int] = []

    def turn(self, rec: TurnRecord) -> None:
        self.blocks_at_record.append(len(self.received))
        super().turn(rec)


async def test_the_first_token_leaves_before_the_rest_of_the_read_and_before_the_turn_is_recorded() -> None:
    """A whole response in one engine read (a short answer, or a fast engine): the client gets the role and
    first-token events as their own block; the rest follows with [DONE] once the turn is recorded."""
    wire = b"".join(_events([ROLE, *CHUNKS])) + SSE_DONE
    got: list[bytes] = []
    engine, sink = CannedSseEngine([wire]), RecordingSink(got)
    async for b in _router(engine, sink).stream_sse(_inp(False)):
        got.append(b)
    assert got[0] == b"".join(_events([ROLE, _chunk(0)]))  # nothing after the first token's event
    assert got[1:] == [b"".join(_events([_chunk(1), _chunk(2, "stop")])) + SSE_DONE]
    assert sink.blocks_at_record == [1]  # recorded after the first token left, before [DONE]
    (rec,) = sink.turns
    assert rec.status == TurnStatus.OK and rec.output_tokens == 3


async def test_a_bad_event_after_the_first_token_in_the_same_read_fails_the_turn_after_output() -> None:
    wire = _events([_chunk(0)])[0] + b"data: {oops\n\n" + SSE_DONE
    got: list[bytes] = []
    engine, sink = CannedSseEngine([wire]), Sink()
    with pytest.raises(EngineUnavailable, match="after output was streamed.*not JSON"):
        async for b in _router(engine, sink).stream_sse(_inp(False)):
            got.append(b)
    assert got == [_events([_chunk(0)])[0]]
    assert [r.status for r in sink.turns] == [TurnStatus.ERROR]
