"""Memory bounded (issue 13 item 5): what the router holds for a conversation leaves when it ends -- the pin
and the KV counted on its decoder at once, the conversation state after ``ended_keep_s`` (after ``pin_ttl_s``
for one that was never ended), a one-turn conversation's as soon as it is recorded -- and the observer (the
API's running energy estimates) is told, so it lets go too. Not timed: the clock is virtual."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from conserve.clock import VirtualClock
from energy.estimate import EnergyEstimates
from orchestrator.engines.base import EngineObservation, EngineRequest, PrefillResult, RequestKind, Wire
from orchestrator.router import Router, RouterConfig, TurnInput
from placement.base import Role
from placement.policies import make_policy


class Engine:
    tier = "a40"
    wire = Wire.CHUNKS
    kv_capacity_tokens = 100_000

    def __init__(self, instance_id: str, role: Role) -> None:
        self.instance_id, self.role = instance_id, role

    async def prefill(self, req: EngineRequest) -> PrefillResult:
        return PrefillResult({"x": 1}, req.prompt_tokens)

    async def stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        for k in range(3):
            yield {"choices": [{"index": 0, "text": "t", "finish_reason": "length" if k == 2 else None}]}
        yield {"choices": [], "usage": {"prompt_tokens": req.prompt_tokens, "completion_tokens": 3}}

    async def observe(self) -> EngineObservation:
        return EngineObservation(healthy=True, kv_capacity_tokens=self.kv_capacity_tokens)

    async def aclose(self) -> None:
        return None


class Forgets:
    """A router observer that notes the conversations the router forgot."""

    def __init__(self) -> None:
        self.gone: list[str] = []

    def forgotten(self, conversation_id: str) -> None:
        self.gone.append(conversation_id)

    def __getattr__(self, name: str) -> Any:  # the other hooks: nothing to observe here
        return lambda *a, **k: None


def _router() -> tuple[Router, VirtualClock, Forgets]:
    clock = VirtualClock(start_s=0.0, epoch=datetime(2026, 12, 7, tzinfo=UTC))
    obs = Forgets()
    engines = {"p0": Engine("p0", Role.PREFILL), "d0": Engine("d0", Role.DECODE)}
    config = RouterConfig("m", 10**6, pin_ttl_s=900.0, ended_keep_s=30.0)
    return Router(engines, make_policy("conserve"), config, observer=obs, clock=clock), clock, obs  # type: ignore[arg-type]


def _turn(cid: str | None, prompt_tokens: int, final: bool = False) -> TurnInput:
    return TurnInput(
        RequestKind.COMPLETION, {"model": "m", "prompt": "p"}, cid, final, prompt_tokens=prompt_tokens
    )


def _decoder(router: Router) -> dict[str, Any]:
    return next(s for s in router.instance_status() if s["instance_id"] == "d0")


async def test_an_ended_conversation_releases_its_pin_at_once_and_its_state_after_ended_keep_s() -> None:
    router, clock, obs = _router()
    await router.complete(_turn("c", 1000))
    assert router.active_pin("c") == "d0" and _decoder(router)["pinned_tokens"] == 1003
    await router.complete(_turn("c", 1100, final=True))
    d0 = _decoder(router)
    assert router.active_pin("c") is None  # the client ended it: pin and KV count released at once
    assert (d0["pinned_conversations"], d0["pinned_tokens"]) == (0, 0)
    assert router.conversation("c") is not None  # kept ended_keep_s (a reuse continues its numbering)
    assert router.expire_idle(clock.now_s() + 29.0) == 0
    assert router.expire_idle(clock.now_s() + 31.0) == 1
    assert router.conversation("c") is None and obs.gone == ["c"]


async def test_a_conversation_never_ended_leaves_after_the_pin_ttl_with_its_pin() -> None:
    router, clock, obs = _router()
    await router.complete(_turn("open", 1000))
    assert router.expire_idle(clock.now_s() + 31.0) == 0  # not ended: kept while its pin lives
    assert router.active_pin("open") == "d0"
    assert router.expire_idle(clock.now_s() + 901.0) == 1
    d0 = _decoder(router)
    assert router.conversation("open") is None and router.active_pin("open") is None
    assert (d0["pinned_conversations"], d0["pinned_tokens"]) == (0, 0) and obs.gone == ["open"]


async def test_a_one_turn_conversation_is_forgotten_once_recorded() -> None:
    router, _, obs = _router()
    await router.complete(_turn(None, 500))
    assert len(obs.gone) == 1 and router.conversation(obs.gone[0]) is None
    assert router.fleet_view().pins == {} and _decoder(router)["pinned_tokens"] == 0


def test_the_running_energy_estimate_of_a_forgotten_conversation_is_dropped() -> None:
    from energy.attribution import PhaseWeights
    from energy.records import TurnRecord, TurnStatus

    at = datetime(2026, 12, 7, tzinfo=UTC)
    est = EnergyEstimates({"d0": PhaseWeights(prefill_j_per_token=0.001, decode_j_per_token=0.01)})
    rec = TurnRecord(
        conversation_id="c", turn=1, request_id="r1", instance_id="d0", arrival_at=at, first_token_at=at,
        last_token_at=at, prompt_tokens=100, output_tokens=10, finish_reason="stop", is_final=True,
        status=TurnStatus.OK, prefill_instance_id=None, remote_prefill=False, tier="a40", cached_tokens=0,
    )  # fmt: skip
    est.record(rec)
    assert est.conversation_j("c") is not None
    est.forget("c")
    assert est.conversation_j("c") is None
    assert est.last["r1"][1] > 0  # the finished turn's answer still carries its estimate
