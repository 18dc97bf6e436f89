"""The SQL ledger: turns, pins, energy samples and attributions of every conversation, append-only, UTC.

``Ledger(url)`` is the only door to the database. Callers pass and get the frozen dataclasses of
energy/records.py; SQLAlchemy stays inside these modules and energy/db.py. Works on SQLite and PostgreSQL
(``postgresql+psycopg://``); several router replicas may share one PostgreSQL ledger (conversation rows are
created with INSERT .. ON CONFLICT DO NOTHING, everything else is an append).

Rows belong to a *run* (one serving session or one simulation, with its policy). A ledger object writes
into one run (``run_id``, default ``"live"``); the report queries read any set of runs.

The class is composed of three parts, one module each: energy/ledger_base.py (engine, errors, transactions,
runs), energy/ledger_turns.py (turns, pins, conversations) and energy/ledger_energy.py (samples,
attributions, power caps, report queries). Router replicas' shared turn numbers and pins are the one other
door, on PostgreSQL only (energy/heads.py).

Must not import fastapi.
"""

from __future__ import annotations

from energy.ledger_base import RunView
from energy.ledger_energy import ConversationFacts, EnergyLedger
from energy.ledger_turns import TurnLedger

__all__ = ["Ledger", "RunView", "ConversationFacts"]


class Ledger(TurnLedger, EnergyLedger):
    """Append-only SQL ledger. ``upgrade()`` once (it is idempotent), then record and query."""
