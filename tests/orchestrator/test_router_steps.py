"""The router's steps on their own (orchestrator/router/): failure classification, the decode stream's typed
events, the output adapters, the SSE <-> chunk conversions of the engines' two streams, and the capabilities
every engine kind declares in the Engine protocol."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve.clock import SYSTEM_CLOCK
from energy.records import TurnStatus
from orchestrator.engines.base import (
    Engine,
    EngineObservation,
    EngineRequest,
    PrefillResult,
    RequestKind,
    Wire,
)
from orchestrator.engines.sse import SSE_DONE, SseSplitter, chunks_from_sse, parse_event, sse_from_chunks
from orchestrator.engines.vllm import EngineHTTPError, VllmEngine
from orchestrator.errors import EngineError
from orchestrator.router.adapters import ChunkOutput, JsonOutput, SseOutput
from orchestrator.router.decode import Attempt, Output, decode_stream
from orchestrator.router.failures import EngineAnsweredError, FailureKind, classify, outcome
from orchestrator.router.instances import Instance
from placement.base import Placement, Role

ROUTER_PKG = Path(__file__).resolve().parents[2] / "orchestrator" / "router"


def _chunk(text: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {"id": "x", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"id": "x", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}
CHUNKS = [_chunk(None), _chunk("a"), _chunk("b", "stop"), USAGE]


def _event(c: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n"


# ---- failure classification ----------------------------------------------------------------------------


def _http(status: int) -> EngineHTTPError:
    return EngineHTTPError(f"engine 'e0' answered HTTP {status}", status)


CLASSIFY = [
    ("http-400", _http(400), FailureKind.REJECTED, 400),
    ("http-422", _http(422), FailureKind.REJECTED, 422),
    ("http-500", _http(500), FailureKind.ANSWERED, 500),
    ("http-503", _http(503), FailureKind.ANSWERED, 503),
    ("error-event", EngineAnsweredError("failed mid-stream: KV pull failed"), FailureKind.ANSWERED, None),
    ("refused", ConnectionRefusedError(111, "refused"), FailureKind.UNREACHABLE, None),
    ("reset", ConnectionResetError(104, "reset"), FailureKind.UNREACHABLE, None),
    ("timeout", TimeoutError(), FailureKind.UNREACHABLE, None),
    (
        "engine-error",
        EngineError("engine 'e0' at http://x failed. To fix: ..."),
        FailureKind.UNREACHABLE,
        None,
    ),
]


@pytest.mark.parametrize(("err", "kind", "status"), [c[1:] for c in CLASSIFY], ids=[c[0] for c in CLASSIFY])
def test_classify(err: BaseException, kind: FailureKind, status: int | None) -> None:
    assert classify(err) == (kind, status)


def test_a_status_set_on_any_engine_error_is_read() -> None:
    """The simulated engine sets `status` on a plain EngineError (EngineError declares it)."""
    err = EngineError("too large")
    err.status = 400
    assert classify(err) == (FailureKind.REJECTED, 400)


OUTCOMES = [
    # id, error, sent, attempts left -> mark down, retry, recorded as
    ("4xx-never-retried", _http(400), False, 1, False, False, TurnStatus.ERROR),
    ("5xx-retried-kept-up", _http(503), False, 1, False, True, TurnStatus.REPLACED),
    ("5xx-last-attempt", _http(503), False, 0, False, False, TurnStatus.REPLACED),
    ("5xx-after-output", _http(503), True, 1, False, False, TurnStatus.ERROR),
    ("refused-marked-down-retried", ConnectionRefusedError(), False, 1, True, True, TurnStatus.REPLACED),
    ("timeout-after-output", TimeoutError(), True, 1, True, False, TurnStatus.ERROR),
    ("error-event-before-output", EngineAnsweredError("x"), False, 1, False, True, TurnStatus.REPLACED),
]


@pytest.mark.parametrize(
    ("err", "sent", "left", "down", "retry", "record"),
    [o[1:] for o in OUTCOMES],
    ids=[o[0] for o in OUTCOMES],
)
def test_outcome_table(
    err: BaseException, sent: bool, left: int, down: bool, retry: bool, record: TurnStatus
) -> None:
    out = outcome(err, sent=sent, attempts_left=left)
    assert (out.mark_down, out.retry, out.record) == (down, retry, record)


@settings(max_examples=100, deadline=None)
@given(idx=st.integers(0, len(CLASSIFY) - 1), sent=st.booleans(), left=st.integers(0, 3))
def test_outcome_properties(idx: int, sent: bool, left: int) -> None:
    """Never retried once output reached the client or without attempts left; only an unreachable engine is
    marked down; a rejected request is never retried."""
    err = CLASSIFY[idx][1]
    out = outcome(err, sent=sent, attempts_left=left)
    assert not (out.retry and (sent or left == 0))
    assert out.mark_down == (out.kind is FailureKind.UNREACHABLE)
    assert not (out.kind is FailureKind.REJECTED and out.retry)
    assert (out.record is TurnStatus.REPLACED) == (not sent and out.kind is not FailureKind.REJECTED)


# ---- the engines' two streams ------------------------------------------------------------------------------


async def _agen(items: list[Any]) -> AsyncIterator[Any]:
    for it in items:
        yield it


async def test_sse_from_chunks_then_split_gives_the_chunks_back() -> None:
    blocks = [b async for b in sse_from_chunks(_agen(CHUNKS))]
    assert blocks[-1] == SSE_DONE and blocks[:-1] == [_event(c) for c in CHUNKS]
    sp = SseSplitter()
    got = [parse_event(p) for b in blocks for p, _ in sp.split(b)]
    assert got == CHUNKS and sp.done


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 400), max_size=8))
def test_chunks_from_sse_over_any_block_boundaries(cuts: list[int]) -> None:
    wire = b": keep-alive\n\n" + b"".join(_event(c) for c in CHUNKS) + SSE_DONE + _event(_chunk("after"))
    points = sorted({min(c, len(wire)) for c in cuts})
    blocks = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True) if b > a]

    async def run() -> list[dict[str, Any]]:
        return [c async for c in chunks_from_sse(_agen(blocks), "e0")]

    assert asyncio.run(run()) == CHUNKS  # nothing after [DONE]


async def test_chunks_from_sse_raises_on_an_error_event_after_what_came_before() -> None:
    wire = [_event(_chunk("a")), b'data: {"error": {"message": "engine died"}}\n\n', _event(_chunk("b"))]
    got: list[dict[str, Any]] = []
    with pytest.raises(EngineError, match="e0.*engine died"):
        async for c in chunks_from_sse(_agen(wire), "e0"):
            got.append(c)
    assert got == [_chunk("a")]


# ---- capabilities declared by every engine kind ---------------------------------------------------------


def test_every_engine_kind_declares_its_capabilities(tmp_path: Path) -> None:
    from orchestrator.engines.sim import SimEngine
    from tiers.catalog import get_gpu
    from tiers.models import get_model
    from tiers.perf import TierModel

    vllm = VllmEngine("v0", Role.DECODE, "a40", "http://127.0.0.1:1")
    sim = SimEngine(
        "s0", Role.DECODE, "a40", TierModel(get_gpu("A40"), get_model("Qwen3-0.6B")), model_name="m"
    )
    for engine, wire in ((vllm, Wire.SSE), (sim, Wire.CHUNKS)):
        assert isinstance(engine, Engine)  # runtime_checkable: every member of the protocol is present
        assert engine.wire is wire
    assert vllm.kv_capacity_tokens == 0  # learned from /metrics
    assert sim.kv_capacity_tokens > 0


def test_the_router_probes_no_engine_capability_and_its_modules_stay_small() -> None:
    for path in sorted(ROUTER_PKG.glob("*.py")):
        text = path.read_text()
        assert "getattr(" not in text, f"{path.name}: capabilities are declared in the Engine protocol"
        assert len(text.splitlines()) <= 520, f"{path.name} is over ~500 lines (issue 11)"


# ---- the decode stream's events and the output adapters -------------------------------------------------


class _Engine:
    """A colocated engine of either wire that serves fixed chunks in fixed reads."""

    role, tier, kv_capacity_tokens, instance_id = Role.COLOCATED, "t", 1000, "e0"

    def __init__(self, wire: Wire, reads: list[list[dict[str, Any]]], tail: bytes = b"") -> None:
        self.wire, self.reads, self.tail = wire, reads, tail  # tail: raw bytes after the reads, no [DONE]

    async def stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        for read in self.reads:
            for c in read:
                yield c

    async def stream_raw(self, req: EngineRequest) -> AsyncIterator[bytes]:
        for i, read in enumerate(self.reads):
            done = i == len(self.reads) - 1 and not self.tail
            yield b"".join(_event(c) for c in read) + (SSE_DONE if done else b"")
        if self.tail:
            yield self.tail

    async def prefill(self, req: EngineRequest) -> PrefillResult:  # pragma: no cover - colocated
        raise AssertionError

    async def complete(self, req: EngineRequest) -> dict[str, Any]:  # pragma: no cover
        raise AssertionError

    async def observe(self) -> EngineObservation:  # pragma: no cover
        return EngineObservation(healthy=True)

    async def observe_shared(self) -> EngineObservation:  # pragma: no cover
        return await self.observe()

    async def aclose(self) -> None:  # pragma: no cover
        return None


def _inst(engine: _Engine) -> Instance:
    return Instance(engine=engine, instance_id="e0", role=Role.COLOCATED, tier="t", kv_capacity_tokens=1000)  # type: ignore[arg-type]


REQ = EngineRequest(RequestKind.CHAT, {}, "r1", "c1", 12)


async def _decode(
    engine: _Engine, adapter: Any, local_prefill: int = 12
) -> tuple[list[Output], Attempt, Instance]:
    inst = _inst(engine)
    att = Attempt("r1", Placement(decode_instance="e0"))
    outs = [o async for o in decode_stream(inst, REQ, att, adapter, SYSTEM_CLOCK, local_prefill)]
    return outs, att, inst


async def test_sse_decode_splits_at_the_first_token_and_marks_the_last_read() -> None:
    eng = _Engine(Wire.SSE, [[_chunk(None), _chunk("a"), _chunk("b")], [_chunk("c", "stop"), USAGE]])
    outs, att, inst = await _decode(eng, SseOutput(include_usage=False))
    assert [(o.first_token, o.last) for o in outs] == [(True, False), (False, False), (False, True)]
    assert outs[0].items == [_event(_chunk(None)), _event(_chunk("a"))]  # ends at the first token's event
    assert outs[2].items == [_event(_chunk("c", "stop"))]  # usage-only chunk not asked for: dropped
    assert (att.tokens, att.finish_reason, att.usage) == (3, "stop", USAGE["usage"])
    assert att.first_s is not None and att.last_s is not None and len(att.gaps_s) == 2
    assert (inst.inflight_requests, inst.inflight_prefill_tokens) == (0, 0)  # released when the stream ends


async def test_the_same_chunks_from_a_chunk_engine_are_encoded_and_usage_kept_when_asked() -> None:
    reads = [[_chunk(None), _chunk("a"), _chunk("b")], [_chunk("c", "stop"), USAGE]]
    sse_outs, _, _ = await _decode(_Engine(Wire.SSE, reads), SseOutput(include_usage=True))
    chunk_outs, _, _ = await _decode(_Engine(Wire.CHUNKS, reads), SseOutput(include_usage=True))
    assert b"".join(i for o in sse_outs for i in o.items) == b"".join(i for o in chunk_outs for i in o.items)
    assert chunk_outs[-1].items[-1] == _event(USAGE)


async def test_chunk_and_json_outputs_do_not_split_and_json_keeps_usage() -> None:
    reads = [[_chunk("a"), _chunk("b")], [_chunk("c", "stop"), USAGE]]
    outs, _, _ = await _decode(_Engine(Wire.SSE, reads), ChunkOutput(include_usage=False))
    assert [o.items for o in outs] == [reads[0], [_chunk("c", "stop")]]
    outs, _, _ = await _decode(_Engine(Wire.SSE, reads), JsonOutput(RequestKind.CHAT, "m"))
    assert [i for o in outs for i in o.items] == reads[0] + reads[1]


async def test_an_error_event_raises_engine_answered_and_releases_the_decoder() -> None:
    err = b'data: {"error": {"message": "KV pull failed"}}\n\n'
    eng = _Engine(Wire.SSE, [[_chunk("a")]], tail=err)
    inst = _inst(eng)
    att = Attempt("r1", Placement(decode_instance="e0"))
    got: list[Output] = []
    with pytest.raises(EngineAnsweredError, match="e0.*KV pull failed"):
        async for o in decode_stream(inst, REQ, att, SseOutput(False), SYSTEM_CLOCK, 12):
            got.append(o)
    assert len(got) == 1 and got[0].first_token  # the first token had left before the error was parsed
    assert (inst.inflight_requests, inst.inflight_prefill_tokens) == (0, 0)


def test_adapters_hold_and_close() -> None:
    first = Output([b"data: 1\n\n"], True, False)
    last = Output([b"data: 2\n\n", b"data: 3\n\n"], False, True)
    sse = SseOutput(False)
    assert not sse.holds(first) and sse.holds(last)
    assert sse.block(first.items) == b"data: 1\n\n" and sse.block(last.items) == b"data: 2\n\ndata: 3\n\n"
    assert sse.close(list(last.items)) == b"data: 2\n\ndata: 3\n\n" + SSE_DONE
    assert sse.close([]) == SSE_DONE
    chunks = ChunkOutput(False)
    assert not chunks.holds(last) and chunks.close([]) is None
    js = JsonOutput(RequestKind.CHAT, "m")
    assert js.holds(first) and js.holds(last)
    body = js.close([_chunk("a"), _chunk("b", "stop"), USAGE])
    assert body["choices"][0]["message"]["content"] == "ab" and body["usage"] == USAGE["usage"]
    assert body["choices"][0]["finish_reason"] == "stop" and body["object"] == "chat.completion"
