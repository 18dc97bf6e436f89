"""One clock interface (conserve/clock.py, issue 11 item 2): monotonic ``now_s`` for durations, ``wall`` for
record timestamps, async ``sleep``; the router times turns with it (TTFT and token gaps are differences of
the monotonic clock, never of ``time.time``), also on a virtual clock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conserve.clock import SYSTEM_CLOCK, SystemClock, VirtualClock
from energy.records import PinRecord, TurnRecord
from orchestrator.engines.base import EngineObservation, EngineRequest, PrefillResult, RequestKind
from orchestrator.engines.sse import ChunkNative
from orchestrator.router import Router, RouterConfig, TurnInput
from placement.base import Role
from placement.policies import make_policy


def test_system_clock_is_monotonic_and_stamps_records_in_utc() -> None:
    clock = SystemClock()
    a = clock.now_s()
    assert abs(a - time.monotonic()) < 1.0
    assert abs((clock.wall() - datetime.now(UTC)).total_seconds()) < 1.0
    assert clock.wall(a + 1.5) - clock.wall(a) == timedelta(seconds=1.5)
    assert clock.wall(a).tzinfo is UTC
    assert clock.at_s(clock.wall(a)) == pytest.approx(a, abs=1e-5)


async def test_system_clock_sleeps_shortened_by_its_speedup() -> None:
    clock = SystemClock(speedup=100)
    t0 = time.monotonic()
    await clock.sleep(1.0)  # 10 ms of real time
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(ValueError, match="speedup must be > 0"):
        SystemClock(speedup=0)


async def test_virtual_clock_moves_only_forward_and_maps_to_wall_time() -> None:
    epoch = datetime(2026, 3, 1, tzinfo=UTC)
    clock = VirtualClock(epoch=epoch)
    assert clock.now_s() == 0.0 and clock.wall() == epoch
    await clock.sleep(2.5)
    assert clock.now_s() == 2.5 and clock.wall() == epoch + timedelta(seconds=2.5)
    assert clock.at_s(epoch + timedelta(seconds=7)) == 7.0
    with pytest.raises(RuntimeError, match="backwards"):
        clock.advance_to(1.0)


class TimedEngine(ChunkNative):
    """Streams 3 tokens: the first after `first_s`, then one every `gap_s`, sleeping on the given clock."""

    role = Role.COLOCATED
    tier = "t"
    kv_capacity_tokens = 100_000
    instance_id = "e0"

    def __init__(self, clock: Any, first_s: float, gap_s: float) -> None:
        self.clock, self.first_s, self.gap_s = clock, first_s, gap_s

    async def stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        for i in range(3):
            await self.clock.sleep(self.first_s if i == 0 else self.gap_s)
            finish = "stop" if i == 2 else None
            yield {
                "id": "x",
                "choices": [{"index": 0, "delta": {"content": f"t{i}"}, "finish_reason": finish}],
            }

    async def prefill(self, req: EngineRequest) -> PrefillResult:  # pragma: no cover - colocated
        raise AssertionError

    async def complete(self, req: EngineRequest) -> dict[str, Any]:  # pragma: no cover
        raise AssertionError

    async def observe(self) -> EngineObservation:
        return EngineObservation(healthy=True)



    async def aclose(self) -> None:
        return None


class Sink:
    def __init__(self) -> None:
        self.turns: list[TurnRecord] = []

    def turn(self, rec: TurnRecord) -> None:
        self.turns.append(rec)

    def pin(self, rec: PinRecord) -> None:
        pass


class Observer:
    def __init__(self) -> None:
        self.ttft: list[float | None] = []
        self.gaps: list[list[float]] = []

    def turn_done(
        self, rec: Any, ttft_s: float | None, tbt_gaps_s: list[float], ttfet_s: float | None
    ) -> None:
        self.ttft.append(ttft_s)
        self.gaps.append(list(tbt_gaps_s))

    def __getattr__(self, name: str) -> Any:  # the other hooks: nothing to observe here
        return lambda *a, **k: None


async def test_the_router_times_turns_on_its_injected_clock() -> None:
    """On a virtual clock the router's TTFT, token gaps and record timestamps are exact: it reads no other
    time source (before: time.time, which steps with the wall clock)."""
    epoch = datetime(2026, 3, 1, tzinfo=UTC)
    clock = VirtualClock(start_s=100.0, epoch=epoch)
    sink, obs = Sink(), Observer()
    router = Router(
        {"e0": TimedEngine(clock, first_s=0.25, gap_s=0.1)},
        make_policy("conserve"),
        RouterConfig(model_name="m", max_context_tokens=32_000),
        sink=sink,
        observer=obs,  # type: ignore[arg-type]
        clock=clock,
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    chunks = [c async for c in router.stream(TurnInput(RequestKind.CHAT, body, conversation_id="c1"))]
    assert len(chunks) == 3
    (rec,) = sink.turns
    assert rec.arrival_at == epoch + timedelta(seconds=100)
    assert rec.first_token_at == epoch + timedelta(seconds=100.25)
    assert rec.last_token_at == epoch + timedelta(seconds=100.45)
    assert obs.ttft == [pytest.approx(0.25)] and obs.gaps == [[pytest.approx(0.1), pytest.approx(0.1)]]


def test_the_router_defaults_to_the_monotonic_system_clock() -> None:
    router = Router(
        {"e0": TimedEngine(SYSTEM_CLOCK, 0, 0)},
        make_policy("conserve"),
        RouterConfig(model_name="m", max_context_tokens=32_000),
    )
    assert router.clock is SYSTEM_CLOCK and abs(router.clock.now_s() - time.monotonic()) < 1.0
