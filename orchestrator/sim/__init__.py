"""Discrete-event simulator of a ConServe fleet in virtual time (DESIGN.md section 6).

Public API: :func:`run_simulation` (instances + conversations + a policy -> :class:`SimResult`) and
:func:`simulate_fleet` (fleet.yaml config + optional plan or layout -> SimResult).
The simulator drives the same policy objects as the live router. Must not import fastapi, sqlalchemy or httpx.
"""

from orchestrator.sim.clock import VirtualClock
from orchestrator.sim.core import SimOptions, TurnDelay, run_simulation
from orchestrator.sim.fleet import simulate_fleet, simulate_plan
from orchestrator.sim.result import (
    ConversationRecord,
    Decision,
    EnergyWindow,
    Feedback,
    InstanceEnergy,
    KvGapStats,
    SimResult,
    TurnRecord,
    WindowWork,
)

__all__ = [
    "ConversationRecord",
    "Decision",
    "EnergyWindow",
    "Feedback",
    "InstanceEnergy",
    "KvGapStats",
    "SimOptions",
    "SimResult",
    "TurnDelay",
    "TurnRecord",
    "VirtualClock",
    "WindowWork",
    "run_simulation",
    "simulate_fleet",
    "simulate_plan",
]
