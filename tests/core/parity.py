"""The parity harness: one workload through the live router (simulated engines, virtual time) and through the
discrete-event simulator, with the same policy class, fleet, tier model and failure; what each driver decided
is recorded by the same policy wrapper, so the two runs compare decision by decision.

Live side: orchestrator.router.Router over orchestrator.engines.sim.SimEngine instances (the backend of
`orchestrator serve --backend sim`) on a :class:`vloop.VirtualTimeLoop`; each conversation is a client task
that waits for its arrival, sends each turn (``prompt_tokens`` = the turn's whole prompt, ``min_tokens`` = its
output so the simulated model decodes exactly that many, the last turn marked final), waits its tool gap, and
resends a turn the router gave up on. The router polls its engines every ``poll_s``; a failure kills the
engine and marks it down at the same virtual instant the simulator fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vloop import run_virtual

from conserve.clock import LoopClock
from energy.records import PinRecord, TurnRecord, TurnStatus
from orchestrator.engines.base import RequestKind
from orchestrator.engines.sim import SimEngine, SimKvFabric
from orchestrator.router import EngineUnavailable, Router, RouterConfig, TurnInput
from orchestrator.sim import SimOptions, SimResult, run_simulation
from orchestrator.workload import ConversationSpec
from placement.base import FleetView, Placement, Policy, Role, TurnRequest
from tiers.perf import TierModel


@dataclass(frozen=True, slots=True)
class Inst:
    """An instance spec (orchestrator.sim.core.InstanceLike)."""

    instance_id: str
    tier: str
    role: Role
    tier_model: TierModel


@dataclass(frozen=True, slots=True)
class Call:
    """One ``policy.place`` call: the turn, the pin the view showed for its conversation, the decision."""

    conversation_id: str
    turn: int
    input_tokens: int
    new_tokens: int
    pin_before: str | None
    decode_instance: str
    prefill_instance: str | None
    pin: bool
    history_tokens: int


class Recording:
    """Wraps a policy; records every placement with the pin its view showed (the same for both drivers)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.name = policy.name
        self.calls: list[Call] = []

    def place(self, turn: TurnRequest, view: FleetView) -> Placement:
        pl = self.policy.place(turn, view)
        pre = pl.prefill_instance if pl.remote_prefill else None
        self.calls.append(
            Call(
                turn.conversation_id,
                turn.turn,
                turn.input_tokens,
                turn.new_tokens,
                view.pins.get(turn.conversation_id),
                pl.decode_instance,
                pre,
                pl.pin,
                pl.history_tokens,
            )
        )
        return pl

    def observe_turn_end(self, conversation_id: str, turn: int, output_tokens: int) -> None:
        self.policy.observe_turn_end(conversation_id, turn, output_tokens)

    def forget(self, conversation_id: str) -> None:
        self.policy.forget(conversation_id)

    def by_conversation(self) -> dict[str, list[Call]]:
        out: dict[str, list[Call]] = {}
        for c in self.calls:
            out.setdefault(c.conversation_id, []).append(c)
        return out


@dataclass
class LiveRun:
    calls: Recording
    turns: list[TurnRecord] = field(default_factory=list)
    pins: list[PinRecord] = field(default_factory=list)
    ttfet_s: dict[str, float | None] = field(default_factory=dict)
    resent: int = 0

    def turn(self, rec: TurnRecord) -> None:
        self.turns.append(rec)

    def pin(self, rec: PinRecord) -> None:
        self.pins.append(rec)

    def ok_tokens(self) -> dict[str, list[tuple[int, int, int]]]:
        out: dict[str, list[tuple[int, int, int]]] = {}
        for t in self.turns:
            if t.status is TurnStatus.OK:
                out.setdefault(t.conversation_id, []).append((t.turn, t.prompt_tokens, t.output_tokens))
        return out


def run_live(
    instances: Sequence[Any],
    convs: Sequence[ConversationSpec],
    policy: Policy,
    failures: Sequence[tuple[str, float]] = (),
    poll_s: float = 0.005,
) -> LiveRun:
    rec = Recording(policy)
    live = LiveRun(rec)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        clock = LoopClock()
        fabric = SimKvFabric()
        engines = {
            i.instance_id: SimEngine(
                i.instance_id, i.role, i.tier, i.tier_model, model_name="m", clock=clock, fabric=fabric,
                natural_output_tokens=1,
            )
            for i in instances
        }  # fmt: skip
        cfg = RouterConfig("m", 10**7, down_after_failed_polls=1)
        router = Router(engines, rec, cfg, sink=live, clock=LoopClock())
        await router.poll()

        async def poller() -> None:
            while True:
                await asyncio.sleep(poll_s)
                await router.poll()

        async def fail(iid: str, at_s: float) -> None:
            await asyncio.sleep(at_s)
            engines[iid].kill()
            router.mark_down(iid, "killed by the scenario")

        async def client(conv: ConversationSpec) -> None:
            await asyncio.sleep(conv.arrival_s)
            inp_tokens = 0
            for k, t in enumerate(conv.turns):
                if k and t.tool_gap_s > 0:
                    await asyncio.sleep(t.tool_gap_s)
                inp_tokens += t.appended_tokens
                body = {"model": "m", "prompt": "p", "min_tokens": t.output_tokens}
                final = k == len(conv.turns) - 1
                inp = TurnInput(
                    RequestKind.COMPLETION, body, conv.conversation_id, final, prompt_tokens=inp_tokens
                )
                while True:
                    try:
                        await router.complete(inp)
                        break
                    except EngineUnavailable:
                        live.resent += 1  # the router gave up after its retry: the client sends it again
                inp_tokens += t.output_tokens
            live.ttfet_s[conv.conversation_id] = router.conversation(conv.conversation_id).ttfet_s  # type: ignore[union-attr]

        poll = loop.create_task(poller())
        killers = [loop.create_task(fail(i, t)) for i, t in failures]
        try:
            await asyncio.gather(*(client(c) for c in convs))
        finally:
            poll.cancel()
            for k in killers:
                k.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poll
            await router.aclose()

    run_virtual(main())
    return live


def run_sim(
    instances: Sequence[Any],
    convs: Sequence[ConversationSpec],
    policy: Policy,
    failures: Sequence[tuple[str, float]] = (),
    options: SimOptions | None = None,
) -> tuple[Recording, SimResult]:
    rec = Recording(policy)
    opts = options or SimOptions()
    res = run_simulation(instances, convs, rec, failures=failures, options=opts, energy_window_s=None)  # type: ignore[arg-type]
    return rec, res


def sim_tokens(res: SimResult) -> dict[str, list[tuple[int, int, int]]]:
    out: dict[str, list[tuple[int, int, int]]] = {}
    for t in res.turns:
        out.setdefault(t.conversation_id, []).append((t.turn, t.input_tokens, t.output_tokens))
    return out
