"""Errors of the energy package (meters, attribution, the ledger, reports)."""

from __future__ import annotations

from collections.abc import Iterable

from conserve.errors import ConServeError


class EnergyError(ConServeError):
    """A meter, the attribution or the ledger failed."""


class DuplicateTurnError(EnergyError):
    """Turns whose request_id is already in the run (turns are append-only: a retried attempt needs a new
    request_id). ``request_ids`` names the duplicates, so a writer can store the rest of its batch."""

    def __init__(self, run_id: str, request_ids: Iterable[str]) -> None:
        self.run_id = run_id
        self.request_ids = frozenset(request_ids)
        shown = ", ".join(sorted(self.request_ids)[:3]) + ("..." if len(self.request_ids) > 3 else "")
        super().__init__(
            f"{len(self.request_ids)} turn(s) with these request_ids are already in run {run_id!r} "
            f"({shown}): turns are append-only; give a retried turn a new request_id"
        )
