"""The discrete-event simulator's public entry points (kept importable from here for existing importers).

The simulator was split along its responsibilities (issue 11 item 6): the model and the event loop are in
orchestrator/sim/engine.py (its docstring describes the model), the options in options.py, the instance model
in instance.py, arrivals and placement in placing.py, instance mechanics and failures in steps.py, and result
collection (records, TBT, energy) in collect.py.
"""

from __future__ import annotations

from orchestrator.sim.engine import run_simulation
from orchestrator.sim.options import (
    DEFAULT_MAX_BATCHED_TOKENS,
    DEFAULT_MAX_SEQS,
    InstanceLike,
    SimOptions,
    TurnDelay,
    kv_round_trip_bookkeeping_s,
)

__all__ = [
    "DEFAULT_MAX_BATCHED_TOKENS",
    "DEFAULT_MAX_SEQS",
    "InstanceLike",
    "SimOptions",
    "TurnDelay",
    "kv_round_trip_bookkeeping_s",
    "run_simulation",
]
