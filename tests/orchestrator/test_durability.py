"""Nothing answered is lost (issue 13 item 4): the router holds an answered turn's last byte until its record
is durable, streaming ([DONE]) and not (the JSON body)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from energy.records import PinRecord, TurnRecord
from orchestrator.engines.base import EngineObservation, EngineRequest, PrefillResult, RequestKind, Wire
from orchestrator.router import SSE_DONE, Router, RouterConfig, TurnInput
from placement.base import Role
from placement.policies import make_policy


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunk(i: int, finish: str | None = None) -> dict[str, Any]:
    return {"id": "x", "choices": [{"index": 0, "delta": {"content": f"t{i}"}, "finish_reason": finish}]}


class SseEngine:
    """Replays OpenAI SSE bytes, one block per event (the wire of a vLLM server)."""

    role = Role.COLOCATED
    tier = "t"
    wire = Wire.SSE
    kv_capacity_tokens = 100_000
    instance_id = "e0"

    async def stream_raw(self, req: EngineRequest) -> AsyncIterator[bytes]:
        for b in (_event(_chunk(0)), _event(_chunk(1)), _event(_chunk(2, "stop")), SSE_DONE):
            yield b

    def stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:  # pragma: no cover - not used
        raise AssertionError("the router must use stream_raw")

    async def prefill(self, req: EngineRequest) -> PrefillResult:  # pragma: no cover - colocated
        raise AssertionError

    async def complete(self, req: EngineRequest) -> dict[str, Any]:  # pragma: no cover
        raise AssertionError

    async def observe(self) -> EngineObservation:
        return EngineObservation(healthy=True)

    async def observe_shared(self) -> EngineObservation:
        return await self.observe()

    async def aclose(self) -> None:
        return None


class GatedSink:
    """A TurnSink whose records become durable when the test says so."""

    def __init__(self) -> None:
        self.turns: list[TurnRecord] = []
        self.gate = asyncio.Event()
        self.waits = 0

    def turn(self, rec: TurnRecord) -> None:
        self.turns.append(rec)

    def pin(self, rec: PinRecord) -> None:
        pass

    async def wait_durable(self) -> None:
        self.waits += 1
        await self.gate.wait()


def _router(sink: GatedSink) -> Router:
    return Router(
        {"e0": SseEngine()},
        make_policy("conserve"),
        RouterConfig(model_name="m", max_context_tokens=32_000),
        sink=sink,
        durability=sink.wait_durable,
    )


def _inp() -> TurnInput:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    return TurnInput(RequestKind.CHAT, body, conversation_id="c1")


async def test_done_leaves_only_after_the_turn_is_durable() -> None:
    sink = GatedSink()
    gen = _router(sink).stream_sse(_inp())
    got: list[bytes] = []

    async def consume() -> None:
        async for block in gen:
            got.append(block)

    task = asyncio.ensure_future(consume())
    for _ in range(200):  # the engine's stream is done and the turn recorded: only the last block is held
        await asyncio.sleep(0)
        if sink.waits:
            break
    await asyncio.sleep(0.05)
    assert sink.waits == 1 and len(sink.turns) == 1 and sink.turns[0].status == "ok"
    assert got and not any(SSE_DONE in b for b in got), "[DONE] left before the record was durable"
    assert b"t0" in b"".join(got)  # the first token was not held
    sink.gate.set()
    await asyncio.wait_for(task, 5)
    assert got[-1].endswith(SSE_DONE) and b"t2" in b"".join(got)


async def test_the_json_body_waits_for_the_turn_to_be_durable() -> None:
    sink = GatedSink()
    inp = _inp()
    inp.body["stream"] = False
    task = asyncio.ensure_future(_router(sink).complete(inp))
    await asyncio.sleep(0.1)
    assert sink.waits == 1 and len(sink.turns) == 1 and not task.done()
    sink.gate.set()
    body = await asyncio.wait_for(task, 5)
    assert body["choices"][0]["message"]["content"] == "t0t1t2"


async def test_without_durability_nothing_waits() -> None:
    sink = GatedSink()
    router = Router(
        {"e0": SseEngine()},
        make_policy("conserve"),
        RouterConfig(model_name="m", max_context_tokens=32_000),
        sink=sink,
    )
    blocks = [b async for b in router.stream_sse(_inp())]
    assert blocks[-1].endswith(SSE_DONE) and sink.waits == 0
