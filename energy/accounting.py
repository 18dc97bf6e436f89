"""Energy accounting: meters -> engine intervals -> attribution -> ledger; one code path, two drivers.

``account(ledger, intervals, ...)`` (energy/intervals.py) is the single step both drivers call: it attributes
every :class:`EngineInterval` (energy/attribution.py), checks conservation (rows sum to the interval's energy
within 1e-9 relative) and appends the rows to the ledger.

* ``orchestrator simulate --db URL`` calls :func:`write_simulation` (energy/simulation.py) inline: the
  simulator's energy windows (modelled energy per instance per window, and each turn's prefill/decode tokens
  in the window) become intervals; its turns and conversations become ledger rows.
* ``orchestrator serve`` runs :class:`EnergyAccountant` (energy/accountant.py) as an APScheduler job: each
  tick observes the engines' token counters (the model meter's activity), reads every meter, appends the
  samples, turns the meter deltas into per-engine intervals, and -- once the turns that overlapped an interval
  have had time to finish (``lag_s``) -- attributes them using the turns recorded in the ledger, spread over
  their lifetimes (prefill over [arrival, first token) on the prefilling instance, decode over [first, last
  token] on the decoder). ``flush()`` at shutdown attributes whatever is still pending.

This module gathers the three under one name (the public import path); it holds no code of its own.
Must not import fastapi.
"""

from __future__ import annotations

from energy.accountant import EnergyAccountant, EngineMeterBinding, ObserveFn, build_accountant
from energy.intervals import EnergyJob, LedgerTurnSource, TurnSource, account, run_energy_job, spread_work
from energy.simulation import (
    SIM_EPOCH,
    UNALLOCATED_ENGINE,
    UNALLOCATED_TIER,
    SimulationWriteSummary,
    write_simulation,
)

__all__ = [
    "SIM_EPOCH",
    "UNALLOCATED_ENGINE",
    "UNALLOCATED_TIER",
    "EnergyAccountant",
    "EnergyJob",
    "EngineMeterBinding",
    "LedgerTurnSource",
    "ObserveFn",
    "SimulationWriteSummary",
    "TurnSource",
    "account",
    "build_accountant",
    "run_energy_job",
    "spread_work",
    "write_simulation",
]
