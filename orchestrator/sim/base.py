"""The state every part of the simulator's event loop shares (:class:`SimBase`): the run's objects, its
event queue and the counters; the parts (placing.py, steps.py, collect.py) are mixins over it, combined into
one simulator in engine.py.

Split out of orchestrator/sim/core.py (issue 11 item 6); pure move.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from orchestrator.core import AdmissionRule, PinBook, PinState
from orchestrator.sim.clock import VirtualClock
from orchestrator.sim.instance import _Instance, _Seq, _TurnState
from orchestrator.sim.options import SimOptions, TurnDelay
from orchestrator.sim.result import Decision, Feedback, KvGapStats
from orchestrator.workload import ConversationSpec
from placement.base import InstanceView, Placement, Policy

# event kinds
_ARRIVE = 0
_STEP = 1
_XFER = 2
_FAIL = 3
_PULL = 4
_RESUME = 5
_REFUSE = 6  # a turn 1 has waited SimOptions.admission_wait_s for router-side admission
_POWER = 7  # a power-controller step (orchestrator.sim.power)
_GAP = 8  # a tool gap's hold time is over (orchestrator.sim.gaps, SimOptions.kv_gap_rule)


class SimBase:
    """The simulator's state (set in engine._Sim.__init__) and its event plumbing."""

    opts: SimOptions
    turn_delay: TurnDelay | None
    insts: list[_Instance]
    by_id: dict[str, _Instance]
    convs: list[ConversationSpec]
    policy: Policy
    seed: int
    clock: VirtualClock
    heap: list[tuple[float, int, int, Any, Any]]
    order: int
    calls: int
    key: int
    book: PinBook
    pins: dict[str, str]
    pin_state: list[PinState]
    decisions: list[Decision]
    feedback: list[Feedback]
    turn_states: list[list[_TurnState]]
    inputs: list[list[int]]
    done: int
    progress: Callable[[int, int], None] | None
    events: int
    kv_transfers: int
    kv_transfer_bytes: int
    views: list[InstanceView]
    rule: AdmissionRule
    admission: bool
    admitted_s: list[float]
    adm_dec: list[tuple[int, int] | None]
    adm_pre: list[tuple[int, int] | None]
    adm_waiting: list[_TurnState]
    adm_parked: list[tuple[_TurnState, Placement]]
    adm_parked_count: int
    refused: list[int]  # conversations refused at admission (SimOptions.admission_wait_s)
    power: Any  # orchestrator.sim.power.SimPowerDriver, or None (SimOptions.power_controller)
    gap_on: bool  # SimOptions.kv_gap_rule (orchestrator.sim.gaps)

    def _push(self, t: float, kind: int, a: Any, b: Any) -> None:
        self.order += 1
        heapq.heappush(self.heap, (t, self.order, kind, a, b))

    def _next_call(self) -> int:
        self.calls += 1
        return self.calls

    def _new_seq(self, ts: _TurnState, kind: int) -> _Seq:
        self.key += 1
        return _Seq(self.key, ts, kind, self.convs[ts.conv].conversation_id)

    if TYPE_CHECKING:  # the parts call each other: placing.Placing and steps.Stepping define these

        def _arrive(
            self, ci: int, turn: int, t: float, ts: _TurnState | None = None, resumed: bool = False
        ) -> None: ...
        def _pin_account(self, ci: int, tokens: int) -> None: ...
        def _unpin(self, ci: int) -> None: ...
        def _adm_release(self, ci: int, t: float) -> None: ...
        def _adm_retry(self, t: float) -> None: ...
        def _enqueue(self, inst: _Instance, s: _Seq, t: float) -> None: ...
        def _restart(self, ts: _TurnState, t: float) -> None: ...
        def _refuse(self, ts: _TurnState, t: float) -> None: ...
        def _gap_start(self, ci: int, inst: _Instance, t: float) -> None: ...
        def _gap_pressure_check(self, inst: _Instance, t: float, need_tokens: int = 0) -> None: ...
        def _gap_end(self, ci: int, t: float) -> float: ...
        def _gap_restored(self, ci: int) -> None: ...
        def _gap_stats(self) -> KvGapStats | None: ...


__all__ = ["_ARRIVE", "_FAIL", "_GAP", "_POWER", "_PULL", "_REFUSE", "_RESUME", "_STEP", "_XFER", "SimBase"]
